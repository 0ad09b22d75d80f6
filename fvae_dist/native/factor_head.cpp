// FactorVAE's training loss, eqs. 5-17, and its gradient, for one batch of days in one call.
//
// fvae_dist/models/fused_head.py does the three large products with torch (MKL / oneDNN) and
// calls this kernel for everything else. Everything else is about 400 small tensor ops in the
// reference modules (models/factorvae.py), forward and backward, each a dispatch and a pass over
// memory; their bookkeeping costs more than their arithmetic at FactorVAE's size (N = 300
// stocks, H = 64, M = 64, K = 8). Here it is one pass per day.
//
// Input: P, every quantity that is linear in a stock's e_i, from one product e A + bias:
//   row i of P = [ logits_p (M) | pre_alpha (H) | beta (K) | q.k (K) | k (K x H) ]
//     logits_p = w_p e_i + b_p                 eq. 6, portfolio weights before the softmax
//     pre_alpha = w_alpha e_i + b_alpha        eq. 10, before the LeakyReLU
//     beta = w_beta e_i + b_beta               eq. 11
//     q.k = (w_key_k^T q_k / |q_k|) . e_i       eq. 14, each head's query against the key
//     k = w_key_k e_i                          eq. 14, each head's key
// Output: the loss terms per day, the factors' distributions, and the gradient of the loss
// (mean over days of nll + gamma * kl, eq. 17) with respect to P, to e through the attention's
// pooling (the only place e enters other than P), and to the small parameters below.
// The caller turns dP into the gradients of e and of A with two more products; or, where torch's
// BLAS exports sgemm, fvae_head_step_f32 (at the end) does all of it in one call: A from the
// parameters, the three products, this kernel, and every gradient in its parameter's layout.
//
// Padded slots (mask 0) are skipped everywhere and get zero gradients, as in the reference.
// Every formula below names its equation; the gradients are derived by hand and checked
// against torch.autograd on the reference modules (tests/models/test_fused_head.py).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fast_math.h"
#include "row_major_gemm.h"

namespace {

// The small parameters, in the order fused_head.py passes their pointers (and their gradients').
enum Param {
    POST_MU_W,      // (K, M)   eq. 8
    POST_MU_B,      // (K)
    POST_SIGMA_W,   // (K, M)   eq. 8
    POST_SIGMA_B,   // (K)
    ALPHA_MU_W,     // (H)      eq. 10
    ALPHA_MU_B,     // (1)
    ALPHA_SIGMA_W,  // (H)      eq. 10
    ALPHA_SIGMA_B,  // (1)
    W_VALUE,        // (K, H, H) eq. 14, each head's value map
    PRIOR_HIDDEN_W, // (H, H)   eq. 16
    PRIOR_HIDDEN_B, // (H)
    PRIOR_MU_W,     // (H)      eq. 16
    PRIOR_MU_B,     // (1)
    PRIOR_SIGMA_W,  // (H)      eq. 16
    PRIOR_SIGMA_B,  // (1)
    NUM_PARAMS
};

constexpr float LOG_2PI = 1.8378770664093453f;

struct Sizes {
    long N, H, M, K;
    long width() const { return M + H + 2 * K + K * H; }
    long off_alpha() const { return M; }
    long off_beta() const { return M + H; }
    long off_qk() const { return M + H + K; }
    long off_key() const { return M + H + 2 * K; }
};

struct Settings {
    float slope;        // LeakyReLU negative slope (eqs. 10, 16)
    float sigma_floor;  // added to every Softplus std
    float gamma;        // KL weight (eq. 17)
    float day_weight;   // 1 / D: the loss is the mean over days
    float att_eps;      // ATTENTION_EPS of models/factorvae.py
};

// torch's Softplus (beta 1, threshold 20) and its derivative
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
inline float softplus_grad(float x) { return x > 20.0f ? 1.0f : 1.0f / (1.0f + std::exp(-x)); }

inline float dot(const float* __restrict__ a, const float* __restrict__ b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long j = 0; j < n; ++j) s += a[j] * b[j];
    return s;
}

