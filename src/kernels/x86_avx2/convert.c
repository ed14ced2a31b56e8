/*
 * bf16 <-> fp32 conversions, AVX2: the bits of generic/convert.c (round to
 * nearest even in integer arithmetic, NaN made quiet, denormals kept; the
 * tail through the scalar twin). Hand-written: the conversion runs on every
 * GEMM input of a bf16 step, and gcc -O2 does not vectorise the scalar form.
 * Dimension key: n elements.
 */
#include "avx2.h"

#include <immintrin.h>

/* 8 floats -> their bf16 bits in the low half of each 32-bit lane */
static inline __m256i round8(__m256i u) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    const __m256i absm = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i quiet = _mm256_set1_epi32(0x00400000);
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absm), inf); /* both non-negative: signed compare is fine */
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, quiet), nan);
    return _mm256_srli_epi32(r, 16);
}

void moe__avx2_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i r0 = round8(_mm256_loadu_si256((const __m256i *)(src + i)));
        __m256i r1 = round8(_mm256_loadu_si256((const __m256i *)(src + i + 8)));
        /* packus works per 128-bit half: [r0 0-3, r1 0-3, r0 4-7, r1 4-7]; reorder the quarters */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)(dst + i), p);
    }
    for (; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}

void moe__avx2_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(h, 16));
    }
    for (; i < n; i++) dst[i] = moe_bf16_to_f32(src[i]);
}
