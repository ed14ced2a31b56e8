/*
 * The layer object all kinds share: creation from a config, the parameter
 * table, initialisation, input validation, workspace planning, forward and
 * backward dispatch, routing statistics, load and save.
 * Dimension key: T tokens, D model dim, H expert hidden dim, O output dim,
 * E experts, K top-k.
 */
#include "bank.h"
#include "layer_internal.h"
#include "ops.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- config */

void moe_config_init(moe_config *c, moe_layer_type type) {
    memset(c, 0, sizeof *c);
    c->type = type;
    c->num_experts = 4;
    c->input_dim = 64;
    c->hidden_dim = 128;
    c->output_dim = 64;
    c->top_k = 2;
    c->activation = MOE_ACT_RELU;
    c->leaky_slope = 0.01f;
    c->expert = MOE_EXPERT_MLP;
    c->seed = 0;
    c->num_experts_inner = 0;
    c->second_policy_train = MOE_SECOND_RANDOM;
    c->second_policy_eval = MOE_SECOND_RANDOM;
    c->second_threshold_train = 0.2;
    c->second_threshold_eval = 0.2;
    c->capacity_factor_train = 1.25;
    c->capacity_factor_eval = 2.0;
    c->loss_coef = 1e-2;
    c->expert_mult = 4.0;
    c->dropout = 0.0f;
    c->slots_per_expert = 0;
    c->router = MOE_ROUTER_TOKEN_CHOICE;
    c->score = MOE_SCORE_TOPK_SOFTMAX;
    c->route_scale = 1.0;
    const moe_layer_kind *k = moe__layer_kind(type);
    if (k && k->defaults) k->defaults(c); /* the kind's own defaults */
}

const char *moe_layer_type_name(moe_layer_type t) {
    const moe_layer_kind *k = moe__layer_kind(t);
    return k ? k->name : NULL;
}

const char *moe_score_func_name(moe_score_func f) {
    switch (f) {
    case MOE_SCORE_TOPK_SOFTMAX: return "topk_softmax";
    case MOE_SCORE_SOFTMAX: return "softmax";
    case MOE_SCORE_SIGMOID: return "sigmoid";
    }
    return NULL;
}

const char *moe_router_kind_name(moe_router_kind k) {
    switch (k) {
    case MOE_ROUTER_TOKEN_CHOICE: return "token_choice";
    case MOE_ROUTER_EXPERT_CHOICE: return "expert_choice";
    }
    return NULL;
}

moe_status moe_config_set_router(moe_config *c, const char *recipe) {
    if (!c || !recipe) return moe_err(MOE_ERR_ARG, "moe_config_set_router: NULL argument");
    static const char *const known = "topk, token_choice, switch, mixtral, st_moe, deepseek_v3, expert_choice";
    if (c->type != MOE_LAYER_TOPK)
        return moe_err(MOE_ERR_UNSUPPORTED, "router recipes are for topk layers, not %s",
                       moe_layer_type_name(c->type) ? moe_layer_type_name(c->type) : "?");
    moe_config d;
    moe_config_init(&d, MOE_LAYER_TOPK);
    /* start from seed 004's router, keep the sizes */
    c->router = d.router, c->score = d.score, c->normalize = 0, c->route_scale = 1.0;
    c->capacity_factor_train = c->capacity_factor_eval = 0.0;
    c->jitter = c->balance_coef = c->z_loss_coef = c->bias_update_rate = 0.0;
    c->expert_bias = 0;
    if (strcmp(recipe, "topk") == 0 || strcmp(recipe, "token_choice") == 0) {
        /* as initialised */
    } else if (strcmp(recipe, "switch") == 0) {
        c->top_k = 1, c->score = MOE_SCORE_SOFTMAX;
        c->capacity_factor_train = 1.25, c->capacity_factor_eval = 2.0;
        c->jitter = 0.01, c->balance_coef = 0.01;
    } else if (strcmp(recipe, "mixtral") == 0) {
        c->score = MOE_SCORE_SOFTMAX, c->normalize = 1, c->balance_coef = 0.01;
    } else if (strcmp(recipe, "st_moe") == 0) {
        c->score = MOE_SCORE_SOFTMAX, c->normalize = 1, c->balance_coef = 0.01, c->z_loss_coef = 1e-3;
        c->capacity_factor_train = 1.25, c->capacity_factor_eval = 2.0;
    } else if (strcmp(recipe, "deepseek_v3") == 0) {
        c->score = MOE_SCORE_SIGMOID, c->normalize = 1, c->expert_bias = 1, c->bias_update_rate = 1e-3;
    } else if (strcmp(recipe, "expert_choice") == 0) {
        c->router = MOE_ROUTER_EXPERT_CHOICE, c->score = MOE_SCORE_SOFTMAX;
        c->capacity_factor_train = c->capacity_factor_eval = 2.0;
    } else {
        return moe_err(MOE_ERR_ARG, "unknown router \"%s\" (known: %s)", recipe, known);
    }
    return MOE_OK;
}

