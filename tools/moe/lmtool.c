/*
 * `moe sample`, `moe eval` and `moe inspect`: use a `moe train` checkpoint.
 * Dimension key: B sequences, S context, T = B*S tokens, V = 256 vocabulary.
 */
#include "ckpt.h"
#include "cli.h"
#include "lmdata.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *sample_usage =
    "usage: moe sample CHECKPOINT [--prompt TEXT] [--length N] [--temperature T] [--top-k K]\n"
    "                  [--seed N] [--threads N]\n"
    "\n"
    "Generates bytes from a `moe train` checkpoint after the prompt, one byte per step\n"
    "with a key/value cache. When the context (the model's --context bytes) is full,\n"
    "the cache restarts from the last half of the text.\n"
    "  --prompt TEXT       text to continue (default: for the fortunes corpus a fortune in\n"
    "                      each language, \"<en> \", \"<de> \", ...; for the task corpus a\n"
    "                      line of each task)\n"
    "  --length N          bytes to generate per prompt (default 200; without --prompt a\n"
    "                      fortune ends where the model starts the next one's tag)\n"
    "  --temperature T     sampling temperature; 0 picks the most likely byte (default 0.7)\n"
    "  --top-k K           sample among the K most likely bytes only (default 0: all)\n"
    "  --seed N            sampling seed (default 1)\n";

static const char *eval_usage =
    "usage: moe eval CHECKPOINT [--data FILE] [--max-bytes N] [--dump FILE] [--threads N]\n"
    "\n"
    "Validation figures of a `moe train` checkpoint on the data it was trained on (or\n"
    "--data FILE's held-out 10%): bits per byte overall and per language (or task),\n"
    "and the language (task) x expert routing table of every block.\n"
    "  --max-bytes N       at most N validation bytes per language or task, in whole\n"
    "                      sequences of the context, at least one (default: all)\n"
    "  --dump FILE         also write the first batch of validation sequences as\n"
    "                      safetensors: tokens, targets (B, S) as float, logits (B, S, 256),\n"
    "                      ce (B, S), ce_mean and aux (1) of an eval-mode forward (for the\n"
    "                      PyTorch reference in tests/parity/run_parity_lm.py)\n";

static const char *inspect_usage =
    "usage: moe inspect CHECKPOINT\n"
    "\n"
    "Prints a `moe train` checkpoint's step, model config, training settings and parameter\n"
    "table (names, shapes, sizes).\n";

/* Shared parsing: the checkpoint (positional or --checkpoint) and the listed flags. */
typedef struct {
    const char *path, *prompt, *data, *dump;
    int64_t length, seed, threads, top_k, max_bytes;
    double temp;
} tool_args;

