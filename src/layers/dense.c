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
 * Expert parallel (moe_mpi.h): rank r holds the experts [e0, e0 + El) and a
 * copy of the gate. Every token needs every expert, so the tokens travel to
 * every rank and the outputs come back as partial sums:
 *   forward:  the gate over this rank's tokens (local) -> all-gather x and
 *             the gate probabilities of every rank (Ta tokens) -> the local
 *             experts over all Ta tokens, summed with their gates into one
 *             partial (Ta,O) -> all-to-all: each rank gets its tokens'
 *             partials from every rank and adds them in rank order.
 *   backward: all-gather dy -> the local experts' gradients (complete: they
 *             saw every token), dg of the local experts and the partial dx
 *             (Ta,D) -> all-to-all back to the tokens' ranks -> the full dg
 *             (T,E), the softmax backward and the gate's gradients (local;
 *             moe_layer_allreduce_grads sums them), dx = the partials in rank
 *             order + the gate's part.
 * Nothing is reduced in an order that could vary: the same bits run to run.
 * One process sums y over e = 0..E-1 in one pass; P ranks sum per rank, then
 * over the ranks: the two differ by float rounding only.
 *
 * Dimension key: T tokens, D input dim, O output dim, E experts; expert
 * parallel: P ranks, El = E/P local experts, Ta tokens of all ranks.
 * Parameters in one block, all (local) experts' weights contiguous for one GEMM:
 *   W (El,O,D)  b (El,O)  Wg (E,D)  bg (E)       (El = E in one process)
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
    float *ye;      /* (T,E*O) every expert's output (one process)   */
    float *dye;     /* (T,E*O)                      */
    int64_t *tq;    /* (P) tokens of each rank (expert parallel)      */
    float *ry;      /* (P,T,O)  the partial y of this rank's tokens from each rank */
    float *rdg;     /* (P,T,El) dg of each rank's experts for them    */
    float *rdx;     /* (P,T,D)  the partial dx from each rank         */
} dense_ws;

static size_t layout(const moe_layer *l, int64_t T, char *base, dense_ws *w) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts;
    size_t off = 0, F = sizeof(float);
    memset(w, 0, sizeof *w);
    w->x = moe__carve(base, &off, T, D, F);
    w->g = moe__carve(base, &off, T, E, F);
    w->dg = moe__carve(base, &off, T, E, F);
    w->dlogits = moe__carve(base, &off, T, E, F);
    if (!l->ep) {
        w->ye = moe__carve(base, &off, T, E * O, F);
        w->dye = moe__carve(base, &off, T, E * O, F);
    } else {
        int64_t P = l->ep->size;
        w->tq = moe__carve(base, &off, P, 1, sizeof(int64_t));
        w->ry = moe__carve(base, &off, P * T, O, F);
        w->rdg = moe__carve(base, &off, T, E, F);
        w->rdx = moe__carve(base, &off, P * T, D, F);
    }
    return off;
}

static size_t dense_workspace_bytes(const moe_layer *l, int64_t B, int64_t N) {
    int64_t T = B * N;
    dense_ws w;
    return layout(l, T, NULL, &w);
}

/* Expert parallel: the tokens of every rank and the local experts' rows, in
 * l->ep_mem (grown with Ta). */
typedef struct {
    float *xa;   /* (Ta,D)    every rank's tokens, in rank order          */
    float *ga;   /* (Ta,E)    their gate probabilities                    */
    float *yea;  /* (Ta,El*O) the local experts' outputs                  */
    float *part; /* (Ta,O)    sum over the local experts of g * output    */
    float *dya;  /* (Ta,O)    every rank's dy                             */
    float *dyea; /* (Ta,El*O)                                             */
    float *dga;  /* (Ta,El)   dg of the local experts                     */
    float *dxa;  /* (Ta,D)    the local experts' part of dx               */
} dense_ep;

