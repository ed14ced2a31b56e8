/*
 * gshard and hierarchical: capacity formula, routing statistics, the random
 * second-expert policy (statistics and determinism), and bad input.
 * (Numbers against PyTorch: tests/parity; gradients: test_gradcheck.)
 * Dimension key: B groups, N tokens per group, T = B*N, D model dim,
 * E experts, H hidden dim.
 */
#include "check.h"
#include "layer_internal.h"
#include "moe.h"
#include "top2.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned long long g_rng = 777;
static float nrand(void) { return check_nrand(&g_rng); }

#define CHECK_MSG(s) CHECK(strstr(moe_last_error(), s) != NULL, "message lacks '%s': %s", s, moe_last_error())

static void test_capacity(void) {
    CHECK(moe_top2_capacity(1024, 1.25, 16) == 80, "seeds' README config: 1024*1.25/16 = 80");
    CHECK(moe_top2_capacity(1024, 2.0, 16) == 128, "eval factor 2");
    CHECK(moe_top2_capacity(3, 1.25, 6) == 4, "N < E: the minimum of 4 (even above N)");
    CHECK(moe_top2_capacity(10, 100.0, 2) == 10, "capped at N");
    CHECK(moe_top2_capacity(1024, 4.4e107, 2) == 1024, "a capacity factor past int64: capped at N, no overflow (found by fuzzing)");
    CHECK(moe_top2_capacity(13, 1.0, 3) == 4, "floor(13/3) = 4");
    CHECK(moe_top2_capacity(50, 1.1, 5) == 11, "floor(50*1.1/5) = 11");
}

/* Gate values of the gshard layer's own gate, computed here in double:
 * g2n[t] = raw[i2] / (raw[i1] + raw[i2] + eps). */
static void second_gates(moe_layer *l, const float *x, int64_t T, double *g2n) {
    int64_t D = l->cfg.input_dim;
    int E = l->cfg.num_experts;
    const float *W = moe_layer_find_param(l, "gate.w_gating")->data; /* (D,E) */
    double *p = malloc((size_t)E * sizeof *p);
    for (int64_t t = 0; t < T; t++) {
        double m = -1e300, s = 0;
        for (int e = 0; e < E; e++) {
            double z = 0;
            for (int64_t d = 0; d < D; d++) z += (double)x[t * D + d] * W[d * E + e];
            p[e] = z, m = z > m ? z : m;
        }
        for (int e = 0; e < E; e++) p[e] = exp(p[e] - m), s += p[e];
        int i1 = 0, i2 = -1;
        for (int e = 1; e < E; e++) if (p[e] > p[i1]) i1 = e;
        for (int e = 0; e < E; e++) if (e != i1 && (i2 < 0 || p[e] > p[i2])) i2 = e;
        g2n[t] = (p[i2] / s) / (p[i1] / s + p[i2] / s + 1e-9);
    }
    free(p);
}

/* random policy: kept fraction of second choices ~ min(1, g2/threshold). */
static void test_random_policy(void) {
    const double thresholds[2] = {0.45, 0.9};
    for (int k = 0; k < 2; k++) {
        moe_config c;
        moe_config_init(&c, MOE_LAYER_GSHARD);
        c.input_dim = 8, c.hidden_dim = 4, c.num_experts = 6, c.seed = 5 + (uint64_t)k;
        c.second_policy_train = MOE_SECOND_RANDOM, c.second_threshold_train = thresholds[k];
        c.capacity_factor_train = 6.0; /* capacity N: nothing is dropped */
        moe_layer *l;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        for (int64_t i = 0; i < 8 * 6; i++) l->wmem[i] *= 0.3f; /* soft gates: g2 spread over (0, 0.5) */
        int64_t B = 4, N = 5000, T = B * N, D = 8;
        float *x = malloc((size_t)(T * D) * sizeof *x), *y = malloc((size_t)(T * D) * sizeof *y);
        double *g2 = malloc((size_t)T * sizeof *g2);
        for (int64_t i = 0; i < T * D; i++) x[i] = nrand();
        second_gates(l, x, T, g2);
        double expect = 0, var = 0;
        for (int64_t t = 0; t < T; t++) {
            double p = fmin(1.0, g2[t] / thresholds[k]);
            expect += p, var += p * (1 - p);
        }
        CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, B, N, 1), MOE_OK);
        moe_stats st;
        moe_layer_stats(l, &st);
        double dev = fabs((double)st.second_kept - expect), bound = 5.0 * sqrt(var) + 1.0;
        CHECK(st.second_candidates == T && st.dropped == 0, "candidates %lld dropped %lld",
              (long long)st.second_candidates, (long long)st.dropped);
        CHECK(dev <= bound, "threshold %.2f: kept %lld second choices, expected %.1f +- %.1f (5 sigma)",
              thresholds[k], (long long)st.second_kept, expect, bound);
        CHECK(expect > 0.2 * T && expect < 0.95 * T, "the test needs a spread of keep probabilities: %.0f of %lld",
              expect, (long long)T);
        printf("random policy, threshold %.2f: kept %lld of %lld second choices, expected %.1f (5 sigma %.1f)\n",
               thresholds[k], (long long)st.second_kept, (long long)T, expect, bound);
        free(x), free(y), free(g2);
        moe_layer_free(l);
    }
}

