/*
 * `moe train`: train the byte-level MoE transformer (lm.h) end to end.
 * Data (lmdata.h): the fortunes corpus (default), the task corpus, or
 * --data FILE. AdamW with
 * linear warmup and cosine decay; periodic validation; checkpoints with the
 * optimizer and RNG state (ckpt.h) that resume bit for bit; a plot of the
 * losses and the expert load (plot.h).
 * Dimension key: B sequences per step, S context, T tokens per step (this
 * rank's), D model dim, H expert hidden dim, E experts, K top-k, L blocks.
 */
#include "ckpt.h"
#include "cli.h"
#include "ep.h"
#include "lmdata.h"
#include "plot.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *usage_text =
    "usage: moe train [options]\n"
    "\n"
    "Trains a byte-level decoder-only MoE transformer: L pre-norm blocks of causal\n"
    "self-attention with rotary position embeddings (RoPE) and an MoE layer, a head\n"
    "over 256 bytes, cross-entropy plus the layers' auxiliary losses. By default on\n"
    "Debian's fortune cookies in 8 languages (en de es it ru zh pl cs); it reports\n"
    "bits per byte per language and which experts each language uses.\n"
    "\n"
    "model:\n"
    "  --layer TYPE      topk|gshard|hierarchical|soft_dynamic|soft|dense (default topk)\n"
    "  --expert KIND     mlp|swiglu|geglu experts (topk; default swiglu); soft: mlp|geglu\n"
    "  --experts E       experts per layer (default 8; hierarchical: outer, see --inner)\n"
    "  --inner EI        hierarchical inner experts (default 2)\n"
    "  --top-k K         experts per token (topk; default 2)\n"
    "  --dim D           model dim (default 128)\n"
    "  --hidden H        expert hidden dim (default 128; soft: D * expert_mult 1)\n"
    "  --blocks L        transformer blocks (default 4)\n"
    "  --heads NH        attention heads (default 4; --dim / NH must be even)\n"
    "  --context S       sequence length in bytes, the attention window (default 256)\n"
    "  --rope-theta X    RoPE base (default 10000)\n"
    "  --group N         tokens per group for gshard/hierarchical/soft (default 64; groups\n"
    "                    lie within a sequence: --context must be a multiple of it). These\n"
    "                    layers and expert choice mix a group's tokens, so a position sees\n"
    "                    later bytes of its group: they are not causal (README: Training)\n"
    "  --router NAME     topk layers' router: mixtral (default: softmax top-K, renormalised,\n"
    "                    balance loss 0.01), topk (seed 004), switch, st_moe, deepseek_v3,\n"
    "                    expert_choice (README: Routers); the flags below refine it\n"
    "  --score F         topk_softmax|softmax|sigmoid\n"
    "  --capacity F      capacity factor, train and eval (0: dropless)\n"
    "  --balance F       Switch balance loss coefficient\n"
    "  --z-loss F        router z-loss coefficient\n"
    "  --jitter F        multiplicative jitter on the gate input in training\n"
    "  --shared N        shared experts on every token (DeepSeekMoE)\n"
    "  --shared-gate     weight each shared expert by a sigmoid gate (Qwen-MoE)\n"
    "  --groups G        experts in G groups; with --topk-groups M tokens choose\n"
    "  --topk-groups M   among the experts of their M best groups (DeepSeek-V3)\n"
    "  --bias-rate F     selection bias update rate (aux-loss-free balancing)\n"
    "  --dense           the same model with one plain FFN of the same active size\n"
    "                    (hidden K*H) per block, for comparison\n"
    "  --bf16            bf16 mixed precision (autocast) in the MoE blocks' experts\n"
    "                    (topk, gshard, hierarchical, --dense's FFN): bf16 GEMM inputs,\n"
    "                    fp32 accumulation, fp32 master weights and optimizer state;\n"
    "                    kept by checkpoints\n"
    "training:\n"
    "  --corpus NAME     fortunes (default: Debian's fortunes in 8 languages, installed by\n"
    "                    sh tools/deps.sh corpus) or tasks (generated copy/reverse/sort/add\n"
    "                    lines, with per-task accuracy)\n"
    "  --data FILE       train on a text file instead (90% train, 10% validation)\n"
    "  --steps N         total steps (default 2000)\n"
    "  --batch B         sequences of --context bytes per step (default 16)\n"
    "  --lr X            peak learning rate (default 3e-3), AdamW\n"
    "  --warmup N        linear warmup steps (default 200), then cosine decay\n"
    "  --min-lr F        final learning rate as a fraction of --lr (default 0.1)\n"
    "  --wd X            weight decay (default 0.01)\n"
    "  --eval-every N    validation and checkpoint every N steps (default 500); the last\n"
    "                    validation reads up to 128 KiB per language (or task)\n"
    "  --seed N          seed of init, data order and every random choice (default 1)\n"
    "  --threads N       threads (default: all cores)\n"
    "  --out DIR         run directory (default runs/train): checkpoint.safetensors,\n"
    "                    plot.svg, log.tsv\n"
    "  --resume FILE     continue from a checkpoint with its model and settings (only --out,\n"
    "                    --stop-at, --threads, --quiet and --ep may be given with it);\n"
    "                    N steps + resume + M steps gives the bits of N+M\n"
    "  --stop-at N       stop after step N (checkpoint written), as if interrupted\n"
    "  --quiet           print only the final summary\n"
    "  --ep              expert parallel under mpirun (mpirun -np P moe train --ep): each rank\n"
    "                    holds E/P experts of every block and trains on its --batch/P sequences of\n"
    "                    each step (data parallel; replicated gradients summed over the ranks);\n"
    "                    checkpoints are the one-process file (rank 0 writes it), resumable at\n"
    "                    any P dividing E; --threads per rank (default: the cores / P)\n";

