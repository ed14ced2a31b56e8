/*
 * The GEMM entries of the kernel table, through oneDNN.
 *
 * Why oneDNN: it picks its own kernels by the CPU's features at run time
 * (capped with libmoe's level: kernels.c calls dnnl_set_max_cpu_isa), and
 * the same library gives the native bf16 matmul. One provider: OpenBLAS is
 * not linked.
 *
 * sgemm1: one single-threaded dnnl_sgemm. oneDNN (OpenMP build) would
 * otherwise size its own team from omp_get_max_threads(), and its split of
 * K and of the tiles depends on that count, so the last bits would depend on
 * the thread count. omp_set_num_threads(1) sets only the calling task's ICV;
 * it is restored after.
 *
 * gemm_bf16, two ways:
 *   native (avx512_bf16 level): a oneDNN matmul primitive with run-time
 *     dimensions (M, N, K known only at execution), one per (transpose A,
 *     transpose B, beta 0 or 1), created once per process, so nothing is
 *     JIT-compiled per step however the experts' row counts change; it runs
 *     vdpbf16ps. Each call is single-threaded on the calling thread (the
 *     expert tasks are the parallelism): its bits depend only on the shape.
 *   widened (every other level; oneDNN 2.6 has no bf16 matmul below
 *     AVX-512, and on AVX-512 without bf16 dot products its emulation is
 *     slower than fp32): both operands widened to fp32 (exact) into the
 *     thread's scratch and run as fp32 (moe_sgemm: the same threading and
 *     shape-only tiling), fp32 sums: the numbers of vdpbf16ps up to the
 *     order of the sums. The widening costs (M K + K N) conversions beside
 *     2 M N K FLOPs.
 * Either returns 0 when it could not run (nothing written); ops/bf16.c then
 * tries the other and, last, the plain twin, and says so (moe_cpu_notes).
 * Dimension key: M rows, N cols, K inner.
 */
#include "../core/cpu.h"
#include "../ops/ops.h"
#include "kernels.h"

#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdlib.h>
#ifdef MOE_VALGRIND
#include <valgrind/valgrind.h>
#endif

/* Sanitizer and valgrind builds (Makefile): ASan does not see inside oneDNN,
 * so every element a GEMM reads or writes is touched here first, in
 * instrumented code: a short or misaligned buffer passed by libmoe is
 * reported at this line. */
#ifdef MOE_GEMM_PROBE
#define PROBE_READ(p) (void)*(const volatile __typeof__(*(p)) *)(p)
#define PROBE_WRITE(p)                                                                                              \
    do {                                                                                                            \
        volatile float *c_ = (p);                                                                                   \
        *c_ = *c_;                                                                                                  \
    } while (0)
#endif

/* oneDNN's JIT kernels load whole vectors past the end of oneDNN's own
 * packing buffers (its allocation, not ours; the extra lanes are unused).
 * Memcheck cannot tell, so its reports are off during the call; the probe
 * has checked libmoe's arguments. */
#ifdef MOE_VALGRIND
#define QUIET_BEGIN VALGRIND_DISABLE_ERROR_REPORTING
#define QUIET_END VALGRIND_ENABLE_ERROR_REPORTING
#else
#define QUIET_BEGIN
#define QUIET_END
#endif

/* One thread in the OpenMP ICV for the duration of a oneDNN call. */
#ifdef _OPENMP
#define ONE_THREAD_BEGIN                                                                                            \
    int save_ = omp_get_max_threads();                                                                              \
    omp_set_num_threads(1)
#define ONE_THREAD_END omp_set_num_threads(save_)
#else
#define ONE_THREAD_BEGIN
#define ONE_THREAD_END
#endif

static int sgemm1(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
#ifdef MOE_GEMM_PROBE
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) PROBE_READ(ta ? &A[k * lda + i] : &A[i * lda + k]);
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < N; j++) PROBE_READ(tb ? &B[j * ldb + k] : &B[k * ldb + j]);
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) PROBE_WRITE(&C[i * ldc + j]);
#endif
    ONE_THREAD_BEGIN;
    QUIET_BEGIN;
    dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    QUIET_END;
    ONE_THREAD_END;
    if (st != dnnl_success)
        moe__cpu_note("oneDNN's sgemm failed (status %d) on a %lld x %lld x %lld GEMM: it ran the plain reference "
                      "loop (slow)", (int)st, (long long)M, (long long)N, (long long)K);
    return st == dnnl_success;
}

