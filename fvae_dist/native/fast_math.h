// Branch-free float exp and sigmoid that a loop can vectorise (shared by the native kernels).
//
// std::exp is a library call the compiler cannot vectorise without -ffast-math; these are plain
// arithmetic, so a loop over them compiles to SIMD code. build.py hashes this header into the
// cache key of every library, so an edit here rebuilds them all.
#pragma once

#include <cstdint>

namespace fvae {

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to
// r^7 (relative error below 1e-8 on that interval, under float32's own rounding). No calls and
// no branches, so a loop over it vectorises; the clamp keeps 2^n a normal float.
inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f;                      // 1.5 * 2^23: adding it rounds to an integer
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-06f;  // ln 2 split in two
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
    return p * __builtin_bit_cast(float, exponent);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace fvae
