/*
 * Layer `topk`: the token-choice MoE layer and its router options (router.c).
 * Seed 004 SimpleMoE by default: gate Linear(D,E) with bias, the K largest
 * logits per token, softmax over those K, and K of E expert MLPs per token:
 * Linear(D,H) -> act -> Linear(H,D), or a GLU expert Linear(D,2H) -> a*f(g)
 * -> Linear(H,D). Options: softmax or sigmoid scoring, renormalisation, route
 * scale, capacity, jitter, balance loss, z-loss, shared experts (optionally
 * gated), selection bias with aux-loss-free updates, group-limited routing,
 * expert choice, and runtime K / expert mask / forced experts.
 * Sparse, index-based dispatch: each expert's GEMMs see only its routed rows.
 * Shared experts are experts E..E+Ns-1 of the same bank, assigned to every
 * token in slots K..K+Ns-1, so dispatch, combine and backward are shared.
 * Dimension key: T = B*N tokens, D model dim, H expert hidden dim, H2 = H
 * (MLP) or 2H (GLU), E routed experts, Ns shared experts, Et = E + Ns,
 * K picks per token, Kr routed slots (K, or E for expert choice),
 * Ks = Kr + Ns slots per token, A expert rows, G expert groups.
 *
 * Parameters live in one block, grouped for one GEMM per expert:
 *   W1 (Et,H2,D)  b1 (Et,H2)  W2 (Et,D,H)  b2 (Et,D)  Wg (E,D)  bg (E)  Gs (Ns,D)
 * and the table names them as the state_dict does:
 *   experts.{e}.net.0.weight (H2,D), .net.0.bias (H2), .net.2.weight (D,H),
 *   .net.2.bias (D), gate.weight (E,D), gate.bias (E),
 *   shared_experts.{i}.net.0.weight ... (as experts), shared_gate.weight (Ns,D);
 * buffer gate.e_score_correction_bias (E) with expert_bias.
 */
#include "bank.h"
#include "layer_internal.h"
#include "ops.h"
#include "router.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    float *x;       /* (T,D)   copy of the input                          */
    float *xg;      /* (T,D)   gate input: x, or x * noise with jitter     */
    float *noise;   /* (T,D)   jitter multipliers (jitter > 0)            */
    float *z, *p, *dp, *dz; /* (T,E) logits, probabilities, their grads  */
    float *lse;     /* (T)                                               */
    float *gscore;  /* (T,G)                                             */
    uint8_t *gkeep; /* (T,G)                                             */
    uint8_t *taken; /* (T,E)                                             */
    moe_ec_pair *pairs; /* (E,N)                                         */
    int64_t *fill, *load, *counts; /* (E), (B,E), (Et)                   */
    double *psum;   /* (E)                                               */
    float *sg, *dsg; /* (T,Ns) sigmoid of the shared gate logits; grad  */
    float *w, *dw;  /* (T,Ks)                                            */
    int32_t *idx, *pos; /* (T,Ks)                                        */
    int32_t *slot;  /* (A)     token of each row                         */
    int64_t *offsets; /* (Et+1)                                          */
    float *xe, *hpre, *ha, *ye, *dye, *dha, *dhpre, *dxe; /* (A, D|H|H2) */
    moe_bank_lowp lp; /* the bank format's copies of the rows (A rows; none for fp32) */
} topk_ws;

static int is_glu(const moe_config *c) { return c->expert != MOE_EXPERT_MLP; }
static int is_ec(const moe_config *c) { return c->router == MOE_ROUTER_EXPERT_CHOICE; }
static int eff_k(const moe_layer *l) { return l->rt_k ? l->rt_k : l->cfg.top_k; }
static int groups(const moe_config *c) { return c->num_groups > 1 ? c->num_groups : 1; }

int moe__topk_slots(const moe_layer *l) {
    return (is_ec(&l->cfg) ? l->cfg.num_experts : eff_k(l)) + l->cfg.num_shared;
}

/* Most expert rows a forward of B groups of N tokens can have. */
static int64_t max_rows(const moe_layer *l, int64_t B, int64_t N) {
    const moe_config *c = &l->cfg;
    int64_t T = B * N, routed = T * (is_ec(c) ? c->num_experts : eff_k(l));
    if (is_ec(c)) {
        double cf = fmax(c->capacity_factor_train, c->capacity_factor_eval);
        int64_t C = moe_router_capacity(cf, N, 1, c->num_experts, 1), bound = B * C * c->num_experts;
        routed = bound < routed ? bound : routed;
    }
    return routed + T * c->num_shared;
}