const char *moe_second_policy_name(moe_second_policy p) {
    switch (p) {
    case MOE_SECOND_ALL: return "all";
    case MOE_SECOND_NONE: return "none";
    case MOE_SECOND_THRESHOLD: return "threshold";
    case MOE_SECOND_RANDOM: return "random";
    }
    return NULL;
}

const char *moe_activation_name(moe_activation a) {
    switch (a) {
    case MOE_ACT_RELU: return "relu";
    case MOE_ACT_GELU: return "gelu";
    case MOE_ACT_SILU: return "silu";
    case MOE_ACT_LEAKY_RELU: return "leaky_relu";
    }
    return NULL;
}

const char *moe_expert_kind_name(moe_expert_kind k) {
    switch (k) {
    case MOE_EXPERT_MLP: return "mlp";
    case MOE_EXPERT_SWIGLU: return "swiglu";
    case MOE_EXPERT_GEGLU: return "geglu";
    }
    return NULL;
}

/* ---------------------------------------------------------------- params */

moe_status moe__layer_add_param(moe_layer *l, const char *name, int ndim, const int64_t *shape,
                                int64_t off, int64_t fan_in) {
    if (l->n_params == l->cap_params) return moe_err(MOE_ERR_ARG, "internal: parameter table full");
    int i = l->n_params++;
    char *nm = l->names + (size_t)i * MOE_NAME_MAX;
    snprintf(nm, MOE_NAME_MAX, "%s", name);
    moe_param *p = &l->params[i];
    p->name = nm;
    p->ndim = ndim;
    p->numel = 1;
    for (int d = 0; d < ndim; d++) {
        p->shape[d] = shape[d];
        p->numel *= shape[d];
    }
    l->param_off[i] = off;
    l->fan_in[i] = fan_in;
    l->init_id[i] = l->next_init_id++;
    l->init_skip[i] = 0;
    l->global_dim0[i] = 0;
    l->init_normal[i] = fan_in == 0 ? 1 : fan_in < 0 ? 2 : 0;
    return MOE_OK;
}

moe_status moe__layer_alloc(moe_layer *l, int64_t n_weights) {
    size_t bytes;
    if (n_weights <= 0 || !moe_mul_size(&bytes, (size_t)n_weights, sizeof(float)))
        return moe_err(MOE_ERR_ARG, "layer too large: %lld parameters", (long long)n_weights);
    /* bf16 weights only: the experts' fp32 weights are never written, so
     * their pages are never touched (zero pages, no memory) */
    l->wmem = l->cfg.bf16 == MOE_BF16_WEIGHTS ? moe_calloc_lazy(bytes) : moe_alloc(bytes);
    l->gmem = moe_calloc_lazy(bytes); /* a forward-only run never touches the gradients */
    if (l->cfg.bf16) l->w16 = moe_alloc(bytes / 2); /* the bf16 copies: made now, so a forward cannot fail for them */
    if (!l->wmem || !l->gmem || (l->cfg.bf16 && !l->w16))
        return moe_err(MOE_ERR_NOMEM, "cannot allocate %zu bytes for %lld parameters", (l->cfg.bf16 ? 5 : 4) * bytes / 2,
                       (long long)n_weights);
    l->n_weights = n_weights;
    for (int i = 0; i < l->n_params; i++) {
        l->params[i].data = l->wmem + l->param_off[i];
        l->params[i].grad = l->gmem + l->param_off[i];
    }
    return MOE_OK;
}

