/*
 * The arithmetic peak of the level this process runs at (moe_cpu_isa(), so
 * MOE_MAX_CPU_ISA lowers it with the library's kernels and oneDNN's), measured
 * in the same run as a benchmark (issue [engine]: ratios to the peak of each
 * precision): every thread runs a register-only loop of independent
 * accumulator chains, no memory traffic.
 *   x86-64  baseline     128-bit SSE mulps + addps: x86-64-v2 has no FMA, so a
 *                        mul+add pair counts 2 FLOP per lane (as one FMA would)
 *           avx2         256-bit FMA, 2 FLOP per lane
 *           avx512(_bf16) 512-bit FMA, 2 FLOP per lane
 *           bf16, avx512_bf16 only: vdpbf16ps, 32 bf16 products summed pairwise
 *                        into 16 fp32 lanes, 64 FLOP per instruction. Below
 *                        that level there is no native bf16 peak (the library
 *                        widens bf16 GEMMs to fp32: their peak is fp32's).
 *   arm64   both levels  128-bit NEON vfmaq_f32, 2 FLOP per lane (Advanced
 *                        SIMD is part of armv8-a: oneDNN's GEMMs use it at
 *                        libmoe's baseline too); no bf16 peak.
 * Each thread times its own loop (best of REPS): on a shared VM one preempted
 * thread would lower a figure timed over the whole team, and every share of
 * the peak would read too high. Both are reported: the sum over threads of
 * each thread's rate, and the team's (all FLOPs over the region's wall time).
 * Hand-written: a peak is a measurement of the CPU, no library offers it.
 * The wide kernels are compiled for their instruction set (target
 * attributes; this file is built for the baseline) and chosen at run time.
 */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHAINS 12         /* independent chains: more than latency x throughput of the units */
#define REPS 7            /* best of seven, per thread and for the team */
#define FLOP_PER_REP 4e9   /* per thread and rep at most: some 20-70 ms at these rates */
#define REP_SECONDS  0.04  /* a rep's length aimed at: far above the clock's grain */

/* One thread's loop: iters steps of CHAINS vector instructions (or pairs). */
typedef double (*peak_loop)(int64_t iters);

