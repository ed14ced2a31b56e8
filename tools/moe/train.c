/*
 * `moe train`: train an MoE layer end to end on a built-in synthetic task.
 *
 * The task: a fixed random "teacher" top-1 MoE with sharp routing maps
 * x ~ N(0, I_D) to targets; the student (the layer chosen by the flags)
 * learns to imitate it with MSE loss and AdamW. Every input region belongs to
 * one teacher expert, so a sparse student can specialise its experts. The
 * [train] issue replaces this with a character-level MoE language model.
 * Dimension key: B batch rows, D model dim, H hidden dim, E experts, K top-k.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *usage_text =
    "usage: moe train [options]\n"
    "\n"
    "Trains an MoE layer to imitate a fixed random teacher MoE (built-in synthetic task)\n"
    "and saves its weights as safetensors.\n"
    "  --layer topk|dense     layer type (default topk)\n"
    "  --experts N            experts E (default 8)\n"
    "  --top-k N              experts per token K (topk; default 2)\n"
    "  --dim N                model dim D (default 32)\n"
    "  --hidden N             expert hidden dim H (topk; default 64)\n"
    "  --expert KIND          mlp|swiglu|geglu (default swiglu)\n"
    "  --activation ACT       relu|gelu|silu|leaky_relu for mlp experts (default relu)\n"
    "  --steps N              training steps (default 600)\n"
    "  --batch N              rows per step (default 256)\n"
    "  --lr X                 peak learning rate, AdamW, warmup then cosine (default 3e-3)\n"
    "  --seed N               seed for data, init and everything random (default 1)\n"
    "  --threads N            threads (default: all cores)\n"
    "  --out FILE             where the weights go (default runs/demo.safetensors)\n"
    "  --quiet                print only the final summary\n";

/* Data RNG: splitmix64 stream, Box-Muller normals. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_normal(uint64_t *s) {
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static int mkdir_for(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash) return 0;
    *slash = '\0';
    for (char *p = dir + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            if (mkdir(dir, 0777) && errno != EEXIST) return -1;
            *p = '/';
        }
    return (mkdir(dir, 0777) && errno != EEXIST) ? -1 : 0;
}

int cmd_train(int argc, char **argv) {
    const char *cmd = "train", *out = "runs/demo.safetensors";
    int64_t E = 8, K = 2, D = 32, H = 64, steps = 600, B = 256, seed = 1, threads = 0;
    double lr = 3e-3;
    int quiet = 0, bad = 0;
    moe_layer_type type = MOE_LAYER_TOPK;
    moe_expert_kind kind = MOE_EXPERT_SWIGLU;
    moe_activation act = MOE_ACT_RELU;
    for (int i = 1; i < argc && !bad; i++) {
        const char *v;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage_text, stdout);
            return 0;
        } else if ((v = cli_flag(argc, argv, &i, "--layer", &bad))) {
            if (!strcmp(v, "topk")) type = MOE_LAYER_TOPK;
            else if (!strcmp(v, "dense")) type = MOE_LAYER_DENSE;
            else {
                fprintf(stderr, "moe train: --layer: expected topk or dense, got '%s'\n", v);
                return 2;
            }
        } else if ((v = cli_flag(argc, argv, &i, "--expert", &bad))) {
            if (!strcmp(v, "mlp")) kind = MOE_EXPERT_MLP;
            else if (!strcmp(v, "swiglu")) kind = MOE_EXPERT_SWIGLU;
            else if (!strcmp(v, "geglu")) kind = MOE_EXPERT_GEGLU;
            else {
                fprintf(stderr, "moe train: --expert: expected mlp, swiglu or geglu, got '%s'\n", v);
                return 2;
            }
        } else if ((v = cli_flag(argc, argv, &i, "--activation", &bad))) {
            int found = 0;
            for (int a = 0; a < 4; a++)
                if (!strcmp(v, moe_activation_name((moe_activation)a))) act = (moe_activation)a, found = 1;
            if (!found) {
                fprintf(stderr, "moe train: --activation: expected relu, gelu, silu or leaky_relu, got '%s'\n", v);
                return 2;
            }
        } else if ((v = cli_flag(argc, argv, &i, "--experts", &bad))) {
            if (!cli_int(cmd, "--experts", v, 1, 4096, &E)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--top-k", &bad))) {
            if (!cli_int(cmd, "--top-k", v, 1, 4096, &K)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--dim", &bad))) {
            if (!cli_int(cmd, "--dim", v, 1, 1 << 16, &D)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--hidden", &bad))) {
            if (!cli_int(cmd, "--hidden", v, 1, 1 << 18, &H)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--steps", &bad))) {
            if (!cli_int(cmd, "--steps", v, 1, 100000000, &steps)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--batch", &bad))) {
            if (!cli_int(cmd, "--batch", v, 1, 1 << 20, &B)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--seed", &bad))) {
            if (!cli_int(cmd, "--seed", v, 0, INT64_MAX / 2, &seed)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--threads", &bad))) {
            if (!cli_int(cmd, "--threads", v, 1, 1024, &threads)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--lr", &bad))) {
            if (!cli_float(cmd, "--lr", v, 0.0, 10.0, &lr)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--out", &bad))) out = v;
        else if (!strcmp(argv[i], "--quiet")) quiet = 1;
        else if (!bad) {
            fprintf(stderr, "moe train: unknown option '%s'\n\n%s", argv[i], usage_text);
            return 2;
        }
    }
    if (bad) return 2;
    if (type == MOE_LAYER_TOPK && K > E) {
        fprintf(stderr, "moe train: --top-k %lld is more than --experts %lld; use --top-k <= --experts\n",
                (long long)K, (long long)E);
        return 2;
    }
    threads = moe_set_num_threads((int)threads);

    /* teacher: top-1 MoE with a sharpened gate (fixed, seed-derived) */
    moe_config tc, sc;
    moe_config_init(&tc, MOE_LAYER_TOPK);
    tc.input_dim = D, tc.hidden_dim = 2 * D, tc.num_experts = (int)E, tc.top_k = 1;
    tc.activation = MOE_ACT_GELU, tc.seed = (uint64_t)seed * 1000003u + 17u;
    moe_config_init(&sc, type);
    sc.input_dim = D, sc.hidden_dim = H, sc.output_dim = D, sc.num_experts = (int)E, sc.top_k = (int)K;
    sc.expert = kind, sc.activation = act, sc.seed = (uint64_t)seed;
    moe_layer *teacher = NULL, *student = NULL;
    moe_optim *opt = NULL;
    moe_status st;
    if ((st = moe_layer_create(&teacher, &tc)) != MOE_OK) return cli_fail(cmd, "teacher", st);
    if ((st = moe_layer_create(&student, &sc)) != MOE_OK) {
        moe_layer_free(teacher);
        return cli_fail(cmd, "layer", st);
    }
    moe_param *gw = moe_layer_find_param(teacher, "gate.weight");
    for (int64_t j = 0; j < gw->numel; j++) gw->data[j] *= 8.0f;
    for (int i = 0; i < moe_layer_num_params(teacher); i++) { /* make experts distinct and strong */
        moe_param *p = moe_layer_param(teacher, i);
        if (strstr(p->name, "net.2.weight"))
            for (int64_t j = 0; j < p->numel; j++) p->data[j] *= 3.0f;
    }
    moe_optim_config oc;
    moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
    oc.lr = (float)lr;
    oc.weight_decay = 0.0f;
    if ((st = moe_optim_create(&opt, &oc, moe_layer_param(student, 0), moe_layer_num_params(student))) != MOE_OK) {
        moe_layer_free(teacher);
        moe_layer_free(student);
        return cli_fail(cmd, "optimizer", st);
    }

    int64_t V = 2048; /* held-out rows */
    size_t nb = (size_t)(B > V ? B : V) * (size_t)D;
    float *x = malloc(nb * sizeof *x), *tgt = malloc(nb * sizeof *tgt), *y = malloc(nb * sizeof *y);
    float *vx = malloc((size_t)V * D * sizeof *vx), *vt = malloc((size_t)V * D * sizeof *vt);
    double *load = calloc((size_t)E, sizeof *load);
    int rc = 1;
    if (!x || !tgt || !y || !vx || !vt || !load) {
        fprintf(stderr, "moe train: out of memory\n");
        goto done;
    }
    uint64_t rs = (uint64_t)seed ^ 0xA5A5A5A5ull;
    for (int64_t j = 0; j < V * D; j++) vx[j] = rng_normal(&rs);
    if ((st = moe_layer_forward(teacher, vt, NULL, vx, V, 0)) != MOE_OK) {
        cli_fail(cmd, "teacher", st);
        goto done;
    }
    double vvar = 0;
    for (int64_t j = 0; j < V * D; j++) vvar += (double)vt[j] * vt[j];
    vvar /= (double)(V * D);

    if (!quiet)
        printf("moe train: %s layer, E=%lld K=%lld D=%lld H=%lld expert=%s, %lld steps of %lld rows, "
               "%lld threads\n",
               moe_layer_type_name(type), (long long)E, (long long)(type == MOE_LAYER_TOPK ? K : E),
               (long long)D, (long long)H, type == MOE_LAYER_TOPK ? moe_expert_kind_name(kind) : "linear",
               (long long)steps, (long long)B, (long long)threads);
    int tty = cli_isatty_err() && !quiet;
    int64_t every = steps / 10 > 0 ? steps / 10 : 1, warm = steps / 20;
    double t0 = cli_now(), train_loss = 0, val = 0;
    for (int64_t s = 1; s <= steps; s++) {
        double f = s <= warm ? (double)s / (double)warm
                             : 0.5 * (1.0 + cos(3.141592653589793 * (double)(s - warm) / (double)(steps - warm + 1)));
        moe_optim_set_lr(opt, (float)(lr * (0.05 + 0.95 * f)));
        for (int64_t j = 0; j < B * D; j++) x[j] = rng_normal(&rs);
        if ((st = moe_layer_forward(teacher, tgt, NULL, x, B, 0)) != MOE_OK ||
            (st = moe_layer_forward(student, y, NULL, x, B, 1)) != MOE_OK) {
            cli_fail(cmd, "forward", st);
            goto done;
        }
        double loss = 0;
        float scale = 2.0f / (float)(B * D);
        for (int64_t j = 0; j < B * D; j++) {
            float d = y[j] - tgt[j];
            loss += (double)d * d;
            y[j] = scale * d; /* y now holds dL/dy */
        }
        loss /= (double)(B * D);
        train_loss = loss / vvar;
        moe_stats ms;
        moe_layer_stats(student, &ms);
        for (int64_t e = 0; e < E; e++) load[e] += (double)ms.expert_counts[e];
        moe_layer_zero_grad(student);
        if ((st = moe_layer_backward(student, NULL, y, 0.0f)) != MOE_OK) {
            cli_fail(cmd, "backward", st);
            goto done;
        }
        if ((st = moe_optim_step(opt)) != MOE_OK) {
            cli_fail(cmd, "optimizer step", st);
            goto done;
        }
        int report = s % every == 0 || s == steps;
        if (report) {
            if ((st = moe_layer_forward(student, y, NULL, vx, V, 0)) != MOE_OK) {
                cli_fail(cmd, "validation", st);
                goto done;
            }
            double sse = 0;
            for (int64_t j = 0; j < V * D; j++) sse += (double)(y[j] - vt[j]) * (y[j] - vt[j]);
            val = sse / (double)(V * D) / vvar;
        }
        double el = cli_now() - t0, tps = (double)(s * B) / (el > 0 ? el : 1e-9);
        double eta = el / (double)s * (double)(steps - s);
        if (tty)
            fprintf(stderr, "\rstep %6lld/%lld  loss %.4f  val %.4f  %8.0f tok/s  ETA %5.1fs ", (long long)s,
                    (long long)steps, train_loss, val, tps, eta);
        else if (report && !quiet)
            printf("step %6lld/%lld  loss %.4f  val %.4f  %8.0f tok/s  ETA %5.1fs\n", (long long)s,
                   (long long)steps, train_loss, val, tps, eta);
    }
    if (tty) fputc('\n', stderr);
    double total = 0, mx = 0;
    for (int64_t e = 0; e < E; e++) {
        total += load[e];
        mx = load[e] > mx ? load[e] : mx;
    }
    double mean = total / (double)E;
    if (mkdir_for(out)) {
        fprintf(stderr, "moe train: cannot create the directory of %s: %s\n", out, strerror(errno));
        goto done;
    }
    if ((st = moe_layer_save(student, out)) != MOE_OK) {
        cli_fail(cmd, "--out", st);
        goto done;
    }
    printf("done: %lld steps in %.1fs; train loss %.4f, validation loss %.4f (MSE / target variance; "
           "0 is perfect, 1 predicts the mean)\n",
           (long long)steps, cli_now() - t0, train_loss, val);
    printf("expert load: mean %.0f rows/step, max/mean %.2f\n", mean / (double)steps, mean > 0 ? mx / mean : 0);
    printf("weights: %s\n", out);
    rc = 0;
done:
    free(x), free(tgt), free(y), free(vx), free(vt), free(load);
    moe_optim_free(opt);
    moe_layer_free(teacher);
    moe_layer_free(student);
    return rc;
}
