/* The AVX512-BF16 level: the bf16 decode GEMV with vdpbf16ps over the
 * AVX-512 table; its bf16 GEMMs run natively in oneDNN (onednn.c). */
#include "avx512bf16.h"

void moe__kernels_fill_avx512bf16(moe_kernels *k) { k->gemm_bf16_nt_small = moe__avx512bf16_gemm_bf16_nt_small; }
