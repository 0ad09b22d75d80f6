// One GRU layer's whole float32 time loop, forward and backward, as a torch C++ extension.
//
// What it replaces: torch's CPU GRU runs every gate's sigmoid, tanh, add and multiply as a tensor
// op of its own, forward and (through autograd) backward, about 30 ops per time step. Here each
// time step is two (forward) or four (backward) products through the BLAS torch itself is linked
// with (its sgemm_, MKL on x86 wheels, so torch.set_num_threads applies; a torch without one
// fails to load this extension, and nn.GRU runs instead) and ONE pass over the gates,
// which also adds the biases and sums their gradients. The function is torch.nn.GRU's
// (gate order r, z, n):
//   r = sigmoid(gi_r + gh_r)      z = sigmoid(gi_z + gh_z)
//   n = tanh(gi_n + r * gh_n)     h = (1 - z) * n + z * h_prev
// with gi = x W_ih^T + b_ih and gh = h_prev W_hh^T + b_hh. The products arrive without biases:
// b_gi holds b_ih with the r and z parts of b_hh folded in (they only appear in gi + gh); b_hn,
// the n part of b_hh, stays apart because r multiplies it.
//
// Every entry point checks its arguments (device, dtype, layout, shapes) with TORCH_CHECK and
// raises a Python RuntimeError naming the argument: a wrong call is refused, it never reads or
// writes memory it was not given. Compiled and loaded by fvae_dist/accel/extension.py; called by
// fvae_dist/accel/gru.py. The measured gain is in docs/benchmarks.md.
#include <torch/extension.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

// The Fortran BLAS sgemm (column-major, 32-bit integers), exported by libtorch_cpu.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// ---- branch-free exp, sigmoid and tanh that a loop can vectorise ------------------------------

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to
// r^7 (relative error below 1e-8 on that interval, under float32's own rounding). std::exp is a
// library call the compiler cannot vectorise without -ffast-math; this is plain arithmetic. gcc
// turns the clamps into vector blends only under -fno-trapping-math (extension.py sets it); without
// it the forward gates stay scalar and took three quarters of the layer's forward time.
inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);     // keeps 2^n a normal float
    const float shifter = 12582912.0f;                      // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-06f;  // ln 2 split in two
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &exponent, sizeof(scale));
    return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

// ---- row-major products through the column-major BLAS ----------------------------------------

