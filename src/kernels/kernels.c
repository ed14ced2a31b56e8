/*
 * The kernel table of the process: made once, at the first call that needs
 * a kernel, for moe_cpu_isa() (cpu.c: the CPU's best level, capped by
 * MOE_MAX_CPU_ISA), which also caps oneDNN's ISA before its first use.
 * A level's table is the generic one with each folder up to that level laid
 * over it, then the GEMM entries (onednn.c).
 */
#include "../core/cpu.h"
#include "kernels.h"

#include <pthread.h>

void moe__onednn_cap(moe_isa isa);

const moe_kernels *volatile moe__kt;
static moe_kernels g_tables[MOE_ISA_COUNT];
static int g_have[MOE_ISA_COUNT];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* A level this build has kernels for, at or below the level in use (under
 * MOE_MAX_CPU_ISA the levels above the cap are not made: oneDNN is capped too). */
static int runnable(moe_isa isa) {
    moe_isa cur = moe__cpu_level();
#if defined(__x86_64__)
    return isa <= MOE_ISA_AVX512_BF16 && isa <= cur;
#elif defined(__aarch64__)
    return isa == MOE_ISA_BASELINE || (isa == MOE_ISA_NEON && cur == MOE_ISA_NEON);
#else
    (void)cur;
    return isa == MOE_ISA_BASELINE;
#endif
}

static void build(moe_kernels *k, moe_isa isa) {
    k->isa = isa;
    moe__kernels_fill_generic(k);
#if defined(__x86_64__)
    if (isa >= MOE_ISA_AVX2) moe__kernels_fill_avx2(k);
    if (isa >= MOE_ISA_AVX512) moe__kernels_fill_avx512(k);
    if (isa >= MOE_ISA_AVX512_BF16) moe__kernels_fill_avx512bf16(k);
#elif defined(__aarch64__)
    if (isa == MOE_ISA_NEON) moe__kernels_fill_neon(k);
#endif
    moe__kernels_fill_onednn(k);
}

static void init(void) {
    moe_isa isa = moe__cpu_level();
    if (moe__cpu_capped()) moe__onednn_cap(isa); /* before oneDNN's first call */
    for (int i = 0; i < MOE_ISA_COUNT; i++)
        if (runnable((moe_isa)i)) {
            build(&g_tables[i], (moe_isa)i);
            g_have[i] = 1;
        }
    __atomic_store_n(&moe__kt, &g_tables[isa], __ATOMIC_RELEASE);
}

const moe_kernels *moe__kernels_init(void) {
    pthread_once(&g_once, init);
    return moe__kt;
}

const moe_kernels *moe__kernels_at(moe_isa isa) {
    moe__kernels_init();
    return isa >= 0 && isa < MOE_ISA_COUNT && g_have[isa] ? &g_tables[isa] : NULL;
}
