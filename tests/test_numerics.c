/*
 * Numerics a user relies on (issue "fixes"):
 *   1. backward after an eval-mode forward, for every layer type: it runs,
 *      and where eval and train compute the same function it gives the same
 *      bits as after a train forward; MOE_NO_GRAD gives the same y bits and
 *      refuses a backward (gradients in eval mode against finite differences
 *      are in test_gradcheck);
 *   2. every normalisation by a sum that can be 0 or underflow stays finite:
 *      sigmoid balance-loss shares, sigmoid and softmax renormalisation of
 *      the picks (forced experts, a selection bias, group limits, runtime
 *      masks), expert choice, gshard/hierarchical gates, soft dispatch and
 *      combine, the dense gate; with the exact values of the example;
 *   3. NaN or Inf produced from finite inputs (float32 overflow) is reported
 *      by forward and backward with MOE_ERR_NONFINITE naming the tensor and
 *      the likely cause, for every layer type; a non-finite parameter is
 *      named; no backward follows a failed forward.
 * Dimension key: T = B*N tokens, D model dim, H hidden dim, E experts, K picks.
 */
#include "check.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>

static unsigned long long g_rng = 2024;
static float nrand(void) { return check_nrand(&g_rng); }

static float *randv(int64_t n, float scale) {
    float *v = malloc((size_t)(n ? n : 1) * sizeof *v);
    for (int64_t i = 0; i < n; i++) v[i] = scale * nrand();
    return v;
}

