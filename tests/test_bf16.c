/*
 * bf16 mixed precision (cfg.bf16): the conversion, the bf16 GEMM against its
 * plain twin, the expert bank stage by stage against a double-precision
 * emulation of autocast's rounding, and the topk layer: same routing as
 * fp32, values within bf16 tolerance, the same bits on 1 and 2 threads, the
 * weight copies refreshed after an optimizer step, bad requests refused.
 */
#include "check.h"
#include "bank.h"
#include "layer_internal.h"
#include "moe.h"
#include "ops.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static double bf(float f) { return (double)moe_bf16_to_f32(moe_f32_to_bf16(f)); }

static void test_convert(void) {
    static const struct {
        uint32_t in;
        uint16_t out;
    } cases[] = {
        {0x3f800000u, 0x3f80}, /* 1                               */
        {0x3f808000u, 0x3f80}, /* tie, even below: down           */
        {0x3f818000u, 0x3f82}, /* tie, odd below: up              */
        {0x3f808001u, 0x3f81}, /* above the tie: up               */
        {0x3f807fffu, 0x3f80}, /* below the tie: down             */
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds to +Inf          */
        {0x7f800000u, 0x7f80}, /* +Inf                            */
        {0xff800000u, 0xff80}, /* -Inf                            */
        {0x80000000u, 0x8000}, /* -0                              */
        {0x00008000u, 0x0000}, /* denormal tie to even: 0 (no FTZ) */
        {0x00018000u, 0x0002}, /* denormal tie up                 */
        {0x00010001u, 0x0001}, /* smallest bf16 denormal kept      */
        {0x7f800001u, 0x7fc0}, /* signalling NaN: quiet NaN        */
        {0xffc00000u, 0xffc0}, /* negative quiet NaN               */
        {0x7fffffffu, 0x7fff}, /* NaN payload kept, still NaN      */
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t got = moe_f32_to_bf16(from_bits(cases[i].in));
        if (got != cases[i].out) {
            ok = 0;
            fprintf(stderr, "bf16(%08x) = %04x, want %04x\n", cases[i].in, got, cases[i].out);
        }
    }
    CHECK(ok, "moe_f32_to_bf16 rounding (nearest even, no flush, NaN quiet)");
    /* the vector path (moe_to_bf16) against the scalar one on random bit
     * patterns and odd lengths, NaNs and denormals included */
    enum { N = 100003 };
    float *src = malloc(N * sizeof *src);
    uint16_t *dst = malloc(N * sizeof *dst);
    unsigned long long st = 99;
    for (int i = 0; i < N; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t u = (uint32_t)(st >> 32);
        if (i % 5 == 0) u &= 0x807fffffu;            /* denormals */
        if (i % 7 == 0) u |= 0x7f800000u;            /* Inf / NaN */
        if (i % 11 == 0) u = (u & 0xffff0000u) | 0x8000u; /* exact ties */
        src[i] = from_bits(u);
    }
    int same = 1;
    for (int len = 0; len <= 40; len++) {
        memset(dst, 0xab, 64 * sizeof *dst);
        moe_to_bf16(dst, src + 3, len);
        for (int i = 0; i < len; i++) same &= dst[i] == moe_f32_to_bf16(src[3 + i]);
        same &= dst[len] == 0xabab; /* nothing past the end */
    }
    moe_to_bf16_par(dst, src, N);
    for (int i = 0; i < N; i++) same &= dst[i] == moe_f32_to_bf16(src[i]);
    CHECK(same, "moe_to_bf16 (vector) differs from moe_f32_to_bf16");
    free(src), free(dst);
}

/* moe_gemm_bf16 against its twin on awkward shapes, every transpose, beta 0
 * (NaN in C ignored) and 1, and the same bits on 1 and 2 threads. */
