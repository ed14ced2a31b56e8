/*
 * The byte-level MoE transformer (see lm.h): embeddings, L pre-norm blocks of
 * causal self-attention with RoPE (attn.h) and an MoE layer, the final norm,
 * head and cross-entropy; forward, backward and cached one-token decoding.
 * The MoE blocks are libmoe layers; the projections are moe_sgemm (oneDNN).
 * Dimension key: B sequences, S positions, T = B*S tokens, D model dim,
 * NH heads, V vocabulary (256), L blocks.
 */
#include "lm.h"

#include "attn.h"

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
    /* views into w: emb (V,D); per block an (D), qkv (3D,D), wo (D,D), mn (D)
     * at stride blk; gf (D); Wh (V,D) */
    float *emb, *blk0, *gf, *Wh;
    int64_t blk;            /* floats per block: 2D + 4D*D                      */
    moe_param *params;      /* (n_params) the whole table                       */
    char *names;            /* (n_params * NAME_MAX_LEN)                        */
    int n_params;
    /* activations for B_cap sequences of S_cap positions */
    int64_t T_cap, P_cap, B, S, T;
    int cached;
    uint8_t *tok, *tgt;     /* (T) (T)                                          */
    float *x;               /* (2L+1, T, D) residual stream: x[2l] block input, x[2l+1] after attention */
    float *hn;              /* (2L, T, D) normalised inputs of attention (2l) and MoE (2l+1) */
    float *rinv;            /* (2L+1, T) 1/rms of x[i] (index 2L: the final norm) */
    float *qkv;             /* (L, T, 3D) after RoPE                            */
    float *P;               /* (L, B, NH, S, S) attention probabilities         */
    float *att;             /* (L, T, D) attention output, before Wo            */
    float *hf;              /* (T, D)                                           */
    float *logits, *dlogits;/* (T, V)                                           */
    float *mo, *dx, *dh;    /* (T, D) scratch                                   */
    float *dqkv;            /* (T, 3D)                                          */
    float *work;            /* (B, NH, S, S) attention backward scratch          */
    double aux;
    int dp;                 /* data-parallel ranks (lm_set_data_parallel), 1 */
    int *owner;             /* (n_params) the layer of each table entry, -1 own */
    int *owner_index;       /* (n_params) its index in that layer            */
    /* decoding: key/value cache (L, S, 2D) [k | v] and one-token scratch */
    float *kv, *dec;        /* dec: (N, 3D) + (N, D) * 3 + (S), N = group copies */
    int64_t pos, dec_N;
};

#define AN(m, l) ((m)->blk0 + (l) * (m)->blk)                       /* (D)    */
#define WQKV(m, l) (AN(m, l) + (m)->cfg.D)                         /* (3D,D) */
#define WO(m, l) (WQKV(m, l) + 3 * (m)->cfg.D * (m)->cfg.D)        /* (D,D)  */
#define MN(m, l) (WO(m, l) + (m)->cfg.D * (m)->cfg.D)              /* (D)    */
#define GRAD(m, p) ((m)->g + ((p) - (m)->w))

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

int lm_config_check(const lm_config *c, char *msg, size_t msg_len) {
    const char *why = NULL;
    char buf[160];
    if (c->S < 1 || c->S > 65536) why = "the context (--context) must be 1..65536 bytes";
    else if (c->D < 2 || c->D > 65536) why = "the model dim (--dim) must be 2..65536";
    else if (c->L < 1 || c->L > 256) why = "the number of blocks (--blocks) must be 1..256";
    else if (c->heads < 1 || c->D % c->heads || (c->D / c->heads) % 2) {
        snprintf(buf, sizeof buf, "--dim %lld must split into --heads %lld heads of an even size",
                 (long long)c->D, (long long)c->heads);
        why = buf;
    } else if (!(c->rope_theta > 1.0) || !isfinite(c->rope_theta)) why = "rope_theta must be a finite number > 1";
    else if (c->group < 1) why = "the group size must be >= 1";
    if (why && msg && msg_len) snprintf(msg, msg_len, "%s", why);
    return why ? -1 : 0;
}

