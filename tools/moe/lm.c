/*
 * The MoE character language model (see lm.h): embeddings, projection,
 * L residual MoE blocks, head and cross-entropy, forward and backward.
 * The MoE blocks are libmoe layers; the rest is moe_sgemm (oneDNN) and loops.
 * Dimension key: T tokens, W window, C embedding dim, D model dim,
 * V vocabulary (256), L blocks.
 */
#include "lm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME_MAX_LEN 96
static const float k_rms_eps = 1e-5f;

struct lm {
    lm_config cfg;
    moe_layer **layers;     /* (L)                                              */
    float *w, *g;           /* own parameters and their gradients (n_own)        */
    int64_t n_own;
    float *emb, *Wp, *bp, *gn, *gf, *Wh, *bh; /* views into w: (V,C) (D,WC) (D) (L,D) (D) (V,D) (V) */
    moe_param *params;      /* (n_params) the whole table                       */
    char *names;            /* (n_params * NAME_MAX_LEN)                        */
    int n_params;
    /* activations for T_cap tokens */
    int64_t T_cap, T;
    int cached;
    uint8_t *ctx, *tgt;     /* (T,W) (T)                                        */
    float *e;               /* (T, W*C)                                         */
    float *x;               /* (L+1, T, D) residual stream                      */
    float *h;               /* (L, T, D) normalised block inputs                */
    float *rinv;            /* (L+1, T) 1/rms of x_l (index L: the final norm)  */
    float *hf;              /* (T, D)                                           */
    float *logits, *dlogits;/* (T, V)                                           */
    float *mo, *dx, *dh;    /* (T, D) scratch                                   */
    float *de;              /* (T, W*C)                                         */
    double aux;
    int dp;                 /* data-parallel ranks (lm_set_data_parallel), 1 */
    int *owner;             /* (n_params) the layer of each table entry, -1 own */
    int *owner_index;       /* (n_params) its index in that layer            */
};

static lm_layer_creator g_creator;

lm_layer_creator lm_set_layer_creator(lm_layer_creator fn) {
    lm_layer_creator old = g_creator;
    g_creator = fn;
    return old;
}

void lm_set_data_parallel(lm *m, int P) { m->dp = P > 1 ? P : 1; }

int lm_param_layer(const lm *m, int i, int *layer_index) {
    if (layer_index) *layer_index = m->owner_index[i];
    return m->owner[i];
}

moe_status lm_sum_grads(lm *m, int (*sum)(float *v, int64_t n)) {
    if (m->dp <= 1) return MOE_OK;
    if (sum(m->g, m->n_own)) return MOE_ERR_IO;
    for (int64_t l = 0; l < m->cfg.L; l++) {
        moe_status st = moe_layer_allreduce_grads(m->layers[l]);
        if (st != MOE_OK) return st;
    }
    return MOE_OK;
}

/* ---------------------------------------------------------------- init */

