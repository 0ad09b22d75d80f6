// The elementwise half of a GRU time step, forward and backward, fused into one pass each.
//
// fvae_dist/models/fused_gru.py does the matrix products with torch (MKL / oneDNN) and calls
// these kernels once per time step. torch's own CPU GRU runs each gate's sigmoid, tanh, add
// and multiply as separate tensor ops, forward and (through autograd) backward: about 30 ops
// per time step, each a pass over memory plus dispatch. Here each direction is one pass.
//
// Gate order and equations are torch.nn.GRU's (r, z, n):
//   r = sigmoid(gi_r + gh_r)      z = sigmoid(gi_z + gh_z)
//   n = tanh(gi_n + r * gh_n)     h = (1 - z) * n + z * h_prev
// with gi = x W_ih^T + b_ih and gh = h_prev W_hh^T + b_hh, both (S, 3H). Both products arrive
// here without their biases, which are added here instead (an addmm would first copy the bias
// into every one of the S*T rows of gi: a separate pass over 4 MB): b_gi, the bias of gi, holds
// b_ih with the r and z parts of b_hh folded in (they only ever appear in the sums gi + gh);
// b_hn, the n part of b_hh, stays apart because r multiplies it. Backward likewise sums the
// bias gradients while it writes the gate gradients, instead of two more passes afterwards.
//
// "MT" is the dtype of the matrix-product operands and results: float (fp32 training) or
// bfloat16 (bf16 training, stored as uint16_t). Gate activations, the hidden state and every
// gradient carried between steps stay float32, as torch's autocast keeps them.
//
// Built by fvae_dist/native/build.py with -O3 -march=native; the loops over a row are
// written branch-free so that the compiler vectorises them (exp included).
//
// Whole sequences (fp32 only): fvae_gru_forward_f32 / fvae_gru_backward_f32 run a layer's entire
// time loop here, the matrix products included, through the sgemm of the BLAS that torch itself
// uses (MKL on x86; its address comes from Python, models/fused_gru.py). Every product is then
// one time step's: forward x_t W_ih^T and h_{t-1} W_hh^T; backward dx_t = dgi_t W_ih, the
// recurrence dgh_t W_hh, and the weight gradients accumulated step by step (dW_ih += dgi_t^T x_t,
// dW_hh += dgh_t^T h_{t-1}) while dgi_t and dgh_t are still in cache. Measured on one core, 237
// stocks, T=20, H=64: forward + backward 7.8 ms against 8.8 ms for the same kernels driven from
// Python with four (S*T)-row products (bench_train.py, "gru_kernels"): no per-step Python and
// dispatch, and step-sized products run at 100-104 GFLOP/s where the large ones reached 86-95
// (their operands, several MB each, fall out of the caches).
#include <cstdint>
#include <cstring>

#include "fast_math.h"
#include "row_major_gemm.h"

namespace {

// ---- dtype conversion ------------------------------------------------------------------------

inline float load(const float* p, long i) { return p[i]; }
inline float load(const uint16_t* p, long i) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(p[i]) << 16);  // bf16: a float32's top half
}

