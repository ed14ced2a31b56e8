/*
 * The transformer's attention kernels (tools/moe/attn.c): the GEMM-based
 * forward and backward against their plain twins on awkward shapes (one
 * position, odd lengths, one head, head dim 2, tile boundaries), the
 * backward against central finite differences, RoPE against its formula
 * and its inverse, one-token decode against the full forward, and the same
 * bits on 1 and 2 threads.
 * Dimension key: B sequences, S positions, D model dim, NH heads.
 */
#include "check.h"
#include "../tools/moe/attn.c"

#include <omp.h>
#include <stdlib.h>

static unsigned long long g_seed = 12345;

static float *randv(int64_t n, float scale) {
    float *p = malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; i < n; i++) p[i] = scale * check_nrand(&g_seed);
    return p;
}

static double max_rel(const float *a, const float *b, int64_t n) {
    double mx = 0, ref = 1e-3;
    for (int64_t i = 0; i < n; i++) ref = fmax(ref, fabs((double)b[i]));
    for (int64_t i = 0; i < n; i++) mx = fmax(mx, fabs((double)a[i] - b[i]) / ref);
    return mx;
}

static void twins(int64_t B, int64_t S, int64_t D, int64_t NH) {
    int64_t T = B * S, PS = B * NH * S * S;
    float *qkv = randv(T * 3 * D, 1.0f), *dout = randv(T * D, 1.0f);
    float *o = malloc((size_t)(T * D) * 4), *o_r = malloc((size_t)(T * D) * 4);
    float *P = malloc((size_t)PS * 4), *P_r = malloc((size_t)PS * 4), *work = malloc((size_t)PS * 4);
    float *dq = malloc((size_t)(T * 3 * D) * 4), *dq_r = malloc((size_t)(T * 3 * D) * 4);
    attn_forward(o, P, qkv, B, S, D, NH);
    attn_forward_ref(o_r, P_r, qkv, B, S, D, NH);
    double eo = max_rel(o, o_r, T * D), ep = max_rel(P, P_r, PS);
    CHECK(eo < 2e-5 && ep < 2e-5, "forward B%lld S%lld D%lld NH%lld: out %.2g, probabilities %.2g", (long long)B,
          (long long)S, (long long)D, (long long)NH, eo, ep);
    int masked = 1; /* exact zeros above the diagonal, rows summing to 1 */
    double rowerr = 0;
    for (int64_t bh = 0; bh < B * NH; bh++)
        for (int64_t i = 0; i < S; i++) {
            double s = 0;
            for (int64_t j = 0; j < S; j++) {
                float v = P[(bh * S + i) * S + j];
                if (j > i && v != 0.0f) masked = 0;
                s += v;
            }
            rowerr = fmax(rowerr, fabs(s - 1.0));
        }
    CHECK(masked && rowerr < 1e-5, "causal mask and normalisation (row sum error %.2g)", rowerr);
    attn_backward(dq, work, dout, qkv, P, B, S, D, NH);
    attn_backward_ref(dq_r, dout, qkv, P_r, B, S, D, NH);
    double ed = max_rel(dq, dq_r, T * 3 * D);
    CHECK(ed < 5e-5, "backward B%lld S%lld D%lld NH%lld: %.2g", (long long)B, (long long)S, (long long)D,
          (long long)NH, ed);
    /* 1 and 2 threads: the same bits */
    float *o1 = malloc((size_t)(T * D) * 4), *dq1 = malloc((size_t)(T * 3 * D) * 4);
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    attn_forward(o1, P, qkv, B, S, D, NH);
    attn_backward(dq1, work, dout, qkv, P, B, S, D, NH);
    omp_set_num_threads(nt > 1 ? nt : 2);
    attn_forward(o, P, qkv, B, S, D, NH);
    attn_backward(dq, work, dout, qkv, P, B, S, D, NH);
    omp_set_num_threads(nt);
    CHECK(!memcmp(o, o1, (size_t)(T * D) * 4) && !memcmp(dq, dq1, (size_t)(T * 3 * D) * 4),
          "1 and 2 threads give the same bits");
    /* decode: the last position of each sequence against its cached rows */
    float *od = malloc((size_t)D * 4), *w = malloc((size_t)S * 4), *kc = malloc((size_t)(S * 2 * D) * 4);
    double edec = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < S; i++) {
            for (int64_t j = 0; j <= i; j++) memcpy(kc + j * 2 * D, qkv + (b * S + j) * 3 * D + D, (size_t)(2 * D) * 4);
            attn_decode(od, w, qkv + (b * S + i) * 3 * D, kc, kc + D, 2 * D, i + 1, D, NH);
            edec = fmax(edec, max_rel(od, o_r + (b * S + i) * D, D));
        }
    CHECK(edec < 2e-5, "decode equals the forward at every position: %.2g", edec);
    free(qkv), free(dout), free(o), free(o_r), free(P), free(P_r), free(work), free(dq), free(dq_r), free(o1);
    free(dq1), free(od), free(w), free(kc);
}

