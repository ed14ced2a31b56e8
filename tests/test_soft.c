/*
 * The soft layers (soft_dynamic, soft) beyond their gradients (test_gradcheck)
 * and PyTorch parity (tests/parity/run_parity_soft.py): configs and JSON,
 * parameter table and init, masks (masked tokens change nothing for the
 * others; fully masked rows give finite, uniform output), image input against
 * the token layout, dropout (mask statistics, eval mode, thread counts),
 * statistics and bad input.
 * Dimension key: B batch rows, N tokens, D model dim, E experts, S slots per
 * expert, H hidden dim.
 */
#include "check.h"
#include "bank.h"
#include "layer_internal.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>

#define CHECK_MSG(sub) CHECK(strstr(moe_last_error(), sub) != NULL, "message lacks '%s': %s", sub, moe_last_error())

static uint64_t g_rng = 4242;
static float nrand(void) {
    double u[2];
    for (int i = 0; i < 2; i++) {
        g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
        u[i] = ((double)(g_rng >> 11) + 1.0) / 9007199254740993.0;
    }
    return (float)(sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]));
}
static float *randv(int64_t n) {
    float *v = malloc((size_t)n * sizeof *v);
    for (int64_t i = 0; i < n; i++) v[i] = nrand();
    return v;
}
static float max_abs_diff(const float *a, const float *b, int64_t n) {
    float m = 0;
    for (int64_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}
static int all_finite(const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

static void test_config(void) {
    moe_config c;
    moe_layer *l = NULL;
    /* hidden width as the seed computes it */
    struct { int64_t D; double mult; moe_expert_kind k; int64_t H, H2; } hs[] = {
        {512, 4, MOE_EXPERT_MLP, 2048, 2048}, {512, 4, MOE_EXPERT_GEGLU, 1365, 2730},
        {10, 2.5, MOE_EXPERT_MLP, 25, 25},    {10, 2.5, MOE_EXPERT_GEGLU, 16, 32},
        {3, 1, MOE_EXPERT_GEGLU, 2, 4},
    };
    for (int i = 0; i < 5; i++) {
        moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
        c.input_dim = hs[i].D, c.expert_mult = hs[i].mult, c.expert = hs[i].k;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
        if (!l) continue;
        CHECK(moe_layer_config(l)->hidden_dim == hs[i].H, "D=%lld mult %g: H %lld, want %lld", (long long)hs[i].D,
              hs[i].mult, (long long)moe_layer_config(l)->hidden_dim, (long long)hs[i].H);
        moe_param *w1 = moe_layer_find_param(l, "experts.3.0.weight");
        CHECK(w1 && w1->shape[0] == hs[i].H2 && w1->shape[1] == hs[i].D, "experts.3.0.weight shape");
        moe_layer_free(l);
    }
    /* the state_dict names, order and init of both kinds */
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 6, c.num_experts = 3;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    const char *dyn_names[] = {"norm.gamma", "to_slot_embeds.0.weight", "to_slot_embeds.2.gamma",
                               "experts.0.0.weight", "experts.0.0.bias", "experts.0.3.weight", "experts.0.3.bias"};
    CHECK(moe_layer_num_params(l) == 3 + 4 * 3, "soft_dynamic has %d params", moe_layer_num_params(l));
    for (int i = 0; i < 7; i++)
        CHECK(!strcmp(moe_layer_param(l, i)->name, dyn_names[i]), "param %d is %s, want %s", i,
              moe_layer_param(l, i)->name, dyn_names[i]);
    moe_param *wp = moe_layer_find_param(l, "to_slot_embeds.0.weight");
    CHECK(wp->shape[0] == 18 && wp->shape[1] == 6, "to_slot_embeds.0.weight is (E*D, D)");
    for (int i = 0; i < 6; i++) CHECK(moe_layer_param(l, 0)->data[i] == 1.0f, "norm.gamma starts at 1");
    moe_layer_free(l);

    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 16, c.num_experts = 4, c.slots_per_expert = 64;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    const char *soft_names[] = {"norm.gamma", "slot_norm.gamma", "slot_embeds", "experts.experts.0.0.weight"};
    for (int i = 0; i < 4; i++)
        CHECK(!strcmp(moe_layer_param(l, i)->name, soft_names[i]), "param %d is %s, want %s", i,
              moe_layer_param(l, i)->name, soft_names[i]);
    moe_param *se = moe_layer_find_param(l, "slot_embeds");
    CHECK(se->ndim == 3 && se->shape[0] == 4 && se->shape[1] == 64 && se->shape[2] == 16, "slot_embeds (E,S,D)");
    double m = 0, v = 0;
    for (int64_t i = 0; i < se->numel; i++) m += se->data[i], v += (double)se->data[i] * se->data[i];
    m /= (double)se->numel, v = v / (double)se->numel - m * m;
    CHECK(fabs(m) < 0.1 && fabs(v - 1.0) < 0.1, "slot_embeds ~ N(0,1) as torch.randn: mean %g var %g", m, v);
    moe_layer_free(l);

    /* bad configs */
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 1, c.expert_mult = 0.5; /* int(0.5) = 0 */
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("raise expert_mult");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.dropout = 1.0f;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("dropout");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.expert_mult = NAN;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.slots_per_expert = 0;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG);
    CHECK_MSG("slots_per_expert");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 1 << 24, c.num_experts = 1 << 16;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_ARG); /* 2^64 projection weights: refused */
    CHECK_MSG("too large");
}