static void test_gemm(void) {
    static const int64_t Ms[] = {1, 3, 17, 130}, Ns[] = {1, 5, 64, 300}, Ks[] = {1, 2, 33, 260};
    unsigned long long st = 5;
    int ok = 1, same = 1, cases = 0;
    double worst = 0;
    for (int mi = 0; mi < 4; mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int ki = 0; ki < 4; ki++)
                for (int v = 0; v < 8; v++) {
                    int ta = v & 1, tb = (v >> 1) & 1;
                    float beta = (v >> 2) ? 1.0f : 0.0f;
                    int64_t M = Ms[mi], N = Ns[ni], K = Ks[ki];
                    uint16_t *A = malloc((size_t)(M * K) * 2), *B = malloc((size_t)(K * N) * 2);
                    float *C = malloc((size_t)(M * N) * 4), *C1 = malloc((size_t)(M * N) * 4);
                    float *R = malloc((size_t)(M * N) * 4);
                    for (int64_t i = 0; i < M * K; i++) A[i] = moe_f32_to_bf16(check_nrand(&st));
                    for (int64_t i = 0; i < K * N; i++) B[i] = moe_f32_to_bf16(check_nrand(&st));
                    for (int64_t i = 0; i < M * N; i++)
                        R[i] = C[i] = C1[i] = (beta == 0.0f && i % 3 == 0) ? NAN : check_nrand(&st);
                    moe_gemm_bf16_ref(ta, tb, M, N, K, A, B, beta, R);
                    moe_set_num_threads(2);
                    moe_gemm_bf16(ta, tb, M, N, K, A, B, beta, C);
                    moe_set_num_threads(1);
                    moe_gemm_bf16(ta, tb, M, N, K, A, B, beta, C1);
                    moe_set_num_threads(2);
                    for (int64_t i = 0; i < M * N; i++) {
                        double d = fabs((double)C[i] - R[i]);
                        ok &= d <= 2e-6 * (1.0 + sqrt((double)K)) * (1.0 + fabs((double)R[i]));
                        if (d > worst) worst = d;
                    }
                    same &= memcmp(C, C1, (size_t)(M * N) * 4) == 0;
                    cases++;
                    free(A), free(B), free(C), free(C1), free(R);
                }
    CHECK(ok, "moe_gemm_bf16 differs from its twin (worst %g over %d cases)", worst, cases);
    CHECK(same, "moe_gemm_bf16: 1 and 2 threads give different bits");
    CHECK(cases == 512, "bf16 gemm cases %d", cases);
}

/* The decode kernel against the twin: 1..MOE_SMALL_ROWS rows, K around the
 * 32-pair width, odd N, accumulation into C. */
static void test_small(void) {
    static const int64_t Ks[] = {1, 31, 32, 33, 100, 512}, Ns[] = {1, 5, 64};
    unsigned long long st = 77;
    int ok = 1, alone = 1;
    double worst = 0;
    for (int64_t n = 1; n <= MOE_SMALL_ROWS; n++)
        for (int ki = 0; ki < 6; ki++)
            for (int ni = 0; ni < 3; ni++) {
                int64_t K = Ks[ki], N = Ns[ni];
                uint16_t *A = malloc((size_t)(n * K) * 2), *W = malloc((size_t)(N * K) * 2);
                float *C = malloc((size_t)(n * N) * 4), *R = malloc((size_t)(n * N) * 4);
                for (int64_t i = 0; i < n * K; i++) A[i] = moe_f32_to_bf16(check_nrand(&st));
                for (int64_t i = 0; i < N * K; i++) W[i] = moe_f32_to_bf16(check_nrand(&st));
                for (int64_t i = 0; i < n * N; i++) C[i] = R[i] = check_nrand(&st);
                float *C1 = malloc((size_t)(n * N) * 4);
                memcpy(C1, C, (size_t)(n * N) * 4);
                moe_gemm_bf16_nt_small(C, A, W, n, N, K);
                moe_gemm_bf16_ref(0, 1, n, N, K, A, W, 1.0f, R);
                for (int64_t i = 0; i < n * N; i++) {
                    double d = fabs((double)C[i] - R[i]);
                    ok &= d <= 2e-6 * (1.0 + sqrt((double)K)) * (1.0 + fabs((double)R[i]));
                    worst = fmax(worst, d);
                }
                /* each element's sum depends only on K: one row of A against one
                 * row of W at a time gives the same bits as the whole call */
                for (int64_t r = 0; r < n; r++)
                    for (int64_t j = 0; j < N; j++) {
                        float c = C1[r * N + j];
                        moe_gemm_bf16_nt_small(&c, A + r * K, W + j * K, 1, 1, K);
                        alone &= memcmp(&c, &C[r * N + j], 4) == 0;
                    }
                free(A), free(W), free(C), free(R), free(C1);
            }
    CHECK(ok, "moe_gemm_bf16_nt_small differs from the twin (worst %g)", worst);
    CHECK(alone, "moe_gemm_bf16_nt_small: an element's bits depend on where its row falls (groups of 4 rows)");
}

/* The expert bank in bf16, stage by stage, against double precision with
 * autocast's roundings: hpre = b1 + bf(x) bf(W1)^T, ha = f(hpre),
 * y = b2 + bf(ha) bf(W2)^T; backward dW2 += bf(dy)^T bf(ha), dha = bf(dy)
 * bf(W2), dhpre = f'(dha), dW1 += bf(dhpre)^T bf(x), dx = bf(dhpre) bf(W1),
 * biases from the fp32 gradients. Each stage is fed the bank's own previous
 * stage, so a bf16 rounding that flips on a tie cannot spread. */