typedef struct {
    double *step, *train, *val_step, *val, *load; /* load (n, E) shares of block 0 */
    int64_t n, n_val, cap, cap_val;
} history;

/* Resize *p to n doubles; on failure *p stays as it was. */
static int grow(double **p, int64_t n) {
    double *q = realloc(*p, (size_t)n * sizeof *q);
    if (!q) return -1;
    *p = q;
    return 0;
}

static int hist_push(history *h, double s, double loss, const double *load, int64_t E) {
    if (h->n == h->cap) {
        int64_t c = h->cap ? 2 * h->cap : 256;
        if (grow(&h->step, c) || grow(&h->train, c) || grow(&h->load, c * E)) return -1;
        h->cap = c;
    }
    h->step[h->n] = s, h->train[h->n] = loss;
    memcpy(h->load + h->n * E, load, (size_t)E * sizeof *load);
    h->n++;
    return 0;
}

static int hist_push_val(history *h, double s, double v) {
    if (h->n_val == h->cap_val) {
        int64_t c = h->cap_val ? 2 * h->cap_val : 64;
        if (grow(&h->val_step, c) || grow(&h->val, c)) return -1;
        h->cap_val = c;
    }
    h->val_step[h->n_val] = s, h->val[h->n_val] = v;
    h->n_val++;
    return 0;
}

static void write_plot(const char *path, const history *h, const lm_config *c, int64_t E) {
    char title[160];
    snprintf(title, sizeof title, "moe train: %s%s E=%d K=%d D=%lld L=%lld", c->dense ? "dense FFN " : "",
             moe_layer_type_name(c->moe.type), c->moe.num_experts, c->moe.top_k, (long long)c->D, (long long)c->L);
    plot_series loss[2] = {{"train", h->step, h->train, h->n}, {"validation", h->val_step, h->val, h->n_val}};
    plot_series *load = calloc((size_t)E, sizeof *load);
    double *ys = malloc((size_t)(E * (h->n ? h->n : 1)) * sizeof *ys);
    char(*labels)[32] = calloc((size_t)E, sizeof *labels);
    if (load && ys && labels) {
        for (int64_t e = 0; e < E; e++) {
            for (int64_t i = 0; i < h->n; i++) ys[e * h->n + i] = h->load[i * E + e];
            snprintf(labels[e], sizeof labels[e], "expert %lld", (long long)e);
            load[e] = (plot_series){labels[e], h->step, ys + e * h->n, h->n};
        }
        if (plot_write_svg(path, title, loss, 2, load, (int)E, 1.0 / (double)E))
            fprintf(stderr, "moe train: cannot write %s: %s\n", path, strerror(errno));
    }
    free(load), free(ys), free(labels);
}

static int mkdirs(const char *dir) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            if (mkdir(buf, 0777) && errno != EEXIST) return -1;
            *p = '/';
        }
    return (mkdir(buf, 0777) && errno != EEXIST) ? -1 : 0;
}

/* Test hook: MOE_FAULT_NAN_STEPS="5,7" poisons a gradient with NaN at those
 * steps, to show that such a step is skipped and changes nothing. */
static int fault_at(const char *list, int64_t step) {
    for (const char *p = list; p && *p;) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p) return 0;
        if (v == step) return 1;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return 0;
    }
    return 0;
}

static double lr_at(const train_opts *t, int64_t step) { /* step counts from 1 */
    if (step <= t->warmup) return t->lr * (double)step / (double)(t->warmup ? t->warmup : 1);
    double q = (double)(step - t->warmup) / (double)(t->steps > t->warmup ? t->steps - t->warmup : 1);
    return t->lr * (t->min_lr + (1.0 - t->min_lr) * 0.5 * (1.0 + cos(3.141592653589793 * (q > 1 ? 1 : q))));
}

static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Parse the model and training flags; returns 0 to go on, else an exit code. */
typedef struct {
    lm_config c;
    train_opts t;
    int64_t stop_at, threads, E, K, H, Ei;
    const char *corpus;
    int quiet, dense, have_H, have_K, ep, bf16;
    const char *router, *score;          /* router recipe and score function, or NULL */
    double cf, bal, zl, jit, rate;       /* router flags, NAN when not given           */
    int64_t shared, groups, topk_groups; /* -1 when not given                          */
    int shared_gate, router_flags;
    const char *out, *resume;
} train_args;

/* The router of a topk layer from --router and the flags that refine it. */
static int set_router(const train_args *a, moe_config *m) {
    if (a->router && moe_config_set_router(m, a->router) != MOE_OK) {
        fprintf(stderr, "moe train: --router: %s\n", moe_last_error());
        return 1;
    }
    if (a->have_K) m->top_k = (int)a->K; /* an explicit --top-k wins over a recipe's */
    if (a->score) {
        int k = -1;
        for (int j = 0; j <= MOE_SCORE_SIGMOID; j++)
            if (!strcmp(a->score, moe_score_func_name((moe_score_func)j))) k = j;
        if (k < 0) {
            fprintf(stderr, "moe train: --score: expected topk_softmax, softmax or sigmoid, got '%s'\n", a->score);
            return 1;
        }
        m->score = (moe_score_func)k;
    }
    if (!isnan(a->cf)) m->capacity_factor_train = m->capacity_factor_eval = a->cf;
    if (!isnan(a->bal)) m->balance_coef = a->bal;
    if (!isnan(a->zl)) m->z_loss_coef = a->zl;
    if (!isnan(a->jit)) m->jitter = a->jit;
    if (!isnan(a->rate)) m->bias_update_rate = a->rate, m->expert_bias = m->expert_bias || a->rate > 0;
    if (a->shared >= 0) m->num_shared = (int)a->shared;
    if (a->groups >= 0) m->num_groups = (int)a->groups;
    if (a->topk_groups >= 0) m->topk_groups = (int)a->topk_groups;
    if (a->shared_gate) m->shared_gate = 1;
    return 0;
}

