/*
 * The `moe train` transformer (tools/moe/lm.c) and its checkpoints
 * (tools/moe/ckpt.c): finite differences against lm_backward for every
 * parameter tensor (topk, soft_dynamic, gshard and dense-FFN blocks), cached
 * one-token decoding against the full forward, the same bits on 1 and 2
 * threads, and a checkpoint round trip that restores parameters, optimizer
 * state, step and RNG positions exactly.
 * Dimension key: B sequences, S positions, T = B*S tokens, D model dim,
 * L blocks.
 */
#include "check.h"
#include "internal.h"
#include "../tools/moe/attn.c"
#include "../tools/moe/ckpt.c"
#include "../tools/moe/lm.c"

#include <unistd.h>

static uint64_t g_rng = 99;
static uint32_t next_u32(void) {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_rng >> 33);
}

/* Every forward draws the layers' random choices (gshard's second expert) at
 * the same stream positions: finite differences compare the same routing. */
static void rewind_rng(lm *m) {
    for (int64_t l = 0; l < lm_get_config(m)->L; l++) moe_layer_set_rng_position(lm_layer(m, l), 0);
}

static double loss_of(lm *m, const uint8_t *ctx, const uint8_t *tgt, int64_t B, int64_t S) {
    double l = NAN;
    rewind_rng(m);
    return lm_forward(m, &l, NULL, NULL, ctx, tgt, B, S, 1) == MOE_OK ? l : NAN;
}

static void gradcheck(const char *label, lm_config *c, int64_t B, int64_t S) {
    lm *m = NULL;
    CHECK_STATUS(lm_create(&m, c), MOE_OK);
    if (!m) return;
    int64_t T = B * S;
    uint8_t *ctx = malloc((size_t)T), *tgt = malloc((size_t)T);
    for (int64_t i = 0; i < T; i++) ctx[i] = (uint8_t)(97 + next_u32() % 6);
    for (int64_t i = 0; i < T; i++) tgt[i] = (uint8_t)(97 + next_u32() % 6);
    moe_param *ps = lm_params(m);
    for (int i = 0; i < lm_num_params(m); i++) /* move the gains off 1 */
        if (strstr(ps[i].name, "norm") || strstr(ps[i].name, "gamma"))
            for (int64_t j = 0; j < ps[i].numel; j++) ps[i].data[j] = 1.0f + 0.2f * ((float)(next_u32() % 1000) / 500.0f - 1.0f);
    lm_zero_grad(m);
    double l0 = loss_of(m, ctx, tgt, B, S);
    CHECK(isfinite(l0), "%s: loss finite", label);
    CHECK_STATUS(lm_backward(m), MOE_OK);
    int bad = 0;
    for (int i = 0; i < lm_num_params(m); i++) {
        moe_param *p = &ps[i];
        for (int probe = 0; probe < 2; probe++) {
            int64_t j = (int64_t)(next_u32() % (uint32_t)p->numel);
            if (strcmp(p->name, "emb.weight") == 0) j = (97 + (int64_t)(next_u32() % 6)) * p->shape[1] + j % p->shape[1];
            const float h = 1e-2f;
            float save = p->data[j];
            p->data[j] = save + h;
            double lp = loss_of(m, ctx, tgt, B, S);
            p->data[j] = save - h;
            double lm_ = loss_of(m, ctx, tgt, B, S);
            p->data[j] = save;
            double fd = (lp - lm_) / (2.0 * h), an = p->grad[j];
            int ok = fabs(fd - an) <= 2e-2 * fmax(fabs(fd), fabs(an)) + 2e-4;
            if (!ok && bad++ < 5)
                fprintf(stderr, "  %s %s[%lld]: fd %.6g backward %.6g\n", label, p->name, (long long)j, fd, an);
            CHECK(ok, "%s: %s[%lld]", label, p->name, (long long)j);
        }
    }
    printf("gradcheck lm %-40s %s\n", label, bad ? "FAILED" : "ok");
    free(ctx), free(tgt);
    lm_free(m);
}

