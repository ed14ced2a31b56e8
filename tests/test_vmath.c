/*
 * vmath.c: the vectorised exp and the silu / SwiGLU helpers built on it.
 *   1. the array functions (AVX-512 where the CPU has it) give the bits of
 *      their scalar twins: a strided sweep of all 2^32 float bit patterns,
 *      every float whose e^x is denormal or near overflow, the special
 *      values, and every length 0..40 at offsets 0..3 (the masked tails),
 *      in place too, with nothing written outside [0, n);
 *   2. accuracy against double-precision libm: e^x within 2 ulp over the
 *      sweep (the measured maximum is printed), the special cases exact;
 *      sigmoid, silu, silu' and the SwiGLU products within a few ulp of
 *      their formulas evaluated in double (below -88.72, where e^-x
 *      overflows, the formula's sigmoid and silu are 0, as with libm and
 *      in torch: checked as such).
 * Dimension key: n elements.
 */
#include "check.h"
#include "ops.h"

#include <float.h>
#include <stdlib.h>
#include <string.h>

/* every STRIDE-th of the 2^32 bit patterns (a prime, so every mantissa
 * position is hit); under valgrind (no AVX-512 there, so twin vs twin) a
 * coarser one */
#ifdef MOE_VALGRIND
#define STRIDE 65537u
#else
#define STRIDE 509u
#endif
#define BLOCK 4096

static float f_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t u_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* |y - ref| in units of the float ulp at ref (denormal spacing below
 * FLT_MIN); 0 when both round to the same infinity or both are NaN; 1e30
 * for a wrong infinity, zero or NaN. */
static double ulp_err(float y, double ref) {
    if (isnan(ref)) return isnan(y) ? 0.0 : 1e30;
    if (isnan(y)) return 1e30;
    float rf = (float)ref;
    if (isinf(rf) || isinf(y)) return y == rf ? 0.0 : 1e30;
    double a = fabs(ref);
    int e = a < FLT_MIN ? -126 : ilogb(a);
    return fabs((double)y - ref) / ldexp(1.0, e - 23);
}

/* ------------------------------------------------------------ 1 + 2: exp */

static const char *g_level; /* the kernel level the array functions run at */

static void exp_sweep(void) {
    static float x[BLOCK], y[BLOCK], s[BLOCK];
    int64_t n = 0, mism = 0, first_mism = -1;
    double worst = 0;
    float worst_x = 0;
    for (uint64_t u = 0; u < (1ull << 32);) {
        int k = 0;
        for (; k < BLOCK && u < (1ull << 32); k++, u += STRIDE) x[k] = f_of((uint32_t)u);
        moe_vexpf(y, x, k);
        for (int i = 0; i < k; i++) {
            float t = moe_expf(x[i]);
            if (u_of(t) != u_of(y[i]) && mism++ == 0) first_mism = (int64_t)u_of(x[i]);
            double e = ulp_err(t, exp((double)x[i]));
            if (e > worst) worst = e, worst_x = x[i];
        }
        /* sigmoid, silu, silu' over the same inputs, vector against twin */
        moe_vsilu(s, x, k);
        for (int i = 0; i < k; i++)
            if (u_of(s[i]) != u_of(moe_siluf(x[i])) && mism++ == 0) first_mism = (int64_t)u_of(x[i]);
        for (int i = 0; i < k; i++) s[i] = 1.0f;
        moe_vsilu_backward(s, s, x, k);
        for (int i = 0; i < k; i++)
            if (u_of(s[i]) != u_of(moe_silu_gradf(x[i])) && mism++ == 0) first_mism = (int64_t)u_of(x[i]);
        n += k;
    }
    printf("strided sweep (every %uth bit pattern, %lld floats, level %s vs scalar twin): exp max error %.3f ulp (at x = %.9g)\n", STRIDE,
           (long long)n, g_level, worst,
           (double)worst_x);
    CHECK(mism == 0, "%lld vector results differ from the scalar twin (first at x bits 0x%08llx)", (long long)mism,
          (long long)first_mism);
    CHECK(worst <= 2.0, "exp error %.3f ulp at x = %.9g (want <= 2)", worst, (double)worst_x);
}

