/*
 * `moe forward`: run one layer on tensors a PyTorch user saved, and write the
 * output (and, with --grad-output, every gradient) as safetensors.
 * Dimension key: T tokens (product of x's leading dims), D input dim, O output dim,
 * B groups and N tokens per group (x (..., N, D): N is the second-last dim,
 * B the product of the dims before it; a 1-D or 2-D x is one group). For the
 * soft layers a 4-D x is an image batch (B, D, h, w) with N = h*w.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *usage_text =
    "usage: moe forward --config LAYER.json --weights W.safetensors --input X.safetensors\n"
    "                   --out OUT.safetensors [--grad-output DY.safetensors] [--eval]\n"
    "                   [--seed N] [--threads N] [--top-k K] [--mask-experts LIST]\n"
    "                   [--force-experts LIST] [--stats] [--bf16 | --bf16-weights] [--ep]\n"
    "\n"
    "Runs one MoE layer forward (and backward) on tensors saved from PyTorch.\n"
    "  --config FILE       JSON: {\"type\": \"topk\"|\"dense\"|\"gshard\"|\"hierarchical\"|\n"
    "                      \"soft_dynamic\"|\"soft\", and the seed module's constructor\n"
    "                      arguments: topk and dense: num_experts,\n"
    "                      input_dim, hidden_dim, output_dim, top_k, activation\n"
    "                      (relu|gelu|silu|leaky_relu), expert (mlp|swiglu|geglu); gshard and\n"
    "                      hierarchical: dim, num_experts (a pair [outer, inner] for\n"
    "                      hierarchical), hidden_dim, activation, second_policy_train/_eval\n"
    "                      (all|none|threshold|random), second_threshold_train/_eval,\n"
    "                      capacity_factor_train/_eval, loss_coef; soft_dynamic and soft: dim,\n"
    "                      num_experts, expert_mult, dropout, geglu (true|false); soft also\n"
    "                      num_slots (slots per expert) or seq_len; topk routers: router\n"
    "                      (topk|switch|mixtral|st_moe|deepseek_v3|expert_choice), score\n"
    "                      (topk_softmax|softmax|sigmoid), normalize, route_scale,\n"
    "                      capacity_factor (0: dropless), jitter, balance_coef, z_loss_coef,\n"
    "                      num_shared_experts, shared_gate, expert_bias, bias_update_rate,\n"
    "                      num_groups, topk_groups (README: Routers)}\n"
    "  --weights FILE      the module's state_dict as safetensors (names as PyTorch's); without\n"
    "                      it the parameters are initialised from the seed\n"
    "  --input FILE        tensor 'x' (..., D) float32 (F64/F16/BF16 are converted); for\n"
    "                      gshard, hierarchical and soft (B, N, D): B sequences of N tokens;\n"
    "                      soft layers also take an image batch (B, D, h, w) and an optional\n"
    "                      tensor 'mask' (B, N) (images: (B, h*w) or (B, h, w)), BOOL or\n"
    "                      integer, nonzero for a real token\n"
    "  --out FILE          written: 'y' (..., O; an image's y is (B, D, h, w)),\n"
    "                      'aux_loss' (layers with one),\n"
    "                      'stats.expert_counts' (E; Eo*Ei for hierarchical), 'stats.dropped',\n"
    "                      for topk also 'stats.balance_loss', 'stats.z_loss', 'stats.capacity'\n"
    "                      and 'stats.expert_bias' (with expert_bias),\n"
    "                      and, with --grad-output, 'dx' and 'grad.<parameter name>' for\n"
    "                      every parameter\n"
    "  --grad-output FILE  tensor 'dy' (the shape of y) and optional scalar 'daux'\n"
    "                      (shape () or (1); default 1): runs the backward\n"
    "  --eval              eval mode (default: train mode), as module.eval(): eval\n"
    "                      policies and capacity, no dropout or jitter; with\n"
    "                      --grad-output the backward follows the eval forward\n"
    "  --seed N            overrides the config's seed (init and random choices)\n"
    "  --threads N         threads (default: all cores)\n"
    "  --top-k K           topk: route each token to K experts instead of the config's top_k\n"
    "  --mask-experts LIST topk: comma-separated experts to disable (they get no tokens)\n"
    "  --force-experts LIST topk: comma-separated experts every token uses (within its K)\n"
    "  --stats             print routing statistics (tokens per expert, dropped, bias)\n"
    "  --bf16              bf16 mixed precision (topk), as torch.autocast('cpu',\n"
    "                      dtype=torch.bfloat16) runs the experts: bf16 GEMM inputs, fp32\n"
    "                      accumulation, outputs, parameters, router and losses (config \"bf16\")\n"
    "  --bf16-weights      inference from bf16 weights: as --bf16, but the experts' weights are\n"
    "                      kept only in bf16 (a BF16 file's bytes as they are, never widened to\n"
    "                      fp32; half the memory); needs --weights, no --grad-output, no --ep\n"
    "  --ep                expert parallel under mpirun (mpirun -np P moe forward --ep ...; topk,\n"
    "                      gshard): rank 0 reads x and dy and splits the batch over the ranks by\n"
    "                      groups (x (B, N, D): B sequences; a 2-D x (T, D): P groups of T/P rows),\n"
    "                      every rank loads its experts from --weights, and rank 0 writes the file\n"
    "                      one process writes for the same groups (aux_loss and the stats over all\n"
    "                      groups, every grad.* with its global name)\n";

/* Parse a comma-separated list of expert indices in [0, E) into set (E). */
static int expert_list(uint8_t *set, const char *flag, const char *s, int E) {
    memset(set, 0, (size_t)E);
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v >= E || (*end && *end != ',')) {
            fprintf(stderr, "moe forward: %s: '%s' must be a comma-separated list of experts in [0, %d), "
                            "e.g. 0,3\n", flag, s, E);
            return 0;
        }
        set[v] = 1;
        p = *end ? end + 1 : end;
    }
    return 1;
}

