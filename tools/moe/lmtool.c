/*
 * `moe sample`, `moe eval` and `moe inspect`: use a `moe train` checkpoint.
 * Dimension key: T tokens, W window, V = 256 vocabulary.
 */
#include "ckpt.h"
#include "cli.h"
#include "lmdata.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *sample_usage =
    "usage: moe sample CHECKPOINT [--prompt TEXT] [--length N] [--temperature T] [--seed N]\n"
    "                  [--threads N]\n"
    "\n"
    "Generates bytes from a `moe train` checkpoint, after the prompt.\n"
    "  --prompt TEXT       text to continue (default: a line of each built-in task)\n"
    "  --length N          bytes to generate (default 200)\n"
    "  --temperature T     sampling temperature; 0 picks the most likely byte (default 0.5)\n"
    "  --seed N            sampling seed (default 1)\n";

static const char *eval_usage =
    "usage: moe eval CHECKPOINT [--data FILE] [--threads N]\n"
    "\n"
    "Validation figures of a `moe train` checkpoint on the data it was trained on (or\n"
    "--data FILE's held-out 10%): loss; for the built-in corpus per-task loss and accuracy\n"
    "on the answer bytes and the task x expert routing table.\n";

static const char *inspect_usage =
    "usage: moe inspect CHECKPOINT\n"
    "\n"
    "Prints a `moe train` checkpoint's step, model config, training settings and parameter\n"
    "table (names, shapes, sizes).\n";

/* Shared parsing: the checkpoint (positional or --checkpoint) and the listed flags. */
typedef struct {
    const char *path, *prompt, *data;
    int64_t length, seed, threads;
    double temp;
} tool_args;

static int parse(tool_args *a, const char *cmd, const char *usage, int argc, char **argv, int flags) {
    memset(a, 0, sizeof *a);
    a->length = 200, a->seed = 1, a->temp = 0.5;
    int bad = 0;
    for (int i = 1; i < argc && !bad; i++) {
        const char *v;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage, stdout);
            return -1;
        } else if ((v = cli_flag(argc, argv, &i, "--checkpoint", &bad))) a->path = v;
        else if ((flags & 1) && (v = cli_flag(argc, argv, &i, "--prompt", &bad))) a->prompt = v;
        else if ((flags & 1) && (v = cli_flag(argc, argv, &i, "--length", &bad))) {
            if (!cli_int(cmd, "--length", v, 1, 1 << 24, &a->length)) return 2;
        } else if ((flags & 1) && (v = cli_flag(argc, argv, &i, "--temperature", &bad))) {
            if (!cli_float(cmd, "--temperature", v, 0, 100, &a->temp)) return 2;
        } else if ((flags & 1) && (v = cli_flag(argc, argv, &i, "--seed", &bad))) {
            if (!cli_int(cmd, "--seed", v, 0, INT64_MAX / 2, &a->seed)) return 2;
        } else if ((flags & 2) && (v = cli_flag(argc, argv, &i, "--data", &bad))) a->data = v;
        else if ((flags & 4) && (v = cli_flag(argc, argv, &i, "--threads", &bad))) {
            if (!cli_int(cmd, "--threads", v, 1, 1024, &a->threads)) return 2;
        } else if (argv[i][0] != '-' && !a->path) a->path = argv[i];
        else if (!bad) {
            fprintf(stderr, "moe %s: unknown option '%s'\n\n%s", cmd, argv[i], usage);
            return 2;
        }
    }
    if (bad) return 2;
    if (!a->path) {
        fprintf(stderr, "moe %s: which checkpoint? e.g. moe %s runs/train/checkpoint.safetensors\n\n%s", cmd, cmd,
                usage);
        return 2;
    }
    moe_set_num_threads((int)a->threads);
    return 0;
}

static lm *load(const char *cmd, const char *path, int64_t *step, train_opts *to) {
    lm *m = NULL;
    char msg[1024];
    if (ckpt_load(path, &m, NULL, step, to, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "moe %s: %s\n", cmd, msg);
        return NULL;
    }
    return m;
}

