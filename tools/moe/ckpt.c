/*
 * Checkpoints of the MoE language model: see ckpt.h for the layout.
 * JSON through cJSON; tensors through libmoe's safetensors reader/writer.
 */
#include "ckpt.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const k_types[] = {"dense", "topk", "gshard", "hierarchical", "soft_dynamic", "soft"};
static const char *const k_experts[] = {"mlp", "swiglu", "geglu"};
static const char *const k_acts[] = {"relu", "gelu", "silu", "leaky_relu"};
static const char *const k_pols[] = {"all", "none", "threshold", "random"};

static int lookup(const char *s, const char *const *names, int n) {
    for (int i = 0; s && i < n; i++)
        if (!strcmp(s, names[i])) return i;
    return -1;
}

char *ckpt_config_json(const lm_config *c) {
    cJSON *o = cJSON_CreateObject(), *y = cJSON_CreateObject();
    if (!o || !y) {
        cJSON_Delete(o), cJSON_Delete(y);
        return NULL;
    }
    cJSON_AddStringToObject(o, "model", "transformer");
    cJSON_AddNumberToObject(o, "context", (double)c->S);
    cJSON_AddNumberToObject(o, "dim", (double)c->D);
    cJSON_AddNumberToObject(o, "heads", (double)c->heads);
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddNumberToObject(o, "blocks", (double)c->L);
    cJSON_AddNumberToObject(o, "group", (double)c->group);
    cJSON_AddBoolToObject(o, "dense", c->dense);
    const moe_config *m = &c->moe;
    cJSON_AddStringToObject(y, "type", k_types[m->type]);
    cJSON_AddNumberToObject(y, "num_experts", m->num_experts);
    cJSON_AddNumberToObject(y, "num_experts_inner", m->num_experts_inner);
    cJSON_AddNumberToObject(y, "top_k", m->top_k);
    cJSON_AddNumberToObject(y, "hidden_dim", (double)m->hidden_dim);
    cJSON_AddStringToObject(y, "expert", k_experts[m->expert]);
    cJSON_AddStringToObject(y, "activation", k_acts[m->activation]);
    cJSON_AddNumberToObject(y, "leaky_slope", m->leaky_slope);
    cJSON_AddStringToObject(y, "second_policy_train", k_pols[m->second_policy_train]);
    cJSON_AddStringToObject(y, "second_policy_eval", k_pols[m->second_policy_eval]);
    cJSON_AddNumberToObject(y, "second_threshold_train", m->second_threshold_train);
    cJSON_AddNumberToObject(y, "second_threshold_eval", m->second_threshold_eval);
    cJSON_AddNumberToObject(y, "capacity_factor_train", m->capacity_factor_train);
    cJSON_AddNumberToObject(y, "capacity_factor_eval", m->capacity_factor_eval);
    cJSON_AddNumberToObject(y, "loss_coef", m->loss_coef);
    cJSON_AddNumberToObject(y, "expert_mult", m->expert_mult);
    cJSON_AddNumberToObject(y, "dropout", m->dropout);
    cJSON_AddNumberToObject(y, "slots_per_expert", (double)m->slots_per_expert);
    cJSON *r = cJSON_AddObjectToObject(y, "router");
    if (r) { /* the topk router options (absent in checkpoints older than them) */
        cJSON_AddStringToObject(r, "kind", moe_router_kind_name(m->router));
        cJSON_AddStringToObject(r, "score", moe_score_func_name(m->score));
        cJSON_AddBoolToObject(r, "normalize", m->normalize);
        cJSON_AddNumberToObject(r, "route_scale", m->route_scale);
        cJSON_AddNumberToObject(r, "jitter", m->jitter);
        cJSON_AddNumberToObject(r, "balance_coef", m->balance_coef);
        cJSON_AddNumberToObject(r, "z_loss_coef", m->z_loss_coef);
        cJSON_AddNumberToObject(r, "num_shared", m->num_shared);
        cJSON_AddBoolToObject(r, "shared_gate", m->shared_gate);
        cJSON_AddBoolToObject(r, "expert_bias", m->expert_bias);
        cJSON_AddNumberToObject(r, "bias_update_rate", m->bias_update_rate);
        cJSON_AddNumberToObject(r, "num_groups", m->num_groups);
        cJSON_AddNumberToObject(r, "topk_groups", m->topk_groups);
    }
    cJSON_AddBoolToObject(y, "bf16", m->bf16); /* mixed precision: resumed as it ran */
    char seed[32];
    snprintf(seed, sizeof seed, "%" PRIu64, m->seed); /* a string: JSON numbers lose 64-bit seeds */
    cJSON_AddStringToObject(y, "seed", seed);
    cJSON_AddItemToObject(o, "layer", y);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static int num(const cJSON *o, const char *k, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return 0;
    *out = v->valuedouble;
    return 1;
}
static int enm(const cJSON *o, const char *k, const char *const *names, int n, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    int i = cJSON_IsString(v) ? lookup(v->valuestring, names, n) : -1;
    if (i >= 0) *out = i;
    return i >= 0;
}

/* The router object of the layer config; without one (an older checkpoint)
 * a topk layer routes as it did then: seed 004, dropless. */
static int router_parse(moe_config *m, const cJSON *r) {
    static const char *const kinds[] = {"token_choice", "expert_choice"};
    static const char *const scores[] = {"topk_softmax", "softmax", "sigmoid"};
    if (!r) {
        if (m->type == MOE_LAYER_TOPK) m->capacity_factor_train = m->capacity_factor_eval = 0.0;
        return 1;
    }
    double scale = 0, jit = 0, bal = 0, zl = 0, ns = 0, rate = 0, g = 0, mg = 0;
    int kind = 0, score = 0;
    int ok = cJSON_IsObject(r) && enm(r, "kind", kinds, 2, &kind) && enm(r, "score", scores, 3, &score) &&
             num(r, "route_scale", &scale) && num(r, "jitter", &jit) && num(r, "balance_coef", &bal) &&
             num(r, "z_loss_coef", &zl) && num(r, "num_shared", &ns) && num(r, "bias_update_rate", &rate) &&
             num(r, "num_groups", &g) && num(r, "topk_groups", &mg) && ns >= 0 && ns <= 1024 && g >= 0 &&
             g <= 65536 && mg >= 0 && mg <= 65536;
    if (!ok) return 0;
    m->router = (moe_router_kind)kind, m->score = (moe_score_func)score;
    m->normalize = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "normalize"));
    m->shared_gate = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "shared_gate"));
    m->expert_bias = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "expert_bias"));
    m->route_scale = scale, m->jitter = jit, m->balance_coef = bal, m->z_loss_coef = zl;
    m->num_shared = (int)ns, m->bias_update_rate = rate, m->num_groups = (int)g, m->topk_groups = (int)mg;
    return 1; /* values are checked again by moe_layer_create */
}