/* Measure (base NULL) or carve the workspace for B groups of N tokens. */
static size_t layout(const moe_layer *l, int64_t B, int64_t N, char *base, topk_ws *w) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H, E = c->num_experts;
    int64_t T = B * N, Ns = c->num_shared, Et = E + Ns, Ks = moe__topk_slots(l), A = max_rows(l, B, N);
    int64_t G = groups(c), J = c->jitter > 0 ? T : 0;
    size_t off = 0, F = sizeof(float), I = sizeof(int32_t), L = sizeof(int64_t);
    w->x = moe__carve(base, &off, T, D, F);
    w->xg = c->jitter > 0 ? moe__carve(base, &off, J, D, F) : w->x;
    w->noise = moe__carve(base, &off, J, D, F);
    w->z = moe__carve(base, &off, T, E, F);
    w->p = moe__carve(base, &off, T, E, F);
    w->dp = moe__carve(base, &off, T, E, F);
    w->dz = moe__carve(base, &off, T, E, F);
    w->lse = moe__carve(base, &off, T, 1, F);
    w->gscore = moe__carve(base, &off, T, G, F);
    w->gkeep = moe__carve(base, &off, T, G, 1);
    w->taken = moe__carve(base, &off, T, E, 1);
    w->pairs = moe__carve(base, &off, is_ec(c) ? E : 0, N, sizeof(moe_ec_pair));
    w->fill = moe__carve(base, &off, E, 1, L);
    w->load = moe__carve(base, &off, B, E, L);
    w->counts = moe__carve(base, &off, Et, 1, L);
    w->psum = moe__carve(base, &off, E, 1, sizeof(double));
    w->sg = moe__carve(base, &off, T, Ns, F);
    w->dsg = moe__carve(base, &off, T, Ns, F);
    w->w = moe__carve(base, &off, T, Ks, F);
    w->dw = moe__carve(base, &off, T, Ks, F);
    w->idx = moe__carve(base, &off, T, Ks, I);
    w->pos = moe__carve(base, &off, T, Ks, I);
    w->slot = moe__carve(base, &off, A, 1, I);
    w->offsets = moe__carve(base, &off, Et + 1, 1, L);
    w->xe = moe__carve(base, &off, A, D, F);
    w->hpre = moe__carve(base, &off, A, H2, F);
    w->ha = moe__carve(base, &off, A, H, F);
    w->ye = moe__carve(base, &off, A, D, F);
    w->dye = moe__carve(base, &off, A, D, F);
    w->dha = moe__carve(base, &off, A, H, F);
    w->dhpre = moe__carve(base, &off, A, H2, F);
    w->dxe = moe__carve(base, &off, A, D, F);
    moe_bank_carve_lowp(moe_bank_format_of(c->bf16), base, &off, A, D, H, H2, &w->lp);
    return off;
}

static size_t topk_workspace_bytes(const moe_layer *l, int64_t B, int64_t N) {
    topk_ws w;
    return layout(l, B, N, NULL, &w);
}

/* Parameter block: offsets (in floats) of W1, b1, W2, b2, Wg, bg, Gs, and the end. */
enum { P_W1, P_B1, P_W2, P_B2, P_WG, P_BG, P_GS, P_END };
/* Experts of this rank's bank: the routed ones it owns (all E in one
 * process), then the Ns shared ones (replicated on every rank). */
static int64_t routed_local(const moe_layer *l) { return l->ep ? l->ep->e_count : l->cfg.num_experts; }

static void param_offsets(const moe_layer *l, int64_t o[P_END + 1]) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H, E = c->num_experts;
    int64_t Et = routed_local(l) + c->num_shared;
    o[P_W1] = 0;
    o[P_B1] = o[P_W1] + Et * H2 * D;
    o[P_W2] = o[P_B1] + Et * H2;
    o[P_B2] = o[P_W2] + Et * D * H;
    o[P_WG] = o[P_B2] + Et * D;
    o[P_BG] = o[P_WG] + E * D;
    o[P_GS] = o[P_BG] + E;
    o[P_END] = o[P_GS] + (c->shared_gate ? c->num_shared * D : 0);
}

typedef struct {
    float *W1, *b1, *W2, *b2, *Wg, *bg, *Gs;
} topk_params;

static topk_params params_of(const moe_layer *l, float *mem) {
    int64_t o[P_END + 1];
    param_offsets(l, o);
    topk_params p = {mem + o[P_W1], mem + o[P_B1], mem + o[P_W2], mem + o[P_B2],
                     mem + o[P_WG], mem + o[P_BG], mem + o[P_GS]};
    return p;
}

/* The expert bank (routed and shared) over parameters p and gradients g. */
/* The expert bank of this rank (its parameters, the layer's format) over rows b. */
static moe_bank bank_params(const moe_layer *l, topk_params p, topk_params g, const moe_bank_lowp *lp) {
    const moe_config *c = &l->cfg;
    moe_bank f = {p.W1, p.b1, p.W2, p.b2, g.W1, g.b1, g.W2, g.b2, c->input_dim, c->hidden_dim,
                  (int)routed_local(l) + c->num_shared, 0, c->expert, c->activation, c->leaky_slope, 0.0f, 0,
                  NULL, NULL, NULL, *lp};
    moe__layer_bank(l, &f);
    return f;
}

