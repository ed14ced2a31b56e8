/*
 * Every kernel level this CPU has (at or below MOE_MAX_CPU_ISA) against the
 * generic table (src/kernels/generic, the oracle), like ggml's
 * test-backend-ops: bit for bit where generic promises bits (conversions,
 * elementwise math, the decode GEMVs), within a stated bound otherwise
 * (the GEMM entries, against double-sum references). Awkward sizes: empty,
 * one element, every length around the vector widths, odd K and N, k = 1,
 * misaligned pointers, outputs aliasing inputs.
 * Also: the level chosen honours MOE_MAX_CPU_ISA, and oneDNN's ISA is capped
 * with it.
 * Dimension key: n elements or rows, N output columns, K inner dim, M rows.
 */
#include "check.h"
#include "kernels.h"
#include "ops.h"

#include <oneapi/dnnl/dnnl.h>
#include <stdlib.h>
#include <string.h>

static unsigned long long g_rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd32(void) {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_rng >> 32);
}
static float f_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float nrand(void) { return check_nrand(&g_rng); }

/* Inputs for the elementwise kernels: mostly N(0, 4^2), with every kind of
 * special value mixed in (NaN of both signs and payloads, +-inf, +-0,
 * denormals, the exp clamps and overflow edges, huge values). */
static void fill_special(float *x, int64_t n) {
    static const uint32_t sp[] = {0x7fc00000u, 0xffc00001u, 0x7f800001u, 0x7f800000u, 0xff800000u, 0x00000000u,
                                  0x80000000u, 0x00000001u, 0x807fffffu, 0x42b17218u, 0x42b17217u, 0xc2cff1b5u,
                                  0xc2d00000u, 0x7f7fffffu, 0xff7fffffu, 0x3f800000u, 0x3effffffu, 0x477fff80u};
    for (int64_t i = 0; i < n; i++) {
        uint32_t r = rnd32();
        if (r % 7 == 0) x[i] = f_of(sp[rnd32() % (sizeof sp / sizeof sp[0])]);
        else if (r % 7 == 1) x[i] = f_of(rnd32()); /* any bit pattern */
        else x[i] = 4.0f * nrand();
    }
}

static int64_t bits_differ(const void *a, const void *b, int64_t n, size_t esize) {
    const unsigned char *p = a, *q = b;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(p + (size_t)i * esize, q + (size_t)i * esize, esize) != 0) return i;
    return -1;
}

static const int64_t k_lens[] = {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 257, 1000};
#define NLENS ((int)(sizeof k_lens / sizeof k_lens[0]))

/* ---------------------------------------------------------------- conversions */

static void conversions(const moe_kernels *g, const moe_kernels *k) {
    enum { MAX = 1000 + 3 };
    static float x[MAX], y1[MAX], y2[MAX];
    static uint16_t h[MAX], b1[MAX], b2[MAX];
    int bad = 0;
    for (int li = 0; li < NLENS; li++)
        for (int off = 0; off < 3; off++) { /* misaligned starts */
            int64_t n = k_lens[li];
            fill_special(x + off, n);
            for (int64_t i = 0; i < n; i++) h[off + i] = (uint16_t)rnd32();
            memset(b1, 0xa5, sizeof b1), memset(b2, 0xa5, sizeof b2);
            g->to_bf16(b1 + off, x + off, n);
            k->to_bf16(b2 + off, x + off, n);
            int64_t i1 = bits_differ(b1, b2, MAX, 2);
            memset(y1, 0xa5, sizeof y1), memset(y2, 0xa5, sizeof y2);
            g->bf16_to_f32(y1 + off, h + off, n);
            k->bf16_to_f32(y2 + off, h + off, n);
            int64_t i2 = bits_differ(y1, y2, MAX, 4);
            if ((i1 >= 0 || i2 >= 0) && bad++ < 3)
                fprintf(stderr, "  %s conversions, n %lld offset %d: to_bf16 first differs at %lld, widen at %lld\n",
                        moe_isa_name(k->isa), (long long)n, off, (long long)i1, (long long)i2);
        }
    CHECK(bad == 0, "%s: to_bf16 / bf16_to_f32 differ from generic (%d cases)", moe_isa_name(k->isa), bad);
    /* the widening is exact and the rounding is torch's: spot values */
    float v[4] = {1.0f, f_of(0x3f808000u), f_of(0x3f818000u), f_of(0x00000001u)}; /* ties to even; a denormal */
    uint16_t r[4];
    k->to_bf16(r, v, 4);
    CHECK(r[0] == 0x3f80 && r[1] == 0x3f80 && r[2] == 0x3f82 && r[3] == 0x0000, "%s: to_bf16 spot values %04x %04x "
          "%04x %04x", moe_isa_name(k->isa), r[0], r[1], r[2], r[3]);
}

