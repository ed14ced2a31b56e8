/*
 * Layer `dense` (seed 002 BasicMoE): a softmax gate over all E experts and E
 * linear experts Linear(D,O); every token goes through every expert:
 *     y[t] = sum_e softmax(x[t] Wg^T + bg)[e] * (x[t] W_e^T + b_e)
 *
 * The seed computes `gate_outputs @ expert_outputs` with shapes (B,E) @
 * (B,E,O), which PyTorch broadcasts across the batch: its y[b] is
 * sum_e (sum_b' g[b',e]) * expert_e(x[b]), mixing the gates of every row of
 * the batch. We implement the intended per-row weighted sum above; the parity
 * tests show the two differ whenever the batch has more than one row.
 *
 * Dimension key: T tokens, D input dim, O output dim, E experts.
 * Parameters in one block, all experts' weights contiguous for one GEMM:
 *   W (E,O,D)  b (E,O)  Wg (E,D)  bg (E)
 * named experts.{e}.weight (O,D), experts.{e}.bias (O), gate.weight, gate.bias.
 */
#include "layer_internal.h"
#include "ops.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    float *x;       /* (T,D)                        */
    float *g;       /* (T,E)  gate probabilities    */
    float *dg;      /* (T,E)                        */
    float *dlogits; /* (T,E)                        */
    float *ye;      /* (T,E*O) every expert's output */
    float *dye;     /* (T,E*O)                      */
} dense_ws;

static size_t layout(const moe_layer *l, int64_t T, char *base, dense_ws *w) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts;
    size_t off = 0, F = sizeof(float);
    w->x = moe__carve(base, &off, T, D, F);
    w->g = moe__carve(base, &off, T, E, F);
    w->dg = moe__carve(base, &off, T, E, F);
    w->dlogits = moe__carve(base, &off, T, E, F);
    w->ye = moe__carve(base, &off, T, E * O, F);
    w->dye = moe__carve(base, &off, T, E * O, F);
    return off;
}

static size_t dense_workspace_bytes(const moe_layer *l, int64_t B, int64_t N) {
    int64_t T = B * N;
    dense_ws w;
    return layout(l, T, NULL, &w);
}

typedef struct {
    float *W, *b, *Wg, *bg;
} dense_params;

static dense_params params_of(const moe_layer *l, float *mem) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts;
    dense_params p;
    p.W = mem;
    p.b = p.W + E * O * D;
    p.Wg = p.b + E * O;
    p.bg = p.Wg + E * D;
    return p;
}

static moe_status dense_forward(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts, EO = E * O;
    dense_ws w;
    layout(l, T, l->ws, &w);
    dense_params p = params_of(l, l->wmem);

    if (l->keep) memcpy(w.x, x, (size_t)(T * D) * sizeof(float));
    moe_sgemm(0, 1, T, E, D, 1.0f, x, D, p.Wg, D, 0.0f, w.g, E);
    moe_add_bias_rows(w.g, p.bg, T, E);
    moe_softmax_rows(w.g, w.g, T, E);
    /* all experts in one GEMM: ye (T, E*O) = x W^T + b */
    moe_sgemm(0, 1, T, EO, D, 1.0f, x, D, p.W, D, 0.0f, w.ye, EO);
    moe_add_bias_rows(w.ye, p.b, T, EO);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *yt = y + t * O;
        const float *gt = w.g + t * E, *r = w.ye + t * EO;
        for (int64_t o = 0; o < O; o++) yt[o] = gt[0] * r[o];
        for (int64_t e = 1; e < E; e++)
            for (int64_t o = 0; o < O; o++) yt[o] += gt[e] * r[e * O + o];
    }
    for (int64_t e = 0; e < E; e++) l->expert_counts[e] = T;
    l->assignments = T * E;
    l->dropped = 0;
    (void)aux;
    (void)train;
    return MOE_OK;
}

static moe_status dense_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts, EO = E * O;
    int64_t T = l->T;
    dense_ws w;
    layout(l, T, l->ws, &w);
    dense_params p = params_of(l, l->wmem), g = params_of(l, l->gmem);

