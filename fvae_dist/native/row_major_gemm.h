// Row-major matrix products through a Fortran BLAS sgemm (shared by the native kernels).
//
// The sgemm is the one torch itself runs its float32 products on (MKL's sgemm_, exported by
// libtorch_cpu); its address comes from Python (native/build.py: torch_sgemm), so the products
// keep torch's thread setting and arithmetic. build.py hashes this header into the cache key of
// every library, so an edit here rebuilds them all.
#pragma once

namespace fvae {

// The Fortran BLAS sgemm (column-major, 32-bit integers).
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);

// Row-major C (m, n) = op(A) op(B) + beta C, where op transposes when asked. A row-major matrix
// is its transpose in column-major order, so this is the column-major C^T = op(B)^T op(A)^T.
// Every dimension and leading dimension must fit an int (FactorVAE's are far below 2^31).
inline void gemm(sgemm_fn sgemm, bool transpose_a, bool transpose_b, long m, long n, long k, const float* a,
                 long lda, const float* b, long ldb, float beta, float* c, long ldc) {
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
    const float one = 1.0f;
    sgemm(transpose_b ? "T" : "N", transpose_a ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
}

}  // namespace fvae