static void roundtrip(void) {
    lm_config c = {.S = 8, .D = 8, .L = 2, .heads = 2, .rope_theta = 10000, .group = 8};
    moe_config_init(&c.moe, MOE_LAYER_GSHARD);
    c.moe.num_experts = 3, c.moe.hidden_dim = 6, c.moe.seed = 5;
    lm *m = NULL, *m2 = NULL;
    moe_optim *o = NULL, *o2 = NULL;
    CHECK_STATUS(lm_create(&m, &c), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    CHECK_STATUS(moe_optim_create(&o, &oc, lm_params(m), lm_num_params(m)), MOE_OK);
    uint8_t ctx[16], tgt[16];
    for (int i = 0; i < 16; i++) ctx[i] = (uint8_t)(next_u32() % 256);
    for (int i = 0; i < 16; i++) tgt[i] = (uint8_t)(next_u32() % 256);
    for (int s = 0; s < 3; s++) {
        lm_zero_grad(m);
        CHECK_STATUS(lm_forward(m, NULL, NULL, NULL, ctx, tgt, 2, 8, 1), MOE_OK);
        CHECK_STATUS(lm_backward(m), MOE_OK);
        CHECK_STATUS(moe_optim_step(o), MOE_OK);
    }
    train_opts to = {.steps = 10, .batch = 16, .warmup = 1, .eval_every = 5, .seed = 3, .lr = 1e-3, .min_lr = 0.1,
                     .corpus = "tasks"};
    char path[] = "/tmp/moe_test_lm_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) close(fd);
    CHECK_STATUS(ckpt_save(path, m, o, 3, &to), MOE_OK);
    int64_t step = 0;
    train_opts to2;
    char msg[512] = "";
    CHECK_STATUS(ckpt_load(path, &m2, &o2, &step, &to2, msg, sizeof msg), MOE_OK);
    if (m2 && o2) {
        CHECK(step == 3 && moe_optim_steps(o2) == 3 && to2.batch == 16 && to2.seed == 3, "step and settings");
        int same = lm_num_params(m2) == lm_num_params(m);
        for (int i = 0; same && i < lm_num_params(m); i++) {
            float *ma, *va, *mb, *vb;
            moe_optim_state(o, i, &ma, &va);
            moe_optim_state(o2, i, &mb, &vb);
            size_t n = (size_t)lm_params(m)[i].numel * sizeof(float);
            same = !strcmp(lm_params(m)[i].name, lm_params(m2)[i].name) &&
                   !memcmp(lm_params(m)[i].data, lm_params(m2)[i].data, n) && !memcmp(ma, mb, n) && !memcmp(va, vb, n);
        }
        CHECK(same, "parameters and optimizer state restored bit for bit");
        for (int l = 0; l < 2; l++)
            CHECK(moe_layer_rng_position(lm_layer(m2, l)) == moe_layer_rng_position(lm_layer(m, l)),
                  "rng position of block %d", l);
        /* the next step gives the same bits on both */
        double a = 0, b = 0;
        CHECK_STATUS(lm_forward(m, &a, NULL, NULL, ctx, tgt, 2, 8, 1), MOE_OK);
        CHECK_STATUS(lm_forward(m2, &b, NULL, NULL, ctx, tgt, 2, 8, 1), MOE_OK);
        CHECK(a == b, "the same loss after restore: %.9g vs %.9g", a, b);
    } else {
        fprintf(stderr, "ckpt_load: %s\n", msg);
    }
    /* allocation failures during a checkpoint load: each N-th allocation of the
     * library (layers, optimizer, safetensors, cJSON) fails in turn; the load
     * reports it, returns nothing and leaks nothing (the ASan build checks) */
    int faults = 0, bad = 0;
    for (int64_t n = 0, more = 1; more && n < 10000; n++) {
        lm *m3 = (lm *)1;
        moe_optim *o3 = (moe_optim *)1;
        msg[0] = '\0';
        moe__fault_alloc(n);
        moe_status st = ckpt_load(path, &m3, &o3, &step, &to2, msg, sizeof msg);
        more = moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) faults++, bad += st == MOE_OK || m3 != NULL || o3 != NULL || !msg[0];
        if (st == MOE_OK) moe_optim_free(o3), lm_free(m3);
    }
    CHECK(faults > 10 && bad == 0, "checkpoint load: %d of %d allocation faults not reported cleanly", bad, faults);
    unlink(path);
    moe_optim_free(o), moe_optim_free(o2);
    lm_free(m), lm_free(m2);
}

/* Decoding one byte at a time with the cache gives the full forward's logits
 * at every position; 1 and 2 threads give the same bits. */