/* ---------------------------------------------------------------- elementwise */

static void elementwise(const moe_kernels *g, const moe_kernels *k) {
    enum { MAX = 1000 + 3 };
    static float x[MAX], a[MAX], d[MAX], o1[MAX], o2[MAX], p1[MAX], p2[MAX];
    int bad = 0;
    const char *what = "";
    for (int li = 0; li < NLENS; li++)
        for (int off = 0; off < 3; off++) {
            int64_t n = k_lens[li];
            fill_special(x + off, n), fill_special(a + off, n), fill_special(d + off, n);
            float c = (li & 1) ? 0.0f : 3.25f * nrand();
            int fail = 0;
#define CMP(name)                                                                                                   \
    if (!fail && bits_differ(o1, o2, MAX, 4) >= 0) fail = 1, what = name;                                           \
    if (!fail && bits_differ(p1, p2, MAX, 4) >= 0) fail = 1, what = name;
#define CLEAR() memset(o1, 0x5a, sizeof o1), memset(o2, 0x5a, sizeof o2), memset(p1, 0x5a, sizeof p1), memset(p2, 0x5a, sizeof p2)
            CLEAR();
            g->vexpf_sub(o1 + off, x + off, c, n), k->vexpf_sub(o2 + off, x + off, c, n);
            CMP("vexpf_sub");
            CLEAR();
            g->vsilu(o1 + off, x + off, n), k->vsilu(o2 + off, x + off, n);
            CMP("vsilu");
            CLEAR();
            g->vsilu_backward(o1 + off, d + off, x + off, n), k->vsilu_backward(o2 + off, d + off, x + off, n);
            CMP("vsilu_backward");
            CLEAR();
            g->vswiglu(o1 + off, a + off, x + off, n), k->vswiglu(o2 + off, a + off, x + off, n);
            CMP("vswiglu");
            CLEAR();
            g->vswiglu_backward(o1 + off, p1 + off, d + off, a + off, x + off, n);
            k->vswiglu_backward(o2 + off, p2 + off, d + off, a + off, x + off, n);
            CMP("vswiglu_backward");
            /* in place: y == x (o1/o2 start as copies of x) */
            memcpy(o1, x, sizeof o1), memcpy(o2, x, sizeof o2), memcpy(p1, d, sizeof p1), memcpy(p2, d, sizeof p2);
            g->vsilu(o1 + off, o1 + off, n), k->vsilu(o2 + off, o2 + off, n);
            g->vswiglu_backward(p1 + off, a + off, p1 + off, a + off, x + off, n); /* da aliases d */
            k->vswiglu_backward(p2 + off, a + off, p2 + off, a + off, x + off, n);
            CMP("in place (vsilu, vswiglu_backward)");
#undef CMP
#undef CLEAR
            if (fail && bad++ < 3)
                fprintf(stderr, "  %s %s differs from generic, n %lld offset %d\n", moe_isa_name(k->isa), what,
                        (long long)n, off);
        }
    CHECK(bad == 0, "%s: elementwise kernels differ from generic (%d cases, last %s)", moe_isa_name(k->isa), bad,
          what);
}

/* ---------------------------------------------------------------- transpose */