static void test_bank(moe_expert_kind kind, moe_activation act) {
    enum { E = 3, D = 17, H = 9 };
    int64_t H2 = kind == MOE_EXPERT_MLP ? H : 2 * H;
    int64_t off[E + 1] = {0, 5, 5, 23}, R = off[E]; /* expert 1 empty, expert 2 odd */
    unsigned long long st = 31 + (unsigned)kind;
    size_t nw1 = (size_t)(E * H2 * D), nw2 = (size_t)(E * D * H);
    float *W1 = malloc(nw1 * 4), *b1 = malloc((size_t)(E * H2) * 4), *W2 = malloc(nw2 * 4), *b2 = malloc(E * D * 4);
    float *dW1 = calloc(nw1, 4), *db1 = calloc((size_t)(E * H2), 4), *dW2 = calloc(nw2, 4), *db2 = calloc(E * D, 4);
    uint16_t *W1h = malloc(nw1 * 2), *W2h = malloc(nw2 * 2);
    float *x = malloc((size_t)(R * D) * 4), *hpre = malloc((size_t)(R * H2) * 4), *ha = malloc((size_t)(R * H) * 4);
    float *y = malloc((size_t)(R * D) * 4), *dy = malloc((size_t)(R * D) * 4), *dha = malloc((size_t)(R * H) * 4);
    float *dhpre = malloc((size_t)(R * H2) * 4), *dx = malloc((size_t)(R * D) * 4);
    uint16_t *x16 = malloc((size_t)(R * D) * 2), *h16 = malloc((size_t)(R * H) * 2);
    uint16_t *dy16 = malloc((size_t)(R * D) * 2), *dhp16 = malloc((size_t)(R * H2) * 2);
    for (size_t i = 0; i < nw1; i++) W1[i] = 0.3f * check_nrand(&st);
    for (size_t i = 0; i < nw2; i++) W2[i] = 0.3f * check_nrand(&st);
    for (int64_t i = 0; i < E * H2; i++) b1[i] = 0.1f * check_nrand(&st);
    for (int64_t i = 0; i < E * D; i++) b2[i] = 0.1f * check_nrand(&st);
    for (int64_t i = 0; i < R * D; i++) x[i] = check_nrand(&st), dy[i] = check_nrand(&st);
    moe_to_bf16(W1h, W1, (int64_t)nw1), moe_to_bf16(W2h, W2, (int64_t)nw2);
    moe_bank f = {W1, b1, W2, b2, dW1, db1, dW2, db2, D, H, E, 0, kind, act, 0.0f, 0.0f, 0,
                  &moe_bank_bf16, W1h, W2h, {x16, h16, dy16, dhp16}};
    moe_bank_forward(&f, off, x, hpre, ha, y);
    int bad = moe_bank_backward(&f, off, x, hpre, ha, dy, dha, dhpre, dx);
    CHECK(!bad, "bank backward reports a non-finite gradient");

    double worst[6] = {0};
    for (int e = 0; e < E; e++)
        for (int64_t r = off[e]; r < off[e + 1]; r++) {
            for (int64_t j = 0; j < H2; j++) { /* hpre */
                double s = b1[e * H2 + j];
                for (int64_t k = 0; k < D; k++) s += bf(x[r * D + k]) * bf(W1[(e * H2 + j) * D + k]);
                worst[0] = fmax(worst[0], fabs(s - hpre[r * H2 + j]));
            }
            float hr[H]; /* ha = f(hpre), through the library's own (fp32) activation */
            if (kind == MOE_EXPERT_MLP) moe_act_forward(hr, hpre + r * H2, H, act, 0.0f);
            else moe_glu_forward(hr, hpre + r * H2, 1, H, kind);
            for (int64_t j = 0; j < H; j++) worst[1] = fmax(worst[1], fabs((double)hr[j] - ha[r * H + j]));
            for (int64_t j = 0; j < D; j++) { /* y */
                double s = b2[e * D + j];
                for (int64_t k = 0; k < H; k++) s += bf(ha[r * H + k]) * bf(W2[(e * D + j) * H + k]);
                worst[2] = fmax(worst[2], fabs(s - y[r * D + j]));
            }
            for (int64_t k = 0; k < H; k++) { /* dha = bf(dy) bf(W2) */
                double s = 0;
                for (int64_t j = 0; j < D; j++) s += bf(dy[r * D + j]) * bf(W2[(e * D + j) * H + k]);
                worst[3] = fmax(worst[3], fabs(s - dha[r * H + k]));
            }
            for (int64_t k = 0; k < D; k++) { /* dx = bf(dhpre) bf(W1) */
                double s = 0;
                for (int64_t j = 0; j < H2; j++) s += bf(dhpre[r * H2 + j]) * bf(W1[(e * H2 + j) * D + k]);
                worst[4] = fmax(worst[4], fabs(s - dx[r * D + k]));
            }
        }
    for (int e = 0; e < E; e++) { /* weight gradients */
        for (int64_t j = 0; j < D; j++)
            for (int64_t k = 0; k < H; k++) {
                double s = 0;
                for (int64_t r = off[e]; r < off[e + 1]; r++) s += bf(dy[r * D + j]) * bf(ha[r * H + k]);
                worst[5] = fmax(worst[5], fabs(s - dW2[(e * D + j) * H + k]));
            }
        for (int64_t j = 0; j < H2; j++)
            for (int64_t k = 0; k < D; k++) {
                double s = 0;
                for (int64_t r = off[e]; r < off[e + 1]; r++) s += bf(dhpre[r * H2 + j]) * bf(x[r * D + k]);
                worst[5] = fmax(worst[5], fabs(s - dW1[(e * H2 + j) * D + k]));
            }
    }
    const char *names[6] = {"hpre", "ha", "y", "dha", "dx", "dW"};
    for (int i = 0; i < 6; i++)
        CHECK(worst[i] < 2e-5, "bf16 bank (%s) stage %s off by %g", moe_expert_kind_name(kind), names[i], worst[i]);
    /* the fp32 twin of the bank differs by about bf16's precision, not more */
    float *y32 = malloc((size_t)(R * D) * 4), *hp32 = malloc((size_t)(R * H2) * 4), *ha32 = malloc((size_t)(R * H) * 4);
    moe_bank f32 = f;
    f32.fmt = &moe_bank_f32, f32.W1q = f32.W2q = NULL, f32.lp = (moe_bank_lowp){NULL, NULL, NULL, NULL};
    moe_bank_forward(&f32, off, x, hp32, ha32, y32);
    double dmax = 0, ymax = 0;
    for (int64_t i = 0; i < R * D; i++) dmax = fmax(dmax, fabs((double)y32[i] - y[i])), ymax = fmax(ymax, fabs(y32[i]));
    CHECK(dmax > 0 && dmax < 3e-2 * ymax, "bf16 vs fp32 bank: max diff %g of max |y| %g", dmax, ymax);
    free(y32), free(hp32), free(ha32);
    free(W1), free(b1), free(W2), free(b2), free(dW1), free(db1), free(dW2), free(db2), free(W1h), free(W2h);
    free(x), free(hpre), free(ha), free(y), free(dy), free(dha), free(dhpre), free(dx), free(x16), free(h16);
    free(dy16), free(dhp16);
}