static int all_finite(const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

static int grads_finite(moe_layer *l) {
    for (int i = 0; i < moe_layer_num_params(l); i++) {
        moe_param *p = moe_layer_param(l, i);
        if (!all_finite(p->grad, p->numel)) return 0;
    }
    return 1;
}

/* Small configs of every layer type (and router variety); i = 0.. until 0 is returned. */
static int layer_case(moe_config *c, int i, int64_t *B, int64_t *N) {
    *B = 2, *N = 9;
    switch (i) {
    case 0: moe_config_init(c, MOE_LAYER_TOPK); c->input_dim = 6, c->hidden_dim = 5; break;
    case 1: moe_config_init(c, MOE_LAYER_TOPK); c->input_dim = 6, c->hidden_dim = 5;
            moe_config_set_router(c, "switch"); c->jitter = 0.2; break;
    case 2: moe_config_init(c, MOE_LAYER_TOPK); c->input_dim = 6, c->hidden_dim = 5, c->num_experts = 8;
            moe_config_set_router(c, "deepseek_v3"); c->num_groups = 4, c->topk_groups = 2, c->num_shared = 1;
            c->balance_coef = 0.1; break;
    case 3: moe_config_init(c, MOE_LAYER_TOPK); c->input_dim = 6, c->hidden_dim = 5;
            moe_config_set_router(c, "expert_choice"); c->capacity_factor_eval = 1.0; break;
    case 4: moe_config_init(c, MOE_LAYER_DENSE); c->input_dim = 6, c->output_dim = 4; break;
    case 5: moe_config_init(c, MOE_LAYER_GSHARD); c->input_dim = 6, c->hidden_dim = 5, c->num_experts = 4; break;
    case 6: moe_config_init(c, MOE_LAYER_HIERARCHICAL); c->input_dim = 6, c->hidden_dim = 5;
            c->num_experts = 2, c->num_experts_inner = 2, *N = 16; break;
    case 7: moe_config_init(c, MOE_LAYER_SOFT_DYNAMIC); c->input_dim = 6, c->expert_mult = 1;
            c->dropout = 0.2f; break;
    case 8: moe_config_init(c, MOE_LAYER_SOFT); c->input_dim = 6, c->expert_mult = 1, c->slots_per_expert = 2;
            break;
    default: return 0;
    }
    c->seed = 70 + (uint64_t)i;
    return 1;
}

static char g_label[160];
static const char *label_of(const moe_config *c, int i) {
    snprintf(g_label, sizeof g_label, "case %d %s", i, moe_layer_type_name(c->type));
    return g_label;
}

/* ------------------------------------------------------------ 1. eval backward */

static void eval_backward(void) {
    moe_config c;
    int64_t B, N;
    for (int i = 0; layer_case(&c, i, &B, &N); i++) {
        const char *lb = label_of(&c, i);
        moe_layer *l;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        int64_t T = B * N, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);
        float *x = randv(T * D, 1), *dy = randv(T * O, 1), *y = randv(T * O, 0), *y2 = randv(T * O, 0);
        float *dx = randv(T * D, 0), aux = 0, aux2 = 0;
        /* MOE_NO_GRAD: the same bits, then no backward */
        for (int mode = 0; mode < 2; mode++) {
            uint64_t pos = moe_layer_rng_position(l);
            CHECK_STATUS(moe_layer_forward_seq(l, y, &aux, x, B, N, mode), MOE_OK);
            moe_layer_set_rng_position(l, pos);
            CHECK_STATUS(moe_layer_forward_seq(l, y2, &aux2, x, B, N, mode | MOE_NO_GRAD), MOE_OK);
            CHECK(memcmp(y, y2, (size_t)(T * O) * sizeof *y) == 0 && aux == aux2,
                  "%s %s: MOE_NO_GRAD changes y", lb, mode ? "train" : "eval");
            CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_ERR_STATE);
        }
        /* eval forward, then backward: runs, finite */
        moe_layer_zero_grad(l);
        CHECK_STATUS(moe_layer_forward_seq(l, y, &aux, x, B, N, MOE_EVAL), MOE_OK);
        CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_OK);
        CHECK(all_finite(dx, T * D) && grads_finite(l), "%s: eval backward not finite", lb);
        double gsum = 0;
        for (int p = 0; p < moe_layer_num_params(l); p++) {
            moe_param *pp = moe_layer_param(l, p);
            for (int64_t j = 0; j < pp->numel; j++) gsum += fabs(pp->grad[j]);
        }
        CHECK(gsum > 0, "%s: eval backward left every gradient 0", lb);
        moe_layer_free(l);
        free(x), free(dy), free(y), free(y2), free(dx);
    }
    /* where eval and train are the same function (no capacity, jitter,
     * dropout or random policy), the same bits after either forward */
    for (int i = 0; i < 3; i++) {
        moe_config_init(&c, i == 2 ? MOE_LAYER_DENSE : MOE_LAYER_TOPK);
        c.input_dim = 7, c.hidden_dim = 6, c.output_dim = 5, c.seed = 90 + (uint64_t)i;
        if (i == 1) moe_config_set_router(&c, "mixtral"), c.expert = MOE_EXPERT_SWIGLU, c.num_shared = 1;
        moe_layer *l;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        int64_t T = 13, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l), nw = moe_layer_num_weights(l);
        float *x = randv(T * D, 1), *dy = randv(T * O, 1), *y = randv(T * O, 0), aux = 0;
        float *dx1 = randv(T * D, 0), *dx2 = randv(T * D, 0), *g1 = randv(nw, 0);
        CHECK_STATUS(moe_layer_forward(l, y, &aux, x, T, MOE_TRAIN), MOE_OK);
        CHECK_STATUS(moe_layer_backward(l, dx1, dy, 0.5f), MOE_OK);
        for (int p = 0, o = 0; p < moe_layer_num_params(l); o += (int)moe_layer_param(l, p)->numel, p++)
            memcpy(g1 + o, moe_layer_param(l, p)->grad, (size_t)moe_layer_param(l, p)->numel * sizeof(float));
        moe_layer_zero_grad(l);
        CHECK_STATUS(moe_layer_forward(l, y, &aux, x, T, MOE_EVAL), MOE_OK);
        CHECK_STATUS(moe_layer_backward(l, dx2, dy, 0.5f), MOE_OK);
        int same = memcmp(dx1, dx2, (size_t)(T * D) * sizeof *dx1) == 0;
        for (int p = 0, o = 0; p < moe_layer_num_params(l); o += (int)moe_layer_param(l, p)->numel, p++)
            same &= memcmp(g1 + o, moe_layer_param(l, p)->grad, (size_t)moe_layer_param(l, p)->numel * 4) == 0;
        CHECK(same, "%s: eval and train backward differ where the modes compute the same function",
              moe_layer_type_name(c.type));
        moe_layer_free(l);
        free(x), free(dy), free(y), free(dx1), free(dx2), free(g1);
    }
}

