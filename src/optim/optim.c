/*
 * Optimizers over a list of parameters: AdamW and SGD (with momentum),
 * with torch.optim's update rules. A step with any non-finite gradient is
 * refused before anything changes.
 */
#include "internal.h"
#include "ops.h"

#include <math.h>
#include <string.h>

struct moe_optim {
    moe_optim_config cfg;
    int n;
    moe_param *params; /* (n) copies of the caller's table entries          */
    float *m, *v;      /* (sum numel) AdamW moments / SGD momentum buffer   */
    int64_t *off;      /* (n) offset of each parameter's state              */
    int64_t steps;
};

void moe_optim_config_init(moe_optim_config *c, moe_optim_type type) {
    memset(c, 0, sizeof *c);
    c->type = type;
    c->lr = 1e-3f;
    c->beta1 = 0.9f;
    c->beta2 = 0.999f;
    c->eps = 1e-8f;
    c->weight_decay = type == MOE_OPTIM_ADAMW ? 0.01f : 0.0f;
    c->momentum = 0.0f;
}

moe_status moe_optim_create(moe_optim **out, const moe_optim_config *cfg, moe_param *params,
                            int n_params) {
    moe_err_clear();
    if (!out || !cfg || (!params && n_params > 0) || n_params < 0)
        return moe_err(MOE_ERR_ARG, "moe_optim_create: NULL or negative argument");
    *out = NULL;
    if (cfg->type != MOE_OPTIM_SGD && cfg->type != MOE_OPTIM_ADAMW)
        return moe_err(MOE_ERR_ARG, "unknown optimizer type %d", (int)cfg->type);
    if (!(cfg->lr >= 0.0f) || !isfinite(cfg->lr)) return moe_err(MOE_ERR_ARG, "lr must be finite and >= 0");
    if (cfg->type == MOE_OPTIM_ADAMW &&
        !(cfg->beta1 >= 0.0f && cfg->beta1 < 1.0f && cfg->beta2 >= 0.0f && cfg->beta2 < 1.0f && cfg->eps > 0.0f))
        return moe_err(MOE_ERR_ARG, "AdamW needs 0 <= beta1, beta2 < 1 and eps > 0");
    if (!(cfg->weight_decay >= 0.0f) || !(cfg->momentum >= 0.0f))
        return moe_err(MOE_ERR_ARG, "weight_decay and momentum must be >= 0");
    moe_optim *o = moe_calloc(sizeof *o);
    if (!o) return moe_err(MOE_ERR_NOMEM, "cannot allocate the optimizer");
    o->cfg = *cfg;
    o->n = n_params;
    int64_t total = 0;
    o->params = moe_alloc((size_t)(n_params ? n_params : 1) * sizeof *o->params);
    o->off = moe_alloc((size_t)(n_params ? n_params : 1) * sizeof *o->off);
    if (o->params && o->off) {
        for (int i = 0; i < n_params; i++) {
            o->params[i] = params[i];
            o->off[i] = total;
            total += params[i].numel;
        }
        o->m = moe_calloc((size_t)total * sizeof(float));
        o->v = cfg->type == MOE_OPTIM_ADAMW ? moe_calloc((size_t)total * sizeof(float)) : NULL;
    }
    if (!o->params || !o->off || !o->m || (cfg->type == MOE_OPTIM_ADAMW && !o->v)) {
        moe_optim_free(o);
        return moe_err(MOE_ERR_NOMEM, "cannot allocate optimizer state for %lld values", (long long)total);
    }
    *out = o;
    return MOE_OK;
}

void moe_optim_free(moe_optim *o) {
    if (!o) return;
    moe_free(o->params);
    moe_free(o->off);
    moe_free(o->m);
    moe_free(o->v);
    moe_free(o);
}

void moe_optim_set_lr(moe_optim *o, float lr) {
    if (o && isfinite(lr) && lr >= 0.0f) o->cfg.lr = lr;
}

int64_t moe_optim_steps(const moe_optim *o) { return o ? o->steps : 0; }

moe_status moe_optim_step(moe_optim *o) {
    moe_err_clear();
    if (!o) return moe_err(MOE_ERR_ARG, "moe_optim_step: NULL optimizer");
    for (int i = 0; i < o->n; i++) {
        int64_t bad = moe_find_nonfinite(o->params[i].grad, o->params[i].numel);
        if (bad >= 0)
            return moe_err(MOE_ERR_NONFINITE, "gradient of '%s' element %lld is not finite; step skipped",
                           o->params[i].name ? o->params[i].name : "?", (long long)bad);
    }
    const moe_optim_config *c = &o->cfg;
    o->steps++;
    moe__params_bump(); /* bf16 layers refresh their weight copies */
    float lr = c->lr, wd = c->weight_decay;
    if (c->type == MOE_OPTIM_ADAMW) {
        /* torch.optim.AdamW: p -= lr*wd*p; m,v moments; p -= lr/bc1 * m / (sqrt(v/bc2) + eps) */
        float b1 = c->beta1, b2 = c->beta2, eps = c->eps;
        float bc1 = 1.0f - powf(b1, (float)o->steps), bc2 = 1.0f - powf(b2, (float)o->steps);
        float step_size = lr / bc1, bc2_sqrt = sqrtf(bc2);
        for (int i = 0; i < o->n; i++) {
            float *p = o->params[i].data, *g = o->params[i].grad;
            float *m = o->m + o->off[i], *v = o->v + o->off[i];
            int64_t n = o->params[i].numel;
#pragma omp parallel for schedule(static)
            for (int64_t j = 0; j < n; j++) {
                p[j] *= 1.0f - lr * wd;
                m[j] = b1 * m[j] + (1.0f - b1) * g[j];
                v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
                p[j] -= step_size * m[j] / (sqrtf(v[j]) / bc2_sqrt + eps);
            }
        }
    } else {
        /* torch.optim.SGD: g += wd*p; buf = mu*buf + g (buf = g on step 1); p -= lr*buf */
        float mu = c->momentum;
        for (int i = 0; i < o->n; i++) {
            float *p = o->params[i].data, *g = o->params[i].grad, *b = o->m + o->off[i];
            int64_t n = o->params[i].numel;
            int first = o->steps == 1;
#pragma omp parallel for schedule(static)
            for (int64_t j = 0; j < n; j++) {
                float d = g[j] + wd * p[j];
                if (mu != 0.0f) {
                    b[j] = first ? d : mu * b[j] + d;
                    d = b[j];
                }
                p[j] -= lr * d;
            }
        }
    }
    return MOE_OK;
}

moe_status moe_optim_state(moe_optim *o, int i, float **m, float **v) {
    if (!o || !m || !v || i < 0 || i >= o->n)
        return moe_err(MOE_ERR_ARG, "moe_optim_state: NULL argument or parameter index %d out of range", i);
    *m = o->m + o->off[i];
    *v = o->v ? o->v + o->off[i] : NULL;
    return MOE_OK;
}

moe_status moe_optim_set_steps(moe_optim *o, int64_t steps) {
    if (!o || steps < 0) return moe_err(MOE_ERR_ARG, "moe_optim_set_steps: NULL optimizer or steps < 0");
    o->steps = steps;
    return MOE_OK;
}
