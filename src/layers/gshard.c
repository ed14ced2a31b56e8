/*
 * Layers `gshard` and `hierarchical` (seeds 000/001: MoE with Top2Gating, and
 * the two-level MoE). Input x (B,N,D): B groups (sequences) of N tokens;
 * capacity and the balance loss are per group.
 * Dimension key: T = B*N tokens, D model dim, H expert hidden dim, E experts
 * (gshard), Eo outer and Ei inner experts (hierarchical), C capacity,
 * A1 rows kept by the first gate, A2 rows kept by the inner gate; expert
 * parallel: P ranks, El local (outer) experts, G groups of all ranks, Rr
 * rows received by the owner.
 *
 * gshard: top-2 gate (top2.c) -> gather the kept rows per expert -> one GEMM
 *   pair per expert over its rows -> weighted combine. Dropped tokens and
 *   empty capacity slots cost nothing (the seed runs its experts on zero
 *   rows, which give zero output since the experts have no bias).
 * hierarchical: the outer gate routes tokens to Eo capacity buffers; the
 *   rows of outer expert eo for sequence b form one inner segment whose
 *   nominal size is the outer capacity C (the seed's means and the inner
 *   capacity count empty slots too); importance of a row is 1 if its outer
 *   gate value is > 0.5, 0.5 if > 0, else 0. The inner gate (weights per eo)
 *   routes those rows to experts (eo, ei). Output: inner combine, then outer
 *   combine. Loss: (outer + inner) * loss_coef.
 *
 * Expert parallel (moe_mpi.h): rank r owns the experts [e0, e0 + El) (gshard)
 * or the outer experts [e0, e0 + El) with their inner gates and inner
 * experts (hierarchical); the (outer) gate is replicated and routes each
 * rank's own groups.
 *   gshard: kept rows -> their experts' owners (ep.h) -> experts -> back.
 *   hierarchical: the kept outer rows go to the owners of their outer
 *     experts with their importance; the rows per (outer expert, group)
 *     follow so the owner knows its inner segments (eo, b) over all G
 *     groups, s = i*G + b (i local, b global: the random policy draws what
 *     one process draws for segment eo*G + b). Inner gate, inner experts
 *     and inner combine run on the owner; the outer experts' outputs come
 *     back and the outer combine is local. Each inner segment's loss term
 *     goes back to its group's rank: a rank's aux is its own groups' (outer
 *     + inner) loss, what one process returns for those groups alone; in
 *     backward each rank's weight of its segments' terms goes to the owners
 *     (per segment, moe_top2.seg_w). The inner level's stats (expert_counts,
 *     its drops, assignments) are counted by the owner.
 *   Every rank's groups must have the same N (the inner capacity depends on
 *   it); a rank may have none. The hierarchical owner's side lives in
 *   gshard_ep.c; the types both files use in gshard.h.
 *
 * Parameters (one block; names and shapes are the seed module's state_dict;
 * expert parallel: the rank's slices El of dim 0 of the experts' tensors and
 * of gate_inner.w_gating):
 *   gshard:       gate.w_gating (D,E), experts.w1 (E,D,H), experts.w2 (E,H,D)
 *   hierarchical: gate_outer.w_gating (D,Eo), gate_inner.w_gating (Eo,D,Ei),
 *                 experts.w1 (Eo,Ei,D,H), experts.w2 (Eo,Ei,H,D)
 * Init as the seed: w_gating N(0,1); w1, w2 uniform(+-1/sqrt(last dim)).
 */
#include "gshard.h"
#include "ops.h"

#include <limits.h>
#include <math.h>
#include <string.h>

/* Carve r's R rows (and its exchange scratch when raw). */
void moe__gs_carve_rows(const moe_config *c, char *base, size_t *off, int64_t R, int64_t D, int64_t H, int raw,
                       gs_rows *r) {
    size_t F = sizeof(float);
    r->raw = raw ? moe__carve(base, off, R, D, F) : NULL;
    r->xe = moe__carve(base, off, R, D, F);
    r->hpre = moe__carve(base, off, R, H, F);
    r->ha = moe__carve(base, off, R, H, F);
    r->dha = moe__carve(base, off, R, H, F);
    r->ye = moe__carve(base, off, R, D, F);
    r->dye = moe__carve(base, off, R, D, F);
    r->dxe = moe__carve(base, off, R, D, F);
    moe_bank_carve_lowp(moe_bank_format_of(c->bf16), base, off, R, D, H, H, &r->lp);
}

