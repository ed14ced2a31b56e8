/*
 * Layer `topk` (seed 004 SimpleMoE): gate Linear(D,E) with bias, the K largest
 * logits per token, softmax over those K only, and K of E expert MLPs per
 * token: Linear(D,H) -> act -> Linear(H,D), or a GLU expert Linear(D,2H) ->
 * a*f(g) -> Linear(H,D). Sparse, index-based dispatch: each expert's GEMMs see
 * only its routed rows.
 * Dimension key: T tokens, D model dim, H expert hidden dim, H2 = H (MLP) or
 * 2H (GLU), E experts, K top-k, A = T*K routed rows.
 *
 * Parameters live in one block, grouped for one GEMM per expert:
 *   W1 (E,H2,D)  b1 (E,H2)  W2 (E,D,H)  b2 (E,D)  Wg (E,D)  bg (E)
 * and the table names them as the state_dict does:
 *   experts.{e}.net.0.weight (H2,D), .net.0.bias (H2), .net.2.weight (D,H),
 *   .net.2.bias (D), gate.weight (E,D), gate.bias (E).
 */
#include "ffn.h"
#include "layer_internal.h"
#include "ops.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    float *x;       /* (T,D)   copy of the input (gate backward)         */
    float *logits;  /* (T,E)                                             */
    float *w;       /* (T,K)   softmax over the selected logits          */
    float *dw;      /* (T,K)                                             */
    float *dlogits; /* (T,E)                                             */
    int32_t *idx;   /* (T,K)   selected experts, largest logit first     */
    int32_t *pos;   /* (T,K)   row of each assignment in the expert bufs */
    int32_t *slot;  /* (A)     token of each row                         */
    int64_t *offsets; /* (E+1)                                           */
    float *xe;      /* (A,D)   gathered expert inputs                    */
    float *hpre;    /* (A,H2)  first GEMM output (pre-activation)        */
    float *ha;      /* (A,H)   activation                                */
    float *ye;      /* (A,D)   expert outputs                            */
    float *dye;     /* (A,D)                                             */
    float *dha;     /* (A,H)                                             */
    float *dhpre;   /* (A,H2)                                            */
    float *dxe;     /* (A,D)                                             */
} topk_ws;

static int is_glu(const moe_config *c) { return c->expert != MOE_EXPERT_MLP; }

/* Measure (base NULL) or carve the workspace for T tokens. */
static size_t layout(const moe_layer *l, int64_t T, char *base, topk_ws *w) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H, E = c->num_experts;
    int64_t K = c->top_k, A = T * K;
    size_t off = 0, F = sizeof(float), I = sizeof(int32_t);
    w->x = moe__carve(base, &off, T, D, F);
    w->logits = moe__carve(base, &off, T, E, F);
    w->w = moe__carve(base, &off, T, K, F);
    w->dw = moe__carve(base, &off, T, K, F);
    w->dlogits = moe__carve(base, &off, T, E, F);
    w->idx = moe__carve(base, &off, T, K, I);
    w->pos = moe__carve(base, &off, T, K, I);
    w->slot = moe__carve(base, &off, A, 1, I);
    w->offsets = moe__carve(base, &off, E + 1, 1, sizeof(int64_t));
    w->xe = moe__carve(base, &off, A, D, F);
    w->hpre = moe__carve(base, &off, A, H2, F);
    w->ha = moe__carve(base, &off, A, H, F);
    w->ye = moe__carve(base, &off, A, D, F);
    w->dye = moe__carve(base, &off, A, D, F);
    w->dha = moe__carve(base, &off, A, H, F);
    w->dhpre = moe__carve(base, &off, A, H2, F);
    w->dxe = moe__carve(base, &off, A, D, F);
    return off;
}

static size_t topk_workspace_bytes(const moe_layer *l, int64_t B, int64_t N) {
    int64_t T = B * N;
    topk_ws w;
    return layout(l, T, NULL, &w);
}