static int parse(train_args *a, int argc, char **argv) {
    const char *cmd = "train";
    memset(a, 0, sizeof *a);
    lm_config *c = &a->c;
    c->S = 256, c->D = 128, c->L = 4, c->heads = 4, c->rope_theta = 10000.0, c->group = 64;
    moe_layer_type type = MOE_LAYER_TOPK;
    moe_expert_kind kind = MOE_EXPERT_SWIGLU;
    int have_kind = 0;
    a->E = 8, a->K = 2, a->H = 128, a->Ei = 2;
    train_opts *t = &a->t;
    t->steps = 2000, t->batch = 16, t->warmup = 200, t->eval_every = 500, t->seed = 1;
    t->lr = 3e-3, t->min_lr = 0.1, t->weight_decay = 0.01;
    a->out = "runs/train";
    a->cf = a->bal = a->zl = a->jit = a->rate = NAN;
    a->shared = a->groups = a->topk_groups = -1;
    int bad = 0;
    char fixed_by_ckpt[64] = ""; /* the first flag a --resume cannot honour */
    for (int i = 1; i < argc && !bad; i++) {
        const char *v;
        double r;
        {
            static const char *const free_flags[] = {"--resume", "--out", "--stop-at", "--threads", "--quiet", "--ep"};
            size_t n = strcspn(argv[i], "=");
            int free_flag = strncmp(argv[i], "--", 2) != 0;
            for (size_t k = 0; k < sizeof free_flags / sizeof free_flags[0] && !free_flag; k++)
                free_flag = strlen(free_flags[k]) == n && !strncmp(argv[i], free_flags[k], n);
            if (!free_flag && !fixed_by_ckpt[0]) snprintf(fixed_by_ckpt, sizeof fixed_by_ckpt, "%.*s", (int)n, argv[i]);
        }
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage_text, stdout);
            return -1;
        }
#define INT_FLAG(flag, lo, hi, dst)                                                                                \
    else if ((v = cli_flag(argc, argv, &i, flag, &bad))) {                                                         \
        if (!cli_int(cmd, flag, v, lo, hi, &(dst))) return 2;                                                      \
    }
        INT_FLAG("--experts", 1, 4096, a->E)
        INT_FLAG("--inner", 1, 4096, a->Ei)
        INT_FLAG("--shared", 0, 1024, a->shared)
        INT_FLAG("--groups", 1, 65536, a->groups)
        INT_FLAG("--topk-groups", 1, 65536, a->topk_groups)
        INT_FLAG("--dim", 1, 8192, c->D)
        INT_FLAG("--blocks", 1, 64, c->L)
        INT_FLAG("--heads", 1, 4096, c->heads)
        INT_FLAG("--context", 1, 65536, c->S)
        INT_FLAG("--group", 1, 1 << 20, c->group)
        INT_FLAG("--steps", 1, 100000000, t->steps)
        INT_FLAG("--batch", 1, 1 << 20, t->batch)
        INT_FLAG("--warmup", 0, 100000000, t->warmup)
        INT_FLAG("--eval-every", 1, 100000000, t->eval_every)
        INT_FLAG("--seed", 0, INT64_MAX / 2, t->seed)
        INT_FLAG("--threads", 1, 1024, a->threads)
        INT_FLAG("--stop-at", 1, 100000000, a->stop_at)