moe_status ckpt_config_parse(lm_config *c, const char *json) {
    cJSON *o = cJSON_Parse(json);
    const cJSON *y = o ? cJSON_GetObjectItemCaseSensitive(o, "layer") : NULL;
    double W = 0, C = 0, NH = 0, theta = 0, D = 0, L = 0, G = 0, E = 0, Ei = 0, K = 0, H = 0, slope = 0, t1 = 0, t2 = 0, cf1 = 0, cf2 = 0;
    double coef = 0, mult = 0, drop = 0, S = 0;
    int type = 0, expert = 0, act = 0, p1 = 0, p2 = 0, ok = o && cJSON_IsObject(y);
    ok = ok && num(o, "context", &W) && num(o, "heads", &NH) && num(o, "rope_theta", &theta) && num(o, "dim", &D) && num(o, "blocks", &L) &&
         num(o, "group", &G) && num(y, "num_experts", &E) && num(y, "num_experts_inner", &Ei) &&
         num(y, "top_k", &K) && num(y, "hidden_dim", &H) && num(y, "leaky_slope", &slope) &&
         num(y, "second_threshold_train", &t1) && num(y, "second_threshold_eval", &t2) &&
         num(y, "capacity_factor_train", &cf1) && num(y, "capacity_factor_eval", &cf2) &&
         num(y, "loss_coef", &coef) && num(y, "expert_mult", &mult) && num(y, "dropout", &drop) &&
         num(y, "slots_per_expert", &S) && enm(y, "type", k_types, 6, &type) &&
         enm(y, "expert", k_experts, 3, &expert) && enm(y, "activation", k_acts, 4, &act) &&
         enm(y, "second_policy_train", k_pols, 4, &p1) && enm(y, "second_policy_eval", k_pols, 4, &p2);
    const cJSON *seed = y ? cJSON_GetObjectItemCaseSensitive(y, "seed") : NULL;
    ok = ok && cJSON_IsString(seed);
    /* sizes are checked again by lm_create and moe_layer_create */
    ok = ok && W >= 1 && W <= 65536 && NH >= 1 && NH <= 65536 && theta > 1 && theta < 1e12 && D >= 1 && D <= 65536 && L >= 1 && L <= 256 &&
         G >= 1 && G <= 1e7 && E >= 1 && E <= 65536 && Ei >= 0 && Ei <= 65536 && K >= 0 && K <= 65536 && H >= 0 &&
         H <= 1e8 && S >= 0 && S <= 1e8;
    if (!ok) {
        cJSON_Delete(o);
        return MOE_ERR_FORMAT;
    }
    memset(c, 0, sizeof *c);
    (void)C;
    c->S = (int64_t)W, c->heads = (int64_t)NH, c->rope_theta = theta, c->D = (int64_t)D, c->L = (int64_t)L, c->group = (int64_t)G;
    c->dense = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "dense"));
    moe_config *m = &c->moe;
    moe_config_init(m, (moe_layer_type)type);
    m->num_experts = (int)E, m->num_experts_inner = (int)Ei, m->top_k = (int)K, m->hidden_dim = (int64_t)H;
    m->expert = (moe_expert_kind)expert, m->activation = (moe_activation)act, m->leaky_slope = (float)slope;
    m->second_policy_train = (moe_second_policy)p1, m->second_policy_eval = (moe_second_policy)p2;
    m->second_threshold_train = t1, m->second_threshold_eval = t2;
    m->capacity_factor_train = cf1, m->capacity_factor_eval = cf2, m->loss_coef = coef;
    m->expert_mult = mult, m->dropout = (float)drop, m->slots_per_expert = (int64_t)S;
    m->seed = strtoull(seed->valuestring, NULL, 10);
    m->bf16 = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(y, "bf16")); /* absent in older checkpoints: fp32 */
    ok = router_parse(m, cJSON_GetObjectItemCaseSensitive(y, "router"));
    cJSON_Delete(o);
    return ok ? MOE_OK : MOE_ERR_FORMAT;
}