/* L = sum(o * R): dL/dqkv by attn_backward against central differences. */
static void fd_check(int64_t B, int64_t S, int64_t D, int64_t NH) {
    int64_t T = B * S, PS = B * NH * S * S;
    float *qkv = randv(T * 3 * D, 0.7f), *R = randv(T * D, 1.0f), *o = malloc((size_t)(T * D) * 4);
    float *P = malloc((size_t)PS * 4), *work = malloc((size_t)PS * 4), *dq = malloc((size_t)(T * 3 * D) * 4);
    attn_forward(o, P, qkv, B, S, D, NH);
    attn_backward(dq, work, R, qkv, P, B, S, D, NH);
    int bad = 0;
    for (int64_t i = 0; i < T * 3 * D; i++) {
        const float h = 1e-2f;
        float save = qkv[i];
        double lp = 0, lm = 0;
        qkv[i] = save + h;
        attn_forward_ref(o, P, qkv, B, S, D, NH);
        for (int64_t k = 0; k < T * D; k++) lp += (double)o[k] * R[k];
        qkv[i] = save - h;
        attn_forward_ref(o, P, qkv, B, S, D, NH);
        for (int64_t k = 0; k < T * D; k++) lm += (double)o[k] * R[k];
        qkv[i] = save;
        double fd = (lp - lm) / (2.0 * h);
        if (fabs(fd - dq[i]) > 3e-3 + 1e-2 * fabs(fd)) {
            if (bad++ < 4) fprintf(stderr, "  qkv[%lld]: fd %.6g backward %.6g\n", (long long)i, fd, (double)dq[i]);
        }
    }
    CHECK(bad == 0, "finite differences B%lld S%lld D%lld NH%lld: %d of %lld off", (long long)B, (long long)S,
          (long long)D, (long long)NH, bad, (long long)(T * 3 * D));
    free(qkv), free(R), free(o), free(P), free(work), free(dq);
}

static void rope_checks(void) {
    int64_t B = 2, S = 9, D = 12, NH = 3, hd = 4, T = B * S;
    double theta = 10000.0;
    float *x = randv(T * 3 * D, 1.0f), *y = malloc((size_t)(T * 3 * D) * 4);
    memcpy(y, x, (size_t)(T * 3 * D) * 4);
    attn_rope(y, B, S, 3, D, NH, theta, 1);
    double err = 0;
    int v_same = 1;
    for (int64_t t = 0; t < T; t++) {
        double pos = 3 + t % S;
        for (int64_t part = 0; part < 3; part++)
            for (int64_t h = 0; h < NH; h++)
                for (int64_t i = 0; i < hd / 2; i++) {
                    int64_t a = t * 3 * D + part * D + h * hd + i, b = a + hd / 2;
                    if (part == 2) {
                        v_same = v_same && y[a] == x[a] && y[b] == x[b];
                        continue;
                    }
                    double ang = pos * pow(theta, -2.0 * (double)i / (double)hd);
                    double ea = x[a] * cos(ang) - x[b] * sin(ang), eb = x[b] * cos(ang) + x[a] * sin(ang);
                    err = fmax(err, fmax(fabs(ea - y[a]), fabs(eb - y[b])));
                }
    }
    CHECK(err < 1e-5, "RoPE equals its formula (offset positions): %.2g", err);
    CHECK(v_same, "RoPE leaves v alone");
    attn_rope(y, B, S, 3, D, NH, theta, -1);
    CHECK(max_rel(y, x, T * 3 * D) < 1e-6, "RoPE with sign -1 undoes it");
    /* position 0 is the identity */
    memcpy(y, x, (size_t)(T * 3 * D) * 4);
    attn_rope(y, T, 1, 0, D, NH, theta, 1);
    CHECK(!memcmp(x, y, (size_t)(T * 3 * D) * 4), "RoPE at position 0 changes nothing");
    free(x), free(y);
}

int main(void) {
    const int64_t shapes[][4] = {{1, 1, 2, 1},  {1, 2, 4, 2},   {2, 5, 6, 3},   {3, 7, 4, 2},    {1, 17, 12, 2},
                                 {2, 33, 16, 4}, {1, 64, 32, 1}, {2, 65, 8, 2},  {1, 130, 16, 2}, {4, 16, 64, 8},
                                 {1, 257, 8, 1}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        twins(shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3]);
    fd_check(1, 1, 4, 2);
    fd_check(2, 5, 4, 1);
    fd_check(1, 7, 6, 3);
    rope_checks();
    return check_summary("test_attn");
}
