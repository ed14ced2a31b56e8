/*
 * The same seed gives bit-identical outputs, gradients and trained parameters
 * with 1 and 2 threads, for every layer type: three training steps (forward,
 * backward, AdamW) and an eval forward, on shapes large enough that a
 * GEMM library left to its own threads would split its GEMMs (and change the last
 * bits). Also with a token mask and image input (soft layers), runtime
 * routing control, and an expert holding most of the rows (which runs alone
 * on all threads).
 * Dimension key: B groups of N tokens, D model dim, E experts.
 */
#include "check.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    float *y, *dx, *params, *grads, *yeval;
    float aux;
} run_out;

static void run(run_out *o, const moe_config *c, int threads, int64_t B, int64_t N, int image, int mask,
                int control) {
    moe_set_num_threads(threads);
    moe_layer *l = NULL;
    CHECK_STATUS(moe_layer_create(&l, c), MOE_OK);
    if (!l) return;
    if (control) { /* expert 1 off, expert 0 on every token */
        uint8_t on[8] = {1, 0, 1, 1, 1, 1, 1, 1}, force[8] = {1, 0, 0, 0, 0, 0, 0, 0};
        CHECK_STATUS(moe_layer_set_routing(l, 3, on, force), MOE_OK);
    }
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    moe_optim *opt = NULL;
    CHECK_STATUS(moe_optim_create(&opt, &oc, moe_layer_param(l, 0), moe_layer_num_params(l)), MOE_OK);
    int64_t D = moe_layer_input_dim(l), O = moe_layer_output_dim(l), T = B * N, nw = moe_layer_num_weights(l);
    float *x = malloc((size_t)(T * D) * sizeof *x), *dy = malloc((size_t)(T * O) * sizeof *dy);
    uint8_t *m = malloc((size_t)T);
    o->y = malloc((size_t)(T * O) * sizeof *o->y);
    o->yeval = malloc((size_t)(T * O) * sizeof *o->yeval);
    o->dx = malloc((size_t)(T * D) * sizeof *o->dx);
    o->params = malloc((size_t)nw * sizeof *o->params);
    o->grads = malloc((size_t)nw * sizeof *o->grads);
    unsigned long long st = 77;
    for (int64_t i = 0; i < T; i++) m[i] = (uint8_t)(i % 5 != 2);
    for (int s = 0; s < 3; s++) {
        for (int64_t i = 0; i < T * D; i++) x[i] = check_nrand(&st);
        for (int64_t i = 0; i < T * O; i++) dy[i] = 0.1f * check_nrand(&st);
        moe_layer_zero_grad(l);
        moe_status r = image ? moe_layer_forward_image(l, o->y, &o->aux, x, mask ? m : NULL, B, 2, N / 2, 1)
                             : moe_layer_forward_masked(l, o->y, &o->aux, x, mask ? m : NULL, B, N, 1);
        CHECK_STATUS(r, MOE_OK);
        CHECK_STATUS(moe_layer_backward(l, o->dx, dy, 0.7f), MOE_OK);
        CHECK_STATUS(moe_optim_step(opt), MOE_OK);
        CHECK_STATUS(moe_layer_update_bias(l), MOE_OK);
    }
    memcpy(o->params, moe_layer_param(l, 0)->data, (size_t)nw * sizeof *o->params);
    memcpy(o->grads, moe_layer_param(l, 0)->grad, (size_t)nw * sizeof *o->grads);
    moe_status r = image ? moe_layer_forward_image(l, o->yeval, NULL, x, mask ? m : NULL, B, 2, N / 2, 0)
                         : moe_layer_forward_masked(l, o->yeval, NULL, x, mask ? m : NULL, B, N, 0);
    CHECK_STATUS(r, MOE_OK);
    moe_optim_free(opt);
    moe_layer_free(l);
    free(x), free(dy), free(m);
}