/* A topk layer in bf16 beside its fp32 twin (same seed, same parameters).
 * Errors are relative in the L2 norm: a relu whose input is within bf16's
 * rounding of 0 switches, which moves single gradient elements by their whole
 * size, and the L2 norm bounds how much of the whole they move. */
static double rel_err(const float *a, const float *b, int64_t n) {
    double d = 0, m = 0;
    for (int64_t i = 0; i < n; i++) d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), m += (double)b[i] * b[i];
    return m > 0 ? sqrt(d / m) : sqrt(d);
}

static void test_layer(int64_t T, int E, int K, moe_expert_kind kind, int shared, const char *label) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 24, c.hidden_dim = 40, c.num_experts = E, c.top_k = K, c.expert = kind, c.seed = 3;
    c.num_shared = shared;
    /* smooth activations: relu switches where bf16 moves its input across 0
     * (test_bank checks relu stage by stage) */
    c.activation = MOE_ACT_GELU;
    moe_layer *l32 = NULL, *l16 = NULL;
    CHECK_STATUS(moe_layer_create(&l32, &c), MOE_OK);
    c.bf16 = 1;
    CHECK_STATUS(moe_layer_create(&l16, &c), MOE_OK);
    if (!l32 || !l16) return;
    int64_t D = c.input_dim, n = T * D;
    float *x = malloc((size_t)(n ? n : 1) * 4), *dy = malloc((size_t)(n ? n : 1) * 4);
    float *y[3], *dx[3];
    for (int i = 0; i < 3; i++) y[i] = malloc((size_t)(n ? n : 1) * 4), dx[i] = malloc((size_t)(n ? n : 1) * 4);
    unsigned long long st = 17;
    for (int64_t i = 0; i < n; i++) x[i] = check_nrand(&st), dy[i] = check_nrand(&st);
    moe_set_num_threads(2);
    CHECK_STATUS(moe_layer_forward(l32, y[0], NULL, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l32, dx[0], dy, 1.0f), MOE_OK);
    moe_stats s32, s16;
    moe_layer_stats(l32, &s32);
    CHECK_STATUS(moe_layer_forward(l16, y[1], NULL, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l16, dx[1], dy, 1.0f), MOE_OK);
    moe_layer_stats(l16, &s16);
    /* the router is fp32: the same choices */
    int same_route = s32.assignments == s16.assignments;
    for (int e = 0; e < E; e++) same_route &= l32->expert_counts[e] == l16->expert_counts[e];
    CHECK(same_route, "%s: bf16 changed the routing", label);
    CHECK(T == 0 || rel_err(y[1], y[0], n) < 2e-2, "%s: y off by %g (relative, L2)", label,
          rel_err(y[1], y[0], n));
    CHECK(T == 0 || rel_err(dx[1], dx[0], n) < 2e-2, "%s: dx off by %g", label, rel_err(dx[1], dx[0], n));
    int np = moe_layer_num_params(l32), gok = 1;
    for (int i = 0; i < np; i++) {
        moe_param *a = &l32->params[i], *b = &l16->params[i];
        double e2 = rel_err(b->grad, a->grad, a->numel);
        if (!(e2 < 3e-2)) gok = 0, fprintf(stderr, "%s: grad %s off by %g\n", label, a->name, e2);
    }
    CHECK(gok, "%s: bf16 gradients within 3e-2 of fp32", label);
    /* 1 thread: the same bits */
    moe_layer_zero_grad(l16);
    moe_layer_backward(l16, dx[2], dy, 1.0f); /* (re-run below with 1 thread) */
    float *g2 = malloc((size_t)moe_layer_num_weights(l16) * 4);
    memcpy(g2, l16->gmem, (size_t)moe_layer_num_weights(l16) * 4);
    moe_set_num_threads(1);
    moe_layer_zero_grad(l16);
    CHECK_STATUS(moe_layer_forward(l16, y[2], NULL, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l16, dx[2], dy, 1.0f), MOE_OK);
    moe_set_num_threads(2);
    CHECK(memcmp(y[1], y[2], (size_t)n * 4) == 0 && memcmp(dx[1], dx[2], (size_t)n * 4) == 0 &&
              memcmp(g2, l16->gmem, (size_t)moe_layer_num_weights(l16) * 4) == 0,
          "%s: bf16 on 1 and 2 threads gives different bits", label);
    free(g2), free(x), free(dy);
    for (int i = 0; i < 3; i++) free(y[i]), free(dx[i]);
    moe_layer_free(l32), moe_layer_free(l16);
}