// Row-major C (m, n) = op(A) op(B) + beta C. A row-major matrix is its transpose in column-major
// order, so this is the column-major C^T = op(B)^T op(A)^T. Sizes fit an int (layer_sizes checks).
inline void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
    const float one = 1.0f;
    sgemm_(transpose_b ? "T" : "N", transpose_a ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// ---- one time step's gates ---------------------------------------------------------------------

// gi, gh: (S, 3H) row-major products without bias. h_prev, h: (S, H). Saves the four (S, H)
// arrays backward needs: r, z, n and gh_n + b_hn (saved: (4, S, H)).
void forward_gates(int64_t S, int64_t H, const float* __restrict__ gi, const float* __restrict__ gh,
                   const float* __restrict__ b_gi, const float* __restrict__ b_hn, const float* __restrict__ h_prev,
                   float* __restrict__ h, float* __restrict__ saved) {
    float* __restrict__ r_out = saved;
    float* __restrict__ z_out = saved + S * H;
    float* __restrict__ n_out = saved + 2 * S * H;
    float* __restrict__ ghn_out = saved + 3 * S * H;
    for (int64_t s = 0; s < S; ++s) {
        const float* __restrict__ gi_row = gi + s * 3 * H;
        const float* __restrict__ gh_row = gh + s * 3 * H;
        const int64_t o = s * H;
#pragma GCC ivdep  // inputs and outputs never overlap: no run-time aliasing checks
        for (int64_t j = 0; j < H; ++j) {
            const float r = sigmoid(gi_row[j] + b_gi[j] + gh_row[j]);
            const float z = sigmoid(gi_row[H + j] + b_gi[H + j] + gh_row[H + j]);
            const float gh_n = gh_row[2 * H + j] + b_hn[j];
            const float n = tanh_approx(gi_row[2 * H + j] + b_gi[2 * H + j] + r * gh_n);
            h[o + j] = n + z * (h_prev[o + j] - n);                   // (1 - z) n + z h_prev
            r_out[o + j] = r;
            z_out[o + j] = z;
            n_out[o + j] = n;
            ghn_out[o + j] = gh_n;
        }
    }
}

// dh, the gradient reaching h_t, is dh_out (from the layer's output; row stride 0 for one shared
// zero row) + dh_carry (z * dh of the step after) + dh_mm (dgh W_hh of the step after). Writes
// dgi (the gate pre-activations' gradients) and dgh (the same for gh, n part scaled by r), both
// (S, 3H); overwrites dh_carry with z * dh for the step before; adds the bias gradients to db
// ((4H,): d_r, d_z, d_n, then d_n * r).
void backward_gates(int64_t S, int64_t H, const float* __restrict__ dh_out, int64_t dh_out_stride,
                    float* __restrict__ dh_carry, const float* __restrict__ dh_mm, const float* __restrict__ saved,
                    const float* __restrict__ h_prev, float* __restrict__ dgi, float* __restrict__ dgh,
                    float* __restrict__ db) {
    const float* r_in = saved;
    const float* z_in = saved + S * H;
    const float* n_in = saved + 2 * S * H;
    const float* ghn_in = saved + 3 * S * H;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t o = s * H;
        float* __restrict__ dgi_row = dgi + s * 3 * H;
        float* __restrict__ dgh_row = dgh + s * 3 * H;
        const float* __restrict__ out_row = dh_out + s * dh_out_stride;
#pragma GCC ivdep  // as above: without it gcc's aliasing checks leave this loop scalar
        for (int64_t j = 0; j < H; ++j) {
            const float dh = dh_carry[o + j] + out_row[j] + dh_mm[o + j];
            const float r = r_in[o + j], z = z_in[o + j], n = n_in[o + j];
            const float d_n_pre = dh * (1.0f - z) * (1.0f - n * n);          // through tanh
            const float d_z_pre = dh * (h_prev[o + j] - n) * z * (1.0f - z);  // through sigmoid
            const float d_r_pre = d_n_pre * ghn_in[o + j] * r * (1.0f - r);
            dgi_row[j] = d_r_pre;
            dgi_row[H + j] = d_z_pre;
            dgi_row[2 * H + j] = d_n_pre;
            dgh_row[j] = d_r_pre;
            dgh_row[H + j] = d_z_pre;
            dgh_row[2 * H + j] = d_n_pre * r;
            dh_carry[o + j] = dh * z;
            db[j] += d_r_pre;
            db[H + j] += d_z_pre;
            db[2 * H + j] += d_n_pre;
            db[3 * H + j] += d_n_pre * r;
        }
    }
}

// ---- argument checks ----------------------------------------------------------------------------

void check_float_cpu(const at::Tensor& t, const char* name, int64_t dim) {
    TORCH_CHECK(t.defined(), "fvae_dist GRU loop: ", name, " is undefined");
    TORCH_CHECK(t.device().is_cpu(), "fvae_dist GRU loop: ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "fvae_dist GRU loop: ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "fvae_dist GRU loop: ", name, " must be contiguous");
    TORCH_CHECK(t.dim() == dim, "fvae_dist GRU loop: ", name, " must have ", dim, " dimensions, got ", t.sizes());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
    TORCH_CHECK(t.sizes() == expected, "fvae_dist GRU loop: ", name, " must have shape ", expected, ", got ",
                t.sizes());
}

// The layer's sizes, checked once from x and the weights. x is (S, T, I) batch-first or
// (T, S, I) time-major; stock s's step t sits at x + s * x_s + t * x_t.
struct Sizes {
    int64_t S, T, H, I, x_s, x_t;
};

