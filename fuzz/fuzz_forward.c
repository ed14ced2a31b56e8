/*
 * libFuzzer target: `moe forward`'s input handling. The input bytes are the
 * X.safetensors a user passes (tensor 'x', optional 'mask'); the first byte
 * picks the layer (topk, gshard, soft_dynamic with image input, or a topk
 * DeepSeek-V3 router with runtime masks). The command must fail cleanly or
 * write its output; it never crashes. Files live in /tmp/moe_fuzz_forward_PID.
 */
#include "../tools/moe/cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const configs[] = {
    "{\"type\": \"topk\", \"num_experts\": 4, \"input_dim\": 4, \"hidden_dim\": 3, \"top_k\": 2}",
    "{\"type\": \"gshard\", \"dim\": 4, \"num_experts\": 3, \"hidden_dim\": 3}",
    "{\"type\": \"soft_dynamic\", \"dim\": 4, \"num_experts\": 2, \"expert_mult\": 1}",
    "{\"type\": \"topk\", \"num_experts\": 4, \"input_dim\": 4, \"hidden_dim\": 3, \"router\": \"deepseek_v3\", "
    "\"num_groups\": 2, \"topk_groups\": 1}",
};

static void write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (n && fwrite(p, 1, n, f) != n) abort();
    fclose(f);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    static char dir[64], cfg[4][96], xin[96], out[96];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/moe_fuzz_forward_%d", (int)getpid());
        if (mkdir(dir, 0700) != 0 && access(dir, F_OK) != 0) abort();
        for (int i = 0; i < 4; i++) {
            snprintf(cfg[i], sizeof cfg[i], "%s/c%d.json", dir, i);
            write_file(cfg[i], configs[i], strlen(configs[i]));
        }
        snprintf(xin, sizeof xin, "%s/x.safetensors", dir);
        snprintf(out, sizeof out, "%s/out.safetensors", dir);
    }
    if (size < 1) return 0;
    int which = data[0] % 4;
    write_file(xin, data + 1, size - 1);
    char *argv[] = {"forward", "--config", cfg[which], "--input", xin, "--out", out, "--threads", "1",
                    which == 3 ? "--mask-experts" : "--eval", which == 3 ? "1" : NULL, NULL};
    int argc = which == 3 ? 11 : 10;
    cmd_forward(argc, argv); /* its messages go to stderr: run with -close_fd_mask=2 */
    return 0;
}
