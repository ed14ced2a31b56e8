/*
 * The topk layer's router options as a user meets them: capacity bounds and
 * drop counts, expert choice's exact per-expert load, masked experts getting
 * no tokens, forced experts on every token, runtime k, the DeepSeek-V3 bias
 * update rule, the bias buffer in load/save, JSON recipes, errors that leave
 * the layer as it was, jitter only in training, and the same bits on 1 and 2
 * threads for every router (y and every gradient).
 * Dimension key: T = B*N tokens, D model dim, H hidden dim, E experts, K picks.
 */
#include "check.h"
#include "layer_internal.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>

static unsigned long long g_rng = 99;
static float nrand(void) { return check_nrand(&g_rng); }

static float *randv(int64_t n) {
    float *v = malloc((size_t)n * sizeof *v);
    for (int64_t i = 0; i < n; i++) v[i] = nrand();
    return v;
}

static void base(moe_config *c, int E, int K, const char *recipe) {
    moe_config_init(c, MOE_LAYER_TOPK);
    c->input_dim = 8, c->hidden_dim = 6, c->num_experts = E, c->top_k = K, c->seed = 5;
    if (recipe) moe_config_set_router(c, recipe);
}

/* Capacity: no expert holds more than C rows per group; dropped = T*K - kept. */
static void capacity(void) {
    moe_config c;
    base(&c, 4, 2, "st_moe");
    c.capacity_factor_train = 0.5;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    int64_t B = 3, N = 16, T = B * N;
    float *x = randv(T * 8), *y = malloc((size_t)T * 8 * sizeof *y), aux = 0;
    CHECK_STATUS(moe_layer_forward_seq(l, y, &aux, x, B, N, 1), MOE_OK);
    moe_stats s;
    moe_layer_stats(l, &s);
    int64_t kept = 0, C = (int64_t)ceil(0.5 * N * 2 / 4);
    for (int e = 0; e < 4; e++) kept += s.expert_counts[e];
    CHECK(s.capacity == C, "capacity %lld, want %lld", (long long)s.capacity, (long long)C);
    for (int e = 0; e < 4; e++)
        CHECK(s.expert_counts[e] <= B * C, "expert %d holds %lld > B*C", e, (long long)s.expert_counts[e]);
    CHECK(s.dropped > 0 && kept + s.dropped == T * 2, "kept %lld + dropped %lld != T*K", (long long)kept,
          (long long)s.dropped);
    CHECK(s.assignments == kept, "assignments %lld, kept %lld", (long long)s.assignments, (long long)kept);
    CHECK(isfinite(aux) && aux > 0, "st_moe aux %g", aux);
    /* eval mode uses the eval factor (2.0): fewer drops */
    CHECK_STATUS(moe_layer_forward_seq(l, y, &aux, x, B, N, 0), MOE_OK);
    moe_stats s2;
    moe_layer_stats(l, &s2);
    CHECK(s2.dropped < s.dropped, "eval dropped %lld, train %lld", (long long)s2.dropped, (long long)s.dropped);
    moe_layer_free(l);
    free(x), free(y);
}

/* Expert choice: every enabled expert takes exactly C tokens per group; a
 * masked expert none. */
static void expert_choice(void) {
    moe_config c;
    base(&c, 5, 2, "expert_choice");
    c.capacity_factor_train = 1.5;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    int64_t B = 2, N = 11, T = B * N, C = (int64_t)ceil(1.5 * N / 5);
    float *x = randv(T * 8), *y = malloc((size_t)T * 8 * sizeof *y);
    uint8_t mask[5] = {1, 1, 0, 1, 1};
    CHECK_STATUS(moe_layer_set_routing(l, 0, mask, NULL), MOE_OK);
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, B, N, 1), MOE_OK);
    moe_stats s;
    moe_layer_stats(l, &s);
    for (int e = 0; e < 5; e++)
        CHECK(s.expert_counts[e] == (e == 2 ? 0 : B * C), "expert choice: expert %d took %lld, want %lld", e,
              (long long)s.expert_counts[e], (long long)(e == 2 ? 0 : B * C));
    CHECK_STATUS(moe_layer_set_routing(l, 2, NULL, NULL), MOE_ERR_ARG); /* no k for expert choice */
    moe_layer_free(l);
    free(x), free(y);
}

