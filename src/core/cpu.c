/*
 * The CPU's features and the kernel level this process runs at.
 *
 * libmoe is built for a baseline (x86-64-v2, or armv8-a) and picks its
 * kernels at run time (src/kernels/kernels.c): the best level the CPU has,
 * capped by the environment variable MOE_MAX_CPU_ISA. Levels:
 *   x86-64: baseline (SSE4.2), avx2 (AVX2 + FMA), avx512 (F, BW, DQ, VL),
 *           avx512_bf16 (the above + AVX512-BF16: native bf16 dot products)
 *   arm64:  baseline (plain C), neon (Advanced SIMD)
 * Features are read from cpuid through gcc's __builtin_cpu_supports, which
 * also checks that the OS saves the wide registers (XCR0), and from
 * getauxval(AT_HWCAP) on arm64.
 *
 * Notes (moe_cpu_notes): what the library fell back from, once each, for the
 * caller to read (moe bench prints them): never a silent slow path.
 */
#include "cpu.h"
#include "../kernels/kernels.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#endif

static const char *const k_names[MOE_ISA_COUNT] = {"baseline", "avx2", "avx512", "avx512_bf16", "neon"};

const char *moe_isa_name(moe_isa isa) { return isa >= 0 && isa < MOE_ISA_COUNT ? k_names[isa] : NULL; }

/* Best level of this CPU, and its features in words. */
static moe_isa g_best;
static char g_features[256], g_model[96];

static void probe(void) {
    g_best = MOE_ISA_BASELINE;
    char *f = g_features;
    size_t cap = sizeof g_features;
#define ADD(name)                                                                                                   \
    do {                                                                                                            \
        size_t u = strlen(f);                                                                                       \
        snprintf(f + u, cap - u, "%s%s", u ? " " : "", name);                                                      \
    } while (0)
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    int bf16 = __builtin_cpu_supports("avx512bf16");
    if (avx2) g_best = MOE_ISA_AVX2;
    if (avx2 && avx512) g_best = MOE_ISA_AVX512;
    if (avx2 && avx512 && bf16) g_best = MOE_ISA_AVX512_BF16;
    if (__builtin_cpu_supports("sse4.2")) ADD("sse4.2");
    if (__builtin_cpu_supports("avx")) ADD("avx");
    if (__builtin_cpu_supports("avx2")) ADD("avx2");
    if (__builtin_cpu_supports("fma")) ADD("fma");
    if (__builtin_cpu_supports("avx512f")) ADD("avx512f");
    if (__builtin_cpu_supports("avx512bw")) ADD("avx512bw");
    if (__builtin_cpu_supports("avx512dq")) ADD("avx512dq");
    if (__builtin_cpu_supports("avx512vl")) ADD("avx512vl");
    if (bf16) ADD("avx512_bf16");
    /* for the quantized bank (int8 dot products), not a level of their own yet;
     * read from cpuid directly (not every compiler's __builtin_cpu_supports
     * knows them): leaf 7 subleaf 0 ECX bit 11, subleaf 1 EAX bit 4 */
    unsigned r[12], a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (c >> 11 & 1) && __builtin_cpu_supports("avx512f"))
        ADD("avx512_vnni");
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1) && avx2) ADD("avx_vnni");
    /* the brand string: cpuid leaves 0x80000002..4 */
    if (__get_cpuid(0x80000000u, &a, &b, &c, &d) && a >= 0x80000004u) {
        for (unsigned i = 0; i < 3; i++) __get_cpuid(0x80000002u + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
        char s[49];
        memcpy(s, r, 48);
        s[48] = '\0';
        char *p = s, *e = s + strlen(s);
        while (*p == ' ') p++;
        while (e > p && e[-1] == ' ') *--e = '\0';
        snprintf(g_model, sizeof g_model, "%s", p);
    }
    /* family and model (leaf 1): VMs often show a bare brand ("AMD EPYC"); 0x19 is
     * AMD Zen 3 or 4, 0x1a Zen 5; 6 is Intel's Core and Xeon */
    if (__get_cpuid(1u, &a, &b, &c, &d)) {
        unsigned fam = (a >> 8) & 0xf, mod = (a >> 4) & 0xf;
        if (fam == 0xf) fam += (a >> 20) & 0xff;
        if (fam == 0xf || fam == 6 || fam > 0xf) mod |= ((a >> 16) & 0xf) << 4;
        size_t u = strlen(g_model);
        snprintf(g_model + u, sizeof g_model - u, "%sfamily 0x%x model 0x%x", u ? ", " : "", fam, mod);
    }
#elif defined(__aarch64__)
    unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#ifndef HWCAP2_BF16
#define HWCAP2_BF16 (1 << 14)
#endif
    if (hw & HWCAP_ASIMD) { /* ADD is a statement: braces, not the comma operator */
        g_best = MOE_ISA_NEON;
        ADD("asimd");
    }
    if (hw2 & HWCAP2_BF16) ADD("bf16");
    snprintf(g_model, sizeof g_model, "arm64");
#endif
#undef ADD
    if (!g_model[0]) snprintf(g_model, sizeof g_model, "unknown CPU");
}

