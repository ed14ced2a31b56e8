/* The AVX512-BF16 kernels (this folder), for fill.c. */
#ifndef MOE_KERNELS_AVX512BF16_H
#define MOE_KERNELS_AVX512BF16_H

#include "../x86_avx512/avx512.h"

void moe__avx512bf16_gemm_bf16_nt_small(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n,
                                        int64_t N, int64_t K);

#endif