/* Masks, forced experts and runtime k on a token-choice layer with groups. */
static void runtime_control(void) {
    moe_config c;
    base(&c, 8, 2, "deepseek_v3");
    c.num_groups = 4, c.topk_groups = 2;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    int64_t T = 40;
    float *x = randv(T * 8), *y = malloc((size_t)T * 8 * sizeof *y), *y0 = malloc((size_t)T * 8 * sizeof *y0);
    CHECK_STATUS(moe_layer_forward(l, y0, NULL, x, T, 1), MOE_OK);
    uint8_t mask[8] = {1, 1, 1, 0, 1, 1, 0, 1}, force[8] = {0, 0, 0, 0, 0, 1, 0, 0};
    CHECK_STATUS(moe_layer_set_routing(l, 3, mask, force), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l, NULL, y0, 0), MOE_ERR_STATE); /* routing changed: forward again */
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, T, 1), MOE_OK);
    moe_stats s;
    moe_layer_stats(l, &s);
    CHECK(s.top_k == 3 && s.assignments == T * 3, "k %d, assignments %lld", s.top_k, (long long)s.assignments);
    CHECK(s.expert_counts[3] == 0 && s.expert_counts[6] == 0, "masked experts got %lld and %lld tokens",
          (long long)s.expert_counts[3], (long long)s.expert_counts[6]);
    CHECK(s.expert_counts[5] == T, "forced expert 5 got %lld of %lld tokens", (long long)s.expert_counts[5],
          (long long)T);
    /* errors name the problem and change nothing */
    uint8_t all_off[8] = {0}, few[8] = {1, 1, 0, 0, 0, 0, 0, 0}, clash[8] = {0, 0, 0, 1, 0, 0, 0, 0};
    CHECK_STATUS(moe_layer_set_routing(l, 9, NULL, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_set_routing(l, 0, all_off, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_set_routing(l, 3, few, NULL), MOE_ERR_ARG);
    CHECK(strstr(moe_last_error(), "fewer than top_k = 3") != NULL, "message: %s", moe_last_error());
    CHECK_STATUS(moe_layer_set_routing(l, 2, mask, clash), MOE_ERR_ARG);
    CHECK(strstr(moe_last_error(), "forced and masked") != NULL, "message: %s", moe_last_error());
    uint8_t three[8] = {1, 1, 1, 0, 0, 0, 0, 0};
    CHECK_STATUS(moe_layer_set_routing(l, 2, NULL, three), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, T, 1), MOE_OK);
    moe_layer_stats(l, &s);
    CHECK(s.top_k == 3 && s.expert_counts[3] == 0 && s.expert_counts[5] == T, "a failed set_routing changed it");
    /* back to the config: the same output as before */
    CHECK_STATUS(moe_layer_set_routing(l, 0, NULL, NULL), MOE_OK);
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, T, 1), MOE_OK);
    CHECK(memcmp(y, y0, (size_t)T * 8 * sizeof *y) == 0, "reset routing does not give the first output");
    moe_layer *g;
    moe_config cg;
    moe_config_init(&cg, MOE_LAYER_GSHARD);
    CHECK_STATUS(moe_layer_create(&g, &cg), MOE_OK);
    CHECK_STATUS(moe_layer_set_routing(g, 1, NULL, NULL), MOE_ERR_UNSUPPORTED);
    CHECK_STATUS(moe_layer_update_bias(g), MOE_OK); /* a no-op */
    moe_layer_free(g);
    moe_layer_free(l);
    free(x), free(y), free(y0);
}