// y[j] += a * x[j]
inline void axpy(float a, const float* __restrict__ x, float* __restrict__ y, long n) {
#pragma omp simd
    for (long j = 0; j < n; ++j) y[j] += a * x[j];
}

inline float leaky(float x, float slope) { return x > 0.0f ? x : slope * x; }
inline float leaky_grad(float x, float slope) { return x > 0.0f ? 1.0f : slope; }  // torch: x > 0

// One day. P, e, y, mask, dP, de point at the day's first stock; grads accumulate over days.
void one_day(const Sizes& sz, const Settings& st, const float* __restrict__ P, const float* __restrict__ e,
             const float* __restrict__ y, const uint8_t* __restrict__ mask, const float* __restrict__ eps,
             const float* const* prm, float* const* grad, float* __restrict__ out, float* __restrict__ dP,
             float* __restrict__ de) {
    const long N = sz.N, H = sz.H, M = sz.M, K = sz.K, W = sz.width();
    long n_real = 0;
    for (long i = 0; i < N; ++i) n_real += mask[i] != 0;
    const float inv_n = 1.0f / static_cast<float>(n_real);

    // ---- Factor encoder, eqs. 6-8 -----------------------------------------------------------
    // eq. 6: a_p = softmax over the day's stocks of logits_p, one softmax per portfolio m
    std::vector<float> a_p(N * M, 0.0f), col_max(M, -INFINITY), col_sum(M, 0.0f), y_p(M, 0.0f);
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        const float* logits = P + i * W;
        for (long m = 0; m < M; ++m) col_max[m] = logits[m] > col_max[m] ? logits[m] : col_max[m];
    }
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        const float* logits = P + i * W;
        float* a = a_p.data() + i * M;
