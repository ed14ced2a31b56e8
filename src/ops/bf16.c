/*
 * bf16 mixed precision (PyTorch's autocast on the CPU with bfloat16): the
 * conversions and the bf16 x bf16 -> fp32 GEMM of the expert FFNs.
 *
 * bf16 is the upper half of an IEEE float32 (8 exponent bits, 7 mantissa
 * bits). moe_to_bf16 rounds to nearest even, as torch's .to(torch.bfloat16)
 * does; NaN stays a (quiet) NaN.
 *
 * The GEMM is a oneDNN matmul primitive with run-time dimensions (M, N, K
 * known only at execution): one primitive per (transpose A, transpose B,
 * beta 0 or 1), created once per process, so nothing is JIT-compiled per step
 * however the experts' row counts change. oneDNN picks its AVX512-BF16 kernels
 * (vdpbf16ps) where the CPU has them. Each call runs single-threaded on the
 * calling thread (the expert tasks are the parallelism), so its bits depend
 * only on the shape, never on the thread count.
 */
#include "ops.h"

#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <string.h>
#ifdef MOE_VALGRIND
#include <valgrind/valgrind.h>
#endif

uint16_t moe_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN: quiet, sign kept */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float moe_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 16 at a time with AVX-512, bit for bit moe_f32_to_bf16. Hand-written: the
 * conversion runs on every GEMM input of a bf16 step (gcc -O2 does not
 * vectorise the scalar form), and the CPU's own vcvtneps2bf16 flushes
 * denormals to zero, which torch's conversion does not. */
__attribute__((target("avx512f,avx512bw"))) static void to_bf16_avx512(uint16_t *dst, const float *src,
                                                                          int64_t n) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512((const void *)(src + i));
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, absm), inf);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_slli_epi32(quiet, 16)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    for (; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}

void moe_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        to_bf16_avx512(dst, src, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}

void moe_to_bf16_par(uint16_t *dst, const float *src, int64_t n) {
    enum { CHUNK = 1 << 16 };
    int64_t nc = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (nc > 1)
    for (int64_t c = 0; c < nc; c++) {
        int64_t a = c * CHUNK, m = n - a < CHUNK ? n - a : CHUNK;
        moe_to_bf16(dst + a, src + a, m);
    }
}

void moe_gemm_bf16_ref(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                       float beta, float *C) {
    /* The plain twin: each product exact in double (bf16 x bf16 fits), summed in double. */
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++)
                s += (double)moe_bf16_to_f32(ta ? A[k * M + i] : A[i * K + k]) *
                     (double)moe_bf16_to_f32(tb ? B[j * K + k] : B[k * N + j]);
            C[i * N + j] = (beta == 0.0f ? 0.0f : beta * C[i * N + j]) + (float)s;
        }
}

/* ---- oneDNN state: one engine, 8 primitives, made on first use ---- */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static dnnl_engine_t g_engine;
static dnnl_primitive_t g_prim[2][2][2]; /* [ta][tb][beta == 1] */
static int g_failed;                      /* oneDNN could not make one: use the twin */

static dnnl_primitive_t make_prim(int ta, int tb, int sum) {
    dnnl_dims_t rt = {DNNL_RUNTIME_DIM_VAL, DNNL_RUNTIME_DIM_VAL};
    dnnl_memory_desc_t a, b, c;
    dnnl_matmul_desc_t md;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t p = NULL;
    if (dnnl_memory_desc_init_by_tag(&a, 2, rt, dnnl_bf16, ta ? dnnl_ba : dnnl_ab) != dnnl_success ||
        dnnl_memory_desc_init_by_tag(&b, 2, rt, dnnl_bf16, tb ? dnnl_ba : dnnl_ab) != dnnl_success ||
        dnnl_memory_desc_init_by_tag(&c, 2, rt, dnnl_f32, dnnl_ab) != dnnl_success ||
        dnnl_matmul_desc_init(&md, &a, &b, NULL, &c) != dnnl_success || dnnl_primitive_attr_create(&attr) != dnnl_success)
        goto done;
    if (sum && (dnnl_post_ops_create(&po) != dnnl_success || dnnl_post_ops_append_sum(po, 1.0f) != dnnl_success ||
                dnnl_primitive_attr_set_post_ops(attr, po) != dnnl_success))
        goto done;
    if (dnnl_primitive_desc_create(&pd, &md, attr, g_engine, NULL) != dnnl_success) goto done;
    if (dnnl_primitive_create(&p, pd) != dnnl_success) p = NULL;
done:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return p;
}