/* DeepSeek-V3's rule: b_e += g * sign(mean load - load_e) over the train
 * forwards since the last update; eval forwards do not count. */
static void bias_update(void) {
    moe_config c;
    base(&c, 6, 2, "deepseek_v3");
    c.bias_update_rate = 0.25;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    CHECK(moe_layer_num_buffers(l) == 1, "buffers %d", moe_layer_num_buffers(l));
    moe_param *b = moe_layer_buffer(l, 0);
    CHECK(b && !strcmp(b->name, "gate.e_score_correction_bias") && b->grad == NULL && b->numel == 6,
          "bias buffer");
    CHECK(moe_layer_find_param(l, "gate.e_score_correction_bias") == NULL, "the bias is not a parameter");
    int64_t T = 30, load[6] = {0};
    float *x = randv(2 * T * 8), *y = malloc((size_t)T * 8 * sizeof *y);
    for (int r = 0; r < 2; r++) { /* two train forwards accumulate */
        CHECK_STATUS(moe_layer_forward(l, y, NULL, x + r * T * 8, T, 1), MOE_OK);
        moe_stats s;
        moe_layer_stats(l, &s);
        for (int e = 0; e < 6; e++) load[e] += s.expert_counts[e];
    }
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, T, 0), MOE_OK); /* eval: not counted */
    CHECK_STATUS(moe_layer_update_bias(l), MOE_OK);
    double mean = 0;
    for (int e = 0; e < 6; e++) mean += load[e] / 6.0;
    int ok = 1;
    for (int e = 0; e < 6; e++) {
        float want = mean > load[e] ? 0.25f : mean < load[e] ? -0.25f : 0.0f;
        ok &= b->data[e] == want;
    }
    CHECK(ok, "bias after one update: %g %g %g %g %g %g", b->data[0], b->data[1], b->data[2], b->data[3],
          b->data[4], b->data[5]);
    float before[6];
    memcpy(before, b->data, sizeof before);
    CHECK_STATUS(moe_layer_update_bias(l), MOE_OK); /* no forwards since: no loads, no change */
    CHECK(memcmp(before, b->data, sizeof before) == 0, "an update without loads changed the bias");
    moe_stats s;
    moe_layer_stats(l, &s);
    CHECK(s.expert_bias == b->data, "stats.expert_bias");

    /* save and load carry the buffer; a file without it is refused */
    const char *path = "build/test_router_bias.safetensors";
    CHECK_STATUS(moe_layer_save(l, path), MOE_OK);
    moe_layer *l2;
    CHECK_STATUS(moe_layer_create(&l2, &c), MOE_OK);
    CHECK_STATUS(moe_layer_load(l2, path), MOE_OK);
    CHECK(memcmp(moe_layer_buffer(l2, 0)->data, b->data, 6 * sizeof(float)) == 0, "bias lost in save/load");
    moe_config c3 = c;
    c3.expert_bias = 0, c3.bias_update_rate = 0;
    moe_layer *l3;
    CHECK_STATUS(moe_layer_create(&l3, &c3), MOE_OK);
    CHECK_STATUS(moe_layer_load(l3, path), MOE_ERR_FORMAT); /* unexpected tensor */
    CHECK(strstr(moe_last_error(), "e_score_correction_bias") != NULL, "message: %s", moe_last_error());
    CHECK_STATUS(moe_layer_save(l3, path), MOE_OK);
    CHECK_STATUS(moe_layer_load(l2, path), MOE_ERR_NOTFOUND); /* missing bias */
    CHECK(memcmp(moe_layer_buffer(l2, 0)->data, b->data, 6 * sizeof(float)) == 0, "a failed load changed it");
    remove(path);
    moe_layer_free(l), moe_layer_free(l2), moe_layer_free(l3);
    free(x), free(y);
}