static int is_hier(const moe_layer *l) { return l->cfg.type == MOE_LAYER_HIERARCHICAL; }

/* Most rows any mode can keep at a level: min(2 * rows in, experts * groups * capacity). */
static int64_t max_rows(int64_t rows_in, int64_t groups, int64_t Ng, int E, int n_sets, const moe_config *c) {
    int64_t ct = moe_top2_capacity(Ng, c->capacity_factor_train, E);
    int64_t ce = moe_top2_capacity(Ng, c->capacity_factor_eval, E);
    int64_t cap = ct > ce ? ct : ce;
    double bound = (double)E * (double)n_sets * (double)groups * (double)cap;
    return bound < (double)(2 * rows_in) ? (int64_t)bound : 2 * rows_in;
}

/* Outer capacity (the inner segments' nominal size) for this mode. */
int64_t moe__gs_outer_cap(const moe_layer *l, int64_t N, int train) {
    const moe_config *c = &l->cfg;
    return moe_top2_capacity(N, train ? c->capacity_factor_train : c->capacity_factor_eval, c->num_experts);
}

void moe__gs_carve_level(char *base, size_t *off, level_ws *v, int64_t R, int64_t A, int S, int E, int n_sets) {
    size_t F = sizeof(float), I = sizeof(int32_t), L = sizeof(int64_t);
    moe_top2 *g = &v->g;
    v->start = moe__carve(base, off, S, 1, L);
    v->len = moe__carve(base, off, S, 1, L);
    v->set = moe__carve(base, off, S, 1, I);
    v->p = moe__carve(base, off, R, E, F);
    v->dl = moe__carve(base, off, R, E, F);
    v->dgate = moe__carve(base, off, R, 2, F);
    g->idx = moe__carve(base, off, R, 2, I);
    g->gate = moe__carve(base, off, R, 2, F);
    g->pos = moe__carve(base, off, R, 2, I);
    g->counts = moe__carve(base, off, S, E, L);
    g->fill = moe__carve(base, off, S, E, I);
    g->density = moe__carve(base, off, S, E, F);
    g->proxy = moe__carve(base, off, S, E + 1, sizeof(double));
    g->cursor = moe__carve(base, off, n_sets, E, L);
    g->offsets = moe__carve(base, off, (int64_t)n_sets * E + 1, 1, L);
    g->src = moe__carve(base, off, A > 0 ? A : 1, 1, I);
    g->seg_start = v->start, g->seg_len = v->len, g->seg_set = v->set, g->raw = v->p;
    g->E = E, g->n_sets = n_sets, g->S = S;
}

/* Measure (base NULL) or carve the workspace for B groups of N tokens. */
static size_t layout(const moe_layer *l, int64_t B, int64_t N, char *base, gs_ws *w) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = gs_hidden(c), T = B * N;
    int E1 = c->num_experts, Ei = c->num_experts_inner;
    int64_t A1 = max_rows(T, B, N, E1, 1, c), Amax = A1;
    size_t off = 0, F = sizeof(float);
    memset(w, 0, sizeof *w);
    w->x = moe__carve(base, &off, T, D, F);
    moe__gs_carve_level(base, &off, &w->L1, T, A1, (int)B, E1, 1);
    if (is_hier(l) && l->ep) { /* the inner level runs on the owners (hier_ep) */
        int64_t P = l->ep->size;
        w->imp = moe__carve(base, &off, A1, 1, F);
        w->xo = moe__carve(base, &off, A1, D, F);
        w->yo = moe__carve(base, &off, A1, D, F);
        w->dyo = moe__carve(base, &off, A1, D, F);
        w->dxo = moe__carve(base, &off, A1, D, F);
        w->bn = moe__carve(base, &off, P, 2, sizeof(int64_t));
        w->ocount = moe__carve(base, &off, E1, 1, sizeof(int64_t));
        w->segsend = moe__carve(base, &off, E1, B, sizeof(int64_t));
        w->segterm = moe__carve(base, &off, E1, B, sizeof(double));
        w->wq = moe__carve(base, &off, P, 1, sizeof(double));
        return off;
    }
    if (is_hier(l)) {
        int64_t Cmax = moe_top2_capacity(N, fmax(c->capacity_factor_train, c->capacity_factor_eval), E1);
        int64_t A2 = max_rows(A1, B, Cmax, Ei, E1, c);
        if ((double)E1 * (double)B > INT_MAX) return SIZE_MAX;
        moe__gs_carve_level(base, &off, &w->L2, A1, A2, (int)(E1 * B), Ei, E1);
        w->imp = moe__carve(base, &off, A1, 1, F);
        w->xo = moe__carve(base, &off, A1, D, F);
        w->yo = moe__carve(base, &off, A1, D, F);
        w->dyo = moe__carve(base, &off, A1, D, F);
        w->dxo = moe__carve(base, &off, A1, D, F);
        Amax = A2;
    }
    moe__gs_carve_rows(c, base, &off, Amax, D, H, 0, &w->r);
    return off;
}

