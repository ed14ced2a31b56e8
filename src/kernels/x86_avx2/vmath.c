/*
 * Elementwise math, AVX2 + FMA: 8 lanes of the operations of
 * generic/vmath.c in the same order (fmaf <-> _mm256_fmadd_ps, the clamp
 * as VMAXPS/VMINPS, rintf <-> VROUNDPS in the current mode, exact
 * division), so every result has the generic twin's bits; the tail (n % 8)
 * runs the scalar twins themselves.
 * Dimension key: n elements.
 */
#include "avx2.h"

#include <immintrin.h>

static inline __m256 exp8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(k_lo)), _mm256_set1_ps(k_hi));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(k_log2e)), _MM_FROUND_CUR_DIRECTION);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-k_ln2_hi), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-k_ln2_lo), r);
    __m256 u = _mm256_set1_ps(k_c7);
    u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(k_c6));
    u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(k_c5));
    u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(k_c4));
    u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(k_c3));
    u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(k_c2));
    __m256 p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), u, r);
    p = _mm256_add_ps(p, one);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    return _mm256_blendv_ps(y, _mm256_add_ps(x, x), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

static inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 e = exp8(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f))); /* -x: the sign bit flipped, as in C */
    return _mm256_div_ps(one, _mm256_add_ps(one, e));
}

static inline __m256 canon8(__m256 v) {
    return _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32((int)MOE_CANON_NAN)),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

static inline __m256 silu8(__m256 x) { return canon8(_mm256_mul_ps(x, sigmoid8(x))); }

static inline __m256 silu_grad8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 s = sigmoid8(x);
    return canon8(_mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one)));
}

void moe__avx2_vexpf_sub(float *y, const float *x, float c, int64_t n) {
    const __m256 vc = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vc)));
    moe__g_vexpf_sub(y + i, x + i, c, n - i);
}

void moe__avx2_vsilu(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, silu8(_mm256_loadu_ps(x + i)));
    moe__g_vsilu(y + i, x + i, n - i);
}

void moe__avx2_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dx + i, canon8(_mm256_mul_ps(_mm256_loadu_ps(dy + i), silu_grad8(_mm256_loadu_ps(x + i)))));
    moe__g_vsilu_backward(dx + i, dy + i, x + i, n - i);
}

void moe__avx2_vswiglu(float *o, const float *a, const float *g, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, canon8(_mm256_mul_ps(_mm256_loadu_ps(a + i), silu8(_mm256_loadu_ps(g + i)))));
    moe__g_vswiglu(o + i, a + i, g + i, n - i);
}

void moe__avx2_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 vd = _mm256_loadu_ps(d + i), va = _mm256_loadu_ps(a + i), vg = _mm256_loadu_ps(g + i);
        __m256 s = sigmoid8(vg); /* silu and silu' share one sigmoid */
        __m256 f = canon8(_mm256_mul_ps(vg, s));
        __m256 fp = canon8(_mm256_mul_ps(s, _mm256_fmadd_ps(vg, _mm256_sub_ps(one, s), one)));
        _mm256_storeu_ps(da + i, canon8(_mm256_mul_ps(vd, f)));
        _mm256_storeu_ps(dg + i, canon8(_mm256_mul_ps(_mm256_mul_ps(vd, va), fp)));
    }
    moe__g_vswiglu_backward(da + i, dg + i, d + i, a + i, g + i, n - i);
}