#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *d = dy + t * O, *r = w.ye + t * EO;
        float *dr = w.dye + t * EO;
        for (int64_t e = 0; e < E; e++) {
            float ge = w.g[t * E + e], s = 0.0f;
            for (int64_t o = 0; o < O; o++) {
                s += d[o] * r[e * O + o];
                dr[e * O + o] = ge * d[o];
            }
            w.dg[t * E + e] = s;
        }
    }
    moe_softmax_rows_backward(w.dlogits, w.g, w.dg, T, E);
    moe_sgemm(1, 0, EO, D, T, 1.0f, w.dye, EO, w.x, D, 1.0f, g.W, D);
    moe_colsum_acc(g.b, w.dye, T, EO);
    moe_sgemm(1, 0, E, D, T, 1.0f, w.dlogits, E, w.x, D, 1.0f, g.Wg, D);
    moe_colsum_acc(g.bg, w.dlogits, T, E);
    if (dx) {
        moe_sgemm(0, 0, T, D, EO, 1.0f, w.dye, EO, p.W, D, 0.0f, dx, D);
        moe_sgemm(0, 0, T, D, E, 1.0f, w.dlogits, E, p.Wg, D, 1.0f, dx, D);
    }
    (void)daux;
    return MOE_OK;
}

static int dense_probes(const moe_layer *l, int backward, moe_probe *pr) {
    int64_t O = l->cfg.output_dim, E = l->cfg.num_experts, T = l->T;
    dense_ws w;
    layout(l, T, l->ws, &w);
    int n = 0;
    if (!backward) {
        pr[n++] = (moe_probe){"gate probabilities", w.g, T, E};
        pr[n++] = (moe_probe){"expert outputs", w.ye, T, E * O};
    } else {
        pr[n++] = (moe_probe){"expert output gradients", w.dye, T, E * O};
        pr[n++] = (moe_probe){"gate probability gradients", w.dg, T, E};
        pr[n++] = (moe_probe){"gate logit gradients", w.dlogits, T, E};
    }
    return n;
}

static const moe_layer_ops dense_ops = {dense_workspace_bytes, dense_forward, dense_backward, dense_probes};

moe_status moe__dense_create(moe_layer *l) {
    const moe_config *c = &l->cfg;
    if (l->ep)
        return moe_err(MOE_ERR_UNSUPPORTED, "dense layers are not expert-parallel yet: run them in one process");
    int64_t D = c->input_dim, O = c->output_dim, E = c->num_experts;
    if (O < 1 || O > INT_MAX / 4 / E)
        return moe_err(MOE_ERR_ARG, "output_dim must be in [1, %lld], got %lld", (long long)(INT_MAX / 4 / E),
                       (long long)O);
    size_t a, total;
    if (!moe_mul_size(&a, (size_t)(E * O), (size_t)(D + 1)) ||
        !moe_add_size(&total, a, (size_t)(E * (D + 1))) || total > (size_t)INT64_MAX / sizeof(float))
        return moe_err(MOE_ERR_ARG, "layer too large: D=%lld O=%lld E=%lld", (long long)D, (long long)O,
                       (long long)E);
    l->ops = &dense_ops;
    l->in_dim = D;
    l->out_dim = O;
    l->has_aux = 0;
    int64_t o_W = 0, o_b = E * O * D, o_Wg = o_b + E * O, o_bg = o_Wg + E * D;
    char name[MOE_NAME_MAX];
    moe_status st = MOE_OK;
    for (int64_t e = 0; e < E && st == MOE_OK; e++) {
        int64_t s_w[2] = {O, D}, s_b[1] = {O};
        snprintf(name, sizeof name, "experts.%lld.weight", (long long)e);
        st = moe__layer_add_param(l, name, 2, s_w, o_W + e * O * D, D);
        snprintf(name, sizeof name, "experts.%lld.bias", (long long)e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b, o_b + e * O, D);
    }
    int64_t s_wg[2] = {E, D}, s_bg[1] = {E};
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.weight", 2, s_wg, o_Wg, D);
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.bias", 1, s_bg, o_bg, D);
    if (st == MOE_OK) st = moe__layer_alloc(l, o_bg + E);
    return st;
}
