/*
 * Bad input through the C API: impossible configs, empty batches, NaN/Inf,
 * calls out of order, malformed JSON configs, weights that do not match the
 * config. Each must return the right status with a message saying what was
 * wrong, never crash, and leave the layer usable (run under ASan too).
 * (Hostile safetensors files are in test_safetensors.c.)
 */
#include "check.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK_MSG(sub) CHECK(strstr(moe_last_error(), sub) != NULL, "message lacks '%s': %s", sub, moe_last_error())

static void test_configs(void) {
    moe_config c;
    moe_layer *l = (moe_layer *)1;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.top_k = 5; /* k > E = 4 */
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("top_k = 5");
    CHECK(l == NULL, "failed create must set *out = NULL");
    c.top_k = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("top_k = 0");
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.num_experts = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("num_experts");
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("input_dim");
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.hidden_dim = -3;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("hidden_dim");
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.activation = (moe_activation)42;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 1 << 28, c.hidden_dim = 1 << 28, c.num_experts = 1 << 16, c.top_k = 1;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG); /* 2^72 parameters: refused, not malloc'd */
    CHECK_MSG("too large");
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.output_dim = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("output_dim");
    CHECK_STATUS(moe_layer_create(NULL, &c), MOE_ERR_ARG);
    c.type = (moe_layer_type)9;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
}

static void test_json(void) {
    moe_config c;
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\",\"num_experts\":8,\"input_dim\":16,"
                                          "\"hidden_dim\":32,\"top_k\":3,\"activation\":\"gelu\",\"expert\":\"geglu\"}"),
                 MOE_OK);
    CHECK(c.type == MOE_LAYER_TOPK && c.num_experts == 8 && c.input_dim == 16 && c.hidden_dim == 32 &&
              c.top_k == 3 && c.activation == MOE_ACT_GELU && c.expert == MOE_EXPERT_GEGLU,
          "parsed config fields");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"dense\",\"num_experts\":3,\"input_dim\":5,\"output_dim\":2}"),
                 MOE_OK);
    CHECK(c.type == MOE_LAYER_DENSE && c.output_dim == 2, "dense config");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\""), MOE_ERR_FORMAT);
    CHECK_STATUS(moe_config_from_json(&c, "[1,2]"), MOE_ERR_FORMAT);
    CHECK_STATUS(moe_config_from_json(&c, "{\"num_experts\":4}"), MOE_ERR_ARG);
    CHECK_MSG("type");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"sparse\"}"), MOE_ERR_UNSUPPORTED);
    CHECK_MSG("sparse");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\",\"top_k\":1.5}"), MOE_ERR_ARG);
    CHECK_MSG("top_k");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\",\"num_expert\":4}"), MOE_ERR_ARG);
    CHECK_MSG("num_expert");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"dense\",\"top_k\":2}"), MOE_ERR_ARG);
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\",\"activation\":\"tanh\"}"), MOE_ERR_ARG);
    CHECK_MSG("activation");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\",\"input_dim\":-4}"), MOE_ERR_ARG);
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"topk\",\"input_dim\":1e300}"), MOE_ERR_ARG);
    CHECK_STATUS(moe_config_from_json(NULL, "{}"), MOE_ERR_ARG);
}