/* ------------------------------------------------------------ 2. underflow */

/* Forward (train) and backward return MOE_OK, everything finite. */
static void finite_step(moe_layer *l, const float *x, int64_t B, int64_t N, const char *what, float *y_out) {
    int64_t T = B * N, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);
    float *y = randv(T * O, 0), *dy = randv(T * O, 1), *dx = randv(T * D, 0), aux = 0;
    moe_layer_zero_grad(l);
    CHECK_STATUS(moe_layer_forward_seq(l, y, &aux, x, B, N, MOE_TRAIN), MOE_OK);
    CHECK(all_finite(y, T * O) && isfinite(aux), "%s: forward not finite", what);
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_OK);
    CHECK(all_finite(dx, T * D) && grads_finite(l), "%s: backward not finite", what);
    if (y_out) memcpy(y_out, y, (size_t)(T * O) * sizeof *y);
    free(y), free(dy), free(dx);
}

/* Set every expert weight of a topk layer to w, biases to 0. */
static void flat_experts(moe_layer *l, float w) {
    for (int i = 0; i < moe_layer_num_params(l); i++) {
        moe_param *p = moe_layer_param(l, i);
        if (strncmp(p->name, "experts.", 8) && strncmp(p->name, "shared_experts.", 15)) continue;
        for (int64_t j = 0; j < p->numel; j++) p->data[j] = strstr(p->name, "bias") ? 0.0f : w;
    }
}

/* The example: sigmoid scores of token 0 are all exactly 0. */
static void sigmoid_balance_example(void) {
    moe_config c;
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"num_experts\": 4, \"input_dim\": 2, "
                                          "\"hidden_dim\": 2, \"top_k\": 2, \"score\": \"sigmoid\", "
                                          "\"normalize\": true, \"balance_coef\": 0.01, \"expert_bias\": true}"),
                 MOE_OK);
    for (int tie = 0; tie < 2; tie++) {
        moe_layer *l;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        flat_experts(l, 0.5f);
        float *gw = moe_layer_find_param(l, "gate.weight")->data, *gb = moe_layer_find_param(l, "gate.bias")->data;
        memset(gw, 0, 8 * sizeof *gw);
        for (int e = 0; e < 4; e++) gw[e * 2] = 100.0f, gb[e] = -0.1f * (float)e;
        /* the selection bias only breaks token 0's four-way tie of zeros: without
         * it the lower experts win (libmoe's rule), with it experts 2 and 3 (the
         * order torch.topk returns for four equal zeros) */
        float *sb = moe_layer_buffer(l, 0)->data;
        sb[0] = sb[1] = 0.0f, sb[2] = sb[3] = tie ? 1e-30f : 0.0f;
        float x[6] = {-1, 1, 0.01f, 1, 0.02f, -1}, y[6], dx[6], dy[6] = {1, 1, 1, 1, 1, 1}, aux = 0;
        CHECK_STATUS(moe_layer_forward(l, y, &aux, x, 3, MOE_TRAIN), MOE_OK);
        moe_stats s;
        moe_layer_stats(l, &s);
        double want = tie ? 0.671506 : 0.681184;
        CHECK(fabs(s.balance_loss - want) < 2e-6, "sigmoid balance loss %.7f, want %.6f (tie order %d)",
              s.balance_loss, want, tie);
        CHECK(fabs(aux - 0.01 * want) < 1e-7, "aux_loss %.8g, want %.8g", aux, 0.01 * want);
        CHECK(y[0] == 0.0f && y[1] == 0.0f, "token 0 (all scores 0) gets weight 0: y[0] = %g %g", y[0], y[1]);
        CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_OK);
        CHECK(dx[0] == 0.0f && dx[1] == 0.0f, "token 0's dx is %g %g, want 0 (share 0, zero gradient)", dx[0],
              dx[1]);
        CHECK(grads_finite(l) && all_finite(dx, 6), "sigmoid example: gradients not finite");
        moe_layer_free(l);
    }
}