static void transposes(const moe_kernels *g, const moe_kernels *k) {
    static const int64_t dims[] = {1, 3, 7, 8, 9, 31, 32, 33, 70};
    int bad = 0;
    for (int ri = 0; ri < 9; ri++)
        for (int ci = 0; ci < 9; ci++) {
            int64_t r = dims[ri], c = dims[ci], ld = c + (ri & 3); /* a row stride past the columns too */
            float *src = malloc(sizeof(float) * (size_t)(r * ld)), *d1 = malloc(sizeof(float) * (size_t)(r * c));
            float *d2 = malloc(sizeof(float) * (size_t)(r * c));
            fill_special(src, r * ld);
            memset(d1, 0x5a, sizeof(float) * (size_t)(r * c)), memset(d2, 0x5a, sizeof(float) * (size_t)(r * c));
            g->transpose(d1, src, r, c, ld);
            k->transpose(d2, src, r, c, ld);
            int wrong = bits_differ(d1, d2, r * c, 4) >= 0;
            for (int64_t i = 0; i < r && !wrong; i++) /* and generic is a transpose */
                for (int64_t j = 0; j < c; j++) wrong |= memcmp(&d1[j * r + i], &src[i * ld + j], 4) != 0;
            if (wrong && bad++ < 3)
                fprintf(stderr, "  %s transpose wrong: %lld x %lld, ld %lld\n", moe_isa_name(k->isa), (long long)r,
                        (long long)c, (long long)ld);
            free(src), free(d1), free(d2);
        }
    CHECK(bad == 0, "%s: transpose differs from the generic one (or is not a transpose) in %d shapes",
          moe_isa_name(k->isa), bad);
}

/* ---------------------------------------------------------------- decode GEMVs */

/* Relative bound of a dot product of K terms summed in fp32 against the
 * exact sum: |err| <= K * 2^-23 * sum |a w| (a crude bound of the error of
 * any order of fp32 sums; with the tree it is far smaller). */
static double dot_bound(int64_t K, double absum) { return (double)(K + 2) * 0x1p-23 * absum + 1e-30; }