static size_t ep_layout(const moe_layer *l, int64_t Ta, char *base, dense_ep *b) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts, El = l->ep->e_count;
    size_t off = 0, F = sizeof(float);
    b->xa = moe__carve(base, &off, Ta, D, F);
    b->ga = moe__carve(base, &off, Ta, E, F);
    b->yea = moe__carve(base, &off, Ta, El * O, F);
    b->part = moe__carve(base, &off, Ta, O, F);
    b->dya = moe__carve(base, &off, Ta, O, F);
    b->dyea = moe__carve(base, &off, Ta, El * O, F);
    b->dga = moe__carve(base, &off, Ta, El, F);
    b->dxa = moe__carve(base, &off, Ta, D, F);
    return off;
}

/* Tokens of all ranks in the last forward (tq holds every rank's). */
static int64_t total_tokens(const moe_layer *l, const dense_ws *w) {
    int64_t Ta = 0;
    for (int q = 0; q < l->ep->size; q++) Ta += w->tq[q];
    return Ta;
}

typedef struct {
    float *W, *b, *Wg, *bg;
} dense_params;

static dense_params params_of(const moe_layer *l, float *mem) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts;
    int64_t El = l->ep ? l->ep->e_count : E;
    dense_params p;
    p.W = mem;
    p.b = p.W + El * O * D;
    p.Wg = p.b + El * O;
    p.bg = p.Wg + E * D;
    return p;
}

/* dst (T,W) = src[0] + src[1] + ... + src[P-1], each (T,W), in rank order. */
static void sum_partials(float *dst, const float *src, int P, int64_t T, int64_t W) {
    int64_t n = T * W;
    if (n == 0) return;
    memcpy(dst, src, (size_t)n * sizeof(float));
    for (int q = 1; q < P; q++) {
        const float *s = src + q * n;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) dst[i] += s[i];
    }
}

/* Expert parallel forward, after the local gate: every rank's tokens and
 * gates here, the local experts' gated sum back to the tokens' ranks, y the
 * sum of the partials. Collective. */
static moe_status ep_forward(moe_layer *l, const dense_ws *w, const dense_params *p, float *y, const float *x,
                             int64_t T) {
    moe_ep *ep = l->ep;
    int P = ep->size;
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts;
    int64_t El = ep->e_count, e0 = ep->e_first, ElO = El * O;
    int64_t ones[P], rc[P];
    for (int q = 0; q < P; q++) ones[q] = 1, rc[q] = T;
    moe_status st = moe_ep_allgatherv(ep, w->tq, ones, &T, 1, sizeof(int64_t));
    dense_ep b;
    if (st == MOE_OK) {
        size_t bytes = ep_layout(l, total_tokens(l, w), NULL, &b);
        st = bytes == SIZE_MAX ? moe_err(MOE_ERR_ARG, "expert-parallel rows too large") : moe__ep_reserve(l, bytes);
    }
    st = ep->agree(ep, st);
    if (st != MOE_OK) return st;
    int64_t Ta = total_tokens(l, w);
    ep_layout(l, Ta, (char *)l->ep_mem, &b);
    st = moe_ep_allgatherv(ep, b.xa, w->tq, x, T, (size_t)D * sizeof(float));
    if (st == MOE_OK) st = moe_ep_allgatherv(ep, b.ga, w->tq, w->g, T, (size_t)E * sizeof(float));
    if (st != MOE_OK) return st;
    /* the local experts in one GEMM: yea (Ta, El*O) = xa W^T + b; their gated sum */
    moe_sgemm(0, 1, Ta, ElO, D, 1.0f, b.xa, D, p->W, D, 0.0f, b.yea, ElO);
    moe_add_bias_rows(b.yea, p->b, Ta, ElO);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < Ta; t++) {
        float *pt = b.part + t * O;
        const float *gt = b.ga + t * E + e0, *r = b.yea + t * ElO;
        for (int64_t o = 0; o < O; o++) pt[o] = gt[0] * r[o];
        for (int64_t i = 1; i < El; i++)
            for (int64_t o = 0; o < O; o++) pt[o] += gt[i] * r[i * O + o];
    }
    /* rank q's rows of part to rank q; ry (P,T,O): every rank's partial of this rank's tokens */
    st = moe_ep_alltoallv(ep, w->ry, rc, b.part, w->tq, (size_t)O * sizeof(float));
    if (st != MOE_OK) return st;
    sum_partials(y, w->ry, P, T, O);
    return MOE_OK;
}

