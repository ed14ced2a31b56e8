/*
 * Decode GEMVs, generic (the oracle): C (n,N) += A (n,K) W^T for W (N,K)
 * row-major (nn.Linear's layout) and few rows of A (n <= MOE_SMALL_ROWS).
 *
 * Hand-written because for a few rows a library GEMM first packs all of W,
 * reading it twice: in decode (eval forwards of 1-16 tokens) the experts'
 * weights are the whole cost. Each row of W is read once and dotted with
 * the n rows of A, which stay in L1.
 *
 * The summation every level reproduces (kernels.h): 16 fp32 lanes, a fixed
 * tree over them (moe__tree16), then the tail in order. fp32: lane i sums
 * a[k] * w[k] for k = 16 j + i, product then sum. bf16: per block of 32,
 * lane i adds the product of element 2i+1, then that of element 2i (the
 * order of vdpbf16ps); bf16 products are exact in fp32.
 * Dimension key: n rows of A, N rows of W (outputs), K inner dim.
 */
#include "generic.h"

enum { L = 16 };

/* One dot product of the fp32 scheme. */
static float dot_f32(const float *a, const float *w, int64_t K) {
    float c[L] = {0};
    int64_t k = 0;
    for (; k + L <= K; k += L)
        for (int i = 0; i < L; i++) c[i] += a[k + i] * w[k + i];
    return moe__f32_dot_tail(moe__tree16(c), a, w, k, K);
}

void moe__g_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n, int64_t N,
                           int64_t K) {
    enum { R4 = 4 };
    for (int64_t j = 0; j < N; j++) {
        const float *w = W + j * K;
        int64_t r = 0;
        for (; r + R4 <= n; r += R4) { /* four rows share each load of w; each sum as dot_f32's */
            const float *a0 = A + r * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
            float c0[L] = {0}, c1[L] = {0}, c2[L] = {0}, c3[L] = {0};
            int64_t k = 0;
            for (; k + L <= K; k += L)
                for (int i = 0; i < L; i++) {
                    float wv = w[k + i];
                    c0[i] += a0[k + i] * wv, c1[i] += a1[k + i] * wv;
                    c2[i] += a2[k + i] * wv, c3[i] += a3[k + i] * wv;
                }
            C[(r + 0) * ldc + j] += moe__f32_dot_tail(moe__tree16(c0), a0, w, k, K);
            C[(r + 1) * ldc + j] += moe__f32_dot_tail(moe__tree16(c1), a1, w, k, K);
            C[(r + 2) * ldc + j] += moe__f32_dot_tail(moe__tree16(c2), a2, w, k, K);
            C[(r + 3) * ldc + j] += moe__f32_dot_tail(moe__tree16(c3), a3, w, k, K);
        }
        for (; r < n; r++) C[r * ldc + j] += dot_f32(A + r * lda, w, K);
    }
}

/* The bits of a float as a float: a bf16 pair's two halves become floats by
 * masking (the high one) and shifting (the low one); exact. */
static inline float f_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void moe__g_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N,
                               int64_t K) {
    int64_t K32 = K / 32 * 32;
    for (int64_t j = 0; j < N; j++) {
        const uint16_t *w = W + j * K;
        for (int64_t r = 0; r < n; r++) {
            const uint16_t *a = A + r * K;
            float c[L] = {0};
            for (int64_t k = 0; k < K32; k += 32) {
                /* lane i: the pair (2i, 2i+1) as one 32-bit word (little-endian: 2i low) */
                uint32_t au[L], wu[L];
                memcpy(au, a + k, sizeof au), memcpy(wu, w + k, sizeof wu);
                for (int i = 0; i < L; i++) {
                    c[i] += f_bits(au[i] & 0xffff0000u) * f_bits(wu[i] & 0xffff0000u); /* element 2i+1 */
                    c[i] += f_bits(au[i] << 16) * f_bits(wu[i] << 16);                 /* element 2i   */
                }
            }
            C[r * ldc + j] += moe__bf16_dot_tail(moe__tree16(c), a, w, K32, K);
        }
    }
}