/* Router normalisations with picks whose scores underflow. */
static void router_underflow(void) {
    moe_config c;
    moe_layer *l;
    int64_t T = 6, D = 4;
    float *x = randv(T * D, 1);
    for (int64_t t = 0; t < T; t++) x[t * D] = 1.0f; /* column 0 carries the gate's huge weights */
    float *y = randv(T * D, 0);
    /* gate logits: expert 0 = +150, others -150 + small: softmax p of experts
     * 1..5 underflow to exactly 0 */
    float zrow[6] = {150, -150, -151, -152, -153, -154};
#define SET_GATE(layer)                                                                   \
    do {                                                                                  \
        float *gw_ = moe_layer_find_param(layer, "gate.weight")->data;                  \
        float *gb_ = moe_layer_find_param(layer, "gate.bias")->data;                    \
        for (int e = 0; e < c.num_experts; e++) {                                         \
            for (int64_t k = 0; k < D; k++) gw_[e * D + k] = k == 0 ? zrow[e] : 0.01f * (float)k; \
            gb_[e] = 0.0f;                                                                \
        }                                                                                 \
    } while (0)
    /* softmax renormalised with forced experts whose p is 0: their weights are
     * the softmax of their logits, exactly (experts 1 and 2 forced, K = 2) */
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = D, c.hidden_dim = 3, c.num_experts = 6, c.top_k = 2, c.seed = 3;
    moe_config_set_router(&c, "mixtral");
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    SET_GATE(l);
    uint8_t force[6] = {0, 1, 1, 0, 0, 0};
    CHECK_STATUS(moe_layer_set_routing(l, 0, NULL, force), MOE_OK);
    finite_step(l, x, 1, T, "mixtral, forced experts with p = 0", y);
    CHECK(all_finite(y, T * D), "forced underflow y");
    /* the same with K = 1: the single forced pick gets weight exactly 1 */
    uint8_t force1[6] = {0, 0, 0, 1, 0, 0};
    CHECK_STATUS(moe_layer_set_routing(l, 1, NULL, force1), MOE_OK);
    float *y1 = randv(T * D, 0);
    finite_step(l, x, 1, T, "mixtral K=1, forced expert with p = 0", y1);
    /* reference: expert 3 alone (force it with K = 1 and route_scale 1 in topk_softmax scoring) */
    moe_config c2 = c;
    moe_config_set_router(&c2, "topk");
    c2.top_k = 1;
    moe_layer *l2;
    CHECK_STATUS(moe_layer_create(&l2, &c2), MOE_OK);
    CHECK_STATUS(moe_layer_set_routing(l2, 1, NULL, force1), MOE_OK);
    float *y2 = randv(T * D, 0), aux = 0;
    CHECK_STATUS(moe_layer_forward(l2, y2, &aux, x, T, MOE_TRAIN), MOE_OK);
    CHECK(memcmp(y1, y2, (size_t)(T * D) * sizeof *y1) == 0, "forced expert with p = 0 must get weight 1");
    moe_layer_free(l2), free(y1), free(y2);
    moe_layer_free(l);

    /* softmax with a selection bias that picks experts whose p is 0 */
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = D, c.hidden_dim = 3, c.num_experts = 6, c.top_k = 2, c.seed = 4;
    moe_config_set_router(&c, "mixtral");
    c.expert_bias = 1, c.balance_coef = 0.5, c.z_loss_coef = 1e-6;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    SET_GATE(l);
    float *sb = moe_layer_buffer(l, 0)->data;
    for (int e = 0; e < 6; e++) sb[e] = e >= 4 ? 2.0f : 0.0f;
    finite_step(l, x, 2, T / 2, "mixtral + selection bias picking p = 0 experts", NULL);
    moe_stats s;
    moe_layer_stats(l, &s);
    CHECK(s.expert_counts[4] == T && s.expert_counts[5] == T, "the bias picks experts 4 and 5 (%lld, %lld)",
          (long long)s.expert_counts[4], (long long)s.expert_counts[5]);
    moe_layer_free(l);

    /* sigmoid, renormalised and not, with groups, a balance loss and runtime
     * masks: every score of every token underflows */
    for (int norm = 0; norm < 2; norm++) {
        moe_config_init(&c, MOE_LAYER_TOPK);
        c.input_dim = D, c.hidden_dim = 3, c.num_experts = 6, c.top_k = 2, c.seed = 5;
        moe_config_set_router(&c, "deepseek_v3");
        c.normalize = norm, c.num_groups = 3, c.topk_groups = 2, c.balance_coef = 0.3, c.num_shared = 1;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        float zz[6] = {-150, -150, -151, -152, -153, -154};
        memcpy(zrow, zz, sizeof zz);
        SET_GATE(l);
        uint8_t mask[6] = {1, 0, 1, 1, 1, 0};
        CHECK_STATUS(moe_layer_set_routing(l, 0, mask, NULL), MOE_OK);
        finite_step(l, x, 2, T / 2, norm ? "sigmoid renormalised, all scores 0, groups, mask"
                                         : "sigmoid raw, all scores 0, groups, mask", NULL);
        moe_layer_stats(l, &s);
        CHECK(s.balance_loss == 0.0, "balance loss of all-zero shares is %g, want 0", s.balance_loss);
        moe_layer_free(l);
        float zr[6] = {150, -150, -151, -152, -153, -154};
        memcpy(zrow, zr, sizeof zr);
    }

    /* softmax over enabled experts when the largest logit is masked off */
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = D, c.hidden_dim = 3, c.num_experts = 6, c.top_k = 2, c.seed = 6;
    moe_config_set_router(&c, "st_moe");
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    SET_GATE(l);
    uint8_t m0[6] = {0, 1, 1, 1, 1, 1};
    CHECK_STATUS(moe_layer_set_routing(l, 0, m0, NULL), MOE_OK);
    finite_step(l, x, 2, T / 2, "st_moe with the dominant expert masked", NULL);
    moe_layer_free(l);

    /* expert choice: probabilities 0 for most experts */
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = D, c.hidden_dim = 3, c.num_experts = 6, c.seed = 7;
    moe_config_set_router(&c, "expert_choice");
    c.z_loss_coef = 1e-6;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    SET_GATE(l);
    finite_step(l, x, 2, T / 2, "expert choice with p = 0", NULL);
    moe_layer_free(l);
#undef SET_GATE
    free(x), free(y);
}

