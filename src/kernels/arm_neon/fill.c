/* The NEON level (arm64): these kernels over the generic table. */
#include "neon.h"

void moe__kernels_fill_neon(moe_kernels *k) {
    k->to_bf16 = moe__neon_to_bf16;
    k->bf16_to_f32 = moe__neon_bf16_to_f32;
    k->vexpf_sub = moe__neon_vexpf_sub;
    k->vsilu = moe__neon_vsilu;
    k->vsilu_backward = moe__neon_vsilu_backward;
    k->vswiglu = moe__neon_vswiglu;
    k->vswiglu_backward = moe__neon_vswiglu_backward;
    k->sgemm_nt_small = moe__neon_sgemm_nt_small;
    k->gemm_bf16_nt_small = moe__neon_gemm_bf16_nt_small;
}