static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double unif(uint64_t seed, uint64_t i) { /* [0, 1) */
    return (double)(mix(seed * 0x9E3779B97F4A7C15ull + i + 1) >> 11) * 0x1p-53;
}
static void init_uniform(float *p, int64_t n, double bound, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) p[i] = (float)((2.0 * unif(seed, (uint64_t)i) - 1.0) * bound);
}
static void init_normal(float *p, int64_t n, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) {
        double u1 = unif(seed, 2 * (uint64_t)i) + 0x1p-54, u2 = unif(seed, 2 * (uint64_t)i + 1);
        p[i] = (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
}

static moe_param *add_param(lm *m, const char *name, int ndim, const int64_t *shape, float *data, float *grad) {
    moe_param *p = &m->params[m->n_params];
    m->owner[m->n_params] = -1, m->owner_index[m->n_params] = 0;
    char *nm = m->names + (size_t)m->n_params * NAME_MAX_LEN;
    snprintf(nm, NAME_MAX_LEN, "%s", name);
    p->name = nm;
    p->ndim = ndim;
    p->numel = 1;
    for (int d = 0; d < ndim; d++) p->shape[d] = shape[d], p->numel *= shape[d];
    p->data = data;
    p->grad = grad;
    m->n_params++;
    return p;
}

moe_status lm_create(lm **out, const lm_config *cfg) {
    *out = NULL;
    if (cfg->W < 1 || cfg->W > 4096 || cfg->C < 1 || cfg->C > 4096 || cfg->D < 1 || cfg->D > 65536 || cfg->L < 1 ||
        cfg->L > 256 || cfg->group < 1)
        return MOE_ERR_ARG;
    lm *m = calloc(1, sizeof *m);
    if (!m) return MOE_ERR_NOMEM;
    m->cfg = *cfg;
    int64_t V = LM_VOCAB, W = cfg->W, C = cfg->C, D = cfg->D, L = cfg->L;
    m->layers = calloc((size_t)L, sizeof *m->layers);
    moe_status st = m->layers ? MOE_OK : MOE_ERR_NOMEM;
    int n_layer_params = 0;
    for (int64_t l = 0; l < L && st == MOE_OK; l++) {
        moe_config lc = cfg->moe;
        lc.input_dim = D;
        lc.seed = cfg->moe.seed + 1000003ull * (uint64_t)(l + 1);
        st = g_creator ? g_creator(&m->layers[l], &lc) : moe_layer_create(&m->layers[l], &lc);
        if (st == MOE_OK) n_layer_params += moe_layer_num_params(m->layers[l]);
    }
    m->n_own = V * C + D * W * C + D + L * D + D + V * D + V;
    if (st == MOE_OK) {
        m->w = calloc((size_t)m->n_own, sizeof(float));
        m->g = calloc((size_t)m->n_own, sizeof(float));
        int cap = n_layer_params + 7 + (int)L;
        m->params = calloc((size_t)cap, sizeof *m->params);
        m->names = calloc((size_t)cap, NAME_MAX_LEN);
        m->owner = calloc((size_t)cap, sizeof *m->owner), m->owner_index = calloc((size_t)cap, sizeof *m->owner_index);
        if (!m->w || !m->g || !m->params || !m->names || !m->owner || !m->owner_index) st = MOE_ERR_NOMEM;
        m->dp = 1;
    }
    if (st != MOE_OK) {
        lm_free(m);
        return st;
    }
    /* own parameters: views into w (and g at the same offsets), in table order */
    int64_t o = 0;
    float *gr;
#define VIEW(ptr, n) (m->ptr = m->w + o, gr = m->g + o, o += (n))
    uint64_t seed = cfg->moe.seed;
    int64_t s2[2], s1[1] = {D};
    char name[NAME_MAX_LEN];
    VIEW(emb, V * C);
    s2[0] = V, s2[1] = C;
    add_param(m, "emb.weight", 2, s2, m->emb, gr);
    init_normal(m->emb, V * C, seed ^ 0xE1); /* nn.Embedding: N(0, 1) */
    VIEW(Wp, D * W * C);
    s2[0] = D, s2[1] = W * C;
    add_param(m, "proj.weight", 2, s2, m->Wp, gr);
    init_uniform(m->Wp, D * W * C, 1.0 / sqrt((double)(W * C)), seed ^ 0xE2);
    VIEW(bp, D);
    add_param(m, "proj.bias", 1, s1, m->bp, gr);
    init_uniform(m->bp, D, 1.0 / sqrt((double)(W * C)), seed ^ 0xE3);
    VIEW(gn, L * D);
    float *gn_grad = gr;
    for (int64_t i = 0; i < L * D; i++) m->gn[i] = 1.0f;
    for (int64_t l = 0; l < L; l++) {
        snprintf(name, sizeof name, "blocks.%lld.norm.weight", (long long)l);
        add_param(m, name, 1, s1, m->gn + l * D, gn_grad + l * D);
        for (int i = 0; i < moe_layer_num_params(m->layers[l]); i++) {
            moe_param *p = moe_layer_param(m->layers[l], i);
            snprintf(name, sizeof name, "blocks.%lld.moe.%s", (long long)l, p->name);
            add_param(m, name, p->ndim, p->shape, p->data, p->grad);
            m->owner[m->n_params - 1] = (int)l, m->owner_index[m->n_params - 1] = i;
        }
    }
    VIEW(gf, D);
    add_param(m, "norm_f.weight", 1, s1, m->gf, gr);
    for (int64_t i = 0; i < D; i++) m->gf[i] = 1.0f;
    VIEW(Wh, V * D);
    s2[0] = V, s2[1] = D;
    add_param(m, "head.weight", 2, s2, m->Wh, gr);
    init_uniform(m->Wh, V * D, 1.0 / sqrt((double)D), seed ^ 0xE4);
    VIEW(bh, V);
    s1[0] = V;
    add_param(m, "head.bias", 1, s1, m->bh, gr);
    init_uniform(m->bh, V, 1.0 / sqrt((double)D), seed ^ 0xE5);
#undef VIEW
    *out = m;
    return MOE_OK;
}

void lm_free(lm *m) {
    if (!m) return;
    for (int64_t l = 0; m->layers && l < m->cfg.L; l++) moe_layer_free(m->layers[l]);
    free(m->layers), free(m->w), free(m->g), free(m->params), free(m->names), free(m->owner), free(m->owner_index);
    free(m->ctx), free(m->tgt), free(m->e), free(m->x), free(m->h), free(m->rinv), free(m->hf);
    free(m->logits), free(m->dlogits), free(m->mo), free(m->dx), free(m->dh), free(m->de);
    free(m);
}

const lm_config *lm_get_config(const lm *m) { return &m->cfg; }
int lm_num_params(const lm *m) { return m->n_params; }
moe_param *lm_params(lm *m) { return m->params; }
moe_layer *lm_layer(lm *m, int64_t l) { return l >= 0 && l < m->cfg.L ? m->layers[l] : NULL; }
const float *lm_logits(const lm *m) { return m->logits; }

int64_t lm_num_weights(const lm *m) {
    int64_t n = 0;
    for (int i = 0; i < m->n_params; i++) n += m->params[i].numel;
    return n;
}

void lm_zero_grad(lm *m) {
    memset(m->g, 0, (size_t)m->n_own * sizeof(float));
    for (int64_t l = 0; l < m->cfg.L; l++) moe_layer_zero_grad(m->layers[l]);
}

/* ---------------------------------------------------------------- buffers */

static moe_status reserve(lm *m, int64_t T) {
    if (T <= m->T_cap) return MOE_OK;
    int64_t W = m->cfg.W, WC = W * m->cfg.C, D = m->cfg.D, L = m->cfg.L, V = LM_VOCAB;
    free(m->ctx), free(m->tgt), free(m->e), free(m->x), free(m->h), free(m->rinv), free(m->hf);
    free(m->logits), free(m->dlogits), free(m->mo), free(m->dx), free(m->dh), free(m->de);
    size_t F = sizeof(float), t = (size_t)T;
    m->ctx = malloc(t * (size_t)W), m->tgt = malloc(t);
    m->e = malloc(t * (size_t)WC * F), m->de = malloc(t * (size_t)WC * F);
    m->x = malloc((size_t)(L + 1) * t * (size_t)D * F), m->h = malloc((size_t)L * t * (size_t)D * F);
    m->rinv = malloc((size_t)(L + 1) * t * F), m->hf = malloc(t * (size_t)D * F);
    m->logits = malloc(t * (size_t)V * F), m->dlogits = malloc(t * (size_t)V * F);
    m->mo = malloc(t * (size_t)D * F), m->dx = malloc(t * (size_t)D * F), m->dh = malloc(t * (size_t)D * F);
    m->cached = 0;
    if (!m->ctx || !m->tgt || !m->e || !m->de || !m->x || !m->h || !m->rinv || !m->hf || !m->logits ||
        !m->dlogits || !m->mo || !m->dx || !m->dh) {
        m->T_cap = 0;
        return MOE_ERR_NOMEM;
    }
    m->T_cap = T;
    return MOE_OK;
}

/* ---------------------------------------------------------------- norms */

static void rmsnorm(float *y, float *rinv, const float *x, const float *g, int64_t T, int64_t D) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        double ss = 0;
        for (int64_t k = 0; k < D; k++) ss += (double)xr[k] * xr[k];
        float r = (float)(1.0 / sqrt(ss / (double)D + k_rms_eps));
        rinv[t] = r;
        for (int64_t k = 0; k < D; k++) y[t * D + k] = xr[k] * r * g[k];
    }
}