Sizes layer_sizes(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, bool time_major) {
    check_float_cpu(x, "x", 3);
    check_float_cpu(w_ih, "w_ih", 2);
    check_float_cpu(w_hh, "w_hh", 2);
    const int64_t S = time_major ? x.size(1) : x.size(0);
    const int64_t T = time_major ? x.size(0) : x.size(1);
    const int64_t I = x.size(2);
    const int64_t H = w_hh.size(1);
    TORCH_CHECK(S > 0 && T > 0 && I > 0 && H > 0, "fvae_dist GRU loop: empty input ", x.sizes());
    check_shape(w_hh, "w_hh", {3 * H, H});
    check_shape(w_ih, "w_ih", {3 * H, I});
    // the Fortran BLAS takes 32-bit sizes and leading dimensions
    TORCH_CHECK(S * 3 * H < INT_MAX && T * S * I < INT_MAX && T * I < INT_MAX,
                "fvae_dist GRU loop: input too large for 32-bit BLAS sizes ", x.sizes());
    return time_major ? Sizes{S, T, H, I, I, S * I} : Sizes{S, T, H, I, T * I, I};
}

// ---- whole sequences ----------------------------------------------------------------------------

// Returns states ((T + 1, S, H), states[0] = h_0 = 0) and saved ((T, 4, S, H), the gates).
std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                    const at::Tensor& b_gi, const at::Tensor& b_hn, bool time_major) {
    const Sizes q = layer_sizes(x, w_ih, w_hh, time_major);
    const int64_t S = q.S, H = q.H, G = 3 * q.H;
    check_float_cpu(b_gi, "b_gi", 1);
    check_float_cpu(b_hn, "b_hn", 1);
    check_shape(b_gi, "b_gi", {G});
    check_shape(b_hn, "b_hn", {H});
    at::Tensor states = at::zeros({q.T + 1, S, H}, x.options());
    at::Tensor saved = at::empty({q.T, 4, S, H}, x.options());
    at::Tensor work = at::empty({2 * S * G}, x.options());
    {
        pybind11::gil_scoped_release no_gil;  // the caller's other threads (data readers) run meanwhile
        const float* px = x.data_ptr<float>();
        const float* pw_ih = w_ih.data_ptr<float>();
        const float* pw_hh = w_hh.data_ptr<float>();
        float* ps = states.data_ptr<float>();
        float* gi = work.data_ptr<float>();                           // (S, 3H) this step's x_t W_ih^T
        float* gh = gi + S * G;                                       // (S, 3H) this step's h_{t-1} W_hh^T
        for (int64_t t = 0; t < q.T; ++t) {
            float* h_prev = ps + t * S * H;
            gemm(false, true, S, G, q.I, px + t * q.x_t, q.x_s, pw_ih, q.I, 0.0f, gi, G);   // x_t W_ih^T
            if (t == 0) {
                std::memset(gh, 0, sizeof(float) * S * G);                                  // h_0 = 0
            } else {
                gemm(false, true, S, G, H, h_prev, H, pw_hh, H, 0.0f, gh, G);               // h_{t-1} W_hh^T
            }
            forward_gates(S, H, gi, gh, b_gi.data_ptr<float>(), b_hn.data_ptr<float>(), h_prev, h_prev + S * H,
                          saved.data_ptr<float>() + t * 4 * S * H);
        }
    }
    return {states, saved};
}

