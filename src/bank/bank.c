/*
 * The expert bank (see bank.h): per expert, one GEMM per matrix over the
 * expert's contiguous rows, with bias, activation and dropout on those rows
 * in between. The GEMMs are the format's (f32.c, bf16.c); the layout
 * (nn.Linear or transposed) decides only which operand is transposed.
 *
 * Experts run in parallel through moe_each_expert (bank.h).
 * Dimension key: D model dim, H hidden width, H2 = H or 2H (GLU), E experts,
 * R rows, n rows of one expert.
 */
#include "bank.h"
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
    const moe_bank *b;
    const float *xe, *hpre, *ha, *dye;
    float *hpre_w, *ha_w, *ye, *dha, *dhpre, *dxe;
    int grad_bad;  /* backward: set when a gradient holds a NaN or Inf */
} bank_args;

/* C (n,N) (+)= A op(W): the expert's forward GEMM through W (N,K) in
 * nn.Linear's layout (A W^T) or (K,N) transposed (A W). A16: A's copy in the
 * format. beta 1 adds to C (the bias is there), 0 writes. Few rows (decode)
 * in nn.Linear's layout: the format's GEMV, which reads W once. */
static void forward_mm(const moe_bank *b, float *C, const float *A, const uint16_t *A16, const float *W,
                       const uint16_t *Wq, int64_t n, int64_t N, int64_t K, float beta) {
    if (!b->transposed && n <= MOE_SMALL_ROWS) {
        if (beta == 0.0f) memset(C, 0, (size_t)(n * N) * sizeof(float));
        b->fmt->gemv_nt(C, A, A16, W, Wq, n, N, K);
    } else {
        b->fmt->gemm(0, !b->transposed, n, N, K, A, A16, W, Wq, beta, C);
    }
}

/* The row copies of expert rows [r0, r0+n) of a (R, width) copy, or NULL. */
static inline const uint16_t *rows16(const uint16_t *p, int64_t r0, int64_t width) { return p ? p + r0 * width : NULL; }

static void expert_forward(void *ctx, int e, int64_t r0, int64_t n) {
    const bank_args *a = ctx;
    const moe_bank *b = a->b;
    int64_t D = b->D, H = b->H, H2 = moe_bank_h2(b);
    float *hp = a->hpre_w + r0 * H2, *h = a->ha_w + r0 * H, *y = a->ye + r0 * D;
    const uint16_t *W1q = b->W1q ? b->W1q + e * H2 * D : NULL, *W2q = b->W2q ? b->W2q + e * D * H : NULL;
    uint16_t *h16 = b->lp.h ? b->lp.h + r0 * H : NULL;
    if (b->b1) bias_rows(hp, b->b1 + e * H2, n, H2);
    forward_mm(b, hp, a->xe + r0 * D, rows16(b->lp.x, r0, D), b->W1 + e * H2 * D, W1q, n, H2, D, b->b1 ? 1.0f : 0.0f);
    if (b->kind != MOE_EXPERT_MLP) moe_glu_forward(h, hp, n, H, b->kind);
    else moe_act_forward(h, hp, n * H, b->act, b->slope);
    dropout_rows(a->ha_w, r0, n, H, b->dropout, b->stream);
    if (h16) b->fmt->to_lowp(h16, h, n * H);
    if (b->b2) bias_rows(y, b->b2 + e * D, n, D);
    forward_mm(b, y, h, h16, b->W2 + e * D * H, W2q, n, D, H, b->b2 ? 1.0f : 0.0f);
}

