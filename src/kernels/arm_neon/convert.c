/*
 * bf16 <-> fp32 conversions, NEON: the bits of generic/convert.c (round to
 * nearest even in integer arithmetic, NaN made quiet with its sign,
 * denormals kept; the tail through the scalar twin). Not BFCVTN (ARMv8.6
 * BF16): it is not in the armv8-a baseline this folder is built for, and
 * the integer form gives generic's bits on every arm64 CPU whatever FPCR says.
 * Dimension key: n elements.
 */
#include "neon.h"

#include <arm_neon.h>

/* 4 floats -> their bf16 bits in the high half of each 32-bit lane */
static inline uint32x4_t round4(float32x4_t f) {
    uint32x4_t u = vreinterpretq_u32_f32(f);
    uint32x4_t r = vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fffu)), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)));
    /* unsigned compare: |u| > inf's bits is NaN */
    uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffffu)), vdupq_n_u32(0x7f800000u));
    return vbslq_u32(nan, vorrq_u32(u, vdupq_n_u32(0x00400000u)), r); /* NaN: quiet bit set, not rounded */
}

void moe__neon_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x4_t lo = vshrn_n_u32(round4(vld1q_f32(src + i)), 16); /* the high halves, narrowed */
        vst1q_u16(dst + i, vshrn_high_n_u32(lo, round4(vld1q_f32(src + i + 4)), 16));
    }
    for (; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}

void moe__neon_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(src + i);
        /* widen with a shift by the element width (SHLL): the 16 bits become the upper half */
        vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)));
        vst1q_f32(dst + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
    }
    for (; i < n; i++) dst[i] = moe_bf16_to_f32(src[i]);
}
