/*
 * Layer `hierarchical` under expert parallelism (moe_mpi.h): the inner level
 * on the owners of the outer experts. Split from gshard.c (which has the
 * whole design in its header comment); the types it shares are in gshard.h.
 *
 * Rank r owns the outer experts [e0, e0 + El) with their inner gates and
 * inner experts. The kept outer rows go to their owners with their
 * importance; the rows per (outer expert, group) follow so the owner knows
 * its inner segments (eo, b) over all G groups, s = i*G + b (i local, b
 * global: the random policy draws what one process draws for segment
 * eo*G + b). Inner gate, inner experts and inner combine run on the owner;
 * the outer experts' outputs come back. Each inner segment's loss term goes
 * back to its group's rank; in backward each rank's weight of its segments'
 * terms goes to the owners.
 * Dimension key: D model dim, H expert hidden dim, El local outer experts,
 * G groups of all ranks, Rr rows received by the owner, P ranks.
 */
#include "gshard.h"
#include "ops.h"

#include <limits.h>
#include <string.h>


static size_t hier_ep_layout(const moe_layer *l, int64_t Rr, int64_t G, char *base, hier_ep *h) {
    const moe_config *c = &l->cfg;
    int64_t D = c->input_dim, H = gs_hidden(c), El = l->ep->e_count, A2 = 2 * Rr, S = El * G;
    size_t off = 0, F = sizeof(float);
    memset(h, 0, sizeof *h);
    if ((double)S > INT_MAX || (double)A2 > INT32_MAX) return SIZE_MAX;
    h->segcnt = moe__carve(base, &off, S, 1, sizeof(int64_t));
    h->segterm = moe__carve(base, &off, S, 1, sizeof(double));
    h->segw = moe__carve(base, &off, S, 1, sizeof(double));
    moe__gs_carve_level(base, &off, &h->L2, Rr, A2, (int)S, c->num_experts_inner, (int)El);
    h->imp = moe__carve(base, &off, Rr, 1, F);
    h->impraw = moe__carve(base, &off, Rr, 1, F);
    h->raw = moe__carve(base, &off, Rr, D, F);
    h->xo = moe__carve(base, &off, Rr, D, F);
    h->yo = moe__carve(base, &off, Rr, D, F);
    h->dyo = moe__carve(base, &off, Rr, D, F);
    h->dxo = moe__carve(base, &off, Rr, D, F);
    moe__gs_carve_rows(c, base, &off, A2, D, H, 0, &h->r);
    return off;
}

/* G, the groups of all ranks, and N, their tokens per group, from bn (P,2);
 * the ranks with groups must agree on N (every rank sees the same bn, so
 * all fail alike). */
static moe_status hier_ep_dims(const moe_layer *l, const int64_t *bn, int64_t *G, int64_t *N) {
    int P = l->ep->size, first = -1;
    *G = 0, *N = 1;
    for (int q = 0; q < P; q++) {
        if (bn[2 * q] == 0) continue;
        if (first < 0) first = q, *N = bn[2 * q + 1];
        else if (bn[2 * q + 1] != *N)
            return moe_err(MOE_ERR_ARG, "hierarchical, expert parallel: every rank's groups must have the same "
                           "number of tokens (the inner capacity depends on it): rank %d has N = %lld, rank %d "
                           "has N = %lld", first, (long long)*N, q, (long long)bn[2 * q + 1]);
        *G += bn[2 * q];
    }
    return MOE_OK;
}

/* The owner's view of the last forward: G, N and the buffers in l->ep_mem. */
void moe__gs_hier_ep_of(const moe_layer *l, const gs_ws *w, hier_ep *h, int64_t *G, int64_t *N) {
    hier_ep_dims(l, w->bn, G, N);
    hier_ep_layout(l, l->plan.Rr, *G, (char *)l->ep_mem, h);
}

/* The inner segments from the received counts: segment i*G + g0_q + b gets
 * rank q's rows of (local outer expert i, its group b), in bank order. */
static void hier_ep_segments(const moe_layer *l, const int64_t *bn, int64_t G, hier_ep *h) {
    int P = l->ep->size, El = l->ep->e_count;
    level_ws *v = &h->L2;
    for (int64_t q = 0, g0 = 0; q < P; q++) {
        int64_t Bq = bn[2 * q];
        const int64_t *cnt = h->segcnt + (int64_t)El * g0;
        for (int i = 0; i < El; i++)
            for (int64_t b = 0; b < Bq; b++) v->len[i * G + g0 + b] = cnt[i * Bq + b], v->set[i * G + g0 + b] = i;
        g0 += Bq;
    }
    int64_t start = 0;
    for (int64_t s = 0; s < El * G; s++) v->start[s] = start, start += v->len[s];
}