/* dx (T,D) += backward of rmsnorm given dy; dg (D) += sum_t dy * x * r. */
static void rmsnorm_backward(float *dx, float *dg, const float *dy, const float *x, const float *rinv,
                             const float *g, int64_t T, int64_t D) {
    for (int64_t t = 0; t < T; t++) /* in token order: deterministic sums */
        for (int64_t k = 0; k < D; k++) dg[k] += dy[t * D + k] * x[t * D + k] * rinv[t];
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * D, *dr = dy + t * D;
        float r = rinv[t], dot = 0;
        for (int64_t k = 0; k < D; k++) dot += xr[k] * g[k] * dr[k];
        float c = r * r * r * dot / (float)D;
        for (int64_t k = 0; k < D; k++) dx[t * D + k] += r * g[k] * dr[k] - xr[k] * c;
    }
}

static void add_bias(float *y, const float *b, int64_t T, int64_t N) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < N; k++) y[t * N + k] += b[k];
}
static void colsum_acc(float *db, const float *g, int64_t T, int64_t N) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < N; k++) db[k] += g[t * N + k];
}

/* ---------------------------------------------------------------- forward/backward */

static int has_groups(const lm *m) {
    moe_layer_type t = m->cfg.moe.type;
    return t != MOE_LAYER_TOPK && t != MOE_LAYER_DENSE;
}