static char *train_json(const train_opts *t) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "steps", (double)t->steps);
    cJSON_AddNumberToObject(o, "batch", (double)t->batch);
    cJSON_AddNumberToObject(o, "warmup", (double)t->warmup);
    cJSON_AddNumberToObject(o, "eval_every", (double)t->eval_every);
    cJSON_AddNumberToObject(o, "seed", (double)t->seed);
    cJSON_AddNumberToObject(o, "lr", t->lr);
    cJSON_AddNumberToObject(o, "min_lr", t->min_lr);
    cJSON_AddNumberToObject(o, "weight_decay", t->weight_decay);
    cJSON_AddStringToObject(o, "data", t->data);
    cJSON_AddStringToObject(o, "corpus", t->corpus);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static int train_parse(train_opts *t, const char *json) {
    cJSON *o = json ? cJSON_Parse(json) : NULL;
    double v[8];
    const char *k[8] = {"steps", "batch", "warmup", "eval_every", "seed", "lr", "min_lr", "weight_decay"};
    int ok = o != NULL;
    for (int i = 0; i < 8 && ok; i++) ok = num(o, k[i], &v[i]);
    const cJSON *d = o ? cJSON_GetObjectItemCaseSensitive(o, "data") : NULL;
    /* the ranges moe train's flags accept */
    ok = ok && cJSON_IsString(d) && v[0] >= 1 && v[0] <= 1e8 && v[1] >= 1 && v[1] <= (1 << 20) && v[2] >= 0 &&
         v[2] <= 1e8 && v[3] >= 1 && v[3] <= 1e8 && v[4] >= 0 && v[4] <= 4.6e18 && v[5] >= 0 && v[5] <= 10 &&
         v[6] >= 0 && v[6] <= 1 && v[7] >= 0 && v[7] <= 10;
    if (ok) {
        t->steps = (int64_t)v[0], t->batch = (int64_t)v[1], t->warmup = (int64_t)v[2];
        t->eval_every = (int64_t)v[3], t->seed = (int64_t)v[4], t->lr = v[5], t->min_lr = v[6];
        t->weight_decay = v[7];
        snprintf(t->data, sizeof t->data, "%s", d->valuestring);
        const cJSON *cp = cJSON_GetObjectItemCaseSensitive(o, "corpus");
        snprintf(t->corpus, sizeof t->corpus, "%s", cJSON_IsString(cp) ? cp->valuestring : "");
    }
    cJSON_Delete(o);
    return ok;
}