int forward_add_grads(moe_st_entry **ents, int *n, char **names, moe_layer *l) {
    int np = moe_layer_num_params(l);
    moe_st_entry *grown = realloc(*ents, ((size_t)*n + (size_t)np) * sizeof **ents);
    if (!grown) return 0;
    *ents = grown;
    for (int i = 0; i < np; i++) {
        moe_param *p = moe_layer_param(l, i);
        size_t len = strlen(p->name) + 6;
        if (!(names[i] = malloc(len))) return 0;
        snprintf(names[i], len, "grad.%s", p->name);
        moe_st_entry *g = &grown[(*n)++];
        memset(g, 0, sizeof *g);
        g->name = names[i], g->dtype = MOE_DT_F32, g->ndim = p->ndim, g->data = p->grad;
        for (int d = 0; d < p->ndim; d++) g->shape[d] = p->shape[d];
    }
    return 1;
}

int forward_routing(moe_layer *l, const moe_config *cfg, int64_t top_k, const char *mask_list,
                    const char *force_list) {
    if (!top_k && !mask_list && !force_list) return 1;
    uint8_t *sets = calloc(2, (size_t)cfg->num_experts);
    int ok = sets && (!mask_list || expert_list(sets, "--mask-experts", mask_list, cfg->num_experts)) &&
             (!force_list || expert_list(sets + cfg->num_experts, "--force-experts", force_list, cfg->num_experts));
    if (ok && mask_list) /* the list names the disabled experts; the API takes the enabled ones */
        for (int e = 0; e < cfg->num_experts; e++) sets[e] = !sets[e];
    moe_status st;
    if (ok && (st = moe_layer_set_routing(l, (int)top_k, mask_list ? sets : NULL,
                                          force_list ? sets + cfg->num_experts : NULL)) != MOE_OK)
        ok = !cli_fail("forward", "routing control", st);
    free(sets);
    return ok;
}