#pragma omp simd
        for (long m = 0; m < M; ++m) {
            a[m] = fvae::exp_approx(logits[m] - col_max[m]);
            col_sum[m] += a[m];
        }
    }
    for (long m = 0; m < M; ++m) col_sum[m] = 1.0f / col_sum[m];
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        float* a = a_p.data() + i * M;
#pragma omp simd
        for (long m = 0; m < M; ++m) {
            a[m] *= col_sum[m];
            y_p[m] += y[i] * a[m];                                  // eq. 7: y_p = y . a_p
        }
    }
    // eq. 8: mu_post = w y_p + b, sigma_post = Softplus(w y_p + b); eq. 5: z = mu + sigma * eps
    std::vector<float> mu_q(K), sig_q(K), pre_sig_q(K), z(K);
    for (long k = 0; k < K; ++k) {
        mu_q[k] = prm[POST_MU_B][k] + dot(prm[POST_MU_W] + k * M, y_p.data(), M);
        pre_sig_q[k] = prm[POST_SIGMA_B][k] + dot(prm[POST_SIGMA_W] + k * M, y_p.data(), M);
        sig_q[k] = softplus(pre_sig_q[k]) + st.sigma_floor;
        z[k] = mu_q[k] + sig_q[k] * eps[k];
    }

    // ---- Factor decoder, eqs. 10-12, and the NLL of eq. 17 (z = z_post), with its gradient ----
    const float nll_weight = st.day_weight * inv_n;               // d loss / d (one stock's NLL)
    const float w_am_b = prm[ALPHA_MU_B][0], w_as_b = prm[ALPHA_SIGMA_B][0];
    std::vector<float> h_alpha(H), dz(K, 0.0f);
    double nll = 0.0;
    for (long i = 0; i < N; ++i) {
        float* dP_row = dP + i * W;
        if (!mask[i]) {
            for (long j = 0; j < W; ++j) dP_row[j] = 0.0f;
            continue;
        }
        const float* pre_alpha = P + i * W + sz.off_alpha();
        const float* beta = P + i * W + sz.off_beta();
        for (long j = 0; j < H; ++j) h_alpha[j] = leaky(pre_alpha[j], st.slope);                // eq. 10
        const float mu_alpha = w_am_b + dot(prm[ALPHA_MU_W], h_alpha.data(), H);               // eq. 10
        const float pre_sig_alpha = w_as_b + dot(prm[ALPHA_SIGMA_W], h_alpha.data(), H);
        const float sigma = softplus(pre_sig_alpha) + st.sigma_floor;                          // eq. 10
        const float mu_y = mu_alpha + dot(beta, z.data(), K);                                  // eq. 12, z known
        const float r = (y[i] - mu_y) / sigma;
        nll += 0.5 * LOG_2PI + std::log(sigma) + 0.5 * r * r;                                  // eq. 17
        // gradient of nll_weight * (log sigma + r^2 / 2)
        const float d_mu_y = -nll_weight * r / sigma;
        const float d_sigma = nll_weight * (1.0f - r * r) / sigma;
        const float d_pre_sig = d_sigma * softplus_grad(pre_sig_alpha);
        float* d_beta = dP_row + sz.off_beta();
        for (long k = 0; k < K; ++k) {
            d_beta[k] = d_mu_y * z[k];
            dz[k] += d_mu_y * beta[k];
        }
        float* d_pre_alpha = dP_row + sz.off_alpha();
        const float* w_am = prm[ALPHA_MU_W];
        const float* w_as = prm[ALPHA_SIGMA_W];
#pragma omp simd
        for (long j = 0; j < H; ++j)
            d_pre_alpha[j] = (d_mu_y * w_am[j] + d_pre_sig * w_as[j]) * leaky_grad(pre_alpha[j], st.slope);
        axpy(d_mu_y, h_alpha.data(), grad[ALPHA_MU_W], H);
        grad[ALPHA_MU_B][0] += d_mu_y;
        axpy(d_pre_sig, h_alpha.data(), grad[ALPHA_SIGMA_W], H);
        grad[ALPHA_SIGMA_B][0] += d_pre_sig;
    }
    nll *= inv_n;

    // ---- Factor predictor, eqs. 14-16 ---------------------------------------------------------
    // eq. 14: a_att[i, k] = max(0, cos(q_k, k_ik)) / sum_j max(0, cos(q_k, k_jk)), or uniform
    // over the real stocks when that sum is not above att_eps (the reference's 0/0 guard)
    const float eps2 = st.att_eps * st.att_eps;
    std::vector<float> cosine(N * K, 0.0f), key_norm(N * K, 1.0f), a_att(N * K, 0.0f), total(K, 0.0f);
    std::vector<uint8_t> norm_clamped(N * K, 0);
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        const float* qk = P + i * W + sz.off_qk();
        const float* keys = P + i * W + sz.off_key();
        for (long k = 0; k < K; ++k) {
            const float sq = dot(keys + k * H, keys + k * H, H);
            const float norm = std::sqrt(sq > eps2 ? sq : eps2);  // clamped like the reference
            norm_clamped[i * K + k] = sq < eps2;                   // torch's clamp passes sq >= min
            const float c = qk[k] / norm;
            key_norm[i * K + k] = norm;
            cosine[i * K + k] = c;
            total[k] += c > 0.0f ? c : 0.0f;
        }
    }
    std::vector<uint8_t> weighted(K);
    for (long k = 0; k < K; ++k) weighted[k] = total[k] > st.att_eps;
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        for (long k = 0; k < K; ++k) {
            const float c = cosine[i * K + k];
            a_att[i * K + k] = weighted[k] ? (c > 0.0f ? c : 0.0f) / total[k] : inv_n;
        }
    }
    // eqs. 14-15: h_att_k = sum_i a_att[i, k] w_value_k e_i = w_value_k (sum_i a_att[i, k] e_i)
    std::vector<float> pooled(K * H, 0.0f), h_multi(K * H), pre_prior(K * H), h_prior(K * H);
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        for (long k = 0; k < K; ++k) axpy(a_att[i * K + k], e + i * H, pooled.data() + k * H, H);
    }
    const float* w_value = prm[W_VALUE];
    for (long k = 0; k < K; ++k)
        for (long g = 0; g < H; ++g)
            h_multi[k * H + g] = dot(w_value + (k * H + g) * H, pooled.data() + k * H, H);
    // eq. 16: h_prior = LeakyReLU(w h_multi + b), mu_prior = w h_prior + b, sigma_prior = Softplus(.)
    std::vector<float> mu_p(K), sig_p(K), pre_sig_p(K);
    for (long k = 0; k < K; ++k) {
        for (long g = 0; g < H; ++g) {
            pre_prior[k * H + g] = prm[PRIOR_HIDDEN_B][g] + dot(prm[PRIOR_HIDDEN_W] + g * H, h_multi.data() + k * H, H);
            h_prior[k * H + g] = leaky(pre_prior[k * H + g], st.slope);
        }
        mu_p[k] = prm[PRIOR_MU_B][0] + dot(prm[PRIOR_MU_W], h_prior.data() + k * H, H);
        pre_sig_p[k] = prm[PRIOR_SIGMA_B][0] + dot(prm[PRIOR_SIGMA_W], h_prior.data() + k * H, H);
        sig_p[k] = softplus(pre_sig_p[k]) + st.sigma_floor;
    }

    // ---- KL(posterior || prior), eq. 17, and its gradient --------------------------------------
    const float kl_weight = st.day_weight * st.gamma;
    std::vector<float> d_mu_q(K), d_sig_q(K), d_mu_p(K), d_sig_p(K);
    double kl = 0.0;
    for (long k = 0; k < K; ++k) {
        const float diff = mu_q[k] - mu_p[k], var_p = sig_p[k] * sig_p[k], var_q = sig_q[k] * sig_q[k];
        kl += std::log(sig_p[k]) - std::log(sig_q[k]) + (var_q + diff * diff) / (2.0f * var_p) - 0.5f;
        // through z = mu_q + sig_q * eps (eq. 5) and through the KL itself
        d_mu_q[k] = dz[k] + kl_weight * diff / var_p;
        d_sig_q[k] = dz[k] * eps[k] + kl_weight * (sig_q[k] / var_p - 1.0f / sig_q[k]);
        d_mu_p[k] = -kl_weight * diff / var_p;
        d_sig_p[k] = kl_weight * (1.0f / sig_p[k] - (var_q + diff * diff) / (var_p * sig_p[k]));
    }

    // ---- encoder backward: eq. 8, then eqs. 6-7 -------------------------------------------------
    std::vector<float> d_y_p(M, 0.0f);
    for (long k = 0; k < K; ++k) {
        const float d_pre = d_sig_q[k] * softplus_grad(pre_sig_q[k]);
        axpy(d_mu_q[k], y_p.data(), grad[POST_MU_W] + k * M, M);
        grad[POST_MU_B][k] += d_mu_q[k];
        axpy(d_pre, y_p.data(), grad[POST_SIGMA_W] + k * M, M);
        grad[POST_SIGMA_B][k] += d_pre;
        axpy(d_mu_q[k], prm[POST_MU_W] + k * M, d_y_p.data(), M);
        axpy(d_pre, prm[POST_SIGMA_W] + k * M, d_y_p.data(), M);
    }
    // softmax backward folded with eq. 7: d logits[i, m] = a_p[i, m] * d_y_p[m] * (y_i - y_p[m])
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        const float* a = a_p.data() + i * M;
        float* d_logits = dP + i * W;