/* The level in use: the best, capped by MOE_MAX_CPU_ISA. */
static moe_isa g_isa;
static int g_capped;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* A level the CPU may have on this architecture. */
static int arch_level(moe_isa l) {
#if defined(__x86_64__)
    return l == MOE_ISA_BASELINE || l == MOE_ISA_AVX2 || l == MOE_ISA_AVX512 || l == MOE_ISA_AVX512_BF16;
#elif defined(__aarch64__)
    return l == MOE_ISA_BASELINE || l == MOE_ISA_NEON;
#else
    return l == MOE_ISA_BASELINE;
#endif
}

static void choose(void) {
    probe();
    g_isa = g_best;
    const char *env = getenv("MOE_MAX_CPU_ISA");
    if (!env) return;
    /* the name without surrounding blanks, in lower case ("AVX2 " is avx2) */
    char cap[40];
    size_t n = 0;
    while (*env == ' ' || *env == '\t') env++;
    for (; env[n] && n + 1 < sizeof cap; n++) cap[n] = (char)(env[n] >= 'A' && env[n] <= 'Z' ? env[n] - 'A' + 'a' : env[n]);
    while (n > 0 && (cap[n - 1] == ' ' || cap[n - 1] == '\t' || cap[n - 1] == '\n')) n--;
    cap[n] = '\0';
    if (!cap[0]) return; /* set but empty: no cap */
    int found = -1;
    for (int i = 0; i < MOE_ISA_COUNT; i++)
        if (arch_level((moe_isa)i) && strcmp(cap, k_names[i]) == 0) found = i;
    if (found < 0) {
        /* the caller asked for a cap: run at the lowest level rather than the best */
        char known[96] = "";
        for (int i = 0; i < MOE_ISA_COUNT; i++)
            if (arch_level((moe_isa)i)) {
                size_t u = strlen(known);
                snprintf(known + u, sizeof known - u, "%s%s", u ? ", " : "", k_names[i]);
            }
        moe__cpu_note("MOE_MAX_CPU_ISA=%.32s is not a level of this architecture (%s): running at baseline", env,
                      known);
        g_isa = MOE_ISA_BASELINE;
        g_capped = 1;
        return;
    }
    /* levels of one architecture are ordered by their enum values */
    if ((moe_isa)found < g_best) g_isa = (moe_isa)found, g_capped = 1;
    else if ((moe_isa)found > g_best)
        moe__cpu_note("MOE_MAX_CPU_ISA=%s is above this CPU's best level, %s: running at %s", k_names[found],
                      k_names[g_best], k_names[g_best]);
}

moe_isa moe__cpu_level(void) {
    pthread_once(&g_once, choose);
    return g_isa;
}

/* The public query makes the kernel table too, so oneDNN's ISA is capped
 * before a caller who asked goes on to use oneDNN itself. */
moe_isa moe_cpu_isa(void) { return moe__kernels_init()->isa; }

moe_isa moe_cpu_isa_max(void) {
    pthread_once(&g_once, choose);
    return g_best;
}

int moe__cpu_capped(void) {
    pthread_once(&g_once, choose);
    return g_capped;
}

const char *moe_cpu_features(void) {
    pthread_once(&g_once, choose);
    return g_features;
}

const char *moe_cpu_model(void) {
    pthread_once(&g_once, choose);
    return g_model;
}

/* ---------------------------------------------------------------- notes */

/* One line per kind of fallback (its key): the first occurrence's text, then
 * how many times it happened. A fixed table: no allocation on the paths that
 * report failed allocations; a kind beyond it is counted as dropped. */
enum { MAX_NOTES = 16, NOTE_LEN = 320 };
static pthread_mutex_t g_note_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_note_key[MAX_NOTES][48], g_note_text[MAX_NOTES][NOTE_LEN];
static int64_t g_note_count[MAX_NOTES];
static int g_notes, g_notes_dropped;

void moe__cpu_note_kind(const char *key, const char *fmt, ...) {
    pthread_mutex_lock(&g_note_lock);
    for (int i = 0; i < g_notes; i++)
        if (strncmp(g_note_key[i], key, sizeof g_note_key[i] - 1) == 0) { /* said already: count it */
            g_note_count[i]++;
            pthread_mutex_unlock(&g_note_lock);
            return;
        }
    if (g_notes == MAX_NOTES) {
        g_notes_dropped++;
    } else {
        int i = g_notes++;
        snprintf(g_note_key[i], sizeof g_note_key[i], "%s", key);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g_note_text[i], sizeof g_note_text[i], fmt, ap);
        va_end(ap);
        g_note_count[i] = 1;
    }
    pthread_mutex_unlock(&g_note_lock);
}

const char *moe_cpu_notes(void) {
    static _Thread_local char out[MAX_NOTES * (NOTE_LEN + 40) + 64]; /* a copy: another thread may add one */
    size_t u = 0;
    out[0] = '\0';
    pthread_mutex_lock(&g_note_lock);
    for (int i = 0; i < g_notes; i++) {
        int w = g_note_count[i] > 1 ? snprintf(out + u, sizeof out - u, "%s (%lld times)\n", g_note_text[i],
                                               (long long)g_note_count[i])
                                    : snprintf(out + u, sizeof out - u, "%s\n", g_note_text[i]);
        if (w > 0) u += (size_t)w < sizeof out - u ? (size_t)w : sizeof out - u - 1;
    }
    if (g_notes_dropped)
        snprintf(out + u, sizeof out - u, "(%d more kinds of fallback not listed)\n", g_notes_dropped);
    pthread_mutex_unlock(&g_note_lock);
    return out;
}
