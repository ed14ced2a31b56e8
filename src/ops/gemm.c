/*
 * GEMM through CBLAS (OpenBLAS), plus the bias/column-sum helpers around it.
 * Dimension key: M rows, N cols, K inner.
 */
#include "ops.h"

#include <cblas.h>

_Thread_local int moe__in_task;

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
    CBLAS_TRANSPOSE TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
    /* Our threads, not the BLAS's: C is cut into at most 4 tiles along its
     * longer side, the cut depending only on the shape, and each tile is one
     * single-threaded BLAS call (OpenBLAS's OpenMP build runs a call made in
     * a parallel region on the calling thread). Every element is then summed
     * the same way on any thread count, and inside or outside the caller's
     * parallel regions, which OpenBLAS's own threading does not give (its
     * split changes the last bits). Rows of C are rows of op(A), columns of C
     * columns of op(B). Inside a parallel region the tiles run on this thread.
     * An expert task's GEMM (moe__in_task) is one call on this thread in
     * every case: the experts are the parallelism there. */
    int64_t L = M >= N ? M : N, nt = (L + 127) / 128;
    if (nt > 4) nt = 4;
    int64_t tile = ((L + nt - 1) / nt + 15) / 16 * 16;
    nt = (L + tile - 1) / tile;
    if (moe__in_task) { /* one expert's GEMM (moe_each_expert): always one call on this thread */
        cblas_sgemm(CblasRowMajor, TA, TB, (int)M, (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C,
                    (int)ldc);
        return;
    }
    int nested = 0;
#ifdef _OPENMP
    nested = omp_in_parallel();
#endif
#pragma omp parallel for schedule(dynamic, 1) if (!nested) /* one tile too: then the BLAS sees a parallel region and runs single-threaded */
    for (int64_t i = 0; i < nt; i++) {
        int64_t a = i * tile, n = L - a < tile ? L - a : tile;
        if (M >= N) /* rows a..a+n of C: rows of op(A) */
            cblas_sgemm(CblasRowMajor, TA, TB, (int)n, (int)N, (int)K, alpha, ta ? A + a : A + a * lda, (int)lda, B,
                        (int)ldb, beta, C + a * ldc, (int)ldc);
        else /* columns a..a+n of C: columns of op(B) */
            cblas_sgemm(CblasRowMajor, TA, TB, (int)M, (int)n, (int)K, alpha, A, (int)lda, tb ? B + a * ldb : B + a,
                        (int)ldb, beta, C + a, (int)ldc);
    }
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

void moe_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                        int64_t N, int64_t K) {
    /* Hand-written because for a few rows a BLAS GEMM first packs all of W,
     * reading it twice: in decode (eval forwards of 1-16 tokens) the experts'
     * weights are the whole cost. Each row of W is read once and dotted with
     * the n rows of A, which stay in L1. 16 lane-wise partial sums vectorise
     * without reassociating (no -ffast-math), and the lanes are added in a
     * fixed order, so the result does not depend on the thread count. */
    enum { L = 16, R4 = 4, PF = 4 };
    for (int64_t j = 0; j < N; j++) {
        const float *w = W + j * K;
        if (j + PF < N) /* the rows a few ahead: more reads in flight than the stream prefetcher keeps */
            for (int64_t k = 0; k < K; k += 16) __builtin_prefetch(W + (j + PF) * K + k);
        int64_t r = 0;
        for (; r + R4 <= n; r += R4) { /* four rows share each load of w */
            const float *a0 = A + r * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
            float c0[L] = {0}, c1[L] = {0}, c2[L] = {0}, c3[L] = {0};
            int64_t k = 0;
            for (; k + L <= K; k += L)
                for (int i = 0; i < L; i++) {
                    float wv = w[k + i];
                    c0[i] += a0[k + i] * wv, c1[i] += a1[k + i] * wv;
                    c2[i] += a2[k + i] * wv, c3[i] += a3[k + i] * wv;
                }
            float s[R4] = {0};
            for (int i = 0; i < L; i++) s[0] += c0[i], s[1] += c1[i], s[2] += c2[i], s[3] += c3[i];
            for (; k < K; k++) s[0] += a0[k] * w[k], s[1] += a1[k] * w[k], s[2] += a2[k] * w[k], s[3] += a3[k] * w[k];
            for (int q = 0; q < R4; q++) C[(r + q) * ldc + j] += s[q];
        }
        for (; r + 2 <= n; r += 2) { /* two rows share each load of w */
            const float *a0 = A + r * lda, *a1 = a0 + lda;
            float c0[L] = {0}, c1[L] = {0};
            int64_t k = 0;
            for (; k + L <= K; k += L)
                for (int i = 0; i < L; i++) c0[i] += a0[k + i] * w[k + i], c1[i] += a1[k + i] * w[k + i];
            float s0 = 0.0f, s1 = 0.0f;
            for (int i = 0; i < L; i++) s0 += c0[i], s1 += c1[i];
            for (; k < K; k++) s0 += a0[k] * w[k], s1 += a1[k] * w[k];
            C[r * ldc + j] += s0;
            C[(r + 1) * ldc + j] += s1;
        }
        for (; r < n; r++) {
            const float *a = A + r * lda;
            float acc[L] = {0};
            int64_t k = 0;
            for (; k + L <= K; k += L)
                for (int i = 0; i < L; i++) acc[i] += a[k + i] * w[k + i];
            float s = 0.0f;
            for (int i = 0; i < L; i++) s += acc[i];
            for (; k < K; k++) s += a[k] * w[k];
            C[r * ldc + j] += s;
        }
    }
}