/* The bf16 weight copies follow the parameters: after an optimizer step the
 * bf16 layer computes with the new values (as its fp32 twin does). */
static void test_refresh(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 16, c.hidden_dim = 32, c.num_experts = 4, c.top_k = 2, c.seed = 8, c.bf16 = 1;
    moe_layer *l = NULL;
    CHECK_STATUS(moe_layer_create(&l, &c), MOE_OK);
    if (!l) return;
    enum { T = 12 };
    float x[T * 16], y0[T * 16], y1[T * 16], y2[T * 16], dy[T * 16];
    unsigned long long st = 4;
    for (int i = 0; i < T * 16; i++) x[i] = check_nrand(&st), dy[i] = check_nrand(&st);
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_SGD);
    oc.lr = 0.5f;
    moe_optim *o = NULL;
    CHECK_STATUS(moe_optim_create(&o, &oc, l->params, l->n_params), MOE_OK);
    CHECK_STATUS(moe_layer_forward(l, y0, NULL, x, T, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l, NULL, dy, 1.0f), MOE_OK);
    CHECK_STATUS(moe_optim_step(o), MOE_OK);
    CHECK_STATUS(moe_layer_forward(l, y1, NULL, x, T, MOE_EVAL | MOE_NO_GRAD), MOE_OK);
    /* the same parameters in a fresh bf16 layer: the copies are made anew */
    moe_layer *m = NULL;
    CHECK_STATUS(moe_layer_create(&m, &c), MOE_OK);
    if (m) {
        memcpy(m->wmem, l->wmem, (size_t)l->n_weights * 4);
        moe_layer_params_changed(m);
        CHECK_STATUS(moe_layer_forward(m, y2, NULL, x, T, MOE_EVAL | MOE_NO_GRAD), MOE_OK);
        CHECK(memcmp(y1, y2, sizeof y1) == 0, "after moe_optim_step the bf16 copies were not refreshed");
        CHECK(memcmp(y0, y1, sizeof y0) != 0, "the step changed nothing");
        /* a direct write, announced: refreshed */
        m->wmem[0] += 1.0f;
        moe_layer_params_changed(m);
        CHECK_STATUS(moe_layer_forward(m, y2, NULL, x, T, MOE_EVAL | MOE_NO_GRAD), MOE_OK);
        CHECK(m->w16[0] == moe_f32_to_bf16(m->wmem[0]), "moe_layer_params_changed did not refresh the copy");
        moe_layer_free(m);
    }
    moe_optim_free(o);
    moe_layer_free(l);
}