static void gemv(const moe_kernels *g, const moe_kernels *k) {
    static const int64_t Ks[] = {1, 15, 16, 17, 31, 32, 33, 64, 100, 513};
    static const int64_t Ns[] = {1, 3, 4, 5, 9, 17};
    int bad_f = 0, bad_h = 0, bad_ref = 0;
    double worst = 0;
    for (int ki = 0; ki < (int)(sizeof Ks / sizeof Ks[0]); ki++)
        for (int ni = 0; ni < (int)(sizeof Ns / sizeof Ns[0]); ni++)
            for (int64_t n = 1; n <= MOE_SMALL_ROWS; n += (n < 5 ? 1 : 3)) {
                int64_t K = Ks[ki], N = Ns[ni], lda = K + (n & 1) * 3, ldc = N + (n & 2);
                float *A = malloc(sizeof(float) * (size_t)(n * lda + 1)), *W = malloc(sizeof(float) * (size_t)(N * K + 1));
                float *C1 = malloc(sizeof(float) * (size_t)(n * ldc)), *C2 = malloc(sizeof(float) * (size_t)(n * ldc));
                uint16_t *Ah = malloc(2 * (size_t)(n * K + 1)), *Wh = malloc(2 * (size_t)(N * K + 1));
                /* +1: the operands start one element in (misaligned) */
                for (int64_t i = 0; i < n * lda + 1; i++) A[i] = nrand();
                for (int64_t i = 0; i < N * K + 1; i++) W[i] = nrand();
                g->to_bf16(Ah, A, n * K + 1), g->to_bf16(Wh, W, N * K + 1);
                for (int64_t i = 0; i < n * ldc; i++) C1[i] = C2[i] = nrand();
                g->sgemm_nt_small(C1, ldc, A + 1, lda, W + 1, n, N, K);
                k->sgemm_nt_small(C2, ldc, A + 1, lda, W + 1, n, N, K);
                if (bits_differ(C1, C2, n * ldc, 4) >= 0 && bad_f++ < 3)
                    fprintf(stderr, "  %s fp32 GEMV differs from generic: n %lld N %lld K %lld\n", moe_isa_name(k->isa),
                            (long long)n, (long long)N, (long long)K);
                /* accumulates into C: a second call adds the same again */
                for (int64_t i = 0; i < n * ldc; i++) C1[i] = 0.0f;
                k->sgemm_nt_small(C1, ldc, A + 1, lda, W + 1, n, N, K);
                for (int64_t r = 0; r < n; r++)
                    for (int64_t j = 0; j < N; j++) {
                        double s = 0, as = 0;
                        for (int64_t q = 0; q < K; q++) {
                            double p = (double)A[1 + r * lda + q] * W[1 + j * K + q];
                            s += p, as += fabs(p);
                        }
                        double e = fabs((double)C1[r * ldc + j] - s) / dot_bound(K, as);
                        if (e > worst) worst = e;
                        if (e > 1.0) bad_ref++;
                    }
                for (int64_t i = 0; i < n * ldc; i++) C1[i] = C2[i] = 0.0f;
                g->gemm_bf16_nt_small(C1, N, Ah + 1, Wh + 1, n, N, K);
                k->gemm_bf16_nt_small(C2, N, Ah + 1, Wh + 1, n, N, K);
                if (bits_differ(C1, C2, n * N, 4) >= 0 && bad_h++ < 3)
                    fprintf(stderr, "  %s bf16 GEMV differs from generic: n %lld N %lld K %lld\n", moe_isa_name(k->isa),
                            (long long)n, (long long)N, (long long)K);
                for (int64_t r = 0; r < n; r++)
                    for (int64_t j = 0; j < N; j++) {
                        double s = 0, as = 0;
                        for (int64_t q = 0; q < K; q++) {
                            double p = (double)moe_bf16_to_f32(Ah[1 + r * K + q]) * moe_bf16_to_f32(Wh[1 + j * K + q]);
                            s += p, as += fabs(p);
                        }
                        double e = fabs((double)C2[r * N + j] - s) / dot_bound(K, as);
                        if (e > worst) worst = e;
                        if (e > 1.0) bad_ref++;
                    }
                free(A), free(W), free(C1), free(C2), free(Ah), free(Wh);
            }
    /* products below 2^-126 (subnormal: not exact in fp32): every level but
     * vdpbf16ps's, which flushes them, must still give generic's bits */
    int bad_sub = 0;
    for (int64_t K = 31; K <= 97; K += 33) {
        enum { N = 5, n = 3 };
        float A[n * 97], W[N * 97], C1[n * N] = {0}, C2[n * N] = {0};
        uint16_t Ah[n * 97], Wh[N * 97];
        for (int64_t i = 0; i < n * K; i++) A[i] = 1e-20f * nrand();
        for (int64_t i = 0; i < N * K; i++) W[i] = 1e-19f * nrand();
        g->to_bf16(Ah, A, n * K), g->to_bf16(Wh, W, N * K);
        g->sgemm_nt_small(C1, N, A, K, W, n, N, K), k->sgemm_nt_small(C2, N, A, K, W, n, N, K);
        bad_sub += bits_differ(C1, C2, n * N, 4) >= 0;
        memset(C1, 0, sizeof C1), memset(C2, 0, sizeof C2);
        g->gemm_bf16_nt_small(C1, N, Ah, Wh, n, N, K), k->gemm_bf16_nt_small(C2, N, Ah, Wh, n, N, K);
        if (k->isa != MOE_ISA_AVX512_BF16) bad_sub += bits_differ(C1, C2, n * N, 4) >= 0;
    }
    CHECK(bad_sub == 0, "%s: decode GEMVs differ from generic with subnormal products (%d cases)",
          moe_isa_name(k->isa), bad_sub);
    CHECK(bad_f == 0, "%s: fp32 decode GEMV differs from generic in %d shapes", moe_isa_name(k->isa), bad_f);
    CHECK(bad_h == 0, "%s: bf16 decode GEMV differs from generic in %d shapes", moe_isa_name(k->isa), bad_h);
    CHECK(bad_ref == 0, "%s: decode GEMVs off the exact sums in %d elements (worst %.3f of the bound)",
          moe_isa_name(k->isa), bad_ref, worst);
}