/* Append a scalar (n == 0) or a vector of n elements to the output list. */
static void put(moe_st_entry *ents, int *n_ent, const char *name, moe_dtype dt, int64_t n, const void *data) {
    moe_st_entry *e = &ents[(*n_ent)++];
    e->name = name;
    e->dtype = dt;
    e->ndim = n > 0 ? 1 : 0;
    e->shape[0] = n;
    e->data = data;
}

/* --stats: one line per expert, then the totals. */
static void print_stats(const moe_stats *s) {
    printf("expert  tokens%s\n", s->expert_bias ? "      bias" : "");
    for (int e = 0; e < s->n_experts; e++) {
        printf("%6d  %6lld", e, (long long)s->expert_counts[e]);
        if (s->expert_bias) printf("  %+.6f", s->expert_bias[e]);
        printf("\n");
    }
    printf("tokens %lld, assignments %lld, dropped %lld", (long long)s->tokens, (long long)s->assignments,
           (long long)s->dropped);
    if (s->top_k) printf(", k %d, capacity %lld, balance loss %.6f, z-loss %.6f", s->top_k, (long long)s->capacity,
                         s->balance_loss, s->z_loss);
    printf("\n");
}

typedef struct {
    moe_st_file *f;
    float *data;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    int64_t rows; /* product of all dims but the last */
} tensor_in;

/* Load tensor `name` from path as float32; its last dim must be `width`
 * (width <= 0: any shape, the caller checks). */
static int load_rows(tensor_in *t, const char *path, const char *name, int64_t width, const char *flag) {
    memset(t, 0, sizeof *t);
    moe_status st = moe_st_open(&t->f, path);
    if (st != MOE_OK) return cli_fail("forward", flag, st);
    const moe_st_tensor *ti = moe_st_find(t->f, name);
    if (!ti) {
        fprintf(stderr, "moe forward: %s: %s has no tensor '%s'\n", flag, path, name);
        return 1;
    }
    if (width > 0 && (ti->ndim < 1 || ti->shape[ti->ndim - 1] != width)) {
        fprintf(stderr, "moe forward: %s: tensor '%s' in %s must be (..., %lld); its last dim is %lld\n",
                flag, name, path, (long long)width, ti->ndim ? (long long)ti->shape[ti->ndim - 1] : 0LL);
        return 1;
    }
    t->ndim = ti->ndim;
    memcpy(t->shape, ti->shape, sizeof t->shape);
    t->rows = width > 0 ? ti->numel / width : ti->numel;
    t->data = malloc((size_t)(ti->numel ? ti->numel : 1) * sizeof(float));
    if (!t->data) {
        fprintf(stderr, "moe forward: out of memory reading %s\n", path);
        return 1;
    }
    st = moe_st_read_f32(t->data, t->f, name, -1, NULL);
    if (st != MOE_OK) return cli_fail("forward", flag, st);
    return 0;
}

/* The optional 'mask' of the input file as bytes (1 real token), shape
 * checked against B groups of N tokens. *out stays NULL when there is none.
 * Returns 0 on success. */
