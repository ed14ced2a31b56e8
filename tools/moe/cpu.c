/* `moe cpu`: the CPU, the kernel levels it has and the one this process runs
 * at (README "Every CPU"). --levels prints the levels this CPU can run, one
 * per line, lowest first (tests/run.sh runs the suite at each). */
#include "cli.h"

#include <stdio.h>
#include <string.h>

static const char *const k_help =
    "usage: moe cpu [--levels]\n"
    "\n"
    "Print this CPU's model and features, the kernel levels libmoe has for it, the level\n"
    "this process runs at, and the library's notes (fallbacks it took, if any).\n"
    "The level is the best the CPU has unless the environment variable MOE_MAX_CPU_ISA\n"
    "caps it (baseline, avx2, avx512, avx512_bf16 on x86-64; baseline, neon on arm64);\n"
    "the cap applies to oneDNN's GEMMs too.\n"
    "\n"
    "  --levels   only the levels this CPU can run, one per line, lowest first\n";

int cmd_cpu(int argc, char **argv) {
    int levels_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(k_help, stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--levels")) levels_only = 1;
        else {
            fprintf(stderr, "moe cpu: unknown option '%s'\n\n%s", argv[i], k_help);
            return 2;
        }
    }
    moe_isa cur = moe_cpu_isa(), best = moe_cpu_isa_max();
    char list[128] = "";
    for (int i = 0; i < MOE_ISA_COUNT; i++) {
        moe_isa l = (moe_isa)i;
        /* levels of this architecture up to the CPU's best (arm64: baseline, neon) */
#if defined(__x86_64__)
        int has = l <= best && l <= MOE_ISA_AVX512_BF16;
#else
        int has = l == MOE_ISA_BASELINE || l == best;
#endif
        if (!has) continue;
        if (levels_only) printf("%s\n", moe_isa_name(l));
        size_t u = strlen(list);
        snprintf(list + u, sizeof list - u, "%s%s", u ? " " : "", moe_isa_name(l));
    }
    if (levels_only) return 0;
    printf("cpu:       %s\nfeatures:  %s\nlevels:    %s\nrunning:   %s%s\n", moe_cpu_model(), moe_cpu_features(),
           list, moe_isa_name(cur), cur < best ? " (capped by MOE_MAX_CPU_ISA)" : " (the best of this CPU)");
    const char *notes = moe_cpu_notes();
    printf("notes:     %s", *notes ? notes : "none\n");
    return 0;
}