static int parse(tool_args *a, const char *cmd, const char *usage, int argc, char **argv, int flags) {
    memset(a, 0, sizeof *a);
    a->length = 200, a->seed = 1, a->temp = 0.7;
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
        } else if ((flags & 1) && (v = cli_flag(argc, argv, &i, "--top-k", &bad))) {
            if (!cli_int(cmd, "--top-k", v, 0, LM_VOCAB, &a->top_k)) return 2;
        } else if ((flags & 1) && (v = cli_flag(argc, argv, &i, "--seed", &bad))) {
            if (!cli_int(cmd, "--seed", v, 0, INT64_MAX / 2, &a->seed)) return 2;
        } else if ((flags & 2) && (v = cli_flag(argc, argv, &i, "--data", &bad))) a->data = v;
        else if ((flags & 2) && (v = cli_flag(argc, argv, &i, "--dump", &bad))) a->dump = v;
        else if ((flags & 2) && (v = cli_flag(argc, argv, &i, "--max-bytes", &bad))) {
            if (!cli_int(cmd, "--max-bytes", v, 1, INT64_MAX / 2, &a->max_bytes)) return 2;
        } else if ((flags & 4) && (v = cli_flag(argc, argv, &i, "--threads", &bad))) {
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

/* Feed byte c at the next position; when the cache is full, restart it
 * with the last S/2 bytes of text (n bytes so far, c not among them). */
static moe_status feed(lm *m, const uint8_t *text, int64_t n, uint8_t c) {
    int64_t S = lm_get_config(m)->S;
    if (lm_decode_pos(m) >= S) {
        moe_status st = lm_decode_reset(m);
        int64_t keep = S / 2 < n ? S / 2 : n;
        for (int64_t i = n - keep; i < n && st == MOE_OK; i++) st = lm_decode(m, text[i]);
        if (st != MOE_OK) return st;
    }
    return lm_decode(m, c);
}

/* The next byte from the logits: argmax at temperature 0, else a draw from
 * softmax(z / temperature) over the top_k most likely bytes (all if 0). */
static int pick(const float *z, double temp, int64_t top_k, uint64_t seed, uint64_t p) {
    int best = 0;
    for (int v = 1; v < LM_VOCAB; v++)
        if (z[v] > z[best]) best = v;
    if (temp <= 0) return best;
    double w[LM_VOCAB], s = 0;
    float cut = -INFINITY;
    if (top_k > 0 && top_k < LM_VOCAB) { /* the top_k-th largest logit */
        float sorted[LM_VOCAB];
        memcpy(sorted, z, sizeof sorted);
        for (int i = 0; i < top_k; i++) { /* partial selection: K passes */
            int mx = i;
            for (int j = i + 1; j < LM_VOCAB; j++)
                if (sorted[j] > sorted[mx]) mx = j;
            float t = sorted[i];
            sorted[i] = sorted[mx], sorted[mx] = t;
        }
        cut = sorted[top_k - 1];
    }
    for (int v = 0; v < LM_VOCAB; v++) s += (w[v] = z[v] >= cut ? exp(((double)z[v] - z[best]) / temp) : 0.0);
    double u = (double)(mix64(seed * 0x9E37ull + p) >> 11) * 0x1p-53 * s;
    int v = 0;
    for (; v < LM_VOCAB - 1 && (u >= w[v] || w[v] == 0); v++) u -= w[v];
    return w[v] > 0 ? v : best;
}

int cmd_sample(int argc, char **argv) {
    tool_args a;
    int rc = parse(&a, "sample", sample_usage, argc, argv, 1 | 4);
    if (rc) return rc < 0 ? 0 : rc;
    train_opts to;
    lm *m = load("sample", a.path, NULL, &to);
    if (!m) return 1;
    static const char *const lang_prompts[] = {"<en> ", "<de> ", "<es> ", "<it> ", "<ru> ", "<zh> ", "<pl> ", "<cs> "};
    static const char *const task_prompts[] = {"C:moe=", "R:expert=", "S:router=", "A:123+456="};
    const char *one[1];
    const char *const *prompts = one;
    int n_prompts = 1, fortunes = !*to.data && (!*to.corpus || !strcmp(to.corpus, "fortunes"));
    int tasks = !*to.data && !strcmp(to.corpus, "tasks");
    if (a.prompt) one[0] = a.prompt;
    else if (fortunes) prompts = lang_prompts, n_prompts = 8;
    else if (tasks) prompts = task_prompts, n_prompts = 4;
    else one[0] = "";
    uint8_t *text = malloc((size_t)(a.length + 4096 + (a.prompt ? strlen(a.prompt) : 0)));
    if (!text) {
        lm_free(m);
        return 1;
    }
    uint64_t draw = 0;
    for (int k = 0; k < n_prompts && rc == 0; k++) {
        /* training sequences start anywhere: a document boundary (newline) before the prompt */
        int64_t n = 0, np = (int64_t)strlen(prompts[k]);
        moe_status st = lm_decode_reset(m);
        if (st == MOE_OK) st = lm_decode(m, '\n');
        text[n++] = '\n';
        for (int64_t i = 0; i < np && st == MOE_OK; i++) {
            st = feed(m, text, n, (uint8_t)prompts[k][i]);
            text[n++] = (uint8_t)prompts[k][i];
        }
        fwrite(prompts[k], 1, (size_t)np, stdout);
        for (int64_t i = 0; i < a.length && st == MOE_OK; i++) {
            int c = pick(lm_logits(m), a.temp, a.top_k, (uint64_t)a.seed, draw++);
            /* one fortune per prompt: it ends where the next one's "<xx> " tag begins */
            if (fortunes && !a.prompt && c == '<' && text[n - 1] == '\n') break;
            fputc(c, stdout);
            if (c == '\n' && tasks && !a.prompt) break; /* one line per task prompt */
            st = feed(m, text, n, (uint8_t)c);
            text[n++] = (uint8_t)c;
        }
        if (st != MOE_OK) {
            fprintf(stderr, "\nmoe sample: decoding failed: %s: %s\n", moe_status_str(st), moe_last_error());
            rc = 1;
        }
        if (n_prompts > 1 || a.prompt) fputc('\n', stdout);
        fflush(stdout);
    }
    free(text), lm_free(m);
    return rc;
}

/* The first batch of validation sequences, forward in eval mode, as safetensors. */
static int dump(const char *path, lm *m, const lm_data *d, int64_t B) {
    int64_t S = lm_get_config(m)->S, n = (d->n_val - 1) / S;
    if (B > n) B = n;
    if (B < 1) {
        fprintf(stderr, "moe eval: --dump: the validation text is shorter than one sequence\n");
        return 1;
    }
    int64_t T = B * S;
    uint8_t *tok = malloc((size_t)T), *tgt = malloc((size_t)T);
    float *ft = malloc((size_t)T * sizeof(float)), *fg = malloc((size_t)T * sizeof(float));
    float *ce = malloc((size_t)T * sizeof(float));
    int rc = 1;
    if (tok && tgt && ft && fg && ce) {
        for (int64_t b = 0; b < B; b++) lmdata_sequence(tok + b * S, tgt + b * S, d->val, b * S, S);
        double loss = 0, sum = 0;
        moe_status st = lm_forward(m, &loss, ce, NULL, tok, tgt, B, S, 0);
        if (st == MOE_OK) {
            for (int64_t t = 0; t < T; t++) ft[t] = tok[t], fg[t] = tgt[t], sum += ce[t];
            float cem = (float)(sum / (double)T), aux = (float)(loss - sum / (double)T);
            moe_st_entry e[6] = {{"tokens", MOE_DT_F32, 2, {B, S}, ft},
                                 {"targets", MOE_DT_F32, 2, {B, S}, fg},
                                 {"logits", MOE_DT_F32, 3, {B, S, LM_VOCAB}, lm_logits(m)},
                                 {"ce", MOE_DT_F32, 2, {B, S}, ce},
                                 {"ce_mean", MOE_DT_F32, 1, {1}, &cem},
                                 {"aux", MOE_DT_F32, 1, {1}, &aux}};
            st = moe_st_write(path, e, 6, NULL, 0);
        }
        if (st == MOE_OK) rc = 0;
        else fprintf(stderr, "moe eval: --dump %s: %s: %s\n", path, moe_status_str(st), moe_last_error());
    }
    free(tok), free(tgt), free(ft), free(fg), free(ce);
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
    if (lmdata_load(&d, "eval", to.corpus, a.data ? a.data : to.data, (uint64_t)to.seed)) {
        lm_free(m);
        return 1;
    }
    lm_eval ev;
    printf("%s: step %lld, %s\n", a.path, (long long)step, d.desc);
    moe_status st = lmdata_evaluate(&ev, m, &d, to.batch, a.max_bytes);
    if (st == MOE_OK) lmdata_print_eval(stdout, &ev, m, &d);
    else fprintf(stderr, "moe eval: %s\n", ev.why[0] ? ev.why : moe_last_error());
    free(ev.route);
    if (st == MOE_OK && a.dump && dump(a.dump, m, &d, to.batch < 4 ? to.batch : 4)) st = MOE_ERR_IO;
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
