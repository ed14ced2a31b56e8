/*
 * GEMM through CBLAS (OpenBLAS), plus the bias/column-sum helpers around it.
 * Dimension key: M rows, N cols, K inner.
 */
#include "ops.h"

#include <cblas.h>

void moe_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
               const float *A, int64_t lda, const float *B, int64_t ldb,
               float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
        return;
    }
    /* Sizes were checked against INT_MAX when the layer planned its shapes. */
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)M, (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}

void moe_add_bias_rows(float *rows, const float *b, int64_t M, int64_t N) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        float *r = rows + i * N;
        for (int64_t j = 0; j < N; j++) r[j] += b[j];
    }
}

void moe_colsum_acc(float *db, const float *g, int64_t M, int64_t N) {
    /* Parallel over columns, rows summed in order: same bits on any thread count. */
#pragma omp parallel
    {
        int64_t nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        int64_t j0 = N * id / nt, j1 = N * (id + 1) / nt;
        for (int64_t i = 0; i < M; i++) {
            const float *r = g + i * N;
            for (int64_t j = j0; j < j1; j++) db[j] += r[j];
        }
    }
}
