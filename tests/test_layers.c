/*
 * Layer behaviour and the kernels under it: routing against a brute-force
 * reference, dispatch invariants, the parameter table, init, gradient
 * accumulation, save/load round trip, thread-count determinism, optimizers.
 * Dimension key: T tokens, D model dim, H hidden dim, E experts, K top-k.
 */
#include "check.h"
#include "layer_internal.h"
#include "moe.h"
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t g_rng = 777;
static float frand(void) { /* uniform(-1, 1) */
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(g_rng >> 11) / 4503599627370496.0 - 1.0);
}

/* ---- routing kernels against plain references ---- */
static void test_topk_kernel(void) {
    int shapes[][3] = {{1, 1, 1}, {5, 4, 2}, {3, 8, 8}, {17, 16, 3}, {64, 7, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int T = shapes[s][0], E = shapes[s][1], K = shapes[s][2];
        float *lg = malloc(sizeof(float) * T * E), *w = malloc(sizeof(float) * T * K);
        int32_t *idx = malloc(sizeof(int32_t) * T * K), *pos = malloc(sizeof(int32_t) * T * K);
        int32_t *slot = malloc(sizeof(int32_t) * T * K);
        int64_t *cnt = malloc(sizeof(int64_t) * E), *off = malloc(sizeof(int64_t) * (E + 1));
        for (int i = 0; i < T * E; i++) lg[i] = frand();
        moe_topk_softmax(idx, w, lg, T, E, K);
        int ok = 1;
        for (int t = 0; t < T; t++) {
            /* reference: rank of each chosen logit by counting larger ones */
            double ws = 0;
            for (int j = 0; j < K; j++) {
                int larger = 0;
                for (int e = 0; e < E; e++) larger += lg[t * E + e] > lg[t * E + idx[t * K + j]];
                ok &= larger == j;
                ws += w[t * K + j];
                if (j) ok &= w[t * K + j] <= w[t * K + j - 1];
            }
            ok &= fabs(ws - 1.0) < 1e-6;
            /* weight ratio equals exp of logit difference */
            if (K > 1) {
                double r = w[t * K + 1] / w[t * K], want = exp(lg[t * E + idx[t * K + 1]] - lg[t * E + idx[t * K]]);
                ok &= fabs(r - want) < 1e-5;
            }
        }
        CHECK(ok, "top-k selection/softmax wrong for T=%d E=%d K=%d", T, E, K);
        memset(pos, 0, (size_t)T * K * sizeof *pos); /* nothing dropped */
        moe_dispatch_plan(cnt, off, pos, slot, idx, T, K, E);
        int64_t total = 0;
        ok = off[0] == 0;
        for (int e = 0; e < E; e++) total += cnt[e], ok &= off[e + 1] - off[e] == cnt[e];
        ok &= total == (int64_t)T * K;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < K; j++) {
                int32_t r = pos[t * K + j], e = idx[t * K + j];
                ok &= slot[r] == t && r >= off[e] && r < off[e + 1];
            }
        for (int e = 0; e < E; e++) /* rows of an expert sorted by token */
            for (int64_t r = off[e] + 1; r < off[e + 1]; r++) ok &= slot[r] > slot[r - 1];
        CHECK(ok, "dispatch plan invariants broken for T=%d E=%d K=%d", T, E, K);
        free(lg), free(w), free(idx), free(pos), free(slot), free(cnt), free(off);
    }
}

