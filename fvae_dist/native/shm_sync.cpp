// Cross-process counters for the shared-memory gradient all-reduce (train/shm_allreduce.py).
//
// Every rank copies its gradients into its own slot of a shared segment, then publishes a
// call counter; every rank waits until all counters reach that call, then sums all slots.
// Two things need native code:
//   * ordering: the counter must become visible only after the gradient bytes written before
//     it. x86 keeps stores in order, ARM does not: a release store (publish) and acquire loads
//     (wait) give the guarantee on both.
//   * waiting without sleeping: the wait is usually well under a millisecond (the ranks step
//     in lock step). Blocking in the kernel and being woken costs about that much again on a
//     virtual machine, which is why gloo's socket round trips were slow here. So the wait
//     spins for a few microseconds, then yields its core to other runnable threads (Ray Data,
//     the feeder), and only sleeps in short naps once a rank is clearly behind.
// ctypes releases the GIL around these calls, so the worker's other Python threads run.
#include <cstdint>
#include <ctime>
#include <sched.h>

namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

inline int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

inline int64_t load_acquire(const char* base, long stride, long i) {
    return __atomic_load_n(reinterpret_cast<const int64_t*>(base + i * stride), __ATOMIC_ACQUIRE);
}

constexpr int64_t kSpinNs = 20000;     // pure spinning: the common case, peers a few µs apart
constexpr int64_t kYieldNs = 2000000;  // then sched_yield: others may run, no wake-up latency
constexpr long kNapNs = 50000;         // then 50 µs naps: a rank far behind (validation, a crash)

}  // namespace

extern "C" {

int fvae_shm_abi_version() { return 2; }

// Store `value` into the counter at `counter` (8-byte aligned) with release semantics: every
// write this thread made before (the gradient slot) is visible to whoever sees the value.
void fvae_shm_publish(void* counter, int64_t value) {
    __atomic_store_n(reinterpret_cast<int64_t*>(counter), value, __ATOMIC_RELEASE);
}

// Wait until each of `count` counters (the first at `counters`, then every `stride` bytes) is
// >= `target`. Returns 0 then, or 1 after `timeout_ns` nanoseconds.
int fvae_shm_wait_all(void* counters, long stride, long count, int64_t target, int64_t timeout_ns) {
    const char* base = static_cast<const char*>(counters);
    const int64_t start = now_ns();
    long i = 0;  // counters already seen at target stay so: resume from the first lagging one
    for (;;) {
        while (i < count && load_acquire(base, stride, i) >= target) ++i;
        if (i == count) return 0;
        const int64_t waited = now_ns() - start;
        if (waited > timeout_ns) return 1;
        if (waited < kSpinNs) {
            for (int k = 0; k < 64; ++k) cpu_relax();
        } else if (waited < kYieldNs) {
            sched_yield();
        } else {
            timespec nap{0, kNapNs};
            nanosleep(&nap, nullptr);
        }
    }
}

// 1 when each of `count` counters (laid out as in fvae_shm_wait_all) holds exactly `value`,
// else 0. Read after fvae_shm_wait_all: the lockstep flags encode "have a batch" in the value.
int fvae_shm_all_equal(void* counters, long stride, long count, int64_t value) {
    const char* base = static_cast<const char*>(counters);
    for (long i = 0; i < count; ++i)
        if (load_acquire(base, stride, i) != value) return 0;
    return 1;
}

}  // extern "C"
