/*
 * The bf16 decode GEMV with AVX512-BF16 (vdpbf16ps): 32 bf16 products
 * summed pairwise into 16 fp32 lanes per instruction, each lane adding the
 * product of element 2i+1, then that of 2i: generic/gemv.c's order, so the
 * bits are generic's unless a value, a product or a partial sum is
 * subnormal (vdpbf16ps flushes those to zero).
 *
 * Four rows of W at a time, one accumulator each: four independent chains
 * hide the dot product's latency and share each load of A, and the four
 * lane trees run side by side (a serial 16-add sum per row was a quarter of
 * a one-token call's time).
 * Dimension key: n rows of A, N rows of W, K inner dim.
 */
#include "avx512bf16.h"

enum { PF = 4 };

#define LD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))

void moe__avx512bf16_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n,
                                        int64_t N, int64_t K) {
    int64_t K32 = K / 32 * 32;
    for (int64_t j = 0; j < N; j += 4) {
        int64_t nr = N - j < 4 ? N - j : 4; /* a last block of fewer rows repeats row j: summed, not stored */
        const uint16_t *w0 = W + j * K, *w1 = nr > 1 ? w0 + K : w0, *w2 = nr > 2 ? w0 + 2 * K : w0,
                       *w3 = nr > 3 ? w0 + 3 * K : w0;
        if (j + 4 + PF <= N) moe__avx512_prefetch(W + (j + PF) * K, 4 * K * (int64_t)sizeof(uint16_t));
        for (int64_t r = 0; r < n; r++) {
            const uint16_t *a = A + r * K;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t k = 0; k < K32; k += 32) {
                __m512bh av = LD(a + k);
                c0 = _mm512_dpbf16_ps(c0, av, LD(w0 + k));
                c1 = _mm512_dpbf16_ps(c1, av, LD(w1 + k));
                c2 = _mm512_dpbf16_ps(c2, av, LD(w2 + k));
                c3 = _mm512_dpbf16_ps(c3, av, LD(w3 + k));
            }
            float *c = C + r * ldc + j;
            const float s[4] = {moe__bf16_dot_tail(moe__avx512_tree(c0), a, w0, K32, K),
                                moe__bf16_dot_tail(moe__avx512_tree(c1), a, w1, K32, K),
                                moe__bf16_dot_tail(moe__avx512_tree(c2), a, w2, K32, K),
                                moe__bf16_dot_tail(moe__avx512_tree(c3), a, w3, K32, K)};
            for (int64_t q = 0; q < nr; q++) c[q] += s[q];
        }
    }
}
#undef LD