/* The rows the bank runs and their activations: in one process this rank's
 * own rows (the workspace's); expert parallel, the rows received from every
 * rank for the local experts (Rr), then the local shared-expert rows (Ts),
 * in l->ep_mem. */
typedef struct {
    float *x, *hpre, *ha, *y, *dy, *dha, *dhpre, *dx; /* (Rb, D|H2|H)              */
    float *raw;                                      /* (Rr, D) exchange scratch  */
    int64_t *off;                                    /* (El + Ns + 1)             */
    moe_bank_lowp lp;                                /* (Rb rows) the format's copies */
} topk_bank;

static size_t bank_layout(const moe_layer *l, int64_t Rr, int64_t Rb, char *base, topk_bank *b) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H;
    size_t off = 0, F = sizeof(float);
    b->off = moe__carve(base, &off, routed_local(l) + c->num_shared + 1, 1, sizeof(int64_t));
    b->raw = moe__carve(base, &off, Rr, D, F);
    b->x = moe__carve(base, &off, Rb, D, F);
    b->hpre = moe__carve(base, &off, Rb, H2, F);
    b->ha = moe__carve(base, &off, Rb, H, F);
    b->y = moe__carve(base, &off, Rb, D, F);
    b->dy = moe__carve(base, &off, Rb, D, F);
    b->dha = moe__carve(base, &off, Rb, H, F);
    b->dhpre = moe__carve(base, &off, Rb, H2, F);
    b->dx = moe__carve(base, &off, Rb, D, F);
    moe_bank_carve_lowp(moe_bank_format_of(c->bf16), base, &off, Rb, D, H, H2, &b->lp);
    return off;
}

/* The bank of the current forward (after its exchange plan is set). */
static void bank_of(const moe_layer *l, const topk_ws *w, topk_bank *b) {
    if (!l->ep) {
        *b = (topk_bank){w->xe,  w->hpre,    w->ha,  w->ye,  w->dye, w->dha, w->dhpre, w->dxe,
                         NULL,   w->offsets, w->lp};
        return;
    }
    int64_t E = l->cfg.num_experts, Ts = w->offsets[E + l->cfg.num_shared] - w->offsets[E];
    bank_layout(l, l->plan.Rr, l->plan.Rr + Ts, (char *)l->ep_mem, b);
}

/* Expert parallel, forward: the routed rows of xe go to their experts'
 * owners; the bank gets the rows received plus this rank's shared rows.
 * Collective. */
static moe_status ep_out(moe_layer *l, const topk_ws *w, topk_bank *b) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, E = c->num_experts, Ns = c->num_shared, El = routed_local(l);
    int64_t Rs = w->offsets[E], Ts = w->offsets[E + Ns] - Rs;
    moe_status st = moe_ep_counts(l->ep, &l->plan, w->counts); /* the plan is allocated at create */
    if (st == MOE_OK) {
        topk_bank m;
        size_t bytes = bank_layout(l, l->plan.Rr, l->plan.Rr + Ts, NULL, &m);
        st = bytes == SIZE_MAX ? moe_err(MOE_ERR_ARG, "expert-parallel rows too large") : moe__ep_reserve(l, bytes);
    }
    st = l->ep->agree(l->ep, st);
    if (st != MOE_OK) return st;
    bank_of(l, w, b);
    int64_t Rr = l->plan.Rr;
    for (int64_t i = 0; i <= El; i++) b->off[i] = l->plan.bank_off[i];
    for (int64_t j = 1; j <= Ns; j++) b->off[El + j] = Rr + (w->offsets[E + j] - Rs);
    memcpy(b->x + Rr * D, w->xe + Rs * D, (size_t)(Ts * D) * sizeof(float));
    return moe_ep_rows_out(l->ep, &l->plan, b->x, b->raw, w->xe, D);
}

/* Expert parallel: bank rows src (Rb, D) back into the local layout dst
 * (routed rows from their owners, shared rows copied). Collective. */
static moe_status ep_back(moe_layer *l, const topk_ws *w, const topk_bank *b, float *dst, const float *src) {
    int64_t D = l->cfg.input_dim, E = l->cfg.num_experts, Rs = w->offsets[E];
    int64_t Ts = w->offsets[E + l->cfg.num_shared] - Rs, Rr = l->plan.Rr;
    memcpy(dst + Rs * D, src + Rr * D, (size_t)(Ts * D) * sizeof(float));
    return moe_ep_rows_back(l->ep, &l->plan, dst, src, b->raw, D);
}