/* Forward of the inner level, expert parallel: the outer rows xo and their
 * importance (this rank's, in outer-expert order) to the owners, the inner
 * gate, inner experts and inner combine there, the outer experts' outputs
 * back into yo. Adds this rank's groups' inner loss to *loss. Collective. */
moe_status moe__gs_hier_ep_forward(moe_layer *l, gs_ws *w, const gs_params *p, uint64_t stream, int train,
                                  double *loss) {
    const moe_config *c = &l->cfg;
    moe_ep *ep = l->ep;
    int P = ep->size, El = ep->e_count, e0 = ep->e_first, E1 = c->num_experts, Ei = c->num_experts_inner;
    int64_t D = c->input_dim, B = l->B, mine[2] = {l->B, l->N}, twos[P], sc[P], rc[P], G = 0, N = 1;
    const moe_top2 *g1 = &w->L1.g;
    for (int q = 0; q < P; q++) twos[q] = 2;
    /* every rank's groups and N; the rows per outer expert (the plan) */
    moe_status st = moe_ep_allgatherv(ep, w->bn, twos, mine, 2, sizeof(int64_t));
    if (st != MOE_OK) return st;
    if ((st = hier_ep_dims(l, w->bn, &G, &N)) != MOE_OK) return st;
    for (int eo = 0; eo < E1; eo++) w->ocount[eo] = g1->offsets[eo + 1] - g1->offsets[eo];
    if ((st = moe_ep_counts(ep, &l->plan, w->ocount)) != MOE_OK) return st;
    int64_t Rr = l->plan.Rr;
    hier_ep h;
    size_t bytes = hier_ep_layout(l, Rr, G, NULL, &h);
    st = bytes == SIZE_MAX ? moe_err(MOE_ERR_ARG, "expert-parallel rows too large") : moe__ep_reserve(l, bytes);
    if ((st = ep->agree(ep, st)) != MOE_OK) return st;
    hier_ep_layout(l, Rr, G, (char *)l->ep_mem, &h);
    /* the rows of each (outer expert, group) to the outer expert's owner, then the rows and their importance */
    for (int eo = 0; eo < E1; eo++)
        for (int64_t b = 0; b < B; b++) w->segsend[eo * B + b] = g1->counts[b * E1 + eo];
    for (int q = 0; q < P; q++) sc[q] = El * B, rc[q] = El * w->bn[2 * q];
    st = moe_ep_alltoallv(ep, h.segcnt, rc, w->segsend, sc, sizeof(int64_t));
    if (st == MOE_OK) st = moe_ep_rows_out(ep, &l->plan, h.xo, h.raw, w->xo, D);
    if (st == MOE_OK) st = moe_ep_rows_out(ep, &l->plan, h.imp, h.impraw, w->imp, 1);
    if (st != MOE_OK) return st;

    /* the inner level over the local outer experts' rows of every group */
    hier_ep_segments(l, w->bn, G, &h);
    for (int i = 0; i < El; i++) {
        int64_t r0 = l->plan.bank_off[i], n = l->plan.bank_off[i + 1] - r0;
        if (n) moe_sgemm(0, 0, n, Ei, D, 1.0f, h.xo + r0 * D, D, p->wg2 + (int64_t)i * D * Ei, Ei, 0.0f,
                         h.L2.p + r0 * Ei, Ei);
    }
    moe_softmax_rows(h.L2.p, h.L2.p, Rr, Ei);
    moe_top2 *g2 = &h.L2.g;
    g2->R = Rr, g2->Ng = moe__gs_outer_cap(l, N, train), g2->imp = h.imp, g2->rng_stream = stream + 1;
    g2->seg0 = (int64_t)e0 * G; /* segment i*G + b here is eo*G + b in one process */
    memset(l->expert_counts, 0, (size_t)l->n_expert_counts * sizeof *l->expert_counts);
    g2->expert_counts = l->expert_counts + (int64_t)e0 * Ei;
    moe__gs_set_mode(g2, c, train);
    moe_top2_forward(g2);
    l->dropped += g2->dropped, l->second_candidates += g2->cand2, l->second_kept += g2->kept2;
    l->assignments = g2->A;
    moe_gather_rows(h.r.xe, h.xo, g2->src, g2->A, D);
    moe__gs_experts_forward(l, &h.r, p, g2->offsets, El * Ei);
    moe_combine(h.yo, h.r.ye, g2->gate, g2->pos, Rr, 2, D);

    /* the outer experts' outputs back; each segment's loss term to its group's rank */
    if ((st = moe_ep_rows_back(ep, &l->plan, w->yo, h.yo, h.raw, D)) != MOE_OK) return st;
    const double *term = moe_top2_segment_terms(g2);
    for (int64_t q = 0, g0 = 0; q < P; q++) {
        int64_t Bq = w->bn[2 * q];
        for (int i = 0; i < El; i++)
            for (int64_t b = 0; b < Bq; b++) h.segterm[(int64_t)El * g0 + i * Bq + b] = term[i * G + g0 + b];
        g0 += Bq;
    }
    if ((st = moe_ep_alltoallv(ep, w->segterm, sc, h.segterm, rc, sizeof(double))) != MOE_OK) return st;
    /* w->segterm (Eo,B): summed in one process's order, scaled as its mean over Eo*B segments */
    double inner = 0.0;
    for (int64_t s = 0; s < E1 * B; s++) inner += w->segterm[s];
    if (B) *loss += inner * (double)Ei / (double)(E1 * B);
    return MOE_OK;
}