#define MAX_BUFS 256 /* state buffers in a checkpoint: one per block at most */

/* "blocks.{l}.moe.<name>", malloc'd: a layer's state buffer in the checkpoint. */
static char *buffer_name(int64_t l, const char *name) {
    size_t len = strlen(name) + 40;
    char *nm = malloc(len);
    if (nm) snprintf(nm, len, "blocks.%lld.moe.%s", (long long)l, name);
    return nm;
}

/* Buffers of every layer: count, or load them from f (load != 0). */
static int buffers_io(lm *m, const moe_st_file *f, int load, moe_status *st) {
    int n = 0;
    for (int64_t l = 0; l < lm_get_config(m)->L; l++)
        for (int i = 0; i < moe_layer_num_buffers(lm_layer(m, l)); i++, n++) {
            moe_param *b = moe_layer_buffer(lm_layer(m, l), i);
            char *nm = load && *st == MOE_OK ? buffer_name(l, b->name) : NULL;
            if (nm) *st = moe_st_read_f32(b->data, f, nm, b->ndim, b->shape);
            free(nm);
        }
    return n;
}

moe_status ckpt_save(const char *path, lm *m, moe_optim *opt, int64_t step, const train_opts *to) {
    int np = lm_num_params(m);
    moe_param *ps = lm_params(m);
    moe_st_entry *ents = calloc((size_t)(3 * np + MAX_BUFS), sizeof *ents);
    char *bufnames[MAX_BUFS];
    int n_bufnames = 0;
    char **names = calloc((size_t)(2 * np), sizeof *names);
    char *cfg = ckpt_config_json(lm_get_config(m)), *tr = train_json(to);
    char steps[32], ostep[32], rng[4096] = "";
    moe_status st = (ents && names && cfg && tr) ? MOE_OK : MOE_ERR_NOMEM;
    int n = 0;
    for (int i = 0; i < np && st == MOE_OK; i++) {
        moe_st_entry *e = &ents[n++];
        e->name = ps[i].name, e->dtype = MOE_DT_F32, e->ndim = ps[i].ndim, e->data = ps[i].data;
        for (int d = 0; d < ps[i].ndim; d++) e->shape[d] = ps[i].shape[d];
        float *mo = NULL, *vo = NULL;
        if (!opt || moe_optim_state(opt, i, &mo, &vo) != MOE_OK) continue;
        for (int j = 0; j < 2 && st == MOE_OK; j++) {
            const float *src = j ? vo : mo;
            if (!src) continue;
            size_t len = strlen(ps[i].name) + 10;
            char *nm = names[2 * i + j] = malloc(len);
            if (!nm) {
                st = MOE_ERR_NOMEM;
                break;
            }
            snprintf(nm, len, "optim.%c.%s", j ? 'v' : 'm', ps[i].name);
            moe_st_entry *f = &ents[n++];
            *f = *e;
            f->name = nm, f->data = src;
        }
    }
    for (int64_t l = 0; l < lm_get_config(m)->L && st == MOE_OK; l++) /* state buffers */
        for (int i = 0; i < moe_layer_num_buffers(lm_layer(m, l)); i++) {
            moe_param *b = moe_layer_buffer(lm_layer(m, l), i);
            char *nm = buffer_name(l, b->name);
            if (!nm || n_bufnames == MAX_BUFS) {
                free(nm);
                st = MOE_ERR_NOMEM;
                break;
            }
            bufnames[n_bufnames++] = nm;
            moe_st_entry *e = &ents[n++];
            e->name = nm, e->dtype = MOE_DT_F32, e->ndim = b->ndim, e->data = b->data;
            for (int d = 0; d < b->ndim; d++) e->shape[d] = b->shape[d];
        }
    size_t o = 0;
    for (int64_t l = 0; l < lm_get_config(m)->L && o < sizeof rng - 24; l++)
        o += (size_t)snprintf(rng + o, sizeof rng - o, "%s%" PRIu64, l ? "," : "",
                              moe_layer_rng_position(lm_layer(m, l)));
    snprintf(steps, sizeof steps, "%lld", (long long)step);
    snprintf(ostep, sizeof ostep, "%lld", (long long)(opt ? moe_optim_steps(opt) : 0));
    const char *meta[] = {"format", "libmoe-lm2", "config", cfg, "train", tr, "step", steps,
                          "optim.steps", ostep, "rng", rng};
    if (st == MOE_OK) st = moe_st_write(path, ents, n, meta, 6);
    for (int i = 0; names && i < 2 * np; i++) free(names[i]);
    for (int i = 0; i < n_bufnames; i++) free(bufnames[i]);
    free(names), free(ents), free(cfg), free(tr);
    return st;
}