static void test_json(void) {
    moe_config c;
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft_dynamic\",\"dim\":32,\"num_experts\":8,"
                                          "\"expert_mult\":2.5,\"dropout\":0.1,\"geglu\":true,\"seed\":3}"),
                 MOE_OK);
    CHECK(c.type == MOE_LAYER_SOFT_DYNAMIC && c.input_dim == 32 && c.num_experts == 8 && c.expert_mult == 2.5 &&
              fabsf(c.dropout - 0.1f) < 1e-7f && c.expert == MOE_EXPERT_GEGLU && c.seed == 3,
          "soft_dynamic keys");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft\",\"dim\":8,\"num_experts\":4,\"num_slots\":3}"), MOE_OK);
    CHECK(c.slots_per_expert == 3, "num_slots");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft\",\"dim\":8,\"slots_per_expert\":5}"), MOE_OK);
    CHECK(c.slots_per_expert == 5, "slots_per_expert");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft\",\"seq_len\":30,\"num_experts\":4}"), MOE_OK);
    CHECK(c.slots_per_expert == 7, "seq_len 30 / 4 experts = 7 slots, got %lld", (long long)c.slots_per_expert);
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft\",\"dim\":8}"), MOE_ERR_ARG);
    CHECK_MSG("num_slots");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft\",\"num_slots\":2,\"seq_len\":8}"), MOE_ERR_ARG);
    CHECK_MSG("one of");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft\",\"seq_len\":3,\"num_experts\":4}"), MOE_ERR_ARG);
    CHECK_MSG("seq_len");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft_dynamic\",\"num_slots\":2}"), MOE_ERR_ARG);
    CHECK_MSG("unknown config key \"num_slots\"");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft_dynamic\",\"geglu\":1}"), MOE_ERR_ARG);
    CHECK_MSG("geglu");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\":\"soft_dynamic\",\"dropout\":1.5}"), MOE_ERR_ARG);
    CHECK_MSG("dropout");
}

/* Make a layer with gains moved off 1 (so masks and norms matter). */
static moe_layer *make(moe_layer_type t, int64_t D, int E, int64_t S, float dropout, uint64_t seed) {
    moe_config c;
    moe_config_init(&c, t);
    c.input_dim = D, c.num_experts = E, c.expert_mult = 2, c.dropout = dropout, c.seed = seed;
    if (t == MOE_LAYER_SOFT) c.slots_per_expert = S;
    moe_layer *l = NULL;
    if (moe_layer_create(&l, &c) != MOE_OK) return NULL;
    for (int i = 0; i < moe_layer_num_params(l); i++) {
        moe_param *p = moe_layer_param(l, i);
        if (strstr(p->name, "gamma"))
            for (int64_t j = 0; j < p->numel; j++) p->data[j] = 1.0f + 0.2f * nrand();
    }
    return l;
}

