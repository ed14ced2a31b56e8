/*
 * GShard top-2 gating (seeds 000/001 Top2Gating) as an index-based routine,
 * shared by the gshard layer and both levels of the hierarchical layer.
 * Dimension key: R rows routed at this level, E experts per weight set,
 * S segments (groups: capacity and the balance loss are per segment),
 * Ng nominal rows per segment, A rows kept (sum of counts).
 *
 * A segment is a contiguous run of rows that share capacity: one sequence of
 * the batch (gshard, hierarchical outer level), or the capacity buffer of one
 * outer expert for one sequence (hierarchical inner level; its rows are the
 * filled slots, while Ng is the buffer's full capacity, as the seed's means
 * run over empty slots too). Segment s routes to experts set[s]*E + e.
 */
#ifndef MOE_TOP2_H
#define MOE_TOP2_H

#include "internal.h"

typedef struct {
    /* ---- inputs ---- */
    int E;                     /* experts per set                                 */
    int n_sets;                /* weight sets (1, or Eo for the inner level)      */
    int S;                     /* segments                                        */
    int64_t R;                 /* rows                                            */
    int64_t Ng;                /* nominal rows per segment (means, capacity)      */
    const int64_t *seg_start;  /* (S) first row of each segment                   */
    const int64_t *seg_len;    /* (S) rows of each segment (<= Ng)                */
    const int32_t *seg_set;    /* (S) weight set of each segment, NULL: all 0     */
    const float *imp;          /* (R) importance 0 / 0.5 / 1, NULL: all 1         */
    const float *raw;          /* (R,E) softmax of the gate logits                */
    moe_second_policy policy;
    double threshold, capacity_factor;
    uint64_t rng_stream;       /* random policy: u of row r of segment s is draw
                                  (seg0 + s)*Ng + (r - seg_start[s]) of this stream */
    int64_t seg0;              /* segments before these (expert parallel: the
                                  groups of the ranks before this one), else 0    */
    const double *seg_w;       /* backward: (S) the weight of each segment's loss
                                  term (moe_top2_segment_terms) in the loss that
                                  dloss scales; NULL: dloss * E / S for every
                                  segment (the mean over segments). Expert
                                  parallel: segments of several ranks' groups     */
    /* ---- outputs (storage owned by the caller) ---- */
    int32_t *idx;              /* (R,2)  first and second choice                  */
    float   *gate;             /* (R,2)  final gate values (0 if not kept)        */
    int32_t *pos;              /* (R,2)  row in the expert buffer, -1: not kept   */
    int64_t *counts;           /* (S,E)  rows kept per segment and expert         */
    int32_t *fill;             /* (S,E)  scratch                                  */
    double  *proxy;            /* (S*E + S) scratch                               */
    int64_t *cursor;           /* (n_sets*E) scratch                              */
    float   *density;          /* (S,E)  first choices (before capacity) / Ng     */
    int64_t *offsets;          /* (n_sets*E + 1) expert e owns rows [off[e], off[e+1]) */
    int32_t *src;              /* (A)    source row of each expert-buffer row     */
    int64_t *expert_counts;    /* (n_sets*E) rows per expert, or NULL             */
    /* ---- results ---- */
    int64_t capacity;          /* per segment and expert                          */
    int64_t A;                 /* rows kept                                       */
    int64_t dropped;           /* assignments dropped for capacity                */
    int64_t cand2, kept2;      /* rows with a second choice, and kept ones        */
    double  loss;              /* balance loss (before loss_coef)                 */
} moe_top2;

/* Capacity of one expert for a segment of Ng rows: max(min(Ng, floor(Ng*cf/E)), 4). */
int64_t moe_top2_capacity(int64_t Ng, double cf, int E);

/* Route: choices, normalised gates, policy, capacity, expert-buffer rows. */
void moe_top2_forward(moe_top2 *g);

/* After moe_top2_forward: (S) each segment's loss term sum_e mean(raw) *
 * density (loss = E/S times their sum); valid until the next forward. */
const double *moe_top2_segment_terms(const moe_top2 *g);

/* Backward: dlogits (R,E) (written) from dgate (R,2), the gradient of the
 * final gate values, and dloss, the weight of the balance loss (daux *
 * loss_coef; seg_w, when set, replaces dloss * E / S). Gradients flow through the gate values and the loss's proxy
 * term; choices, masks and capacity are constants, as in PyTorch autograd. */
void moe_top2_backward(const moe_top2 *g, float *dlogits, const float *dgate, float dloss);

#endif