static void expert_backward(void *ctx, int e, int64_t r0, int64_t n) {
    const bank_args *a = ctx;
    const moe_bank *b = a->b;
    const moe_bank_format *fmt = b->fmt;
    int64_t D = b->D, H = b->H, H2 = moe_bank_h2(b);
    int tr = b->transposed;
    const float *dy = a->dye + r0 * D, *h = a->ha + r0 * H, *hp = a->hpre + r0 * H2, *x = a->xe + r0 * D;
    const float *W1 = b->W1 + e * H2 * D, *W2 = b->W2 + e * D * H;
    const uint16_t *W1q = b->W1q ? b->W1q + e * H2 * D : NULL, *W2q = b->W2q ? b->W2q + e * D * H : NULL;
    const uint16_t *dy16 = rows16(b->lp.dy, r0, D), *h16 = rows16(b->lp.h, r0, H), *x16 = rows16(b->lp.x, r0, D);
    uint16_t *dhp16 = b->lp.dhp ? b->lp.dhp + r0 * H2 : NULL;
    float *dh = a->dha + r0 * H, *dhp = a->dhpre + r0 * H2, *dW1 = b->dW1 + e * H2 * D, *dW2 = b->dW2 + e * D * H;
    if (b->db2) moe_colsum_acc(b->db2 + e * D, dy, n, D);
    /* dW2 += dye^T ha (nn.Linear: (D,H)) or ha^T dye (transposed: (H,D)) */
    if (tr) fmt->gemm(1, 0, H, D, n, h, h16, dy, dy16, 1.0f, dW2);
    else fmt->gemm(1, 0, D, H, n, dy, dy16, h, h16, 1.0f, dW2);
    /* each gradient scanned right after it is written, while in cache */
    double t0 = moe__clock();
    int bad = (b->db2 && moe_any_nonfinite(b->db2 + e * D, D)) | moe_any_nonfinite(dW2, D * H);
    double tc = moe__clock() - t0;
    /* dha (n,H) = dye W2 (nn.Linear) or dye W2^T (transposed) */
    fmt->gemm(0, tr, n, H, D, dy, dy16, W2, W2q, 0.0f, dh);
    /* through dropout: the same mask, the same scale (regenerated from the stream) */
    dropout_rows(a->dha, r0, n, H, b->dropout, b->stream);
    if (b->kind != MOE_EXPERT_MLP) moe_glu_backward(dhp, dh, hp, n, H, b->kind);
    else moe_act_backward(dhp, dh, hp, n * H, b->act, b->slope);
    if (dhp16) fmt->to_lowp(dhp16, dhp, n * H2);
    /* dW1 += dhpre^T xe (nn.Linear: (H2,D)) or xe^T dhpre (transposed: (D,H2)) */
    if (tr) fmt->gemm(1, 0, D, H2, n, x, x16, dhp, dhp16, 1.0f, dW1);
    else fmt->gemm(1, 0, H2, D, n, dhp, dhp16, x, x16, 1.0f, dW1);
    if (b->db1) moe_colsum_acc(b->db1 + e * H2, dhp, n, H2);
    t0 = moe__clock();
    bad |= moe_any_nonfinite(dW1, H2 * D) | (b->db1 && moe_any_nonfinite(b->db1 + e * H2, H2));
    moe__check_add(tc + moe__clock() - t0);
    if (bad) {
        bank_args *w = ctx;
#pragma omp atomic write
        w->grad_bad = 1;
    }
    /* dxe (n,D) = dhpre W1 (nn.Linear) or dhpre W1^T (transposed) */
    if (a->dxe) fmt->gemm(0, tr, n, D, H2, dhp, dhp16, W1, W1q, 0.0f, a->dxe + r0 * D);
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

void moe_bank_forward(const moe_bank *b, const int64_t *offsets, const float *xe, float *hpre, float *ha, float *ye) {
    bank_args a = {b, xe, NULL, NULL, NULL, hpre, ha, ye, NULL, NULL, NULL, 0};
    if (b->lp.x) moe_convert_par(b->fmt->to_lowp, b->lp.x, xe, offsets[b->E] * b->D);
    moe_each_expert(offsets, b->E, expert_forward, &a);
}

int moe_bank_backward(const moe_bank *b, const int64_t *offsets, const float *xe, const float *hpre, const float *ha,
                      const float *dye, float *dha, float *dhpre, float *dxe) {
    bank_args a = {b, xe, hpre, ha, dye, NULL, NULL, NULL, dha, dhpre, dxe, 0};
    if (b->lp.dy) moe_convert_par(b->fmt->to_lowp, b->lp.dy, dye, offsets[b->E] * b->D);
    moe_each_expert(offsets, b->E, expert_backward, &a);
    return a.grad_bad;
}