/* Recipes from JSON, refined by keys in any order; bad values rejected. */
static void json(void) {
    moe_config c;
    CHECK_STATUS(moe_config_from_json(&c, "{\"top_k\": 2, \"type\": \"topk\", \"router\": \"switch\"}"), MOE_OK);
    CHECK(c.top_k == 2 && c.score == MOE_SCORE_SOFTMAX && c.capacity_factor_train == 1.25 && c.jitter == 0.01,
          "switch recipe refined by top_k: k %d", c.top_k);
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"router\": \"deepseek_v3\", \"num_experts\": 8,"
                                          " \"num_groups\": 4, \"topk_groups\": 2, \"num_shared_experts\": 1}"),
                 MOE_OK);
    CHECK(c.score == MOE_SCORE_SIGMOID && c.expert_bias && c.num_groups == 4 && c.num_shared == 1, "deepseek");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"router\": \"gshard\"}"), MOE_ERR_ARG);
    CHECK(strstr(moe_last_error(), "unknown router") != NULL, "message: %s", moe_last_error());
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"score\": \"relu\"}"), MOE_ERR_ARG);
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"normalize\": 1}"), MOE_ERR_ARG);
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"gshard\", \"router\": \"switch\"}"), MOE_ERR_ARG);
    moe_layer *l = NULL;
    const char *bad[] = {"{\"type\":\"topk\",\"num_experts\":6,\"num_groups\":4}",
                         "{\"type\":\"topk\",\"num_experts\":8,\"num_groups\":4,\"topk_groups\":5}",
                         "{\"type\":\"topk\",\"router\":\"expert_choice\",\"capacity_factor\":0}",
                         "{\"type\":\"topk\",\"router\":\"expert_choice\",\"balance_coef\":0.1}",
                         "{\"type\":\"topk\",\"route_scale\":0}",
                         "{\"type\":\"topk\",\"jitter\":1.5}",
                         "{\"type\":\"topk\",\"shared_gate\":true}",
                         "{\"type\":\"topk\",\"bias_update_rate\":-0.1}",
                         "{\"type\":\"topk\",\"capacity_factor\":-1}"};
    for (int i = 0; i < (int)(sizeof bad / sizeof *bad); i++) {
        CHECK_STATUS(moe_config_from_json(&c, bad[i]), MOE_OK);
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
        CHECK(l == NULL && moe_last_error()[0], "%s: no message", bad[i]);
    }
}

/* Jitter acts in training only; sigmoid scores that underflow stay finite. */
static void jitter_and_underflow(void) {
    moe_config c;
    base(&c, 4, 1, "switch");
    c.capacity_factor_train = c.capacity_factor_eval = 0;
    moe_layer *a, *b;
    CHECK_STATUS(moe_layer_create(&a, &c), MOE_OK);
    c.jitter = 0;
    CHECK_STATUS(moe_layer_create(&b, &c), MOE_OK);
    int64_t T = 64;
    float *x = randv(T * 8), *ya = malloc((size_t)T * 8 * sizeof *ya), *yb = malloc((size_t)T * 8 * sizeof *yb);
    CHECK_STATUS(moe_layer_forward(a, ya, NULL, x, T, 0), MOE_OK);
    CHECK_STATUS(moe_layer_forward(b, yb, NULL, x, T, 0), MOE_OK);
    CHECK(memcmp(ya, yb, (size_t)T * 8 * sizeof *ya) == 0, "jitter changed an eval forward");
    CHECK_STATUS(moe_layer_forward(a, ya, NULL, x, T, 1), MOE_OK);
    CHECK_STATUS(moe_layer_forward(b, yb, NULL, x, T, 1), MOE_OK);
    CHECK(memcmp(ya, yb, (size_t)T * 8 * sizeof *ya) != 0, "jitter 0.01 left a train forward unchanged");
    moe_layer_free(a), moe_layer_free(b);

    base(&c, 4, 2, "deepseek_v3");
    CHECK_STATUS(moe_layer_create(&a, &c), MOE_OK);
    float *bg = moe_layer_find_param(a, "gate.bias")->data;
    for (int e = 0; e < 4; e++) bg[e] = -200.0f; /* sigmoid underflows to 0 */
    CHECK_STATUS(moe_layer_forward(a, ya, NULL, x, T, 1), MOE_OK);
    int finite = 1;
    for (int64_t i = 0; i < T * 8; i++) finite &= isfinite(ya[i]);
    CHECK(finite, "sigmoid scores of 0 gave a non-finite output");
    moe_layer_free(a);
    free(x), free(ya), free(yb);
}