/* The router over this layer's settings and workspace, for T = B*N tokens. */
static moe_router router_of(const moe_layer *l, const topk_ws *w, int train) {
    const moe_config *c = &l->cfg;
    moe_router r;
    memset(&r, 0, sizeof r);
    r.E = c->num_experts, r.K = is_ec(c) ? 0 : eff_k(l), r.Ks = moe__topk_slots(l);
    r.expert_choice = is_ec(c), r.score = c->score, r.normalize = c->normalize;
    r.scale = (float)c->route_scale;
    r.cf = train ? c->capacity_factor_train : c->capacity_factor_eval;
    r.G = groups(c), r.M = c->topk_groups > 0 ? c->topk_groups : r.G;
    r.enabled = l->rt_enabled, r.forced = l->rt_n_forced ? l->rt_forced : NULL;
    r.bias = c->expert_bias ? l->bmem : NULL;
    r.B = l->B, r.N = l->N;
    r.z = w->z, r.p = w->p, r.lse = w->lse, r.gscore = w->gscore, r.gkeep = w->gkeep, r.taken = w->taken;
    r.pairs = w->pairs, r.fill = w->fill, r.psum = w->psum;
    r.idx = w->idx, r.w = w->w, r.pos = w->pos, r.load = w->load;
    return r;
}

static moe_status topk_forward(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim;
    int E = c->num_experts, Ns = c->num_shared, Ks = moe__topk_slots(l), Kr = Ks - Ns;
    topk_ws w;
    layout(l, l->B, l->N, l->ws, &w);
    topk_params p = params_of(l, l->wmem);

    if (l->keep && T) memcpy(w.x, x, (size_t)(T * D) * sizeof(float));
    const float *xg = x;
    if (train && c->jitter > 0) { /* Switch: gate input times U(1 - j, 1 + j) */
        uint64_t stream = moe_rng_u64(c->seed ^ 0x7a11e5c0de5ull, l->forward_calls);
        float j = (float)c->jitter;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < T * D; i++) {
            /* keyed by the global element index: expert-parallel ranks draw what one process draws */
            w.noise[i] = 1.0f + j * (2.0f * moe_rng_uniform(stream, (uint64_t)(l->t0 * D + i)) - 1.0f);
            w.xg[i] = x[i] * w.noise[i];
        }
        xg = w.xg;
    }
    moe_sgemm(0, 1, T, E, D, 1.0f, xg, D, p.Wg, D, 0.0f, w.z, E);
    moe_add_bias_rows(w.z, p.bg, T, E);
    moe_router r = router_of(l, &w, train);
    moe_router_forward(&r);

    /* shared experts: slots Kr.., weight 1 or sigmoid(Gs x) */
    if (Ns && c->shared_gate) {
        moe_sgemm(0, 1, T, Ns, D, 1.0f, x, D, p.Gs, D, 0.0f, w.sg, Ns);
        for (int64_t i = 0; i < T * Ns; i++) w.sg[i] = 1.0f / (1.0f + expf(-w.sg[i]));
    }
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < Ns; i++) {
            w.idx[t * Ks + Kr + i] = E + i;
            w.w[t * Ks + Kr + i] = c->shared_gate ? w.sg[t * Ns + i] : 1.0f;
            w.pos[t * Ks + Kr + i] = 0;
        }
    moe_dispatch_plan(w.counts, w.offsets, w.pos, w.slot, w.idx, T, Ks, E + Ns);
    memcpy(l->expert_counts, w.counts, (size_t)E * sizeof *w.counts);
    moe_gather_rows(w.xe, x, w.slot, w.offsets[E + Ns], D);

    topk_params none = {0};
    topk_bank bk;
    bank_of(l, &w, &bk);
    moe_status st = l->ep ? ep_out(l, &w, &bk) : MOE_OK; /* exchange out */
    if (st != MOE_OK) return st;
    moe_bank f = bank_params(l, p, none, &bk.lp);
    /* nothing kept for a backward (MOE_NO_GRAD, inference): an MLP expert's
     * activation overwrites its pre-activation, so a forward-only run touches
     * one (rows, H) buffer instead of two (fresh pages cost 0.4 ms per MB here) */
    moe_bank_forward(&f, bk.off, bk.x, bk.hpre, moe__act_in_place(l) ? bk.hpre : bk.ha, bk.y);
    if (l->ep && (st = ep_back(l, &w, &bk, w.ye, bk.y)) != MOE_OK) return st; /* exchange back */
    moe_combine(y, w.ye, w.w, w.pos, T, Ks, D);

    l->assignments = w.offsets[E];
    l->dropped = r.dropped;
    l->capacity = r.capacity;
    l->balance_loss = r.balance;
    l->z_loss = r.zloss;
    if (aux && l->has_aux) *aux = (float)(c->balance_coef * r.balance + c->z_loss_coef * r.zloss);
    if (train && c->expert_bias)
        for (int64_t b = 0; b < l->B; b++)
            for (int e = 0; e < E; e++) l->bias_load[e] += w.load[b * E + e];
    return MOE_OK;
}