/* Every float in [lo, hi] (same sign) with e^x in the denormal range or near
 * overflow: vector against twin, and accuracy. */
static void exp_range(float lo, float hi, const char *what) {
    static float x[BLOCK], y[BLOCK];
    uint32_t a = u_of(lo), b = u_of(hi);
    if (a > b) {
        uint32_t t = a;
        a = b, b = t;
    }
    int64_t n = 0, mism = 0;
    double worst = 0;
    float worst_x = 0;
    for (uint64_t u = a; u <= b;) {
        int k = 0;
        for (; k < BLOCK && u <= b; k++, u++) x[k] = f_of((uint32_t)u);
        moe_vexpf(y, x, k);
        for (int i = 0; i < k; i++) {
            float t = moe_expf(x[i]);
            mism += u_of(t) != u_of(y[i]);
            double e = ulp_err(t, exp((double)x[i]));
            if (e > worst) worst = e, worst_x = x[i];
        }
        n += k;
    }
    printf("%s: every float in [%.9g, %.9g] (%lld): exp max error %.3f ulp\n", what, (double)lo, (double)hi,
           (long long)n, worst);
    CHECK(mism == 0, "%s: %lld vector results differ from the scalar twin", what, (long long)mism);
    CHECK(worst <= 2.0, "%s: exp error %.3f ulp at x = %.9g", what, worst, (double)worst_x);
}