#pragma omp simd
        for (long m = 0; m < M; ++m) d_logits[m] = a[m] * d_y_p[m] * (y[i] - y_p[m]);
    }

    // ---- predictor backward: eq. 16, then eqs. 14-15 ------------------------------------------
    std::vector<float> d_pre_prior(K * H), d_h_multi(K * H, 0.0f), d_pooled(K * H, 0.0f);
    for (long k = 0; k < K; ++k) {
        const float d_pre_sig = d_sig_p[k] * softplus_grad(pre_sig_p[k]);
        axpy(d_mu_p[k], h_prior.data() + k * H, grad[PRIOR_MU_W], H);
        grad[PRIOR_MU_B][0] += d_mu_p[k];
        axpy(d_pre_sig, h_prior.data() + k * H, grad[PRIOR_SIGMA_W], H);
        grad[PRIOR_SIGMA_B][0] += d_pre_sig;
        for (long g = 0; g < H; ++g) {
            const float d_h = d_mu_p[k] * prm[PRIOR_MU_W][g] + d_pre_sig * prm[PRIOR_SIGMA_W][g];
            const float d_pre = d_h * leaky_grad(pre_prior[k * H + g], st.slope);
            d_pre_prior[k * H + g] = d_pre;
            grad[PRIOR_HIDDEN_B][g] += d_pre;
            axpy(d_pre, h_multi.data() + k * H, grad[PRIOR_HIDDEN_W] + g * H, H);
            axpy(d_pre, prm[PRIOR_HIDDEN_W] + g * H, d_h_multi.data() + k * H, H);
        }
        for (long g = 0; g < H; ++g) {
            const float d_hm = d_h_multi[k * H + g];
            axpy(d_hm, pooled.data() + k * H, grad[W_VALUE] + (k * H + g) * H, H);
            axpy(d_hm, w_value + (k * H + g) * H, d_pooled.data() + k * H, H);
        }
    }
    // pooling: de_i = sum_k a_att[i, k] d_pooled_k, d a_att[i, k] = e_i . d_pooled_k
    std::vector<float> d_att(N * K, 0.0f), att_dot(K, 0.0f);
    for (long i = 0; i < N; ++i) {
        float* de_row = de + i * H;
        for (long j = 0; j < H; ++j) de_row[j] = 0.0f;
        if (!mask[i]) continue;
        for (long k = 0; k < K; ++k) {
            axpy(a_att[i * K + k], d_pooled.data() + k * H, de_row, H);
            const float d = dot(e + i * H, d_pooled.data() + k * H, H);
            d_att[i * K + k] = d;
            att_dot[k] += d * a_att[i * K + k];
        }
    }
    // eq. 14 backward, per head. a = s / total: d s_i = (d a_i - sum_j d a_j a_j) / total; then
    // s = max(0, cos) (torch's clamp passes the gradient at cos >= 0), cos = q.k / |k|
    for (long i = 0; i < N; ++i) {
        if (!mask[i]) continue;
        float* d_qk = dP + i * W + sz.off_qk();
        float* d_keys = dP + i * W + sz.off_key();
        const float* keys = P + i * W + sz.off_key();
        for (long k = 0; k < K; ++k) {
            float d_cos = 0.0f;
            const float c = cosine[i * K + k], norm = key_norm[i * K + k];
            if (weighted[k] && c >= 0.0f) d_cos = (d_att[i * K + k] - att_dot[k]) / total[k];
            d_qk[k] = d_cos / norm;
            // d |k| = -d_cos * cos / |k|; d k = d|k| * k / |k| where |k|^2 was not clamped
            const float scale = norm_clamped[i * K + k] ? 0.0f : -d_cos * c / (norm * norm);
            float* dk = d_keys + k * H;
            const float* kv = keys + k * H;
#pragma omp simd
            for (long j = 0; j < H; ++j) dk[j] = scale * kv[j];
        }
    }

    out[0] = static_cast<float>(nll);
    out[1] = static_cast<float>(kl);
    for (long k = 0; k < K; ++k) {
        out[2 + k] = mu_q[k];
        out[2 + K + k] = sig_q[k];
        out[2 + 2 * K + k] = mu_p[k];
        out[2 + 3 * K + k] = sig_p[k];
    }
}

