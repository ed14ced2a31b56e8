/*
 * The machine's arithmetic peaks, measured in the same run as a benchmark
 * (issue [engine]: ratios to the peak of each precision): every thread runs
 * a register-only loop of independent accumulator chains, no memory traffic.
 *   fp32: FMA on 512-bit registers (AVX-512; 256-bit AVX2 without it), 2 FLOP
 *         per lane per instruction.
 *   bf16: vdpbf16ps (AVX512-BF16): 32 bf16 products summed pairwise into 16
 *         fp32 lanes, 64 FLOP per instruction; 0 without AVX512-BF16.
 * Hand-written: a peak is a measurement of the CPU, no library offers it.
 * Each kernel is compiled for its instruction set (target attributes) and
 * chosen at run time by the CPU's features.
 */
#include "cli.h"

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHAINS 12 /* independent chains: more than the FMA latency x throughput */

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

double cli_peak_gflops(int bf16, int threads) {
    __builtin_cpu_init();
    int w512 = __builtin_cpu_supports("avx512f"), has_bf16 = __builtin_cpu_supports("avx512bf16");
    if (bf16 && !(w512 && has_bf16)) return 0.0;
    if (!bf16 && !w512 && !__builtin_cpu_supports("fma")) return 0.0;
    /* FLOP per inner iteration of one thread */
    double per = bf16 ? CHAINS * 64.0 : CHAINS * (w512 ? 32.0 : 16.0);
    int64_t iters = 20000000; /* about 0.1-0.2 s per thread at these rates */
    volatile double sink = 0;
    double best = 0;
    for (int rep = 0; rep < 7; rep++) { /* the best of seven: a peak (a VM's neighbours dip single runs) */
        double t0 = cli_now();
#pragma omp parallel num_threads(threads)
        {
            double s = bf16 ? dpbf16(iters) : w512 ? fma512(iters) : fma256(iters);
#pragma omp atomic
            sink += s;
        }
        double t = cli_now() - t0, g = per * (double)iters * threads / t * 1e-9;
        best = g > best ? g : best;
    }
    (void)sink;
    return best;
}