static void exp_specials(void) {
    const uint32_t bits[] = {
        0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, /* +-0, +-inf */
        0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fc0beefu, /* NaNs: quiet, negative, signalling, payload */
        0x00000001u, 0x007fffffu, 0x80000001u, 0x807fffffu, /* denormals */
        0x00800000u, 0x3f800000u, 0xbf800000u, 0x3f317218u, /* FLT_MIN, 1, -1, ln2 */
        0x42b17216u, 0x42b17217u, 0x42b17218u, 0x42b17219u, /* ln(FLT_MAX) = 88.7228391: last finite, first inf */
        0x42b20000u, 0x42b00000u, 0x7f7fffffu, 0xff7fffffu, /* 89, 88, +-FLT_MAX */
        0xc2aeac4fu, 0xc2aeac50u, 0xc2aeac51u,              /* ln(FLT_MIN) = -87.3365447: around the normal edge */
        0xc2cff1b3u, 0xc2cff1b4u, 0xc2cff1b5u, 0xc2cff1b6u, /* -150 ln2 = -103.9720771: last 2^-149, first 0 */
        0xc2d00000u, 0xc2ce0000u, 0x42c80000u, 0xc2c80000u, /* -104, -103, +-100 */
        0x3effffffu, 0x3f000000u, 0xbeb17218u, 0x3eb17218u, /* 0.5-, 0.5, +-ln2/2 (reduction edges) */
    };
    enum { NS = sizeof bits / sizeof bits[0] };
    float x[NS], y[NS];
    for (int i = 0; i < NS; i++) x[i] = f_of(bits[i]);
    moe_vexpf(y, x, NS);
    int mism = 0;
    double worst = 0;
    for (int i = 0; i < NS; i++) {
        float t = moe_expf(x[i]);
        if (u_of(t) != u_of(y[i])) {
            mism++;
            fprintf(stderr, "  x bits 0x%08x: vector 0x%08x, twin 0x%08x\n", bits[i], u_of(y[i]), u_of(t));
        }
        double e = ulp_err(t, exp((double)x[i]));
        worst = e > worst ? e : worst;
    }
    CHECK(mism == 0, "%d special values: vector differs from the twin", mism);
    CHECK(worst <= 2.0, "special values: error %.3f ulp", worst);
    /* the exact ones */
    CHECK(u_of(moe_expf(0.0f)) == 0x3f800000u && u_of(moe_expf(-0.0f)) == 0x3f800000u, "e^+-0 = %g, %g",
          moe_expf(0.0f), moe_expf(-0.0f));
    CHECK(moe_expf(f_of(0x00000001u)) == 1.0f && moe_expf(f_of(0x807fffffu)) == 1.0f, "e^denormal = 1");
    CHECK(u_of(moe_expf(INFINITY)) == 0x7f800000u, "e^inf = %g", moe_expf(INFINITY));
    CHECK(u_of(moe_expf(-INFINITY)) == 0u, "e^-inf = %g (want +0)", moe_expf(-INFINITY));
    CHECK(isnan(moe_expf(NAN)) && isnan(moe_expf(-NAN)) && isnan(moe_expf(f_of(0x7f800001u))), "e^NaN is NaN");
    CHECK(u_of(moe_expf(f_of(0x7fc0beefu))) == 0x7fc0beefu, "e^NaN keeps the payload: 0x%08x",
          u_of(moe_expf(f_of(0x7fc0beefu))));
    CHECK(isinf(moe_expf(f_of(0x42b17218u))) && isinf(moe_expf(FLT_MAX)) && isinf(moe_expf(89.0f)),
          "overflow above ln(FLT_MAX) = 88.7228391");
    CHECK(isfinite(moe_expf(f_of(0x42b17217u))) && moe_expf(f_of(0x42b17217u)) > 3.4e38f,
          "e^88.7228317 = %g, finite", moe_expf(f_of(0x42b17217u)));
    CHECK(u_of(moe_expf(f_of(0xc2cff1b4u))) == 1u, "e^-103.9720764 = 2^-149: bits 0x%08x",
          u_of(moe_expf(f_of(0xc2cff1b4u))));
    CHECK(u_of(moe_expf(f_of(0xc2cff1b5u))) == 0u && u_of(moe_expf(-104.0f)) == 0u &&
              u_of(moe_expf(-FLT_MAX)) == 0u,
          "below -150 ln2 the result is +0");
    CHECK(moe_expf(1.0f) == (float)exp(1.0) || moe_expf(1.0f) == nextafterf((float)exp(1.0), 0.0f) ||
              moe_expf(1.0f) == nextafterf((float)exp(1.0), 10.0f),
          "e^1 = %.9g", (double)moe_expf(1.0f));
}

/* --------------------------------------------------- lengths, offsets, tails */

static unsigned long long g_rng = 99;

enum { CAP = 64, GUARD = 0x7fbadbadu };

static int guards_ok(const float *buf, int off, int len) {
    for (int i = 0; i < CAP; i++)
        if ((i < off || i >= off + len) && u_of(buf[i]) != GUARD) return 0;
    return 1;
}