// ---- the whole step, products included (fp32, through the BLAS's sgemm) ----------------------

using fvae::gemm;
using fvae::sgemm_fn;

// The parameters folded into A, in the order fused_head.py passes them (and their gradients').
enum LinearParam {
    W_P,     // (M, H)     eq. 6, portfolio layer
    B_P,     // (M)
    W_HID,   // (H, H)     eq. 10, alpha's hidden layer
    B_HID,   // (H)
    W_BETA,  // (K, H)     eq. 11
    B_BETA,  // (K)
    QUERY,   // (K, H)     eq. 14, each head's query
    W_KEY,   // (K, H, H)  eq. 14, each head's key map (out, in)
    NUM_LINEAR_PARAMS
};

// Floats of the scratch memory full_step needs (fvae_head_work_size).
long work_size(const Sizes& sz, long D) {
    const long W = sz.width(), rows = D * sz.N;
    return 2 * W * sz.H + 2 * rows * W + sz.K * sz.H;  // maps, d_maps; P, dP; q_unit
}

long small_param_size(const Sizes& sz, int p) {
    const long H = sz.H, M = sz.M, K = sz.K;
    switch (p) {
        case POST_MU_W: case POST_SIGMA_W: return K * M;
        case POST_MU_B: case POST_SIGMA_B: return K;
        case ALPHA_MU_W: case ALPHA_SIGMA_W: case PRIOR_HIDDEN_B: case PRIOR_MU_W: case PRIOR_SIGMA_W: return H;
        case W_VALUE: return K * H * H;
        case PRIOR_HIDDEN_W: return H * H;
        default: return 1;                                   // the scalar biases
    }
}