/* A rank's expert tensor in the gather: its table name, where its part sits
 * in the whole tensor, and then numel values, m and v. */
typedef struct {
    char name[160];
    int64_t offset, numel;
} part_head;

static int is_expert(lm *m, int i) {
    int li, l = lm_param_layer(m, i, &li);
    return l >= 0 && moe_layer_param_is_expert(lm_layer(m, l), li);
}

moe_status ckpt_save_gathered(const char *path, lm *m, moe_optim *opt, int64_t step, const train_opts *to,
                              int rank, ckpt_gather_fn gather) {
    int np = lm_num_params(m);
    moe_param *ps = lm_params(m);
    int64_t bytes = 0;
    for (int i = 0; i < np; i++)
        if (is_expert(m, i)) bytes += (int64_t)sizeof(part_head) + 3 * ps[i].numel * (int64_t)sizeof(float);
    char *pack = malloc((size_t)(bytes ? bytes : 1)), *o = pack;
    for (int i = 0; pack && i < np; i++) {
        if (!is_expert(m, i)) continue;
        part_head h;
        memset(&h, 0, sizeof h);
        int li, l = lm_param_layer(m, i, &li);
        snprintf(h.name, sizeof h.name, "%s", ps[i].name);
        h.offset = moe_layer_param_offset(lm_layer(m, l), li), h.numel = ps[i].numel;
        float *mo = NULL, *vo = NULL;
        moe_optim_state(opt, i, &mo, &vo);
        memcpy(o, &h, sizeof h), o += sizeof h;
        memcpy(o, ps[i].data, (size_t)h.numel * 4), o += h.numel * 4;
        memcpy(o, mo, (size_t)h.numel * 4), o += h.numel * 4;
        memcpy(o, vo, (size_t)h.numel * 4), o += h.numel * 4;
    }
    void *all = NULL;
    int64_t all_n = 0;
    int bad = gather(&all, &all_n, pack, pack ? bytes : 0);
    free(pack);
    if (rank != 0 || bad) {
        free(all);
        return bad ? MOE_ERR_IO : MOE_OK;
    }
    /* rank 0: the one-process model, its optimizer, and everything copied in */
    lm *full = NULL;
    moe_optim *fo = NULL;
    lm_layer_creator prev = lm_set_layer_creator(NULL);
    moe_status st = lm_create(&full, lm_get_config(m));
    lm_set_layer_creator(prev);
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    oc.weight_decay = (float)to->weight_decay;
    if (st == MOE_OK) st = moe_optim_create(&fo, &oc, lm_params(full), lm_num_params(full));
    if (st == MOE_OK) moe_optim_set_steps(fo, moe_optim_steps(opt));
    int nf = full ? lm_num_params(full) : 0;
    moe_param *fp = full ? lm_params(full) : NULL;
    for (int i = 0; st == MOE_OK && i < np; i++) { /* replicated: rank 0's copy */
        if (is_expert(m, i)) continue;
        for (int j = 0; j < nf; j++) {
            if (strcmp(fp[j].name, ps[i].name)) continue;
            float *mo, *vo, *fm, *fv;
            moe_optim_state(opt, i, &mo, &vo), moe_optim_state(fo, j, &fm, &fv);
            memcpy(fp[j].data, ps[i].data, (size_t)ps[i].numel * 4);
            memcpy(fm, mo, (size_t)ps[i].numel * 4), memcpy(fv, vo, (size_t)ps[i].numel * 4);
        }
    }
    for (const char *c = all; st == MOE_OK && c < (const char *)all + all_n;) {
        part_head h;
        memcpy(&h, c, sizeof h), c += sizeof h;
        int j = 0;
        while (j < nf && strcmp(fp[j].name, h.name)) j++;
        if (j == nf || h.offset + h.numel > fp[j].numel) {
            st = MOE_ERR_FORMAT;
            break;
        }
        float *fm, *fv;
        moe_optim_state(fo, j, &fm, &fv);
        memcpy(fp[j].data + h.offset, c, (size_t)h.numel * 4), c += h.numel * 4;
        memcpy(fm + h.offset, c, (size_t)h.numel * 4), c += h.numel * 4;
        memcpy(fv + h.offset, c, (size_t)h.numel * 4), c += h.numel * 4;
    }
    for (int64_t l = 0; st == MOE_OK && l < lm_get_config(m)->L; l++) { /* buffers and random streams */
        moe_layer *a = lm_layer(m, l), *b = lm_layer(full, l);
        for (int i = 0; i < moe_layer_num_buffers(a); i++)
            memcpy(moe_layer_buffer(b, i)->data, moe_layer_buffer(a, i)->data,
                   (size_t)moe_layer_buffer(a, i)->numel * 4);
        moe_layer_set_rng_position(b, moe_layer_rng_position(a));
    }
    if (st == MOE_OK) st = ckpt_save(path, full, fo, step, to);
    free(all);
    moe_optim_free(fo);
    lm_free(full);
    return st;
}

