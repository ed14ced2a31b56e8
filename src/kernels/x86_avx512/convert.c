/*
 * bf16 <-> fp32 conversions, AVX-512: the bits of generic/convert.c, 16 at
 * a time (round to nearest even in integer arithmetic, NaN made quiet,
 * denormals kept: the CPU's own vcvtneps2bf16 flushes them, torch does not).
 * Dimension key: n elements.
 */
#include "avx512.h"

#include <immintrin.h>

void moe__avx512_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i quiet = _mm512_set1_epi32(0x00400000);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512((const void *)(src + i));
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, absm), inf);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, quiet));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    for (; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}

void moe__avx512_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_si512((void *)(dst + i), _mm512_slli_epi32(h, 16));
    }
    for (; i < n; i++) dst[i] = moe_bf16_to_f32(src[i]);
}
