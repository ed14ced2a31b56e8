/*
 * Expert parallelism, the layer side (see ep.h): count exchange, row
 * exchange and the regrouping between the (source rank, expert) order the
 * all-to-all delivers and the (expert, source rank) order the expert bank
 * runs. Hand-written: it is the MoE-specific part of the exchange; the
 * transport underneath is MPI's (src/dist/mpi.c).
 * Dimension key: P ranks, E experts, El local experts, W row width, Rs rows
 * sent, Rr rows received.
 */
#include "ep.h"

#include <string.h>

moe_status moe_ep_plan_alloc(moe_ep_plan *plan, int P, int El) {
    memset(plan, 0, sizeof *plan);
    int64_t n = 2 * (int64_t)P + (int64_t)P * El + El + 1;
    int64_t *m = moe_calloc((size_t)n * sizeof *m);
    if (!m) return moe_err(MOE_ERR_NOMEM, "cannot allocate the expert-parallel exchange plan");
    plan->scount = m;
    plan->rcount = m + P;
    plan->rc_expert = m + 2 * P;
    plan->bank_off = m + 2 * P + (int64_t)P * El;
    return MOE_OK;
}

void moe_ep_plan_free(moe_ep_plan *plan) {
    moe_free(plan->scount);
    memset(plan, 0, sizeof *plan);
}

moe_status moe_ep_counts(moe_ep *ep, moe_ep_plan *plan, const int64_t *expert_counts) {
    int P = ep->size, El = ep->e_count;
    int64_t per[P], ones[P];
    plan->Rs = 0;
    for (int q = 0; q < P; q++) {
        int64_t s = 0;
        for (int i = 0; i < El; i++) s += expert_counts[(int64_t)q * El + i];
        plan->scount[q] = s, plan->Rs += s;
        per[q] = El, ones[q] = El;
    }
    double t0 = moe__clock();
    /* the owner of expert q*El + i learns how many rows of each rank it gets */
    moe_status st = ep->alltoallv(ep, plan->rc_expert, per, expert_counts, ones, sizeof(int64_t));
    ep->xchg_seconds += moe__clock() - t0;
    ep->xchg_bytes += (int64_t)(P - 1) * El * (int64_t)sizeof(int64_t);
    if (st != MOE_OK) return st;
    plan->Rr = 0;
    for (int p = 0; p < P; p++) {
        int64_t s = 0;
        for (int i = 0; i < El; i++) s += plan->rc_expert[(int64_t)p * El + i];
        plan->rcount[p] = s, plan->Rr += s;
    }
    plan->bank_off[0] = 0;
    for (int i = 0; i < El; i++) {
        int64_t s = 0;
        for (int p = 0; p < P; p++) s += plan->rc_expert[(int64_t)p * El + i];
        plan->bank_off[i + 1] = plan->bank_off[i] + s;
    }
    return MOE_OK;
}

/* Copy between raw (source-major: rank p's rows for its experts in order)
 * and bank (expert-major) layouts; to_bank chooses the direction. */
static void regroup(float *bank, float *raw, const moe_ep_plan *plan, int P, int El, int64_t W, int to_bank) {
    int64_t src0 = 0;
    for (int p = 0; p < P; p++) {
        int64_t s = src0;
        for (int i = 0; i < El; i++) {
            int64_t n = plan->rc_expert[(int64_t)p * El + i];
            /* bank position: expert i's block, after the rows of ranks < p */
            int64_t b = plan->bank_off[i];
            for (int q = 0; q < p; q++) b += plan->rc_expert[(int64_t)q * El + i];
            if (n) {
                if (to_bank) memcpy(bank + b * W, raw + s * W, (size_t)(n * W) * sizeof(float));
                else memcpy(raw + s * W, bank + b * W, (size_t)(n * W) * sizeof(float));
            }
            s += n;
        }
        src0 += plan->rcount[p];
    }
}

moe_status moe_ep_alltoallv(moe_ep *ep, void *recv, const int64_t *rc, const void *send, const int64_t *sc,
                            size_t esize) {
    double t0 = moe__clock();
    moe_status st = ep->alltoallv(ep, recv, rc, send, sc, esize);
    ep->xchg_seconds += moe__clock() - t0;
    for (int q = 0; q < ep->size; q++)
        if (q != ep->rank) ep->xchg_bytes += sc[q] * (int64_t)esize;
    return st;
}

moe_status moe_ep_allgatherv(moe_ep *ep, void *recv, const int64_t *counts, const void *send, int64_t n,
                             size_t esize) {
    double t0 = moe__clock();
    moe_status st = ep->allgatherv(ep, recv, counts, send, n, esize);
    ep->xchg_seconds += moe__clock() - t0;
    ep->xchg_bytes += (int64_t)(ep->size - 1) * n * (int64_t)esize;
    return st;
}

static moe_status exchange(moe_ep *ep, float *recv, const int64_t *rc, const float *send, const int64_t *sc,
                           int64_t W) {
    return moe_ep_alltoallv(ep, recv, rc, send, sc, (size_t)W * sizeof(float));
}

moe_status moe_ep_rows_out(moe_ep *ep, const moe_ep_plan *plan, float *bank, float *raw, const float *send,
                           int64_t W) {
    moe_status st = exchange(ep, raw, plan->rcount, send, plan->scount, W);
    if (st == MOE_OK) regroup(bank, raw, plan, ep->size, ep->e_count, W, 1);
    return st;
}

moe_status moe_ep_rows_back(moe_ep *ep, const moe_ep_plan *plan, float *out, const float *bank, float *raw,
                            int64_t W) {
    regroup((float *)bank, raw, plan, ep->size, ep->e_count, W, 0);
    return exchange(ep, out, plan->scount, raw, plan->rcount, W);
}
