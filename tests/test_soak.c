/*
 * Soak (bounded in time): many training steps (forward, backward, AdamW,
 * selection-bias update) and eval forwards on every layer type, with batch
 * sizes that change from step to step, and resident memory must stay flat
 * once the workspace has grown to the largest batch: no allocation per step
 * is kept. (Under ASan, whose quarantine holds freed memory, the memory check
 * is left to its leak detector.)
 * Dimension key: B groups of N tokens, D model dim, E experts.
 */
#include "check.h"
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long rss_kb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
        fclose(f);
    }
    return rss * (sysconf(_SC_PAGESIZE) / 1024);
}

static void soak(const char *label, const moe_config *c, int steps) {
    moe_layer *l = NULL;
    CHECK_STATUS(moe_layer_create(&l, c), MOE_OK);
    if (!l) return;
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    moe_optim *o = NULL;
    CHECK_STATUS(moe_optim_create(&o, &oc, moe_layer_param(l, 0), moe_layer_num_params(l)), MOE_OK);
    int64_t D = moe_layer_input_dim(l), O = moe_layer_output_dim(l), Bmax = 4, N = 16;
    float *x = malloc((size_t)(Bmax * N * D) * sizeof *x), *y = malloc((size_t)(Bmax * N * O) * sizeof *y);
    float *dx = malloc((size_t)(Bmax * N * D) * sizeof *dx);
    unsigned long long st = 5;
    long base = 0;
    int fails = 0;
    for (int s = 0; s < steps; s++) {
        int64_t B = 1 + s % Bmax; /* the batch changes every step */
        for (int64_t i = 0; i < B * N * D; i++) x[i] = check_nrand(&st);
        float aux = 0;
        moe_layer_zero_grad(l);
        fails += moe_layer_forward_seq(l, y, &aux, x, B, N, 1) != MOE_OK;
        for (int64_t i = 0; i < B * N * O; i++) y[i] *= 0.01f; /* dy */
        fails += moe_layer_backward(l, dx, y, 1.0f) != MOE_OK;
        fails += moe_optim_step(o) != MOE_OK;
        fails += moe_layer_update_bias(l) != MOE_OK;
        fails += moe_layer_forward_seq(l, y, NULL, x, B, N, 0) != MOE_OK;
        if (s == steps / 10) base = rss_kb();
    }
    long end = rss_kb();
    CHECK(fails == 0, "%s: %d failing calls", label, fails);
#ifndef __SANITIZE_ADDRESS__
    CHECK(end - base <= 512, "%s: resident memory grew by %ld kB over %d steps (from %ld kB)", label, end - base,
          steps - steps / 10, base);
#endif
    printf("soak %-28s %d steps, resident %ld -> %ld kB\n", label, steps, base, end);
    free(x), free(y), free(dx);
    moe_optim_free(o);
    moe_layer_free(l);
}

int main(void) {
    moe_set_num_threads(2);
    /* MOE_TEST_QUICK=1 (tests/run_arm64.sh: under qemu each step is about
     * 10x slower): a tenth of the steps; every check still runs, the memory
     * one over fewer steps (still every batch size many times over). */
    const char *q = getenv("MOE_TEST_QUICK");
    int div = q && strcmp(q, "1") == 0 ? 10 : 1;
    if (div > 1) printf("test_soak: MOE_TEST_QUICK=1: shortened to a tenth of the steps\n");
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 32, c.hidden_dim = 32, c.num_experts = 8, c.top_k = 2;
    moe_config_set_router(&c, "deepseek_v3");
    c.num_groups = 4, c.topk_groups = 2, c.num_shared = 1, c.capacity_factor_train = 1.0;
    soak("topk deepseek_v3+shared", &c, 1500 / div);
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 32, c.hidden_dim = 32, c.num_experts = 8;
    moe_config_set_router(&c, "expert_choice");
    soak("topk expert_choice", &c, 1000 / div);
    moe_config_init(&c, MOE_LAYER_GSHARD);
    c.input_dim = 32, c.hidden_dim = 32, c.num_experts = 4;
    soak("gshard", &c, 1000 / div);
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 32, c.hidden_dim = 32, c.num_experts = 2, c.num_experts_inner = 2;
    soak("hierarchical", &c, 500 / div);
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 32, c.num_experts = 4, c.expert_mult = 1, c.dropout = 0.1f;
    soak("soft_dynamic", &c, 1000 / div);
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 32, c.output_dim = 16, c.num_experts = 4;
    soak("dense", &c, 1000 / div);
    return check_summary("test_soak");
}