#undef INT_FLAG
        else if ((v = cli_flag(argc, argv, &i, "--top-k", &bad))) {
            if (!cli_int(cmd, "--top-k", v, 1, 4096, &a->K)) return 2;
            a->have_K = 1;
        } else if ((v = cli_flag(argc, argv, &i, "--router", &bad))) {
            a->router = v;
        } else if ((v = cli_flag(argc, argv, &i, "--score", &bad))) {
            a->score = v;
        } else if ((v = cli_flag(argc, argv, &i, "--capacity", &bad))) {
            if (!cli_float(cmd, "--capacity", v, 0, 1e6, &a->cf)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--balance", &bad))) {
            if (!cli_float(cmd, "--balance", v, 0, 1e6, &a->bal)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--z-loss", &bad))) {
            if (!cli_float(cmd, "--z-loss", v, 0, 1e6, &a->zl)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--jitter", &bad))) {
            if (!cli_float(cmd, "--jitter", v, 0, 0.999, &a->jit)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--bias-rate", &bad))) {
            if (!cli_float(cmd, "--bias-rate", v, 0, 1e6, &a->rate)) return 2;
        } else if (!strcmp(argv[i], "--shared-gate")) {
            a->shared_gate = 1;
        } else if ((v = cli_flag(argc, argv, &i, "--hidden", &bad))) {
            if (!cli_int(cmd, "--hidden", v, 1, 1 << 16, &a->H)) return 2;
            a->have_H = 1;
        } else if ((v = cli_flag(argc, argv, &i, "--lr", &bad))) {
            if (!cli_float(cmd, "--lr", v, 0, 10, &t->lr)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--min-lr", &bad))) {
            if (!cli_float(cmd, "--min-lr", v, 0, 1, &t->min_lr)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--wd", &bad))) {
            if (!cli_float(cmd, "--wd", v, 0, 10, &r)) return 2;
            t->weight_decay = r;
        } else if ((v = cli_flag(argc, argv, &i, "--rope-theta", &bad))) {
            if (!cli_float(cmd, "--rope-theta", v, 1.0001, 1e12, &c->rope_theta)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--corpus", &bad))) {
            if (strcmp(v, "fortunes") && strcmp(v, "tasks")) {
                fprintf(stderr, "moe train: --corpus: expected fortunes or tasks, got '%s' (any other text: "
                                "--data FILE)\n", v);
                return 2;
            }
            a->corpus = v;
        } else if ((v = cli_flag(argc, argv, &i, "--data", &bad))) {
            snprintf(t->data, sizeof t->data, "%s", v);
        } else if ((v = cli_flag(argc, argv, &i, "--out", &bad))) {
            a->out = v;
        } else if ((v = cli_flag(argc, argv, &i, "--resume", &bad))) {
            a->resume = v;
        } else if ((v = cli_flag(argc, argv, &i, "--layer", &bad))) {
            int k = -1;
            for (int j = 0; j <= MOE_LAYER_SOFT; j++)
                if (!strcmp(v, moe_layer_type_name((moe_layer_type)j))) k = j;
            if (k < 0) {
                fprintf(stderr, "moe train: --layer: expected topk, gshard, hierarchical, soft_dynamic, soft or "
                                "dense, got '%s'\n", v);
                return 2;
            }
            type = (moe_layer_type)k;
        } else if ((v = cli_flag(argc, argv, &i, "--expert", &bad))) {
            int k = -1;
            for (int j = 0; j <= MOE_EXPERT_GEGLU; j++)
                if (!strcmp(v, moe_expert_kind_name((moe_expert_kind)j))) k = j;
            if (k < 0) {
                fprintf(stderr, "moe train: --expert: expected mlp, swiglu or geglu, got '%s'\n", v);
                return 2;
            }
            kind = (moe_expert_kind)k, have_kind = 1;
        } else if (!strcmp(argv[i], "--dense")) a->dense = 1;
        else if (!strcmp(argv[i], "--bf16")) a->bf16 = 1;
        else if (!strcmp(argv[i], "--quiet")) a->quiet = 1;
        else if (!strcmp(argv[i], "--ep")) a->ep = 1;
        else if (!bad) {
            fprintf(stderr, "moe train: unknown option '%s'\n\n%s", argv[i], usage_text);
            return 2;
        }
    }
    if (bad) return 2;
    a->router_flags = a->router || a->score || !isnan(a->cf) || !isnan(a->bal) || !isnan(a->zl) ||
                      !isnan(a->jit) || !isnan(a->rate) || a->shared >= 0 || a->groups >= 0 ||
                      a->topk_groups >= 0 || a->shared_gate;
    if (a->router_flags && (type != MOE_LAYER_TOPK || a->dense)) {
        fprintf(stderr, "moe train: the router flags (--router, --capacity, ...) are for --layer topk; "
                        "gshard and hierarchical route with the seed's top-2 gate\n");
        return 2;
    }
    if (a->have_K && type != MOE_LAYER_TOPK && !a->dense) {
        fprintf(stderr, "moe train: --top-k is for --layer topk (and --dense's width); %s routes with its own "
                        "rule (gshard and hierarchical: top-2)\n", moe_layer_type_name(type));
        return 2;
    }
    if (type == MOE_LAYER_TOPK && a->K > a->E) {
        fprintf(stderr, "moe train: --top-k %lld is more than --experts %lld; use --top-k <= --experts\n",
                (long long)a->K, (long long)a->E);
        return 2;
    }
    if (*t->data && a->corpus) {
        fprintf(stderr, "moe train: --data and --corpus both name the text: give one\n");
        return 2;
    }
    snprintf(t->corpus, sizeof t->corpus, "%s", *t->data ? "" : a->corpus ? a->corpus : "fortunes");
    if (a->resume && fixed_by_ckpt[0]) {
        fprintf(stderr, "moe train: --resume continues the checkpoint's model and settings: %s cannot change them "
                        "(with --resume: --out, --stop-at, --threads, --quiet, --ep); to change them, start a new "
                        "run\n", fixed_by_ckpt);
        return 2;
    }
    if (a->resume) return 0; /* the model and settings come from the checkpoint */
    moe_config *m = &c->moe;
    if (a->dense) { /* one plain FFN per block with the active size of K experts */
        moe_config_init(m, MOE_LAYER_TOPK);
        m->num_experts = 1, m->top_k = 1, m->hidden_dim = a->K * a->H, m->expert = kind;
        c->dense = 1;
    } else {
        moe_config_init(m, type);
        m->num_experts = (int)a->E, m->top_k = (int)a->K, m->hidden_dim = a->H;
        if (type == MOE_LAYER_TOPK || (type == MOE_LAYER_DENSE)) m->expert = kind;
        if (type == MOE_LAYER_DENSE) m->output_dim = c->D;
        if (type == MOE_LAYER_HIERARCHICAL) m->num_experts_inner = (int)a->Ei;
        if (type == MOE_LAYER_TOPK && !a->router) a->router = "mixtral"; /* balance loss 0.01 */
        if (type == MOE_LAYER_TOPK && set_router(a, m)) return 2;
        if (type == MOE_LAYER_SOFT_DYNAMIC || type == MOE_LAYER_SOFT) {
            if (have_kind && kind == MOE_EXPERT_SWIGLU) {
                fprintf(stderr, "moe train: --expert: soft layers take mlp (GELU) or geglu experts\n");
                return 2;
            }
            m->expert = have_kind ? kind : MOE_EXPERT_MLP;
            m->hidden_dim = a->have_H ? a->H : 0;
            m->expert_mult = 1.0;
            m->slots_per_expert = c->group / a->E > 0 ? c->group / a->E : 1;
        } else if (type != MOE_LAYER_TOPK && have_kind && kind != MOE_EXPERT_MLP) {
            fprintf(stderr, "moe train: --expert: %s layers have MLP experts only\n", moe_layer_type_name(type));
            return 2;
        }
    }
    m->seed = (uint64_t)t->seed;
    if (a->bf16 && !(type == MOE_LAYER_TOPK || type == MOE_LAYER_GSHARD || type == MOE_LAYER_HIERARCHICAL ||
                     a->dense)) {
        fprintf(stderr, "moe train: --bf16 is implemented for --layer topk, gshard and hierarchical (and "
                        "--dense), not %s: leave --bf16 out to train it in fp32\n", moe_layer_type_name(type));
        return 2;
    }
    m->bf16 = a->bf16;
    if (type != MOE_LAYER_TOPK && type != MOE_LAYER_DENSE && !a->dense && c->S % c->group) {
        fprintf(stderr, "moe train: --context %lld is not a multiple of --group %lld (%s layers route groups "
                        "of tokens within each sequence)\n", (long long)c->S, (long long)c->group,
                moe_layer_type_name(type));
        return 2;
    }
    char why[200];
    if (lm_config_check(c, why, sizeof why)) {
        fprintf(stderr, "moe train: %s\n", why);
        return 2;
    }
    return 0;
}

/* 1 if every gradient of the model is finite (expert parallel: on every rank) */
static int grads_finite(lm *m, int ep) {
    int ok = 1;
    for (int i = 0; i < lm_num_params(m) && ok; i++)
        for (int64_t j = 0; j < lm_params(m)[i].numel && ok; j++) ok = isfinite(lm_params(m)[i].grad[j]);
    return ep ? cli_ep_all_ok(ok) : ok;
}

static int train_main(train_args *a, cli_ep *ep);

int cmd_train(int argc, char **argv) {
    train_args a;
    int rc = parse(&a, argc, argv);
    if (rc) return rc < 0 ? 0 : rc;
    cli_ep ep = {0, 1};
    if (a.ep) { /* expert parallel: MPI, the sharded layers, threads per rank */
        if (cli_ep_start(&ep, "train", &argc, &argv)) return 1;
        lm_set_layer_creator(cli_ep_create);
        int64_t cores = moe_set_num_threads(0);
        if (!a.threads) a.threads = cores / ep.size > 0 ? cores / ep.size : 1;
        if (ep.rank) a.quiet = 1;
    }
    rc = train_main(&a, &ep);
    if (a.ep) {
        rc = cli_ep_all_ok(rc == 0) ? 0 : 1; /* every rank exits with the worst code */
        cli_ep_stop();
    }
    return rc;
}

static int train_main(train_args *ap, cli_ep *ep) {
    train_args a = *ap;
    int rc, r0 = ep->rank == 0, P = ep->size;
    a.threads = moe_set_num_threads((int)a.threads);
    lm *m = NULL;
    moe_optim *opt = NULL;
    int64_t step = 0;
    lm_config c = a.c;
    train_opts t = a.t;
    char msg[1024];
    if (a.resume) {
        moe_status st = ckpt_load(a.resume, &m, &opt, &step, &t, msg, sizeof msg);
        if (a.ep && !cli_ep_all_ok(st == MOE_OK)) st = st == MOE_OK ? MOE_ERR_IO : st;
        if (st != MOE_OK) {
            fprintf(stderr, "moe train: --resume: %s\n", st == MOE_ERR_IO && !*msg ? "another rank failed" : msg);
            if (m) moe_optim_free(opt), lm_free(m);
            return 1;
        }
        c = *lm_get_config(m);
        int64_t last = a.stop_at && a.stop_at < t.steps ? a.stop_at : t.steps;
        if (step >= last) { /* nothing left: no files touched */
            if (r0)
                printf("moe train: %s is at step %lld%s: nothing to train (a run of more steps starts anew)\n",
                       a.resume, (long long)step,
                       a.stop_at && a.stop_at < t.steps ? ", not before --stop-at" : ", the end of its schedule");
            moe_optim_free(opt), lm_free(m);
            return 0;
        }
    } else {
        moe_status st = lm_create(&m, &c);
        if (st != MOE_OK) return cli_fail("train", "model", st);
        moe_optim_config oc;
        moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
        oc.weight_decay = (float)t.weight_decay;
        if ((st = moe_optim_create(&opt, &oc, lm_params(m), lm_num_params(m))) != MOE_OK) {
            lm_free(m);
            return cli_fail("train", "optimizer", st);
        }
    }
    /* data parallel: each rank its share of every step's batch */
    int has_groups = c.moe.type != MOE_LAYER_TOPK && c.moe.type != MOE_LAYER_DENSE && !c.dense;
    (void)has_groups; /* groups lie within sequences (--context is a multiple of --group) */
    if (a.ep && t.batch % P) {
        if (r0)
            fprintf(stderr, "moe train: --ep: --batch %lld sequences must split into %d equal shares\n",
                    (long long)t.batch, P);
        moe_optim_free(opt), lm_free(m);
        return 2;
    }
    lm_set_data_parallel(m, P);
    if (a.ep) lmdata_set_data_parallel(ep->rank, P, cli_ep_sum_f64);
    lm_data d;
    history h = {0};
    uint8_t *ctx = NULL, *tgt = NULL;
    double *load = NULL, *load_acc = NULL;
    char ckpt[4200], plot[4200], logp[4200];
    FILE *logf = NULL;
    rc = 1;
    int ok = !lmdata_load(&d, "train", t.corpus, t.data, (uint64_t)t.seed);
    if (ok && (d.n_train < c.S + 2 || d.n_val < c.S + 2)) {
        fprintf(stderr, "moe train: the training text (%lld bytes) or validation text (%lld bytes) is shorter "
                        "than --context %lld plus 2; give more text or a shorter --context\n", (long long)d.n_train,
                (long long)d.n_val, (long long)c.S);
        ok = 0;
    }
    if (ok && r0 && mkdirs(a.out)) {
        fprintf(stderr, "moe train: --out: cannot create directory %s: %s\n", a.out, strerror(errno));
        ok = 0;
    }
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint.safetensors", a.out);
    snprintf(plot, sizeof plot, "%s/plot.svg", a.out);
    snprintf(logp, sizeof logp, "%s/log.tsv", a.out);
    if (ok && r0 && !(logf = fopen(logp, step ? "a" : "w"))) {
        fprintf(stderr, "moe train: cannot write %s: %s\n", logp, strerror(errno));
        ok = 0;
    }
    if (a.ep) ok = cli_ep_all_ok(ok);
    if (!ok) goto done;
    if (!step && logf) fprintf(logf, "step\tlr\ttrain_loss\tval_loss\ttokens_per_s\tload_max_mean\n");
    /* B sequences of S bytes per step; this rank's share: Bl of them from j0 */
    int64_t S = c.S, B = t.batch, Bl = B / P, T = Bl * S, L = c.L, j0 = (int64_t)ep->rank * Bl;
    moe_stats s0;
    moe_layer_stats(lm_layer(m, 0), &s0);
    int64_t E = s0.n_experts;
    ctx = malloc((size_t)T), tgt = malloc((size_t)T);
    load = calloc((size_t)(L * E), sizeof *load), load_acc = calloc((size_t)(2 * L * E), sizeof *load_acc);
    if (!ctx || !tgt || !load || !load_acc) {
        fprintf(stderr, "moe train: out of memory for a batch of %lld x %lld bytes\n", (long long)B, (long long)S);
        goto done;
    }
    int tty = cli_isatty_err() && !a.quiet;
    int64_t end = a.stop_at && a.stop_at < t.steps ? a.stop_at : t.steps;
    if (!a.quiet)
        printf("moe train: transformer, %s%s, E=%lld K=%d D=%lld L=%lld heads=%lld context=%lld, %lld parameters; "
               "%s; %lld steps of %lld x %lld bytes, %lld thread%s%s%s\n", c.dense ? "dense FFN (" : "",
               moe_layer_type_name(c.moe.type), (long long)E, c.moe.top_k, (long long)c.D, (long long)L,
               (long long)c.heads, (long long)S, (long long)lm_num_weights(m), d.desc, (long long)t.steps,
               (long long)B, (long long)S, (long long)a.threads, a.threads == 1 ? "" : "s", c.dense ? ")" : "",
               c.moe.bf16 ? (moe_cpu_isa() == MOE_ISA_AVX512_BF16 ? ", bf16 (native bf16 dot products)"
                                                               : ", bf16 (widened to fp32: no bf16 dot products at this "
                                                                 "kernel level)")
                          : "");
    if (r0 && !c.dense &&
        (c.moe.type == MOE_LAYER_GSHARD || c.moe.type == MOE_LAYER_HIERARCHICAL || c.moe.type == MOE_LAYER_SOFT ||
         c.moe.type == MOE_LAYER_SOFT_DYNAMIC || (c.moe.type == MOE_LAYER_TOPK && c.moe.router == MOE_ROUTER_EXPERT_CHOICE)))
        fprintf(stderr, "moe train: note: %s mixes the tokens of a group (capacity, slots or expert choice), so a "
                        "position's output depends on later bytes of its group: not causal, and its bits/byte are "
                        "optimistic; a causal language model takes a token-choice router (--layer topk)\n",
                c.moe.type == MOE_LAYER_TOPK ? "expert choice" : moe_layer_type_name(c.moe.type));
    if (!a.quiet && c.moe.type == MOE_LAYER_TOPK && !c.dense) {
        const moe_config *r = &c.moe;
        printf("router: %s, score %s%s, capacity %g/%g%s, balance %g, z-loss %g, jitter %g, shared %d%s, "
               "groups %d/%d, selection bias %s (rate %g)\n", moe_router_kind_name(r->router),
               moe_score_func_name(r->score), r->normalize ? " renormalised" : "", r->capacity_factor_train,
               r->capacity_factor_eval, r->capacity_factor_train > 0 ? "" : " (dropless)", r->balance_coef,
               r->z_loss_coef, r->jitter, r->num_shared, r->shared_gate ? " gated" : "",
               r->topk_groups ? r->topk_groups : (r->num_groups > 1 ? r->num_groups : 1),
               r->num_groups > 1 ? r->num_groups : 1, r->expert_bias ? "on" : "off", r->bias_update_rate);
    }
    double t_start = cli_now(), t_last = t_start, loss_acc = 0, val = NAN, last_train = NAN;
    int64_t n_acc = 0, step0 = step, skipped = 0, in_a_row = 0;
    const char *fault = getenv("MOE_FAULT_NAN_STEPS");
    lm_eval ev = {0};
    for (step = step + 1; step <= end; step++) {
        /* the step's batch: positions from a counter-based stream of (seed, step) */
        uint64_t base = mix64((uint64_t)t.seed * 0x51ED27ull ^ (uint64_t)step * 0x9E3779B97F4A7C15ull);
        for (int64_t j = 0; j < Bl; j++) { /* expert parallel: this rank's share [j0, j0 + Bl) */
            int64_t p = (int64_t)(mix64(base + (uint64_t)(j0 + j)) % (uint64_t)(d.n_train - S));
            lmdata_sequence(ctx + j * S, tgt + j * S, d.train, p, S);
        }
        double loss = NAN;
        lm_zero_grad(m);
        moe_status st = lm_forward(m, &loss, NULL, NULL, ctx, tgt, Bl, S, 1);
        if (a.ep && st == MOE_OK) cli_ep_sum_f64(&loss, 1); /* the ranks' shares: the global loss */
        int bad_loss = st == MOE_OK && !isfinite(loss);
        if (bad_loss) st = MOE_ERR_NONFINITE;
        if (st == MOE_OK) st = lm_backward(m);
        if (st == MOE_OK && a.ep) st = lm_sum_grads(m, cli_ep_sum_f32); /* replicated gradients summed */
        if (st == MOE_OK && fault_at(fault, step)) lm_params(m)[0].grad[0] = NAN; /* test hook */
        int bad_grads = st == MOE_OK && a.ep && !grads_finite(m, 1); /* every rank skips, or none */
        if (bad_grads) st = MOE_ERR_NONFINITE;
        moe_optim_set_lr(opt, (float)lr_at(&t, step));
        if (st == MOE_OK) st = moe_optim_step(opt); /* refuses non-finite gradients, changing nothing */
        for (int64_t l = 0; l < L && st == MOE_OK; l++) st = moe_layer_update_bias(lm_layer(m, l));
        if (st == MOE_ERR_NONFINITE) { /* skip the step: parameters and optimizer state as they were */
            skipped++, in_a_row++;
            if (skipped <= 5 || skipped % 100 == 0)
                fprintf(stderr, "%smoe train: step %lld: %s (%lld skipped so far; parameters and optimizer state "
                                "unchanged)\n", tty ? "\n" : "", (long long)step,
                        bad_loss ? (isnan(loss) ? "the loss is NaN; step skipped" : "the loss is Inf; step skipped")
                        : bad_grads ? "a gradient is NaN or Inf on some rank; step skipped" : moe_last_error(),
                        (long long)skipped);
            if (in_a_row >= 50) {
                fprintf(stderr, "moe train: %lld steps in a row had a non-finite loss or gradients: training "
                                "diverged; train again with a lower --lr (the last checkpoint holds the state before "
                                "it)\n", (long long)in_a_row);
                goto done;
            }
        } else if (st != MOE_OK) {
            fprintf(stderr, "\nmoe train: step %lld failed: %s: %s (parameters are as after step %lld)\n",
                    (long long)step, moe_status_str(st), moe_last_error(), (long long)step - 1);
            goto done;
        } else {
            in_a_row = 0;
            loss_acc += loss, n_acc++;
        }
        if (st == MOE_OK) {
            double *step_load = load_acc + L * E; /* scratch after the totals */
            for (int64_t l = 0; l < L; l++) {
                moe_stats s;
                moe_layer_stats(lm_layer(m, l), &s);
                for (int64_t e = 0; e < E; e++) step_load[l * E + e] = (double)s.expert_counts[e];
            }
            if (a.ep) cli_ep_sum_f64(step_load, (int)(L * E)); /* every rank's rows */
            for (int64_t i = 0; i < L * E; i++) load[i] += step_load[i];
        }
        double now = cli_now();
        int eval_now = step % t.eval_every == 0 || step == end;
        int log_now = eval_now || step % 50 == 0;
        double load_ratio = 0; /* the interval's busiest expert / mean, worst block */
        if (log_now && n_acc) {
            for (int64_t l = 0; l < L; l++) {
                double tot = 0, mx = 0;
                for (int64_t e = 0; e < E; e++) tot += load[l * E + e], mx = fmax(mx, load[l * E + e]);
                if (tot > 0) load_ratio = fmax(load_ratio, mx * (double)E / tot);
            }
            last_train = loss_acc / (double)n_acc;
            double sh[LMDATA_MAX_EXPERTS], tot = 0;
            for (int64_t e = 0; e < E; e++) tot += load[e];
            for (int64_t e = 0; e < E && e < LMDATA_MAX_EXPERTS; e++) sh[e] = tot > 0 ? load[e] / tot : 0;
            for (int64_t i = 0; i < L * E; i++) load_acc[i] += load[i], load[i] = 0;
            hist_push(&h, (double)step, last_train, sh, E);
            loss_acc = 0, n_acc = 0;
        }
        if (eval_now) {
            if ((a.ep ? ckpt_save_gathered(ckpt, m, opt, step, &t, ep->rank, cli_ep_gather_bytes)
                      : ckpt_save(ckpt, m, opt, step, &t)) != MOE_OK)
                fprintf(stderr, "\nmoe train: cannot write checkpoint %s: %s\n", ckpt, moe_last_error());
            /* validation must not move the layers' random streams: a resumed run
             * validates at other steps than an uninterrupted one */
            uint64_t pos[64];
            for (int64_t l = 0; l < L && l < 64; l++) pos[l] = moe_layer_rng_position(lm_layer(m, l));
            free(ev.route);
            /* during training a sample of each class; at the end up to 128 KiB of each */
            if (lmdata_evaluate(&ev, m, &d, B, step == end ? 131072 : 16384) == MOE_OK) val = ev.loss;
            for (int64_t l = 0; l < L && l < 64; l++) moe_layer_set_rng_position(lm_layer(m, l), pos[l]);
            hist_push_val(&h, (double)step, val);
            if (r0) write_plot(plot, &h, &c, E);
        }
        double tps = (double)((step - step0) * B * S) / (now - t_start + 1e-9);
        double eta = (double)(end - step) * (now - t_start) / (double)(step - step0);
        if (log_now && logf) {
            char vs[32] = "";
            if (eval_now) snprintf(vs, sizeof vs, "%.5f", val);
            fprintf(logf, "%lld\t%.6g\t%.5f\t%s\t%.0f\t%.3f\n", (long long)step, lr_at(&t, step), last_train, vs,
                    tps, load_ratio);
            fflush(logf);
        }
        if (tty && (now - t_last > 0.1 || eval_now)) {
            fprintf(stderr, "\rstep %6lld/%lld  loss %.4f  val %.4f  %7.0f tok/s  ETA %5.0fs ", (long long)step,
                    (long long)t.steps, n_acc ? loss_acc / (double)n_acc : last_train, val, tps, eta);
            t_last = now;
        } else if (!tty && !a.quiet && eval_now) {
            printf("step %lld/%lld  train loss %.4f  validation loss %.4f  %.0f tokens/s\n", (long long)step,
                   (long long)t.steps, last_train, val, tps);
            fflush(stdout);
        }
    }
    if (tty) fprintf(stderr, "\n");
    double secs = cli_now() - t_start;
    if (!r0) { /* the summary is rank 0's */
        free(ev.route);
        rc = 0;
        goto done;
    }
    printf("\nmodel: %s%s, E=%lld K=%d D=%lld L=%lld, %lld parameters\n", c.dense ? "dense FFN (one expert) " : "",
           moe_layer_type_name(c.moe.type), (long long)E, c.moe.top_k, (long long)c.D, (long long)L,
           (long long)lm_num_weights(m));
    double tps = (double)((end - step0) * B * S) / (secs > 0 ? secs : 1e-9);
    printf("trained steps %lld..%lld in %.1f s; final train loss %.4f (nats/byte, with the auxiliary losses)\n",
           (long long)step0 + 1, (long long)end, secs, last_train);
    if (end > step0) {
        /* model FLOP utilisation: 3 passes (forward, and backward's two) of 2 FLOPs per multiply-add,
         * against the FMA peak of the precision measured now (validation and checkpoints included) */
        /* bf16 below avx512_bf16 runs widened to fp32: the fp32 peak is the ceiling there */
        double flops = tps * 6.0 * lm_macs_per_token(m, S), peak = cli_peak_gflops(c.moe.bf16, (int)a.threads);
        int native16 = c.moe.bf16 && peak > 0;
        if (!native16) peak = cli_peak_gflops(0, (int)a.threads);
        printf("throughput %.0f tokens/s, %.1f GFLOP/s of model FLOPs = %.2f of the %s peak of level %s (%.0f "
               "GFLOP/s, %lld threads)\n", tps, flops * 1e-9, peak > 0 ? flops * 1e-9 / peak : 0.0,
               native16 ? "bf16 dot" : "fp32 FMA", moe_isa_name(moe_cpu_isa()), peak, (long long)a.threads);
    }
    if (skipped)
        printf("skipped %lld steps with a non-finite loss or gradients (parameters unchanged by them)\n",
               (long long)skipped);
    if (ev.route) lmdata_print_eval(stdout, &ev, m, &d);
    printf("\nexpert load over training (rows per expert / mean):\n");
    for (int64_t l = 0; l < L; l++) {
        double tot = 0, mx = 0;
        for (int64_t e = 0; e < E; e++) tot += load_acc[l * E + e], mx = fmax(mx, load_acc[l * E + e]);
        double mean = tot / (double)E;
        printf("  block %lld: mean %.0f rows per expert, max/mean %.2f\n", (long long)l, mean,
               mean > 0 ? mx / mean : 0.0);
    }
    for (int64_t l = 0; l < L; l++) { /* DeepSeek-V3 selection bias, where there is one */
        moe_stats s;
        moe_layer_stats(lm_layer(m, l), &s);
        if (!s.expert_bias) continue;
        printf("%s  block %lld:", l ? "" : "\nselection bias per expert (aux-loss-free balancing):\n", (long long)l);
        for (int64_t e = 0; e < E; e++) printf(" %+.3f", s.expert_bias[e]);
        printf("\n");
    }
    printf("\nfiles: %s (checkpoint: weights, optimizer, step %lld)\n       %s (loss and expert load)\n"
           "       %s (log)\n", ckpt, (long long)end, plot, logp);
    free(ev.route);
    rc = 0;
done:
    if (logf) fclose(logf);
    free(ctx), free(tgt), free(load), free(load_acc);
    free(h.step), free(h.train), free(h.val_step), free(h.val), free(h.load);
    lmdata_free(&d);
    moe_optim_free(opt);
    lm_free(m);
    return rc;
}