#if defined(__x86_64__)
/* acc = acc * a + b as two instructions: the baseline has no FMA */
static double sse_muladd(int64_t iters) {
    __m128 acc[CHAINS], a = _mm_set1_ps(1.0000001f), b = _mm_set1_ps(0.9999999f);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm_set1_ps((float)c);
    for (int64_t i = 0; i < iters; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm_add_ps(_mm_mul_ps(acc[c], a), b);
    float s = 0, t[4];
    for (int c = 0; c < CHAINS; c++) {
        _mm_storeu_ps(t, acc[c]);
        for (int k = 0; k < 4; k++) s += t[k];
    }
    return s;
}

__attribute__((target("avx2,fma"))) static double fma256(int64_t iters) {
    __m256 acc[CHAINS], a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c);
    for (int64_t i = 0; i < iters; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    float s = 0, t[8];
    for (int c = 0; c < CHAINS; c++) {
        _mm256_storeu_ps(t, acc[c]);
        for (int k = 0; k < 8; k++) s += t[k];
    }
    return s;
}

__attribute__((target("avx512f"))) static double fma512(int64_t iters) {
    __m512 acc[CHAINS], a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);
    for (int64_t i = 0; i < iters; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    float s = 0;
    for (int c = 0; c < CHAINS; c++) s += _mm512_reduce_add_ps(acc[c]);
    return s;
}

__attribute__((target("avx512f,avx512bf16"))) static double dpbf16(int64_t iters) {
    __m512 acc[CHAINS];
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80); /* 1.0 */
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);
    for (int64_t i = 0; i < iters; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    float s = 0;
    for (int c = 0; c < CHAINS; c++) s += _mm512_reduce_add_ps(acc[c]);
    return s;
}
#elif defined(__aarch64__)
static double neon_fma(int64_t iters) {
    float32x4_t acc[CHAINS], a = vdupq_n_f32(1.0000001f), b = vdupq_n_f32(0.9999999f);
    for (int c = 0; c < CHAINS; c++) acc[c] = vdupq_n_f32((float)c);
    for (int64_t i = 0; i < iters; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = vfmaq_f32(b, acc[c], a); /* b + acc * a */
    float s = 0;
    for (int c = 0; c < CHAINS; c++) s += vaddvq_f32(acc[c]);
    return s;
}
#endif

/* The loop for (level, precision), its FLOPs per iteration of one thread and
 * its name in words; 0 when the level has none. */
static int pick(moe_isa isa, int bf16, peak_loop *fn, double *per, const char **what) {
#if defined(__x86_64__)
    if (bf16) {
        if (isa != MOE_ISA_AVX512_BF16) return 0;
        *fn = dpbf16, *per = CHAINS * 64.0;
        *what = "512-bit vdpbf16ps, 64 FLOP per instruction";
    } else if (isa == MOE_ISA_AVX512 || isa == MOE_ISA_AVX512_BF16) {
        *fn = fma512, *per = CHAINS * 32.0, *what = "512-bit FMA, 2 FLOP per lane";
    } else if (isa == MOE_ISA_AVX2) {
        *fn = fma256, *per = CHAINS * 16.0, *what = "256-bit FMA, 2 FLOP per lane";
    } else {
        *fn = sse_muladd, *per = CHAINS * 8.0;
        *what = "128-bit SSE mulps+addps (no FMA in x86-64-v2): 2 FLOP per lane per mul+add pair";
    }
    return 1;
#elif defined(__aarch64__)
    (void)isa;
    if (bf16) return 0;
    *fn = neon_fma, *per = CHAINS * 8.0, *what = "128-bit NEON vfmaq_f32, 2 FLOP per lane";
    return 1;
#else
    (void)isa, (void)bf16, (void)fn, (void)per, (void)what;
    return 0;
#endif
}

int cli_peak_measure(cli_peak *p, int bf16, int threads) {
    p->thread_sum = p->team = 0.0, p->threads = 0, p->loop = "none";
    peak_loop fn;
    double per;
    if (threads < 1) threads = 1;
    if (!pick(moe_cpu_isa(), bf16, &fn, &per, &p->loop)) return 0;
    /* iterations for about REP_SECONDS a rep, from a timed calibration run:
     * a fixed FLOP count would take minutes where the loop is slow (under
     * an emulator such as qemu, or at the baseline level) */
    int64_t iters = 1024;
    for (;;) {
        double c0 = cli_now();
        volatile double s = fn(iters);
        double dt = cli_now() - c0;
        (void)s;
        if (dt >= REP_SECONDS / 8 || iters >= (int64_t)(FLOP_PER_REP / per)) {
            double want = (double)iters * REP_SECONDS / (dt > 1e-9 ? dt : 1e-9);
            iters = want < (double)iters ? iters : want > FLOP_PER_REP / per ? (int64_t)(FLOP_PER_REP / per) : (int64_t)want;
            break;
        }
        iters *= 4;
    }
    double *best = malloc((size_t)threads * sizeof *best); /* each thread's best seconds */
    if (!best) return 0;
    for (int i = 0; i < threads; i++) best[i] = INFINITY;
    volatile double sink = 0;
    int got = 1; /* the team OpenMP actually gave (it may give fewer than asked) */
    for (int rep = 0; rep < REPS; rep++) {
        double t0 = cli_now();
#pragma omp parallel num_threads(threads)
        {
            int id = 0;
#ifdef _OPENMP
            id = omp_get_thread_num();
#pragma omp single nowait
            got = omp_get_num_threads();
#endif
            double s0 = cli_now(), s = fn(iters), dt = cli_now() - s0;
            if (dt < best[id]) best[id] = dt; /* its own slot: no race */
#pragma omp atomic
            sink += s;
        }
        double g = per * (double)iters * got / (cli_now() - t0) * 1e-9;
        p->team = g > p->team ? g : p->team;
    }
    (void)sink;
    for (int i = 0; i < got; i++)
        if (best[i] > 0 && best[i] < INFINITY) p->thread_sum += per * (double)iters / best[i] * 1e-9;
    p->threads = got;
    free(best);
    return 1;
}

double cli_peak_gflops(int bf16, int threads) {
    cli_peak p;
    return cli_peak_measure(&p, bf16, threads) ? p.thread_sum : 0.0;
}