static void tails(void) {
    float x[CAP], a[CAP], d[CAP], y[CAP], z[CAP], w[CAP], v[CAP];
    int bad_bits = 0, bad_guard = 0, bad_alias = 0;
    for (int i = 0; i < CAP; i++) {
        x[i] = 8.0f * check_nrand(&g_rng), a[i] = check_nrand(&g_rng), d[i] = check_nrand(&g_rng);
        if (i % 11 == 5) x[i] = (i % 3 == 0) ? -INFINITY : (i % 3 == 1) ? NAN : 95.0f;
    }
    const float c = 1.25f;
    for (int len = 0; len <= 40; len++)
        for (int off = 0; off < 4; off++) {
            const float *xo = x + off, *ao = a + off, *dd = d + off;
            for (int f = 0; f < 6; f++) {
                for (int i = 0; i < CAP; i++) y[i] = z[i] = f_of(GUARD);
                float *yo = y + off, *zo = z + off;
                switch (f) {
                case 0: moe_vexpf(yo, xo, len); break;
                case 1: moe_vexpf_sub(yo, xo, c, len); break;
                case 2: moe_vsilu(yo, xo, len); break;
                case 3: moe_vsilu_backward(yo, dd, xo, len); break;
                case 4: moe_vswiglu(yo, ao, xo, len); break;
                case 5: moe_vswiglu_backward(yo, zo, dd, ao, xo, len); break;
                }
                for (int i = 0; i < len; i++) {
                    float t = 0, t2 = 0;
                    switch (f) {
                    case 0: t = moe_expf(xo[i]); break;
                    case 1: t = moe_expf(xo[i] - c); break;
                    case 2: t = moe_siluf(xo[i]); break;
                    case 3: t = dd[i] * moe_silu_gradf(xo[i]); break;
                    case 4: t = ao[i] * moe_siluf(xo[i]); break;
                    case 5: t = dd[i] * moe_siluf(xo[i]), t2 = (dd[i] * ao[i]) * moe_silu_gradf(xo[i]); break;
                    }
                    /* the silu helpers' NaN results are the one NaN 0x7fc00000 */
                    uint32_t want = f >= 2 && isnan(t) ? 0x7fc00000u : u_of(t);
                    uint32_t want2 = isnan(t2) ? 0x7fc00000u : u_of(t2);
                    bad_bits += u_of(yo[i]) != want || (f == 5 && u_of(zo[i]) != want2);
                }
                bad_guard += !guards_ok(y, off, len) || (f == 5 && !guards_ok(z, off, len));
                /* in place (output == an input) gives the same bits: w a copy
                 * of x, v of d */
                memcpy(w, x, sizeof w);
                memcpy(v, d, sizeof v);
                float *wo = w + off, *vo = v + off;
                switch (f) {
                case 0: moe_vexpf(wo, wo, len); break;
                case 1: moe_vexpf_sub(wo, wo, c, len); break;
                case 2: moe_vsilu(wo, wo, len); break;
                case 3: moe_vsilu_backward(vo, vo, xo, len); break; /* dx == dy */
                case 4: moe_vswiglu(wo, ao, wo, len); break;         /* o == g */
                case 5: moe_vswiglu_backward(vo, wo, vo, ao, wo, len); break; /* da == d, dg == g */
                }
                for (int i = 0; i < len; i++) {
                    bad_alias += u_of((f == 3 || f == 5) ? vo[i] : wo[i]) != u_of(yo[i]);
                    bad_alias += f == 5 && u_of(wo[i]) != u_of(zo[i]);
                }
            }
        }
    CHECK(bad_bits == 0, "%d array results (lengths 0..40, offsets 0..3) differ from the twins", bad_bits);
    CHECK(bad_guard == 0, "%d calls wrote outside [0, n)", bad_guard);
    CHECK(bad_alias == 0, "%d in-place results differ", bad_alias);
}

/* --------------------------------------------------- the helpers' accuracy */

static double sig_d(double x) { return 1.0 / (1.0 + exp(-x)); }