// maps (W, H): row c is the weight vector whose dot product with e_i gives column c of P, so that
// P = e maps^T + b. Its row blocks [ w_p | w_hid | w_beta | q.k | w_key ] are the parameters'
// own row-major layouts (that is why it is A^T and not A): w_key (K, H, H) read as (K*H, H) is
// every head's key rows; the q.k row of head k is w_key_k^T (q_k / |q_k|).
void assemble_maps(const Sizes& sz, const float* const* lin, const float* __restrict__ q_unit,
                   float* __restrict__ maps) {
    const long H = sz.H, M = sz.M, K = sz.K;
    std::memcpy(maps, lin[W_P], sizeof(float) * M * H);
    std::memcpy(maps + sz.off_alpha() * H, lin[W_HID], sizeof(float) * H * H);
    std::memcpy(maps + sz.off_beta() * H, lin[W_BETA], sizeof(float) * K * H);
    std::memcpy(maps + sz.off_key() * H, lin[W_KEY], sizeof(float) * K * H * H);
    for (long k = 0; k < K; ++k) {
        float* qk_row = maps + (sz.off_qk() + k) * H;
        std::memset(qk_row, 0, sizeof(float) * H);
        for (long g = 0; g < H; ++g) axpy(q_unit[k * H + g], lin[W_KEY] + (k * H + g) * H, qk_row, H);
    }
}

