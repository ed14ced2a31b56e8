/*
 * moe_sgemm: libmoe's threading over the kernel table's single-threaded GEMM
 * (src/kernels/onednn.c: oneDNN), plus the bias/column-sum helpers around it
 * and the fp32 decode GEMV's entry.
 * Dimension key: M rows, N cols, K inner.
 */
#include "ops.h"

_Thread_local int moe__in_task;

/* One tile: the table's single-threaded GEMM (oneDNN), or the plain twin if
 * the library failed (it said so: moe_cpu_notes). */
static void sgemm_1(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (!moe_k()->sgemm1(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
        moe_sgemm_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* moe_sgemm's threading: C is cut into at most 4 tiles along its longer
 * side, the cut depending only on the shape, and each tile is one
 * single-threaded oneDNN call (sgemm_1). Every element is then summed the
 * same way on any thread count, and inside or outside the caller's parallel
 * regions, which oneDNN's own threading does not give (its split changes
 * the last bits). Rows of C are rows of op(A), columns of C columns of
 * op(B). Inside a parallel region the tiles run on this thread. An expert
 * task's GEMM (moe__in_task) is one call on this thread in every case: the
 * experts are the parallelism there. */
static void tiled(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
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

int64_t moe__scratch_block = MOE_SCRATCH_BLOCK;

int64_t moe__gemm_block(int64_t L, int64_t K) {
    int64_t b = moe__scratch_block / (K > 0 ? K : 1);
    b = b < 16 ? 16 : b / 16 * 16;
    return b >= L ? L : b;
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
    /* At a level whose GEMM runs A B^T fastest (kernels.h: avx2), a big
     * GEMM of another form becomes one: in blocks of C whose operands fit
     * MOE_SCRATCH_BLOCK floats each (the scratch stays bounded however big
     * the weights), op(A)'s rows copied to (Mb,K) and op(B)'s columns to
     * (Nb,K) in this thread's scratch (the tiles only read them). Exact
     * copies; the sums are then A B^T's, decided by the shape alone. Without
     * scratch it runs as it is (slower, the same product). */
    const moe_kernels *kt = moe_k();
    if (kt->sgemm_prefers_nt && !(ta == 0 && tb == 1) && M >= 64 && N >= 64 && K >= 64) {
        int64_t Mb = ta ? moe__gemm_block(M, K) : M, Nb = tb ? N : moe__gemm_block(N, K);
        float *a = ta ? moe__kernel_scratch(MOE_SCRATCH_T_A, (size_t)(Mb * K)) : NULL;
        float *b = tb ? NULL : moe__kernel_scratch(MOE_SCRATCH_T_B, (size_t)(Nb * K));
        if ((a || !ta) && (b || tb)) {
            for (int64_t j0 = 0; j0 < N; j0 += Nb) {
                int64_t nb = N - j0 < Nb ? N - j0 : Nb;
                if (!tb) kt->transpose(b, B + j0, K, nb, ldb); /* columns j0.. of B (K,N) -> (nb,K) */
                for (int64_t i0 = 0; i0 < M; i0 += Mb) {
                    int64_t mb = M - i0 < Mb ? M - i0 : Mb;
                    if (ta) kt->transpose(a, A + i0, K, mb, lda); /* columns i0.. of A (K,M) -> (mb,K) */
                    tiled(0, 1, mb, nb, K, alpha, ta ? a : A + i0 * lda, ta ? K : lda, tb ? B + j0 * ldb : b,
                          tb ? ldb : K, beta, C + i0 * ldc + j0, ldc);
                }
            }
            return;
        }
    }
    tiled(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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
    moe_k()->sgemm_nt_small(C, ldc, A, lda, W, n, N, K);
}
