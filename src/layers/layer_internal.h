/*
 * What every layer kind shares: the moe_layer struct, the per-kind vtable and
 * the parameter/workspace helpers in layer.c.
 * Dimension key: T tokens, D model dim, H expert hidden dim, O output dim,
 * E experts, K top-k, A = T*K routed rows.
 */
#ifndef MOE_LAYER_INTERNAL_H
#define MOE_LAYER_INTERNAL_H

#include "ep.h"
#include "internal.h"

/* One intermediate tensor of the last forward or backward, for naming where
 * a non-finite value first appeared (layer.c, explain_nonfinite). */
typedef struct {
    const char  *name;   /* "gate logits", "expert pre-activations", ...         */
    const float *v;      /* (rows, cols)                                         */
    int64_t      rows, cols;
} moe_probe;

#define MOE_MAX_PROBES 16

typedef struct {
    /* Workspace bytes needed for B groups of N tokens (0 or SIZE_MAX on size overflow). */
    size_t (*workspace_bytes)(const moe_layer *l, int64_t B, int64_t N);
    /* Inputs validated and workspace reserved before these run; they fail
     * only in an expert-parallel exchange (every rank then fails alike). */
    moe_status (*forward)(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train);
    moe_status (*backward)(moe_layer *l, float *dx, const float *dy, float daux);
    /* The intermediates of the last forward (backward == 0) or backward (1)
     * in the order they are computed (at most MOE_MAX_PROBES); returns how
     * many. Only read on the error path. */
    int (*probes)(const moe_layer *l, int backward, moe_probe *out);
} moe_layer_ops;

#define MOE_NAME_MAX 64

struct moe_layer {
    moe_config cfg;
    const moe_layer_ops *ops;
    int64_t in_dim, out_dim;   /* D and the width of y                        */
    int has_aux;

    int        n_params, cap_params;
    moe_param *params;         /* (n_params) state_dict order                 */
    int64_t   *param_off;      /* (n_params) offset of each in wmem/gmem      */
    int64_t   *fan_in;         /* (n_params) for init                         */
    char      *names;          /* (cap_params * MOE_NAME_MAX)                  */
    uint8_t   *init_normal;    /* (cap_params) 0 uniform, 1 N(0,1), 2 ones     */
    int64_t   *init_id;        /* (cap_params) the random stream of each parameter: its
                                  index in the one-process table, so an expert-parallel
                                  rank draws the values one process would           */
    int64_t   *init_skip;      /* (cap_params) elements of that stream before this
                                  rank's slice (a tensor split over ranks by dim 0):
                                  the slice's offset in the whole tensor            */
    int64_t   *global_dim0;    /* (cap_params) dim 0 of the whole tensor when this is a
                                  rank's slice of it, else 0                        */
    int64_t    next_init_id;   /* init_id of the next parameter registered        */
    float     *wmem, *gmem;    /* (n_weights) parameters and gradients        */
    uint16_t  *w16;            /* (n_weights) bf16 copy of wmem (cfg.bf16), or NULL */
    uint64_t   w16_gen;        /* moe__params_gen() when w16 was made          */
    int64_t    n_weights;

    int64_t *expert_counts;    /* (n_expert_counts) rows per expert, last forward */
    int      n_expert_counts;  /* E, or Eo*Ei for hierarchical                */
    int64_t  assignments, dropped, second_candidates, second_kept;
    uint64_t forward_calls;    /* forwards run: the RNG stream of the next one */
    int64_t  B, N;             /* groups and tokens per group, last forward   */

    /* topk router state (topk.c) */
    int      rt_k;             /* K set at run time, 0: cfg.top_k             */
    uint8_t *rt_enabled;       /* (E) runtime expert mask, 1 enabled          */
    uint8_t *rt_forced;        /* (E) experts forced on every token           */
    int      rt_n_forced;
    int64_t *bias_load;        /* (E) selections since the last bias update   */
    int64_t  capacity;         /* C of the last forward, 0 dropless           */
    double   balance_loss, z_loss; /* of the last forward, before coefficients */
    int      n_buffers;        /* state buffers (saved, not trained)          */
    moe_param buffers[1];
    float   *bmem;

    int64_t T;                 /* tokens of the last forward                  */
    const uint8_t *mask;       /* (B,N) token mask of the running forward, or NULL */
    int     image;             /* last forward was moe_layer_forward_image    */
    float  *img;               /* transposed image x/dx (T,D) then y/dy (T,O) */
    size_t  img_bytes;
    /* gradients gmem[grad_lo, grad_hi) (the experts') are scanned for NaN/Inf
     * by the backward itself, each expert's in its task while in cache; it
     * sets grad_bad when it finds one. layer.c scans the rest. */
    int64_t grad_lo, grad_hi;
    int     grad_bad;
    int     keep;              /* the running forward keeps what backward needs */
    int     cached;            /* a backward may follow the last forward       */
    int     cached_train;      /* ... which ran in train mode                  */
    char   *ws;                /* workspace (one allocation)                  */
    size_t  ws_bytes;