void moe_layer_init_params(moe_layer *l, uint64_t seed) {
    if (!l) return;
    moe__params_bump();
    /* nn.Linear's default: weight kaiming_uniform(a=sqrt(5)) and bias both
     * come out as uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)). Parameter i draws
     * its own counter stream, so the values do not depend on memory layout. */
    for (int i = 0; i < l->n_params; i++) {
        moe_param *p = &l->params[i];
        float bound = 1.0f / sqrtf((float)l->fan_in[i]);
        uint64_t stream = moe_rng_u64(seed, 0x1000000ull + (uint64_t)l->init_id[i]);
        uint64_t j0 = (uint64_t)l->init_skip[i]; /* a slice of a tensor split over ranks */
        if (l->init_normal[i] == 2) { /* torch.ones (norm gains) */
            for (int64_t j = 0; j < p->numel; j++) p->data[j] = 1.0f;
            continue;
        }
        if (l->init_normal[i]) { /* torch.randn: N(0, 1), Box-Muller on two draws */
            for (int64_t j = 0; j < p->numel; j++) {
                double u1 = ((double)(moe_rng_u64(stream, 2 * (j0 + (uint64_t)j)) >> 11) + 1.0) * 0x1p-53;
                double u2 = (double)(moe_rng_u64(stream, 2 * (j0 + (uint64_t)j) + 1) >> 11) * 0x1p-53;
                p->data[j] = (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
            }
            continue;
        }
        for (int64_t j = 0; j < p->numel; j++)
            p->data[j] = (2.0f * moe_rng_uniform(stream, j0 + (uint64_t)j) - 1.0f) * bound;
    }
}

/* ---------------------------------------------------------------- lifecycle */

moe_status moe_layer_create(moe_layer **out, const moe_config *cfg) {
    moe_err_clear();
    return moe__layer_create_ep(out, cfg, NULL);
}

moe_status moe_layer_create_load(moe_layer **out, const moe_config *cfg, const char *path) {
    moe_err_clear();
    if (out) *out = NULL;
    if (!out || !cfg || !path) return moe_err(MOE_ERR_ARG, "moe_layer_create_load: NULL argument");
    moe_layer *l = NULL;
    moe_status st = moe__layer_create_opts(&l, cfg, NULL, 0); /* no random init: the file's values follow */
    if (st == MOE_OK) st = moe__layer_load_fresh(l, path);
    if (st != MOE_OK) {
        moe_layer_free(l);
        return st;
    }
    *out = l;
    return MOE_OK;
}

moe_status moe__layer_create_ep(moe_layer **out, const moe_config *cfg, moe_ep *ep) {
    return moe__layer_create_opts(out, cfg, ep, 1);
}

moe_status moe__layer_create_opts(moe_layer **out, const moe_config *cfg, moe_ep *ep, int init) {
    if (!out || !cfg) {
        if (ep) ep->free(ep);
        return moe_err(MOE_ERR_ARG, "moe_layer_create: NULL argument");
    }
    *out = NULL;
    if (ep && (cfg->num_experts < 1 || cfg->num_experts > 65536)) ep->free(ep), ep = NULL;
    if (cfg->num_experts < 1)
        return moe_err(MOE_ERR_ARG, "num_experts must be >= 1, got %d", cfg->num_experts);
    if (cfg->bf16 < 0 || cfg->bf16 > MOE_BF16_WEIGHTS || (cfg->bf16 == MOE_BF16_WEIGHTS && (init || ep))) {
        if (ep) ep->free(ep);
        if (cfg->bf16 == MOE_BF16_WEIGHTS)
            return moe_err(MOE_ERR_ARG, "a bf16-weights-only layer (bf16 = MOE_BF16_WEIGHTS) is made from its weights "
                                        "file, in one process: use moe_layer_create_load");
        return moe_err(MOE_ERR_ARG, "bf16 must be 0, 1 or MOE_BF16_WEIGHTS (2), got %d", cfg->bf16);
    }
    const moe_layer_kind *kind = moe__layer_kind(cfg->type);
    if (!kind) {
        if (ep) ep->free(ep);
        return moe_err(MOE_ERR_ARG, "unknown layer type %d", (int)cfg->type);
    }
    if (cfg->bf16 && !kind->bf16) {
        char with[128] = ""; /* the kinds that have it: "a, b and c" */
        int n = 0, have = 0;
        for (int t = 0; t < 64; t++) have += moe__layer_kind((moe_layer_type)t) && moe__layer_kind((moe_layer_type)t)->bf16;
        for (int t = 0; t < 64; t++) {
            const moe_layer_kind *o = moe__layer_kind((moe_layer_type)t);
            if (!o || !o->bf16) continue;
            size_t u = strlen(with);
            snprintf(with + u, sizeof with - u, "%s%s", n == 0 ? "" : n == have - 1 ? " and " : ", ", o->name);
            n++;
        }
        if (ep) ep->free(ep);
        return moe_err(MOE_ERR_UNSUPPORTED, "bf16 mixed precision is implemented for %s layers, not %s: set bf16 "
                                            "to false (fp32)", with, kind->name);
    }
    if (cfg->num_experts > 65536)
        return moe_err(MOE_ERR_ARG, "num_experts = %d is more than the supported 65536", cfg->num_experts);
    if (cfg->input_dim < 1 || cfg->input_dim > INT_MAX / 4) {
        if (ep) ep->free(ep);
        return moe_err(MOE_ERR_ARG, "input_dim must be in [1, %d], got %lld", INT_MAX / 4,
                       (long long)cfg->input_dim);
    }

    moe_layer *l = moe_calloc(sizeof *l);
    if (!l) {
        if (ep) ep->free(ep);
        return moe_err(MOE_ERR_NOMEM, "cannot allocate the layer");
    }
    l->cfg = *cfg;
    l->ep = ep;
    int E = cfg->num_experts;
    int ns = cfg->num_shared > 0 && cfg->num_shared <= 1024 ? cfg->num_shared : 0; /* topk's shared experts */
    l->cap_params = 4 * E + 3 + 4 * ns + 1;
    l->params = moe_calloc((size_t)l->cap_params * sizeof *l->params);
    l->param_off = moe_calloc((size_t)l->cap_params * sizeof *l->param_off);
    l->fan_in = moe_calloc((size_t)l->cap_params * sizeof *l->fan_in);
    l->names = moe_calloc((size_t)l->cap_params * MOE_NAME_MAX);
    l->init_normal = moe_calloc((size_t)l->cap_params);
    l->init_id = moe_calloc((size_t)l->cap_params * sizeof *l->init_id);
    l->init_skip = moe_calloc((size_t)l->cap_params * sizeof *l->init_skip);
    l->global_dim0 = moe_calloc((size_t)l->cap_params * sizeof *l->global_dim0);
    l->n_expert_counts = E; /* the kind's create may count more (hierarchical: Eo * Ei) */
    moe_status st = MOE_OK;
    if (!l->params || !l->param_off || !l->fan_in || !l->names || !l->init_normal || !l->init_id ||
        !l->init_skip || !l->global_dim0)
        st = moe_err(MOE_ERR_NOMEM, "cannot allocate the parameter table");
    else
        st = kind->create(l);
    if (st == MOE_OK && !(l->expert_counts = moe_calloc((size_t)l->n_expert_counts * sizeof *l->expert_counts)))
        st = moe_err(MOE_ERR_NOMEM, "cannot allocate the routing statistics");
    if (st != MOE_OK) {
        moe_layer_free(l);
        return st;
    }
    if (init) moe_layer_init_params(l, cfg->seed);
    *out = l;
    return MOE_OK;
}

void moe_layer_free(moe_layer *l) {
    if (!l) return;
    moe_free(l->params);
    moe_free(l->param_off);
    moe_free(l->fan_in);
    moe_free(l->names);
    moe_free(l->init_normal);
    moe_free(l->init_id);
    moe_free(l->init_skip);
    moe_free(l->global_dim0);
    moe_ep_plan_free(&l->plan);
    moe_free(l->ep_mem);
    if (l->ep) l->ep->free(l->ep);
    if (l->cfg.bf16 == MOE_BF16_WEIGHTS) moe_free_lazy(l->wmem);
    else moe_free(l->wmem);
    moe_free(l->w16);
    moe_free_lazy(l->gmem);
    moe_free(l->expert_counts);
    moe_free(l->rt_enabled);
    moe_free(l->rt_forced);
    moe_free(l->bias_load);
    moe_free(l->bmem);
    moe_free(l->ws);
    moe_free(l->img);
    moe_free(l);
}

const moe_config *moe_layer_config(const moe_layer *l) { return l ? &l->cfg : NULL; }
int64_t moe_layer_input_dim(const moe_layer *l) { return l ? l->in_dim : 0; }
int64_t moe_layer_output_dim(const moe_layer *l) { return l ? l->out_dim : 0; }
int moe_layer_has_aux_loss(const moe_layer *l) { return l ? l->has_aux : 0; }
int moe_layer_num_params(const moe_layer *l) { return l ? l->n_params : 0; }
int moe_layer_num_buffers(const moe_layer *l) { return l ? l->n_buffers : 0; }
moe_param *moe_layer_buffer(moe_layer *l, int i) {
    return (l && i >= 0 && i < l->n_buffers) ? &l->buffers[i] : NULL;
}
int64_t moe_layer_num_weights(const moe_layer *l) { return l ? l->n_weights : 0; }

moe_param *moe_layer_param(moe_layer *l, int i) {
    moe__params_bump(); /* the caller may write through the pointer */
    return (l && i >= 0 && i < l->n_params) ? &l->params[i] : NULL;
}

moe_param *moe_layer_find_param(moe_layer *l, const char *name) {
    moe__params_bump();
    if (!l || !name) return NULL;
    for (int i = 0; i < l->n_params; i++)
        if (strcmp(l->params[i].name, name) == 0) return &l->params[i];
    return NULL;
}

void moe_layer_params_changed(moe_layer *l) { (void)l, moe__params_bump(); }

void moe__layer_bf16_refresh(moe_layer *l) {
    uint64_t gen = moe__params_gen();
    /* not a bf16 layer, or fresh; bf16 weights only: the copies are the weights */
    if (!l->w16 || l->w16_gen == gen || l->cfg.bf16 == MOE_BF16_WEIGHTS) return;
    moe_to_bf16_par(l->w16, l->wmem, l->n_weights);
    l->w16_gen = gen;
}

void moe__layer_bank(const moe_layer *l, moe_bank *b) {
    b->fmt = moe_bank_format_of(l->cfg.bf16);
    /* the format's weights: the bf16 copies sit at the fp32 weights' offsets */
    b->W1q = b->fmt->lowp && l->w16 ? l->w16 + (b->W1 - l->wmem) : NULL;
    b->W2q = b->fmt->lowp && l->w16 ? l->w16 + (b->W2 - l->wmem) : NULL;
}

void moe_layer_zero_grad(moe_layer *l) {
    if (l && l->gmem) memset(l->gmem, 0, (size_t)l->n_weights * sizeof(float));
}

/* ---------------------------------------------------------------- forward/backward */

moe_status moe__ep_reserve(moe_layer *l, size_t bytes) {
    if (bytes <= l->ep_bytes) return MOE_OK;
    float *m = moe_alloc(bytes);
    if (!m) return moe_err(MOE_ERR_NOMEM, "cannot allocate %zu bytes for the rows of the other ranks", bytes);
    moe_free(l->ep_mem);
    l->ep_mem = m;
    l->ep_bytes = bytes;
    return MOE_OK;
}

static moe_status reserve(moe_layer *l, int64_t B, int64_t N) {
    size_t bytes = l->ops->workspace_bytes(l, B, N);
    if (bytes == 0 && B * N == 0) bytes = 64; /* a rank with no tokens (expert parallel) */
    if (bytes == 0 || bytes == SIZE_MAX)
        return moe_err(MOE_ERR_ARG, "batch of %lld x %lld tokens is too large for this layer", (long long)B,
                       (long long)N);
    if (bytes <= l->ws_bytes) return MOE_OK;
    char *ws = moe_alloc(bytes);
    if (!ws) return moe_err(MOE_ERR_NOMEM, "cannot allocate %zu bytes of workspace for %lld x %lld tokens",
                            bytes, (long long)B, (long long)N);
    moe_free(l->ws);
    l->ws = ws;
    l->ws_bytes = bytes;
    l->cached = 0; /* the old cache went with the old workspace */
    return MOE_OK;
}

/* ---------------------------------------------------------------- non-finite results */

/* Threads of the library's parallel regions (the result checks' clock counts
 * thread-seconds: a threaded scan's wall time times this). */
static int moe_layer_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}


