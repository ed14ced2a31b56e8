/*
 * Decode GEMVs, AVX-512 (without bf16 dot products): generic/gemv.c's sums
 * (kernels.h) with the 16 lanes in one register, so every element has the
 * generic kernel's bits; the lanes are summed by moe__tree16's tree (what
 * _mm512_reduce_add_ps does), written out so the order is ours.
 * Four rows of W at a time (independent chains sharing each load of A), the
 * rows a few ahead prefetched.
 * Dimension key: n rows of A, N rows of W, K inner dim.
 */
#include "avx512.h"

#include <immintrin.h>

enum { PF = 4 };

float moe__avx512_tree(__m512 v) {
    __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
}

void moe__avx512_prefetch(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}

#define MULADD(c, a, w) c = _mm512_add_ps(c, _mm512_mul_ps(a, w)) /* product, then sum: not fused */

void moe__avx512_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                                int64_t N, int64_t K) {
    int64_t K16 = K / 16 * 16;
    for (int64_t j = 0; j < N; j += 4) {
        int64_t nr = N - j < 4 ? N - j : 4; /* a last block of fewer rows repeats row j: summed, not stored */
        const float *w0 = W + j * K, *w1 = nr > 1 ? w0 + K : w0, *w2 = nr > 2 ? w0 + 2 * K : w0,
                       *w3 = nr > 3 ? w0 + 3 * K : w0;
        if (j + 4 + PF <= N) moe__avx512_prefetch(W + (j + PF) * K, 4 * K * (int64_t)sizeof(float));
        for (int64_t r = 0; r < n; r++) {
            const float *a = A + r * lda;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t k = 0; k < K16; k += 16) {
                __m512 av = _mm512_loadu_ps(a + k);
                MULADD(c0, av, _mm512_loadu_ps(w0 + k));
                MULADD(c1, av, _mm512_loadu_ps(w1 + k));
                MULADD(c2, av, _mm512_loadu_ps(w2 + k));
                MULADD(c3, av, _mm512_loadu_ps(w3 + k));
            }
            float *c = C + r * ldc + j;
            const float s[4] = {moe__f32_dot_tail(moe__avx512_tree(c0), a, w0, K16, K),
                                moe__f32_dot_tail(moe__avx512_tree(c1), a, w1, K16, K),
                                moe__f32_dot_tail(moe__avx512_tree(c2), a, w2, K16, K),
                                moe__f32_dot_tail(moe__avx512_tree(c3), a, w3, K16, K)};
            for (int64_t q = 0; q < nr; q++) c[q] += s[q];
        }
    }
}
#undef MULADD

/* 32 bf16 (one load) as 16 fp32 lanes: lane i holds elements 2i (low half)
 * and 2i+1 (high half); odd keeps the high half, even shifts the low one up. */
static inline __m512 odd(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u))); }
static inline __m512 even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
#define LD(p) _mm512_loadu_si512((const void *)(p))
/* product, then sum, as generic (see x86_avx2/gemv.c: a subnormal product is not exact) */
#define DP(c, a, w) c = _mm512_add_ps(_mm512_add_ps(c, _mm512_mul_ps(odd(a), odd(w))), _mm512_mul_ps(even(a), even(w)))

void moe__avx512_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n,
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
                __m512i av = LD(a + k);
                DP(c0, av, LD(w0 + k));
                DP(c1, av, LD(w1 + k));
                DP(c2, av, LD(w2 + k));
                DP(c3, av, LD(w3 + k));
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
#undef DP
#undef LD
