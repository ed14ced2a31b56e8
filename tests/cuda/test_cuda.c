/*
 * The CUDA topk layer (include/moe_cuda.h) against the CPU layer.
 * Host-side checks run everywhere: no device is reported cleanly, configs
 * the GPU layer does not cover are refused with MOE_ERR_UNSUPPORTED and a
 * message, misuse (NULL pointers) gets a status. With a CUDA device it also
 * compares forward and backward (y, aux loss, expert choices and counts,
 * dx, every parameter gradient) with moe_layer_forward/backward on awkward
 * shapes, checks host and device pointers give the same bits, and that two
 * runs give the same bits. Without a device those cases are counted as
 * skipped, never as passed: the last line is
 *   test_cuda: P passed, F failed, S skipped
 * Dimension key: T tokens, D model dim, H hidden dim, E experts, K top-k.
 */
#include "check.h"
#include "moe.h"
#include "moe_cuda.h"

#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

/* libmoe.a internal (src/layers/topk.c): the CPU layer's picks, -1 dropped */
int64_t moe__layer_routing(const moe_layer *l, int32_t *dst, int64_t cap); /* the kind's routing (topk here) */

static int skipped;

typedef struct {
    const char *name;
    int64_t T, D, H;
    int E, K;
    moe_expert_kind expert;
    moe_activation act;
    moe_score_func score;
    int normalize;
    double scale, balance, zloss;
    int bias;
} gcase;

static const gcase cases[] = {
    {"T < E, relu, topk_softmax", 3, 16, 24, 8, 2, MOE_EXPERT_MLP, MOE_ACT_RELU, MOE_SCORE_TOPK_SOFTMAX, 0, 1, 0, 0, 0},
    {"k = E, gelu, softmax normalised", 37, 33, 17, 4, 4, MOE_EXPERT_MLP, MOE_ACT_GELU, MOE_SCORE_SOFTMAX, 1, 1, 0.01,
     0, 0},
    {"one token, swiglu", 1, 8, 12, 6, 2, MOE_EXPERT_SWIGLU, MOE_ACT_SILU, MOE_SCORE_TOPK_SOFTMAX, 0, 1, 0, 0, 0},
    {"odd sizes, geglu, sigmoid, bias, scale, losses", 517, 61, 47, 7, 3, MOE_EXPERT_GEGLU, MOE_ACT_GELU,
     MOE_SCORE_SIGMOID, 1, 2.5, 0.01, 1e-3, 1},
    {"two chunks, mixtral-like swiglu", 300, 64, 96, 8, 2, MOE_EXPERT_SWIGLU, MOE_ACT_SILU, MOE_SCORE_SOFTMAX, 1, 1,
     0.01, 1e-3, 0},
    {"softmax unnormalised, leaky_relu, sigmoid unnormalised z-loss", 129, 40, 24, 16, 1, MOE_EXPERT_MLP,
     MOE_ACT_LEAKY_RELU, MOE_SCORE_SOFTMAX, 0, 1, 0.02, 1e-2, 0},
    {"sigmoid unnormalised, silu", 65, 24, 20, 5, 2, MOE_EXPERT_MLP, MOE_ACT_SILU, MOE_SCORE_SIGMOID, 0, 1, 0.01,
     1e-3, 0},
};
#define N_CASES ((int)(sizeof cases / sizeof cases[0]))
#define N_DEVICE_EXTRA 3 /* device pointers, run-to-run bits, misuse with a layer */

static moe_config config_of(const gcase *g) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = g->D, c.hidden_dim = g->H, c.num_experts = g->E, c.top_k = g->K;
    c.expert = g->expert, c.activation = g->act, c.leaky_slope = 0.05f, c.score = g->score;
    c.normalize = g->normalize, c.route_scale = g->scale, c.balance_coef = g->balance, c.z_loss_coef = g->zloss;
    c.expert_bias = g->bias, c.seed = 1234 + (uint64_t)g->T;
    return c;
}

