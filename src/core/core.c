/*
 * Status messages, aligned allocation, counter-based RNG, thread control.
 * Dimension key: T tokens, D model dim, H expert hidden dim, E experts, K top-k.
 */
#include "internal.h"

#include <cjson/cJSON.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---------------------------------------------------------------- status */

static _Thread_local char g_msg[1024];

const char *moe_status_str(moe_status s) {
    switch (s) {
    case MOE_OK: return "MOE_OK";
    case MOE_ERR_ARG: return "MOE_ERR_ARG";
    case MOE_ERR_SHAPE: return "MOE_ERR_SHAPE";
    case MOE_ERR_NONFINITE: return "MOE_ERR_NONFINITE";
    case MOE_ERR_NOMEM: return "MOE_ERR_NOMEM";
    case MOE_ERR_IO: return "MOE_ERR_IO";
    case MOE_ERR_FORMAT: return "MOE_ERR_FORMAT";
    case MOE_ERR_NOTFOUND: return "MOE_ERR_NOTFOUND";
    case MOE_ERR_STATE: return "MOE_ERR_STATE";
    case MOE_ERR_UNSUPPORTED: return "MOE_ERR_UNSUPPORTED";
    }
    return "MOE_ERR_UNKNOWN";
}

const char *moe_last_error(void) { return g_msg; }

void moe_err_clear(void) { g_msg[0] = '\0'; }

moe_status moe_err(moe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return s;
}

/* ---------------------------------------------------------------- memory */

/* Fault injection for tests (moe__fault_alloc): the allocation with this
 * index fails; -1 off. Allocations happen on the calling thread, never inside
 * the library's parallel regions. */
static int64_t g_fail_at = -1, g_allocs;

void moe__fault_alloc(int64_t n) {
    g_fail_at = n;
    g_allocs = 0;
    /* cJSON's allocations (config and safetensors headers) count too */
    cJSON_Hooks hooks = {moe_alloc, moe_free};
    cJSON_InitHooks(n >= 0 ? &hooks : NULL);
}

int64_t moe__alloc_count(void) { return g_allocs; }

void *moe_alloc(size_t nbytes) {
    if (g_fail_at >= 0 && g_allocs++ == g_fail_at) return NULL;
    if (nbytes == 0) nbytes = 1;
    size_t rounded;
    if (!moe_add_size(&rounded, nbytes, 63)) return NULL;
    rounded &= ~(size_t)63;
    return aligned_alloc(64, rounded);
}

void *moe_calloc(size_t nbytes) {
    void *p = moe_alloc(nbytes);
    if (p) memset(p, 0, nbytes ? nbytes : 1);
    return p;
}

void moe_free(void *p) { free(p); }

void *moe_calloc_lazy(size_t nbytes) {
    if (g_fail_at >= 0 && g_allocs++ == g_fail_at) return NULL;
    size_t total;
    if (!moe_add_size(&total, nbytes ? nbytes : 1, 64)) return NULL;
    /* calloc, unlike aligned_alloc + memset, leaves a big block's fresh pages
     * untouched (they read as zero): the pages are faulted in when first
     * used, not all here. The block is aligned by hand; the pointer calloc
     * gave sits just before it (calloc's pointers are 16-aligned, so there is
     * room). */
    unsigned char *raw = calloc(1, total);
    if (!raw) return NULL;
    unsigned char *p = (unsigned char *)(((uintptr_t)raw + 64) & ~(uintptr_t)63);
    memcpy(p - sizeof raw, &raw, sizeof raw);
    return p;
}

void moe_free_lazy(void *p) {
    if (!p) return;
    void *raw;
    memcpy(&raw, (unsigned char *)p - sizeof raw, sizeof raw);
    free(raw);
}

/* ---------------------------------------------------------------- rng */

uint64_t moe_rng_u64(uint64_t seed, uint64_t counter) {
    /* splitmix64 finaliser over a mix of seed and counter: stateless, so any
     * thread can draw element i of a stream without touching shared state. */
    uint64_t z = seed * 0xD1342543DE82EF95ull + counter * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float moe_rng_uniform(uint64_t seed, uint64_t counter) {
    return (float)(moe_rng_u64(seed, counter) >> 40) * (1.0f / 16777216.0f);
}

/* ---------------------------------------------------------------- threads */

static double g_check_seconds;
static uint64_t g_params_gen = 1;

void moe__params_bump(void) {
#pragma omp atomic
    g_params_gen++;
}

uint64_t moe__params_gen(void) {
    uint64_t g;
#pragma omp atomic read
    g = g_params_gen;
    return g;
}

double moe__clock(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return 0.0;
#endif
}

void moe__check_add(double seconds) {
#pragma omp atomic
    g_check_seconds += seconds;
}

double moe__check_seconds(void) {
    double s;
#pragma omp atomic read
    s = g_check_seconds;
    return s;
}

int moe_set_num_threads(int n) {
#ifdef _OPENMP
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
#else
    if (n <= 0) n = 1;
#endif
    return n;
}