/* The primitive for (ta, tb, sum), or NULL (then the twin runs). Made with
 * one thread in the OpenMP ICV, so oneDNN plans single-threaded runs. */
static dnnl_primitive_t prim_for(int ta, int tb, int sum) {
    pthread_mutex_lock(&g_lock);
    dnnl_primitive_t p = NULL;
    if (!g_failed) {
        if (!g_engine && dnnl_engine_create(&g_engine, dnnl_cpu, 0) != dnnl_success) g_engine = NULL;
        if (g_engine && !(p = g_prim[ta][tb][sum])) p = g_prim[ta][tb][sum] = make_prim(ta, tb, sum);
        if (!p) g_failed = 1;
    }
    pthread_mutex_unlock(&g_lock);
    return p;
}

static int run(dnnl_primitive_t p, int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A,
               const uint16_t *B, float *C) {
    dnnl_dims_t ad = {M, K}, bd = {K, N}, cd = {M, N};
    dnnl_memory_desc_t a, b, c;
    dnnl_memory_t ma = NULL, mb = NULL, mc = NULL;
    dnnl_stream_t s = NULL;
    int ok = dnnl_memory_desc_init_by_tag(&a, 2, ad, dnnl_bf16, ta ? dnnl_ba : dnnl_ab) == dnnl_success &&
             dnnl_memory_desc_init_by_tag(&b, 2, bd, dnnl_bf16, tb ? dnnl_ba : dnnl_ab) == dnnl_success &&
             dnnl_memory_desc_init_by_tag(&c, 2, cd, dnnl_f32, dnnl_ab) == dnnl_success &&
             dnnl_memory_create(&ma, &a, g_engine, (void *)A) == dnnl_success &&
             dnnl_memory_create(&mb, &b, g_engine, (void *)B) == dnnl_success &&
             dnnl_memory_create(&mc, &c, g_engine, C) == dnnl_success &&
             dnnl_stream_create(&s, g_engine, dnnl_stream_default_flags) == dnnl_success;
    if (ok) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}};
        ok = dnnl_primitive_execute(p, s, 3, args) == dnnl_success && dnnl_stream_wait(s) == dnnl_success;
    }
    if (s) dnnl_stream_destroy(s);
    if (ma) dnnl_memory_destroy(ma);
    if (mb) dnnl_memory_destroy(mb);
    if (mc) dnnl_memory_destroy(mc);
    return ok;
}

void moe_gemm_bf16(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                   float beta, float *C) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || (beta != 0.0f && beta != 1.0f)) { /* not a case the layers make: the twin */
        moe_gemm_bf16_ref(ta, tb, M, N, K, A, B, beta, C);
        return;
    }
#ifdef MOE_GEMM_PROBE /* sanitizer builds: touch every operand element here (see gemm.c) */
    for (int64_t i = 0; i < M * K; i++) (void)*(const volatile uint16_t *)&A[i];
    for (int64_t i = 0; i < K * N; i++) (void)*(const volatile uint16_t *)&B[i];
    for (int64_t i = 0; i < M * N; i++) {
        volatile float *c = &C[i];
        *c = *c;
    }
#endif
#ifdef _OPENMP
    int save = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    dnnl_primitive_t p = prim_for(ta, tb, beta == 1.0f);
#ifdef MOE_VALGRIND
    VALGRIND_DISABLE_ERROR_REPORTING; /* oneDNN's JIT loads past its own buffers: see gemm.c */
#endif
    int ok = p && run(p, ta, tb, M, N, K, A, B, C);
#ifdef MOE_VALGRIND
    VALGRIND_ENABLE_ERROR_REPORTING;
#endif
#ifdef _OPENMP
    omp_set_num_threads(save);