/* Tensor `name` of f into dst: the whole tensor of p's shape, or, when the
 * layer is split over ranks (split), this rank's part of it (offset elements
 * in, p->numel long). Unsplit, the shape must match exactly: a file tensor
 * larger than the model's is an error, not a prefix. */
static moe_status read_part(float *dst, const moe_st_file *f, const char *name, const moe_param *p, int64_t offset,
                            int split) {
    const moe_st_tensor *t = moe_st_find(f, name);
    if (!split || !t || t->numel == p->numel || offset < 0 || offset + p->numel > t->numel)
        return moe_st_read_f32(dst, f, name, p->ndim, p->shape);
    float *whole = malloc((size_t)t->numel * sizeof *whole);
    if (!whole) return MOE_ERR_NOMEM;
    moe_status st = moe_st_read_f32(whole, f, name, -1, NULL);
    if (st == MOE_OK) memcpy(dst, whole + offset, (size_t)p->numel * sizeof *dst);
    free(whole);
    return st;
}

static moe_status fail(char *msg, size_t len, moe_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
    return st;
}

moe_status ckpt_load(const char *path, lm **m_out, moe_optim **opt_out, int64_t *step, train_opts *to,
                     char *msg, size_t msg_len) {
    *m_out = NULL;
    if (opt_out) *opt_out = NULL;
    moe_st_file *f = NULL;
    moe_status st = moe_st_open(&f, path);
    if (st != MOE_OK) return fail(msg, msg_len, st, "%s", moe_last_error());
    const char *fmt = moe_st_metadata(f, "format"), *cfg = moe_st_metadata(f, "config");
    const char *tr = moe_st_metadata(f, "train"), *sp = moe_st_metadata(f, "step");
    const char *os = moe_st_metadata(f, "optim.steps"), *rng = moe_st_metadata(f, "rng");
    lm_config c;
    lm *m = NULL;
    moe_optim *opt = NULL;
    train_opts t;
    if (fmt && !strcmp(fmt, "libmoe-lm")) {
        st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s is a checkpoint of the earlier window model (format "
                  "libmoe-lm); this moe trains the transformer (libmoe-lm2): train a new one", path);
        goto out;
    }
    if (!fmt || strcmp(fmt, "libmoe-lm2") || !cfg || !sp || !rng || !os) {
        st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s is not a moe train checkpoint (its metadata lacks "
                  "format=libmoe-lm2, config, step or rng)", path);
        goto out;
    }
    if (ckpt_config_parse(&c, cfg) != MOE_OK) {
        st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s: the model config in the metadata is malformed", path);
        goto out;
    }
    if (to && !train_parse(&t, tr)) {
        st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s: the training settings in the metadata are malformed", path);
        goto out;
    }
    char why[200];
    if (lm_config_check(&c, why, sizeof why)) {
        st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s: its model config is invalid: %s", path, why);
        goto out;
    }
    if ((st = lm_create(&m, &c)) != MOE_OK) {
        st = fail(msg, msg_len, st, "%s: cannot build the model of its config: %s", path, moe_last_error());
        goto out;
    }
    int np = lm_num_params(m);
    moe_param *ps = lm_params(m);
    int expected = np;
    if (opt_out) {
        moe_optim_config oc;
        moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
        if (to) oc.weight_decay = (float)t.weight_decay;
        if ((st = moe_optim_create(&opt, &oc, ps, np)) != MOE_OK) {
            st = fail(msg, msg_len, st, "%s", moe_last_error());
            goto out;
        }
        moe_optim_set_steps(opt, strtoll(os, NULL, 10));
    }
    int sharded = 0; /* expert parallel: this rank holds part of the experts */
    for (int i = 0; i < np && st == MOE_OK; i++) {
        int li, l = lm_param_layer(m, i, &li), r = 1;
        if (l >= 0) moe_layer_ep_info(lm_layer(m, l), NULL, &r, NULL, NULL);
        sharded |= r > 1;
        int64_t off = l >= 0 ? moe_layer_param_offset(lm_layer(m, l), li) : 0;
        st = read_part(ps[i].data, f, ps[i].name, &ps[i], off, r > 1);
        if (st == MOE_OK && opt) {
            float *mo, *vo;
            char nm[160];
            moe_optim_state(opt, i, &mo, &vo);
            snprintf(nm, sizeof nm, "optim.m.%s", ps[i].name);
            st = read_part(mo, f, nm, &ps[i], off, r > 1);
            snprintf(nm, sizeof nm, "optim.v.%s", ps[i].name);
            if (st == MOE_OK) st = read_part(vo, f, nm, &ps[i], off, r > 1);
        }
        if (st != MOE_OK) st = fail(msg, msg_len, st, "%s: %s", path, moe_last_error());
    }
    moe_status before = st;
    int nb = buffers_io(m, f, st == MOE_OK, &st);
    if (before == MOE_OK && st != MOE_OK) st = fail(msg, msg_len, st, "%s: %s", path, moe_last_error());
    if (st == MOE_OK && opt_out) expected = 3 * np;
    if (st == MOE_OK && !sharded && moe_st_count(f) - nb != expected &&
        !(opt_out == NULL && moe_st_count(f) - nb == 3 * np))
        st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s holds %d tensors; this model has %d parameters", path,
                  moe_st_count(f), np);
    /* every layer's random stream position */
    const char *r = rng;
    for (int64_t l = 0; l < c.L && st == MOE_OK; l++) {
        char *end;
        unsigned long long v = strtoull(r, &end, 10);
        if (end == r || (*end != ',' && *end != '\0')) {
            st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s: metadata rng is malformed", path);
            break;
        }
        moe_layer_set_rng_position(lm_layer(m, l), v);
        r = *end ? end + 1 : end;
    }
out:
    if (st == MOE_OK) { /* sp lives in f */
        char *end;
        long long v = strtoll(sp, &end, 10);
        if (*end || end == sp || v < 0 || (to && v > t.steps))
            st = fail(msg, msg_len, MOE_ERR_FORMAT, "%s: its step '%s' is not a number in 0..%lld", path, sp,
                      to ? (long long)t.steps : (long long)INT64_MAX);
        else if (step) *step = v;
    }
    moe_st_close(f);
    if (st != MOE_OK) {
        moe_optim_free(opt);
        lm_free(m);
        return st;
    }
    if (to) *to = t;
    *m_out = m;
    if (opt_out) *opt_out = opt;
    return MOE_OK;
}