// d_maps (W, H) = dP^T e back to the parameters: the row blocks are their gradients, the q.k rows
// reach the keys (d w_key_k += q_unit_k (x) d qk_k) and, through F.normalize, the queries.
void scatter_d_maps(const Sizes& sz, const float* const* lin, const float* __restrict__ q_unit,
                    const float* __restrict__ d_maps, float* const* d_lin) {
    const long H = sz.H, M = sz.M, K = sz.K;
    std::memcpy(d_lin[W_P], d_maps, sizeof(float) * M * H);
    std::memcpy(d_lin[W_HID], d_maps + sz.off_alpha() * H, sizeof(float) * H * H);
    std::memcpy(d_lin[W_BETA], d_maps + sz.off_beta() * H, sizeof(float) * K * H);
    std::memcpy(d_lin[W_KEY], d_maps + sz.off_key() * H, sizeof(float) * K * H * H);
    std::vector<float> d_unit(H);
    for (long k = 0; k < K; ++k) {
        const float* d_qk = d_maps + (sz.off_qk() + k) * H;             // (H)
        const float* q = lin[QUERY] + k * H;
        const float* u = q_unit + k * H;
        float d_u_dot_u = 0.0f;
        for (long g = 0; g < H; ++g) {
            axpy(u[g], d_qk, d_lin[W_KEY] + (k * H + g) * H, H);
            d_unit[g] = dot(lin[W_KEY] + (k * H + g) * H, d_qk, H);
            d_u_dot_u += d_unit[g] * u[g];
        }
        // q_unit = q / max(|q|, 1e-12): d q = (d u - u (u . d u)) / |q|, or d u / 1e-12 below the floor
        const float norm = std::sqrt(dot(q, q, H));
        for (long g = 0; g < H; ++g) {
            d_lin[QUERY][k * H + g] = norm > 1e-12f ? (d_unit[g] - u[g] * d_u_dot_u) / norm : d_unit[g] / 1e-12f;
        }
    }
}

// Everything fused_head.py's torch-product path does, in one call: maps (A^T) from the
// parameters, P = e maps^T + b, the kernel for each day, de = de_pool + dP maps,
// d_maps = dP^T e, the bias sums and d_maps back to the parameters.
// loss: eq. 17 averaged over days; means: (mean nll, mean kl).
void full_step(sgemm_fn sgemm, const Sizes& sz, long D, const Settings& st, const float* e, const float* y,
               const uint8_t* mask, const float* eps, const float* const* lin, const float* const* small,
               float* const* d_lin, float* const* d_small, float* out, float* loss, float* means,
               float* de, float* work) {
    const long N = sz.N, H = sz.H, K = sz.K, W = sz.width(), rows = D * N;
    float* maps = work;                                                 // (W, H)
    float* d_maps = maps + W * H;                                       // (W, H)
    float* P = d_maps + W * H;                                          // (D*N, W)
    float* dP = P + rows * W;                                           // (D*N, W)
    float* q_unit = dP + rows * W;                                      // (K, H)

    for (long k = 0; k < K; ++k) {                                      // F.normalize(query)
        const float* q = lin[QUERY] + k * H;
        const float norm = std::sqrt(dot(q, q, H));
        const float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
        for (long g = 0; g < H; ++g) q_unit[k * H + g] = q[g] * inv;
    }
    assemble_maps(sz, lin, q_unit, maps);
    gemm(sgemm, false, true, rows, W, H, e, H, maps, H, 0.0f, P, W);    // P = e maps^T
    for (long i = 0; i < rows; ++i) {                                   // + b (the biased columns)
        float* p = P + i * W;
        for (long m = 0; m < sz.M; ++m) p[m] += lin[B_P][m];
        for (long j = 0; j < H; ++j) p[sz.off_alpha() + j] += lin[B_HID][j];
        for (long k = 0; k < K; ++k) p[sz.off_beta() + k] += lin[B_BETA][k];
    }

    for (int p = 0; p < NUM_PARAMS; ++p) std::memset(d_small[p], 0, sizeof(float) * small_param_size(sz, p));
    double nll = 0.0, kl = 0.0;
    for (long d = 0; d < D; ++d) {
        float* day_out = out + d * (2 + 4 * K);
        one_day(sz, st, P + d * N * W, e + d * N * H, y + d * N, mask + d * N, eps + d * K, small, d_small,
                day_out, dP + d * N * W, de + d * N * H);
        nll += day_out[0];
        kl += day_out[1];
    }
    means[0] = static_cast<float>(nll / static_cast<double>(D));
    means[1] = static_cast<float>(kl / static_cast<double>(D));
    *loss = means[0] + st.gamma * means[1];                             // eq. 17, averaged over days

    gemm(sgemm, false, false, rows, H, W, dP, W, maps, H, 1.0f, de, H);  // de = de_pool + dP maps
    gemm(sgemm, true, false, W, H, rows, dP, W, e, H, 0.0f, d_maps, H);  // d_maps = dP^T e
    std::memset(d_lin[B_P], 0, sizeof(float) * sz.M);
    std::memset(d_lin[B_HID], 0, sizeof(float) * H);
    std::memset(d_lin[B_BETA], 0, sizeof(float) * K);
    for (long i = 0; i < rows; ++i) {                                   // bias gradients: column sums
        const float* p = dP + i * W;
        for (long m = 0; m < sz.M; ++m) d_lin[B_P][m] += p[m];
        for (long j = 0; j < H; ++j) d_lin[B_HID][j] += p[sz.off_alpha() + j];
        for (long k = 0; k < K; ++k) d_lin[B_BETA][k] += p[sz.off_beta() + k];
    }
    scatter_d_maps(sz, lin, q_unit, d_maps, d_lin);
}

}  // namespace