/* Largest |v| over the finite entries of v (n). */
static float finite_absmax(const float *v, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(v[i]) && fabsf(v[i]) > m) m = fabsf(v[i]);
    return m;
}

/* The likely cause of a non-finite result, appended to msg (cap bytes): a
 * non-finite parameter, or the first intermediate of the forward (backward)
 * that holds a NaN or Inf, with the largest magnitudes of the call's input
 * in (n_in: x or dy) and of the parameters. */
static void explain_nonfinite(moe_layer *l, int backward, const float *in, int64_t n_in, char *msg, size_t cap) {
    size_t o = strlen(msg);
    float pmax = 0.0f;
    const char *pname = "";
    for (int i = 0; i < l->n_params + l->n_buffers; i++) {
        const moe_param *p = moe__saved_tensor(l, i);
        int64_t bad = moe_find_nonfinite(p->data, p->numel);
        if (bad >= 0) {
            snprintf(msg + o, cap - o, ": parameter '%s' element %lld is %s (load or set finite weights)", p->name,
                     (long long)bad, isnan(p->data[bad]) ? "NaN" : "Inf");
            return;
        }
        float m = finite_absmax(p->data, p->numel);
        if (m > pmax) pmax = m, pname = p->name;
    }
    moe_probe pr[MOE_MAX_PROBES];
    int n = l->ops->probes ? l->ops->probes(l, backward, pr) : 0;
    const char *where = "", *kind = "Inf";
    int64_t row = 0, col = 0;
    for (int i = 0; i < n && !*where; i++) {
        int64_t bad = pr[i].v ? moe_find_nonfinite(pr[i].v, pr[i].rows * pr[i].cols) : -1;
        if (bad >= 0)
            where = pr[i].name, row = bad / pr[i].cols, col = bad % pr[i].cols, kind = isnan(pr[i].v[bad]) ? "NaN" : "Inf";
    }
    if (*where) {
        int w = snprintf(msg + o, cap - o, ": the first non-finite intermediate is the %s (row %lld col %lld is %s)",
                         where, (long long)row, (long long)col, kind);
        o += w > 0 && (size_t)w < cap - o ? (size_t)w : 0;
    }
    snprintf(msg + o, cap - o, ": float32 overflow%s; |%s| reaches %.3g and the parameters %.3g (in '%s'): scale "
             "them down or lower the learning rate", strcmp(kind, "NaN") ? "" : " (or 0/0 after underflow)",
             backward ? "dy" : "x", finite_absmax(in, n_in), pmax, pname);
}