static size_t gs_workspace_bytes(const moe_layer *l, int64_t B, int64_t N) {
    gs_ws w;
    if ((double)B > INT_MAX) return SIZE_MAX;
    return layout(l, B, N, NULL, &w);
}

static gs_params params_of(const moe_layer *l, float *mem) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = gs_hidden(c), E1 = c->num_experts;
    int64_t Ei = is_hier(l) ? c->num_experts_inner : 1, El = l->ep ? l->ep->e_count : E1, nk = El * Ei;
    gs_params p;
    p.wg1 = mem;
    p.wg2 = is_hier(l) ? mem + D * E1 : NULL;
    p.w1 = mem + D * E1 + (is_hier(l) ? El * D * Ei : 0);
    p.w2 = p.w1 + nk * D * H;
    return p;
}

/* Expert parallel: the rows received from every rank, in l->ep_mem. */
static size_t ep_rows_layout(const moe_layer *l, int64_t R, char *base, gs_rows *r) {
    int64_t D = l->cfg.input_dim, H = gs_hidden(&l->cfg);
    size_t off = 0;
    moe__gs_carve_rows(&l->cfg, base, &off, R, D, H, 1, r);
    return off;
}

/* The bank of the nk experts of p (g: their gradients, or NULL) over rows w:
 * the seed's experts act(x @ w1) @ w2, weights (in, out), no biases. */
static moe_bank bank_of(const moe_layer *l, const gs_rows *w, const gs_params *p, const gs_params *g, int nk) {
    const moe_config *c = &l->cfg;
    moe_bank b = {p->w1, NULL, p->w2, NULL, g ? g->w1 : NULL, NULL, g ? g->w2 : NULL, NULL, c->input_dim,
                  gs_hidden(c), nk, 1, MOE_EXPERT_MLP, c->activation, c->leaky_slope, 0.0f, 0, NULL, NULL, NULL,
                  w->lp};
    moe__layer_bank(l, &b);
    return b;
}

void moe__gs_experts_forward(const moe_layer *l, const gs_rows *w, const gs_params *p, const int64_t *off, int nk) {
    moe_bank b = bank_of(l, w, p, NULL, nk);
    moe_bank_forward(&b, off, w->xe, w->hpre, w->ha, w->ye);
}

/* Returns 1 if an expert gradient holds a NaN or Inf. dha serves as dhpre
 * too (MLP experts: the activation's backward runs in place). */
int moe__gs_experts_backward(const moe_layer *l, const gs_rows *w, const gs_params *p, const gs_params *g,
                            const int64_t *off, int nk) {
    moe_bank b = bank_of(l, w, p, g, nk);
    return moe_bank_backward(&b, off, w->xe, w->hpre, w->ha, w->dye, w->dha, w->dha, w->dxe);
}

/* Expert parallel (gshard): the kept rows xe (A, D), in expert order, go to
 * their experts' owners; r gets the rows received. Collective. */
static moe_status ep_out(moe_layer *l, const float *xe, gs_rows *r) {
    moe_status st = moe_ep_counts(l->ep, &l->plan, l->expert_counts); /* the plan: allocated at create */
    if (st == MOE_OK) {
        size_t bytes = ep_rows_layout(l, l->plan.Rr, NULL, r);
        st = bytes == SIZE_MAX ? moe_err(MOE_ERR_ARG, "expert-parallel rows too large") : moe__ep_reserve(l, bytes);
    }
    st = l->ep->agree(l->ep, st);
    if (st != MOE_OK) return st;
    ep_rows_layout(l, l->plan.Rr, (char *)l->ep_mem, r);
    return moe_ep_rows_out(l->ep, &l->plan, r->xe, r->raw, xe, l->cfg.input_dim);
}

