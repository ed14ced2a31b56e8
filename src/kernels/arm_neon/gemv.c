/*
 * Decode GEMVs, NEON: generic/gemv.c's sums (kernels.h) in vector
 * registers, so every element has the generic kernel's bits. The 16 lanes
 * are four registers (lanes 0-3, 4-7, 8-11, 12-15); the tree is
 * moe__tree16's: lane i + i+8 is (q0 + q2, q1 + q3), lane i + i+4 is their
 * sum, then (t0 + t2) + (t1 + t3) from the two halves.
 *
 * Four rows of W at a time (as x86_avx2/gemv.c): independent accumulator
 * chains hide the add latency and share each load of A (16 accumulators of
 * the 32 registers); the rows a few ahead are prefetched.
 *
 * bf16 without BFDOT/BFMMLA (ARMv8.6 BF16, optional): they are not in the
 * armv8-a baseline, BFDOT's sums are in an order of its own and BFMMLA's
 * are unspecified, so neither would give generic's bits; widening is a
 * shift or a mask, and the GEMV is bound by reading W anyway.
 * Dimension key: n rows of A, N rows of W, K inner dim.
 */
#include "neon.h"

#include <arm_neon.h>

enum { PF = 4 };

/* moe__tree16 of the lanes (q0 = lanes 0-3, q1 = 4-7, q2 = 8-11, q3 = 12-15) */
static inline float tree(float32x4_t q0, float32x4_t q1, float32x4_t q2, float32x4_t q3) {
    float32x4_t t4 = vaddq_f32(vaddq_f32(q0, q2), vaddq_f32(q1, q3));
    float32x2_t t2 = vadd_f32(vget_low_f32(t4), vget_high_f32(t4)); /* [t0 + t2, t1 + t3] */
    return vget_lane_f32(t2, 0) + vget_lane_f32(t2, 1);
}

static inline void prefetch_rows(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 3);
}

/* ---------------------------------------------------------------- fp32 */

/* product, then sum: not fused (FMUL, FADD; -ffp-contract=off keeps gcc
 * from fusing these, which arm_neon.h writes as C vector operators) */
#define MULADD(c, a, w) c = vaddq_f32(c, vmulq_f32(a, w))
#define Z vdupq_n_f32(0.0f)

void moe__neon_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                              int64_t N, int64_t K) {
    int64_t K16 = K / 16 * 16;
    for (int64_t j = 0; j < N; j += 4) {
        int64_t nr = N - j < 4 ? N - j : 4; /* a last block of fewer rows repeats row j: summed, not stored */
        const float *w0 = W + j * K, *w1 = nr > 1 ? w0 + K : w0, *w2 = nr > 2 ? w0 + 2 * K : w0,
                       *w3 = nr > 3 ? w0 + 3 * K : w0;
        if (j + 4 + PF <= N) prefetch_rows(W + (j + PF) * K, 4 * K * (int64_t)sizeof(float));
        for (int64_t r = 0; r < n; r++) {
            const float *a = A + r * lda;
            float32x4_t c00 = Z, c01 = Z, c02 = Z, c03 = Z, c10 = Z, c11 = Z, c12 = Z, c13 = Z;
            float32x4_t c20 = Z, c21 = Z, c22 = Z, c23 = Z, c30 = Z, c31 = Z, c32 = Z, c33 = Z;
            for (int64_t k = 0; k < K16; k += 16) {
                float32x4_t a0 = vld1q_f32(a + k), a1 = vld1q_f32(a + k + 4);
                float32x4_t a2 = vld1q_f32(a + k + 8), a3 = vld1q_f32(a + k + 12);
                MULADD(c00, a0, vld1q_f32(w0 + k)), MULADD(c01, a1, vld1q_f32(w0 + k + 4));
                MULADD(c02, a2, vld1q_f32(w0 + k + 8)), MULADD(c03, a3, vld1q_f32(w0 + k + 12));
                MULADD(c10, a0, vld1q_f32(w1 + k)), MULADD(c11, a1, vld1q_f32(w1 + k + 4));
                MULADD(c12, a2, vld1q_f32(w1 + k + 8)), MULADD(c13, a3, vld1q_f32(w1 + k + 12));
                MULADD(c20, a0, vld1q_f32(w2 + k)), MULADD(c21, a1, vld1q_f32(w2 + k + 4));
                MULADD(c22, a2, vld1q_f32(w2 + k + 8)), MULADD(c23, a3, vld1q_f32(w2 + k + 12));
                MULADD(c30, a0, vld1q_f32(w3 + k)), MULADD(c31, a1, vld1q_f32(w3 + k + 4));
                MULADD(c32, a2, vld1q_f32(w3 + k + 8)), MULADD(c33, a3, vld1q_f32(w3 + k + 12));
            }
            float *c = C + r * ldc + j;
            const float s[4] = {moe__f32_dot_tail(tree(c00, c01, c02, c03), a, w0, K16, K),
                                moe__f32_dot_tail(tree(c10, c11, c12, c13), a, w1, K16, K),
                                moe__f32_dot_tail(tree(c20, c21, c22, c23), a, w2, K16, K),
                                moe__f32_dot_tail(tree(c30, c31, c32, c33), a, w3, K16, K)};
            for (int64_t q = 0; q < nr; q++) c[q] += s[q];
        }
    }
}
#undef MULADD