static moe_status topk_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, T = l->T;
    int E = c->num_experts, Ns = c->num_shared, Ks = moe__topk_slots(l), Kr = Ks - Ns;
    topk_ws w;
    layout(l, l->B, l->N, l->ws, &w);
    topk_params p = params_of(l, l->wmem), g = params_of(l, l->gmem);

    /* combine: dye = w * dy per routed row, dw = <dy, ye> */
    moe_combine_backward(w.dye, w.dw, dy, w.ye, w.w, w.pos, T, Ks, D);
    topk_bank bk;
    bank_of(l, &w, &bk);
    moe_status st = MOE_OK;
    if (l->ep) { /* the output gradients to the experts' owners */
        int64_t Rs = w.offsets[E], Ts = w.offsets[E + Ns] - Rs;
        memcpy(bk.dy + l->plan.Rr * D, w.dye + Rs * D, (size_t)(Ts * D) * sizeof(float));
        if ((st = moe_ep_rows_out(l->ep, &l->plan, bk.dy, bk.raw, w.dye, D)) != MOE_OK) return st;
    }
    moe_bank f = bank_params(l, p, g, &bk.lp);
    /* expert parallel: the input gradients always go back (every rank takes part) */
    l->grad_bad = moe_bank_backward(&f, bk.off, bk.x, bk.hpre, bk.ha, bk.dy, bk.dha, bk.dhpre,
                                   dx || l->ep ? bk.dx : NULL);
    if (l->ep && (st = ep_back(l, &w, &bk, w.dxe, bk.dx)) != MOE_OK) return st;

    moe_router r = router_of(l, &w, l->cached_train); /* the settings of the forward's mode */
    moe_router_backward(&r, w.dz, w.dp, w.dw, daux * (float)c->balance_coef, daux * (float)c->z_loss_coef);
    int jittered = c->jitter > 0 && l->cached_train; /* jitter is train mode only */
    const float *xg = jittered ? w.xg : w.x;
    moe_sgemm(1, 0, E, D, T, 1.0f, w.dz, E, xg, D, 1.0f, g.Wg, D);
    moe_colsum_acc(g.bg, w.dz, T, E);
    if (Ns && c->shared_gate) { /* dsg = dw * s (1 - s) */
        for (int64_t t = 0; t < T; t++)
            for (int i = 0; i < Ns; i++) {
                float s = w.sg[t * Ns + i];
                w.dsg[t * Ns + i] = w.dw[t * Ks + Kr + i] * s * (1.0f - s);
            }
        moe_sgemm(1, 0, Ns, D, T, 1.0f, w.dsg, Ns, w.x, D, 1.0f, g.Gs, D);
    }
    if (dx) {
        moe_sgemm(0, 0, T, D, E, 1.0f, w.dz, E, p.Wg, D, 0.0f, dx, D);
        if (jittered)
            for (int64_t i = 0; i < T * D; i++) dx[i] *= w.noise[i];
        if (Ns && c->shared_gate) moe_sgemm(0, 0, T, D, Ns, 1.0f, w.dsg, Ns, p.Gs, D, 1.0f, dx, D);
        moe_scatter_add(dx, w.dxe, w.pos, T, Ks, D);
    }
    return MOE_OK;
}

static int topk_probes(const moe_layer *l, int backward, moe_probe *pr) {
    const moe_config *c = &l->cfg;
    int64_t T = l->T, D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H;
    int64_t E = c->num_experts, Ns = c->num_shared, Ks = moe__topk_slots(l);
    topk_ws w;
    layout(l, l->B, l->N, l->ws, &w);
    topk_bank bk;
    bank_of(l, &w, &bk);
    int64_t A = w.offsets[E + Ns], Rb = l->ep ? l->plan.Rr + A - w.offsets[E] : A;
    int n = 0;
    if (!backward) {
        pr[n++] = (moe_probe){"gate logits", w.z, T, E};
        pr[n++] = (moe_probe){"router probabilities", w.p, T, E};
        pr[n++] = (moe_probe){"routing weights", w.w, T, Ks};
        if (Ns && c->shared_gate) pr[n++] = (moe_probe){"shared-expert gates", w.sg, T, Ns};
        if (moe__act_in_place(l)) /* one buffer held both: the activations are what is left */
            pr[n++] = (moe_probe){"expert activations", bk.hpre, Rb, H};
        else {
            pr[n++] = (moe_probe){"expert pre-activations", bk.hpre, Rb, H2};
            pr[n++] = (moe_probe){"expert activations", bk.ha, Rb, H};
        }
        pr[n++] = (moe_probe){"expert outputs", w.ye, A, D};
    } else {
        pr[n++] = (moe_probe){"expert output gradients", w.dye, A, D};
        pr[n++] = (moe_probe){"routing-weight gradients", w.dw, T, Ks};
        pr[n++] = (moe_probe){"expert activation gradients", bk.dha, Rb, H};
        pr[n++] = (moe_probe){"expert pre-activation gradients", bk.dhpre, Rb, H2};
        pr[n++] = (moe_probe){"expert input gradients", w.dxe, A, D};
        pr[n++] = (moe_probe){"gate logit gradients", w.dz, T, E};
    }
    return n;
}