inline void store(float* p, long i, float value) { p[i] = value; }
inline void store(uint16_t* p, long i, float value) {
    uint32_t bits = __builtin_bit_cast(uint32_t, value);
    bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even (torch's rounding)
    p[i] = static_cast<uint16_t>(bits >> 16);
}

// ---- sigmoid, tanh (exp_approx and sigmoid: fast_math.h) -----------------------------------

using fvae::exp_approx;
using fvae::sigmoid;
inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

// ---- one time step, forward ------------------------------------------------------------------

// gi: row s at gi + s * gi_stride, 3H values, no bias; gh: (S, 3H) contiguous, no bias;
// b_gi: (3H,) float, b_hn: (H,) float;
// h_prev, h: (S, H) float. Saves the four (S, H) arrays backward needs: r, z, n and
// gh_n + b_hn (saved: (4, S, H)).
// h_mm (may be null): a copy of h in the product dtype, the next step's matmul operand and
// backward's operand for the W_hh gradient.
template <typename MT>
void forward_step(long S, long H, const MT* __restrict__ gi, long gi_stride, const MT* __restrict__ gh,
                  const float* __restrict__ b_gi, const float* __restrict__ b_hn, const float* __restrict__ h_prev, float* __restrict__ h, MT* __restrict__ h_mm,
                  float* __restrict__ saved) {
    float* __restrict__ r_out = saved;
    float* __restrict__ z_out = saved + S * H;
    float* __restrict__ n_out = saved + 2 * S * H;
    float* __restrict__ ghn_out = saved + 3 * S * H;
    for (long s = 0; s < S; ++s) {
        const MT* __restrict__ gi_row = gi + s * gi_stride;
        const MT* __restrict__ gh_row = gh + s * 3 * H;
        const long o = s * H;
#pragma GCC ivdep  // the step's inputs and outputs never overlap: no run-time aliasing checks
        for (long j = 0; j < H; ++j) {
            const float r = sigmoid(load(gi_row, j) + b_gi[j] + load(gh_row, j));
            const float z = sigmoid(load(gi_row, H + j) + b_gi[H + j] + load(gh_row, H + j));
            const float gh_n = load(gh_row, 2 * H + j) + b_hn[j];
            const float n = tanh_approx(load(gi_row, 2 * H + j) + b_gi[2 * H + j] + r * gh_n);
            const float hp = h_prev[o + j];
            const float h_new = n + z * (hp - n);  // (1 - z) n + z h_prev
            h[o + j] = h_new;
            r_out[o + j] = r;
            z_out[o + j] = z;
            n_out[o + j] = n;
            ghn_out[o + j] = gh_n;
        }
        if (h_mm != nullptr) {
            for (long j = 0; j < H; ++j) store(h_mm, o + j, h[o + j]);
        }
    }
}

// ---- one time step, backward -----------------------------------------------------------------

// dh, the gradient reaching h_t, is the sum of three parts (none may be null; pass zeros, with
// dh_out_stride = 0 for one shared zero row, where a part is absent):
//   dh_out   (rows at dh_out + s * dh_out_stride): from the layer's output sequence
//   dh_carry ((S, H) float): z * dh of the step after, the direct path h_prev -> h
//   dh_mm    ((S, H) MT): dgh W_hh of the step after, the path through gh
// Writes dgi (rows at dgi + s * dgi_stride, 3H values, = d gate pre-activations) and
// dgh ((S, 3H): the same for gh, whose n part is scaled by r), overwrites dh_carry with
// z * dh for the step before, and adds this step's bias gradients to db ((4H,) float, summed
// over the S rows in float32 before any rounding to MT): d_r, d_z, d_n (b_ih's, whose r and z
// parts are also b_hh's), then d_n * r (b_hh's n part).
template <typename MT>
void backward_step(long S, long H, const float* __restrict__ dh_out, long dh_out_stride,
                   float* __restrict__ dh_carry, const MT* __restrict__ dh_mm, const float* __restrict__ saved,
                   const float* __restrict__ h_prev, MT* __restrict__ dgi, long dgi_stride, MT* __restrict__ dgh,
                   float* __restrict__ db) {
    const float* r_in = saved;
    const float* z_in = saved + S * H;
    const float* n_in = saved + 2 * S * H;
    const float* ghn_in = saved + 3 * S * H;
    for (long s = 0; s < S; ++s) {
        const long o = s * H;
        MT* __restrict__ dgi_row = dgi + s * dgi_stride;
        MT* __restrict__ dgh_row = dgh + s * 3 * H;
        const float* __restrict__ out_row = dh_out + s * dh_out_stride;
#pragma GCC ivdep  // as above: without it, the many pointers exceed gcc's aliasing checks and
                   // the loop is left scalar (measured: backward 0.7 ms slower a step)
        for (long j = 0; j < H; ++j) {
            const float dh = dh_carry[o + j] + out_row[j] + load(dh_mm, o + j);
            const float r = r_in[o + j], z = z_in[o + j], n = n_in[o + j];
            const float d_n_pre = dh * (1.0f - z) * (1.0f - n * n);          // through tanh
            const float d_z_pre = dh * (h_prev[o + j] - n) * z * (1.0f - z);  // through sigmoid
            const float d_r_pre = d_n_pre * ghn_in[o + j] * r * (1.0f - r);
            store(dgi_row, j, d_r_pre);
            store(dgi_row, H + j, d_z_pre);
            store(dgi_row, 2 * H + j, d_n_pre);
            store(dgh_row, j, d_r_pre);
            store(dgh_row, H + j, d_z_pre);
            store(dgh_row, 2 * H + j, d_n_pre * r);
            dh_carry[o + j] = dh * z;
            db[j] += d_r_pre;
            db[H + j] += d_z_pre;
            db[2 * H + j] += d_n_pre;
            db[3 * H + j] += d_n_pre * r;
        }
    }
}

// ---- whole sequences, fp32, products through the BLAS's sgemm -------------------------------

using fvae::gemm;
using fvae::sgemm_fn;

// The layer input x: (S, T, I) values, stock s's time step t at x + s * x_s + t * x_t (batch-first:
// x_s = T * I, x_t = I; time-major: x_s = I, x_t = S * I).
struct Sequence {
    long S, T, H, I, x_s, x_t;
};

// Forward over all T steps. W_ih (3H, I), W_hh (3H, H) row-major; b_gi, b_hn as in forward_step.
// Writes states ((T + 1, S, H), states[0] = h_0 = 0) and saved ((T, 4, S, H), forward_step's).
// work: 2 * S * 3H floats of scratch (the caller allocates, so that running out of memory is a
// Python error, not a crash here).
void sequence_forward(sgemm_fn sgemm, const Sequence& q, const float* x, const float* w_ih, const float* w_hh,
                      const float* b_gi, const float* b_hn, float* states, float* saved, float* work) {
    const long S = q.S, H = q.H, G = 3 * q.H;
    float* gi = work;                                                  // (S, 3H) this step's x_t W_ih^T
    float* gh = work + S * G;                                          // (S, 3H) this step's h_{t-1} W_hh^T
    std::memset(states, 0, sizeof(float) * S * H);
    for (long t = 0; t < q.T; ++t) {
        float* h_prev = states + t * S * H;
        gemm(sgemm, false, true, S, G, q.I, x + t * q.x_t, q.x_s, w_ih, q.I, 0.0f, gi, G);       // x_t W_ih^T
        if (t == 0) {
            std::memset(gh, 0, sizeof(float) * S * G);                                           // h_0 = 0
        } else {
            gemm(sgemm, false, true, S, G, H, h_prev, H, w_hh, H, 0.0f, gh, G);                 // h_{t-1} W_hh^T
        }
        forward_step<float>(S, H, gi, G, gh, b_gi, b_hn, h_prev, h_prev + S * H, nullptr, saved + t * 4 * S * H);
    }
}

// Backward over all T steps, from sequence_forward's states and saved. dh_last (S, H): the
// gradient reaching h_T from outside the sequence output (null: none); dh_out ((T, S, H),
// time-major; null: none): the gradient reaching each h_t through the output sequence.
// Writes dx (laid out like x; null: not wanted), dw_ih, dw_hh and db ((4H,), backward_step's).
// work: 2 * S * H + 2 * S * 3H + H floats of scratch.
void sequence_backward(sgemm_fn sgemm, const Sequence& q, const float* x, const float* w_ih, const float* w_hh,
                       const float* states, const float* saved, const float* dh_last, const float* dh_out,
                       float* dx, float* dw_ih, float* dw_hh, float* db, float* work) {
    const long S = q.S, H = q.H, G = 3 * q.H;
    float* dh_carry = work;                                            // (S, H) z * dh of the step after
    float* dh_mm = dh_carry + S * H;                                   // (S, H) dgh of the step after W_hh
    float* dgi = dh_mm + S * H;                                        // (S, 3H) this step's gate gradients
    float* dgh = dgi + S * G;                                          // (S, 3H) the same for gh
    float* zero_row = dgh + S * G;                                     // (H,) dh_out when there is none
    if (dh_last != nullptr) {
        std::memcpy(dh_carry, dh_last, sizeof(float) * S * H);
    } else {
        std::memset(dh_carry, 0, sizeof(float) * S * H);
    }
    std::memset(dh_mm, 0, sizeof(float) * S * H);                          // no step after h_T
    std::memset(zero_row, 0, sizeof(float) * H);
    std::memset(db, 0, sizeof(float) * 4 * H);
    std::memset(dw_ih, 0, sizeof(float) * G * q.I);                        // accumulated below
    std::memset(dw_hh, 0, sizeof(float) * G * H);
    for (long t = q.T - 1; t >= 0; --t) {
        const float* h_prev = states + t * S * H;
        const float* x_t = x + t * q.x_t;
        const float* out_rows = dh_out != nullptr ? dh_out + t * S * H : zero_row;
        backward_step<float>(S, H, out_rows, dh_out != nullptr ? H : 0, dh_carry, dh_mm, saved + t * 4 * S * H,
                             h_prev, dgi, G, dgh, db);
        if (dx != nullptr) {
            gemm(sgemm, false, false, S, q.I, G, dgi, G, w_ih, q.I, 0.0f, dx + t * q.x_t, q.x_s);  // dgi_t W_ih
        }
        gemm(sgemm, true, false, G, q.I, S, dgi, G, x_t, q.x_s, 1.0f, dw_ih, q.I);     // dW_ih += dgi_t^T x_t
        if (t > 0) {                                                       // h_0 is a constant
            gemm(sgemm, true, false, G, H, S, dgh, G, h_prev, H, 1.0f, dw_hh, H);      // dW_hh += dgh_t^T h_{t-1}
            gemm(sgemm, false, false, S, H, G, dgh, G, w_hh, H, 0.0f, dh_mm, H);       // reaches h_{t-1}
        }
    }
}

}  // namespace