/* MOE_ERR_NONFINITE naming element `bad` of tensor `name` (rows of `cols`)
 * and the likely cause. */
static moe_status nonfinite_result(moe_layer *l, int backward, const float *in, int64_t n_in, const char *name,
                                   const float *v, int64_t bad, int64_t cols) {
    char msg[900];
    snprintf(msg, sizeof msg, "%s[%lld][%lld] is %s although the %s and the parameters are finite", name,
             (long long)(bad / cols), (long long)(bad % cols), isnan(v[bad]) ? "NaN" : "Inf",
             backward ? "gradient dy" : "input x");
    explain_nonfinite(l, backward, in, n_in, msg, sizeof msg);
    return moe_err(MOE_ERR_NONFINITE, "%s", msg);
}

/* aux_loss of the topk router: which loss term left float32's range. */
static moe_status nonfinite_aux(moe_layer *l, float aux, const float *x) {
    const moe_config *c = &l->cfg;
    double zl = c->z_loss_coef * l->z_loss, bal = c->balance_coef * l->balance_loss;
    const char *what = isnan(aux) ? "NaN" : "Inf";
    if (!isfinite((float)zl)) /* the router terms (topk); 0 for the other kinds */
        return moe_err(MOE_ERR_NONFINITE, "aux_loss is %s although the input x and the parameters are finite: the "
                       "z-loss overflowed float32 (z_loss_coef * mean logsumexp(z)^2 = %.3g): gate logits reach "
                       "%.3g; scale the gate input or weights down", what, zl, sqrt(fabs(l->z_loss)));
    if (!isfinite((float)bal))
        return moe_err(MOE_ERR_NONFINITE, "aux_loss is %s although the input x and the parameters are finite: the "
                       "balance loss is %.3g", what, bal);
    char msg[900];
    snprintf(msg, sizeof msg, "aux_loss is %s although the input x and the parameters are finite", what);
    explain_nonfinite(l, 0, x, l->T * l->in_dim, msg, sizeof msg);
    return moe_err(MOE_ERR_NONFINITE, "%s", msg);
}