static const moe_layer_ops topk_ops = {topk_workspace_bytes, topk_forward, topk_backward, topk_probes};

/* Router settings of a topk config that no other check covers. */
static moe_status check_router(const moe_config *c) {
    int E = c->num_experts, ec = is_ec(c);
    if (c->router != MOE_ROUTER_TOKEN_CHOICE && !ec)
        return moe_err(MOE_ERR_ARG, "unknown router kind %d", (int)c->router);
    if (!moe_score_func_name(c->score)) return moe_err(MOE_ERR_ARG, "unknown score function %d", (int)c->score);
    if (!ec && (c->top_k < 1 || c->top_k > E))
        return moe_err(MOE_ERR_ARG, "top_k = %d is out of range: it must be between 1 and num_experts = %d",
                       c->top_k, E);
    if (!(c->route_scale > 0) || !isfinite(c->route_scale))
        return moe_err(MOE_ERR_ARG, "route_scale must be a finite number > 0, got %g", c->route_scale);
    if (!(c->capacity_factor_train >= 0) || !(c->capacity_factor_eval >= 0) ||
        !isfinite(c->capacity_factor_train) || !isfinite(c->capacity_factor_eval))
        return moe_err(MOE_ERR_ARG, "capacity_factor must be >= 0 (0: dropless), got %g (train) and %g (eval)",
                       c->capacity_factor_train, c->capacity_factor_eval);
    if (!(c->jitter >= 0 && c->jitter < 1))
        return moe_err(MOE_ERR_ARG, "jitter must be in [0, 1), got %g", c->jitter);
    if (!(c->balance_coef >= 0) || !(c->z_loss_coef >= 0) || !isfinite(c->balance_coef) || !isfinite(c->z_loss_coef))
        return moe_err(MOE_ERR_ARG, "balance_coef and z_loss_coef must be finite and >= 0, got %g and %g",
                       c->balance_coef, c->z_loss_coef);
    if (c->num_shared < 0 || c->num_shared > 1024)
        return moe_err(MOE_ERR_ARG, "num_shared_experts must be in [0, 1024], got %d", c->num_shared);
    if (c->shared_gate && c->num_shared == 0)
        return moe_err(MOE_ERR_ARG, "shared_gate needs num_shared_experts >= 1");
    if (!(c->bias_update_rate >= 0) || !isfinite(c->bias_update_rate))
        return moe_err(MOE_ERR_ARG, "bias_update_rate must be finite and >= 0, got %g", c->bias_update_rate);
    if (c->num_groups < 0 || (c->num_groups > 1 && E % c->num_groups != 0))
        return moe_err(MOE_ERR_ARG, "num_groups = %d must divide num_experts = %d", c->num_groups, E);
    if (c->topk_groups < 0 || (c->topk_groups > 0 && c->topk_groups > groups(c)))
        return moe_err(MOE_ERR_ARG, "topk_groups = %d must be between 1 and num_groups = %d", c->topk_groups,
                       groups(c));
    if (ec) {
        if (c->score != MOE_SCORE_SOFTMAX)
            return moe_err(MOE_ERR_ARG, "expert choice scores tokens with a softmax: set \"score\": \"softmax\"");
        if (!(c->capacity_factor_train > 0) || !(c->capacity_factor_eval > 0))
            return moe_err(MOE_ERR_ARG, "expert choice needs capacity_factor > 0 (tokens per expert = "
                                        "capacity_factor * N / E); got %g (train) and %g (eval)",
                           c->capacity_factor_train, c->capacity_factor_eval);
        if (c->balance_coef > 0)
            return moe_err(MOE_ERR_ARG, "expert choice is balanced by construction: set balance_coef to 0");
        if (c->expert_bias || c->num_groups > 1)
            return moe_err(MOE_ERR_ARG, "expert choice takes no expert_bias and no num_groups");
    }
    return MOE_OK;
}

