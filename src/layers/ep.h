/*
 * Expert parallelism, the layer side of the seam (no MPI here): a layer
 * whose experts are spread over P ranks holds a moe_ep. Rank r owns the
 * experts [e_first, e_first + e_count) = [r*E/P, (r+1)*E/P); the gate, shared
 * experts and other parameters are replicated. Each rank routes its own
 * tokens; the rows for an expert go to its owner and its outputs come back:
 *
 *   route (local) -> plan: rows sorted by expert, so by owner rank
 *     -> exchange out: counts (all-to-all), rows (all-to-all-v), rows
 *        regrouped from (source, expert) to (expert, source)
 *     -> the bank: the local experts (+ the local shared experts' rows)
 *     -> exchange back: the reverse  -> combine (local)
 *
 * hierarchical sends its outer rows this way, to the owners of their outer
 * experts, who run the inner level (gshard_ep.c). dense, where every token
 * needs every expert, all-gathers the tokens instead and sends each rank
 * back its tokens' partial sums (dense.c).
 *
 * The transport (MPI_Alltoallv and friends on a duplicated communicator) is
 * in src/dist/mpi.c, the only file that includes mpi.h; it fills the function
 * pointers below. Every call marked "collective" must be entered by every
 * rank in the same order, also by a rank with no tokens or with an error to
 * report (it passes its status to agree first); none of them aborts.
 * Dimension key: P ranks, E experts over all ranks, El = e_count local
 * experts, D row width, Rs rows sent, Rr rows received.
 */
#ifndef MOE_EP_H
#define MOE_EP_H

#include "internal.h"

typedef struct moe_ep moe_ep;

struct moe_ep {
    int rank, size;           /* this rank r of P                                      */
    int E;                    /* experts sharded over the ranks                        */
    int e_first, e_count;     /* experts owned by this rank                            */
    void *impl;               /* the transport's state (src/dist)                      */
    /* ---- transport (collective) ---- */
    /* Every rank passes its status; all return the first failing rank's status
     * (lowest rank), its message prefixed "rank R: " on the other ranks. */
    moe_status (*agree)(moe_ep *ep, moe_status st);
    /* recv/send counts (P) in elements of esize bytes; displacements are the
     * prefix sums. Large counts are sent in pieces. */
    moe_status (*alltoallv)(moe_ep *ep, void *recv, const int64_t *rcounts, const void *send,
                            const int64_t *scounts, size_t esize);
    /* v (n) summed over the ranks, in place (deterministic for a fixed P) */
    moe_status (*allreduce_f32)(moe_ep *ep, float *v, int64_t n);
    moe_status (*allreduce_f64)(moe_ep *ep, double *v, int64_t n);
    moe_status (*allreduce_i64)(moe_ep *ep, int64_t *v, int64_t n);
    /* v (n) replaced by the sums over the ranks before this one (0 on rank 0) */
    moe_status (*exscan_i64)(moe_ep *ep, int64_t *v, int n);
    /* recv (sum of counts) = the ranks' send buffers in rank order; counts (P) */
    moe_status (*allgatherv)(moe_ep *ep, void *recv, const int64_t *counts, const void *send, int64_t n,
                             size_t esize);
    /* rank 0 gets every rank's n bytes in rank order: *out (malloc'd, free
     * with free()) of *out_n bytes, counts (P) each rank's bytes; other
     * ranks get NULL and 0 */
    moe_status (*gather)(moe_ep *ep, void **out, int64_t *out_n, int64_t *counts, const void *send, int64_t n);
    void (*free)(moe_ep *ep);
    /* ---- measurements (moe bench --ep) ---- */
    double  xchg_seconds;     /* wall time inside the row and count exchanges          */
    int64_t xchg_bytes;       /* bytes this rank sent to other ranks in them           */
};

/* The exchange of one forward, kept for the backward (ep.c). */
typedef struct {
    int64_t *scount;          /* (P) rows sent to each rank                            */
    int64_t *rcount;          /* (P) rows received from each rank                      */
    int64_t *rc_expert;       /* (P, El) rows received from rank p for local expert i  */
    int64_t *bank_off;        /* (El + 1) the local experts' rows in the bank          */
    int64_t  Rs, Rr;          /* rows sent (routed rows), rows received                */
} moe_ep_plan;

/* Exchange out, step 1 (collective): this rank's rows per expert
 * expert_counts (E) (rows sorted by expert, so by owner rank) go to the
 * owners (all-to-all); plan gets the rows sent to and received from each
 * rank and Rr. The caller then sizes its buffers for Rr rows and calls
 * ep->agree with the result before any row moves. */
moe_status moe_ep_counts(moe_ep *ep, moe_ep_plan *plan, const int64_t *expert_counts);
/* Exchange out, step 2 (collective): send (Rs, W), rows in expert order,
 * to the owners; bank (Rr, W) gets the received rows regrouped by local
 * expert (expert i's rows from rank 0, then rank 1, ...: plan->bank_off);
 * raw (Rr, W) is scratch. Also used in backward for the output gradients. */
moe_status moe_ep_rows_out(moe_ep *ep, const moe_ep_plan *plan, float *bank, float *raw, const float *send,
                           int64_t W);
/* Exchange back (collective): bank (Rr, W) rows to the ranks they came
 * from; out (Rs, W) gets this rank's rows in the order it sent them; raw
 * (Rr, W) is scratch. */
moe_status moe_ep_rows_back(moe_ep *ep, const moe_ep_plan *plan, float *out, const float *bank, float *raw,
                            int64_t W);

/* Any all-to-all-v (collective, as ep->alltoallv: counts in elements of
 * esize bytes), timed and its bytes counted with the row exchanges'
 * (ep->xchg_seconds, ep->xchg_bytes). */
moe_status moe_ep_alltoallv(moe_ep *ep, void *recv, const int64_t *rcounts, const void *send,
                            const int64_t *scounts, size_t esize);
/* An all-gather (collective, as ep->allgatherv: this rank's n elements,
 * counts (P) every rank's), timed and counted likewise. */
moe_status moe_ep_allgatherv(moe_ep *ep, void *recv, const int64_t *counts, const void *send, int64_t n,
                             size_t esize);

/* Memory of a plan for P ranks and El local experts (one allocation). */
moe_status moe_ep_plan_alloc(moe_ep_plan *plan, int P, int El);
void       moe_ep_plan_free(moe_ep_plan *plan);

#endif