extern "C" {

int fvae_head_abi_version() { return 2; }

// D days of N (padded) stocks. P: (D*N, M + H + 2K + K*H); e: (D*N, H); y: (D*N); mask: (D*N)
// bytes; eps: (D, K) (zeros for the mean). params / grads: NUM_PARAMS pointers in Param's order;
// grads must hold zeros (they are accumulated). Writes out (D, 2 + 4K): nll, kl, mu_post,
// sigma_post, mu_prior, sigma_prior per day; dP (D*N, width) and de (D*N, H) in full.
void fvae_head_loss_and_grad(long D, long N, long H, long M, long K, const float* P, const float* e, const float* y,
                             const uint8_t* mask, const float* eps, const float* const* params, float* const* grads,
                             float slope, float sigma_floor, float gamma, float att_eps, float* out, float* dP,
                             float* de) {
    const Sizes sz{N, H, M, K};
    const Settings st{slope, sigma_floor, gamma, 1.0f / static_cast<float>(D), att_eps};
    const long W = sz.width();
    for (long d = 0; d < D; ++d) {
        one_day(sz, st, P + d * N * W, e + d * N * H, y + d * N, mask + d * N, eps + d * K, params, grads,
                out + d * (2 + 4 * K), dP + d * N * W, de + d * N * H);
    }
}

// The whole training step of the head (full_step above): e (D*N, H), y (D*N), mask (D*N) bytes,
// eps (D, K); lin / d_lin: NUM_LINEAR_PARAMS pointers in LinearParam's order, small / d_small:
// NUM_PARAMS in Param's order (all gradients written in full). Writes out (D, 2 + 4K) as
// fvae_head_loss_and_grad, loss (1), means (2): nll and kl averaged over days, and de (D*N, H).
// work: fvae_head_work_size(D, N, H, M, K) floats.
long fvae_head_work_size(long D, long N, long H, long M, long K) { return work_size(Sizes{N, H, M, K}, D); }

void fvae_head_step_f32(void* sgemm, long D, long N, long H, long M, long K, const float* e, const float* y,
                        const uint8_t* mask, const float* eps, const float* const* lin, const float* const* small,
                        float* const* d_lin, float* const* d_small, float slope, float sigma_floor, float gamma,
                        float att_eps, float* out, float* loss, float* means, float* de, float* work) {
    const Settings st{slope, sigma_floor, gamma, 1.0f / static_cast<float>(D), att_eps};
    full_step(reinterpret_cast<fvae::sgemm_fn>(sgemm), Sizes{N, H, M, K}, D, st, e, y, mask, eps, lin, small, d_lin,
              d_small, out, loss, means, de, work);
}

}  // extern "C"