/* Parameter block: offsets (in floats) of W1, b1, W2, b2, Wg, bg, and the end. */
enum { P_W1, P_B1, P_W2, P_B2, P_WG, P_BG, P_END };
static void param_offsets(const moe_config *c, int64_t o[P_END + 1]) {
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H, E = c->num_experts;
    o[P_W1] = 0;
    o[P_B1] = o[P_W1] + E * H2 * D;
    o[P_W2] = o[P_B1] + E * H2;
    o[P_B2] = o[P_W2] + E * D * H;
    o[P_WG] = o[P_B2] + E * D;
    o[P_BG] = o[P_WG] + E * D;
    o[P_END] = o[P_BG] + E;
}

typedef struct {
    float *W1, *b1, *W2, *b2, *Wg, *bg;
} topk_params;

static topk_params params_of(const moe_layer *l, float *mem) {
    int64_t o[P_END + 1];
    param_offsets(&l->cfg, o);
    topk_params p = {mem + o[P_W1], mem + o[P_B1], mem + o[P_W2], mem + o[P_B2], mem + o[P_WG], mem + o[P_BG]};
    return p;
}

/* The expert bank over parameters p and gradients g (g may be all NULL). */
static moe_ffn ffn_of(const moe_config *c, topk_params p, topk_params g) {
    moe_ffn f = {p.W1, p.b1, p.W2, p.b2, g.W1, g.b1, g.W2, g.b2, c->input_dim, c->hidden_dim,
                 c->num_experts, c->expert, c->activation, c->leaky_slope, 0.0f, 0};
    return f;
}

static void topk_forward(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim;
    int E = c->num_experts, K = c->top_k;
    int64_t A = T * K;
    topk_ws w;
    layout(l, T, l->ws, &w);
    topk_params p = params_of(l, l->wmem);

    memcpy(w.x, x, (size_t)(T * D) * sizeof(float));
    /* gate: logits (T,E) = x Wg^T + bg, then top-k and softmax over the k */
    moe_sgemm(0, 1, T, E, D, 1.0f, x, D, p.Wg, D, 0.0f, w.logits, E);
    moe_add_bias_rows(w.logits, p.bg, T, E);
    moe_topk_softmax(w.idx, w.w, w.logits, T, E, K);
    moe_dispatch_plan(l->expert_counts, w.offsets, w.pos, w.slot, w.idx, T, K, E);
    moe_gather_rows(w.xe, x, w.slot, A, D);

    /* experts: one GEMM per expert over its contiguous rows */
    topk_params none = {0};
    moe_ffn f = ffn_of(c, p, none);
    moe_ffn_forward(&f, w.offsets, w.xe, w.hpre, w.ha, w.ye);
    moe_combine(y, w.ye, w.w, w.pos, T, K, D);
    l->assignments = A;
    l->dropped = 0;
    (void)aux;
    (void)train;
}

static void topk_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim;
    int E = c->num_experts, K = c->top_k;
    int64_t T = l->T;
    topk_ws w;
    layout(l, T, l->ws, &w);
    topk_params p = params_of(l, l->wmem), g = params_of(l, l->gmem);

    /* combine: dye = w * dy per routed row, dw = <dy, ye> */
    moe_combine_backward(w.dye, w.dw, dy, w.ye, w.w, w.pos, T, K, D);
    moe_ffn f = ffn_of(c, p, g);
    moe_ffn_backward(&f, w.offsets, w.xe, w.hpre, w.ha, w.dye, w.dha, w.dhpre, dx ? w.dxe : NULL);

    /* gate: softmax over the selected logits, scattered back to (T,E) */
    memset(w.dlogits, 0, (size_t)(T * E) * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *wt = w.w + t * K, *dwt = w.dw + t * K;
        float s = 0.0f;
        for (int j = 0; j < K; j++) s += wt[j] * dwt[j];
        for (int j = 0; j < K; j++) w.dlogits[t * E + w.idx[t * K + j]] = wt[j] * (dwt[j] - s);
    }
    moe_sgemm(1, 0, E, D, T, 1.0f, w.dlogits, E, w.x, D, 1.0f, g.Wg, D);
    moe_colsum_acc(g.bg, w.dlogits, T, E);
    if (dx) {
        moe_sgemm(0, 0, T, D, E, 1.0f, w.dlogits, E, p.Wg, D, 0.0f, dx, D);
        moe_scatter_add(dx, w.dxe, w.pos, T, K, D);
    }
    (void)daux;
}