static void test_calls(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 4, c.hidden_dim = 3, c.num_experts = 3, c.top_k = 2;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8], dx[8], dy[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 0), MOE_ERR_STATE); /* no forward yet */
    CHECK_MSG("forward");
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 0, 1), MOE_ERR_ARG);
    CHECK_MSG("empty batch");
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, -1, 1), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_forward(l, y, NULL, NULL, 2, 1), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_forward(NULL, y, NULL, x, 2, 1), MOE_ERR_ARG);
    x[6] = NAN;
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 2, 1), MOE_ERR_NONFINITE);
    CHECK_MSG("x[1][2] is NaN");
    x[6] = INFINITY;
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 2, 1), MOE_ERR_NONFINITE);
    CHECK_MSG("Inf");
    x[6] = 7;
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 2, MOE_EVAL | MOE_NO_GRAD), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 0), MOE_ERR_STATE); /* a no_grad forward keeps nothing */
    CHECK_MSG("MOE_NO_GRAD");
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 2, 4), MOE_ERR_ARG); /* an unknown flag bit */
    CHECK_MSG("flags 0x4");
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 0), MOE_ERR_STATE); /* the failed call cached nothing */
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, 2, 1), MOE_OK);
    dy[3] = NAN;
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 0), MOE_ERR_NONFINITE);
    CHECK_MSG("dy[0][3]");
    dy[3] = 1;
    float g0 = moe_layer_find_param(l, "gate.weight")->grad[0];
    CHECK(g0 == 0.0f, "failed backward must not touch gradients");
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 0), MOE_OK); /* still usable */
    CHECK_STATUS(moe_layer_backward(l, NULL, NULL, 0), MOE_ERR_ARG);
    CHECK(moe_layer_find_param(l, "nope") == NULL, "find_param of an unknown name");
    CHECK(strcmp(moe_status_str((moe_status)99), "MOE_ERR_UNKNOWN") == 0, "unknown status name");
    moe_layer_free(l);
    moe_layer_free(NULL);
}

/* Weights that do not match the config: wrong shape, missing, extra, NaN. */
static void test_weights(void) {
    char dir[] = "/tmp/moe_bad_XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char path[256];
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 4, c.hidden_dim = 3, c.num_experts = 2, c.top_k = 1;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    int n = moe_layer_num_params(l);
    moe_st_entry *e = calloc((size_t)n + 1, sizeof *e);
    float *zeros = calloc(4096, sizeof(float));
    for (int i = 0; i < n; i++) {
        moe_param *p = moe_layer_param(l, i);
        e[i].name = p->name, e[i].dtype = MOE_DT_F32, e[i].ndim = p->ndim, e[i].data = zeros;
        for (int d = 0; d < p->ndim; d++) e[i].shape[d] = p->shape[d];
    }
    float before = moe_layer_param(l, 0)->data[0];
    /* config says D=4; the file's gate has D=5 */
    e[n - 2].shape[1] = 5;
    CHECK_STATUS(moe_st_write(path, e, n, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_load(l, path), MOE_ERR_SHAPE);
    CHECK_MSG("gate.weight");
    e[n - 2].shape[1] = 4;
    /* missing tensor */
    CHECK_STATUS(moe_st_write(path, e, n - 1, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_load(l, path), MOE_ERR_NOTFOUND);
    CHECK_MSG("gate.bias");
    /* extra tensor */
    e[n] = e[n - 1];
    e[n].name = "gate.extra";
    CHECK_STATUS(moe_st_write(path, e, n + 1, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_load(l, path), MOE_ERR_FORMAT);
    CHECK_MSG("gate.extra");
    /* unsupported dtype for a parameter */
    e[n - 1].dtype = MOE_DT_I32;
    CHECK_STATUS(moe_st_write(path, e, n, NULL, 0), MOE_OK);
    CHECK(moe_layer_load(l, path) != MOE_OK, "I32 parameter must be refused");
    CHECK_MSG("gate.bias");
    e[n - 1].dtype = MOE_DT_F32;
    /* a NaN weight */
    zeros[1] = NAN;
    CHECK_STATUS(moe_st_write(path, e, n, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_load(l, path), MOE_ERR_NONFINITE);
    zeros[1] = 0;
    CHECK(moe_layer_param(l, 0)->data[0] == before, "failed loads must leave parameters as they were");
    /* a truncated copy of a good file */
    CHECK_STATUS(moe_layer_save(l, path), MOE_OK);
    FILE *f = fopen(path, "r+b");
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fclose(f);
    CHECK(truncate(path, len - 7) == 0, "truncate");
    CHECK_STATUS(moe_layer_load(l, path), MOE_ERR_FORMAT);
    CHECK(moe_layer_param(l, 0)->data[0] == before, "truncated load changed parameters");
    CHECK_STATUS(moe_layer_load(l, "/nonexistent/w.safetensors"), MOE_ERR_IO);
    CHECK_MSG("/nonexistent/w.safetensors");
    unlink(path);
    rmdir(dir);
    free(e), free(zeros);
    moe_layer_free(l);
}

int main(void) {
    test_configs();
    test_json();
    test_calls();
    test_weights();
    return check_summary("test_badinput");
}