moe_status lm_create(lm **out, const lm_config *cfg) {
    *out = NULL;
    if (lm_config_check(cfg, NULL, 0)) return MOE_ERR_ARG;
    lm *m = calloc(1, sizeof *m);
    if (!m) return MOE_ERR_NOMEM;
    m->cfg = *cfg;
    int64_t V = LM_VOCAB, D = cfg->D, L = cfg->L;
    m->layers = calloc((size_t)L, sizeof *m->layers);
    moe_status st = m->layers ? MOE_OK : MOE_ERR_NOMEM;
    int n_layer_params = 0;
    for (int64_t l = 0; l < L && st == MOE_OK; l++) {
        moe_config lc = cfg->moe;
        lc.input_dim = D;
        if (lc.type == MOE_LAYER_DENSE) lc.output_dim = D; /* a residual block: D in, D out */
        lc.seed = cfg->moe.seed + 1000003ull * (uint64_t)(l + 1);
        st = g_creator ? g_creator(&m->layers[l], &lc) : moe_layer_create(&m->layers[l], &lc);
        if (st == MOE_OK) n_layer_params += moe_layer_num_params(m->layers[l]);
    }
    m->blk = 2 * D + 4 * D * D;
    m->n_own = V * D + L * m->blk + D + V * D;
    if (st == MOE_OK) {
        m->w = calloc((size_t)m->n_own, sizeof(float));
        m->g = calloc((size_t)m->n_own, sizeof(float));
        int cap = n_layer_params + 3 + 4 * (int)L;
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
    /* own parameters: views into w (gradients at the same offsets in g), in table order */
    uint64_t seed = cfg->moe.seed;
    int64_t s2[2], s1[1] = {D};
    char name[NAME_MAX_LEN];
    m->emb = m->w, m->blk0 = m->w + V * D;
    m->gf = m->blk0 + L * m->blk, m->Wh = m->gf + D;
    s2[0] = V, s2[1] = D;
    add_param(m, "emb.weight", 2, s2, m->emb, GRAD(m, m->emb));
    init_normal(m->emb, V * D, seed ^ 0xE1); /* nn.Embedding: N(0, 1) */
    double bound = 1.0 / sqrt((double)D);    /* nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) */
    for (int64_t l = 0; l < L; l++) {
        uint64_t sl = seed ^ (0x100ull * (uint64_t)(l + 1));
        for (int64_t i = 0; i < D; i++) AN(m, l)[i] = MN(m, l)[i] = 1.0f;
        init_uniform(WQKV(m, l), 3 * D * D, bound, sl ^ 0xA1);
        init_uniform(WO(m, l), D * D, bound, sl ^ 0xA2);
        snprintf(name, sizeof name, "blocks.%lld.attn_norm.weight", (long long)l);
        add_param(m, name, 1, s1, AN(m, l), GRAD(m, AN(m, l)));
        s2[0] = 3 * D, s2[1] = D;
        snprintf(name, sizeof name, "blocks.%lld.attn.qkv.weight", (long long)l);
        add_param(m, name, 2, s2, WQKV(m, l), GRAD(m, WQKV(m, l)));
        s2[0] = D;
        snprintf(name, sizeof name, "blocks.%lld.attn.out.weight", (long long)l);
        add_param(m, name, 2, s2, WO(m, l), GRAD(m, WO(m, l)));
        snprintf(name, sizeof name, "blocks.%lld.moe_norm.weight", (long long)l);
        add_param(m, name, 1, s1, MN(m, l), GRAD(m, MN(m, l)));
        for (int i = 0; i < moe_layer_num_params(m->layers[l]); i++) {
            moe_param *p = moe_layer_param(m->layers[l], i);
            snprintf(name, sizeof name, "blocks.%lld.moe.%s", (long long)l, p->name);
            add_param(m, name, p->ndim, p->shape, p->data, p->grad);
            m->owner[m->n_params - 1] = (int)l, m->owner_index[m->n_params - 1] = i;
        }
    }
    add_param(m, "norm_f.weight", 1, s1, m->gf, GRAD(m, m->gf));
    for (int64_t i = 0; i < D; i++) m->gf[i] = 1.0f;
    s2[0] = V, s2[1] = D;
    add_param(m, "head.weight", 2, s2, m->Wh, GRAD(m, m->Wh));
    init_uniform(m->Wh, V * D, bound, seed ^ 0xE4);
    m->pos = 0;
    *out = m;
    return MOE_OK;
}

static void free_acts(lm *m) {
    free(m->tok), free(m->tgt), free(m->x), free(m->hn), free(m->rinv), free(m->qkv), free(m->P), free(m->att);
    free(m->hf), free(m->logits), free(m->dlogits), free(m->mo), free(m->dx), free(m->dh), free(m->dqkv);
    free(m->work);
    m->tok = m->tgt = NULL;
    m->x = m->hn = m->rinv = m->qkv = m->P = m->att = m->hf = m->logits = m->dlogits = NULL;
    m->mo = m->dx = m->dh = m->dqkv = m->work = NULL;
    m->T_cap = m->P_cap = 0;
}

void lm_free(lm *m) {
    if (!m) return;
    for (int64_t l = 0; m->layers && l < m->cfg.L; l++) moe_layer_free(m->layers[l]);
    free(m->layers), free(m->w), free(m->g), free(m->params), free(m->names), free(m->owner), free(m->owner_index);
    free_acts(m);
    free(m->kv), free(m->dec);
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

double lm_macs_per_token(const lm *m, int64_t S) {
    const lm_config *c = &m->cfg;
    const moe_config *q = &c->moe;
    double D = (double)c->D, H = (double)q->hidden_dim, E = q->num_experts, K = q->top_k;
    double glu = q->expert == MOE_EXPERT_MLP ? 2.0 : 3.0; /* matrices of D*H per expert */
    double ffn;
    switch (q->type) {
    case MOE_LAYER_TOPK: ffn = D * E + (K + q->num_shared) * glu * D * H; break;
    case MOE_LAYER_GSHARD: ffn = D * E + 2.0 * 2.0 * D * H; break;        /* top-2 of MLP experts */
    case MOE_LAYER_HIERARCHICAL:
        ffn = D * E + 2.0 * (D * q->num_experts_inner + 2.0 * 2.0 * D * H); break;
    default: { /* soft layers: every slot one expert row, slots ~ tokens; dense: E experts */
        double hid = H > 0 ? H : D * q->expert_mult;
        ffn = (q->type == MOE_LAYER_DENSE ? E : 1.0) * glu * D * hid + D * E;
    }
    }
    double attn = 4.0 * D * D + 2.0 * D * (double)(S + 1) / 2.0;
    return (double)c->L * (attn + ffn) + D * LM_VOCAB;
}

/* ---------------------------------------------------------------- buffers */

static moe_status reserve(lm *m, int64_t B, int64_t S) {
    int64_t T = B * S, NH = m->cfg.heads, PS = B * NH * S * S;
    if (T <= m->T_cap && PS <= m->P_cap) return MOE_OK;
    int64_t D = m->cfg.D, L = m->cfg.L, V = LM_VOCAB;
    if (T < m->T_cap) T = m->T_cap;
    if (PS < m->P_cap) PS = m->P_cap;
    free_acts(m);
    size_t F = sizeof(float), t = (size_t)T, d = (size_t)D, l = (size_t)L;
    m->tok = malloc(t), m->tgt = malloc(t);
    m->x = malloc((2 * l + 1) * t * d * F), m->hn = malloc(2 * l * t * d * F), m->rinv = malloc((2 * l + 1) * t * F);
    m->qkv = malloc(l * t * 3 * d * F), m->P = malloc(l * (size_t)PS * F), m->att = malloc(l * t * d * F);
    m->hf = malloc(t * d * F), m->logits = malloc(t * (size_t)V * F), m->dlogits = malloc(t * (size_t)V * F);
    m->mo = malloc(t * d * F), m->dx = malloc(t * d * F), m->dh = malloc(t * d * F);
    m->dqkv = malloc(t * 3 * d * F), m->work = malloc((size_t)PS * F);
    m->cached = 0;
    if (!m->tok || !m->tgt || !m->x || !m->hn || !m->rinv || !m->qkv || !m->P || !m->att || !m->hf || !m->logits ||
        !m->dlogits || !m->mo || !m->dx || !m->dh || !m->dqkv || !m->work) {
        free_acts(m);
        return MOE_ERR_NOMEM;
    }
    m->T_cap = T, m->P_cap = PS;
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

/* ---------------------------------------------------------------- forward/backward */

static int has_groups(const lm *m) {
    moe_layer_type t = m->cfg.moe.type;
    return t != MOE_LAYER_TOPK && t != MOE_LAYER_DENSE;
}

/* Cross-entropy of logits z (V) against target y; argmax in *best. */
static double xent(const float *z, int y, int *best) {
    int b = 0;
    for (int v = 1; v < LM_VOCAB; v++)
        if (z[v] > z[b]) b = v;
    *best = b;
    double s = 0;
    for (int v = 0; v < LM_VOCAB; v++) s += exp((double)z[v] - z[b]);
    return log(s) + z[b] - z[y];
}

moe_status lm_forward(lm *m, double *loss, float *ce, uint8_t *pred, const uint8_t *tok, const uint8_t *tgt,
                      int64_t B, int64_t S, int train) {
    int64_t D = m->cfg.D, L = m->cfg.L, V = LM_VOCAB, NH = m->cfg.heads, T = B * S;
    int64_t N = has_groups(m) ? m->cfg.group : T;
    m->cached = 0;
    if (B < 1 || S < 1 || S > m->cfg.S || T % N) return MOE_ERR_ARG;
    moe_status st = reserve(m, B, S);
    if (st != MOE_OK) return st;
    int64_t PS = B * NH * S * S;
    memcpy(m->tok, tok, (size_t)T);
    if (tgt) memcpy(m->tgt, tgt, (size_t)T);
    for (int64_t t = 0; t < T; t++) memcpy(m->x + t * D, m->emb + (int64_t)tok[t] * D, (size_t)D * sizeof(float));
    m->aux = 0;
    for (int64_t l = 0; l < L; l++) {
        float *x0 = m->x + 2 * l * T * D, *x1 = x0 + T * D, *x2 = x1 + T * D;
        float *ha = m->hn + 2 * l * T * D, *hm = ha + T * D, *qkv = m->qkv + l * T * 3 * D;
        float *att = m->att + l * T * D, aux = 0;
        /* attention */
        rmsnorm(ha, m->rinv + 2 * l * T, x0, AN(m, l), T, D);
        moe_sgemm(0, 1, T, 3 * D, D, 1, ha, D, WQKV(m, l), D, 0, qkv, 3 * D);
        attn_rope(qkv, B, S, 0, D, NH, m->cfg.rope_theta, 1);
        attn_forward(att, m->P + l * PS, qkv, B, S, D, NH);
        memcpy(x1, x0, (size_t)(T * D) * sizeof(float));
        moe_sgemm(0, 1, T, D, D, 1, att, D, WO(m, l), D, 1, x1, D);
        /* MoE; eval (validation, sampling) keeps nothing for a backward */
        rmsnorm(hm, m->rinv + (2 * l + 1) * T, x1, MN(m, l), T, D);
        st = moe_layer_forward_seq(m->layers[l], m->mo, &aux, hm, T / N, N, train ? MOE_TRAIN : MOE_EVAL | MOE_NO_GRAD);
        if (st != MOE_OK) return st;
        for (int64_t i = 0; i < T * D; i++) x2[i] = x1[i] + m->mo[i];
        m->aux += aux;
    }
    rmsnorm(m->hf, m->rinv + 2 * L * T, m->x + 2 * L * T * D, m->gf, T, D);
    moe_sgemm(0, 1, T, V, D, 1, m->hf, D, m->Wh, D, 0, m->logits, V);
    double sum = 0;
    for (int64_t t = 0; t < T; t++) {
        int best;
        double c = xent(m->logits + t * V, tgt ? tgt[t] : 0, &best);
        if (pred) pred[t] = (uint8_t)best;
        if (!tgt) continue;
        if (ce) ce[t] = (float)c;
        sum += c;
    }
    /* data parallel: this rank's share of the global loss (lm_set_data_parallel) */
    if (loss) *loss = (tgt ? sum / (double)T + m->aux : m->aux) / (double)m->dp;
    m->B = B, m->S = S, m->T = T;
    m->cached = train && tgt;
    return MOE_OK;
}

moe_status lm_backward(lm *m) {
    if (!m->cached) return MOE_ERR_STATE;
    int64_t B = m->B, S = m->S, T = m->T, D = m->cfg.D, L = m->cfg.L, V = LM_VOCAB, NH = m->cfg.heads;
    int64_t PS = B * NH * S * S;
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
    moe_sgemm(1, 0, V, D, T, 1, m->dlogits, V, m->hf, D, 1, GRAD(m, m->Wh), D);
    moe_sgemm(0, 0, T, D, V, 1, m->dlogits, V, m->Wh, D, 0, m->dh, D);
    memset(m->dx, 0, (size_t)(T * D) * sizeof(float));
    rmsnorm_backward(m->dx, GRAD(m, m->gf), m->dh, m->x + 2 * L * T * D, m->rinv + 2 * L * T, m->gf, T, D);
    for (int64_t l = L - 1; l >= 0; l--) {
        float *x0 = m->x + 2 * l * T * D, *x1 = x0 + T * D, *ha = m->hn + 2 * l * T * D;
        float *qkv = m->qkv + l * T * 3 * D, *att = m->att + l * T * D;
        /* x2 = x1 + MoE(RMSNorm(x1)): dx1 = dx2 + RMSNorm'(MoE'^T dx2) */
        moe_status st = moe_layer_backward(m->layers[l], m->dh, m->dx, 1.0f / (float)m->dp);
        if (st != MOE_OK) return st;
        rmsnorm_backward(m->dx, GRAD(m, MN(m, l)), m->dh, x1, m->rinv + (2 * l + 1) * T, MN(m, l), T, D);
        /* x1 = x0 + att Wo^T */
        moe_sgemm(1, 0, D, D, T, 1, m->dx, D, att, D, 1, GRAD(m, WO(m, l)), D);
        moe_sgemm(0, 0, T, D, D, 1, m->dx, D, WO(m, l), D, 0, m->mo, D); /* d att */
        attn_backward(m->dqkv, m->work, m->mo, qkv, m->P + l * PS, B, S, D, NH);
        attn_rope(m->dqkv, B, S, 0, D, NH, m->cfg.rope_theta, -1);
        moe_sgemm(1, 0, 3 * D, D, T, 1, m->dqkv, 3 * D, ha, D, 1, GRAD(m, WQKV(m, l)), D);
        moe_sgemm(0, 0, T, D, 3 * D, 1, m->dqkv, 3 * D, WQKV(m, l), D, 0, m->dh, D);
        rmsnorm_backward(m->dx, GRAD(m, AN(m, l)), m->dh, x0, m->rinv + 2 * l * T, AN(m, l), T, D);
    }
    float *gemb = GRAD(m, m->emb);
    for (int64_t t = 0; t < T; t++) { /* in token order: deterministic */
        float *dst = gemb + (int64_t)m->tok[t] * D;
        const float *src = m->dx + t * D;
        for (int64_t k = 0; k < D; k++) dst[k] += src[k];
    }
    return MOE_OK;
}

/* ---------------------------------------------------------------- decoding */

moe_status lm_decode_reset(lm *m) {
    int64_t D = m->cfg.D, L = m->cfg.L, S = m->cfg.S, N = has_groups(m) ? m->cfg.group : 1;
    if (!m->kv) {
        m->dec_N = N;
        m->kv = malloc((size_t)(L * S * 2 * D) * sizeof(float));
        m->dec = malloc((size_t)(N * 3 * D + 3 * N * D + S) * sizeof(float));
        if (!m->kv || !m->dec) {
            free(m->kv), free(m->dec);
            m->kv = m->dec = NULL;
            return MOE_ERR_NOMEM;
        }
    }
    if (!m->logits || m->T_cap < N) { /* logits of one token (N copies) */
        moe_status st = reserve(m, N, 1);
        if (st != MOE_OK) return st;
    }
    m->cached = 0;
    m->pos = 0;
    return MOE_OK;
}

int64_t lm_decode_pos(const lm *m) { return m->pos; }

moe_status lm_decode(lm *m, uint8_t tok) {
    int64_t D = m->cfg.D, L = m->cfg.L, S = m->cfg.S, NH = m->cfg.heads, V = LM_VOCAB, N = m->dec_N, p = m->pos;
    if (!m->kv || p >= S) return MOE_ERR_ARG;
    m->cached = 0;
    /* dec: x (D), a (D), qkv (3D), o (D), w (S); the MoE input/output (N, D) in hn/mo */
    float *x = m->dec, *a = x + D, *qkv = a + D, *o = qkv + 3 * D, *w = o + D, r;
    memcpy(x, m->emb + (int64_t)tok * D, (size_t)D * sizeof(float));
    for (int64_t l = 0; l < L; l++) {
        float *kc = m->kv + l * S * 2 * D, aux = 0;
        rmsnorm(a, &r, x, AN(m, l), 1, D);
        moe_sgemm(0, 1, 1, 3 * D, D, 1, a, D, WQKV(m, l), D, 0, qkv, 3 * D);
        attn_rope(qkv, 1, 1, p, D, NH, m->cfg.rope_theta, 1);
        memcpy(kc + p * 2 * D, qkv + D, (size_t)(2 * D) * sizeof(float)); /* k | v of this position */
        attn_decode(o, w, qkv, kc, kc + D, 2 * D, p + 1, D, NH);
        moe_sgemm(0, 1, 1, D, D, 1, o, D, WO(m, l), D, 1, x, D);
        rmsnorm(a, &r, x, MN(m, l), 1, D);
        for (int64_t j = 0; j < N; j++) memcpy(m->hn + j * D, a, (size_t)D * sizeof(float));
        moe_status st = moe_layer_forward_seq(m->layers[l], m->mo, &aux, m->hn, 1, N, MOE_EVAL | MOE_NO_GRAD);
        if (st != MOE_OK) return st;
        for (int64_t i = 0; i < D; i++) x[i] += m->mo[i];
    }
    rmsnorm(a, &r, x, m->gf, 1, D);
    moe_sgemm(0, 1, 1, V, D, 1, a, D, m->Wh, D, 0, m->logits, V);
    m->pos = p + 1;
    return MOE_OK;
}