/* gshard/hierarchical gates, soft dispatch/combine and the dense gate on
 * logits whose softmax underflows. */
static void other_underflow(void) {
    moe_config c;
    int64_t B, N;
    for (int i = 4; layer_case(&c, i, &B, &N); i++) {
        moe_layer *l;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        /* gates and slot parameters scaled up: logits in the hundreds */
        for (int p = 0; p < moe_layer_num_params(l); p++) {
            moe_param *pp = moe_layer_param(l, p);
            float k = strstr(pp->name, "gat") || strstr(pp->name, "slot") || strstr(pp->name, "gamma") ? 60.0f : 1.0f;
            for (int64_t j = 0; j < pp->numel; j++) pp->data[j] *= k;
        }
        int64_t T = B * N, D = moe_layer_input_dim(l);
        float *x = randv(T * D, 3);
        char what[96];
        snprintf(what, sizeof what, "%s with softmax underflow", moe_layer_type_name(c.type));
        finite_step(l, x, B, N, what, NULL);
        /* soft layers: a batch row with every token masked */
        if (c.type == MOE_LAYER_SOFT || c.type == MOE_LAYER_SOFT_DYNAMIC) {
            uint8_t *m = calloc((size_t)T, 1);
            for (int64_t t = 0; t < N; t++) m[t] = (t % 3) != 0;
            float *y = randv(T * D, 0), *dy = randv(T * D, 1), *dx = randv(T * D, 0), aux = 0;
            CHECK_STATUS(moe_layer_forward_masked(l, y, &aux, x, m, B, N, MOE_TRAIN), MOE_OK);
            CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_OK);
            CHECK(all_finite(y, T * D) && all_finite(dx, T * D), "%s masked rows not finite", what);
            free(m), free(y), free(dy), free(dx);
        }
        moe_layer_free(l);
        free(x);
    }
}

