/*
 * libFuzzer target: layer configs from JSON, then the layer they describe.
 * A config that parses and describes a small layer is created and run
 * forward and backward on a few tokens drawn from the input's bytes.
 */
#include "moe.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    moe_config c;
    moe_status st = moe_config_from_json(&c, text);
    free(text);
    if (st != MOE_OK) {
        if (!moe_last_error()[0]) abort();
        return 0;
    }
    /* keep the layer small: the fuzzer explores validation, not memory */
    double width = (double)c.input_dim * (double)(c.hidden_dim > 0 ? c.hidden_dim : 4 * c.input_dim);
    double experts = (double)c.num_experts * (c.num_experts_inner > 0 ? c.num_experts_inner : 1) +
                     (double)c.num_shared;
    if (width * experts > 1e5 || c.output_dim > 256 || c.slots_per_expert > 64 || c.expert_mult > 16) return 0;
    moe_layer *l = NULL;
    if (moe_layer_create(&l, &c) != MOE_OK) {
        if (l || !moe_last_error()[0]) abort();
        return 0;
    }
    int64_t B = 2, N = 5, D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);
    float *x = malloc((size_t)(B * N * D) * sizeof *x), *y = malloc((size_t)(B * N * O) * sizeof *y);
    float *dx = malloc((size_t)(B * N * D) * sizeof *dx), aux = 0;
    if (x && y && dx) {
        for (int64_t i = 0; i < B * N * D; i++) x[i] = (float)(data[i % size] % 17) * 0.25f - 2.0f;
        if (moe_layer_forward_seq(l, y, &aux, x, B, N, 1) == MOE_OK) {
            for (int64_t i = 0; i < B * N * O; i++) y[i] *= 0.5f; /* dy */
            moe_layer_backward(l, dx, y, 1.0f);
        }
    }
    free(x), free(y), free(dx);
    moe_layer_free(l);
    return 0;
}
