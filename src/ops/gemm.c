/*
 * GEMM through oneDNN (dnnl_sgemm), plus the bias/column-sum helpers around it.
 * Dimension key: M rows, N cols, K inner.
 *
 * Why oneDNN: it picks its kernels by the CPU's features at run time
 * (AVX-512 where the CPU has it), whatever OPENBLAS_CORETYPE says, and the
 * same library gives the bf16 GEMMs of mixed precision. One provider:
 * OpenBLAS is no longer linked.
 */
#include "ops.h"

#include <oneapi/dnnl/dnnl.h>
#ifdef MOE_VALGRIND
#include <valgrind/valgrind.h>
#endif

_Thread_local int moe__in_task;

void moe_sgemm_ref(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    /* The plain twin of moe_sgemm: a dot product per element, in double. */
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++)
                s += (double)(ta ? A[k * lda + i] : A[i * lda + k]) * (double)(tb ? B[j * ldb + k] : B[k * ldb + j]);
            float c = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
            C[i * ldc + j] = c + alpha * (float)s;
        }
}

/* One single-threaded oneDNN call. oneDNN (OpenMP build) would otherwise
 * size its own team from omp_get_max_threads(), and its split of K and of
 * the tiles depends on that count, so the last bits would depend on the
 * thread count. omp_set_num_threads(1) sets only the calling task's ICV; it
 * is restored after. A failure (oneDNN cannot allocate its packing buffer)
 * falls back to the plain twin: the product is still computed, never lost. */
static void sgemm_1(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
#ifdef MOE_GEMM_PROBE
    /* Sanitizer and valgrind builds (Makefile): ASan does not see inside
     * oneDNN, so every element the GEMM reads or writes is touched here
     * first, in instrumented code: a short or misaligned buffer passed by
     * libmoe is reported at this line. */
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) (void)*(const volatile float *)(ta ? &A[k * lda + i] : &A[i * lda + k]);
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < N; j++) (void)*(const volatile float *)(tb ? &B[j * ldb + k] : &B[k * ldb + j]);
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            volatile float *c = &C[i * ldc + j];
            *c = *c;
        }
#endif
#ifdef _OPENMP
    int save = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
#ifdef MOE_VALGRIND
    /* oneDNN's JIT sgemm kernels load whole vectors past the end of oneDNN's
     * own packing buffers (its allocation, not ours; the extra lanes are
     * unused). Memcheck cannot tell, so its reports are off during the call;
     * the probe above has checked libmoe's arguments. */
    VALGRIND_DISABLE_ERROR_REPORTING;
#endif
    dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#ifdef MOE_VALGRIND
    VALGRIND_ENABLE_ERROR_REPORTING;
#endif
#ifdef _OPENMP
    omp_set_num_threads(save);
#endif
    if (st != dnnl_success) moe_sgemm_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void moe_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
               const float *A, int64_t lda, const float *B, int64_t ldb,
               float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
        return;
    }
    /* Our threads, not the library's: C is cut into at most 4 tiles along its
     * longer side, the cut depending only on the shape, and each tile is one
     * single-threaded oneDNN call (sgemm_1). Every element is then summed
     * the same way on any thread count, and inside or outside the caller's
     * parallel regions, which oneDNN's own threading does not give (its
     * split changes the last bits). Rows of C are rows of op(A), columns of C
     * columns of op(B). Inside a parallel region the tiles run on this thread.
     * An expert task's GEMM (moe__in_task) is one call on this thread in
     * every case: the experts are the parallelism there. */
    int64_t L = M >= N ? M : N, nt = (L + 127) / 128;
    if (nt > 4) nt = 4;
    int64_t tile = ((L + nt - 1) / nt + 15) / 16 * 16;
    nt = (L + tile - 1) / tile;
    if (moe__in_task) { /* one expert's GEMM (moe_each_expert): always one call on this thread */
        sgemm_1(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int nested = 0;
#ifdef _OPENMP
    nested = omp_in_parallel();
#endif
#pragma omp parallel for schedule(dynamic, 1) if (!nested)
    for (int64_t i = 0; i < nt; i++) {
        int64_t a = i * tile, n = L - a < tile ? L - a : tile;
        if (M >= N) /* rows a..a+n of C: rows of op(A) */
            sgemm_1(ta, tb, n, N, K, alpha, ta ? A + a : A + a * lda, lda, B, ldb, beta, C + a * ldc, ldc);
        else /* columns a..a+n of C: columns of op(B) */
            sgemm_1(ta, tb, M, n, K, alpha, A, lda, tb ? B + a * ldb : B + a, ldb, beta, C + a, ldc);
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
    /* Hand-written because for a few rows a library GEMM first packs all of W,
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
