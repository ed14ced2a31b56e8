/*
 * bf16 <-> fp32 conversions, generic (the oracle).
 *
 * bf16 is the upper half of an IEEE float32 (8 exponent bits, 7 mantissa
 * bits). Rounding is to nearest even, as torch's .to(torch.bfloat16) does;
 * NaN stays a (quiet) NaN with its sign; denormals are kept (the CPU's own
 * vcvtneps2bf16 flushes them to zero, which torch does not). Widening is
 * exact: the 16 bits become the upper half.
 * Dimension key: n elements.
 */
#include "generic.h"

uint16_t moe_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN: quiet, sign kept */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float moe_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void moe__g_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}

void moe__g_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = moe_bf16_to_f32(src[i]);
}