/* ---- layer output against a plain per-token reference ---- */
static void test_topk_reference(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 7, c.hidden_dim = 9, c.num_experts = 5, c.top_k = 2, c.activation = MOE_ACT_RELU, c.seed = 3;
    moe_layer *l;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    int T = 13, D = 7, H = 9, E = 5;
    float x[13 * 7], y[13 * 7];
    for (int i = 0; i < T * D; i++) x[i] = frand();
    CHECK_STATUS(moe_layer_forward(l, y, NULL, x, T, 0), MOE_OK);
    double maxerr = 0;
    const float *Wg = moe_layer_find_param(l, "gate.weight")->data, *bg = moe_layer_find_param(l, "gate.bias")->data;
    for (int t = 0; t < T; t++) {
        double lg[5];
        for (int e = 0; e < E; e++) {
            lg[e] = bg[e];
            for (int d = 0; d < D; d++) lg[e] += (double)Wg[e * D + d] * x[t * D + d];
        }
        int a = 0, b = -1;
        for (int e = 1; e < E; e++) if (lg[e] > lg[a]) a = e;
        for (int e = 0; e < E; e++) if (e != a && (b < 0 || lg[e] > lg[b])) b = e;
        double wa = 1.0 / (1.0 + exp(lg[b] - lg[a])), wb = 1.0 - wa;
        for (int d = 0; d < D; d++) {
            double out = 0;
            int ch[2] = {a, b};
            double wt[2] = {wa, wb};
            for (int j = 0; j < 2; j++) {
                char nm[64];
                snprintf(nm, sizeof nm, "experts.%d.net.0.weight", ch[j]);
                const float *W1 = moe_layer_find_param(l, nm)->data;
                snprintf(nm, sizeof nm, "experts.%d.net.0.bias", ch[j]);
                const float *b1 = moe_layer_find_param(l, nm)->data;
                snprintf(nm, sizeof nm, "experts.%d.net.2.weight", ch[j]);
                const float *W2 = moe_layer_find_param(l, nm)->data;
                snprintf(nm, sizeof nm, "experts.%d.net.2.bias", ch[j]);
                const float *b2 = moe_layer_find_param(l, nm)->data;
                double o = b2[d];
                for (int h = 0; h < H; h++) {
                    double z = b1[h];
                    for (int k = 0; k < D; k++) z += (double)W1[h * D + k] * x[t * D + k];
                    o += (double)W2[d * H + h] * (z > 0 ? z : 0);
                }
                out += wt[j] * o;
            }
            maxerr = fmax(maxerr, fabs(out - y[t * D + d]));
        }
    }
    CHECK(maxerr < 1e-5, "topk forward differs from the per-token reference by %g", maxerr);
    moe_layer_free(l);
}

/* ---- parameter table, init, accumulation, stats ---- */
static void test_params(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 8, c.hidden_dim = 6, c.num_experts = 3, c.top_k = 2, c.expert = MOE_EXPERT_SWIGLU, c.seed = 5;
    moe_layer *a, *b, *z;
    CHECK_STATUS(moe_layer_create(&a, &c), MOE_OK);
    CHECK_STATUS(moe_layer_create(&b, &c), MOE_OK);
    c.seed = 6;
    CHECK_STATUS(moe_layer_create(&z, &c), MOE_OK);
    CHECK(moe_layer_num_params(a) == 3 * 4 + 2, "topk has %d params", moe_layer_num_params(a));
    moe_param *p0 = moe_layer_param(a, 0), *pl = moe_layer_param(a, 13);
    CHECK(!strcmp(p0->name, "experts.0.net.0.weight") && p0->shape[0] == 12 && p0->shape[1] == 8,
          "first param %s (%lld,%lld)", p0->name, (long long)p0->shape[0], (long long)p0->shape[1]);
    CHECK(!strcmp(pl->name, "gate.bias") && pl->ndim == 1 && pl->shape[0] == 3, "last param %s", pl->name);
    CHECK(moe_layer_find_param(a, "experts.2.net.2.weight")->shape[1] == 6, "net.2.weight is (D,H)");
    CHECK(moe_layer_param(a, 14) == NULL && moe_layer_param(a, -1) == NULL, "out-of-range param index");
    int64_t total = 0;
    for (int i = 0; i < moe_layer_num_params(a); i++) total += moe_layer_param(a, i)->numel;
    CHECK(total == moe_layer_num_weights(a), "numel sum %lld vs %lld", (long long)total,
          (long long)moe_layer_num_weights(a));
    int same = 1, diff = 0, bounded = 1;
    for (int i = 0; i < moe_layer_num_params(a); i++) {
        moe_param *pa = moe_layer_param(a, i), *pb = moe_layer_param(b, i), *pz = moe_layer_param(z, i);
        same &= !memcmp(pa->data, pb->data, (size_t)pa->numel * 4);
        diff |= memcmp(pa->data, pz->data, (size_t)pa->numel * 4) != 0;
        int64_t fan = (strstr(pa->name, "net.2") ? 6 : 8);
        for (int64_t j = 0; j < pa->numel; j++) bounded &= fabsf(pa->data[j]) <= 1.0f / sqrtf((float)fan);
    }
    CHECK(same, "same seed must give the same parameters");
    CHECK(diff, "different seeds must give different parameters");
    CHECK(bounded, "init must be within 1/sqrt(fan_in)");

    /* gradients accumulate: two backward passes give twice the gradient */
    int T = 10;
    float x[80], y[80], dy[80], dx[80];
    for (int i = 0; i < 80; i++) x[i] = frand(), dy[i] = frand();
    CHECK_STATUS(moe_layer_forward(a, y, NULL, x, T, 1), MOE_OK);
    CHECK_STATUS(moe_layer_backward(a, dx, dy, 0), MOE_OK);
    moe_param *g = moe_layer_find_param(a, "gate.weight");
    float g1 = g->grad[3];
    CHECK_STATUS(moe_layer_backward(a, dx, dy, 0), MOE_OK);
    CHECK(fabsf(g->grad[3] - 2 * g1) <= 1e-6f * fabsf(g1) + 1e-9f, "accumulate: %g vs 2*%g", g->grad[3], g1);
    moe_layer_zero_grad(a);
    CHECK(g->grad[3] == 0.0f, "zero_grad");
    moe_stats st;
    CHECK_STATUS(moe_layer_stats(a, &st), MOE_OK);
    int64_t cs = 0;
    for (int e = 0; e < 3; e++) cs += st.expert_counts[e];
    CHECK(st.tokens == T && st.assignments == 2 * T && cs == 2 * T && st.dropped == 0, "stats");
    moe_layer_free(a), moe_layer_free(b), moe_layer_free(z);
}