/* Gate settings of this mode into a level. */
void moe__gs_set_mode(moe_top2 *g, const moe_config *c, int train) {
    g->policy = train ? c->second_policy_train : c->second_policy_eval;
    g->threshold = train ? c->second_threshold_train : c->second_threshold_eval;
    g->capacity_factor = train ? c->capacity_factor_train : c->capacity_factor_eval;
}

/* Importance of each outer row from the gate value that filled it. */
static void outer_importance(gs_ws *w, int64_t T) {
    const moe_top2 *g1 = &w->L1.g;
    for (int64_t t = 0; t < 2 * T; t++) {
        int32_t r = g1->pos[t];
        if (r >= 0) w->imp[r] = 0.5f * ((g1->gate[t] > 0.5f) + (g1->gate[t] > 0.0f));
    }
}

static moe_status gs_forward(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, B = l->B, N = l->N;
    int E1 = c->num_experts, Ei = c->num_experts_inner, hier = is_hier(l);
    gs_ws w;
    layout(l, B, N, l->ws, &w);
    gs_params p = params_of(l, l->wmem);
    uint64_t stream = moe_rng_u64(c->seed, 0x3000000ull + 2 * l->forward_calls);

    /* first gate over the tokens: one segment per sequence */
    if (l->keep && T) memcpy(w.x, x, (size_t)(T * D) * sizeof(float));
    moe_sgemm(0, 0, T, E1, D, 1.0f, x, D, p.wg1, E1, 0.0f, w.L1.p, E1);
    moe_softmax_rows(w.L1.p, w.L1.p, T, E1);
    moe_top2 *g1 = &w.L1.g;
    for (int64_t b = 0; b < B; b++) w.L1.start[b] = b * N, w.L1.len[b] = N, w.L1.set[b] = 0;
    g1->R = T, g1->Ng = N, g1->imp = NULL, g1->rng_stream = stream, g1->seg0 = l->g0;
    g1->expert_counts = hier ? NULL : l->expert_counts;
    moe__gs_set_mode(g1, c, train);
    moe_top2_forward(g1);
    double loss = g1->loss;
    l->dropped = g1->dropped, l->second_candidates = g1->cand2, l->second_kept = g1->kept2;

    if (!hier) {
        moe_gather_rows(w.r.xe, x, g1->src, g1->A, D);
        gs_rows r = w.r;
        if (l->ep) { /* exchange out, the local experts, exchange back */
            moe_status st = ep_out(l, w.r.xe, &r);
            if (st != MOE_OK) return st;
            moe__gs_experts_forward(l, &r, &p, l->plan.bank_off, l->ep->e_count);
            if ((st = moe_ep_rows_back(l->ep, &l->plan, w.r.ye, r.ye, r.raw, D)) != MOE_OK) return st;
        } else {
            moe__gs_experts_forward(l, &r, &p, g1->offsets, E1);
        }
        moe_combine(y, w.r.ye, g1->gate, g1->pos, T, 2, D);
        l->assignments = g1->A;
    } else if (l->ep) {
        moe_gather_rows(w.xo, x, g1->src, g1->A, D);
        outer_importance(&w, T);
        moe_status st = moe__gs_hier_ep_forward(l, &w, &p, stream, train, &loss);
        if (st != MOE_OK) return st;
        moe_combine(y, w.yo, g1->gate, g1->pos, T, 2, D);
    } else {
        int64_t A1 = g1->A, C = moe__gs_outer_cap(l, N, train);
        moe_gather_rows(w.xo, x, g1->src, A1, D);
        outer_importance(&w, T);
        /* inner segments: the rows of (eo, b), in outer-buffer order */
        for (int eo = 0; eo < E1; eo++) {
            int64_t start = g1->offsets[eo];
            for (int64_t b = 0; b < B; b++) {
                int64_t s = eo * B + b;
                w.L2.start[s] = start;
                w.L2.len[s] = g1->counts[b * E1 + eo];
                w.L2.set[s] = eo;
                start += w.L2.len[s];
            }
        }
        for (int eo = 0; eo < E1; eo++) {
            int64_t r0 = g1->offsets[eo], n = g1->offsets[eo + 1] - r0;
            if (n) moe_sgemm(0, 0, n, Ei, D, 1.0f, w.xo + r0 * D, D, p.wg2 + (int64_t)eo * D * Ei, Ei, 0.0f,
                             w.L2.p + r0 * Ei, Ei);
        }
        moe_softmax_rows(w.L2.p, w.L2.p, A1, Ei);
        moe_top2 *g2 = &w.L2.g;
        g2->R = A1, g2->Ng = C, g2->imp = w.imp, g2->rng_stream = stream + 1, g2->seg0 = 0;
        g2->expert_counts = l->expert_counts;
        moe__gs_set_mode(g2, c, train);
        moe_top2_forward(g2);
        loss += g2->loss;
        l->dropped += g2->dropped, l->second_candidates += g2->cand2, l->second_kept += g2->kept2;
        moe_gather_rows(w.r.xe, w.xo, g2->src, g2->A, D);
        gs_rows r = w.r;
        moe__gs_experts_forward(l, &r, &p, g2->offsets, E1 * Ei);
        moe_combine(w.yo, w.r.ye, g2->gate, g2->pos, A1, 2, D);
        moe_combine(y, w.yo, g1->gate, g1->pos, T, 2, D);
        l->assignments = g2->A;
    }
    if (aux) *aux = (float)(loss * c->loss_coef);
    return MOE_OK;
}