/* sum_q |op(A)[i][q] op(B)[q][j]| + |c0|: the scale of C[i][j]'s bound */
static double absum(int ta, int tb, const float *A, int64_t lda, const float *B, int64_t ldb, int64_t i, int64_t j,
                    int64_t K, double c0) {
    double as = fabs(c0);
    for (int64_t q = 0; q < K; q++)
        as += fabs((double)(ta ? A[q * lda + i] : A[i * lda + q]) * (tb ? B[j * ldb + q] : B[q * ldb + j]));
    return as;
}

/* ---------------------------------------------------------------- GEMM entries */

static void gemms(const moe_kernels *k) {
    static const int64_t sz[][3] = {{1, 1, 1}, {1, 17, 33}, {5, 3, 1}, {17, 33, 65}, {64, 48, 130}, {3, 129, 7}};
    int bad = 0;
    double worst = 0;
    for (int s = 0; s < (int)(sizeof sz / sizeof sz[0]); s++)
        for (int t = 0; t < 8; t++) {
            int ta = t & 1, tb = (t >> 1) & 1;
            float beta = (t >> 2) ? 1.0f : 0.0f;
            int64_t M = sz[s][0], N = sz[s][1], K = sz[s][2];
            uint16_t *A = malloc(2 * (size_t)(M * K)), *B = malloc(2 * (size_t)(K * N));
            float *Af = malloc(4 * (size_t)(M * K)), *Bf = malloc(4 * (size_t)(K * N));
            float *C = malloc(4 * (size_t)(M * N)), *R = malloc(4 * (size_t)(M * N)), *C0 = malloc(4 * (size_t)(M * N));
            for (int64_t i = 0; i < M * K; i++) A[i] = moe_f32_to_bf16(nrand()), Af[i] = moe_bf16_to_f32(A[i]);
            for (int64_t i = 0; i < K * N; i++) B[i] = moe_f32_to_bf16(nrand()), Bf[i] = moe_bf16_to_f32(B[i]);
            for (int64_t i = 0; i < M * N; i++) C[i] = R[i] = C0[i] = nrand();
            int ok = k->gemm_bf16(ta, tb, M, N, K, A, B, beta, C);
            moe_gemm_bf16_ref(ta, tb, M, N, K, A, B, beta, R);
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    double as = absum(ta, tb, Af, ta ? M : K, Bf, tb ? K : N, i, j, K, (double)beta * C0[i * N + j]);
                    double e = fabs((double)C[i * N + j] - R[i * N + j]) / dot_bound(K, as);
                    if (e > worst) worst = e;
                    if (!ok || e > 1.0) bad++;
                }
            /* fp32: the single-threaded entry against the double-sum twin */
            for (int64_t i = 0; i < M * N; i++) C[i] = R[i] = C0[i];
            ok = k->sgemm1(ta, tb, M, N, K, 1.0f, Af, ta ? M : K, Bf, tb ? K : N, beta, C, N);
            moe_sgemm_ref(ta, tb, M, N, K, 1.0f, Af, ta ? M : K, Bf, tb ? K : N, beta, R, N);
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    double as = absum(ta, tb, Af, ta ? M : K, Bf, tb ? K : N, i, j, K, (double)beta * C0[i * N + j]);
                    double e = fabs((double)C[i * N + j] - R[i * N + j]) / dot_bound(K, as);
                    if (e > worst) worst = e;
                    if (!ok || e > 1.0) bad++;
                }
            free(A), free(B), free(Af), free(Bf), free(C), free(R), free(C0);
        }
    printf("  %s GEMM entries (bf16 %s, fp32 oneDNN) vs double sums: worst %.4f of the bound K 2^-23 sum|ab|\n",
           moe_isa_name(k->isa), k->gemm_bf16 == moe__gemm_bf16_widen ? "widened" : "native", worst);
    CHECK(bad == 0, "%s: GEMM entries off the double-sum twins (%d elements, worst %.3f of the bound)",
          moe_isa_name(k->isa), bad, worst);
}

