/* The AVX-512 kernels (this folder), for fill.c and the avx512_bf16 folder. */
#ifndef MOE_KERNELS_AVX512_H
#define MOE_KERNELS_AVX512_H

#include "../generic/generic.h"

#include <immintrin.h>

void moe__avx512_to_bf16(uint16_t *dst, const float *src, int64_t n);
void moe__avx512_bf16_to_f32(float *dst, const uint16_t *src, int64_t n);
void moe__avx512_vexpf_sub(float *y, const float *x, float c, int64_t n);
void moe__avx512_vsilu(float *y, const float *x, int64_t n);
void moe__avx512_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n);
void moe__avx512_vswiglu(float *o, const float *a, const float *g, int64_t n);
void moe__avx512_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n);
void moe__avx512_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                                int64_t N, int64_t K);
void moe__avx512_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n,
                                    int64_t N, int64_t K);
/* moe__tree16 of a register's 16 lanes; prefetch bytes from p */
float moe__avx512_tree(__m512 v);
void  moe__avx512_prefetch(const void *p, int64_t bytes);

#endif