/* gshard and hierarchical in bf16 beside their fp32 twins: the same routing
 * (gates and policies are fp32, the random policy's draws the same), values
 * within bf16 tolerance, the same bits on 1 and 2 threads. */
static void test_gshard(moe_layer_type type, int E, int Ei, int64_t B, int64_t N, const char *label) {
    moe_config c;
    moe_config_init(&c, type);
    c.input_dim = 24, c.hidden_dim = 40, c.num_experts = E, c.num_experts_inner = Ei, c.seed = 5;
    c.activation = MOE_ACT_GELU;
    moe_layer *l32 = NULL, *l16 = NULL;
    CHECK_STATUS(moe_layer_create(&l32, &c), MOE_OK);
    c.bf16 = 1;
    CHECK_STATUS(moe_layer_create(&l16, &c), MOE_OK);
    if (!l32 || !l16) return;
    int64_t D = c.input_dim, n = B * N * D;
    float *x = malloc((size_t)n * 4), *dy = malloc((size_t)n * 4), *y[3], *dx[3], aux[3];
    for (int i = 0; i < 3; i++) y[i] = malloc((size_t)n * 4), dx[i] = malloc((size_t)n * 4);
    unsigned long long st = 23;
    for (int64_t i = 0; i < n; i++) x[i] = check_nrand(&st), dy[i] = check_nrand(&st);
    CHECK_STATUS(moe_layer_forward_seq(l32, y[0], &aux[0], x, B, N, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l32, dx[0], dy, 1.0f), MOE_OK);
    CHECK_STATUS(moe_layer_forward_seq(l16, y[1], &aux[1], x, B, N, MOE_TRAIN), MOE_OK);
    CHECK_STATUS(moe_layer_backward(l16, dx[1], dy, 1.0f), MOE_OK);
    moe_stats s32, s16;
    moe_layer_stats(l32, &s32), moe_layer_stats(l16, &s16);
    int same = s32.assignments == s16.assignments && s32.dropped == s16.dropped && aux[0] == aux[1];
    for (int e = 0; e < l32->n_expert_counts; e++) same &= l32->expert_counts[e] == l16->expert_counts[e];
    CHECK(same, "%s: bf16 changed the routing or the balance loss", label);
    CHECK(rel_err(y[1], y[0], n) < 2e-2, "%s: y off by %g", label, rel_err(y[1], y[0], n));
    CHECK(rel_err(dx[1], dx[0], n) < 2e-2, "%s: dx off by %g", label, rel_err(dx[1], dx[0], n));
    int gok = 1;
    for (int i = 0; i < l32->n_params; i++) {
        double e2 = rel_err(l16->params[i].grad, l32->params[i].grad, l32->params[i].numel);
        if (!(e2 < 3e-2)) gok = 0, fprintf(stderr, "%s: grad %s off by %g\n", label, l32->params[i].name, e2);
    }
    CHECK(gok, "%s: bf16 gradients within 3e-2 of fp32", label);
    float *g2 = malloc((size_t)l16->n_weights * 4);
    memcpy(g2, l16->gmem, (size_t)l16->n_weights * 4);
    moe_set_num_threads(1);
    moe_layer_zero_grad(l16);
    moe_layer *m = NULL; /* a fresh twin: the random policy draws from the forward count */
    CHECK_STATUS(moe_layer_create(&m, &c), MOE_OK);
    if (m) {
        CHECK_STATUS(moe_layer_forward_seq(m, y[2], &aux[2], x, B, N, MOE_TRAIN), MOE_OK);
        CHECK_STATUS(moe_layer_backward(m, dx[2], dy, 1.0f), MOE_OK);
        CHECK(memcmp(y[1], y[2], (size_t)n * 4) == 0 && memcmp(dx[1], dx[2], (size_t)n * 4) == 0 &&
                  memcmp(g2, m->gmem, (size_t)m->n_weights * 4) == 0,
              "%s: bf16 on 1 and 2 threads gives different bits", label);
        moe_layer_free(m);
    }
    moe_set_num_threads(2);
    free(g2), free(x), free(dy);
    for (int i = 0; i < 3; i++) free(y[i]), free(dx[i]);
    moe_layer_free(l32), moe_layer_free(l16);
}