static moe_status gs_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, T = l->T;
    int E1 = c->num_experts, Ei = c->num_experts_inner;
    gs_ws w;
    layout(l, l->B, l->N, l->ws, &w);
    gs_params p = params_of(l, l->wmem), g = params_of(l, l->gmem);
    moe_top2 *g1 = &w.L1.g;
    float dloss = (float)((double)daux * c->loss_coef);
    /* the routing of the forward is in the workspace; restore the pointers' sizes */
    g1->R = T, g1->Ng = l->N, g1->imp = NULL;

    if (!is_hier(l)) {
        moe_combine_backward(w.r.dye, w.L1.dgate, dy, w.r.ye, g1->gate, g1->pos, T, 2, D);
        gs_rows r = w.r;
        if (l->ep) { /* output gradients to the owners, input gradients back */
            ep_rows_layout(l, l->plan.Rr, (char *)l->ep_mem, &r);
            moe_status st = moe_ep_rows_out(l->ep, &l->plan, r.dye, r.raw, w.r.dye, D);
            if (st != MOE_OK) return st;
            l->grad_bad = moe__gs_experts_backward(l, &r, &p, &g, l->plan.bank_off, l->ep->e_count);
            if ((st = moe_ep_rows_back(l->ep, &l->plan, w.r.dxe, r.dxe, r.raw, D)) != MOE_OK) return st;
        } else {
            l->grad_bad = moe__gs_experts_backward(l, &r, &p, &g, g1->offsets, E1);
        }
    } else if (l->ep) {
        moe_combine_backward(w.dyo, w.L1.dgate, dy, w.yo, g1->gate, g1->pos, T, 2, D);
        moe_status st = moe__gs_hier_ep_backward(l, &w, &p, &g, dloss);
        if (st != MOE_OK) return st;
    } else {
        moe_top2 *g2 = &w.L2.g;
        int64_t A1 = g1->offsets[E1];
        g2->R = A1, g2->Ng = moe__gs_outer_cap(l, l->N, l->cached_train), g2->imp = w.imp;
        moe_combine_backward(w.dyo, w.L1.dgate, dy, w.yo, g1->gate, g1->pos, T, 2, D);
        moe_combine_backward(w.r.dye, w.L2.dgate, w.dyo, w.r.ye, g2->gate, g2->pos, A1, 2, D);
        gs_rows r = w.r;
        l->grad_bad = moe__gs_experts_backward(l, &r, &p, &g, g2->offsets, E1 * Ei);
        memset(w.dxo, 0, (size_t)(A1 * D) * sizeof(float));
        moe_scatter_add(w.dxo, w.r.dxe, g2->pos, A1, 2, D);
        moe_top2_backward(g2, w.L2.dl, w.L2.dgate, dloss);
        for (int eo = 0; eo < E1; eo++) {
            int64_t r0 = g1->offsets[eo], n = g1->offsets[eo + 1] - r0;
            if (n == 0) continue;
            float *gw = g.wg2 + (int64_t)eo * D * Ei;
            const float *pw = p.wg2 + (int64_t)eo * D * Ei;
            /* dWg_in[eo] (D,Ei) += xo^T dl ; dxo += dl Wg_in[eo]^T */
            moe_sgemm(1, 0, D, Ei, n, 1.0f, w.xo + r0 * D, D, w.L2.dl + r0 * Ei, Ei, 1.0f, gw, Ei);
            moe_sgemm(0, 1, n, D, Ei, 1.0f, w.L2.dl + r0 * Ei, Ei, pw, Ei, 1.0f, w.dxo + r0 * D, D);
        }
    }
    moe_top2_backward(g1, w.L1.dl, w.L1.dgate, dloss);
    moe_sgemm(1, 0, D, E1, T, 1.0f, w.x, D, w.L1.dl, E1, 1.0f, g.wg1, E1);
    if (dx) {
        moe_sgemm(0, 1, T, D, E1, 1.0f, w.L1.dl, E1, p.wg1, E1, 0.0f, dx, D);
        moe_scatter_add(dx, is_hier(l) ? w.dxo : w.r.dxe, g1->pos, T, 2, D);
    }
    return MOE_OK;
}