/* The four tensors of bank expert e, named "<kind>.<i>.net.{0,2}.{weight,bias}". */
static moe_status add_expert(moe_layer *l, const char *kind, int i, int64_t e, const int64_t o[P_END + 1]) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H;
    int64_t s_w1[2] = {H2, D}, s_b1[1] = {H2}, s_w2[2] = {D, H}, s_b2[1] = {D};
    char name[MOE_NAME_MAX];
    moe_status st;
    snprintf(name, sizeof name, "%s.%d.net.0.weight", kind, i);
    st = moe__layer_add_param(l, name, 2, s_w1, o[P_W1] + e * H2 * D, D);
    snprintf(name, sizeof name, "%s.%d.net.0.bias", kind, i);
    if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b1, o[P_B1] + e * H2, D);
    snprintf(name, sizeof name, "%s.%d.net.2.weight", kind, i);
    if (st == MOE_OK) st = moe__layer_add_param(l, name, 2, s_w2, o[P_W2] + e * D * H, H);
    snprintf(name, sizeof name, "%s.%d.net.2.bias", kind, i);
    if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b2, o[P_B2] + e * D, H);
    return st;
}

static moe_status topk_create(moe_layer *l) {
    const moe_config *c = &l->cfg;
    int E = c->num_experts, Ns = c->num_shared;
    moe_status st = check_router(c);
    if (st != MOE_OK) return st;
    if (c->hidden_dim < 1 || c->hidden_dim > INT_MAX / 4)
        return moe_err(MOE_ERR_ARG, "hidden_dim must be in [1, %d], got %lld", INT_MAX / 4,
                       (long long)c->hidden_dim);
    if (!moe_activation_name(c->activation))
        return moe_err(MOE_ERR_ARG, "unknown activation %d", (int)c->activation);
    if (!moe_expert_kind_name(c->expert))
        return moe_err(MOE_ERR_ARG, "unknown expert kind %d", (int)c->expert);
    int64_t D = c->input_dim, H = c->hidden_dim, H2 = is_glu(c) ? 2 * H : H, Et = E + Ns;
    /* parameter count, overflow-checked: Et*(H2*D + H2 + D*H + D) + E*(D+1) + Ns*D */
    size_t per, a, b, total;
    if (!moe_mul_size(&a, (size_t)H2, (size_t)D) || !moe_mul_size(&b, (size_t)D, (size_t)H) ||
        !moe_add_size(&per, a, b) || !moe_add_size(&per, per, (size_t)(H2 + D)) ||
        !moe_mul_size(&total, per, (size_t)Et) || !moe_add_size(&total, total, (size_t)(E + Ns) * (size_t)(D + 1)) ||
        total > (size_t)INT64_MAX / sizeof(float))
        return moe_err(MOE_ERR_ARG, "layer too large: D=%lld H=%lld E=%d", (long long)D, (long long)H, E);

    l->ops = &topk_ops;
    l->in_dim = D;
    l->out_dim = D;
    l->has_aux = c->balance_coef > 0 || c->z_loss_coef > 0;
    l->rt_enabled = moe_alloc((size_t)E);
    l->rt_forced = moe_calloc((size_t)E);
    l->bias_load = moe_calloc((size_t)E * sizeof *l->bias_load);
    if (!l->rt_enabled || !l->rt_forced || !l->bias_load)
        return moe_err(MOE_ERR_NOMEM, "cannot allocate the router state");
    memset(l->rt_enabled, 1, (size_t)E);
    int64_t o[P_END + 1], El = routed_local(l), e0 = l->ep ? l->ep->e_first : 0;
    param_offsets(l, o);
    /* state_dict order: routed experts, the gate, shared experts, the shared
     * gate. Expert parallel: this rank's experts only, under their global
     * names, drawing the values one process draws for them. */
    int64_t s_wg[2] = {E, D}, s_bg[1] = {E};
    l->next_init_id = 4 * e0;
    for (int64_t i = 0; i < El && st == MOE_OK; i++) st = add_expert(l, "experts", (int)(e0 + i), i, o);
    l->next_init_id = 4 * (int64_t)E;
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.weight", 2, s_wg, o[P_WG], D);
    if (st == MOE_OK) st = moe__layer_add_param(l, "gate.bias", 1, s_bg, o[P_BG], D);
    for (int i = 0; i < Ns && st == MOE_OK; i++) st = add_expert(l, "shared_experts", i, El + i, o);
    int64_t s_gs[2] = {Ns, D};
    if (st == MOE_OK && c->shared_gate) st = moe__layer_add_param(l, "shared_gate.weight", 2, s_gs, o[P_GS], D);
    if (st == MOE_OK) st = moe__layer_alloc(l, o[P_END]);
    l->grad_lo = o[P_W1], l->grad_hi = o[P_WG]; /* the bank's gradients: checked by moe_bank_backward */
    /* expert parallel: the exchange plan, allocated here where every rank's failure is agreed */
    if (st == MOE_OK && l->ep) st = moe_ep_plan_alloc(&l->plan, l->ep->size, (int)El);
    if (st == MOE_OK && c->expert_bias) { /* state buffer, zeros as DeepSeek-V3 starts it */
        l->bmem = moe_calloc((size_t)E * sizeof(float));
        if (!l->bmem) return moe_err(MOE_ERR_NOMEM, "cannot allocate the expert bias");
        moe_param *bp = &l->buffers[0];
        bp->name = "gate.e_score_correction_bias";
        bp->ndim = 1, bp->shape[0] = E, bp->numel = E, bp->data = l->bmem, bp->grad = NULL;
        l->n_buffers = 1;
    }
    (void)total;
    return st;
}

