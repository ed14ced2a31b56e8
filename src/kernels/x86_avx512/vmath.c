/*
 * Elementwise math, AVX-512: 16 lanes of the operations of generic/vmath.c
 * in the same order (fmaf <-> _mm512_fmadd_ps, the clamp as VMAXPS/VMINPS,
 * rintf <-> VRNDSCALEPS in the current mode, exact division), so every
 * result has the generic twin's bits; the tail goes through the same vector
 * code, masked.
 * Dimension key: n elements.
 */
#include "avx512.h"

#include <immintrin.h>

static inline __m512 exp16(__m512 x) {
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

static inline __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = exp16(_mm512_xor_ps(x, _mm512_set1_ps(-0.0f))); /* -x: the sign bit flipped, as in C */
    return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

static inline __m512 canon16(__m512 v) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v,
                                _mm512_castsi512_ps(_mm512_set1_epi32((int)MOE_CANON_NAN)));
}

/* silu(x) = x s, as moe_siluf */
static inline __m512 silu16(__m512 x) { return canon16(_mm512_mul_ps(x, sigmoid16(x))); }

/* silu'(x) = s (1 + x (1 - s)), as moe_silu_gradf */
static inline __m512 silu_grad16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = sigmoid16(x);
    return canon16(_mm512_mul_ps(s, _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one)));
}

/* The lanes left of a length-k tail (k < 16). */
static inline __mmask16 tail_mask(int64_t k) { return (__mmask16)((1u << k) - 1u); }

void moe__avx512_vexpf_sub(float *y, const float *x, float c, int64_t n) {
    const __m512 vc = _mm512_set1_ps(c);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vc)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vc)));
    }
}

void moe__avx512_vsilu(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, silu16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, silu16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* dx = dy silu'(x) */
static inline __m512 silu_bwd16(__m512 dy, __m512 x) { return canon16(_mm512_mul_ps(dy, silu_grad16(x))); }

void moe__avx512_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dx + i, silu_bwd16(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(dx + i, m, silu_bwd16(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* o = a silu(g) */
static inline __m512 swiglu16(__m512 a, __m512 g) { return canon16(_mm512_mul_ps(a, silu16(g))); }

void moe__avx512_vswiglu(float *o, const float *a, const float *g, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, swiglu16(_mm512_loadu_ps(a + i), _mm512_loadu_ps(g + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(o + i, m, swiglu16(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, g + i)));
    }
}

/* da = d silu(g), dg = (d a) silu'(g): silu and silu' share one sigmoid */
static inline void swiglu_bwd16(__m512 *da, __m512 *dg, __m512 d, __m512 a, __m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = sigmoid16(g);
    __m512 f = canon16(_mm512_mul_ps(g, s));
    __m512 fp = canon16(_mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one)));
    *da = canon16(_mm512_mul_ps(d, f));
    *dg = canon16(_mm512_mul_ps(_mm512_mul_ps(d, a), fp));
}

void moe__avx512_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g,
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