/* Inference from bf16 weights (MOE_BF16_WEIGHTS): a BF16 file's expert
 * weights are used as they are, never widened (the fp32 expert weights stay
 * 0), and the forward equals a mixed-precision layer's loaded from the same
 * file, bit for bit; from an F32 file too. Backward, save, a second load and
 * moe_layer_create are refused. */
static void test_weights_only(moe_layer_type type, const char *label) {
    moe_config c;
    moe_config_init(&c, type);
    c.input_dim = 24, c.hidden_dim = 40, c.num_experts = 4, c.num_experts_inner = 2, c.top_k = 2, c.seed = 9;
    c.num_shared = type == MOE_LAYER_TOPK ? 1 : 0;
    if (type == MOE_LAYER_TOPK) c.expert = MOE_EXPERT_SWIGLU;
    moe_layer *src = NULL;
    CHECK_STATUS(moe_layer_create(&src, &c), MOE_OK);
    if (!src) return;
    char p32[64], p16[64];
    snprintf(p32, sizeof p32, "/tmp/moe_bf16w_%d_f32.safetensors", (int)getpid());
    snprintf(p16, sizeof p16, "/tmp/moe_bf16w_%d_bf16.safetensors", (int)getpid());
    CHECK_STATUS(moe_layer_save(src, p32), MOE_OK);
    int np = src->n_params + src->n_buffers;
    moe_st_entry *ents = calloc((size_t)np, sizeof *ents);
    uint16_t **bufs = calloc((size_t)np, sizeof *bufs);
    for (int i = 0; i < np; i++) { /* the same state_dict in BF16 */
        const moe_param *q = i < src->n_params ? &src->params[i] : &src->buffers[i - src->n_params];
        bufs[i] = malloc((size_t)q->numel * 2);
        moe_to_bf16(bufs[i], q->data, q->numel);
        ents[i].name = q->name, ents[i].dtype = MOE_DT_BF16, ents[i].ndim = q->ndim, ents[i].data = bufs[i];
        for (int d = 0; d < q->ndim; d++) ents[i].shape[d] = q->shape[d];
    }
    CHECK_STATUS(moe_st_write(p16, ents, np, NULL, 0), MOE_OK);
    int64_t B = 2, N = 10, D = c.input_dim, n = B * N * D;
    float *x = malloc((size_t)n * 4), *y1 = malloc((size_t)n * 4), *y2 = malloc((size_t)n * 4), aux1, aux2;
    unsigned long long st = 5;
    for (int64_t i = 0; i < n; i++) x[i] = check_nrand(&st);
    for (int f = 0; f < 2; f++) {
        const char *path = f ? p32 : p16;
        moe_layer *mix = NULL, *w = NULL;
        c.bf16 = 1;
        CHECK_STATUS(moe_layer_create_load(&mix, &c, path), MOE_OK);
        c.bf16 = MOE_BF16_WEIGHTS;
        CHECK_STATUS(moe_layer_create_load(&w, &c, path), MOE_OK);
        if (!mix || !w) {
            moe_layer_free(mix), moe_layer_free(w);
            continue;
        }
        CHECK_STATUS(moe_layer_forward_seq(mix, y1, &aux1, x, B, N, MOE_EVAL | MOE_NO_GRAD), MOE_OK);
        CHECK_STATUS(moe_layer_forward_seq(w, y2, &aux2, x, B, N, MOE_EVAL | MOE_NO_GRAD), MOE_OK);
        CHECK(memcmp(y1, y2, (size_t)n * 4) == 0 && aux1 == aux2,
              "%s (%s file): bf16 weights only differs from mixed precision", label, f ? "F32" : "BF16");
        int never = 1, used = 0; /* the experts' fp32 weights never written */
        for (int i = 0; i < w->n_params; i++) {
            const char *nm = w->params[i].name;
            int gw = (strncmp(nm, "experts.", 8) == 0 || strncmp(nm, "shared_experts.", 15) == 0) &&
                     (strstr(nm, ".weight") || !strcmp(nm, "experts.w1") || !strcmp(nm, "experts.w2"));
            if (!gw) continue;
            used++;
            for (int64_t j = 0; j < w->params[i].numel; j++) never &= w->params[i].data[j] == 0.0f;
        }
        CHECK(never && used >= 2, "%s: the experts' fp32 weights were written (%d tensors)", label, used);
        /* a forward that keeps activations still runs; backward, save, reload are refused */
        CHECK_STATUS(moe_layer_forward_seq(w, y2, &aux2, x, B, N, MOE_TRAIN), MOE_OK);
        CHECK_STATUS(moe_layer_backward(w, NULL, y1, 1.0f), MOE_ERR_UNSUPPORTED);
        CHECK_STATUS(moe_layer_save(w, "/tmp/moe_bf16w_never.safetensors"), MOE_ERR_UNSUPPORTED);
        CHECK_STATUS(moe_layer_load(w, path), MOE_ERR_UNSUPPORTED);
        moe_layer_free(mix), moe_layer_free(w);
    }
    moe_layer *bad = NULL;
    CHECK_STATUS(moe_layer_create(&bad, &c), MOE_ERR_ARG); /* c.bf16 == MOE_BF16_WEIGHTS */
    CHECK(bad == NULL && strstr(moe_last_error(), "moe_layer_create_load"), "message: %s", moe_last_error());
    /* a NaN in a BF16 expert weight is named */
    for (int i = 0; i < np; i++)
        if (!strcmp(ents[i].name, "experts.0.net.0.weight") || !strcmp(ents[i].name, "experts.w1")) bufs[i][3] = 0x7fc0;
    CHECK_STATUS(moe_st_write(p16, ents, np, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_layer_create_load(&bad, &c, p16), MOE_ERR_NONFINITE);
    CHECK(bad == NULL && strstr(moe_last_error(), "element 3") &&
              (strstr(moe_last_error(), "experts.0.net.0.weight") || strstr(moe_last_error(), "experts.w1")),
          "message: %s", moe_last_error());
    for (int i = 0; i < np; i++) free(bufs[i]);
    free(bufs), free(ents), free(x), free(y1), free(y2);
    remove(p32), remove(p16);
    moe_layer_free(src);
}

static void test_refused(void) {
    moe_config c;
    moe_layer *l = NULL;
    moe_layer_type types[] = {MOE_LAYER_DENSE, MOE_LAYER_SOFT_DYNAMIC, MOE_LAYER_SOFT};
    for (int i = 0; i < 3; i++) {
        moe_config_init(&c, types[i]);
        c.bf16 = 1;
        CHECK_STATUS(moe_layer_create(&l, &c), MOE_ERR_UNSUPPORTED);
        CHECK(l == NULL && strstr(moe_last_error(), "bf16"), "message: %s", moe_last_error());
    }
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"bf16\": 1}"), MOE_ERR_ARG);
    CHECK(strstr(moe_last_error(), "bf16") != NULL, "message: %s", moe_last_error());
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"bf16\": true}"), MOE_OK);
    CHECK(c.bf16 == 1, "JSON bf16 true");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"gshard\", \"bf16\": false}"), MOE_OK);
    CHECK(c.bf16 == 0, "JSON bf16 false");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"bf16\": \"weights\"}"), MOE_OK);
    CHECK(c.bf16 == MOE_BF16_WEIGHTS, "JSON bf16 \"weights\"");
    CHECK_STATUS(moe_config_from_json(&c, "{\"type\": \"topk\", \"bf16\": \"half\"}"), MOE_ERR_ARG);
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.bf16 = 3;
    moe_layer *l3 = NULL;
    CHECK_STATUS(moe_layer_create(&l3, &c), MOE_ERR_ARG);
}

