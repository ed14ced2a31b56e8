/* The generic table: every entry (the GEMM entries come from onednn.c). */
#include "generic.h"

void moe__kernels_fill_generic(moe_kernels *k) {
    k->to_bf16 = moe__g_to_bf16;
    k->bf16_to_f32 = moe__g_bf16_to_f32;
    k->vexpf_sub = moe__g_vexpf_sub;
    k->vsilu = moe__g_vsilu;
    k->vsilu_backward = moe__g_vsilu_backward;
    k->vswiglu = moe__g_vswiglu;
    k->vswiglu_backward = moe__g_vswiglu_backward;
    k->transpose = moe__g_transpose;
    k->sgemm_nt_small = moe__g_sgemm_nt_small;
    k->gemm_bf16_nt_small = moe__g_gemm_bf16_nt_small;
    k->softmax_rows = moe__g_softmax_rows;
    k->topk_softmax = moe__g_topk_softmax;
}