static int gs_probes(const moe_layer *l, int backward, moe_probe *pr) {
    const moe_config *c = &l->cfg;
    int64_t T = l->T, D = c->input_dim, H = gs_hidden(c), E1 = c->num_experts, Ei = c->num_experts_inner;
    gs_ws w;
    layout(l, l->B, l->N, l->ws, &w);
    int hier = is_hier(l);
    /* the inner level (R2 rows) and the experts' rows (A): the workspace's, or
     * expert parallel the rows this rank's experts ran (l->ep_mem) */
    level_ws L2 = w.L2;
    gs_rows r = w.r;
    int64_t A1 = w.L1.g.offsets[E1], R2 = A1, A = hier && !l->ep ? w.L2.g.offsets[E1 * Ei] : A1;
    if (l->ep && hier) {
        hier_ep h;
        int64_t G, N;
        moe__gs_hier_ep_of(l, &w, &h, &G, &N);
        L2 = h.L2, r = h.r, R2 = l->plan.Rr, A = h.L2.g.offsets[l->ep->e_count * Ei];
    } else if (l->ep) {
        ep_rows_layout(l, l->plan.Rr, (char *)l->ep_mem, &r);
        A = l->plan.Rr;
    }
    int n = 0;
    if (!backward) {
        pr[n++] = (moe_probe){"gate probabilities", w.L1.p, T, E1};
        pr[n++] = (moe_probe){"gate values", w.L1.g.gate, T, 2};
        if (hier) {
            pr[n++] = (moe_probe){"inner gate probabilities", L2.p, R2, Ei};
            pr[n++] = (moe_probe){"inner gate values", L2.g.gate, R2, 2};
        }
        pr[n++] = (moe_probe){"expert pre-activations", r.hpre, A, H};
        pr[n++] = (moe_probe){"expert activations", r.ha, A, H};
        pr[n++] = (moe_probe){"expert outputs", r.ye, A, D};
        if (hier) pr[n++] = (moe_probe){"outer expert outputs", w.yo, A1, D};
    } else {
        if (hier) pr[n++] = (moe_probe){"outer expert output gradients", w.dyo, A1, D};
        pr[n++] = (moe_probe){"expert output gradients", r.dye, A, D};
        pr[n++] = (moe_probe){"expert pre-activation gradients", r.dha, A, H};
        pr[n++] = (moe_probe){"expert input gradients", r.dxe, A, D};
        if (hier) {
            pr[n++] = (moe_probe){"inner gate logit gradients", L2.dl, R2, Ei};
            pr[n++] = (moe_probe){"outer expert input gradients", w.dxo, A1, D};
        }
        pr[n++] = (moe_probe){"gate logit gradients", w.L1.dl, T, E1};
    }
    return n;
}

static const moe_layer_ops gs_ops = {gs_workspace_bytes, gs_forward, gs_backward, gs_probes};