static void helpers(void) {
    double w_sig = 0, w_silu = 0, w_grad = 0, w_fwd = 0, w_da = 0, w_dg = 0;
    int64_t bad = 0;
    enum { N = 200000 };
    float *g = malloc(N * sizeof *g), *a = malloc(N * sizeof *a), *d = malloc(N * sizeof *d);
    float *o = malloc(N * sizeof *o), *da = malloc(N * sizeof *da), *dg = malloc(N * sizeof *dg);
    for (int i = 0; i < N; i++) {
        /* |g| up to ~100 (sigmoid saturates, silu' crosses 0 near -1.28) */
        g[i] = (i % 4 == 0) ? 30.0f * check_nrand(&g_rng) : 3.0f * check_nrand(&g_rng);
        a[i] = check_nrand(&g_rng), d[i] = check_nrand(&g_rng);
    }
    moe_vswiglu(o, a, g, N);
    moe_vswiglu_backward(da, dg, d, a, g, N);
    int64_t flushed = 0;
    for (int i = 0; i < N; i++) {
        double x = g[i], s = sig_d(x), sl = x * s, gr = s * (1.0 + x * (1.0 - s));
        if (g[i] < -88.7228394f) { /* e^-x = inf: 1 / (1 + inf) = 0 */
            bad += moe_sigmoidf(g[i]) != 0.0f || moe_siluf(g[i]) != 0.0f || moe_silu_gradf(g[i]) != 0.0f ||
                   o[i] != 0.0f || da[i] != 0.0f || dg[i] != 0.0f;
            flushed++;
            continue;
        }
        double e_sig = ulp_err(moe_sigmoidf(g[i]), s), e_silu = ulp_err(moe_siluf(g[i]), sl);
        /* silu' = s (1 + x (1 - s)) cancels near its zero (x ~ -1.28) and
         * 1 - s loses s's own error times |x| for large x: measure against
         * the size of the terms, in ulps of 2^-23 s (1 + |x|) */
        double scale = fmax(ldexp(1.0, ilogb(fmax(fabs(gr), FLT_MIN)) - 23), ldexp(s * (1.0 + fabs(x)), -23));
        double e_grad = fabs((double)moe_silu_gradf(g[i]) - gr) / scale;
        double e_fwd = ulp_err(o[i], (double)a[i] * sl), e_da = ulp_err(da[i], (double)d[i] * sl);
        double e_dg = fabs((double)dg[i] - (double)d[i] * a[i] * gr) / (scale * fabs((double)d[i] * a[i]) + 1e-300);
        bad += e_sig > 3 || e_silu > 4 || e_grad > 4 || e_fwd > 5 || e_da > 5 || e_dg > 5;
        w_sig = fmax(w_sig, e_sig), w_silu = fmax(w_silu, e_silu), w_grad = fmax(w_grad, e_grad);
        w_fwd = fmax(w_fwd, e_fwd), w_da = fmax(w_da, e_da), w_dg = fmax(w_dg, e_dg);
    }
    printf("helpers vs double formulas (%d inputs, %lld below -88.72), max error in ulp: sigmoid %.2f, silu %.2f, "
           "silu' %.2f (of its terms), swiglu %.2f, d/da %.2f, d/dg %.2f (of its terms)\n",
           N, (long long)flushed, w_sig, w_silu, w_grad, w_fwd, w_da, w_dg);
    CHECK(bad == 0, "%lld helper results off (sigmoid <= 3, silu <= 4, silu' <= 4, swiglu <= 5 ulp)", (long long)bad);
    CHECK(moe_sigmoidf(0.0f) == 0.5f && moe_sigmoidf(200.0f) == 1.0f && moe_sigmoidf(-200.0f) == 0.0f,
          "sigmoid(0, 200, -200) = %g %g %g", moe_sigmoidf(0.0f), moe_sigmoidf(200.0f), moe_sigmoidf(-200.0f));
    CHECK(moe_siluf(0.0f) == 0.0f && moe_siluf(200.0f) == 200.0f && moe_siluf(-200.0f) == 0.0f &&
              moe_silu_gradf(0.0f) == 0.5f && moe_silu_gradf(200.0f) == 1.0f && moe_silu_gradf(-200.0f) == 0.0f,
          "silu and silu' at 0 and +-200");
    CHECK(isnan(moe_siluf(NAN)) && isnan(moe_silu_gradf(NAN)), "silu(NaN) and silu'(NaN) are NaN");
    free(g), free(a), free(d), free(o), free(da), free(dg);
}

int main(void) {
    g_level = moe_isa_name(moe_cpu_isa());
    printf("array functions at kernel level %s (MOE_MAX_CPU_ISA caps it; baseline: the scalar twins)\n", g_level);
    exp_specials();
    exp_sweep();
    exp_range(-104.0f, -87.0f, "denormal and smallest normal results");
    exp_range(88.0f, 89.0f, "largest results and overflow");
    tails();
    helpers();
    return check_summary("test_vmath");
}