/* ---------------------------------------------------------------- blocked GEMMs */

/* The process's GEMM entries (moe_sgemm: the avx2 level's transposes;
 * moe_gemm_bf16 below avx512_bf16: the widening) in blocks of C, with the
 * block cap lowered so that small matrices take several blocks along M and
 * N: against the double-sum twins, every transpose pair, beta 0 and 1,
 * leading dimensions past the matrix (fp32). */
static void blocked(void) {
    int64_t save = moe__scratch_block;
    moe__scratch_block = 64 * 40; /* blocks of 32 rows at K = 70 */
    int bad = 0, cases = 0;
    double worst = 0;
    for (int t = 0; t < 8; t++) {
        int ta = t & 1, tb = (t >> 1) & 1;
        float beta = (t >> 2) ? 1.0f : 0.0f;
        int64_t M = 100, N = 131, K = 70, lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
        float *A = malloc(4 * (size_t)((ta ? K : M) * lda)), *B = malloc(4 * (size_t)((tb ? N : K) * ldb));
        float *C = malloc(4 * (size_t)(M * ldc)), *R = malloc(4 * (size_t)(M * ldc)), *C0 = malloc(4 * (size_t)(M * ldc));
        uint16_t *Ah = malloc(2 * (size_t)(M * K)), *Bh = malloc(2 * (size_t)(K * N));
        float *Af = malloc(4 * (size_t)(M * K)), *Bf = malloc(4 * (size_t)(K * N));
        for (int64_t i = 0; i < (ta ? K : M) * lda; i++) A[i] = nrand();
        for (int64_t i = 0; i < (tb ? N : K) * ldb; i++) B[i] = nrand();
        for (int64_t i = 0; i < M * ldc; i++) C[i] = R[i] = C0[i] = nrand();
        moe_sgemm(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
        moe_sgemm_ref(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, R, ldc);
        for (int64_t i = 0; i < M * K; i++) Ah[i] = moe_f32_to_bf16(nrand()), Af[i] = moe_bf16_to_f32(Ah[i]);
        for (int64_t i = 0; i < K * N; i++) Bh[i] = moe_f32_to_bf16(nrand()), Bf[i] = moe_bf16_to_f32(Bh[i]);
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < ldc; j++) { /* fp32 against its twin; the padding untouched */
                /* the padding columns have no operands */
                double as = j < N ? absum(ta, tb, A, lda, B, ldb, i, j, K, (double)beta * C0[i * ldc + j]) : 0.0;
                double e = j < N ? fabs((double)C[i * ldc + j] - R[i * ldc + j]) / dot_bound(K, as) : 0.0;
                if (e > worst) worst = e;
                if (e > 1.0 || (j >= N && memcmp(&C[i * ldc + j], &C0[i * ldc + j], 4) != 0)) bad++;
            }
        float *D = malloc(4 * (size_t)(M * N)), *S = malloc(4 * (size_t)(M * N)), *D0 = malloc(4 * (size_t)(M * N));
        for (int64_t i = 0; i < M * N; i++) D[i] = S[i] = D0[i] = nrand();
        moe_gemm_bf16(ta, tb, M, N, K, Ah, Bh, beta, D);
        moe_gemm_bf16_ref(ta, tb, M, N, K, Ah, Bh, beta, S);
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) {
                double as = absum(ta, tb, Af, ta ? M : K, Bf, tb ? K : N, i, j, K, (double)beta * D0[i * N + j]);
                double e = fabs((double)D[i * N + j] - S[i * N + j]) / dot_bound(K, as);
                if (e > worst) worst = e;
                if (e > 1.0) bad++;
            }
        cases++;
        free(A), free(B), free(C), free(R), free(C0), free(Ah), free(Bh), free(Af), free(Bf), free(D), free(S), free(D0);
    }
    moe__scratch_block = save;
    printf("blocked GEMM entries at level %s (blocks of 32 rows): worst %.4f of the bound\n", moe_isa_name(moe_cpu_isa()),
           worst);
    CHECK(bad == 0 && cases == 8, "blocked GEMMs off their twins in %d elements (worst %.3f of the bound)", bad, worst);
}