moe_status lm_forward(lm *m, double *loss, float *ce, uint8_t *pred, const uint8_t *ctx, const uint8_t *tgt,
                      int64_t T, int train) {
    int64_t W = m->cfg.W, C = m->cfg.C, WC = W * C, D = m->cfg.D, L = m->cfg.L, V = LM_VOCAB;
    int64_t N = has_groups(m) ? m->cfg.group : T;
    if (T < 1 || T % N) return MOE_ERR_ARG;
    moe_status st = reserve(m, T);
    if (st != MOE_OK) return st;
    m->cached = 0;
    memcpy(m->ctx, ctx, (size_t)(T * W));
    if (tgt) memcpy(m->tgt, tgt, (size_t)T);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < W; j++) memcpy(m->e + t * WC + j * C, m->emb + (int64_t)ctx[t * W + j] * C, C * 4);
    moe_sgemm(0, 1, T, D, WC, 1, m->e, WC, m->Wp, WC, 0, m->x, D);
    add_bias(m->x, m->bp, T, D);
    m->aux = 0;
    for (int64_t l = 0; l < L; l++) {
        float *xl = m->x + l * T * D, *hl = m->h + l * T * D, *xn = xl + T * D, aux = 0;
        rmsnorm(hl, m->rinv + l * T, xl, m->gn + l * D, T, D);
        /* eval (validation, sampling) keeps nothing for a backward */
        st = moe_layer_forward_seq(m->layers[l], m->mo, &aux, hl, T / N, N, train ? MOE_TRAIN : MOE_EVAL | MOE_NO_GRAD);
        if (st != MOE_OK) return st;
        for (int64_t i = 0; i < T * D; i++) xn[i] = xl[i] + m->mo[i];
        m->aux += aux;
    }
    rmsnorm(m->hf, m->rinv + L * T, m->x + L * T * D, m->gf, T, D);
    moe_sgemm(0, 1, T, V, D, 1, m->hf, D, m->Wh, D, 0, m->logits, V);
    add_bias(m->logits, m->bh, T, V);
    double sum = 0;
    for (int64_t t = 0; t < T; t++) {
        const float *z = m->logits + t * V;
        int64_t best = 0;
        for (int64_t v = 1; v < V; v++)
            if (z[v] > z[best]) best = v;
        if (pred) pred[t] = (uint8_t)best;
        if (!tgt) continue;
        double s = 0;
        for (int64_t v = 0; v < V; v++) s += exp((double)z[v] - z[best]);
        double c = log(s) + z[best] - z[tgt[t]];
        if (ce) ce[t] = (float)c;
        sum += c;
    }
    /* data parallel: this rank's share of the global loss (lm_set_data_parallel) */
    if (loss) *loss = (tgt ? sum / (double)T + m->aux : m->aux) / (double)m->dp;
    m->T = T;
    m->cached = train && tgt;
    return MOE_OK;
}

