/* The AVX2 + FMA level: these kernels over the generic table. */
#include "avx2.h"

void moe__kernels_fill_avx2(moe_kernels *k) {
    k->to_bf16 = moe__avx2_to_bf16;
    k->bf16_to_f32 = moe__avx2_bf16_to_f32;
    k->vexpf_sub = moe__avx2_vexpf_sub;
    k->vsilu = moe__avx2_vsilu;
    k->vsilu_backward = moe__avx2_vsilu_backward;
    k->vswiglu = moe__avx2_vswiglu;
    k->vswiglu_backward = moe__avx2_vswiglu_backward;
    k->transpose = moe__avx2_transpose;
    k->sgemm_nt_small = moe__avx2_sgemm_nt_small;
    k->gemm_bf16_nt_small = moe__avx2_gemm_bf16_nt_small;
}