/* ---------------------------------------------------------------- the level */

static void level_choice(void) {
    moe_isa cur = moe_cpu_isa(), best = moe_cpu_isa_max();
    printf("CPU: %s; features: %s\nkernel level: %s (best of this CPU: %s)\n", moe_cpu_model(), moe_cpu_features(),
           moe_isa_name(cur), moe_isa_name(best));
    CHECK(cur <= best || (cur == MOE_ISA_BASELINE), "level %s above the CPU's %s", moe_isa_name(cur),
          moe_isa_name(best));
    const char *cap = getenv("MOE_MAX_CPU_ISA");
    if (cap && *cap) {
        int want = -1;
        for (int i = 0; i < MOE_ISA_COUNT; i++)
            if (strcmp(cap, moe_isa_name((moe_isa)i)) == 0) want = i;
        if (want >= 0 && (moe_isa)want <= best)
            CHECK(cur == (moe_isa)want, "MOE_MAX_CPU_ISA=%s but the level is %s", cap, moe_isa_name(cur));
        if (want < 0) /* not a level: the lowest, and a note that says so */
            CHECK(cur == MOE_ISA_BASELINE && strstr(moe_cpu_notes(), "is not a level"),
                  "MOE_MAX_CPU_ISA=%s: level %s, notes \"%s\"", cap, moe_isa_name(cur), moe_cpu_notes());
#if defined(__x86_64__)
        /* oneDNN capped with it */
        dnnl_cpu_isa_t d = dnnl_get_effective_cpu_isa();
        /* oneDNN's ISA values are bit sets, each level holding the ones below */
#define HAS(x) ((d & (x)) == (x))
        int over = (cur == MOE_ISA_BASELINE && HAS(dnnl_cpu_isa_avx)) || (cur == MOE_ISA_AVX2 && HAS(dnnl_cpu_isa_avx512_core)) ||
                   (cur == MOE_ISA_AVX512 && HAS(dnnl_cpu_isa_avx512_core_bf16));
#undef HAS
        printf("oneDNN's effective ISA: 0x%x\n", (unsigned)d);
        if (getenv("ONEDNN_MAX_CPU_ISA")) /* the user's own oneDNN cap is kept, and said */
            CHECK(strstr(moe_cpu_notes(), "ONEDNN_MAX_CPU_ISA") != NULL, "ONEDNN_MAX_CPU_ISA kept without a note");
        else
            CHECK(!over, "oneDNN's ISA 0x%x is above the level %s", (unsigned)d, moe_isa_name(cur));
#endif
    }
    CHECK(moe_k() == moe__kernels_at(cur), "the process table is not the table of its level");
    CHECK(moe_isa_name(MOE_ISA_COUNT) == NULL && moe_isa_name((moe_isa)-1) == NULL, "moe_isa_name out of range");
}

int main(void) {
    level_choice();
    const moe_kernels *g = moe__kernels_at(MOE_ISA_BASELINE);
    CHECK(g != NULL, "no generic table");
    if (!g) return check_summary("test_kernels");
    int levels = 0;
    for (int i = 0; i < MOE_ISA_COUNT; i++) {
        const moe_kernels *k = moe__kernels_at((moe_isa)i);
        if (!k) continue;
        levels++;
        printf("level %s against generic\n", moe_isa_name(k->isa));
        CHECK(k->isa == (moe_isa)i, "table %d says level %d", i, (int)k->isa);
        conversions(g, k);
        elementwise(g, k);
        transposes(g, k);
        gemv(g, k);
        gemms(k);
        CHECK(k->softmax_rows == g->softmax_rows && k->topk_softmax == g->topk_softmax,
              "%s: the routing kernels must stay generic (libm's expf)", moe_isa_name(k->isa));
    }
    blocked();
    printf("%d levels tested against generic\nnotes: %s\n", levels, *moe_cpu_notes() ? moe_cpu_notes() : "none");
    CHECK(levels >= 1, "no level tested");
    return check_summary("test_kernels");
}