/* The random policy's draws: the same seed gives the same routing and bits
 * with 1 and 2 threads; the next forward draws afresh. */
static void test_random_determinism(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 12, c.hidden_dim = 8, c.num_experts = 3, c.num_experts_inner = 2, c.seed = 42;
    int64_t B = 3, N = 200, T = B * N, D = 12;
    float *x = malloc((size_t)(T * D) * sizeof *x);
    for (int64_t i = 0; i < T * D; i++) x[i] = nrand();
    int32_t *route[3];
    int64_t nr[3];
    float *y[3];
    for (int r = 0; r < 3; r++) {
        moe_set_num_threads(r == 1 ? 1 : 2);
        moe_layer *l;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        y[r] = malloc((size_t)(T * D) * sizeof(float));
        CHECK_STATUS(moe_layer_forward_seq(l, y[r], NULL, x, B, N, 1), MOE_OK);
        if (r == 2) CHECK_STATUS(moe_layer_forward_seq(l, y[r], NULL, x, B, N, 1), MOE_OK); /* second call */
        nr[r] = moe__layer_routing(l, NULL, 0);
        route[r] = malloc((size_t)nr[r] * sizeof(int32_t));
        moe__layer_routing(l, route[r], nr[r]);
        moe_layer_free(l);
    }
    moe_set_num_threads(2);
    CHECK(nr[0] == nr[1] && !memcmp(route[0], route[1], (size_t)nr[0] * sizeof(int32_t)),
          "random policy: routing differs between 2 and 1 threads");
    double md = 0;
    for (int64_t i = 0; i < T * D; i++) { /* not md = fmax(md, ...): gcc 12.2's aarch64 vectoriser crashes on it */
        double e = fabs(y[0][i] - y[1][i]);
        if (e > md) md = e;
    }
    CHECK(md < 1e-5, "1 vs 2 threads: max |dy| %.3g", md);
    CHECK(nr[0] != nr[2] || memcmp(route[0], route[2], (size_t)nr[0] * sizeof(int32_t)),
          "a second forward must draw new random choices");
    for (int r = 0; r < 3; r++) free(route[r]), free(y[r]);
    free(x);
}

/* Statistics: counts sum to the kept rows; capacity bounds them; skewed
 * gates drop tokens. */
static void test_stats(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_GSHARD);
    c.input_dim = 6, c.hidden_dim = 5, c.num_experts = 4, c.seed = 3;
    c.second_policy_train = MOE_SECOND_ALL, c.capacity_factor_train = 1.0;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    float *wg = moe_layer_find_param(l, "gate.w_gating")->data;
    for (int d = 0; d < 6; d++) wg[d * 4 + 0] += 3.0f; /* most tokens pick expert 0 */
    int64_t B = 2, N = 40, T = B * N;
    float *x = malloc((size_t)(T * 6) * sizeof *x), *y = malloc((size_t)(T * 6) * sizeof *y);
    for (int64_t i = 0; i < T * 6; i++) x[i] = fabsf(nrand()); /* positive: expert 0 wins */
    float aux = -1;
    CHECK_STATUS(moe_layer_forward_seq(l, y, &aux, x, B, N, 1), MOE_OK);
    moe_stats st;
    moe_layer_stats(l, &st);
    int64_t sum = 0, cap = moe_top2_capacity(N, 1.0, 4);
    for (int e = 0; e < st.n_experts; e++) {
        sum += st.expert_counts[e];
        CHECK(st.expert_counts[e] <= B * cap, "expert %d has %lld rows > B*capacity %lld", e,
              (long long)st.expert_counts[e], (long long)(B * cap));
    }
    CHECK(st.n_experts == 4 && sum == st.assignments, "counts sum %lld, assignments %lld", (long long)sum,
          (long long)st.assignments);
    CHECK(st.dropped > 0, "skewed gates must overflow capacity (dropped %lld)", (long long)st.dropped);
    CHECK(st.assignments + st.dropped == T + st.second_candidates,
          "policy all: every first and second choice is kept or dropped (%lld + %lld vs %lld)",
          (long long)st.assignments, (long long)st.dropped, (long long)(T + st.second_candidates));
    CHECK(aux > 0.01f * 1.0f && isfinite(aux), "skewed gates give a large balance loss: %g", aux);
    for (int64_t i = 0; i < T * 6; i++)
        if (!isfinite(y[i])) {
            CHECK(0, "y not finite");
            break;
        }
    free(x), free(y);
    moe_layer_free(l);
}

