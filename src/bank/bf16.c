/*
 * The bf16 weight format of the expert bank (PyTorch's CPU autocast with
 * bfloat16): the GEMMs read bf16 copies of every input, weights included,
 * and sum and write fp32 (moe_gemm_bf16: natively where the CPU has bf16
 * dot products, widened to fp32 elsewhere; decode through the kernel
 * table's bf16 GEMV, which reads half the bytes of fp32). The weights'
 * copies are the layer's (moe__layer_bank), the rows' the bank's (to_lowp
 * rounds to nearest even, as torch's .to(torch.bfloat16)).
 * Dimension key: M rows, N cols, K inner; n rows of A.
 */
#include "bank.h"
#include "ops.h"

static void gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, const uint16_t *A16,
                 const float *B, const uint16_t *B16, float beta, float *C) {
    (void)A, (void)B;
    moe_gemm_bf16(ta, tb, M, N, K, A16, B16, beta, C);
}

static void gemv_nt(float *C, const float *A, const uint16_t *A16, const float *W, const uint16_t *W16, int64_t n,
                    int64_t N, int64_t K) {
    (void)A, (void)W;
    moe_gemm_bf16_nt_small(C, A16, W16, n, N, K);
}

const moe_bank_format moe_bank_bf16 = {"bf16", 1, moe_to_bf16, gemm, gemv_nt};