static moe_status dense_forward(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts, EO = E * O;
    dense_ws w;
    layout(l, T, l->ws, &w);
    dense_params p = params_of(l, l->wmem);

    if (l->keep && T) memcpy(w.x, x, (size_t)(T * D) * sizeof(float));
    moe_sgemm(0, 1, T, E, D, 1.0f, x, D, p.Wg, D, 0.0f, w.g, E);
    moe_add_bias_rows(w.g, p.bg, T, E);
    moe_softmax_rows(w.g, w.g, T, E);
    for (int64_t e = 0; e < E; e++) l->expert_counts[e] = T; /* this rank's tokens */
    l->assignments = T * E;
    l->dropped = 0;
    (void)aux;
    (void)train;
    if (l->ep) return ep_forward(l, &w, &p, y, x, T);
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
    return MOE_OK;
}

/* One process: dg (T,E) and the experts' gradients from dy. */
static void local_backward(moe_layer *l, const dense_ws *w, const dense_params *g, const float *dy, int64_t T) {
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts, EO = E * O;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *d = dy + t * O, *r = w->ye + t * EO;
        float *dr = w->dye + t * EO;
        for (int64_t e = 0; e < E; e++) {
            float ge = w->g[t * E + e], s = 0.0f;
            for (int64_t o = 0; o < O; o++) {
                s += d[o] * r[e * O + o];
                dr[e * O + o] = ge * d[o];
            }
            w->dg[t * E + e] = s;
        }
    }
    moe_sgemm(1, 0, EO, D, T, 1.0f, w->dye, EO, w->x, D, 1.0f, g->W, D);
    moe_colsum_acc(g->b, w->dye, T, EO);
}

/* Expert parallel: every rank's dy here; the local experts' gradients over
 * all tokens; their dg and partial dx back to the tokens' ranks, where dg
 * (T,E) is assembled (rank q's experts' columns from rank q) and the partial
 * dx land in rdx. Collective. */
static moe_status ep_backward(moe_layer *l, const dense_ws *w, const dense_params *p, const dense_params *g,
                              const float *dy, int64_t T) {
    moe_ep *ep = l->ep;
    int P = ep->size;
    int64_t D = l->cfg.input_dim, O = l->cfg.output_dim, E = l->cfg.num_experts;
    int64_t El = ep->e_count, e0 = ep->e_first, ElO = El * O, Ta = total_tokens(l, w);
    dense_ep b;
    ep_layout(l, Ta, (char *)l->ep_mem, &b);
    moe_status st = moe_ep_allgatherv(ep, b.dya, w->tq, dy, T, (size_t)O * sizeof(float));
    if (st != MOE_OK) return st;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < Ta; t++) {
        const float *d = b.dya + t * O, *r = b.yea + t * ElO, *gt = b.ga + t * E + e0;
        float *dr = b.dyea + t * ElO;
        for (int64_t i = 0; i < El; i++) {
            float s = 0.0f;
            for (int64_t o = 0; o < O; o++) {
                s += d[o] * r[i * O + o];
                dr[i * O + o] = gt[i] * d[o];
            }
            b.dga[t * El + i] = s;
        }
    }
    moe_sgemm(1, 0, ElO, D, Ta, 1.0f, b.dyea, ElO, b.xa, D, 1.0f, g->W, D);
    moe_colsum_acc(g->b, b.dyea, Ta, ElO);
    moe_sgemm(0, 0, Ta, D, ElO, 1.0f, b.dyea, ElO, p->W, D, 0.0f, b.dxa, D);
    int64_t rc[P];
    for (int q = 0; q < P; q++) rc[q] = T;
    st = moe_ep_alltoallv(ep, w->rdg, rc, b.dga, w->tq, (size_t)El * sizeof(float));
    if (st == MOE_OK) st = moe_ep_alltoallv(ep, w->rdx, rc, b.dxa, w->tq, (size_t)D * sizeof(float));
    if (st != MOE_OK) return st;
    /* rdg (P,T,El) -> dg (T,E) */
    for (int q = 0; q < P; q++)
        for (int64_t t = 0; t < T; t++)
            memcpy(w->dg + t * E + q * El, w->rdg + (q * T + t) * El, (size_t)El * sizeof(float));
    return MOE_OK;
}

