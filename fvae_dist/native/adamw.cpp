// AdamW's update and the gradient norm for clipping, over all of a model's tensors in one call
// each (fvae_dist/train/optim_step.py).
//
// torch.optim.AdamW(fused=True) runs the same arithmetic, but around it the optimizer's Python
// step (state lookups, grouping by device and dtype, a step-counter op per tensor) and
// clip_grad_norm_'s per-tensor norms cost about 0.6 ms of FactorVAE's 12-13 ms CPU training
// step; here both are two passes over memory. The state stays torch's: the same exp_avg,
// exp_avg_sq and step tensors, so optimizer.state_dict() and checkpoints do not change.
//
// Update per element, as torch's fused AdamW (decoupled weight decay, no amsgrad):
//   p = p * (1 - lr * wd)
//   m = m + (1 - beta1) * (g - m)                 (lerp towards g)
//   v = beta2 * v + (1 - beta2) * g * g
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// with g the gradient times grad_scale (the clipping coefficient), t the tensor's step count
// after its increment; the per-tensor scalars in double, the elements in float.
#include <cmath>

extern "C" {

int fvae_optim_abi_version() { return 1; }

// sum over all tensors of sum(x^2), each tensor's partial sum in float, the total in double
double fvae_sum_of_squares(long n, const float* const* tensors, const long* sizes) {
    double total = 0.0;
    for (long t = 0; t < n; ++t) {
        const float* x = tensors[t];
        float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
        for (long i = 0; i < sizes[t]; ++i) partial += x[i] * x[i];
        total += partial;
    }
    return total;
}

// steps: each tensor's float32 step counter (torch's state["step"]), incremented here
void fvae_adamw_step(long n, float* const* params, const float* const* grads, float* const* exp_avgs,
                     float* const* exp_avg_sqs, float* const* steps, const long* sizes, double lr, double beta1,
                     double beta2, double eps, double weight_decay, double grad_scale) {
    for (long t = 0; t < n; ++t) {
        steps[t][0] += 1.0f;
        const double step = steps[t][0];
        const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
        const float bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
        const float decay = static_cast<float>(1.0 - lr * weight_decay);
        const float b1 = static_cast<float>(1.0 - beta1), b2 = static_cast<float>(beta2);
        const float one_minus_b2 = static_cast<float>(1.0 - beta2);
        const float e = static_cast<float>(eps), scale = static_cast<float>(grad_scale);
        float* __restrict__ p = params[t];
        const float* __restrict__ g = grads[t];
        float* __restrict__ m = exp_avgs[t];
        float* __restrict__ v = exp_avg_sqs[t];
#pragma omp simd
        for (long i = 0; i < sizes[t]; ++i) {
            const float grad = g[i] * scale;
            const float mi = m[i] + b1 * (grad - m[i]);
            const float vi = b2 * v[i] + one_minus_b2 * grad * grad;
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) / bias_correction2_sqrt + e);
        }
    }
}

}  // extern "C"