static int load_mask(uint8_t **out, const moe_st_file *f, const char *path, int64_t B, int64_t N, int image,
                     int64_t h, int64_t w) {
    *out = NULL;
    const moe_st_tensor *t = moe_st_find(f, "mask");
    if (!t) return 0;
    if (t->dtype == MOE_DT_F64 || t->dtype == MOE_DT_F32 || t->dtype == MOE_DT_F16 || t->dtype == MOE_DT_BF16 ||
        t->dtype == MOE_DT_F8_E4M3 || t->dtype == MOE_DT_F8_E5M2) {
        fprintf(stderr, "moe forward: --input: 'mask' in %s has dtype %s; a mask must be BOOL or an integer "
                        "dtype (save it as torch.bool)\n", path, moe_dtype_name(t->dtype));
        return 1;
    }
    int ok = (t->ndim == 2 && t->shape[0] == B && t->shape[1] == N) || (B == 1 && t->ndim == 1 && t->shape[0] == N) ||
             (image && t->ndim == 3 && t->shape[0] == B && t->shape[1] == h && t->shape[2] == w);
    if (!ok) {
        char got[160] = "";
        size_t o = 0;
        for (int d = 0; d < t->ndim && o < sizeof got - 24; d++)
            o += (size_t)snprintf(got + o, sizeof got - o, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        fprintf(stderr, "moe forward: --input: 'mask' in %s is (%s); it must be (B, N) = (%lld, %lld)%s, one "
                        "entry per token of x\n", path, got, (long long)B, (long long)N,
                image ? " or (B, h, w)" : "");
        return 1;
    }
    size_t es = moe_dtype_size(t->dtype);
    uint8_t *m = malloc((size_t)(B * N));
    if (!m) {
        fprintf(stderr, "moe forward: out of memory reading the mask\n");
        return 1;
    }
    const unsigned char *src = t->data;
    for (int64_t i = 0; i < B * N; i++) { /* an element is nonzero when any of its bytes is */
        uint8_t v = 0;
        for (size_t k = 0; k < es; k++) v |= src[(size_t)i * es + k];
        m[i] = v != 0;
    }
    *out = m;
    return 0;
}

static void free_rows(tensor_in *t) {
    free(t->data);
    moe_st_close(t->f);
}

int cmd_forward(int argc, char **argv) {
    const char *cfg_path = NULL, *w_path = NULL, *x_path = NULL, *out_path = NULL, *dy_path = NULL;
    const char *mask_list = NULL, *force_list = NULL;
    int eval = 0, bad = 0, have_seed = 0, show_stats = 0, use_ep = 0, bf16 = 0;
    int64_t seed = 0, threads = 0, top_k = 0;
    for (int i = 1; i < argc && !bad; i++) {
        const char *v;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage_text, stdout);
            return 0;
        } else if ((v = cli_flag(argc, argv, &i, "--config", &bad))) cfg_path = v;
        else if ((v = cli_flag(argc, argv, &i, "--weights", &bad))) w_path = v;
        else if ((v = cli_flag(argc, argv, &i, "--input", &bad))) x_path = v;
        else if ((v = cli_flag(argc, argv, &i, "--out", &bad))) out_path = v;
        else if ((v = cli_flag(argc, argv, &i, "--grad-output", &bad))) dy_path = v;
        else if ((v = cli_flag(argc, argv, &i, "--seed", &bad))) {
            if (!cli_int("forward", "--seed", v, 0, INT64_MAX / 2, &seed)) return 2;
            have_seed = 1;
        } else if ((v = cli_flag(argc, argv, &i, "--threads", &bad))) {
            if (!cli_int("forward", "--threads", v, 1, 1024, &threads)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--top-k", &bad))) {
            if (!cli_int("forward", "--top-k", v, 1, 65536, &top_k)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--mask-experts", &bad))) mask_list = v;
        else if ((v = cli_flag(argc, argv, &i, "--force-experts", &bad))) force_list = v;
        else if (!strcmp(argv[i], "--stats")) show_stats = 1;
        else if (!strcmp(argv[i], "--eval")) eval = 1;
        else if (!strcmp(argv[i], "--bf16")) bf16 = 1;
        else if (!strcmp(argv[i], "--bf16-weights")) bf16 = MOE_BF16_WEIGHTS;
        else if (!strcmp(argv[i], "--ep")) use_ep = 1;
        else if (!bad) {
            fprintf(stderr, "moe forward: unknown option '%s'\n\n%s", argv[i], usage_text);
            return 2;
        }
    }
    if (bad) return 2;
    if (!cfg_path || !x_path || !out_path) {
        fprintf(stderr, "moe forward: --config, --input and --out are required\n\n%s", usage_text);
        return 2;
    }
    if (bf16 == MOE_BF16_WEIGHTS && (!w_path || dy_path || use_ep)) {
        fprintf(stderr, "moe forward: --bf16-weights is inference from a weights file: it needs --weights and takes "
                        "neither --grad-output nor --ep (use --bf16 for those)\n");
        return 2;
    }
    if (use_ep) {
        forward_args fa = {cfg_path, w_path, x_path, out_path, dy_path, mask_list, force_list, eval,
                           have_seed, show_stats, seed, threads, top_k, bf16};
        return forward_ep(&fa, &argc, &argv);
    }
    moe_set_num_threads((int)threads);

    int rc = 1;
    moe_layer *l = NULL;
    tensor_in x = {0}, dy = {0};
    float *y = NULL, *dx = NULL;
    uint8_t *mask = NULL;
    moe_st_entry *ents = NULL;
    char **names = NULL;
    int n_ent = 0, np = 0;

    char *text = cli_read_text("forward", cfg_path);
    if (!text) return 1;
    moe_config cfg;
    moe_status st = moe_config_from_json(&cfg, text);
    free(text);
    if (st != MOE_OK) return cli_fail("forward", cfg_path, st);
    if (have_seed) cfg.seed = (uint64_t)seed;
    if (bf16) cfg.bf16 = bf16;
    /* with --weights the parameters come from the file: no random init first */
    if (!w_path && (st = moe_layer_create(&l, &cfg)) != MOE_OK) return cli_fail("forward", cfg_path, st);
    if (w_path && (st = moe_layer_create_load(&l, &cfg, w_path)) != MOE_OK) {
        /* a config error is the config's; anything else is the weights file's */
        moe_layer *probe = NULL;
        char msg[2048];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        moe_status cst = moe_layer_create(&probe, &cfg);
        moe_layer_free(probe);
        if (cst != MOE_OK) return cli_fail("forward", cfg_path, cst);
        fprintf(stderr, "moe forward: --weights: %s: %s\n", moe_status_str(st), msg);
        goto done;
    }
    if (!forward_routing(l, &cfg, top_k, mask_list, force_list)) goto done;
    int64_t D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);
    int soft = cfg.type == MOE_LAYER_SOFT_DYNAMIC || cfg.type == MOE_LAYER_SOFT;
    if (load_rows(&x, x_path, "x", soft ? 0 : D, "--input")) goto done;
    /* soft layers: a 4-D x is an image batch (B, D, h, w) */
    int image = soft && x.ndim == 4;
    int64_t h = image ? x.shape[2] : 0, wd = image ? x.shape[3] : 0;
    if (image ? x.shape[1] != D : (x.ndim < 1 || x.shape[x.ndim - 1] != D)) {
        fprintf(stderr, "moe forward: --input: tensor 'x' in %s must be %s with D = %lld; its %s is %lld\n",
                x_path, image ? "an image (B, D, h, w)" : "(..., D)", (long long)D,
                image ? "second dim" : "last dim", x.ndim ? (long long)x.shape[image ? 1 : x.ndim - 1] : 0LL);
        goto done;
    }
    if (soft && x.ndim > 4) {
        fprintf(stderr, "moe forward: --input: tensor 'x' in %s has %d dims; soft layers take (N, D), (B, N, D) "
                        "or an image (B, D, h, w)\n", x_path, x.ndim);
        goto done;
    }
    if (soft) x.rows /= D; /* loaded with any shape: numel / D token rows */
    y = malloc((size_t)(x.rows ? x.rows : 1) * (size_t)O * sizeof(float));
    if (!y) goto done;
    float aux = 0.0f;
    int64_t N = image ? h * wd : x.ndim >= 2 ? x.shape[x.ndim - 2] : x.rows, B = N ? x.rows / N : 0;
    if (load_mask(&mask, x.f, x_path, B, N, image, h, wd)) goto done;
    /* eval or train mode; activations kept only when a backward follows */
    int flags = (eval ? MOE_EVAL : MOE_TRAIN) | (dy_path ? 0 : MOE_NO_GRAD);
    st = image ? moe_layer_forward_image(l, y, &aux, x.data, mask, B, h, wd, flags)
               : moe_layer_forward_masked(l, y, &aux, x.data, mask, B, N, flags);
    if (st != MOE_OK) {
        cli_fail("forward", "forward", st);
        goto done;
    }
    np = moe_layer_num_params(l);
    ents = calloc((size_t)np + 10, sizeof *ents);
    names = calloc((size_t)np, sizeof *names);
    if (!ents || !names) goto done;
    moe_st_entry *e = &ents[n_ent++];
    e->name = "y";
    e->dtype = MOE_DT_F32;
    e->ndim = x.ndim;
    memcpy(e->shape, x.shape, sizeof e->shape);
    e->shape[image ? 1 : x.ndim - 1] = O;
    e->data = y;
    if (moe_layer_has_aux_loss(l)) put(ents, &n_ent, "aux_loss", MOE_DT_F32, 0, &aux);
    moe_stats stats;
    moe_layer_stats(l, &stats);
    put(ents, &n_ent, "stats.expert_counts", MOE_DT_I64, stats.n_experts, stats.expert_counts);
    put(ents, &n_ent, "stats.dropped", MOE_DT_I64, 0, &stats.dropped);
    float bal = (float)stats.balance_loss, zl = (float)stats.z_loss;
    if (cfg.type == MOE_LAYER_TOPK) {
        put(ents, &n_ent, "stats.balance_loss", MOE_DT_F32, 0, &bal);
        put(ents, &n_ent, "stats.z_loss", MOE_DT_F32, 0, &zl);
        put(ents, &n_ent, "stats.capacity", MOE_DT_I64, 0, &stats.capacity);
    }
    if (stats.expert_bias) put(ents, &n_ent, "stats.expert_bias", MOE_DT_F32, stats.n_experts, stats.expert_bias);
    if (show_stats) print_stats(&stats);

    if (dy_path) {
        if (load_rows(&dy, dy_path, "dy", 0, "--grad-output")) goto done;
        int same = dy.ndim == ents[0].ndim;
        for (int d = 0; same && d < dy.ndim; d++) same = dy.shape[d] == ents[0].shape[d];
        if (!same) {
            fprintf(stderr, "moe forward: --grad-output: 'dy' in %s must have the shape of y (%d dims, ", dy_path,
                    ents[0].ndim);
            for (int d = 0; d < ents[0].ndim; d++)
                fprintf(stderr, "%s%lld", d ? " x " : "", (long long)ents[0].shape[d]);
            fprintf(stderr, ")\n");
            goto done;
        }
        float daux = 1.0f;
        if (moe_st_find(dy.f, "daux") &&
            (st = moe_st_read_f32(&daux, dy.f, "daux", 0, NULL)) != MOE_OK) {
            cli_fail("forward", "--grad-output", st);
            goto done;
        }
        dx = malloc((size_t)x.rows * (size_t)D * sizeof(float));
        if (!dx) goto done;
        moe_layer_zero_grad(l);
        if ((st = moe_layer_backward(l, dx, dy.data, daux)) != MOE_OK) {
            cli_fail("forward", "backward", st);
            goto done;
        }
        e = &ents[n_ent++];
        e->name = "dx";
        e->dtype = MOE_DT_F32;
        e->ndim = x.ndim;
        memcpy(e->shape, x.shape, sizeof e->shape);
        e->data = dx;
    }
    if (dy_path && !forward_add_grads(&ents, &n_ent, names, l)) goto done;
    if ((st = moe_st_write(out_path, ents, n_ent, NULL, 0)) != MOE_OK) {
        cli_fail("forward", "--out", st);
        goto done;
    }
    rc = 0;
done:
    if (names)
        for (int i = 0; i < np; i++) free(names[i]);
    free(names);
    free(ents);
    free(y);
    free(dx);
    free(mask);
    free_rows(&x);
    free_rows(&dy);
    moe_layer_free(l);
    return rc;
}