static void test_masks(void) {
    for (int kind = 0; kind < 2; kind++) {
        moe_layer_type t = kind ? MOE_LAYER_SOFT : MOE_LAYER_SOFT_DYNAMIC;
        const char *nm = moe_layer_type_name(t);
        const int64_t B = 3, N = 10, D = 12;
        moe_layer *l = make(t, D, 4, 3, 0.0f, 7);
        CHECK(l != NULL, "%s: create", nm);
        if (!l) continue;
        float *x = randv(B * N * D), *y = malloc(sizeof(float) * B * N * D), *y2 = malloc(sizeof(float) * B * N * D);
        uint8_t mask[3 * 10];
        for (int i = 0; i < B * N; i++) mask[i] = 1;
        mask[2] = mask[3] = mask[7] = 0;                   /* row 0: three masked tokens */
        for (int n = 0; n < N; n++) mask[2 * N + n] = 0;   /* row 2: every token masked  */
        CHECK_STATUS(moe_layer_forward_masked(l, y, NULL, x, mask, B, N, 1), MOE_OK);
        CHECK(all_finite(y, B * N * D), "%s: output with a fully masked row must be finite", nm);
        /* a fully masked row: dispatch and combine are uniform, so every token gets the same output */
        float spread = 0;
        for (int n = 1; n < N; n++) spread = fmaxf(spread, max_abs_diff(y + (2 * N + n) * D, y + 2 * N * D, D));
        CHECK(spread <= 1e-5f, "%s: fully masked row: all tokens get the mean slot output (spread %g)", nm, spread);
        /* masked tokens' values change nothing for the real tokens */
        for (int n = 0; n < N; n++)
            if (!mask[n])
                for (int k = 0; k < D; k++) x[n * D + k] = 100.0f * nrand();
        for (int i = 2 * N * D; i < 3 * N * D; i++) x[i] = nrand();
        CHECK_STATUS(moe_layer_forward_masked(l, y2, NULL, x, mask, B, N, 1), MOE_OK);
        float dreal = 0;
        for (int n = 0; n < N; n++)
            if (mask[n]) dreal = fmaxf(dreal, max_abs_diff(y + n * D, y2 + n * D, D));
        dreal = fmaxf(dreal, max_abs_diff(y + N * D, y2 + N * D, N * D)); /* row 1 is independent of row 2 */
        CHECK(dreal <= 1e-5f, "%s: masked tokens leaked into real ones (max change %g)", nm, dreal);
        /* backward of a masked forward: finite gradients */
        float *dx = malloc(sizeof(float) * B * N * D);
        CHECK_STATUS(moe_layer_backward(l, dx, y2, 0.0f), MOE_OK);
        CHECK(all_finite(dx, B * N * D), "%s: dx finite with masks", nm);
        /* an all-ones mask is the same as no mask */
        for (int i = 0; i < B * N; i++) mask[i] = 1;
        CHECK_STATUS(moe_layer_forward_masked(l, y, NULL, x, mask, B, N, 0), MOE_OK);
        CHECK_STATUS(moe_layer_forward_seq(l, y2, NULL, x, B, N, 0), MOE_OK);
        CHECK(!memcmp(y, y2, sizeof(float) * B * N * D), "%s: all-ones mask == no mask", nm);
        /* stats: every expert processes its B*S slot rows */
        moe_stats st;
        moe_layer_stats(l, &st);
        int64_t S = kind ? 3 : (N + 3) / 4; /* dynamic: ceil(N/E) slots per expert */
        int ok = st.n_experts == 4 && st.dropped == 0;
        for (int e = 0; e < 4 && ok; e++) ok = st.expert_counts[e] == B * S;
        CHECK(ok, "%s: expert_counts must be B*S = %lld each", nm, (long long)(B * S));
        free(x), free(y), free(y2), free(dx);
        moe_layer_free(l);
    }
}