#endif
    /* oneDNN failed before writing (no primitive, no memory): the twin computes it */
    if (!ok) moe_gemm_bf16_ref(ta, tb, M, N, K, A, B, beta, C);
}

/* Decode (an expert with at most MOE_SMALL_ROWS rows): C (n,N) += A (n,K)
 * W^T, W (N,K) bf16 in nn.Linear's layout, A bf16. Hand-written for the same
 * reason as moe_sgemm_nt_small: a GEMM packs all of W first, reading it
 * twice, and in decode the experts' weights are the whole cost; here each
 * row of W is read once (half the bytes of fp32) and dotted with the n rows
 * of A, which stay in L1. vdpbf16ps sums bf16 pairs into 16 fp32 lanes.
 *
 * Four rows of W at a time, one accumulator each: four independent chains
 * hide the dot product's latency and share each load of A, and the four
 * horizontal sums are trees that run side by side (a serial 16-add sum per
 * row was a quarter of a one-token call's time). Every element of C is
 * summed the same way wherever its row falls (one chain over k, the lanes
 * by _mm512_reduce_add_ps's fixed tree, then the K % 32 tail in order), so
 * the result depends only on K, never on N, n or the thread count. */
__attribute__((target("avx512f,avx512bf16"))) static inline float dp_tail(float s, const uint16_t *a,
                                                                            const uint16_t *w, int64_t k0, int64_t K) {
    for (int64_t k = k0; k < K; k++) s += moe_bf16_to_f32(a[k]) * moe_bf16_to_f32(w[k]);
    return s;
}

__attribute__((target("avx512f,avx512bf16"))) static void nt_small_dp(float *C, int64_t ldc, const uint16_t *A,
                                                                        const uint16_t *W, int64_t n, int64_t N,
                                                                        int64_t K) {
    enum { L = 32, PF = 4 };
    int64_t K32 = K / L * L;
#define LD(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
    int64_t j = 0;
    for (; j + 4 <= N; j += 4) {
        const uint16_t *w0 = W + j * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        if (j + 4 + PF <= N) /* the rows PF ahead: more reads in flight than the stream prefetcher keeps */
            for (int64_t k = 0; k < 4 * K; k += 32) __builtin_prefetch(W + (j + PF) * K + k);
        for (int64_t r = 0; r < n; r++) {
            const uint16_t *a = A + r * K;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t k = 0; k < K32; k += L) {
                __m512bh av = LD(a + k);
                c0 = _mm512_dpbf16_ps(c0, av, LD(w0 + k));
                c1 = _mm512_dpbf16_ps(c1, av, LD(w1 + k));
                c2 = _mm512_dpbf16_ps(c2, av, LD(w2 + k));
                c3 = _mm512_dpbf16_ps(c3, av, LD(w3 + k));
            }
            float *c = C + r * ldc + j;
            c[0] += dp_tail(_mm512_reduce_add_ps(c0), a, w0, K32, K);
            c[1] += dp_tail(_mm512_reduce_add_ps(c1), a, w1, K32, K);
            c[2] += dp_tail(_mm512_reduce_add_ps(c2), a, w2, K32, K);
            c[3] += dp_tail(_mm512_reduce_add_ps(c3), a, w3, K32, K);
        }
    }
    for (; j < N; j++) { /* the last N % 4 rows: the same sum, one row at a time */
        const uint16_t *w0 = W + j * K;
        for (int64_t r = 0; r < n; r++) {
            const uint16_t *a = A + r * K;
            __m512 c0 = _mm512_setzero_ps();
            for (int64_t k = 0; k < K32; k += L) c0 = _mm512_dpbf16_ps(c0, LD(a + k), LD(w0 + k));
            C[r * ldc + j] += dp_tail(_mm512_reduce_add_ps(c0), a, w0, K32, K);
        }
    }
#undef LD
}

void moe_gemm_bf16_nt_small(float *C, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N, int64_t K) {
    if (n <= 0 || N <= 0) return;
    if (__builtin_cpu_supports("avx512bf16")) nt_small_dp(C, N, A, W, n, N, K);
    else moe_gemm_bf16(0, 1, n, N, K, A, W, 1.0f, C); /* without AVX512-BF16: oneDNN */
}