    /* expert parallelism (ep.h): NULL in one process */
    moe_ep     *ep;
    int64_t     g0, t0;        /* groups and tokens of the ranks before this one in
                                  the running forward: random draws are keyed by the
                                  global index, as one process draws them (0 in one process) */
    moe_ep_plan plan;          /* the exchange of the last forward            */
    float      *ep_mem;        /* rows received from the other ranks and their
                                  activations (grown with Rr)                 */
    size_t      ep_bytes;
};

/* Parameter or buffer i of the saved tensors: params first, then buffers. */
static inline moe_param *moe__saved_tensor(moe_layer *l, int i) {
    return i < l->n_params ? &l->params[i] : &l->buffers[i - l->n_params];
}

/* The expert-parallel rows buffer: at least bytes (grown, contents lost). */
moe_status moe__ep_reserve(moe_layer *l, size_t bytes);

/* Register a parameter; its storage is wmem + off once moe__layer_alloc ran.
 * Init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); N(0,1) (torch.randn) when
 * fan_in == 0; ones (a norm's gain) when fan_in < 0. */
moe_status moe__layer_add_param(moe_layer *l, const char *name, int ndim, const int64_t *shape,
                                int64_t off, int64_t fan_in);
/* Allocate parameter and gradient memory (n_weights floats each). */
moe_status moe__layer_alloc(moe_layer *l, int64_t n_weights);

/* Create a layer sharded over ep's ranks (ep is owned by the layer from here
 * on, freed with it, also on failure). */
moe_status moe__layer_create_ep(moe_layer **out, const moe_config *cfg, moe_ep *ep);
/* The same; init 0 leaves the parameters uninitialised (their values come
 * from a file next: moe__layer_load_fresh). */
moe_status moe__layer_create_opts(moe_layer **out, const moe_config *cfg, moe_ep *ep, int init);
/* Fill a layer created with init 0 from the safetensors file at path (the
 * checks of moe_layer_load; on error the layer holds partial values and the
 * caller frees it). */
moe_status moe__layer_load_fresh(moe_layer *l, const char *path);

/* A layer kind: what layer.c knows of it. Each kind's file defines its
 * moe_layer_kind; registry.c lists them; layer.c looks a kind up by type and
 * never names one. */
typedef struct moe_layer_kind {
    moe_layer_type type;
    const char *name;                       /* the config's "type"                    */
    void (*defaults)(moe_config *c);        /* moe_config_init's values for the kind  */
    /* validate cfg, set in/out dims and ops, register params */
    moe_status (*create)(moe_layer *l);
    int bf16;                               /* bf16 mixed precision implemented       */
    int masks;                              /* takes a token mask and images          */
    int (*rows_per_token)(const moe_layer *l); /* widest routed buffer, rows per token */
    /* Routing of the last forward, for tests (gradient checks hold it fixed):
     * copies up to cap int32s describing every discrete choice into dst and
     * returns how many there are; NULL for kinds without routing. */
    int64_t (*routing)(const moe_layer *l, int32_t *dst, int64_t cap);
} moe_layer_kind;

/* The kind of a type, or NULL (registry.c). */
const moe_layer_kind *moe__layer_kind(moe_layer_type type);
extern const moe_layer_kind moe__kind_dense, moe__kind_topk, moe__kind_gshard, moe__kind_hierarchical,
    moe__kind_soft_dynamic, moe__kind_soft;

/* Routing of the last forward (the kind's, 0 without one). */
int64_t moe__layer_routing(const moe_layer *l, int32_t *dst, int64_t cap);
/* Slots per token of the topk layer's assignment arrays (K or E, plus shared). */
int     moe__topk_slots(const moe_layer *l);

/* bf16 layers (cfg.bf16): make l->w16, the bf16 copy of the parameters
 * (allocated with them), again if the parameters' generation moved since it
 * was made. Every forward calls it before the layer's own forward; a
 * backward uses the copies its forward used. Nothing for fp32 layers. */
void moe__layer_bf16_refresh(moe_layer *l);

/* The bank of a layer: b's format from cfg.bf16 and the format's copies of
 * b->W1 and b->W2 (the layer's bf16 weight copies, l->w16, at the same
 * offsets as the fp32 weights in l->wmem). Call after setting b's parameters. */
struct moe_bank;
void moe__layer_bank(const moe_layer *l, struct moe_bank *b);

/* The last (or running) forward kept nothing for a backward and its experts
 * are MLPs: the expert bank then computed the activation in place, over the
 * pre-activation buffer (topk, soft), and the activation buffer holds
 * nothing of that forward. */
static inline int moe__act_in_place(const moe_layer *l) { return !l->keep && l->cfg.expert == MOE_EXPERT_MLP; }

#endif