/* max |a - b| / max(max |b|, 1e-3) */
static double rel_err(const float *a, const float *b, int64_t n) {
    double m = 0.0, s = 1e-3;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN sticks */
        if (fabs(b[i]) > s) s = fabs(b[i]);
    }
    return m / s;
}

static float *randn(int64_t n, unsigned long long seed) {
    float *v = malloc((size_t)n * sizeof *v);
    for (int64_t i = 0; i < n; i++) v[i] = check_nrand(&seed);
    return v;
}

/* ---------------------------------------------------------------- host-side */

static void host_checks(int have) {
    char msg[256] = "";
    int a = moe_cuda_available(msg, sizeof msg);
    CHECK(a == have, "moe_cuda_available changed its answer");
    CHECK(msg[0] != '\0', "moe_cuda_available gave no message");
    if (!a) CHECK(strstr(msg, "no CUDA device") || strstr(msg, "unusable"), "message: %s", msg);
    CHECK(moe_cuda_available(NULL, 0) == a, "NULL message buffer");
    char tiny[4];
    CHECK(moe_cuda_available(tiny, sizeof tiny) == a && strlen(tiny) < sizeof tiny, "short message buffer");

    moe_layer_cuda *l = (moe_layer_cuda *)&l; /* must become NULL on error */
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    CHECK_STATUS(moe_cuda_layer_create(NULL, &c), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_create(&l, NULL), MOE_ERR_ARG);
    CHECK(l == NULL, "out not cleared");

    /* other layer types: refused, with a message naming the type */
    moe_layer_type others[] = {MOE_LAYER_DENSE, MOE_LAYER_GSHARD, MOE_LAYER_HIERARCHICAL, MOE_LAYER_SOFT_DYNAMIC,
                               MOE_LAYER_SOFT};
    for (int i = 0; i < 5; i++) {
        moe_config o;
        moe_config_init(&o, others[i]);
        l = (moe_layer_cuda *)&l;
        CHECK_STATUS(moe_cuda_layer_create(&l, &o), MOE_ERR_UNSUPPORTED);
        CHECK(l == NULL && strstr(moe_last_error(), "topk") && strstr(moe_last_error(), moe_layer_type_name(others[i])),
              "type %s: %s", moe_layer_type_name(others[i]), moe_last_error());
    }
    /* topk settings not covered yet: refused before any device is needed */
    struct {
        const char *recipe_or_field, *word;
    } unsup[] = {{"switch", "capacity"}, {"expert_choice", "expert choice"}, {"shared", "shared"},
                 {"groups", "group"},    {"bf16", "bf16"},                   {"jitter", "jitter"}};
    for (int i = 0; i < 6; i++) {
        moe_config u;
        moe_config_init(&u, MOE_LAYER_TOPK);
        const char *f = unsup[i].recipe_or_field;
        if (!strcmp(f, "shared")) u.num_shared = 1;
        else if (!strcmp(f, "groups")) u.num_experts = 8, u.num_groups = 2, u.topk_groups = 1;
        else if (!strcmp(f, "bf16")) u.bf16 = 1;
        else if (!strcmp(f, "jitter")) u.jitter = 0.01;
        else CHECK_STATUS(moe_config_set_router(&u, f), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_create(&l, &u), MOE_ERR_UNSUPPORTED);
        CHECK(strstr(moe_last_error(), unsup[i].word) != NULL, "%s: %s", f, moe_last_error());
    }
    /* an invalid topk config: the CPU layer's own error, before the device */
    moe_config bad = c;
    bad.top_k = bad.num_experts + 1;
    CHECK_STATUS(moe_cuda_layer_create(&l, &bad), MOE_ERR_ARG);
    CHECK(strstr(moe_last_error(), "top_k") != NULL, "%s", moe_last_error());

    /* no device: a valid config is refused with the reason */
    if (!have) {
        CHECK_STATUS(moe_cuda_layer_create(&l, &c), MOE_ERR_UNSUPPORTED);
        CHECK(l == NULL && strstr(moe_last_error(), "CUDA device"), "%s", moe_last_error());
        moe_layer *cpu = NULL;
        CHECK_STATUS(moe_layer_create(&cpu, &c), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_create_from(&l, cpu), MOE_ERR_UNSUPPORTED);
        CHECK_STATUS(moe_cuda_layer_create_device_init(&l, &c), MOE_ERR_UNSUPPORTED);
        moe_layer_free(cpu);
    }

    /* misuse without a layer */
    float v[4] = {0};
    CHECK_STATUS(moe_cuda_layer_create_from(&l, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_create_from(NULL, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_forward(NULL, v, NULL, v, 1, MOE_TRAIN), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_backward(NULL, v, v, 1.0f, 0), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_set_param(NULL, "gate.weight", v, 4), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_get_param(NULL, v, "gate.weight", 4), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_get_grad(NULL, v, "gate.weight", 4), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_upload(NULL, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_download(NULL, NULL, 1), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_zero_grad(NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_routing(NULL, NULL, NULL, NULL, NULL), MOE_ERR_ARG);
    CHECK(moe_cuda_layer_config(NULL) == NULL, "config of NULL");
    moe_cuda_layer_free(NULL);
}

/* ---------------------------------------------------------------- device */

/* Every parameter gradient of the GPU layer against the CPU layer's. */
static void compare_grads(moe_layer *cpu, moe_layer_cuda *g, const char *name, double tol) {
    const moe_config *c = moe_layer_config(cpu);
    moe_layer *got = NULL;
    CHECK_STATUS(moe_layer_create(&got, c), MOE_OK);
    if (!got) return;
    moe_layer_zero_grad(got);
    CHECK_STATUS(moe_cuda_layer_download(got, g, 1), MOE_OK);
    double worst = 0.0;
    const char *wn = "";
    for (int i = 0; i < moe_layer_num_params(cpu); i++) {
        moe_param *a = moe_layer_param(cpu, i), *b = moe_layer_param(got, i);
        CHECK(rel_err(b->data, a->data, a->numel) == 0.0, "%s: parameter %s not the same after the round trip",
              name, a->name);
        double e = rel_err(b->grad, a->grad, a->numel);
        if (!(e <= worst)) worst = e, wn = a->name;
    }
    CHECK(worst <= tol, "%s: gradient %s differs by %.3g (relative)", name, wn, worst);
    moe_layer_free(got);
}

static void device_case(const gcase *g) {
    moe_config c = config_of(g);
    int64_t T = g->T, D = g->D, K = g->K;
    moe_layer *cpu = NULL;
    moe_layer_cuda *gl = NULL;
    CHECK_STATUS(moe_layer_create(&cpu, &c), MOE_OK);
    if (!cpu) return;
    if (g->bias) { /* a selection bias that changes some picks */
        moe_param *b = moe_layer_buffer(cpu, 0);
        for (int e = 0; e < g->E; e++) b->data[e] = 0.05f * (float)((e * 7) % 5) - 0.1f;
    }
    CHECK_STATUS(moe_cuda_layer_create_from(&gl, cpu), MOE_OK);
    if (!gl) {
        moe_layer_free(cpu);
        return;
    }
    float *x = randn(T * D, 11 + (unsigned long long)T), *dy = randn(T * D, 99 + (unsigned long long)T);
    float *y0 = calloc((size_t)(T * D), sizeof *y0), *y1 = calloc((size_t)(T * D), sizeof *y1);
    float *dx0 = calloc((size_t)(T * D), sizeof *dx0), *dx1 = calloc((size_t)(T * D), sizeof *dx1);
    float a0 = 0, a1 = 0;
    CHECK_STATUS(moe_layer_forward(cpu, y0, &a0, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(cpu, dx0, dy, 1.0f), MOE_OK);
    CHECK_STATUS(moe_cuda_layer_forward(gl, y1, &a1, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_cuda_layer_backward(gl, dx1, dy, 1.0f, 0), MOE_OK);

    /* the same expert choices and counts */
    int32_t *i0 = malloc((size_t)(T * K) * sizeof *i0), *i1 = malloc((size_t)(T * K) * sizeof *i1);
    int64_t counts[64];
    double bal = 0, zl = 0;
    moe__layer_routing(cpu, i0, T * K);
    CHECK_STATUS(moe_cuda_layer_routing(gl, counts, i1, &bal, &zl), MOE_OK);
    CHECK(memcmp(i0, i1, (size_t)(T * K) * sizeof *i0) == 0, "%s: expert choices differ", g->name);
    moe_stats s;
    moe_layer_stats(cpu, &s);
    int same = 1;
    for (int e = 0; e < g->E; e++) same &= s.expert_counts[e] == counts[e];
    CHECK(same, "%s: expert counts differ", g->name);
    CHECK(fabs(bal - s.balance_loss) <= 1e-6 * (1 + fabs(s.balance_loss)), "%s: balance %.9g vs %.9g", g->name, bal,
          s.balance_loss);
    CHECK(fabs(zl - s.z_loss) <= 1e-5 * (1 + fabs(s.z_loss)), "%s: z-loss %.9g vs %.9g", g->name, zl, s.z_loss);
    CHECK(fabs(a1 - a0) <= 1e-5 * (1 + fabs(a0)), "%s: aux %.9g vs %.9g", g->name, a1, a0);
    double ey = rel_err(y1, y0, T * D), ex = rel_err(dx1, dx0, T * D);
    CHECK(ey <= 2e-5, "%s: y differs by %.3g (relative)", g->name, ey);
    CHECK(ex <= 1e-4, "%s: dx differs by %.3g (relative)", g->name, ex);
    compare_grads(cpu, gl, g->name, 1e-4);
    printf("  %-60s y %.1e  dx %.1e\n", g->name, ey, ex);

    free(x), free(dy), free(y0), free(y1), free(dx0), free(dx1), free(i0), free(i1);
    moe_cuda_layer_free(gl);
    moe_layer_free(cpu);
}

/* Host and device pointers give the same bits; two runs give the same bits. */
static void device_bits(void) {
    const gcase *g = &cases[4];
    moe_config c = config_of(g);
    int64_t T = g->T, D = g->D, n = T * D;
    moe_layer_cuda *gl = NULL;
    CHECK_STATUS(moe_cuda_layer_create(&gl, &c), MOE_OK);
    if (!gl) return;
    float *x = randn(n, 5), *dy = randn(n, 6);
    float *y[2], *dx[2], *gw[2];
    int64_t nw = (int64_t)g->E * D;
    for (int r = 0; r < 2; r++) {
        y[r] = calloc((size_t)n, sizeof(float)), dx[r] = calloc((size_t)n, sizeof(float));
        gw[r] = calloc((size_t)(3 * g->H * D), sizeof(float));
        CHECK_STATUS(moe_cuda_layer_zero_grad(gl), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_forward(gl, y[r], NULL, x, T, MOE_TRAIN), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_backward(gl, dx[r], dy, 1.0f, 0), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_get_grad(gl, gw[r], "experts.3.net.0.weight", 2 * g->H * D), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_get_grad(gl, gw[r] + 2 * g->H * D, "gate.weight", nw), MOE_OK);
    }
    CHECK(!memcmp(y[0], y[1], (size_t)n * 4) && !memcmp(dx[0], dx[1], (size_t)n * 4), "run-to-run y or dx differ");
    CHECK(!memcmp(gw[0], gw[1], (size_t)(2 * g->H * D + nw) * 4), "run-to-run gradients differ");

    /* device pointers */
    float *dxd = NULL, *dyd = NULL, *dyy = NULL, *ddx = NULL, *hy = calloc((size_t)n, 4), *hdx = calloc((size_t)n, 4);
    int ok = cudaMalloc((void **)&dxd, (size_t)n * 4) == cudaSuccess && cudaMalloc((void **)&dyd, (size_t)n * 4) ==
             cudaSuccess && cudaMalloc((void **)&dyy, (size_t)n * 4) == cudaSuccess &&
             cudaMalloc((void **)&ddx, (size_t)n * 4) == cudaSuccess;
    CHECK(ok, "cudaMalloc");
    if (ok) {
        cudaMemcpy(dxd, x, (size_t)n * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dyd, dy, (size_t)n * 4, cudaMemcpyHostToDevice);
        CHECK_STATUS(moe_cuda_layer_forward(gl, dyy, NULL, dxd, T, MOE_TRAIN | MOE_CUDA_DEVICE_PTRS), MOE_OK);
        CHECK_STATUS(moe_cuda_layer_backward(gl, ddx, dyd, 1.0f, MOE_CUDA_DEVICE_PTRS), MOE_OK);
        cudaMemcpy(hy, dyy, (size_t)n * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(hdx, ddx, (size_t)n * 4, cudaMemcpyDeviceToHost);
        CHECK(!memcmp(hy, y[0], (size_t)n * 4) && !memcmp(hdx, dx[0], (size_t)n * 4),
              "device pointers give other bits than host pointers");
    }
    cudaFree(dxd), cudaFree(dyd), cudaFree(dyy), cudaFree(ddx);

    /* misuse with a layer */
    float v[8] = {0};
    CHECK_STATUS(moe_cuda_layer_forward(gl, y[0], NULL, x, T, MOE_TRAIN | MOE_NO_GRAD), MOE_OK);
    CHECK_STATUS(moe_cuda_layer_backward(gl, dx[0], dy, 1.0f, 0), MOE_ERR_STATE);
    CHECK_STATUS(moe_cuda_layer_forward(gl, y[0], NULL, x, 0, MOE_TRAIN), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_forward(gl, NULL, NULL, x, T, MOE_TRAIN), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_forward(gl, y[0], NULL, x, T, 0x40), MOE_ERR_ARG);
    x[7] = NAN;
    CHECK_STATUS(moe_cuda_layer_forward(gl, y[0], NULL, x, T, MOE_TRAIN), MOE_ERR_NONFINITE);
    CHECK_STATUS(moe_cuda_layer_backward(gl, dx[0], dy, 1.0f, 0), MOE_ERR_STATE);
    CHECK_STATUS(moe_cuda_layer_set_param(gl, "gate.nope", v, 8), MOE_ERR_NOTFOUND);
    CHECK_STATUS(moe_cuda_layer_set_param(gl, "gate.bias", v, 7), MOE_ERR_SHAPE);
    CHECK_STATUS(moe_cuda_layer_set_param(gl, "gate.bias", NULL, 8), MOE_ERR_ARG);
    CHECK_STATUS(moe_cuda_layer_set_param(gl, "gate.bias", v, 8), MOE_OK);
    moe_config other = c;
    other.num_experts = 4;
    moe_layer *small = NULL;
    CHECK_STATUS(moe_layer_create(&small, &other), MOE_OK);
    CHECK_STATUS(moe_cuda_layer_upload(gl, small), MOE_ERR_ARG);
    moe_layer_free(small);
    for (int r = 0; r < 2; r++) free(y[r]), free(dx[r]), free(gw[r]);
    free(x), free(dy), free(hy), free(hdx);
    moe_cuda_layer_free(gl);
}

int main(void) {
    char msg[256];
    int have = moe_cuda_available(msg, sizeof msg);
    host_checks(have);
    if (!have) {
        skipped = N_CASES + N_DEVICE_EXTRA;
        printf("test_cuda: skipped: no CUDA device (%s): %d GPU comparisons not run\n", msg, skipped);
    } else {
        printf("test_cuda: device %s\n", msg);
        for (int i = 0; i < N_CASES; i++) device_case(&cases[i]);
        device_bits();
    }
    printf("test_cuda: %d passed, %d failed, %d skipped\n", check_pass_, check_fail_, skipped);
    return check_fail_ ? 1 : 0;
}