moe_status lm_backward(lm *m) {
    if (!m->cached) return MOE_ERR_STATE;
    int64_t T = m->T, W = m->cfg.W, C = m->cfg.C, WC = W * C, D = m->cfg.D, L = m->cfg.L, V = LM_VOCAB;
    float *gemb = m->g + (m->emb - m->w), *gWp = m->g + (m->Wp - m->w), *gbp = m->g + (m->bp - m->w);
    float *ggn = m->g + (m->gn - m->w), *ggf = m->g + (m->gf - m->w), *gWh = m->g + (m->Wh - m->w);
    float *gbh = m->g + (m->bh - m->w);
    /* cross-entropy: dz = (softmax - onehot) / T */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *z = m->logits + t * V;
        float *dz = m->dlogits + t * V, mx = z[0];
        for (int64_t v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
        double s = 0;
        for (int64_t v = 0; v < V; v++) s += exp((double)z[v] - mx);
        float Tg = (float)(T * m->dp); /* the mean over the global batch */
        for (int64_t v = 0; v < V; v++) dz[v] = (float)(exp((double)z[v] - mx) / s) / Tg;
        dz[m->tgt[t]] -= 1.0f / Tg;
    }
    moe_sgemm(1, 0, V, D, T, 1, m->dlogits, V, m->hf, D, 1, gWh, D);
    colsum_acc(gbh, m->dlogits, T, V);
    moe_sgemm(0, 0, T, D, V, 1, m->dlogits, V, m->Wh, D, 0, m->dh, D);
    memset(m->dx, 0, (size_t)(T * D) * sizeof(float));
    rmsnorm_backward(m->dx, ggf, m->dh, m->x + L * T * D, m->rinv + L * T, m->gf, T, D);
    for (int64_t l = L - 1; l >= 0; l--) {
        /* x_{l+1} = x_l + MoE(h_l): dx_l = dx_{l+1} + rmsnorm'(dMoE^T dx_{l+1}) */
        moe_status st = moe_layer_backward(m->layers[l], m->dh, m->dx, 1.0f / (float)m->dp);
        if (st != MOE_OK) return st;
        rmsnorm_backward(m->dx, ggn + l * D, m->dh, m->x + l * T * D, m->rinv + l * T, m->gn + l * D, T, D);
    }
    moe_sgemm(1, 0, D, WC, T, 1, m->dx, D, m->e, WC, 1, gWp, WC);
    colsum_acc(gbp, m->dx, T, D);
    moe_sgemm(0, 0, T, WC, D, 1, m->dx, D, m->Wp, WC, 0, m->de, WC);
    for (int64_t t = 0; t < T; t++) /* in token order: deterministic */
        for (int64_t j = 0; j < W; j++) {
            float *dst = gemb + (int64_t)m->ctx[t * W + j] * C;
            const float *src = m->de + t * WC + j * C;
            for (int64_t k = 0; k < C; k++) dst[k] += src[k];
        }
    return MOE_OK;
}