static int64_t topk_routing(const moe_layer *l, int32_t *dst, int64_t cap) {
    topk_ws w;
    int64_t n = l->T * moe__topk_slots(l);
    layout(l, l->B, l->N, l->ws, &w);
    for (int64_t i = 0; i < n && i < cap; i++) dst[i] = w.pos[i] < 0 ? -1 : w.idx[i];
    return n;
}

moe_status moe_layer_set_routing(moe_layer *l, int top_k, const uint8_t *expert_mask,
                                 const uint8_t *force_experts) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_set_routing: NULL layer");
    const moe_config *c = &l->cfg;
    if (c->type != MOE_LAYER_TOPK)
        return moe_err(MOE_ERR_UNSUPPORTED, "runtime routing control is for topk layers, not %s",
                       moe_layer_type_name(c->type));
    int E = c->num_experts, k = top_k ? top_k : c->top_k, en = 0, nf = 0;
    if (is_ec(c) && (top_k || force_experts))
        return moe_err(MOE_ERR_ARG, "expert choice has no top_k and no forced experts (experts pick tokens); "
                                    "only expert_mask applies");
    if (top_k < 0 || top_k > E)
        return moe_err(MOE_ERR_ARG, "top_k = %d is out of range: it must be between 1 and num_experts = %d "
                                    "(0: the config's %d)", top_k, E, c->top_k);
    for (int e = 0; e < E; e++) {
        int on = !expert_mask || expert_mask[e];
        en += on;
        if (force_experts && force_experts[e]) {
            nf++;
            if (!on) return moe_err(MOE_ERR_ARG, "expert %d is both forced and masked off", e);
        }
    }
    if (en == 0) return moe_err(MOE_ERR_ARG, "expert_mask disables every expert; at least one must stay enabled");
    if (!is_ec(c) && en < k)
        return moe_err(MOE_ERR_ARG, "%d enabled expert%s, fewer than top_k = %d: enable more experts or "
                                    "lower top_k", en, en == 1 ? "" : "s", k);
    if (nf > k) return moe_err(MOE_ERR_ARG, "%d experts are forced, more than top_k = %d", nf, k);
    l->rt_k = top_k;
    for (int e = 0; e < E; e++) {
        l->rt_enabled[e] = !expert_mask || expert_mask[e];
        l->rt_forced[e] = force_experts && force_experts[e];
    }
    l->rt_n_forced = nf;
    l->cached = 0; /* the workspace layout may have changed */
    return MOE_OK;
}

moe_status moe_layer_update_bias(moe_layer *l) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_update_bias: NULL layer");
    const moe_config *c = &l->cfg;
    if (c->type != MOE_LAYER_TOPK || !c->expert_bias) return MOE_OK;
    int E = c->num_experts, en = 0;
    if (l->ep) { /* the global loads: every rank takes the same step (collective) */
        moe_status st = l->ep->agree(l->ep, l->ep->allreduce_i64(l->ep, l->bias_load, E));
        if (st != MOE_OK) return st;
    }
    double total = 0.0;
    for (int e = 0; e < E; e++)
        if (l->rt_enabled[e]) en++, total += (double)l->bias_load[e];
    double mean = total / en;
    float g = (float)c->bias_update_rate;
    /* DeepSeek-V3: raise the bias of underloaded experts, lower it for overloaded ones */
    for (int e = 0; e < E; e++) {
        if (!l->rt_enabled[e] || total == 0.0) continue;
        double d = mean - (double)l->bias_load[e];
        l->bmem[e] += d > 0 ? g : d < 0 ? -g : 0.0f;
    }
    memset(l->bias_load, 0, (size_t)E * sizeof *l->bias_load);
    return MOE_OK;
}

/* seed 004 routes every token: dropless */
static void topk_defaults(moe_config *c) { c->capacity_factor_train = c->capacity_factor_eval = 0.0; }

const moe_layer_kind moe__kind_topk = {MOE_LAYER_TOPK, "topk", topk_defaults, topk_create, 1, 0, moe__topk_slots,
                                       topk_routing};