/* The image path is the token path on the transposed input, bit for bit. */
static void test_image(void) {
    const int64_t B = 2, D = 6, h = 3, w = 5, N = h * w;
    moe_layer *l = make(MOE_LAYER_SOFT_DYNAMIC, D, 4, 0, 0.0f, 17);
    if (!l) return;
    float *img = randv(B * D * N), *tok = malloc(sizeof(float) * B * N * D);
    float *yi = malloc(sizeof(float) * B * D * N), *yt = malloc(sizeof(float) * B * N * D);
    float *dyi = randv(B * D * N), *dyt = malloc(sizeof(float) * B * N * D);
    float *dxi = malloc(sizeof(float) * B * D * N), *dxt = malloc(sizeof(float) * B * N * D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < D; c++)
            for (int64_t n = 0; n < N; n++) {
                tok[(b * N + n) * D + c] = img[(b * D + c) * N + n];
                dyt[(b * N + n) * D + c] = dyi[(b * D + c) * N + n];
            }
    CHECK_STATUS(moe_layer_forward_image(l, yi, NULL, img, NULL, B, h, w, 1), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l, dxi, dyi, 0.0f), MOE_OK);
    CHECK_STATUS(moe_layer_forward_seq(l, yt, NULL, tok, B, N, 1), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l, dxt, dyt, 0.0f), MOE_OK);
    int same = 1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < D; c++)
            for (int64_t n = 0; n < N; n++)
                same = same && yi[(b * D + c) * N + n] == yt[(b * N + n) * D + c] &&
                       dxi[(b * D + c) * N + n] == dxt[(b * N + n) * D + c];
    CHECK(same, "image (B,D,h,w) must equal the token layout (B,h*w,D), y and dx");
    /* bad image input */
    CHECK_STATUS(moe_layer_forward_image(l, yi, NULL, img, NULL, B, 0, w, 1), MOE_ERR_ARG);
    CHECK_MSG("empty batch");
    img[7] = NAN;
    CHECK_STATUS(moe_layer_forward_image(l, yi, NULL, img, NULL, B, h, w, 1), MOE_ERR_NONFINITE);
    free(img), free(tok), free(yi), free(yt), free(dyi), free(dyt), free(dxi), free(dxt);
    moe_layer_free(l);
}

/* Inverted dropout in the expert bank: the kept share is 1-p, kept values are
 * scaled by 1/(1-p), and the mask is a function of the stream only. */
static void test_dropout_bank(void) {
    const int64_t D = 8, H = 64, R = 400;
    float *W1 = randv(D * H), *b1 = calloc(H, sizeof(float)), *W2 = randv(D * H), *b2 = calloc(D, sizeof(float));
    float *xe = randv(R * D), *hpre = malloc(sizeof(float) * R * H), *ha = malloc(sizeof(float) * R * H);
    float *ye = malloc(sizeof(float) * R * D);
    int64_t off[2] = {0, R};
    const float p = 0.3f;
    moe_bank f = {W1, b1, W2, b2, NULL, NULL, NULL, NULL, D, H, 1, 0, MOE_EXPERT_MLP, MOE_ACT_GELU, 0.0f, p, 99,
                  &moe_bank_f32, NULL, NULL, {NULL, NULL, NULL, NULL}};
    moe_bank_forward(&f, off, xe, hpre, ha, ye);
    int64_t zeros = 0, bad = 0, live = 0; /* live: gelu != 0 (it underflows for x < -5.5) */
    for (int64_t i = 0; i < R * H; i++) {
        float g = 0.5f * hpre[i] * (1.0f + erff(hpre[i] * 0.70710678f));
        if (g == 0.0f) continue;
        live++;
        if (ha[i] == 0.0f) zeros++;
        else if (fabsf(ha[i] - g / (1.0f - p)) > 1e-5f * (1.0f + fabsf(g))) bad++;
    }
    double n = (double)live, sd = sqrt(n * p * (1 - p));
    CHECK(fabs((double)zeros - n * p) < 5 * sd, "dropout zeroed %lld of %.0f, want %.0f +- %.0f", (long long)zeros, n,
          n * p, 5 * sd);
    CHECK(bad == 0, "%lld kept activations not scaled by 1/(1-p)", (long long)bad);
    float *ha2 = malloc(sizeof(float) * R * H);
    moe_set_num_threads(1);
    moe_bank_forward(&f, off, xe, hpre, ha2, ye);
    moe_set_num_threads(2);
    int same_mask = 1;
    for (int64_t i = 0; i < R * H; i++) same_mask = same_mask && ((ha[i] == 0.0f) == (ha2[i] == 0.0f));
    CHECK(same_mask, "the dropout mask must not depend on the thread count");
    free(W1), free(b1), free(W2), free(b2), free(xe), free(hpre), free(ha), free(ha2), free(ye);
}