static moe_status check_gate_config(const moe_config *c) {
    const char *pol[2] = {moe_second_policy_name(c->second_policy_train), moe_second_policy_name(c->second_policy_eval)};
    if (!pol[0] || !pol[1])
        return moe_err(MOE_ERR_ARG, "unknown second_policy_%s %d (known: all, none, threshold, random)",
                       pol[0] ? "eval" : "train", pol[0] ? (int)c->second_policy_eval : (int)c->second_policy_train);
    if (!(c->capacity_factor_train > 0 && isfinite(c->capacity_factor_train)))
        return moe_err(MOE_ERR_ARG, "capacity_factor_train must be a finite number > 0, got %g", c->capacity_factor_train);
    if (!(c->capacity_factor_eval > 0 && isfinite(c->capacity_factor_eval)))
        return moe_err(MOE_ERR_ARG, "capacity_factor_eval must be a finite number > 0, got %g", c->capacity_factor_eval);
    if (!(c->second_threshold_train >= 0 && isfinite(c->second_threshold_train)))
        return moe_err(MOE_ERR_ARG, "second_threshold_train must be a finite number >= 0, got %g",
                       c->second_threshold_train);
    if (!(c->second_threshold_eval >= 0 && isfinite(c->second_threshold_eval)))
        return moe_err(MOE_ERR_ARG, "second_threshold_eval must be a finite number >= 0, got %g",
                       c->second_threshold_eval);
    if (!isfinite(c->loss_coef)) return moe_err(MOE_ERR_ARG, "loss_coef must be finite, got %g", c->loss_coef);
    if (!moe_activation_name(c->activation))
        return moe_err(MOE_ERR_ARG, "unknown activation %d", (int)c->activation);
    if (c->expert != MOE_EXPERT_MLP)
        return moe_err(MOE_ERR_UNSUPPORTED, "%s experts are 2-layer MLPs; GLU experts (%s) are a topk option",
                       moe_layer_type_name(c->type), moe_expert_kind_name(c->expert) ? moe_expert_kind_name(c->expert) : "?");
    return MOE_OK;
}

static moe_status gs_create(moe_layer *l) {
    const moe_config *c = &l->cfg;
    int hier = is_hier(l);
    if (hier) {
        if (c->num_experts_inner < 1 || c->num_experts_inner > 65536)
            return moe_err(MOE_ERR_ARG, "hierarchical: num_experts_inner must be in [1, 65536], got %d",
                           c->num_experts_inner);
        l->n_expert_counts = c->num_experts * c->num_experts_inner;
    }
    moe_status st = check_gate_config(c);
    if (st != MOE_OK) return st;
    int64_t D = c->input_dim, H = gs_hidden(c), E1 = c->num_experts, Ei = hier ? c->num_experts_inner : 1;
    if (H < 1 || H > INT_MAX / 4)
        return moe_err(MOE_ERR_ARG, "hidden_dim must be in [1, %d], got %lld", INT_MAX / 4, (long long)H);
    /* parameter count, overflow-checked: D*E1 + E1*D*Ei (hier) + 2*E1*Ei*D*H */
    double total = (double)D * E1 + (hier ? (double)E1 * D * Ei : 0) + 2.0 * E1 * Ei * D * H;
    if (total > (double)(INT64_MAX / 8) || total > 1e12)
        return moe_err(MOE_ERR_ARG, "layer too large: D=%lld H=%lld experts=%lld", (long long)D, (long long)H,
                       (long long)(E1 * Ei));
    l->ops = &gs_ops;
    l->in_dim = l->out_dim = D;
    l->has_aux = 1;
    int64_t o = 0;
    if (!hier) {
        /* expert parallel: this rank's slice [e_first, e_first + El) of the
         * experts' tensors, drawing the values one process draws for it */
        int64_t El = l->ep ? l->ep->e_count : E1, e0 = l->ep ? l->ep->e_first : 0;
        int64_t s_g[2] = {D, E1}, s_w1[3] = {El, D, H}, s_w2[3] = {El, H, D};
        st = moe__layer_add_param(l, "gate.w_gating", 2, s_g, o, 0);
        o += D * E1;
        if (st == MOE_OK) st = moe__layer_add_param(l, "experts.w1", 3, s_w1, o, H);
        l->init_skip[1] = e0 * D * H, l->global_dim0[1] = l->ep ? E1 : 0;
        o += El * D * H;
        if (st == MOE_OK) st = moe__layer_add_param(l, "experts.w2", 3, s_w2, o, D);
        l->init_skip[2] = e0 * H * D, l->global_dim0[2] = l->ep ? E1 : 0;
        o += El * H * D;
    } else {
        /* expert parallel: this rank's outer experts [e0, e0 + El): their
         * slices of the inner gates and the inner experts */
        int64_t El = l->ep ? l->ep->e_count : E1, e0 = l->ep ? l->ep->e_first : 0, g = l->ep ? E1 : 0;
        int64_t s_go[2] = {D, E1}, s_gi[3] = {El, D, Ei}, s_w1[4] = {El, Ei, D, H}, s_w2[4] = {El, Ei, H, D};
        st = moe__layer_add_param(l, "gate_outer.w_gating", 2, s_go, o, 0);
        o += D * E1;
        if (st == MOE_OK) st = moe__layer_add_param(l, "gate_inner.w_gating", 3, s_gi, o, 0);
        l->init_skip[1] = e0 * D * Ei, l->global_dim0[1] = g;
        o += El * D * Ei;
        if (st == MOE_OK) st = moe__layer_add_param(l, "experts.w1", 4, s_w1, o, H);
        l->init_skip[2] = e0 * Ei * D * H, l->global_dim0[2] = g;
        o += El * Ei * D * H;
        if (st == MOE_OK) st = moe__layer_add_param(l, "experts.w2", 4, s_w2, o, D);
        l->init_skip[3] = e0 * Ei * H * D, l->global_dim0[3] = g;
        o += El * Ei * H * D;
    }
    if (st == MOE_OK) st = moe__layer_alloc(l, o);
    /* experts.w1, w2: checked in their tasks */
    l->grad_hi = o, l->grad_lo = o - 2 * (l->ep ? l->ep->e_count : E1) * Ei * D * H;
    /* expert parallel: the exchange plan, allocated here where every rank's failure is agreed */
    if (st == MOE_OK && l->ep) st = moe_ep_plan_alloc(&l->plan, l->ep->size, l->ep->e_count);
    return st;
}