static const moe_layer_ops topk_ops = {topk_workspace_bytes, topk_forward, topk_backward};

moe_status moe__topk_create(moe_layer *l) {
    const moe_config *c = &l->cfg;
    int E = c->num_experts;
    if (c->top_k < 1 || c->top_k > E)
        return moe_err(MOE_ERR_ARG, "top_k = %d is out of range: it must be between 1 and num_experts = %d",
                       c->top_k, E);
    if (c->hidden_dim < 1 || c->hidden_dim > INT_MAX / 4)
        return moe_err(MOE_ERR_ARG, "hidden_dim must be in [1, %d], got %lld", INT_MAX / 4,
                       (long long)c->hidden_dim);
    if (!moe_activation_name(c->activation))
        return moe_err(MOE_ERR_ARG, "unknown activation %d", (int)c->activation);
    if (!moe_expert_kind_name(c->expert))
        return moe_err(MOE_ERR_ARG, "unknown expert kind %d", (int)c->expert);
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H;
    /* parameter count, overflow-checked: E*(H2*D + H2 + D*H + D) + E*D + E */
    size_t per, a, b, total;
    if (!moe_mul_size(&a, (size_t)H2, (size_t)D) || !moe_mul_size(&b, (size_t)D, (size_t)H) ||
        !moe_add_size(&per, a, b) || !moe_add_size(&per, per, (size_t)(H2 + D)) ||
        !moe_mul_size(&total, per, (size_t)E) || !moe_add_size(&total, total, (size_t)E * (size_t)(D + 1)) ||
        total > (size_t)INT64_MAX / sizeof(float))
        return moe_err(MOE_ERR_ARG, "layer too large: D=%lld H=%lld E=%d", (long long)D, (long long)H, E);

    l->ops = &topk_ops;
    l->in_dim = D;
    l->out_dim = D;
    l->has_aux = 0;
    int64_t o[P_END + 1];
    param_offsets(c, o);
    char name[MOE_NAME_MAX];
    moe_status st = MOE_OK;
    for (int e = 0; e < E && st == MOE_OK; e++) {
        int64_t s_w1[2] = {H2, D}, s_b1[1] = {H2}, s_w2[2] = {D, H}, s_b2[1] = {D};
        snprintf(name, sizeof name, "experts.%d.net.0.weight", e);
        st = moe__layer_add_param(l, name, 2, s_w1, o[P_W1] + e * H2 * D, D);
        snprintf(name, sizeof name, "experts.%d.net.0.bias", e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b1, o[P_B1] + e * H2, D);
        snprintf(name, sizeof name, "experts.%d.net.2.weight", e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 2, s_w2, o[P_W2] + e * D * H, H);
        snprintf(name, sizeof name, "experts.%d.net.2.bias", e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b2, o[P_B2] + e * D, H);
    }
    int64_t s_wg[2] = {E, D}, s_bg[1] = {E};
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.weight", 2, s_wg, o[P_WG], D);
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.bias", 1, s_bg, o[P_BG], D);
    if (st == MOE_OK) st = moe__layer_alloc(l, o[P_END]);
    (void)total;
    return st;
}

int64_t moe__topk_routing(const moe_layer *l, int32_t *dst, int64_t cap) {
    topk_ws w;
    int64_t n = l->T * l->cfg.top_k;
    layout(l, l->T, l->ws, &w);
    if (dst) memcpy(dst, w.idx, (size_t)(n < cap ? n : cap) * sizeof *dst);
    return n;
}