static void test_dropout_layer(void) {
    const int64_t B = 2, N = 16, D = 8;
    moe_layer *ld = make(MOE_LAYER_SOFT_DYNAMIC, D, 4, 0, 0.5f, 5);
    moe_layer *l0 = make(MOE_LAYER_SOFT_DYNAMIC, D, 4, 0, 0.0f, 5);
    if (!ld || !l0) return;
    memcpy(l0->wmem, ld->wmem, sizeof(float) * (size_t)ld->n_weights); /* the same weights */
    float *x = randv(B * N * D), *ya = malloc(sizeof(float) * B * N * D), *yb = malloc(sizeof(float) * B * N * D);
    float *y0 = malloc(sizeof(float) * B * N * D);
    CHECK_STATUS(moe_layer_forward_seq(ld, ya, NULL, x, B, N, 0), MOE_OK);
    CHECK_STATUS(moe_layer_forward_seq(l0, y0, NULL, x, B, N, 0), MOE_OK);
    CHECK(!memcmp(ya, y0, sizeof(float) * B * N * D), "eval mode: dropout is off");
    CHECK_STATUS(moe_layer_forward_seq(ld, ya, NULL, x, B, N, 1), MOE_OK);
    CHECK_STATUS(moe_layer_forward_seq(ld, yb, NULL, x, B, N, 1), MOE_OK);
    CHECK(max_abs_diff(ya, y0, B * N * D) > 1e-3f, "train mode with dropout 0.5 must change y");
    CHECK(max_abs_diff(ya, yb, B * N * D) > 1e-3f, "each train forward draws a new dropout mask");
    /* same seed, same call count: same mask, on 1 or 2 threads */
    moe_layer *l1 = make(MOE_LAYER_SOFT_DYNAMIC, D, 4, 0, 0.5f, 5);
    memcpy(l1->wmem, ld->wmem, sizeof(float) * (size_t)ld->n_weights);
    moe_set_num_threads(1);
    CHECK_STATUS(moe_layer_forward_seq(l1, yb, NULL, x, B, N, 1), MOE_OK);
    moe_set_num_threads(2);
    CHECK_STATUS(moe_layer_forward_seq(ld, ya, NULL, x, B, N, 1), MOE_OK); /* ld's third forward */
    ld->forward_calls = 0;
    CHECK_STATUS(moe_layer_forward_seq(ld, ya, NULL, x, B, N, 1), MOE_OK);
    float amax = 0;
    for (int64_t i = 0; i < B * N * D; i++) amax = fmaxf(amax, fabsf(ya[i]));
    CHECK(max_abs_diff(ya, yb, B * N * D) <= 1e-5f * amax, "dropout forward: 1 vs 2 threads (diff %g)",
          max_abs_diff(ya, yb, B * N * D));
    free(x), free(ya), free(yb), free(y0);
    moe_layer_free(ld), moe_layer_free(l0), moe_layer_free(l1);
}

static void test_bad_input(void) {
    moe_layer *l = make(MOE_LAYER_SOFT_DYNAMIC, 8, 4, 0, 0.0f, 1);
    if (!l) return;
    float x[8 * 8], y[8 * 8];
    for (int i = 0; i < 64; i++) x[i] = nrand();
    /* N = 1 pads to E: one real token and three masked pads */
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 1, 1, 1), MOE_OK);
    CHECK(all_finite(y, 8), "N = 1: finite output");
    float dx[64];
    CHECK_STATUS(moe_layer_backward(l, dx, y, 0.0f), MOE_OK);
    CHECK(all_finite(dx, 8), "N = 1: finite dx");
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 0, 8, 1), MOE_ERR_ARG);
    CHECK_MSG("empty batch");
    x[9] = INFINITY;
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 1, 8, 1), MOE_ERR_NONFINITE);
    CHECK_MSG("x[1][1]");
    x[9] = 0.0f;
    /* a zero token: RMSNorm's max(|x|, 1e-12) keeps it finite */
    memset(x, 0, sizeof(float) * 8);
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 1, 8, 1), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l, dx, y, 0.0f), MOE_OK);
    CHECK(all_finite(y, 64) && all_finite(dx, 64), "an all-zero token gives finite y and dx");
    moe_layer_free(l);
    /* a mask for a layer that takes none */
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 8;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    uint8_t mask[8] = {1, 1, 1, 1, 1, 1, 1, 0};
    CHECK_STATUS(moe_layer_forward_masked(l, y, NULL, x, mask, 1, 8, 1), MOE_ERR_UNSUPPORTED);
    CHECK_MSG("only taken by the soft layers");
    CHECK_STATUS(moe_layer_forward_masked(l, y, NULL, x, NULL, 1, 8, 1), MOE_OK);
    moe_layer_free(l);
}

int main(void) {
    moe_set_num_threads(2);
    test_config();
    test_json();
    test_masks();
    test_image();
    test_dropout_bank();
    test_dropout_layer();
    test_bad_input();
    return check_summary("test_soft");
}