static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int cmd_sample(int argc, char **argv) {
    tool_args a;
    int rc = parse(&a, "sample", sample_usage, argc, argv, 1 | 4);
    if (rc) return rc < 0 ? 0 : rc;
    train_opts to;
    lm *m = load("sample", a.path, NULL, &to);
    if (!m) return 1;
    const lm_config *c = lm_get_config(m);
    const char *prompt = a.prompt ? a.prompt : (*to.data ? "" : "C:moe=");
    size_t np = strlen(prompt);
    int64_t W = c->W, n = (int64_t)np + a.length;
    /* layers with groups see a group of N copies of the window (eval mode) */
    int64_t T = (c->moe.type == MOE_LAYER_TOPK || c->moe.type == MOE_LAYER_DENSE) ? 1 : c->group;
    /* before the prompt: for the line-based built-in corpus, the end of a few
     * corpus lines (the prompt starts a new line, as in training); for --data
     * models the zero bytes training saw before the start of the text */
    uint8_t *buf = malloc((size_t)(n + W)), *ctx = malloc((size_t)(T * W));
    corpus pre = {0};
    if (!buf || !ctx || (!*to.data && corpus_generate(&pre, (uint64_t)to.seed + 0x5eed, W + 1))) {
        free(buf), free(ctx), lm_free(m);
        return 1;
    }
    memset(buf, 0, (size_t)W);
    if (!*to.data) memcpy(buf, pre.text + pre.len - W, (size_t)W); /* lines are >= 4 bytes: len > W */
    corpus_free(&pre);
    uint8_t *text = buf + W;
    memcpy(text, prompt, np);
    fwrite(prompt, 1, np, stdout);
    for (int64_t p = (int64_t)np; p < n; p++) {
        for (int64_t j = 0; j < T; j++) lmdata_window(ctx + j * W, buf, p + W, W);
        if (lm_forward(m, NULL, NULL, NULL, ctx, NULL, T, 0) != MOE_OK) {
            fprintf(stderr, "\nmoe sample: forward failed: %s\n", moe_last_error());
            rc = 1;
            break;
        }
        const float *z = lm_logits(m);
        int best = 0;
        for (int v = 1; v < LM_VOCAB; v++)
            if (z[v] > z[best]) best = v;
        if (a.temp > 0) { /* sample from softmax(z / temperature) */
            double w[LM_VOCAB], s = 0;
            for (int v = 0; v < LM_VOCAB; v++) s += (w[v] = exp(((double)z[v] - z[best]) / a.temp));
            double u = (double)(mix64((uint64_t)a.seed * 0x9E37ull + (uint64_t)p) >> 11) * 0x1p-53 * s;
            for (best = 0; best < LM_VOCAB - 1 && u >= w[best]; best++) u -= w[best];
        }
        text[p] = (uint8_t)best;
        fputc(best, stdout);
    }
    fputc('\n', stdout);
    free(buf), free(ctx), lm_free(m);
    return rc;
}

int cmd_eval(int argc, char **argv) {
    tool_args a;
    int rc = parse(&a, "eval", eval_usage, argc, argv, 2 | 4);
    if (rc) return rc < 0 ? 0 : rc;
    train_opts to;
    int64_t step = 0;
    lm *m = load("eval", a.path, &step, &to);
    if (!m) return 1;
    lm_data d;
    if (lmdata_load(&d, "eval", a.data ? a.data : to.data, (uint64_t)to.seed)) {
        lm_free(m);
        return 1;
    }
    lm_eval ev;
    printf("%s: step %lld, %s\n", a.path, (long long)step, (a.data ? *a.data : *to.data) ? (a.data ? a.data : to.data)
                                                                                          : "built-in corpus");
    moe_status st = lmdata_evaluate(&ev, m, &d, to.batch, 0);
    if (st == MOE_OK) lmdata_print_eval(stdout, &ev, m, &d);
    else fprintf(stderr, "moe eval: %s: %s\n", moe_status_str(st), moe_last_error());
    free(ev.route);
    lmdata_free(&d);
    lm_free(m);
    return st == MOE_OK ? 0 : 1;
}

int cmd_inspect(int argc, char **argv) {
    tool_args a;
    int rc = parse(&a, "inspect", inspect_usage, argc, argv, 0);
    if (rc) return rc < 0 ? 0 : rc;
    moe_st_file *f = NULL;
    moe_status st = moe_st_open(&f, a.path);
    if (st != MOE_OK) return cli_fail("inspect", a.path, st);
    const char *meta[] = {"format", "step", "optim.steps", "config", "train", "rng"};
    for (int i = 0; i < 6; i++) {
        const char *v = moe_st_metadata(f, meta[i]);
        printf("%-12s %s\n", meta[i], v ? v : "(absent)");
    }
    int64_t total = 0, model = 0;
    printf("\n%-48s %-8s %-20s %12s\n", "tensor", "dtype", "shape", "elements");
    for (int i = 0; i < moe_st_count(f); i++) {
        const moe_st_tensor *t = moe_st_tensor_at(f, i);
        char shape[64] = "";
        size_t o = 0;
        for (int d = 0; d < t->ndim && o < sizeof shape - 16; d++)
            o += (size_t)snprintf(shape + o, sizeof shape - o, "%s%lld", d ? " x " : "", (long long)t->shape[d]);
        printf("%-48s %-8s %-20s %12lld\n", t->name, moe_dtype_name(t->dtype), t->ndim ? shape : "scalar",
               (long long)t->numel);
        total += t->numel;
        if (strncmp(t->name, "optim.", 6)) model += t->numel;
    }
    printf("\n%d tensors; model parameters %lld (%.2f MB as float32); with optimizer state %lld values\n",
           moe_st_count(f), (long long)model, (double)model * 4e-6, (long long)total);
    moe_st_close(f);
    return 0;
}