// From gru_forward's states and saved: dh_last (S, H), the gradient reaching h_T from outside the
// output sequence (None: none); dh_out (T, S, H) time-major, the gradient reaching each h_t
// through the output sequence (None: none). Returns dx (laid out like x; undefined unless
// need_dx), dW_ih, dW_hh and db ((4H,): d_r, d_z, d_n summed, then d_n * r).
std::vector<at::Tensor> gru_backward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const at::Tensor& states, const at::Tensor& saved,
                                     const std::optional<at::Tensor>& dh_last, const std::optional<at::Tensor>& dh_out,
                                     bool time_major, bool need_dx) {
    const Sizes q = layer_sizes(x, w_ih, w_hh, time_major);
    const int64_t S = q.S, H = q.H, G = 3 * q.H;
    check_float_cpu(states, "states", 3);
    check_shape(states, "states", {q.T + 1, S, H});
    check_float_cpu(saved, "saved", 4);
    check_shape(saved, "saved", {q.T, 4, S, H});
    if (dh_last.has_value()) {
        check_float_cpu(*dh_last, "dh_last", 2);
        check_shape(*dh_last, "dh_last", {S, H});
    }
    if (dh_out.has_value()) {
        check_float_cpu(*dh_out, "dh_out", 3);
        check_shape(*dh_out, "dh_out", {q.T, S, H});
    }
    at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
    at::Tensor dw_ih = at::zeros_like(w_ih);                          // accumulated step by step
    at::Tensor dw_hh = at::zeros_like(w_hh);
    at::Tensor db = at::zeros({4 * H}, x.options());
    at::Tensor dh_carry = dh_last.has_value() ? dh_last->clone() : at::zeros({S, H}, x.options());
    at::Tensor dh_mm = at::zeros({S, H}, x.options());                // no step after h_T
    at::Tensor dgi = at::empty({S, G}, x.options());
    at::Tensor dgh = at::empty({S, G}, x.options());
    at::Tensor zero_row = at::zeros({H}, x.options());
    {
        pybind11::gil_scoped_release no_gil;
        const float* px = x.data_ptr<float>();
        const float* ps = states.data_ptr<float>();
        const float* pw_ih = w_ih.data_ptr<float>();
        const float* pw_hh = w_hh.data_ptr<float>();
        float* pdgi = dgi.data_ptr<float>();
        float* pdgh = dgh.data_ptr<float>();
        for (int64_t t = q.T - 1; t >= 0; --t) {
            const float* h_prev = ps + t * S * H;
            const float* out_rows = dh_out.has_value() ? dh_out->data_ptr<float>() + t * S * H : zero_row.data_ptr<float>();
            backward_gates(S, H, out_rows, dh_out.has_value() ? H : 0, dh_carry.data_ptr<float>(),
                           dh_mm.data_ptr<float>(), saved.data_ptr<float>() + t * 4 * S * H, h_prev, pdgi, pdgh,
                           db.data_ptr<float>());
            if (need_dx) {
                gemm(false, false, S, q.I, G, pdgi, G, pw_ih, q.I, 0.0f, dx.data_ptr<float>() + t * q.x_t, q.x_s);
            }
            gemm(true, false, G, q.I, S, pdgi, G, px + t * q.x_t, q.x_s, 1.0f, dw_ih.data_ptr<float>(), q.I);
            if (t > 0) {                                              // h_0 is a constant
                gemm(true, false, G, H, S, pdgh, G, h_prev, H, 1.0f, dw_hh.data_ptr<float>(), H);  // dW_hh += dgh^T h
                gemm(false, false, S, H, G, pdgh, G, pw_hh, H, 0.0f, dh_mm.data_ptr<float>(), H);   // reaches h_{t-1}
            }
        }
    }
    return {dx, dw_ih, dw_hh, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &gru_forward, "GRU layer forward over the whole sequence (float32, CPU)",
          pybind11::arg("x"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_gi"),
          pybind11::arg("b_hn"), pybind11::arg("time_major"));
    m.def("backward", &gru_backward, "GRU layer backward over the whole sequence (float32, CPU)",
          pybind11::arg("x"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("states"),
          pybind11::arg("saved"), pybind11::arg("dh_last"), pybind11::arg("dh_out"), pybind11::arg("time_major"),
          pybind11::arg("need_dx"));
}