/* The caller's side of a forward, checked on this rank. */
static moe_status check_forward(moe_layer *l, const float *y, const float *x, const uint8_t *mask, int64_t B,
                                int64_t N, int flags) {
    if (flags & ~(MOE_TRAIN | MOE_NO_GRAD))
        return moe_err(MOE_ERR_ARG, "forward flags 0x%x: only MOE_TRAIN (1) and MOE_NO_GRAD (2) are defined",
                       (unsigned)flags);
    /* expert parallel: a rank may have no tokens (it still serves its experts) */
    if (l->ep && B >= 0 && N >= 0 && B * N == 0) return MOE_OK;
    if (!y || !x) return moe_err(MOE_ERR_ARG, "moe_layer_forward: NULL y or x");
    if (B <= 0 || N <= 0)
        return moe_err(MOE_ERR_ARG, "empty batch: x has %lld x %lld tokens; forward needs at least one row",
                       (long long)B, (long long)N);
    const moe_layer_kind *kind = moe__layer_kind(l->cfg.type);
    if (mask && !kind->masks)
        return moe_err(MOE_ERR_UNSUPPORTED, "a token mask is only taken by the soft layers (soft_dynamic, soft), "
                                            "not by a %s layer", moe_layer_type_name(l->cfg.type));
    /* rows per token in the widest routed buffer: K (topk), 2 (gshard), 4 (hierarchical) */
    int K = kind->rows_per_token ? kind->rows_per_token(l) : 1;
    if (B > INT32_MAX / K / N || B * N > INT64_MAX / l->in_dim / l->out_dim)
        return moe_err(MOE_ERR_ARG, "batch of %lld x %lld tokens is too large (max %d)", (long long)B,
                       (long long)N, INT32_MAX / K);
    int64_t bad = moe_find_nonfinite(x, B * N * l->in_dim);
    if (bad >= 0)
        return moe_err(MOE_ERR_NONFINITE, "x[%lld][%lld] is %s: inputs must be finite",
                       (long long)(bad / l->in_dim), (long long)(bad % l->in_dim),
                       isnan(x[bad]) ? "NaN" : "Inf");
    return MOE_OK;
}

/* Validate, reserve, run, check. x (B,N,D) token-major; mask (B,N) or NULL.
 * Expert parallel: every rank gets here in step and the statuses are agreed
 * before and after the exchanges, so one rank's bad input or overflow is
 * every rank's error and none waits in a collective. */
static moe_status run_forward(moe_layer *l, float *y, float *aux_loss, const float *x, const uint8_t *mask,
                              int64_t B, int64_t N, int flags) {
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_forward: NULL layer");
    moe_status st = check_forward(l, y, x, mask, B, N, flags);
    if (st == MOE_OK && B * N == 0) B = 0, N = 1; /* no tokens on this rank */
    if (st == MOE_OK) st = reserve(l, B, N);
    if (l->ep) st = l->ep->agree(l->ep, st);
    if (st != MOE_OK) return st;
    int64_t T = B * N;
    if (l->ep) { /* where this rank's groups and tokens sit in the global batch */
        int64_t v[2] = {B, T};
        st = l->ep->agree(l->ep, l->ep->exscan_i64(l->ep, v, 2));
        if (st != MOE_OK) return st;
        l->g0 = v[0], l->t0 = v[1];
    }
    int train = flags & MOE_TRAIN;
    l->B = B;
    l->N = N;
    l->mask = mask;
    l->keep = !(flags & MOE_NO_GRAD);
    l->cached = 0;
    moe__layer_bf16_refresh(l); /* bf16 layers: weight copies of the current parameters */
    st = l->ops->forward(l, y, aux_loss, x, T, train);
    l->mask = NULL;
    l->forward_calls++;
    if (st != MOE_OK) return st;
    if (aux_loss && !l->has_aux) *aux_loss = 0.0f;
    l->T = T;
    /* the results, checked once: overflow from finite inputs must not pass silently */
    double t0 = moe__clock();
    int64_t bad = T ? moe_find_nonfinite(y, T * l->out_dim) : -1;
    moe__check_add((moe__clock() - t0) * moe_layer_threads());
    if (bad >= 0) st = nonfinite_result(l, 0, x, T * l->in_dim, "y", y, bad, l->out_dim);
    else if (aux_loss && !isfinite(*aux_loss)) st = nonfinite_aux(l, *aux_loss, x);
    if (l->ep) st = l->ep->agree(l->ep, st);
    if (st != MOE_OK) return st;
    l->cached = l->keep;
    l->cached_train = train;
    return MOE_OK;
}

