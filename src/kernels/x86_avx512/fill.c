/* The AVX-512 level: these kernels over the AVX2 table. */
#include "avx512.h"

void moe__kernels_fill_avx512(moe_kernels *k) {
    k->to_bf16 = moe__avx512_to_bf16;
    k->bf16_to_f32 = moe__avx512_bf16_to_f32;
    k->vexpf_sub = moe__avx512_vexpf_sub;
    k->vsilu = moe__avx512_vsilu;
    k->vsilu_backward = moe__avx512_vsilu_backward;
    k->vswiglu = moe__avx512_vswiglu;
    k->vswiglu_backward = moe__avx512_vswiglu_backward;
    k->sgemm_nt_small = moe__avx512_sgemm_nt_small;
    k->gemm_bf16_nt_small = moe__avx512_gemm_bf16_nt_small;
}