static void decode_and_threads(const char *label, lm_config *c, int64_t S, int exact_decode) {
    lm *m = NULL;
    CHECK_STATUS(lm_create(&m, c), MOE_OK);
    if (!m) return;
    int64_t B = 2, T = B * S;
    uint8_t *tok = malloc((size_t)T), *tgt = malloc((size_t)T);
    for (int64_t i = 0; i < T; i++) tok[i] = (uint8_t)(next_u32() % 256), tgt[i] = (uint8_t)(next_u32() % 256);
    float *full = malloc((size_t)(T * LM_VOCAB) * sizeof *full);
    CHECK_STATUS(lm_forward(m, NULL, NULL, NULL, tok, tgt, B, S, 0), MOE_OK);
    memcpy(full, lm_logits(m), (size_t)(T * LM_VOCAB) * sizeof *full);
    double err = 0;
    for (int64_t b = 0; b < B; b++) {
        CHECK_STATUS(lm_decode_reset(m), MOE_OK);
        for (int64_t s = 0; s < S; s++) {
            if (lm_decode(m, tok[b * S + s]) != MOE_OK) {
                err = INFINITY;
                break;
            }
            for (int v = 0; v < LM_VOCAB; v++) { /* not fmax(err, ...): gcc 12.2's aarch64 vectoriser crashes on it */
                double e = fabs((double)lm_logits(m)[v] - full[(b * S + s) * LM_VOCAB + v]);
                if (e > err) err = e;
            }
        }
    }
    if (exact_decode) CHECK(err < 1e-4, "%s: decode with the cache equals the forward: %.2g", label, err);
    else CHECK(isfinite(err), "%s: decode runs (groups: copies of the token): %.2g", label, err);
    while (lm_decode_pos(m) < c->S && lm_decode(m, 'a') == MOE_OK) {
    }
    CHECK(lm_decode(m, 1) == MOE_ERR_ARG, "%s: a full cache is refused", label);
    /* training step on 1 and 2 threads */
    double l1 = 0, l2 = 0;
    float *g1 = malloc((size_t)m->n_own * sizeof *g1);
    moe_set_num_threads(1);
    rewind_rng(m);
    lm_zero_grad(m);
    CHECK_STATUS(lm_forward(m, &l1, NULL, NULL, tok, tgt, B, S, 1), MOE_OK);
    CHECK_STATUS(lm_backward(m), MOE_OK);
    memcpy(g1, m->g, (size_t)m->n_own * sizeof *g1);
    moe_set_num_threads(2);
    rewind_rng(m);
    lm_zero_grad(m);
    CHECK_STATUS(lm_forward(m, &l2, NULL, NULL, tok, tgt, B, S, 1), MOE_OK);
    CHECK_STATUS(lm_backward(m), MOE_OK);
    CHECK(l1 == l2 && !memcmp(g1, m->g, (size_t)m->n_own * sizeof *g1), "%s: 1 and 2 threads give the same bits",
          label);
    CHECK(lm_forward(m, NULL, NULL, NULL, tok, tgt, 1, c->S + 1, 0) == MOE_ERR_ARG, "%s: S > context refused",
          label);
    free(tok), free(tgt), free(full), free(g1);
    lm_free(m);
}

int main(void) {
    moe_set_num_threads(2);
    lm_config c = {.S = 8, .D = 8, .L = 2, .heads = 2, .rope_theta = 10000, .group = 4};
    moe_config_init(&c.moe, MOE_LAYER_TOPK);
    c.moe.num_experts = 3, c.moe.top_k = 3, c.moe.hidden_dim = 5, c.moe.expert = MOE_EXPERT_SWIGLU, c.moe.seed = 1;
    gradcheck("topk swiglu E=K=3", &c, 2, 4);
    decode_and_threads("topk swiglu", &c, 8, 1);
    c.moe.top_k = 2, c.moe.seed = 7;
    decode_and_threads("topk swiglu K=2", &c, 7, 1);
    c.heads = 1;
    gradcheck("topk swiglu one head", &c, 1, 5);
    c.heads = 4;
    gradcheck("topk swiglu four heads of 2", &c, 2, 3);
    c.heads = 2;
    moe_config_init(&c.moe, MOE_LAYER_SOFT_DYNAMIC);
    c.moe.num_experts = 2, c.moe.expert_mult = 1, c.moe.seed = 2;
    gradcheck("soft_dynamic E=2 group 4", &c, 2, 4);
    moe_config_init(&c.moe, MOE_LAYER_GSHARD);
    c.moe.num_experts = 3, c.moe.hidden_dim = 5, c.moe.seed = 4;
    gradcheck("gshard E=3 group 4", &c, 1, 8);
    decode_and_threads("gshard", &c, 8, 0);
    moe_config_init(&c.moe, MOE_LAYER_TOPK); /* the --dense model */
    c.moe.num_experts = 1, c.moe.top_k = 1, c.moe.hidden_dim = 7, c.moe.expert = MOE_EXPERT_GEGLU, c.moe.seed = 3;
    c.dense = 1, c.L = 1;
    gradcheck("dense FFN geglu L=1", &c, 1, 5);
    decode_and_threads("dense FFN", &c, 6, 1);
    roundtrip();
    return check_summary("test_lm");
}
