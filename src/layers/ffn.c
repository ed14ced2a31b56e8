/*
 * Expert FFN bank (see ffn.h): per expert, one GEMM per matrix over the
 * expert's contiguous rows, with bias, activation and dropout on those rows
 * in between.
 *
 * Experts run in parallel through moe_each_expert (ffn.h).
 * Dimension key: D model dim, H hidden width, H2 = H or 2H (GLU), E experts,
 * R rows, n rows of one expert.
 */
#include "ffn.h"
#include "ops.h"

#include <string.h>

/* Inverted dropout on rows [r0, r0+n) of ha (R,H), in place; nothing when p == 0. */
static void dropout_rows(float *ha, int64_t r0, int64_t n, int64_t H, float p, uint64_t stream) {
    if (p <= 0.0f) return;
    float scale = 1.0f / (1.0f - p);
    for (int64_t r = r0; r < r0 + n; r++)
        for (int64_t j = 0; j < H; j++) {
            uint64_t i = (uint64_t)(r * H + j);
            ha[r * H + j] = moe_rng_uniform(stream, i) < p ? 0.0f : ha[r * H + j] * scale;
        }
}

/* rows (n,N) = b (N) broadcast: the bias as the GEMM's C with beta = 1, which
 * saves the GEMM's zeroing pass and a separate bias pass. (The bias now
 * enters before the K-blocks' partial sums instead of after them: the same
 * value up to float rounding.) */
static void bias_rows(float *rows, const float *b, int64_t n, int64_t N) {
    for (int64_t i = 0; i < n; i++) memcpy(rows + i * N, b, (size_t)N * sizeof(float));
}

typedef struct {
    const moe_ffn *f;
    const float *xe, *hpre, *ha, *dye;
    float *hpre_w, *ha_w, *ye, *dha, *dhpre, *dxe;
    int grad_bad;  /* backward: set when a gradient holds a NaN or Inf */
} ffn_args;

/* C (n,N) += A W^T, W (N,K) an expert's nn.Linear weight: fp32 (A, W), or
 * bf16 (A16, W16) when W16 is set; few rows (decode) by the kernels that read
 * W once. */
static void linear_acc(float *C, const float *A, const uint16_t *A16, const float *W, const uint16_t *W16, int64_t n,
                       int64_t N, int64_t K) {
    if (W16 && n <= MOE_SMALL_ROWS) moe_gemm_bf16_nt_small(C, A16, W16, n, N, K);
    else if (W16) moe_gemm_bf16(0, 1, n, N, K, A16, W16, 1.0f, C);
    else if (n <= MOE_SMALL_ROWS) moe_sgemm_nt_small(C, N, A, K, W, n, N, K);
    else moe_sgemm(0, 1, n, N, K, 1.0f, A, K, W, K, 1.0f, C, N);
}

static void expert_forward(void *ctx, int e, int64_t r0, int64_t n) {
    const ffn_args *a = ctx;
    const moe_ffn *f = a->f;
    int64_t D = f->D, H = f->H, H2 = moe_ffn_h2(f);
    float *hp = a->hpre_w + r0 * H2, *h = a->ha_w + r0 * H, *y = a->ye + r0 * D;
    /* bf16 (f->W1h): the GEMM inputs rounded, fp32 accumulation and output */
    const uint16_t *W1h = f->W1h ? f->W1h + e * H2 * D : NULL, *W2h = f->W1h ? f->W2h + e * D * H : NULL;
    uint16_t *h16 = f->W1h ? f->h16 + r0 * H : NULL;
    bias_rows(hp, f->b1 + e * H2, n, H2);
    linear_acc(hp, a->xe + r0 * D, f->W1h ? f->x16 + r0 * D : NULL, f->W1 + e * H2 * D, W1h, n, H2, D);
    if (f->kind != MOE_EXPERT_MLP) moe_glu_forward(h, hp, n, H, f->kind);
    else moe_act_forward(h, hp, n * H, f->act, f->slope);
    dropout_rows(a->ha_w, r0, n, H, f->dropout, f->stream);
    if (h16) moe_to_bf16(h16, h, n * H);
    bias_rows(y, f->b2 + e * D, n, D);
    linear_acc(y, h, h16, f->W2 + e * D * H, W2h, n, D, H);
}