static void same_bits(const char *label, const moe_config *c, int64_t B, int64_t N, int image, int mask,
                      int control) {
    run_out a = {0}, b = {0};
    run(&a, c, 1, B, N, image, mask, control);
    run(&b, c, 2, B, N, image, mask, control);
    moe_layer *l = NULL;
    moe_layer_create(&l, c);
    int64_t T = B * N, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l), nw = moe_layer_num_weights(l);
    moe_layer_free(l);
    int y = a.y && b.y && !memcmp(a.y, b.y, (size_t)(T * O) * sizeof(float)) && a.aux == b.aux;
    int dx = a.dx && b.dx && !memcmp(a.dx, b.dx, (size_t)(T * D) * sizeof(float));
    int g = a.grads && b.grads && !memcmp(a.grads, b.grads, (size_t)nw * sizeof(float));
    int p = a.params && b.params && !memcmp(a.params, b.params, (size_t)nw * sizeof(float));
    int ev = a.yeval && b.yeval && !memcmp(a.yeval, b.yeval, (size_t)(T * O) * sizeof(float));
    CHECK(y && dx && g && p && ev, "%s: 1 and 2 threads differ: y %s, dx %s, gradients %s, trained parameters %s, "
          "eval y %s", label, y ? "same" : "DIFFER", dx ? "same" : "DIFFER", g ? "same" : "DIFFER",
          p ? "same" : "DIFFER", ev ? "same" : "DIFFER");
    printf("determinism %-34s %s\n", label, y && dx && g && p && ev ? "bit-identical" : "differs");
    free(a.y), free(a.dx), free(a.params), free(a.grads), free(a.yeval);
    free(b.y), free(b.dx), free(b.params), free(b.grads), free(b.yeval);
}

int main(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 96, c.hidden_dim = 160, c.num_experts = 8, c.expert = MOE_EXPERT_SWIGLU;
    same_bits("topk swiglu", &c, 1, 512, 0, 0, 0);
    moe_config_set_router(&c, "deepseek_v3");
    c.num_groups = 4, c.topk_groups = 2, c.num_shared = 1, c.balance_coef = 0.1, c.z_loss_coef = 0.01;
    same_bits("topk deepseek_v3 + shared", &c, 2, 256, 0, 0, 0);
    same_bits("topk runtime k=3, mask, force", &c, 2, 256, 0, 0, 1);
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 96, c.hidden_dim = 160, c.num_experts = 8;
    moe_config_set_router(&c, "switch");
    c.num_shared = 1; /* the shared expert holds most rows: it runs alone on all threads */
    same_bits("topk switch + shared (heavy expert)", &c, 2, 256, 0, 0, 0);
    moe_config_set_router(&c, "expert_choice");
    c.num_shared = 0;
    same_bits("topk expert_choice", &c, 2, 256, 0, 0, 0);
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 96, c.output_dim = 80, c.num_experts = 6;
    same_bits("dense", &c, 1, 512, 0, 0, 0);
    moe_config_init(&c, MOE_LAYER_GSHARD);
    c.input_dim = 96, c.hidden_dim = 160, c.num_experts = 8, c.second_policy_train = MOE_SECOND_ALL;
    same_bits("gshard", &c, 2, 256, 0, 0, 0);
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 96, c.hidden_dim = 160, c.num_experts = 2, c.num_experts_inner = 3;
    same_bits("hierarchical", &c, 2, 256, 0, 0, 0);
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 96, c.num_experts = 4, c.expert_mult = 2, c.dropout = 0.1f;
    same_bits("soft_dynamic masked, dropout", &c, 2, 250, 0, 1, 0);
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 96, c.num_experts = 4, c.slots_per_expert = 40, c.expert_mult = 2, c.expert = MOE_EXPERT_GEGLU;
    same_bits("soft geglu, image", &c, 2, 256, 1, 0, 0);
    return check_summary("test_determinism");
}
