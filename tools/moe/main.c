/* `moe`: the libmoe command-line tool. One file per subcommand. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f,
            "moe %s: Mixture-of-Experts layers in C\n"
            "\n"
            "usage: moe <command> [options]     (moe <command> --help for its options)\n"
            "\n"
            "commands:\n"
            "  train     train an MoE character language model (the main job; built-in corpus\n"
            "            or --data FILE)\n"
            "  sample    generate text from a train checkpoint\n"
            "  eval      validation figures of a train checkpoint\n"
            "  inspect   a checkpoint's config and parameter table\n"
            "  forward   run one layer on tensors saved from PyTorch (safetensors), with gradients\n"
            "  bench     time forward+backward against a dense sgemm of the same FLOPs\n"
            "  cpu       this CPU's kernel levels and the one in use (MOE_MAX_CPU_ISA caps it)\n"
            "  version   print the version\n",
            MOE_VERSION);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *c = argv[1];
    /* a cap that names no level runs at baseline: say so before any command's output */
    const char *cap = getenv("MOE_MAX_CPU_ISA");
    if (cap && *cap) {
        (void)moe_cpu_isa();
        if (strstr(moe_cpu_notes(), "MOE_MAX_CPU_ISA=")) fprintf(stderr, "moe: %s", moe_cpu_notes());
    }
    if (!strcmp(c, "-h") || !strcmp(c, "--help") || !strcmp(c, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(c, "version") || !strcmp(c, "--version")) {
        printf("moe %s\n", MOE_VERSION);
        return 0;
    }
    if (!strcmp(c, "forward")) return cmd_forward(argc - 1, argv + 1);
    if (!strcmp(c, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(c, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(c, "sample")) return cmd_sample(argc - 1, argv + 1);
    if (!strcmp(c, "eval")) return cmd_eval(argc - 1, argv + 1);
    if (!strcmp(c, "cpu")) return cmd_cpu(argc - 1, argv + 1);
    if (!strcmp(c, "inspect")) return cmd_inspect(argc - 1, argv + 1);
    fprintf(stderr, "moe: unknown command '%s'\n\n", c);
    usage(stderr);
    return 2;
}