static void expert_backward(void *ctx, int e, int64_t r0, int64_t n) {
    const ffn_args *a = ctx;
    const moe_ffn *f = a->f;
    int64_t D = f->D, H = f->H, H2 = moe_ffn_h2(f);
    const float *dy = a->dye + r0 * D, *h = a->ha + r0 * H, *hp = a->hpre + r0 * H2, *x = a->xe + r0 * D;
    float *dh = a->dha + r0 * H, *dhp = a->dhpre + r0 * H2;
    const uint16_t *dy16 = f->W1h ? f->dy16 + r0 * D : NULL;
    moe_colsum_acc(f->db2 + e * D, dy, n, D);
    /* dW2 (D,H) += dye^T ha ; dha (n,H) = dye W2 */
    if (dy16) moe_gemm_bf16(1, 0, D, H, n, dy16, f->h16 + r0 * H, 1.0f, f->dW2 + e * D * H);
    else moe_sgemm(1, 0, D, H, n, 1.0f, dy, D, h, H, 1.0f, f->dW2 + e * D * H, H);
    /* each gradient scanned right after it is written, while in cache */
    double t0 = moe__clock();
    int bad = moe_any_nonfinite(f->db2 + e * D, D) | moe_any_nonfinite(f->dW2 + e * D * H, D * H);
    double tc = moe__clock() - t0;
    if (dy16) moe_gemm_bf16(0, 0, n, H, D, dy16, f->W2h + e * D * H, 0.0f, dh);
    else moe_sgemm(0, 0, n, H, D, 1.0f, dy, D, f->W2 + e * D * H, H, 0.0f, dh, H);
    /* through dropout: the same mask, the same scale (regenerated from the stream) */
    dropout_rows(a->dha, r0, n, H, f->dropout, f->stream);
    if (f->kind != MOE_EXPERT_MLP) moe_glu_backward(dhp, dh, hp, n, H, f->kind);
    else moe_act_backward(dhp, dh, hp, n * H, f->act, f->slope);
    /* dW1 (H2,D) += dhpre^T xe ; db1 += colsum ; dxe (n,D) = dhpre W1 */
    uint16_t *dhp16 = dy16 ? f->dhp16 + r0 * H2 : NULL;
    if (dhp16) {
        moe_to_bf16(dhp16, dhp, n * H2);
        moe_gemm_bf16(1, 0, H2, D, n, dhp16, f->x16 + r0 * D, 1.0f, f->dW1 + e * H2 * D);
    } else moe_sgemm(1, 0, H2, D, n, 1.0f, dhp, H2, x, D, 1.0f, f->dW1 + e * H2 * D, D);
    moe_colsum_acc(f->db1 + e * H2, dhp, n, H2);
    t0 = moe__clock();
    bad |= moe_any_nonfinite(f->dW1 + e * H2 * D, H2 * D) | moe_any_nonfinite(f->db1 + e * H2, H2);
    moe__check_add(tc + moe__clock() - t0);
    if (bad) {
        ffn_args *w = ctx;
#pragma omp atomic write
        w->grad_bad = 1;
    }
    if (a->dxe && dhp16) moe_gemm_bf16(0, 0, n, D, H2, dhp16, f->W1h + e * H2 * D, 0.0f, a->dxe + r0 * D);
    else if (a->dxe) moe_sgemm(0, 0, n, D, H2, 1.0f, dhp, H2, f->W1 + e * H2 * D, D, 0.0f, a->dxe + r0 * D, D);
}

void moe_each_expert(const int64_t *offsets, int E, void (*fn)(void *ctx, int e, int64_t r0, int64_t n),
                     void *ctx) {
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    int64_t R = offsets[E], big = R / (2 * nt);
    if (E == 1) { /* one FFN (a dense model): its GEMMs tile over every thread, by
                   * shape only (moe_sgemm), so the bits stay the same on any thread
                   * count; as a task it would keep one thread busy and the rest idle */
        if (R > 0) fn(ctx, 0, 0, R);
        return;
    }
#pragma omp parallel
    {
        moe__in_task = 1;
        /* the big experts start first (nowait: a thread with none left goes
         * on to the small ones), so one big expert does not end the call alone */
#pragma omp for schedule(dynamic, 1) nowait
        for (int e = 0; e < E; e++) {
            int64_t n = offsets[e + 1] - offsets[e];
            if (n > big) fn(ctx, e, offsets[e], n);
        }
#pragma omp for schedule(dynamic, 1)
        for (int e = 0; e < E; e++) {
            int64_t n = offsets[e + 1] - offsets[e];
            if (n > 0 && n <= big) fn(ctx, e, offsets[e], n);
        }
        moe__in_task = 0;
    }
}

void moe_ffn_forward(const moe_ffn *f, const int64_t *offsets, const float *xe, float *hpre, float *ha,
                     float *ye) {
    ffn_args a = {f, xe, NULL, NULL, NULL, hpre, ha, ye, NULL, NULL, NULL, 0};
    if (f->W1h) moe_to_bf16_par(f->x16, xe, offsets[f->E] * f->D);
    moe_each_expert(offsets, f->E, expert_forward, &a);
}

int moe_ffn_backward(const moe_ffn *f, const int64_t *offsets, const float *xe, const float *hpre,
                     const float *ha, const float *dye, float *dha, float *dhpre, float *dxe) {
    ffn_args a = {f, xe, hpre, ha, dye, NULL, NULL, NULL, dha, dhpre, dxe, 0};
    if (f->W1h) moe_to_bf16_par(f->dy16, dye, offsets[f->E] * f->D);
    moe_each_expert(offsets, f->E, expert_backward, &a);
    return a.grad_bad;
}