static moe_status dense_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    int64_t D = l->cfg.input_dim, E = l->cfg.num_experts, EO = E * l->cfg.output_dim;
    int64_t T = l->T;
    dense_ws w;
    layout(l, T, l->ws, &w);
    dense_params p = params_of(l, l->wmem), g = params_of(l, l->gmem);

    if (l->ep) {
        moe_status st = ep_backward(l, &w, &p, &g, dy, T);
        if (st != MOE_OK) return st;
    } else {
        local_backward(l, &w, &g, dy, T);
    }
    moe_softmax_rows_backward(w.dlogits, w.g, w.dg, T, E);
    moe_sgemm(1, 0, E, D, T, 1.0f, w.dlogits, E, w.x, D, 1.0f, g.Wg, D);
    moe_colsum_acc(g.bg, w.dlogits, T, E);
    if (dx) {
        if (l->ep) sum_partials(dx, w.rdx, l->ep->size, T, D);
        else moe_sgemm(0, 0, T, D, EO, 1.0f, w.dye, EO, p.W, D, 0.0f, dx, D);
        moe_sgemm(0, 0, T, D, E, 1.0f, w.dlogits, E, p.Wg, D, 1.0f, dx, D);
    }
    (void)daux;
    return MOE_OK;
}

static int dense_probes(const moe_layer *l, int backward, moe_probe *pr) {
    int64_t O = l->cfg.output_dim, E = l->cfg.num_experts, T = l->T;
    dense_ws w;
    layout(l, T, l->ws, &w);
    /* the experts' rows: this rank's tokens, or (expert parallel) every rank's for the local experts */
    const float *ye = w.ye, *dye = w.dye;
    int64_t rows = T, cols = E * O;
    if (l->ep) {
        dense_ep b;
        rows = total_tokens(l, &w), cols = l->ep->e_count * O;
        ep_layout(l, rows, (char *)l->ep_mem, &b);
        ye = b.yea, dye = b.dyea;
    }
    int n = 0;
    if (!backward) {
        pr[n++] = (moe_probe){"gate probabilities", w.g, T, E};
        pr[n++] = (moe_probe){"expert outputs", ye, rows, cols};
    } else {
        pr[n++] = (moe_probe){"expert output gradients", dye, rows, cols};
        pr[n++] = (moe_probe){"gate probability gradients", w.dg, T, E};
        pr[n++] = (moe_probe){"gate logit gradients", w.dlogits, T, E};
    }
    return n;
}

static const moe_layer_ops dense_ops = {dense_workspace_bytes, dense_forward, dense_backward, dense_probes};

static moe_status dense_create(moe_layer *l) {
    const moe_config *c = &l->cfg;
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
    /* expert parallel: this rank's experts [e0, e0 + El) only, under their
     * global names, drawing the values one process draws for them */
    int64_t El = l->ep ? l->ep->e_count : E, e0 = l->ep ? l->ep->e_first : 0;
    int64_t o_W = 0, o_b = El * O * D, o_Wg = o_b + El * O, o_bg = o_Wg + E * D;
    char name[MOE_NAME_MAX];
    moe_status st = MOE_OK;
    l->next_init_id = 2 * e0;
    for (int64_t i = 0; i < El && st == MOE_OK; i++) {
        int64_t s_w[2] = {O, D}, s_b[1] = {O};
        snprintf(name, sizeof name, "experts.%lld.weight", (long long)(e0 + i));
        st = moe__layer_add_param(l, name, 2, s_w, o_W + i * O * D, D);
        snprintf(name, sizeof name, "experts.%lld.bias", (long long)(e0 + i));
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b, o_b + i * O, D);
    }
    l->next_init_id = 2 * E;
    int64_t s_wg[2] = {E, D}, s_bg[1] = {E};
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.weight", 2, s_wg, o_Wg, D);
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.bias", 1, s_bg, o_bg, D);
    if (st == MOE_OK) st = moe__layer_alloc(l, o_bg + E);
    return st;
}

const moe_layer_kind moe__kind_dense = {MOE_LAYER_DENSE, "dense", NULL, dense_create, 0, 0, NULL, NULL};