/* ---- save, load, atomic failure ---- */
static void test_save_load(void) {
    char dir[] = "/tmp/moe_test_XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char path[256];
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    moe_config c;
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 6, c.output_dim = 4, c.num_experts = 3, c.seed = 1;
    moe_layer *a, *b;
    CHECK_STATUS(moe_layer_create(&a, &c), MOE_OK);
    c.seed = 2;
    CHECK_STATUS(moe_layer_create(&b, &c), MOE_OK);
    CHECK_STATUS(moe_layer_save(a, path), MOE_OK);
    CHECK_STATUS(moe_layer_load(b, path), MOE_OK);
    int same = 1;
    for (int i = 0; i < moe_layer_num_params(a); i++)
        same &= !memcmp(moe_layer_param(a, i)->data, moe_layer_param(b, i)->data,
                        (size_t)moe_layer_param(a, i)->numel * 4);
    CHECK(same, "load(save(a)) must equal a");
    moe_st_file *f;
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    if (f) {
        CHECK(moe_st_count(f) == 2 * 3 + 2, "saved %d tensors", moe_st_count(f));
        CHECK(moe_st_find(f, "experts.2.bias") && moe_st_find(f, "gate.weight"), "state_dict names");
        const char *fmt = moe_st_metadata(f, "format");
        CHECK(fmt && !strcmp(fmt, "pt"), "format metadata");
        moe_st_close(f);
    }
    /* a failing load leaves the parameters as they were */
    moe_config c2 = c;
    c2.output_dim = 5;
    moe_layer *m;
    CHECK_STATUS(moe_layer_create(&m, &c2), MOE_OK);
    float before = moe_layer_param(m, 0)->data[0];
    CHECK_STATUS(moe_layer_load(m, path), MOE_ERR_SHAPE);
    CHECK(strstr(moe_last_error(), "experts.0.weight") != NULL, "message names the tensor: %s", moe_last_error());
    CHECK(moe_layer_param(m, 0)->data[0] == before, "failed load changed parameters");
    unlink(path);
    rmdir(dir);
    moe_layer_free(a), moe_layer_free(b), moe_layer_free(m);
}

/* ---- thread counts ----
 * Runs 0 and 1 use 2 threads, run 2 uses 1 thread. The same thread count must
 * give the same bits run to run (our own loops split work statically and
 * reduce in a fixed order). 1 vs 2 threads is checked here to 1e-5 relative;
 * test_determinism checks the bits (moe_sgemm's own tiling). */
static int max_rel_ok(const float *a, const float *b, size_t n, float rtol) {
    float amax = 0;
    for (size_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(a[i]));
    for (size_t i = 0; i < n; i++)
        if (!(fabsf(a[i] - b[i]) <= rtol * amax)) return 0;
    return 1;
}

/* Same bits in every parameter and buffer of a and b. */
static int same_layer(moe_layer *a, moe_layer *b) {
    int same = moe_layer_num_params(a) == moe_layer_num_params(b) &&
               moe_layer_num_buffers(a) == moe_layer_num_buffers(b);
    for (int i = 0; same && i < moe_layer_num_params(a); i++)
        same = !memcmp(moe_layer_param(a, i)->data, moe_layer_param(b, i)->data,
                       (size_t)moe_layer_param(a, i)->numel * 4);
    for (int i = 0; same && i < moe_layer_num_buffers(a); i++)
        same = !memcmp(moe_layer_buffer(a, i)->data, moe_layer_buffer(b, i)->data,
                       (size_t)moe_layer_buffer(a, i)->numel * 4);
    return same;
}

