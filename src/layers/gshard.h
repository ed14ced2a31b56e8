/*
 * Private to the gshard and hierarchical layers (gshard.c, and gshard_ep.c
 * for hierarchical under expert parallelism): their workspace, parameter
 * views and the helpers both files use. gshard.c's header comment has the
 * design and the dimension key.
 */
#ifndef MOE_GSHARD_H
#define MOE_GSHARD_H

#include "bank.h"
#include "layer_internal.h"
#include "top2.h"

typedef struct {
    int64_t *start, *len;  /* (S) segments                                      */
    int32_t *set;          /* (S)                                               */
    float   *p, *dl;       /* (R,E) softmax of the logits; their gradient       */
    float   *dgate;        /* (R,2)                                             */
    moe_top2 g;            /* idx, gate, pos, counts, ... point into the ws     */
} level_ws;

/* The rows the experts run and their activations: the workspace's in one
 * process; expert parallel, the rows received from every rank (l->ep_mem). */
typedef struct {
    float *xe, *hpre, *ha, *dha, *ye, *dye, *dxe; /* (R, D|H)                  */
    float *raw;                                   /* (R, D) exchange scratch, or NULL */
    moe_bank_lowp lp;                             /* (R rows) the bank format's copies */
} gs_rows;

typedef struct {
    float *x;                            /* (T,D) copy of the input              */
    level_ws L1, L2;                     /* first gate; inner gate (hier.)       */
    float *imp;                          /* (A1) importance of outer rows        */
    float *xo, *yo, *dyo, *dxo;          /* (A1,D) outer buffers (hierarchical)  */
    gs_rows r;                           /* expert rows (Amax,D|H), no scratch    */
    /* hierarchical, expert parallel (L2 and the expert rows are the owner's, in l->ep_mem) */
    int64_t *bn;                         /* (P,2) groups and N of every rank      */
    int64_t *ocount;                     /* (Eo) rows sent to each outer expert   */
    int64_t *segsend;                    /* (Eo,B) rows of each (outer expert, group) */
    double  *segterm;                    /* (Eo,B) their inner loss terms, from the owners */
    double  *wq;                         /* (P) every rank's weight of its inner terms */
} gs_ws;

typedef struct {
    float *wg1, *wg2, *w1, *w2; /* wg2: inner gate (hierarchical), else NULL */
} gs_params;


/* The owner's side of the inner level, in l->ep_mem: the outer rows of its
 * El outer experts from every rank (Rr), regrouped by outer expert, in
 * segments s = i*G + b (local outer expert i, global group b). */
typedef struct {
    int64_t *segcnt;   /* (El*G) rows of each segment as received: rank q's (El, B_q) block after rank q-1's */
    double  *segterm;  /* (El*G) each segment's loss term, in that order, to send back     */
    double  *segw;     /* (El*G) backward: each segment's weight in the loss, in s order    */
    level_ws L2;       /* the inner gate over the Rr rows, S = El*G segments, El weight sets */
    float   *imp;      /* (Rr) importance of the rows                                       */
    float   *impraw;   /* (Rr) exchange scratch                                             */
    float   *raw;      /* (Rr,D) exchange scratch                                           */
    float   *xo, *yo, *dyo, *dxo; /* (Rr,D) the outer rows and their outputs, gradients   */
    gs_rows  r;        /* the inner experts' rows (2*Rr, D|H)                               */
} hier_ep;

/* The experts' hidden width: hidden_dim, or 4 D as the seed's default. */
static inline int64_t gs_hidden(const moe_config *c) { return c->hidden_dim ? c->hidden_dim : 4 * c->input_dim; }

/* Carve r's R rows of width D and H (and its exchange scratch when raw)
 * from base at *off (base NULL: measure only). */
void moe__gs_carve_rows(const moe_config *c, char *base, size_t *off, int64_t R, int64_t D, int64_t H, int raw,
                        gs_rows *r);
/* Carve a gate level: R rows in, A rows kept at most, S segments, E experts
 * per weight set, n_sets weight sets. */
void moe__gs_carve_level(char *base, size_t *off, level_ws *v, int64_t R, int64_t A, int S, int E, int n_sets);
/* Outer capacity (the inner segments' nominal size) for this mode. */
int64_t moe__gs_outer_cap(const moe_layer *l, int64_t N, int train);
/* Gate settings of this mode (train or eval) into a level. */
void moe__gs_set_mode(moe_top2 *g, const moe_config *c, int train);
/* The nk experts over rows w (expert k owns rows [off[k], off[k+1])):
 * forward; backward (dW accumulate into g) returns 1 if an expert gradient
 * holds a NaN or Inf. */
void moe__gs_experts_forward(const moe_layer *l, const gs_rows *w, const gs_params *p, const int64_t *off, int nk);
int  moe__gs_experts_backward(const moe_layer *l, const gs_rows *w, const gs_params *p, const gs_params *g,
                              const int64_t *off, int nk);

/* ---- gshard_ep.c: hierarchical, expert parallel ---- */
/* The owner's view of the last forward: G, N and the buffers in l->ep_mem. */
void moe__gs_hier_ep_of(const moe_layer *l, const gs_ws *w, hier_ep *h, int64_t *G, int64_t *N);
/* Forward of the inner level on the owners; adds this rank's groups' inner
 * loss to *loss. Collective. */
moe_status moe__gs_hier_ep_forward(moe_layer *l, gs_ws *w, const gs_params *p, uint64_t stream, int train,
                                   double *loss);
/* Its backward (dloss: the loss's gradient). Collective. */
moe_status moe__gs_hier_ep_backward(moe_layer *l, gs_ws *w, const gs_params *p, const gs_params *g, float dloss);

#endif
