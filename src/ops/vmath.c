/*
 * Vectorised elementwise math: exp, sigmoid, silu and the SwiGLU products,
 * each as a scalar twin and an array version whose AVX-512 path gives the
 * same bits as the twin for every input.
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
 * the same order as the scalar one: fmaf <-> _mm512_fmadd_ps, the clamp as
 * the compares VMAXPS/VMINPS are, rintf <-> VRNDSCALEPS in the current
 * rounding mode, exact division (no reciprocal approximations). No plain
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
#include "ops.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

/* clamp range: e^-104 rounds to 0, e^89 overflows (see above) */
static const float k_lo = -104.0f, k_hi = 89.0f;
static const float k_log2e = 1.44269502162933349609375f;      /* 0x3fb8aa3b */
static const float k_ln2_hi = 0.693145751953125f;             /* 0x3f317200: 12 trailing zero bits */
static const float k_ln2_lo = 1.428606765330187045e-06f;      /* 0x35bfbe8e: ln2 - ln2_hi */
/* P(r) = c2 + c3 r + ... + c7 r^5 (SLEEF xexpf) */
static const float k_c7 = 0.000198527617612853646278381f, k_c6 = 0.00139304355252534151077271f,
                   k_c5 = 0.00833336077630519866943359f, k_c4 = 0.0416664853692054748535156f,
                   k_c3 = 0.166666671633720397949219f, k_c2 = 0.5f;

/* NaN results of the silu helpers: this one (C's NAN) */
#define CANON_NAN 0x7fc00000u

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

static inline float canon(float v) { return v != v ? bits_to_f(CANON_NAN) : v; }

float moe_siluf(float x) { return canon(x * moe_sigmoidf(x)); }

float moe_silu_gradf(float x) {
    float s = moe_sigmoidf(x);
    return canon(s * fmaf(x, 1.0f - s, 1.0f));
}

/* ---------------------------------------------------------------- AVX-512 */

#define AVX512 __attribute__((target("avx512f,avx512dq")))

AVX512 static inline __m512 exp16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(k_lo)), _mm512_set1_ps(k_hi));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(k_log2e)), _MM_FROUND_CUR_DIRECTION);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-k_ln2_hi), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-k_ln2_lo), r);
    __m512 u = _mm512_set1_ps(k_c7);
    u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(k_c6));
    u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(k_c5));
    u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(k_c4));
    u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(k_c3));
    u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(k_c2));
    __m512 p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), u, r);
    p = _mm512_add_ps(p, one);
    const __m512i bias = _mm512_set1_epi32(127);
    __m512i ni = _mm512_cvtps_epi32(n), n1 = _mm512_srai_epi32(ni, 1), n2 = _mm512_sub_epi32(ni, n1);
    __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23));
    __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, bias), 23));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, y, _mm512_add_ps(x, x));
}

AVX512 static inline __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = exp16(_mm512_xor_ps(x, _mm512_set1_ps(-0.0f))); /* -x: the sign bit flipped, as in C */
    return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

AVX512 static inline __m512 canon16(__m512 v) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v,
                                _mm512_castsi512_ps(_mm512_set1_epi32((int)CANON_NAN)));
}

/* silu(x) = x s, as moe_siluf */
AVX512 static inline __m512 silu16(__m512 x) { return canon16(_mm512_mul_ps(x, sigmoid16(x))); }

/* silu'(x) = s (1 + x (1 - s)), as moe_silu_gradf */
AVX512 static inline __m512 silu_grad16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = sigmoid16(x);
    return canon16(_mm512_mul_ps(s, _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one)));
}

/* The lanes left of a length-k tail (k < 16). */
static inline __mmask16 tail_mask(int64_t k) { return (__mmask16)((1u << k) - 1u); }

AVX512 static void vexpf_sub_avx512(float *y, const float *x, float c, int64_t n) {
    const __m512 vc = _mm512_set1_ps(c);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vc)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vc)));
    }
}