/* ---------------------------------------------------------------- bf16 */

/* 8 bf16 (one 128-bit load) seen as 4 fp32 lanes: lane i holds elements 2i
 * (low half) and 2i+1 (high half). odd: the high half as it is (the low
 * bits cleared); even: the low half shifted up. Widening is exact. */
typedef struct {
    float32x4_t odd, even;
} pair4;
static inline pair4 widen(const uint16_t *p) {
    uint32x4_t v = vreinterpretq_u32_u16(vld1q_u16(p));
    pair4 r = {vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff0000u))), vreinterpretq_f32_u32(vshlq_n_u32(v, 16))};
    return r;
}
/* lanes c (4 of the 16) += the odd products, then the even ones (vdpbf16ps's
 * order). Product then sum, not fused: a product of two bf16 is exact in
 * fp32 only while it stays in the normal range; below it the product
 * rounds, and a fused sum would round once where generic rounds twice. */
#define DP(c, a, w) c = vaddq_f32(vaddq_f32(c, vmulq_f32((a).odd, (w).odd)), vmulq_f32((a).even, (w).even))

void moe__neon_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N,
                                  int64_t K) {
    int64_t K32 = K / 32 * 32;
    for (int64_t j = 0; j < N; j += 4) {
        int64_t nr = N - j < 4 ? N - j : 4; /* a last block of fewer rows repeats row j: summed, not stored */
        const uint16_t *w0 = W + j * K, *w1 = nr > 1 ? w0 + K : w0, *w2 = nr > 2 ? w0 + 2 * K : w0,
                       *w3 = nr > 3 ? w0 + 3 * K : w0;
        if (j + 4 + PF <= N) prefetch_rows(W + (j + PF) * K, 4 * K * (int64_t)sizeof(uint16_t));
        for (int64_t r = 0; r < n; r++) {
            const uint16_t *a = A + r * K;
            float32x4_t c00 = Z, c01 = Z, c02 = Z, c03 = Z, c10 = Z, c11 = Z, c12 = Z, c13 = Z;
            float32x4_t c20 = Z, c21 = Z, c22 = Z, c23 = Z, c30 = Z, c31 = Z, c32 = Z, c33 = Z;
            for (int64_t k = 0; k < K32; k += 32) {
                pair4 a0 = widen(a + k), a1 = widen(a + k + 8), a2 = widen(a + k + 16), a3 = widen(a + k + 24);
                DP(c00, a0, widen(w0 + k)), DP(c01, a1, widen(w0 + k + 8));
                DP(c02, a2, widen(w0 + k + 16)), DP(c03, a3, widen(w0 + k + 24));
                DP(c10, a0, widen(w1 + k)), DP(c11, a1, widen(w1 + k + 8));
                DP(c12, a2, widen(w1 + k + 16)), DP(c13, a3, widen(w1 + k + 24));
                DP(c20, a0, widen(w2 + k)), DP(c21, a1, widen(w2 + k + 8));
                DP(c22, a2, widen(w2 + k + 16)), DP(c23, a3, widen(w2 + k + 24));
                DP(c30, a0, widen(w3 + k)), DP(c31, a1, widen(w3 + k + 8));
                DP(c32, a2, widen(w3 + k + 16)), DP(c33, a3, widen(w3 + k + 24));
            }
            float *c = C + r * ldc + j;
            const float s[4] = {moe__bf16_dot_tail(tree(c00, c01, c02, c03), a, w0, K32, K),
                                moe__bf16_dot_tail(tree(c10, c11, c12, c13), a, w1, K32, K),
                                moe__bf16_dot_tail(tree(c20, c21, c22, c23), a, w2, K32, K),
                                moe__bf16_dot_tail(tree(c30, c31, c32, c33), a, w3, K32, K)};
            for (int64_t q = 0; q < nr; q++) c[q] += s[q];
        }
    }
}
#undef DP
#undef Z
