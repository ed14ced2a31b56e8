/*
 * The plain twins of the GEMMs: each element a dot product summed in
 * double, then rounded once. Tests compare the GEMM entries against them;
 * the entries fall back to them only when the library under them fails
 * (and say so, moe_cpu_notes).
 * Dimension key: M rows, N cols, K inner.
 */
#include "../../ops/ops.h"
#include "generic.h"

void moe_sgemm_ref(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++)
                s += (double)(ta ? A[k * lda + i] : A[i * lda + k]) * (double)(tb ? B[j * ldb + k] : B[k * ldb + j]);
            float c = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
            C[i * ldc + j] = c + alpha * (float)s;
        }
}

void moe_gemm_bf16_ref(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                       float beta, float *C) {
    /* each product exact in double (bf16 x bf16 fits), summed in double */
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++)
                s += (double)moe_bf16_to_f32(ta ? A[k * M + i] : A[i * K + k]) *
                     (double)moe_bf16_to_f32(tb ? B[j * K + k] : B[k * N + j]);
            C[i * N + j] = (beta == 0.0f ? 0.0f : beta * C[i * N + j]) + (float)s;
        }
}