AVX512 static void vsilu_avx512(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, silu16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, silu16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* dx = dy silu'(x) */
AVX512 static inline __m512 silu_bwd16(__m512 dy, __m512 x) { return canon16(_mm512_mul_ps(dy, silu_grad16(x))); }

AVX512 static void vsilu_backward_avx512(float *dx, const float *dy, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dx + i, silu_bwd16(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(dx + i, m, silu_bwd16(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* o = a silu(g) */
AVX512 static inline __m512 swiglu16(__m512 a, __m512 g) { return canon16(_mm512_mul_ps(a, silu16(g))); }

AVX512 static void vswiglu_avx512(float *o, const float *a, const float *g, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, swiglu16(_mm512_loadu_ps(a + i), _mm512_loadu_ps(g + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(o + i, m, swiglu16(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, g + i)));
    }
}

/* da = d silu(g), dg = (d a) silu'(g): silu and silu' share one sigmoid */
AVX512 static inline void swiglu_bwd16(__m512 *da, __m512 *dg, __m512 d, __m512 a, __m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = sigmoid16(g);
    __m512 f = canon16(_mm512_mul_ps(g, s));
    __m512 fp = canon16(_mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one)));
    *da = canon16(_mm512_mul_ps(d, f));
    *dg = canon16(_mm512_mul_ps(_mm512_mul_ps(d, a), fp));
}

AVX512 static void vswiglu_backward_avx512(float *da, float *dg, const float *d, const float *a, const float *g,
                                           int64_t n) {
    __m512 va, vg;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        swiglu_bwd16(&va, &vg, _mm512_loadu_ps(d + i), _mm512_loadu_ps(a + i), _mm512_loadu_ps(g + i));
        _mm512_storeu_ps(da + i, va);
        _mm512_storeu_ps(dg + i, vg);
    }
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        swiglu_bwd16(&va, &vg, _mm512_maskz_loadu_ps(m, d + i), _mm512_maskz_loadu_ps(m, a + i),
                     _mm512_maskz_loadu_ps(m, g + i));
        _mm512_mask_storeu_ps(da + i, m, va);
        _mm512_mask_storeu_ps(dg + i, m, vg);
    }
}

/* ---------------------------------------------------------------- dispatch */

/* valgrind reports a CPU without AVX-512, so it runs the scalar twins */
static int have_avx512(void) { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }

int moe_vmath_avx512(void) { return have_avx512(); }

/* x - 0 is x for every float (-0 and NaN included), so exp is exp_sub at 0. */
void moe_vexpf(float *y, const float *x, int64_t n) { moe_vexpf_sub(y, x, 0.0f, n); }

void moe_vexpf_sub(float *y, const float *x, float c, int64_t n) {
    if (have_avx512()) {
        vexpf_sub_avx512(y, x, c, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) y[i] = moe_expf(x[i] - c);
}

void moe_vsilu(float *y, const float *x, int64_t n) {
    if (have_avx512()) {
        vsilu_avx512(y, x, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) y[i] = moe_siluf(x[i]);
}

void moe_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    if (have_avx512()) {
        vsilu_backward_avx512(dx, dy, x, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) dx[i] = canon(dy[i] * moe_silu_gradf(x[i]));
}

void moe_vswiglu(float *o, const float *a, const float *g, int64_t n) {
    if (have_avx512()) {
        vswiglu_avx512(o, a, g, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) o[i] = canon(a[i] * moe_siluf(g[i]));
}

void moe_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n) {
    if (have_avx512()) {
        vswiglu_backward_avx512(da, dg, d, a, g, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float di = d[i], ai = a[i], gi = g[i]; /* read all three before writing: da or dg may alias d */
        da[i] = canon(di * moe_siluf(gi));
        dg[i] = canon((di * ai) * moe_silu_gradf(gi));
    }
}