/* ------------------------------------------------------------ 3. overflow */

#define CHECK_MSG(needle)                                                                 \
    CHECK(strstr(moe_last_error(), needle) != NULL, "message lacks '%s': %s", needle, moe_last_error())

static void overflow(void) {
    moe_config c;
    moe_layer *l;
    /* the z-loss: gate logits near 1e30 */
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 2, c.hidden_dim = 2, c.num_experts = 4, c.top_k = 2, c.z_loss_coef = 1e-3, c.seed = 8;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    float *gw = moe_layer_find_param(l, "gate.weight")->data;
    for (int e = 0; e < 4; e++) gw[e * 2] = 1e30f * (1.0f + 0.1f * (float)e), gw[e * 2 + 1] = 0.0f;
    float x[4] = {1, 0, 0.9f, 0.5f}, y[4], dx[4], dy[4] = {1, 1, 1, 1}, aux = 0;
    CHECK_STATUS(moe_layer_forward(l, y, &aux, x, 2, MOE_TRAIN), MOE_ERR_NONFINITE);
    printf("z-loss overflow: %s\n", moe_last_error());
    CHECK_MSG("aux_loss is Inf");
    CHECK_MSG("z-loss overflowed float32");
    CHECK_MSG("gate logits reach 1.");
    CHECK(strstr(moe_last_error(), "e+30") != NULL, "the message gives the logits' size: %s", moe_last_error());
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_ERR_STATE); /* no backward after a failed forward */
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 2, MOE_TRAIN), MOE_OK); /* y itself is finite */
    moe_layer_free(l);

    /* y overflows in each layer type: expert weights of 1e20 on inputs of 1e19 */
    int64_t B, N;
    for (int i = 0; layer_case(&c, i, &B, &N); i++) {
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        for (int p = 0; p < moe_layer_num_params(l); p++) {
            moe_param *pp = moe_layer_param(l, p);
            if (strstr(pp->name, "experts") && (strstr(pp->name, "weight") || strstr(pp->name, ".w")))
                for (int64_t j = 0; j < pp->numel; j++) pp->data[j] = 1e20f;
        }
        int64_t T = B * N, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);
        float *xx = randv(T * D, 1e19f), *yy = randv(T * O, 0), a = 0;
        for (int64_t j = 0; j < T * D; j++) xx[j] = fabsf(xx[j]) + 1e18f;
        moe_status st = moe_layer_forward_seq(l, yy, &a, xx, B, N, MOE_TRAIN);
        CHECK(st == MOE_ERR_NONFINITE, "%s: overflow in the experts gave %s", label_of(&c, i), moe_status_str(st));
        printf("forward overflow, %s: %s\n", label_of(&c, i), moe_last_error());
        CHECK(strstr(moe_last_error(), "is Inf") || strstr(moe_last_error(), "is NaN"), "%s", moe_last_error());
        CHECK(strstr(moe_last_error(), "although the input x and the parameters are finite"), "%s",
              moe_last_error());
        CHECK(strstr(moe_last_error(), "float32 overflow") && strstr(moe_last_error(), "first non-finite intermediate is the"),
              "%s: the message names the first non-finite intermediate: %s", label_of(&c, i), moe_last_error());
        moe_layer_free(l);
        free(xx), free(yy);
    }

    /* A forward with nothing kept (MOE_NO_GRAD) computes an MLP expert's
     * activation in place: the message must still name the right buffer, not
     * an activation buffer left over from an earlier forward. First a train
     * forward whose activations overflow (fc1 weights 3e38), then
     * fc1 small and fc2 huge: the activations are finite, the outputs not. */
    for (int soft = 0; soft < 2; soft++) {
        moe_config_init(&c, soft ? MOE_LAYER_SOFT_DYNAMIC : MOE_LAYER_TOPK);
        if (soft) c.input_dim = 4, c.num_experts = 2, c.expert_mult = 1, c.seed = 3;
        else c.input_dim = 4, c.hidden_dim = 4, c.num_experts = 2, c.top_k = 1, c.seed = 3;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        float xs[8] = {1, 2, 3, 4, 4, 3, 2, 1}, ys[8], big[8];
        for (int j = 0; j < 8; j++) big[j] = 1e10f * xs[j];
        for (int pass = 0; pass < 2; pass++) {
            for (int p = 0; p < moe_layer_num_params(l); p++) {
                moe_param *pp = moe_layer_param(l, p);
                int fc1 = strstr(pp->name, "experts") && strstr(pp->name, "0.weight");
                int fc2 = strstr(pp->name, "experts") && strstr(pp->name, soft ? "3.weight" : "2.weight");
                if (fc1) for (int64_t j = 0; j < pp->numel; j++) pp->data[j] = pass ? 0.5f : 3e38f;
                if (fc2) for (int64_t j = 0; j < pp->numel; j++) pp->data[j] = pass ? 3e38f : 1.0f;
            }
            moe_layer_params_changed(l);
            moe_status st = pass ? moe_layer_forward_seq(l, ys, NULL, xs, 1, 2, MOE_TRAIN | MOE_NO_GRAD)
                                 : moe_layer_forward_seq(l, ys, NULL, big, 1, 2, MOE_TRAIN);
            CHECK(st == MOE_ERR_NONFINITE, "%s pass %d: %s", soft ? "soft_dynamic" : "topk", pass, moe_status_str(st));
            if (pass) {
                printf("no-grad forward overflow, %s: %s\n", soft ? "soft_dynamic" : "topk", moe_last_error());
                CHECK_MSG("first non-finite intermediate is the expert outputs");
            }
        }
        moe_layer_free(l);
    }

    /* backward overflow: finite y, dy of 1e38 through weights of 10 */
    for (int i = 0; layer_case(&c, i, &B, &N); i++) {
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        for (int p = 0; p < moe_layer_num_params(l); p++) {
            moe_param *pp = moe_layer_param(l, p);
            for (int64_t j = 0; j < pp->numel; j++) pp->data[j] *= 10.0f;
        }
        int64_t T = B * N, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);
        float *xx = randv(T * D, 1), *yy = randv(T * O, 0), *dd = randv(T * O, 0), *dxx = randv(T * D, 0), a = 0;
        for (int64_t j = 0; j < T * O; j++) dd[j] = j % 2 ? 3e38f : 2e38f;
        CHECK_STATUS(moe_layer_forward_seq(l, yy, &a, xx, B, N, MOE_TRAIN), MOE_OK);
        moe_status st = moe_layer_backward(l, dxx, dd, 0.0f);
        CHECK(st == MOE_ERR_NONFINITE, "%s: backward overflow gave %s", label_of(&c, i), moe_status_str(st));
        printf("backward overflow, %s: %s\n", label_of(&c, i), moe_last_error());
        CHECK((strstr(moe_last_error(), "dx[") || strstr(moe_last_error(), "grad.")) &&
              strstr(moe_last_error(), "although the gradient dy and the parameters are finite"),
              "%s: %s", label_of(&c, i), moe_last_error());
        moe_layer_free(l);
        free(xx), free(yy), free(dd), free(dxx);
    }

    /* a non-finite parameter is named */
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 4, c.hidden_dim = 3, c.seed = 9;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    moe_layer_find_param(l, "experts.1.net.2.weight")->data[5] = NAN;
    float *xx = randv(10 * 4, 1), *yy = randv(10 * 4, 0);
    CHECK_STATUS(moe_layer_forward(l, yy, NULL, xx, 10, MOE_TRAIN), MOE_ERR_NONFINITE);
    CHECK_MSG("parameter 'experts.1.net.2.weight' element 5 is NaN");
    moe_layer_free(l);
    free(xx), free(yy);
}

int main(void) {
    moe_set_num_threads(2);
    eval_backward();
    sigmoid_balance_example();
    router_underflow();
    other_underflow();
    overflow();
    return check_summary("test_numerics");
}