/* Each router makes the same decisions on 1 and 2 threads (every routing
 * choice and the auxiliary loss, bit for bit) and gives the same y, dx and
 * gradients, with and without shared experts (moe_sgemm's tiling does not
 * depend on the thread count; test_determinism covers every layer type). */
static void threads(void) {
    const char *recipes[] = {"topk", "switch", "mixtral", "st_moe", "deepseek_v3", "expert_choice"};
    for (int r = 0; r < 12; r++) {
        moe_config c;
        base(&c, 8, 2, recipes[r % 6]);
        int shared = r >= 6;
        c.input_dim = 32, c.hidden_dim = 24, c.num_shared = shared, c.shared_gate = r == 11;
        if (r % 6 == 4) c.num_groups = 4, c.topk_groups = 2;
        int64_t B = 4, N = 96, T = B * N, D = 32, nr = 0;
        float *x = randv(T * D), *dy = randv(T * D), *out[2], *dxs[2], *grads[2], aux[2];
        int32_t *route[2];
        int64_t nw = 0;
        for (int n = 0; n < 2; n++) {
            moe_set_num_threads(n + 1);
            moe_layer *l;
            CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
            nw = moe_layer_num_weights(l);
            out[n] = malloc((size_t)T * D * sizeof(float));
            dxs[n] = malloc((size_t)T * D * sizeof(float));
            grads[n] = malloc((size_t)nw * sizeof(float));
            CHECK_STATUS(moe_layer_forward_seq(l, out[n], &aux[n], x, B, N, 1), MOE_OK);
            nr = moe__layer_routing(l, NULL, 0);
            route[n] = malloc((size_t)nr * sizeof(int32_t));
            moe__layer_routing(l, route[n], nr);
            CHECK_STATUS(moe_layer_backward(l, dxs[n], dy, 0.5f), MOE_OK);
            for (int i = 0, o = 0; i < moe_layer_num_params(l); i++) {
                moe_param *p = moe_layer_param(l, i);
                memcpy(grads[n] + o, p->grad, (size_t)p->numel * sizeof(float));
                o += (int)p->numel;
            }
            moe_layer_free(l);
        }
        CHECK(nr > 0 && memcmp(route[0], route[1], (size_t)nr * sizeof(int32_t)) == 0 && aux[0] == aux[1],
              "router %s%s: routing or aux differ on 1 and 2 threads", recipes[r % 6], shared ? " +shared" : "");
        {
            int same_y = memcmp(out[0], out[1], (size_t)T * D * sizeof(float)) == 0;
            int same_dx = memcmp(dxs[0], dxs[1], (size_t)T * D * sizeof(float)) == 0;
            int same_g = memcmp(grads[0], grads[1], (size_t)nw * sizeof(float)) == 0;
            CHECK(same_y && same_dx && same_g, "router %s%s: 1 and 2 threads differ (y %s, dx %s, gradients %s)",
                  recipes[r % 6], shared ? " +shared" : "", same_y ? "same" : "differ", same_dx ? "same" : "differ", same_g ? "same" : "differ");
        }
        for (int n = 0; n < 2; n++) free(out[n]), free(dxs[n]), free(grads[n]), free(route[n]);
        free(x), free(dy);
    }
    moe_set_num_threads(2);
}

int main(void) {
    moe_set_num_threads(2);
    capacity();
    expert_choice();
    runtime_control();
    bias_update();
    json();
    jitter_and_underflow();
    threads();
    return check_summary("test_router");
}