/* ---------------------------------------------------------------- bf16, native */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static dnnl_engine_t g_engine;
static dnnl_primitive_t g_prim[2][2][2]; /* [ta][tb][beta == 1] */
static int g_failed;                      /* oneDNN could not make one: widen instead */

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

/* The primitive for (ta, tb, sum), or NULL (then the widened path runs).
 * Made with one thread in the OpenMP ICV, so oneDNN plans single-threaded runs. */
static dnnl_primitive_t prim_for(int ta, int tb, int sum) {
    pthread_mutex_lock(&g_lock);
    dnnl_primitive_t p = NULL;
    if (!g_failed) {
        if (!g_engine && dnnl_engine_create(&g_engine, dnnl_cpu, 0) != dnnl_success) g_engine = NULL;
        if (g_engine && !(p = g_prim[ta][tb][sum])) p = g_prim[ta][tb][sum] = make_prim(ta, tb, sum);
        if (!p) {
            g_failed = 1;
            moe__cpu_note("oneDNN cannot make a bf16 matmul on this CPU: bf16 GEMMs are widened to fp32 (exact) "
                          "and run as fp32");
        }
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

static int gemm_bf16_native(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                            float beta, float *C) {
    ONE_THREAD_BEGIN;
    dnnl_primitive_t p = prim_for(ta, tb, beta == 1.0f);
    QUIET_BEGIN;
    int ok = p && run(p, ta, tb, M, N, K, A, B, C);
    QUIET_END;
    ONE_THREAD_END;
    if (p && !ok)
        moe__cpu_note("oneDNN's bf16 matmul failed on a %lld x %lld x %lld GEMM: it ran widened to fp32",
                      (long long)M, (long long)N, (long long)K);
    return ok;
}

/* ---------------------------------------------------------------- bf16, widened */

/* Each thread's scratch (kernels.h, moe__kernel_scratch): grown as needed,
 * kept for the next call, freed when the thread exits. Hand-managed, not
 * moe_alloc: it is allocated inside the expert tasks, where the library's
 * allocation counting for fault injection does not run. */
typedef struct {
    float *p[MOE_SCRATCH_SLOTS];
    size_t cap[MOE_SCRATCH_SLOTS];
} thread_scratch;
static _Thread_local thread_scratch *t_scratch;
static pthread_key_t g_key;
static pthread_once_t g_key_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    thread_scratch *s = v;
    for (int i = 0; i < MOE_SCRATCH_SLOTS; i++) free(s->p[i]);
    free(s);
    t_scratch = NULL; /* this thread's (key destructors run on the exiting thread) */
}
static void key_make(void) { (void)pthread_key_create(&g_key, scratch_free); }

float *moe__kernel_scratch(int slot, size_t n) {
    if (!t_scratch) {
        pthread_once(&g_key_once, key_make);
        if (!(t_scratch = calloc(1, sizeof *t_scratch))) return NULL;
        (void)pthread_setspecific(g_key, t_scratch); /* freed at the thread's exit */
    }
    thread_scratch *s = t_scratch;
    if (n <= s->cap[slot]) return s->p[slot];
    size_t want = n + n / 4, bytes;
    void *p = NULL;
    if (!moe_mul_size(&bytes, want, sizeof(float)) || posix_memalign(&p, 64, bytes) != 0) return NULL;
    free(s->p[slot]);
    s->p[slot] = p, s->cap[slot] = want;
    return p;
}

int moe__gemm_bf16_widen(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                         float beta, float *C) {
    /* in blocks of C (kernels.h: MOE_SCRATCH_BLOCK floats per widened operand) */
    int64_t Mb = moe__gemm_block(M, K), Nb = moe__gemm_block(N, K);
    float *wa = moe__kernel_scratch(MOE_SCRATCH_WIDE_A, (size_t)(Mb * K));
    float *wb = moe__kernel_scratch(MOE_SCRATCH_WIDE_B, (size_t)(Nb * K));
    if (!wa || !wb) {
        moe__cpu_note("cannot allocate the scratch to widen a bf16 GEMM of %lld x %lld x %lld to fp32: it ran the "
                      "plain reference loop (slow)", (long long)M, (long long)N, (long long)K);
        return 0;
    }
    const moe_kernels *k = moe_k();
    for (int64_t j0 = 0; j0 < N; j0 += Nb) {
        int64_t nb = N - j0 < Nb ? N - j0 : Nb;
        /* op(B)'s columns j0..j0+nb: rows of B (N,K) when tb, else columns of B (K,N) */
        if (tb) k->bf16_to_f32(wb, B + j0 * K, nb * K);
        else
            for (int64_t q = 0; q < K; q++) k->bf16_to_f32(wb + q * nb, B + q * N + j0, nb);
        for (int64_t i0 = 0; i0 < M; i0 += Mb) {
            int64_t mb = M - i0 < Mb ? M - i0 : Mb;
            /* op(A)'s rows i0..i0+mb: columns of A (K,M) when ta, else rows of A (M,K) */
            if (ta)
                for (int64_t q = 0; q < K; q++) k->bf16_to_f32(wa + q * mb, A + q * M + i0, mb);
            else k->bf16_to_f32(wa, A + i0 * K, mb * K);
            /* moe_sgemm: tiles by shape over the threads outside a task, one call inside */
            moe_sgemm(ta, tb, mb, nb, K, 1.0f, wa, ta ? mb : K, wb, tb ? K : nb, beta, C + i0 * N + j0, N);
        }
    }
    return 1;
}

/* Whether oneDNN itself may run bf16 dot products: its effective ISA (which
 * ONEDNN_MAX_CPU_ISA or the cap below may have lowered) holds AVX512-BF16.
 * Asked once, after the cap. */
static int onednn_bf16(void) {
#if defined(__x86_64__)
    dnnl_cpu_isa_t eff = dnnl_get_effective_cpu_isa();
    return ((unsigned)eff & (unsigned)dnnl_cpu_isa_avx512_core_bf16) == (unsigned)dnnl_cpu_isa_avx512_core_bf16;
#else
    return 0;
#endif
}

void moe__kernels_fill_onednn(moe_kernels *k) {
    k->sgemm1 = sgemm1;
    k->sgemm_prefers_nt = k->isa == MOE_ISA_AVX2;
    int native = k->isa == MOE_ISA_AVX512_BF16;
    if (native && !onednn_bf16()) {
        native = 0;
        moe__cpu_note("oneDNN's ISA is capped below avx512_core_bf16 (ONEDNN_MAX_CPU_ISA=%s): bf16 GEMMs are "
                      "widened to fp32 (oneDNN's emulated bf16 matmul is slower)",
                      getenv("ONEDNN_MAX_CPU_ISA") ? getenv("ONEDNN_MAX_CPU_ISA") : "?");
    }
    k->gemm_bf16 = native ? gemm_bf16_native : moe__gemm_bf16_widen;
}

/* ---------------------------------------------------------------- the cap */

void moe__onednn_cap(moe_isa isa) {
#if defined(__x86_64__)
    /* oneDNN's own cap, if the user set one, is kept: dnnl_set_max_cpu_isa
     * before oneDNN's first use would override ONEDNN_MAX_CPU_ISA, and could
     * raise it */
    const char *own = getenv("ONEDNN_MAX_CPU_ISA");
    if (own && *own) {
        moe__cpu_note("ONEDNN_MAX_CPU_ISA=%.32s is set: oneDNN keeps that cap; MOE_MAX_CPU_ISA=%s caps libmoe's "
                      "kernels", own, moe_isa_name(isa));
        return;
    }
    dnnl_cpu_isa_t d = isa == MOE_ISA_BASELINE ? dnnl_cpu_isa_sse41
                     : isa == MOE_ISA_AVX2     ? dnnl_cpu_isa_avx2
                     : isa == MOE_ISA_AVX512   ? dnnl_cpu_isa_avx512_core
                                               : dnnl_cpu_isa_avx512_core_bf16;
    dnnl_status_t st = dnnl_set_max_cpu_isa(d);
    if (st != dnnl_success)
        moe__cpu_note("MOE_MAX_CPU_ISA=%s: oneDNN's ISA could not be capped (status %d: oneDNN ran before libmoe's "
                      "first kernel; call moe_cpu_isa() first): its GEMMs may use more than %s", moe_isa_name(isa),
                      (int)st, moe_isa_name(isa));
#else
    moe__cpu_note("MOE_MAX_CPU_ISA=%s caps libmoe's kernels; oneDNN's own ISA is not capped on this architecture",
                  moe_isa_name(isa));
#endif
}