// ---- C entry points (ctypes) -----------------------------------------------------------------

extern "C" {

int fvae_gru_abi_version() { return 5; }

void fvae_gru_forward_step_f32(long S, long H, const float* gi, long gi_stride, const float* gh, const float* b_gi,
                               const float* b_hn, const float* h_prev, float* h, float* h_mm, float* saved) {
    forward_step<float>(S, H, gi, gi_stride, gh, b_gi, b_hn, h_prev, h, h_mm, saved);
}

void fvae_gru_forward_step_bf16(long S, long H, const uint16_t* gi, long gi_stride, const uint16_t* gh,
                                const float* b_gi, const float* b_hn, const float* h_prev, float* h, uint16_t* h_mm,
                                float* saved) {
    forward_step<uint16_t>(S, H, gi, gi_stride, gh, b_gi, b_hn, h_prev, h, h_mm, saved);
}

void fvae_gru_backward_step_f32(long S, long H, const float* dh_out, long dh_out_stride, float* dh_carry,
                                const float* dh_mm, const float* saved, const float* h_prev, float* dgi,
                                long dgi_stride, float* dgh, float* db) {
    backward_step<float>(S, H, dh_out, dh_out_stride, dh_carry, dh_mm, saved, h_prev, dgi, dgi_stride, dgh, db);
}

void fvae_gru_backward_step_bf16(long S, long H, const float* dh_out, long dh_out_stride, float* dh_carry,
                                 const uint16_t* dh_mm, const float* saved, const float* h_prev, uint16_t* dgi,
                                 long dgi_stride, uint16_t* dgh, float* db) {
    backward_step<uint16_t>(S, H, dh_out, dh_out_stride, dh_carry, dh_mm, saved, h_prev, dgi, dgi_stride, dgh, db);
}

void fvae_gru_forward_f32(void* sgemm, long S, long T, long H, long I, const float* x, long x_s, long x_t,
                          const float* w_ih, const float* w_hh, const float* b_gi, const float* b_hn, float* states,
                          float* saved, float* work) {
    sequence_forward(reinterpret_cast<sgemm_fn>(sgemm), Sequence{S, T, H, I, x_s, x_t}, x, w_ih, w_hh, b_gi, b_hn,
                     states, saved, work);
}

void fvae_gru_backward_f32(void* sgemm, long S, long T, long H, long I, const float* x, long x_s, long x_t,
                           const float* w_ih, const float* w_hh, const float* states, const float* saved,
                           const float* dh_last, const float* dh_out, float* dx, float* dw_ih, float* dw_hh,
                           float* db, float* work) {
    sequence_backward(reinterpret_cast<sgemm_fn>(sgemm), Sequence{S, T, H, I, x_s, x_t}, x, w_ih, w_hh, states,
                      saved, dh_last, dh_out, dx, dw_ih, dw_hh, db, work);
}

}  // extern "C"
