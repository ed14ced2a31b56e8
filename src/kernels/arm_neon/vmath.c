/*
 * Elementwise math, NEON: 4 lanes of the operations of generic/vmath.c in
 * the same order, so every result has the generic twin's bits; the tail
 * (n % 4) runs the scalar twins themselves.
 *   fmaf      <-> vfmaq_f32 (FMLA, fused; note vfmaq_f32(a, b, c) is a + b c)
 *   rintf     <-> vrndnq_f32 (FRINTN: to nearest even, rintf's result in the
 *                 default rounding mode, which libmoe never changes)
 *   1 / v     <-> vdivq_f32 (FDIV, exact; no FRECPE estimate)
 *   the clamp <-> compare + select: the scalar `x > lo ? x : lo` sends NaN to
 *                 lo, while FMAX/FMIN (vmaxq/vminq) would return the NaN and
 *                 FMAXNM/FMINNM the other operand only for a quiet NaN
 *   x != x    <-> !(x == x) (FCMEQ is false for NaN)
 * The plain products and sums (vmulq/vaddq/vsubq) are written as C vector
 * operators in gcc's arm_neon.h, so like the scalar code they rely on
 * -ffp-contract=off (Makefile) not to be fused behind our back; no plain
 * product feeds a plain sum here anyway (generic/vmath.c).
 * Dimension key: n elements.
 */
#include "neon.h"

#include <arm_neon.h>

static inline float32x4_t exp4(float32x4_t x) {
    const float32x4_t one = vdupq_n_f32(1.0f), lo = vdupq_n_f32(k_lo), hi = vdupq_n_f32(k_hi);
    float32x4_t xc = vbslq_f32(vcgtq_f32(x, lo), x, lo); /* x > lo ? x : lo  (NaN -> lo) */
    xc = vbslq_f32(vcltq_f32(xc, hi), xc, hi);          /* xc < hi ? xc : hi */
    float32x4_t n = vrndnq_f32(vmulq_f32(xc, vdupq_n_f32(k_log2e)));
    float32x4_t r = vfmaq_f32(xc, n, vdupq_n_f32(-k_ln2_hi)); /* fmaf(n, -ln2_hi, xc): exact */
    r = vfmaq_f32(r, n, vdupq_n_f32(-k_ln2_lo));
    float32x4_t u = vdupq_n_f32(k_c7);
    u = vfmaq_f32(vdupq_n_f32(k_c6), u, r);
    u = vfmaq_f32(vdupq_n_f32(k_c5), u, r);
    u = vfmaq_f32(vdupq_n_f32(k_c4), u, r);
    u = vfmaq_f32(vdupq_n_f32(k_c3), u, r);
    u = vfmaq_f32(vdupq_n_f32(k_c2), u, r);
    float32x4_t p = vfmaq_f32(r, vmulq_f32(r, r), u); /* fmaf(r * r, u, r) */
    p = vaddq_f32(p, one);
    /* n is an integer in [-150, 128]: the conversion (toward zero) is exact */
    int32x4_t ni = vcvtq_s32_f32(n), n1 = vshrq_n_s32(ni, 1), n2 = vsubq_s32(ni, n1); /* >> arithmetic, as in C */
    const int32x4_t bias = vdupq_n_s32(127);
    float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
    float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, bias), 23));
    float32x4_t y = vmulq_f32(vmulq_f32(p, s1), s2);
    return vbslq_f32(vceqq_f32(x, x), y, vaddq_f32(x, x)); /* NaN: x + x, the input made quiet */
}

static inline float32x4_t sigmoid4(float32x4_t x) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    return vdivq_f32(one, vaddq_f32(one, exp4(vnegq_f32(x)))); /* FNEG flips the sign bit, as C's -x */
}

static inline float32x4_t canon4(float32x4_t v) {
    return vbslq_f32(vceqq_f32(v, v), v, vreinterpretq_f32_u32(vdupq_n_u32(MOE_CANON_NAN)));
}

static inline float32x4_t silu4(float32x4_t x) { return canon4(vmulq_f32(x, sigmoid4(x))); }

/* silu'(x) from its sigmoid s: s (1 + x (1 - s)) */
static inline float32x4_t silu_grad_s4(float32x4_t x, float32x4_t s) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    return canon4(vmulq_f32(s, vfmaq_f32(one, x, vsubq_f32(one, s)))); /* fmaf(x, 1 - s, 1) */
}

void moe__neon_vexpf_sub(float *y, const float *x, float c, int64_t n) {
    const float32x4_t vc = vdupq_n_f32(c);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, exp4(vsubq_f32(vld1q_f32(x + i), vc)));
    moe__g_vexpf_sub(y + i, x + i, c, n - i);
}

void moe__neon_vsilu(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, silu4(vld1q_f32(x + i)));
    moe__g_vsilu(y + i, x + i, n - i);
}

void moe__neon_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t vx = vld1q_f32(x + i);
        vst1q_f32(dx + i, canon4(vmulq_f32(vld1q_f32(dy + i), silu_grad_s4(vx, sigmoid4(vx)))));
    }
    moe__g_vsilu_backward(dx + i, dy + i, x + i, n - i);
}

void moe__neon_vswiglu(float *o, const float *a, const float *g, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(o + i, canon4(vmulq_f32(vld1q_f32(a + i), silu4(vld1q_f32(g + i)))));
    moe__g_vswiglu(o + i, a + i, g + i, n - i);
}

void moe__neon_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        /* all three loaded before either store: da or dg may alias d */
        float32x4_t vd = vld1q_f32(d + i), va = vld1q_f32(a + i), vg = vld1q_f32(g + i);
        float32x4_t s = sigmoid4(vg); /* silu and silu' share one sigmoid (the scalar twins compute it twice, same bits) */
        float32x4_t f = canon4(vmulq_f32(vg, s));
        vst1q_f32(da + i, canon4(vmulq_f32(vd, f)));
        vst1q_f32(dg + i, canon4(vmulq_f32(vmulq_f32(vd, va), silu_grad_s4(vg, s))));
    }
    moe__g_vswiglu_backward(da + i, dg + i, d + i, a + i, g + i, n - i);
}
