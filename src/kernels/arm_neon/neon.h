/* The Advanced SIMD (NEON) kernels (this folder), for fill.c. */
#ifndef MOE_KERNELS_NEON_H
#define MOE_KERNELS_NEON_H

#include "../generic/generic.h"

void moe__neon_to_bf16(uint16_t *dst, const float *src, int64_t n);
void moe__neon_bf16_to_f32(float *dst, const uint16_t *src, int64_t n);
void moe__neon_vexpf_sub(float *y, const float *x, float c, int64_t n);
void moe__neon_vsilu(float *y, const float *x, int64_t n);
void moe__neon_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n);
void moe__neon_vswiglu(float *o, const float *a, const float *g, int64_t n);
void moe__neon_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n);
void moe__neon_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                              int64_t N, int64_t K);
void moe__neon_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N,
                                  int64_t K);

#endif