int main(void) {
    moe_set_num_threads(2);
    test_convert();
    test_gemm();
    test_small();
    test_bank(MOE_EXPERT_MLP, MOE_ACT_GELU);
    test_bank(MOE_EXPERT_MLP, MOE_ACT_RELU);
    test_bank(MOE_EXPERT_SWIGLU, MOE_ACT_GELU);
    test_bank(MOE_EXPERT_GEGLU, MOE_ACT_GELU);
    test_layer(64, 4, 2, MOE_EXPERT_MLP, 0, "T=64 E=4 K=2 mlp gelu");
    test_layer(3, 8, 2, MOE_EXPERT_SWIGLU, 0, "T=3 < E=8 swiglu");
    test_layer(1, 4, 1, MOE_EXPERT_MLP, 0, "one token");
    test_layer(20, 5, 5, MOE_EXPERT_GEGLU, 0, "k = E = 5 geglu");
    test_layer(33, 6, 2, MOE_EXPERT_SWIGLU, 2, "shared experts");
    test_gshard(MOE_LAYER_GSHARD, 4, 1, 2, 24, "gshard E=4 B=2 N=24");
    test_gshard(MOE_LAYER_GSHARD, 6, 1, 3, 5, "gshard N < E");
    test_gshard(MOE_LAYER_HIERARCHICAL, 2, 3, 2, 20, "hierarchical 2x3");
    test_refresh();
    test_weights_only(MOE_LAYER_TOPK, "topk swiglu + shared");
    test_weights_only(MOE_LAYER_GSHARD, "gshard");
    test_weights_only(MOE_LAYER_HIERARCHICAL, "hierarchical");
    test_refused();
    return check_summary("test_bf16");
}
