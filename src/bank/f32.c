/*
 * The fp32 weight format of the expert bank: the GEMMs read the fp32
 * operands as they are (oneDNN through moe_sgemm; decode through the
 * kernel table's GEMV, which reads W once).
 * Dimension key: M rows, N cols, K inner; n rows of A.
 */
#include "bank.h"
#include "ops.h"

static void gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, const uint16_t *A16,
                 const float *B, const uint16_t *B16, float beta, float *C) {
    (void)A16, (void)B16;
    moe_sgemm(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, beta, C, N);
}

static void gemv_nt(float *C, const float *A, const uint16_t *A16, const float *W, const uint16_t *W16, int64_t n,
                    int64_t N, int64_t K) {
    (void)A16, (void)W16;
    moe_sgemm_nt_small(C, N, A, K, W, n, N, K);
}

const moe_bank_format moe_bank_f32 = {"f32", 0, NULL, gemm, gemv_nt};
