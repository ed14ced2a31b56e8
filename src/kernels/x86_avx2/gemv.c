/*
 * Decode GEMVs, AVX2 + FMA: generic/gemv.c's sums (kernels.h) in vector
 * registers, so every element has the generic kernel's bits. The 16 lanes
 * are two registers (lanes 0-7, 8-15); the tree is lo + hi, then the two
 * 128-bit halves, then the pairs (moe__tree16's order).
 *
 * Four rows of W at a time: independent accumulator chains hide the add
 * latency and share each load of A; the rows a few ahead are prefetched
 * (more reads in flight than the stream prefetcher keeps).
 * Dimension key: n rows of A, N rows of W, K inner dim.
 */
#include "avx2.h"

#include <immintrin.h>

enum { PF = 4 };

/* moe__tree16 of the lanes (lo, hi) */
static inline float tree(__m256 lo, __m256 hi) {
    __m256 t8 = _mm256_add_ps(lo, hi);
    __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4)); /* [t4 0 + t4 2, t4 1 + t4 3] */
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
}

static inline void prefetch_rows(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}

/* ---------------------------------------------------------------- fp32 */

#define MULADD(c, a, w) c = _mm256_add_ps(c, _mm256_mul_ps(a, w)) /* product, then sum: not fused */

void moe__avx2_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                              int64_t N, int64_t K) {
    int64_t K16 = K / 16 * 16;
    for (int64_t j = 0; j < N; j += 4) {
        int64_t nr = N - j < 4 ? N - j : 4; /* a last block of fewer rows repeats row j: summed, not stored */
        const float *w0 = W + j * K, *w1 = nr > 1 ? w0 + K : w0, *w2 = nr > 2 ? w0 + 2 * K : w0,
                       *w3 = nr > 3 ? w0 + 3 * K : w0;
        if (j + 4 + PF <= N) prefetch_rows(W + (j + PF) * K, 4 * K * (int64_t)sizeof(float));
        for (int64_t r = 0; r < n; r++) {
            const float *a = A + r * lda;
            __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0;
            for (int64_t k = 0; k < K16; k += 16) {
                __m256 al = _mm256_loadu_ps(a + k), ah = _mm256_loadu_ps(a + k + 8);
                MULADD(l0, al, _mm256_loadu_ps(w0 + k)), MULADD(h0, ah, _mm256_loadu_ps(w0 + k + 8));
                MULADD(l1, al, _mm256_loadu_ps(w1 + k)), MULADD(h1, ah, _mm256_loadu_ps(w1 + k + 8));
                MULADD(l2, al, _mm256_loadu_ps(w2 + k)), MULADD(h2, ah, _mm256_loadu_ps(w2 + k + 8));
                MULADD(l3, al, _mm256_loadu_ps(w3 + k)), MULADD(h3, ah, _mm256_loadu_ps(w3 + k + 8));
            }
            float *c = C + r * ldc + j;
            const float s[4] = {moe__f32_dot_tail(tree(l0, h0), a, w0, K16, K),
                                moe__f32_dot_tail(tree(l1, h1), a, w1, K16, K),
                                moe__f32_dot_tail(tree(l2, h2), a, w2, K16, K),
                                moe__f32_dot_tail(tree(l3, h3), a, w3, K16, K)};
            for (int64_t q = 0; q < nr; q++) c[q] += s[q];
        }
    }
}
#undef MULADD

/* ---------------------------------------------------------------- bf16 */

/* 16 bf16 (one 256-bit load) seen as 8 fp32 lanes: lane i holds elements 2i
 * (low half) and 2i+1 (high half). odd: the high half as it is (the low
 * bits cleared); even: the low half shifted up. Widening is exact. */
static inline __m256 odd(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))); }
static inline __m256 even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
#define LD(p) _mm256_loadu_si256((const __m256i *)(p))
/* lanes c (8 of the 16) += odd products, then even products (vdpbf16ps's order). Product, then
 * sum, as generic: a product of two bf16 is exact in fp32 only while it stays normal, and a
 * fused add would round a subnormal product once where generic rounds twice. */
#define DP(c, a, w) c = _mm256_add_ps(_mm256_add_ps(c, _mm256_mul_ps(odd(a), odd(w))), _mm256_mul_ps(even(a), even(w)))

void moe__avx2_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N,
                                  int64_t K) {
    int64_t K32 = K / 32 * 32;
    for (int64_t j = 0; j < N; j += 4) {
        int64_t nr = N - j < 4 ? N - j : 4; /* a last block of fewer rows repeats row j: summed, not stored */
        const uint16_t *w0 = W + j * K, *w1 = nr > 1 ? w0 + K : w0, *w2 = nr > 2 ? w0 + 2 * K : w0,
                       *w3 = nr > 3 ? w0 + 3 * K : w0;
        if (j + 4 + PF <= N) prefetch_rows(W + (j + PF) * K, 4 * K * (int64_t)sizeof(uint16_t));
        for (int64_t r = 0; r < n; r++) {
            const uint16_t *a = A + r * K;
            __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0;
            for (int64_t k = 0; k < K32; k += 32) {
                __m256i al = LD(a + k), ah = LD(a + k + 16);
                DP(l0, al, LD(w0 + k)), DP(h0, ah, LD(w0 + k + 16));
                DP(l1, al, LD(w1 + k)), DP(h1, ah, LD(w1 + k + 16));
                DP(l2, al, LD(w2 + k)), DP(h2, ah, LD(w2 + k + 16));
                DP(l3, al, LD(w3 + k)), DP(h3, ah, LD(w3 + k + 16));
            }
            float *c = C + r * ldc + j;
            const float s[4] = {moe__bf16_dot_tail(tree(l0, h0), a, w0, K32, K),
                                moe__bf16_dot_tail(tree(l1, h1), a, w1, K32, K),
                                moe__bf16_dot_tail(tree(l2, h2), a, w2, K32, K),
                                moe__bf16_dot_tail(tree(l3, h3), a, w3, K32, K)};
            for (int64_t q = 0; q < nr; q++) c[q] += s[q];
        }
    }
}
#undef DP
#undef LD