/* moe_layer_create_load (no random init; the file read from its mapping
 * straight into the parameters) against create + moe_layer_load: the same
 * parameters and buffers, bit for bit, the same forward and backward; F16
 * and BF16 files convert the same way; bad files are refused with the
 * errors load gives and *out NULL; a failed load leaves a layer as it was. */
static void test_create_load(void) {
    char dir[] = "/tmp/moe_cl_XXXXXX", path[64], half[64];
    if (!mkdtemp(dir)) return;
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    snprintf(half, sizeof half, "%s/h.safetensors", dir);
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 24, c.hidden_dim = 40, c.num_experts = 6, c.top_k = 2, c.seed = 3;
    CHECK_STATUS(moe_config_set_router(&c, "deepseek_v3"), MOE_OK); /* a buffer: expert_bias */
    c.num_shared = 1;
    moe_layer *a, *b, *d;
    CHECK_STATUS(moe_layer_create(&a, &c), MOE_OK);
    CHECK(moe_layer_num_buffers(a) == 1, "a buffer to load");
    for (int64_t j = 0; j < moe_layer_buffer(a, 0)->numel; j++) moe_layer_buffer(a, 0)->data[j] = frand();
    CHECK_STATUS(moe_layer_save(a, path), MOE_OK);
    moe_config c2 = c;
    c2.seed = 4; /* other initial values, overwritten by the load */
    CHECK_STATUS(moe_layer_create(&b, &c2), MOE_OK);
    CHECK_STATUS(moe_layer_load(b, path), MOE_OK);
    CHECK_STATUS(moe_layer_create_load(&d, &c2, path), MOE_OK);
    CHECK(d && same_layer(a, b) && same_layer(a, d), "create + load, create_load and the saved layer differ");
    int64_t T = 33, D = c.input_dim;
    float *x = malloc((size_t)(T * D) * 4), *dy = malloc((size_t)(T * D) * 4);
    float *y1 = malloc((size_t)(T * D) * 4), *y2 = malloc((size_t)(T * D) * 4);
    float *dx1 = malloc((size_t)(T * D) * 4), *dx2 = malloc((size_t)(T * D) * 4);
    for (int64_t i = 0; i < T * D; i++) x[i] = frand(), dy[i] = frand();
    float a1 = 0, a2 = 0;
    CHECK_STATUS(moe_layer_forward(b, y1, &a1, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(b, dx1, dy, 1.0f), MOE_OK);
    CHECK_STATUS(moe_layer_forward(d, y2, &a2, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(d, dx2, dy, 1.0f), MOE_OK);
    int same = !memcmp(y1, y2, (size_t)(T * D) * 4) && !memcmp(&a1, &a2, 4) && !memcmp(dx1, dx2, (size_t)(T * D) * 4);
    for (int i = 0; same && i < moe_layer_num_params(b); i++)
        same = !memcmp(moe_layer_param(b, i)->grad, moe_layer_param(d, i)->grad, (size_t)moe_layer_param(b, i)->numel * 4);
    CHECK(same, "create_load's forward and backward differ from create + load's");
    /* a forward-only layer's gradients read as zero (calloc'd lazily) */
    moe_layer *z;
    CHECK_STATUS(moe_layer_create_load(&z, &c, path), MOE_OK);
    int zero = z != NULL;
    for (int i = 0; zero && i < moe_layer_num_params(z); i++)
        for (int64_t j = 0; j < moe_layer_param(z, i)->numel; j++) zero &= moe_layer_param(z, i)->grad[j] == 0.0f;
    CHECK(zero, "create_load's gradients are not zero");
    moe_layer_free(z);
    /* an F16 / BF16 copy of the file: converted on the way in, as load does */
    for (int dt = 0; dt < 2; dt++) {
        int n = moe_layer_num_params(a) + moe_layer_num_buffers(a);
        moe_st_entry *e = calloc((size_t)n, sizeof *e);
        uint16_t **hv = calloc((size_t)n, sizeof *hv);
        for (int i = 0; i < n; i++) {
            moe_param *p = i < moe_layer_num_params(a) ? moe_layer_param(a, i)
                                                       : moe_layer_buffer(a, i - moe_layer_num_params(a));
            hv[i] = malloc((size_t)p->numel * 2);
            for (int64_t j = 0; j < p->numel; j++) {
                uint32_t u;
                memcpy(&u, &p->data[j], 4);
                hv[i][j] = dt ? (uint16_t)(u >> 16) : (uint16_t)0x3c00; /* BF16: truncated; F16: 1.0 */
            }
            e[i] = (moe_st_entry){.name = p->name, .dtype = dt ? MOE_DT_BF16 : MOE_DT_F16, .ndim = p->ndim, .data = hv[i]};
            memcpy(e[i].shape, p->shape, sizeof p->shape);
        }
        CHECK_STATUS(moe_st_write(half, e, n, NULL, 0), MOE_OK);
        moe_layer *h1, *h2;
        CHECK_STATUS(moe_layer_create(&h1, &c), MOE_OK);
        CHECK_STATUS(moe_layer_load(h1, half), MOE_OK);
        CHECK_STATUS(moe_layer_create_load(&h2, &c, half), MOE_OK);
        CHECK(h2 && same_layer(h1, h2), "%s file: create_load differs from create + load", dt ? "BF16" : "F16");
        CHECK(h2 && moe_layer_param(h2, 0)->data[1] == (dt ? moe_layer_param(h2, 0)->data[1] : 1.0f), "F16 1.0");
        moe_layer_free(h1), moe_layer_free(h2);
        for (int i = 0; i < n; i++) free(hv[i]);
        free(hv), free(e);
    }
    /* refused files: the same status as load, *out NULL */
    moe_layer *r = (moe_layer *)1;
    moe_config c3 = c;
    c3.hidden_dim = 41;
    CHECK_STATUS(moe_layer_create_load(&r, &c3, path), MOE_ERR_SHAPE);
    CHECK(r == NULL && strstr(moe_last_error(), "check the layer config") != NULL, "shape: %s", moe_last_error());
    CHECK_STATUS(moe_layer_create_load(&r, &c, "/nonexistent/w.safetensors"), MOE_ERR_IO);
    CHECK(r == NULL, "*out NULL");
    c3 = c, c3.num_experts = 0;
    CHECK_STATUS(moe_layer_create_load(&r, &c3, path), MOE_ERR_ARG); /* the config's error first */
    CHECK_STATUS(moe_layer_create_load(NULL, &c, path), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_create_load(&r, NULL, path), MOE_ERR_ARG);
    CHECK_STATUS(moe_layer_create_load(&r, &c, NULL), MOE_ERR_ARG);
    /* truncated copies of the file: a format error naming the file; a header
     * claiming more bytes than the file has likewise; load leaves b as it was */
    FILE *fp = fopen(path, "rb");
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *raw = malloc((size_t)len);
    CHECK(fread(raw, 1, (size_t)len, fp) == (size_t)len, "read");
    fclose(fp);
    int bad = 0, changed = 0;
    for (long cut = 0; cut < len; cut += cut < 64 ? 7 : 509) {
        fp = fopen(half, "wb");
        fwrite(raw, 1, (size_t)cut, fp);
        fclose(fp);
        r = (moe_layer *)1;
        moe_status st = moe_layer_create_load(&r, &c, half);
        bad += st != MOE_ERR_FORMAT || r != NULL || strstr(moe_last_error(), half) == NULL;
        bad += moe_layer_load(b, half) != MOE_ERR_FORMAT;
        changed += !same_layer(a, b);
    }
    CHECK(bad == 0 && changed == 0, "%d truncated files not refused with a message, %d changed the layer", bad, changed);
    for (int i = 0; i < 8; i++) raw[i] = (unsigned char)((uint64_t)len >> (8 * i)); /* header length = file */
    fp = fopen(half, "wb");
    fwrite(raw, 1, (size_t)len, fp);
    fclose(fp);
    CHECK_STATUS(moe_layer_create_load(&r, &c, half), MOE_ERR_FORMAT);
    CHECK(r == NULL && strstr(moe_last_error(), "past the end of the file"), "message: %s", moe_last_error());
    /* a non-finite value: refused by both, b unchanged */
    float *w0 = moe_layer_param(a, 3)->data, keep = w0[2];
    w0[2] = NAN;
    CHECK_STATUS(moe_layer_save(a, half), MOE_OK);
    w0[2] = keep;
    CHECK_STATUS(moe_layer_create_load(&r, &c, half), MOE_ERR_NONFINITE);
    CHECK(r == NULL && strstr(moe_last_error(), "element 2 is not finite"), "message: %s", moe_last_error());
    CHECK_STATUS(moe_layer_load(b, half), MOE_ERR_NONFINITE);
    CHECK(same_layer(a, b), "a refused load changed the layer");
    unlink(path), unlink(half), rmdir(dir);
    free(raw), free(x), free(dy), free(y1), free(y2), free(dx1), free(dx2);
    moe_layer_free(a), moe_layer_free(b), moe_layer_free(d);
}

static void test_threads(void) {
    moe_layer_type types[2] = {MOE_LAYER_TOPK, MOE_LAYER_DENSE};
    for (int ti = 0; ti < 2; ti++) {
        moe_config c;
        moe_config_init(&c, types[ti]);
        c.input_dim = 48, c.hidden_dim = 80, c.output_dim = 40, c.num_experts = 6, c.top_k = 2, c.seed = 9;
        c.expert = MOE_EXPERT_GEGLU;
        int T = 300;
        int64_t D = 48, O = types[ti] == MOE_LAYER_TOPK ? 48 : 40, NW = 0;
        float *x = malloc(sizeof(float) * T * D), *dy = malloc(sizeof(float) * T * O);
        float *y[3], *dx[3], *gw[3];
        for (int i = 0; i < T * D; i++) x[i] = frand();
        for (int i = 0; i < T * O; i++) dy[i] = frand();
        for (int r = 0; r < 3; r++) {
            moe_set_num_threads(r < 2 ? 2 : 1);
            moe_layer *l;
            CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
            NW = moe_layer_num_weights(l);
            y[r] = malloc(sizeof(float) * T * O), dx[r] = malloc(sizeof(float) * T * D);
            gw[r] = malloc(sizeof(float) * NW);
            CHECK_STATUS(moe_layer_forward(l, y[r], NULL, x, T, 1), MOE_OK);
            CHECK_STATUS(moe_layer_backward(l, dx[r], dy, 0), MOE_OK);
            memcpy(gw[r], l->gmem, sizeof(float) * NW);
            moe_layer_free(l);
        }
        moe_set_num_threads(2);
        const char *nm = moe_layer_type_name(types[ti]);
        CHECK(!memcmp(y[0], y[1], sizeof(float) * T * O) && !memcmp(dx[0], dx[1], sizeof(float) * T * D) &&
                  !memcmp(gw[0], gw[1], sizeof(float) * NW),
              "%s: two runs with 2 threads must give the same bits", nm);
        CHECK(max_rel_ok(y[0], y[2], T * O, 1e-5f), "%s: y, 1 vs 2 threads", nm);
        CHECK(max_rel_ok(dx[0], dx[2], T * D, 1e-5f), "%s: dx, 1 vs 2 threads", nm);
        CHECK(max_rel_ok(gw[0], gw[2], NW, 1e-5f), "%s: grads, 1 vs 2 threads", nm);
        for (int r = 0; r < 3; r++) free(y[r]), free(dx[r]), free(gw[r]);
        free(x), free(dy);
    }
}

/* ---- optimizers against torch's update rules, computed here in double ---- */
static void test_optim(void) {
    float data[3] = {0.5f, -1.0f, 2.0f}, grad[3];
    moe_param p = {"w", 1, {3}, 3, data, grad};
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    oc.lr = 0.1f, oc.weight_decay = 0.1f;
    moe_optim *o;
    CHECK_STATUS(moe_optim_create(&o, &oc, &p, 1), MOE_OK);
    double ref[3] = {0.5, -1.0, 2.0}, m[3] = {0}, v[3] = {0};
    for (int s = 1; s <= 5; s++) {
        for (int j = 0; j < 3; j++) grad[j] = (float)(0.3 * (j + 1) - 0.2 * s), data[j] = (float)ref[j];
        CHECK_STATUS(moe_optim_step(o), MOE_OK);
        for (int j = 0; j < 3; j++) {
            double g = grad[j];
            ref[j] *= 1 - 0.1 * 0.1;
            m[j] = 0.9 * m[j] + 0.1 * g;
            v[j] = 0.999 * v[j] + 0.001 * g * g;
            double mh = m[j] / (1 - pow(0.9, s)), vh = v[j] / (1 - pow(0.999, s));
            ref[j] -= 0.1 * mh / (sqrt(vh) + 1e-8);
        }
        int ok = 1;
        for (int j = 0; j < 3; j++) ok &= fabs(data[j] - ref[j]) < 1e-5;
        CHECK(ok, "AdamW step %d: %g %g %g vs %g %g %g", s, data[0], data[1], data[2], ref[0], ref[1], ref[2]);
        for (int j = 0; j < 3; j++) ref[j] = data[j];
    }
    /* a non-finite gradient: refused, nothing changes, not counted */
    float keep[3];
    memcpy(keep, data, sizeof keep);
    grad[1] = NAN;
    CHECK_STATUS(moe_optim_step(o), MOE_ERR_NONFINITE);
    CHECK(!memcmp(keep, data, sizeof keep) && moe_optim_steps(o) == 5, "NaN step must change nothing");
    CHECK(strstr(moe_last_error(), "'w'") != NULL, "message names the parameter: %s", moe_last_error());
    moe_optim_free(o);

    /* SGD with momentum and weight decay */
    moe_optim_config_init(&oc, MOE_OPTIM_SGD);
    oc.lr = 0.5f, oc.momentum = 0.9f, oc.weight_decay = 0.01f;
    data[0] = 1.0f;
    moe_param q = {"q", 1, {1}, 1, data, grad};
    CHECK_STATUS(moe_optim_create(&o, &oc, &q, 1), MOE_OK);
    double w = 1.0, buf = 0;
    for (int s = 1; s <= 3; s++) {
        grad[0] = 0.2f * (float)s;
        CHECK_STATUS(moe_optim_step(o), MOE_OK);
        double d = 0.2 * s + 0.01 * w;
        buf = s == 1 ? d : 0.9 * buf + d;
        w -= 0.5 * buf;
    }
    CHECK(fabs(data[0] - w) < 1e-5, "SGD momentum: %g vs %g", data[0], w);
    moe_optim_free(o);
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    oc.beta1 = 1.0f;
    CHECK_STATUS(moe_optim_create(&o, &oc, &q, 1), MOE_ERR_ARG);
}

/* ---- a small model learns: loss falls with AdamW ---- */
static void test_learns(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 8, c.hidden_dim = 16, c.num_experts = 4, c.top_k = 2, c.seed = 4;
    moe_layer *l;
    moe_optim *o;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    oc.lr = 1e-2f;
    CHECK_STATUS(moe_optim_create(&o, &oc, moe_layer_param(l, 0), moe_layer_num_params(l)), MOE_OK);
    int T = 64;
    float x[64 * 8], y[64 * 8], t[64 * 8];
    for (int i = 0; i < T * 8; i++) x[i] = frand(), t[i] = sinf(3 * x[i]);
    double first = 0, last = 0;
    for (int s = 0; s < 200; s++) {
        moe_layer_forward(l, y, NULL, x, T, 1);
        double L = 0;
        for (int i = 0; i < T * 8; i++) L += (y[i] - t[i]) * (y[i] - t[i]), y[i] = 2 * (y[i] - t[i]) / (T * 8);
        L /= T * 8;
        if (s == 0) first = L;
        last = L;
        moe_layer_zero_grad(l);
        moe_layer_backward(l, NULL, y, 0);
        moe_optim_step(o);
    }
    CHECK(last < 0.3 * first, "loss should fall: first %g, last %g", first, last);
    moe_optim_free(o);
    moe_layer_free(l);
}

/* The decode kernel against its reference (moe_sgemm) on awkward shapes:
 * 1..MOE_SMALL_ROWS rows, K below, at and off the 16-lane width, odd N,
 * strided A and C, accumulation into C. */
static void test_small_gemm(void) {
    static const int64_t Ks[] = {1, 7, 16, 17, 33, 512}, Ns[] = {1, 5, 64, 129};
    unsigned long long st = 4242;
    int ok = 1;
    double worst = 0;
    for (int64_t n = 1; n <= MOE_SMALL_ROWS; n++)
        for (int ki = 0; ki < 6; ki++)
            for (int ni = 0; ni < 4; ni++) {
                int64_t K = Ks[ki], N = Ns[ni], lda = K + 3, ldc = N + 2;
                float *A = malloc((size_t)(n * lda) * sizeof *A), *W = malloc((size_t)(N * K) * sizeof *W);
                float *C = malloc((size_t)(n * ldc) * sizeof *C), *R = malloc((size_t)(n * ldc) * sizeof *R);
                for (int64_t i = 0; i < n * lda; i++) A[i] = check_nrand(&st);
                for (int64_t i = 0; i < N * K; i++) W[i] = check_nrand(&st);
                for (int64_t i = 0; i < n * ldc; i++) C[i] = R[i] = check_nrand(&st);
                moe_sgemm_nt_small(C, ldc, A, lda, W, n, N, K);
                moe_sgemm(0, 1, n, N, K, 1.0f, A, lda, W, K, 1.0f, R, ldc);
                for (int64_t r = 0; r < n; r++)
                    for (int64_t j = 0; j < ldc; j++) {
                        double d = fabs((double)C[r * ldc + j] - R[r * ldc + j]);
                        double tol = j < N ? 1e-5 * (1.0 + sqrt((double)K)) : 0.0; /* padding untouched */
                        ok &= d <= tol;
                        if (d > worst) worst = d;
                    }
                free(A), free(W), free(C), free(R);
            }
    CHECK(ok, "moe_sgemm_nt_small differs from the GEMM reference (worst %g)", worst);
}

/* moe_sgemm (oneDNN, libmoe's tiling) against its plain twin moe_sgemm_ref on
 * awkward shapes: both transposes, 1-row and odd sizes, sizes that cut into
 * 1..4 tiles along either side, leading dimensions wider than the matrix,
 * alpha/beta (beta 0 must ignore NaN in C), K = 0; and the same bits on 1 and
 * 2 threads, inside a parallel region and in an expert task (moe__in_task). */
static void test_sgemm(void) {
    static const int64_t Ms[] = {1, 3, 17, 130, 513}, Ns[] = {1, 5, 64, 300}, Ks[] = {0, 1, 7, 33, 260};
    unsigned long long st = 777;
    int ok = 1, same = 1, cases = 0;
    double worst = 0;
    for (int mi = 0; mi < 5; mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int ki = 0; ki < 5; ki++)
                for (int tr = 0; tr < 4; tr++) {
                    int ta = tr & 1, tb = tr >> 1;
                    int64_t M = Ms[mi], N = Ns[ni], K = Ks[ki];
                    int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
                    int64_t ra = ta ? K : M, rb = tb ? N : K;
                    float alpha = (tr == 1) ? -0.5f : 1.0f, beta = (tr == 2) ? 0.75f : (tr == 3 ? 0.0f : 1.0f);
                    float *A = malloc((size_t)(ra * lda + 1) * sizeof *A), *B = malloc((size_t)(rb * ldb + 1) * sizeof *B);
                    float *C0 = malloc((size_t)(M * ldc) * sizeof *C0), *C1 = malloc((size_t)(M * ldc) * sizeof *C1);
                    float *C2 = malloc((size_t)(M * ldc) * sizeof *C2), *C3 = malloc((size_t)(M * ldc) * sizeof *C3);
                    float *R = malloc((size_t)(M * ldc) * sizeof *R);
                    for (int64_t i = 0; i < ra * lda + 1; i++) A[i] = check_nrand(&st);
                    for (int64_t i = 0; i < rb * ldb + 1; i++) B[i] = check_nrand(&st);
                    for (int64_t i = 0; i < M * ldc; i++)
                        R[i] = C0[i] = C1[i] = C2[i] = C3[i] = (beta == 0.0f && i % 7 == 0) ? NAN : check_nrand(&st);
                    moe_sgemm_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, R, ldc);
                    moe_set_num_threads(2);
                    moe_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, ldc);
                    moe_set_num_threads(1);
                    moe_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
                    moe_set_num_threads(2);
#pragma omp parallel num_threads(2)
                    {
#pragma omp single
                        moe_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C2, ldc);
                    }
                    moe__in_task = 1; /* an expert task's GEMM: one untiled call */
                    moe_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C3, ldc);
                    moe__in_task = 0;
                    for (int64_t r = 0; r < M; r++)
                        for (int64_t j = 0; j < ldc; j++) {
                            int64_t i = r * ldc + j;
                            double d = j < N ? fabs((double)C0[i] - R[i]) : 0.0;
                            double tol = 1e-5 * (1.0 + sqrt((double)K));
                            ok &= (j < N) ? (d <= tol) : (memcmp(&C0[i], &R[i], 4) == 0); /* padding untouched */
                            if (d > worst) worst = d;
                        }
                    same &= memcmp(C0, C1, (size_t)(M * ldc) * 4) == 0 && memcmp(C0, C2, (size_t)(M * ldc) * 4) == 0;
                    if (memcmp(C0, C3, (size_t)(M * ldc) * 4) != 0) /* untiled: same values, maybe other bits */
                        for (int64_t i = 0; i < M * ldc; i++)
                            ok &= fabs((double)C3[i] - C0[i]) <= 1e-5 * (1.0 + sqrt((double)K)) || (C3[i] != C3[i] && C0[i] != C0[i]);
                    cases++;
                    free(A), free(B), free(C0), free(C1), free(C2), free(C3), free(R);
                }
    CHECK(ok, "moe_sgemm differs from its plain twin moe_sgemm_ref (worst %g over %d cases)", worst, cases);
    CHECK(same, "moe_sgemm: 1 and 2 threads, or inside a parallel region, give different bits");
    CHECK(cases == 400, "sgemm cases %d", cases);
}

int main(void) {
    moe_set_num_threads(2);
    test_sgemm();
    test_topk_kernel();
    test_topk_reference();
    test_params();
    test_save_load();
    test_create_load();
    test_threads();
    test_optim();
    test_learns();
    test_small_gemm();
    return check_summary("test_layers");
}
