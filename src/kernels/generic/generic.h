/*
 * The generic kernels (the oracles) and the scalar twins the ISA folders
 * use for their tails. Plain C, no ISA flags.
 * Dimension key: n elements, N output columns, K inner dim.
 */
#ifndef MOE_KERNELS_GENERIC_H
#define MOE_KERNELS_GENERIC_H

#include "../kernels.h"

#include <string.h>

/* ---- scalar twins (the array functions' contract is in ops.h) ---- */
uint16_t moe_f32_to_bf16(float f); /* round to nearest even; NaN stays a quiet NaN; denormals kept */
float    moe_bf16_to_f32(uint16_t h); /* exact */
float    moe_expf(float x);           /* e^x within 1 ulp (vmath.c); e^NaN = x + x (x made quiet) */
/* 1 / (1 + moe_expf(-x)), exact division: within 3 ulp; 0 below -88.7228,
 * where e^-x overflows (as libm's expf and torch's sigmoid give). */
float    moe_sigmoidf(float x);
/* silu and its derivative from that sigmoid s: x * s, and s * fmaf(x, 1 - s, 1)
 * (torch's s (1 + x (1 - s))); a NaN result is the one quiet NaN 0x7fc00000
 * (which of two NaN operands a product passes on is not fixed across compilers). */
float    moe_siluf(float x);
float    moe_silu_gradf(float x);

/* The one quiet NaN the silu helpers return for a NaN result. */
#define MOE_CANON_NAN 0x7fc00000u
static inline float moe__canon(float v) {
    uint32_t u = MOE_CANON_NAN;
    float q;
    memcpy(&q, &u, 4);
    return v != v ? q : v;
}

/* The fixed tree over 16 lanes every GEMV variant sums with (what gcc's
 * _mm512_reduce_add_ps does): lane i + lane i+8, then i + i+4, i + i+2,
 * then the two left. Float addition commutes, so a + b and b + a agree. */
static inline float moe__tree16(const float c[16]) {
    float t8[8], t4[4];
    for (int i = 0; i < 8; i++) t8[i] = c[i] + c[i + 8];
    for (int i = 0; i < 4; i++) t4[i] = t8[i] + t8[i + 4];
    return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

/* ---- exp's constants (generic/vmath.c has the method) ---- */
/* clamp range: e^-104 rounds to 0, e^89 overflows (see above) */
static const float k_lo = -104.0f, k_hi = 89.0f;
static const float k_log2e = 1.44269502162933349609375f;      /* 0x3fb8aa3b */
static const float k_ln2_hi = 0.693145751953125f;             /* 0x3f317200: 12 trailing zero bits */
static const float k_ln2_lo = 1.428606765330187045e-06f;      /* 0x35bfbe8e: ln2 - ln2_hi */
/* P(r) = c2 + c3 r + ... + c7 r^5 (SLEEF xexpf) */
static const float k_c7 = 0.000198527617612853646278381f, k_c6 = 0.00139304355252534151077271f,
                   k_c5 = 0.00833336077630519866943359f, k_c4 = 0.0416664853692054748535156f,
                   k_c3 = 0.166666671633720397949219f, k_c2 = 0.5f;

/* ---- the generic table's entries (for tests and for the ISA folders' tails) ---- */
void moe__g_to_bf16(uint16_t *dst, const float *src, int64_t n);
void moe__g_bf16_to_f32(float *dst, const uint16_t *src, int64_t n);
void moe__g_vexpf_sub(float *y, const float *x, float c, int64_t n);
void moe__g_vsilu(float *y, const float *x, int64_t n);
void moe__g_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n);
void moe__g_vswiglu(float *o, const float *a, const float *g, int64_t n);
void moe__g_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n);
void moe__g_transpose(float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld);
void moe__g_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n, int64_t N,
                           int64_t K);
void moe__g_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N,
                               int64_t K);
void moe__g_softmax_rows(float *p, const float *logits, int64_t T, int64_t E);
void moe__g_topk_softmax(int32_t *idx, float *w, const float *logits, int64_t T, int64_t E, int K);

/* The bf16 GEMV's tail: s + the products of elements [k0, K) in order. */
static inline float moe__bf16_dot_tail(float s, const uint16_t *a, const uint16_t *w, int64_t k0, int64_t K) {
    for (int64_t k = k0; k < K; k++) s += moe_bf16_to_f32(a[k]) * moe_bf16_to_f32(w[k]);
    return s;
}
/* The fp32 GEMV's tail: s + the products of elements [k0, K) in order. */
static inline float moe__f32_dot_tail(float s, const float *a, const float *w, int64_t k0, int64_t K) {
    for (int64_t k = k0; k < K; k++) s += a[k] * w[k];
    return s;
}

#endif