/* Routing for tests: level 1 choices and rows, then (hierarchical) the rows
 * kept at level 1 and level 2's choices and rows. */
static int64_t gs_routing(const moe_layer *l, int32_t *dst, int64_t cap) {
    gs_ws w;
    layout(l, l->B, l->N, l->ws, &w);
    int64_t T = l->T, n = 0;
    const int32_t *parts[4] = {w.L1.g.idx, w.L1.g.pos, NULL, NULL};
    int64_t lens[4] = {2 * T, 2 * T, 0, 0};
    if (is_hier(l) && l->ep) { /* level 2: the rows this rank's outer experts received */
        hier_ep h;
        int64_t G, N;
        moe__gs_hier_ep_of(l, &w, &h, &G, &N);
        parts[2] = h.L2.g.idx, parts[3] = h.L2.g.pos, lens[2] = lens[3] = 2 * l->plan.Rr;
    } else if (is_hier(l)) {
        int64_t A1 = w.L1.g.offsets[l->cfg.num_experts];
        parts[2] = w.L2.g.idx, parts[3] = w.L2.g.pos, lens[2] = lens[3] = 2 * A1;
    }
    for (int i = 0; i < 4; i++)
        for (int64_t j = 0; j < lens[i]; j++, n++)
            if (dst && n < cap) dst[n] = parts[i][j];
    return n;
}

static void gshard_defaults(moe_config *c) {
    c->num_experts = 16;
    c->hidden_dim = 0; /* 4 * input_dim */
}

static void hier_defaults(moe_config *c) {
    c->num_experts = 4;
    c->num_experts_inner = 4;
    c->hidden_dim = 0;
}

/* rows per token in the widest routed buffer: two choices per level */
static int gshard_rows(const moe_layer *l) { return 2; }
static int hier_rows(const moe_layer *l) { return 4; }

const moe_layer_kind moe__kind_gshard = {MOE_LAYER_GSHARD, "gshard", gshard_defaults, gs_create, 1, 0, gshard_rows,
                                         gs_routing};
const moe_layer_kind moe__kind_hierarchical = {MOE_LAYER_HIERARCHICAL, "hierarchical", hier_defaults, gs_create, 1,
                                               0, hier_rows, gs_routing};