static void test_bad_input(void) {
    moe_config c;
    moe_layer *l = NULL;
    moe_config_init(&c, MOE_LAYER_GSHARD);
    c.input_dim = 4, c.capacity_factor_train = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("capacity_factor_train");
    c.capacity_factor_train = 1.25, c.capacity_factor_eval = -1;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("capacity_factor_eval");
    c.capacity_factor_eval = NAN;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    c.capacity_factor_eval = 2, c.second_policy_eval = (moe_second_policy)9;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("second_policy_eval");
    c.second_policy_eval = MOE_SECOND_ALL, c.second_threshold_train = -0.1;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("second_threshold_train");
    c.second_threshold_train = 0.2, c.expert = MOE_EXPERT_SWIGLU;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_UNSUPPORTED);
    c.expert = MOE_EXPERT_MLP, c.num_experts = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK(l == NULL, "failed create leaves *out NULL");
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.num_experts_inner = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("num_experts_inner");

    /* JSON */
    moe_config j;
    CHECK_STATUS(moe_config_from_json(&j, "{\"type\":\"gshard\",\"dim\":8,\"second_policy_train\":\"sometimes\"}"),
                 MOE_ERR_ARG);
    CHECK_MSG("second_policy_train");
    CHECK_MSG("sometimes");
    CHECK_STATUS(moe_config_from_json(&j, "{\"type\":\"hierarchical\",\"dim\":8,\"num_experts\":4}"), MOE_ERR_ARG);
    CHECK_MSG("pair");
    CHECK_STATUS(moe_config_from_json(&j, "{\"type\":\"gshard\",\"dim\":8,\"top_k\":2}"), MOE_ERR_ARG);
    CHECK_MSG("top_k");
    CHECK_STATUS(moe_config_from_json(&j, "{\"type\":\"gshard\",\"dim\":8,\"capacity_factor_eval\":\"2\"}"),
                 MOE_ERR_ARG);
    CHECK_STATUS(moe_config_from_json(&j, "{\"type\":\"hierarchical\",\"dim\":8,\"num_experts\":[2,3],"
                                          "\"hidden_dim\":null,\"second_policy_eval\":\"threshold\","
                                          "\"loss_coef\":0.5,\"capacity_factor_train\":1.5}"),
                 MOE_OK);
    CHECK(j.type == MOE_LAYER_HIERARCHICAL && j.num_experts == 2 && j.num_experts_inner == 3 &&
              j.hidden_dim == 0 && j.second_policy_eval == MOE_SECOND_THRESHOLD && j.loss_coef == 0.5 &&
              j.capacity_factor_train == 1.5 && j.input_dim == 8,
          "hierarchical config parsed");

    /* N < E works (capacity is at least 4); odd-shaped weights are refused by name */
    moe_config_init(&c, MOE_LAYER_GSHARD);
    c.input_dim = 4, c.hidden_dim = 3, c.num_experts = 8, c.second_policy_train = MOE_SECOND_ALL;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    float x[2 * 4], y[2 * 4];
    for (int i = 0; i < 8; i++) x[i] = nrand();
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 1, 2, 1), MOE_OK);
    int finite = 1;
    for (int i = 0; i < 8; i++) finite &= isfinite(y[i]) != 0;
    CHECK(finite, "N=2 < E=8 gives a finite output");
    x[5] = NAN;
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 1, 2, 1), MOE_ERR_NONFINITE);
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 0, 2, 1), MOE_ERR_ARG);
    CHECK_MSG("empty batch");

    char dir[] = "/tmp/moe_gs_XXXXXX", path[256];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    moe_param *w1 = moe_layer_find_param(l, "experts.w1"), *w2 = moe_layer_find_param(l, "experts.w2"),
              *wg = moe_layer_find_param(l, "gate.w_gating");
    moe_st_entry e[3] = {{"gate.w_gating", MOE_DT_F32, 2, {4, 8}, wg->data},
                         {"experts.w1", MOE_DT_F32, 3, {8, 3, 4}, w1->data}, /* (E,H,D): transposed */
                         {"experts.w2", MOE_DT_F32, 3, {8, 3, 4}, w2->data}};
    CHECK_STATUS(moe_st_write(path, e, 3, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_load(l, path), MOE_ERR_SHAPE);
    CHECK_MSG("experts.w1");
    e[1].shape[1] = 4, e[1].shape[2] = 3;
    CHECK_STATUS(moe_st_write(path, e, 3, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_load(l, path), MOE_OK);
    unlink(path);
    rmdir(dir);
    moe_layer_free(l);
}

int main(void) {
    moe_set_num_threads(2);
    test_capacity();
    test_random_policy();
    test_random_determinism();
    test_stats();
    test_bad_input();
    return check_summary("test_gshard");
}