/* Backward of the inner level, expert parallel: dyo to the owners, the inner
 * combine, experts and gate backward there (their gradients complete on the
 * owner), dxo back. dloss weighs this rank's aux. Collective. */
moe_status moe__gs_hier_ep_backward(moe_layer *l, gs_ws *w, const gs_params *p, const gs_params *g, float dloss) {
    const moe_config *c = &l->cfg;
    moe_ep *ep = l->ep;
    int P = ep->size, El = ep->e_count, E1 = c->num_experts, Ei = c->num_experts_inner;
    int64_t D = c->input_dim, B = l->B, G, N, ones[P];
    hier_ep h;
    moe__gs_hier_ep_of(l, w, &h, &G, &N);
    int64_t Rr = l->plan.Rr;
    for (int q = 0; q < P; q++) ones[q] = 1;
    /* this rank's weight of each of its inner segments' terms: dloss * Ei / (Eo * B) as in hier_ep_forward */
    double wmine = B ? (double)dloss * (double)Ei / (double)(E1 * B) : 0.0;
    moe_status st = moe_ep_rows_out(ep, &l->plan, h.dyo, h.raw, w->dyo, D);
    if (st == MOE_OK) st = moe_ep_allgatherv(ep, w->wq, ones, &wmine, 1, sizeof(double));
    if (st != MOE_OK) return st;
    for (int64_t q = 0, g0 = 0; q < P; q++) {
        for (int i = 0; i < El; i++)
            for (int64_t b = 0; b < w->bn[2 * q]; b++) h.segw[i * G + g0 + b] = w->wq[q];
        g0 += w->bn[2 * q];
    }
    moe_top2 *g2 = &h.L2.g;
    g2->R = Rr, g2->Ng = moe__gs_outer_cap(l, N, l->cached_train), g2->imp = h.imp, g2->seg_w = h.segw;
    moe_combine_backward(h.r.dye, h.L2.dgate, h.dyo, h.r.ye, g2->gate, g2->pos, Rr, 2, D);
    l->grad_bad = moe__gs_experts_backward(l, &h.r, p, g, g2->offsets, El * Ei);
    memset(h.dxo, 0, (size_t)(Rr * D) * sizeof(float));
    moe_scatter_add(h.dxo, h.r.dxe, g2->pos, Rr, 2, D);
    moe_top2_backward(g2, h.L2.dl, h.L2.dgate, dloss);
    for (int i = 0; i < El; i++) {
        int64_t r0 = l->plan.bank_off[i], n = l->plan.bank_off[i + 1] - r0;
        if (n == 0) continue;
        float *gw = g->wg2 + (int64_t)i * D * Ei;
        const float *pw = p->wg2 + (int64_t)i * D * Ei;
        moe_sgemm(1, 0, D, Ei, n, 1.0f, h.xo + r0 * D, D, h.L2.dl + r0 * Ei, Ei, 1.0f, gw, Ei);
        moe_sgemm(0, 1, n, D, Ei, 1.0f, h.L2.dl + r0 * Ei, Ei, pw, Ei, 1.0f, h.dxo + r0 * D, D);
    }
    return moe_ep_rows_back(ep, &l->plan, w->dxo, h.dxo, h.raw, D);
}