moe_status moe_layer_forward_seq(moe_layer *l, float *y, float *aux_loss, const float *x, int64_t B,
                                 int64_t N, int flags) {
    return moe_layer_forward_masked(l, y, aux_loss, x, NULL, B, N, flags);
}

moe_status moe_layer_forward(moe_layer *l, float *y, float *aux_loss, const float *x, int64_t T,
                             int flags) {
    return moe_layer_forward_masked(l, y, aux_loss, x, NULL, 1, T, flags);
}

moe_status moe_layer_forward_masked(moe_layer *l, float *y, float *aux_loss, const float *x,
                                    const uint8_t *mask, int64_t B, int64_t N, int flags) {
    moe_err_clear();
    moe_status st = run_forward(l, y, aux_loss, x, mask, B, N, flags);
    if (st == MOE_OK) l->image = 0;
    return st;
}

/* dst (B, C, N) <- src (B, N, C), or the reverse with to_tokens. */
static void transpose_batch(float *dst, const float *src, int64_t B, int64_t N, int64_t C, int to_tokens) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++) {
            const float *s = src + b * N * C;
            float *d = dst + b * N * C;
            for (int64_t n = 0; n < N; n++) {
                if (to_tokens) d[n * C + c] = s[c * N + n];
                else d[c * N + n] = s[n * C + c];
            }
        }
}

moe_status moe_layer_forward_image(moe_layer *l, float *y, float *aux_loss, const float *x,
                                   const uint8_t *mask, int64_t B, int64_t h, int64_t w, int flags) {
    moe_err_clear();
    if (!l || !y || !x) return moe_err(MOE_ERR_ARG, "moe_layer_forward_image: NULL layer, y or x");
    if (B <= 0 || h <= 0 || w <= 0)
        return moe_err(MOE_ERR_ARG, "empty batch: image input is %lld x D x %lld x %lld; forward needs at "
                                    "least one pixel", (long long)B, (long long)h, (long long)w);
    if (h > INT32_MAX / w || B > INT32_MAX / (h * w))
        return moe_err(MOE_ERR_ARG, "image batch of %lld x %lld x %lld is too large", (long long)B,
                       (long long)h, (long long)w);
    int64_t N = h * w, T = B * N, D = l->in_dim, O = l->out_dim;
    /* img holds x (then dx) as (T,D) followed by y (then dy) as (T,O) */
    size_t need, a, b;
    if (!moe_mul_size(&a, (size_t)T, (size_t)D) || !moe_mul_size(&b, (size_t)T, (size_t)O) ||
        !moe_add_size(&need, a, b) || !moe_mul_size(&need, need, sizeof(float)))
        return moe_err(MOE_ERR_ARG, "image batch of %lld x %lld x %lld is too large", (long long)B,
                       (long long)h, (long long)w);
    if (need > l->img_bytes) {
        float *img = moe_alloc(need);
        if (!img) return moe_err(MOE_ERR_NOMEM, "cannot allocate %zu bytes for the image layout", need);
        moe_free(l->img);
        l->img = img;
        l->img_bytes = need;
    }
    float *xt = l->img, *yt = l->img + T * D;
    transpose_batch(xt, x, B, N, D, 1);
    moe_status st = run_forward(l, yt, aux_loss, xt, mask, B, N, flags);
    if (st != MOE_OK && st != MOE_ERR_NONFINITE) return st;
    transpose_batch(y, yt, B, N, O, 0); /* also a non-finite y, to inspect */
    if (st != MOE_OK) return st;
    l->image = 1;
    return MOE_OK;
}

