/*
 * Elementwise math, generic (the oracle): exp, sigmoid, silu and the SwiGLU
 * products as scalar twins and array loops over them. The ISA folders
 * (x86_avx2, x86_avx512, arm_neon) vectorise the same operations and give
 * the same bits for every input.
 *
 * Why hand-written: these run on every element of the expert hidden layers
 * and of the attention and soft-MoE softmaxes, and libm's expf is a scalar
 * call that gcc does not vectorise without -ffast-math (which this project
 * does not use: it breaks NaN checks and reorders sums). libm's expf is
 * within ~0.5 ulp; this one within 1 ulp: 0.988 ulp at most, measured against
 * double exp over all 2^32 inputs (tests/test_vmath.c holds a strided sweep
 * of them and every float with a denormal or near-overflow result to 2 ulp).
 *
 * The method (Cody and Waite 1980, "Software Manual for the Elementary
 * Functions"; the polynomial coefficients are SLEEF's xexpf, sleef.org):
 *   n = rint(x * log2(e)),  r = x - n*ln2  with ln2 split hi + lo so that
 *   n*ln2_hi is exact (the first step is exact, the second rounds once),
 *   e^r = 1 + r + r^2 * P(r), P of degree 5 on |r| <= ln2/2 (a minimax fit
 *   of (e^r - 1 - r) / r^2, evaluated by Horner with fma),
 *   e^x = (e^r * 2^n1) * 2^n2, n1 = floor(n/2), n2 = n - n1: each power of
 *   two is a normal float built from exponent bits, the first product is
 *   exact and the second rounds once, so results in the denormal range
 *   underflow gradually with one rounding, and n = 128 (x up to
 *   ln(FLT_MAX)) needs no special case.
 * x is first clamped to [-104, 89]: below -150*ln2 = -103.972 e^x rounds to
 * 0, above ln(FLT_MAX) = 88.7228 it overflows to +inf, and both happen by
 * themselves in the last product (-inf -> +0, +inf -> +inf). NaN is the one
 * special case (the clamp maps it to -104): the result is x + x, the input
 * NaN made quiet.
 *
 * Bit-identical twins: the vector code performs the same IEEE operations in
 * the same order as the scalar one: fmaf <-> a fused multiply-add
 * (_mm512_fmadd_ps, _mm256_fmadd_ps, vfmaq_f32), the clamp as the compares
 * VMAXPS/VMINPS are (NaN goes to the bound; NEON selects explicitly),
 * rintf <-> round in the current mode (VRNDSCALEPS, VROUNDPS, FRINTN),
 * exact division (no reciprocal approximations). No plain
 * product feeds a plain sum anywhere, so the results do not depend on
 * whether the compiler contracts a*b+c into an fma (-ffp-contract).
 * NaNs: when both operands of a product are NaN, which one comes out is the
 * hardware's choice of operand order, and compilers commute products, so
 * the silu and SwiGLU results that are NaN are replaced by the one quiet NaN
 * 0x7fc00000 (canon): then their bits are fixed too. exp's NaN is x + x (one
 * operand twice) and needs no such step.
 *
 * Elementwise: no result depends on its neighbours, the array length, the
 * alignment or the thread count.
 * Dimension key: n elements.
 */
#include "generic.h"

#include <math.h>

static inline float bits_to_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------------------------------------------------------------- scalar twins */

float moe_expf(float x) {
    float xc = x > k_lo ? x : k_lo; /* VMAXPS(x, lo): NaN -> lo */
    xc = xc < k_hi ? xc : k_hi;     /* VMINPS(xc, hi) */
    float n = rintf(xc * k_log2e);
    float r = fmaf(n, -k_ln2_hi, xc); /* exact */
    r = fmaf(n, -k_ln2_lo, r);
    float u = k_c7;
    u = fmaf(u, r, k_c6);
    u = fmaf(u, r, k_c5);
    u = fmaf(u, r, k_c4);
    u = fmaf(u, r, k_c3);
    u = fmaf(u, r, k_c2);
    float p = fmaf(r * r, u, r);
    p = p + 1.0f;
    int32_t ni = (int32_t)n, n1 = ni >> 1, n2 = ni - n1; /* n in [-150, 128]; >> is arithmetic in gcc */
    float y = (p * bits_to_f((uint32_t)(n1 + 127) << 23)) * bits_to_f((uint32_t)(n2 + 127) << 23);
    return x != x ? x + x : y;
}

float moe_sigmoidf(float x) { return 1.0f / (1.0f + moe_expf(-x)); }

float moe_siluf(float x) { return moe__canon(x * moe_sigmoidf(x)); }

float moe_silu_gradf(float x) {
    float s = moe_sigmoidf(x);
    return moe__canon(s * fmaf(x, 1.0f - s, 1.0f));
}

/* ---------------------------------------------------------------- array loops */

void moe__g_vexpf_sub(float *y, const float *x, float c, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = moe_expf(x[i] - c);
}

void moe__g_vsilu(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = moe_siluf(x[i]);
}

void moe__g_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) dx[i] = moe__canon(dy[i] * moe_silu_gradf(x[i]));
}

void moe__g_vswiglu(float *o, const float *a, const float *g, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = moe__canon(a[i] * moe_siluf(g[i]));
}

void moe__g_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float di = d[i], ai = a[i], gi = g[i]; /* read all three before writing: da or dg may alias d */
        da[i] = moe__canon(di * moe_siluf(gi));
        dg[i] = moe__canon((di * ai) * moe_silu_gradf(gi));
    }
}