/* After a backward from dy (T,O): dx (T,D) (NULL: not asked) and the parameter gradients. */
static moe_status check_backward_results(moe_layer *l, const float *dx, const float *dy) {
    int64_t bad, n_dy = l->T * l->out_dim;
    double t0 = moe__clock();
    /* the experts' gradients were scanned in their tasks (grad_bad); dx and the rest here */
    int ok = (!dx || moe_find_nonfinite(dx, l->T * l->in_dim) < 0) && !l->grad_bad &&
             moe_find_nonfinite(l->gmem, l->grad_lo) < 0 &&
             moe_find_nonfinite(l->gmem + l->grad_hi, l->n_weights - l->grad_hi) < 0;
    moe__check_add((moe__clock() - t0) * moe_layer_threads());
    if (ok) return MOE_OK;
    if (dx && (bad = moe_find_nonfinite(dx, l->T * l->in_dim)) >= 0)
        return nonfinite_result(l, 1, dy, n_dy, "dx", dx, bad, l->in_dim);
    if ((bad = moe_find_nonfinite(l->gmem, l->n_weights)) < 0) return MOE_OK;
    for (int i = 0; i < l->n_params; i++) {
        const moe_param *p = &l->params[i];
        if (bad < l->param_off[i] || bad >= l->param_off[i] + p->numel) continue;
        char name[MOE_NAME_MAX + 8];
        int64_t cols = p->ndim ? p->shape[p->ndim - 1] : 1;
        snprintf(name, sizeof name, "grad.%s", p->name);
        return nonfinite_result(l, 1, dy, n_dy, name, p->grad, bad - l->param_off[i], cols);
    }
    return moe_err(MOE_ERR_NONFINITE, "a parameter gradient is not finite"); /* not reached */
}

moe_status moe_layer_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_backward: NULL layer");
    moe_status st = MOE_OK;
    int64_t bad;
    if (!dy && l->T > 0)
        st = moe_err(MOE_ERR_ARG, "moe_layer_backward: NULL dy");
    else if (l->cfg.bf16 == MOE_BF16_WEIGHTS)
        st = moe_err(MOE_ERR_UNSUPPORTED, "a bf16-weights-only layer is for inference (its experts have no fp32 "
                                          "weights to train): create it with bf16 = 1 to train");
    else if (!l->cached)
        st = moe_err(MOE_ERR_STATE, "backward needs a forward that keeps its activations first (there was "
                                    "none, it failed, it ran with MOE_NO_GRAD, or the routing changed since)");
    else if (l->T && (bad = moe_find_nonfinite(dy, l->T * l->out_dim)) >= 0)
        st = moe_err(MOE_ERR_NONFINITE, "dy[%lld][%lld] is %s: gradients must be finite",
                     (long long)(bad / l->out_dim), (long long)(bad % l->out_dim), isnan(dy[bad]) ? "NaN" : "Inf");
    else if (!isfinite(daux))
        st = moe_err(MOE_ERR_NONFINITE, "daux is not finite");
    if (l->ep) st = l->ep->agree(l->ep, st);
    if (st != MOE_OK) return st;
    l->grad_bad = 0;
    if (l->image) { /* dy (B,O,N) -> token-major, dx back to (B,D,N) */
        int64_t N = l->N, B = l->B;
        float *dxt = l->img, *dyt = l->img + l->T * l->in_dim;
        transpose_batch(dyt, dy, B, N, l->out_dim, 1);
        st = l->ops->backward(l, dx ? dxt : NULL, dyt, daux);
        if (st == MOE_OK) st = check_backward_results(l, dx ? dxt : NULL, dyt);
        if (dx) transpose_batch(dx, dxt, B, N, l->in_dim, 0);
    } else {
        st = l->ops->backward(l, dx, dy, daux);
        if (st == MOE_OK) st = check_backward_results(l, l->T ? dx : NULL, dy);
    }
    if (l->ep) st = l->ep->agree(l->ep, st);
    return st;
}

int64_t moe__layer_routing(const moe_layer *l, int32_t *dst, int64_t cap) {
    if (!l || !l->ws || l->T == 0) return 0;
    const moe_layer_kind *kind = moe__layer_kind(l->cfg.type);
    return kind->routing ? kind->routing(l, dst, cap) : 0;
}

moe_status moe_layer_stats(const moe_layer *l, moe_stats *out) {
    if (!l || !out) return moe_err(MOE_ERR_ARG, "moe_layer_stats: NULL argument");
    out->tokens = l->T;
    out->assignments = l->assignments;
    out->dropped = l->dropped;
    out->second_candidates = l->second_candidates;
    out->second_kept = l->second_kept;
    out->n_experts = l->n_expert_counts;
    out->expert_counts = l->expert_counts;
    int topk = l->cfg.type == MOE_LAYER_TOPK;
    out->top_k = topk && l->cfg.router == MOE_ROUTER_TOKEN_CHOICE ? (l->rt_k ? l->rt_k : l->cfg.top_k) : 0;
    out->capacity = topk ? l->capacity : 0;
    out->balance_loss = topk ? l->balance_loss : 0.0;
    out->z_loss = topk ? l->z_loss : 0.0;
    out->expert_bias = l->n_buffers ? l->bmem : NULL;
    return MOE_OK;
}

uint64_t moe_layer_rng_position(const moe_layer *l) { return l ? l->forward_calls : 0; }
void moe_layer_set_rng_position(moe_layer *l, uint64_t pos) {
    if (l) l->forward_calls = pos;
}

