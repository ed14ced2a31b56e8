/*
 * `moe forward --ep` under mpirun: one layer expert-parallel over the ranks.
 * Rank 0 reads x (and dy) and splits the batch over the ranks by groups;
 * every rank loads its own experts from --weights (a path every rank sees);
 * each rank runs forward (and backward) on its groups; rank 0 gathers y, dx
 * and the whole layer's gradients and writes the file one process writes for
 * the same groups: aux_loss and stats.balance_loss averaged over all groups,
 * stats.z_loss over all tokens, expert counts and drops summed, every
 * grad.<name> under its global name (replicated gradients summed over the
 * ranks). A 2-D x (T, D) is P groups of T/P rows (each rank's rows are its
 * group, as in GShard and DeepSpeed-MoE).
 * Dimension key: P ranks, B groups of N tokens, G_r groups of rank r, D input
 * dim, O output dim.
 */
#include "cli.h"
#include "ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rank 0 reads tensor `name` of path as float32 into *out (malloc'd) with its shape. */
static int read_tensor(float **out, int *ndim, int64_t shape[MOE_ST_MAX_DIMS], const char *path, const char *name,
                       const char *flag) {
    moe_st_file *f = NULL;
    moe_status st = moe_st_open(&f, path);
    if (st != MOE_OK) {
        cli_fail("forward", flag, st);
        return 0;
    }
    const moe_st_tensor *t = moe_st_find(f, name);
    int ok = t != NULL;
    if (!ok) fprintf(stderr, "moe forward: %s: %s has no tensor '%s'\n", flag, path, name);
    if (ok) {
        *ndim = t->ndim;
        memcpy(shape, t->shape, sizeof t->shape);
        *out = malloc((size_t)(t->numel ? t->numel : 1) * sizeof(float));
        ok = *out && (st = moe_st_read_f32(*out, f, name, -1, NULL)) == MOE_OK;
        if (!ok && *out) cli_fail("forward", flag, st);
    }
    moe_st_close(f);
    return ok;
}

static int run(const forward_args *a, const cli_ep *ep) {
    int rc = 1, r0 = ep->rank == 0;
    moe_layer *l = NULL, *full = NULL;
    float *x = NULL, *dy = NULL, *xr = NULL, *yr = NULL, *dyr = NULL, *dxr = NULL, *y = NULL, *dx = NULL;
    char **names = NULL;
    int64_t *counts = NULL;
    moe_st_entry *ents = NULL;
    int np = 0;
    char *text = cli_read_text("forward", a->cfg_path);
    moe_config cfg;
    moe_status st = text ? moe_config_from_json(&cfg, text) : MOE_ERR_IO;
    free(text);
    if (st != MOE_OK) return cli_fail("forward", a->cfg_path, st); /* the same file: every rank alike */
    if (a->have_seed) cfg.seed = (uint64_t)a->seed;
    if (a->bf16) cfg.bf16 = 1;
    if ((st = cli_ep_create(&l, &cfg)) != MOE_OK) return cli_fail("forward", a->cfg_path, st);
    if (a->w_path && (st = moe_layer_load(l, a->w_path)) != MOE_OK) {
        cli_fail("forward", "--weights", st);
        goto done;
    }
    if (!cli_ep_all_ok(forward_routing(l, &cfg, a->top_k, a->mask_list, a->force_list))) goto done;
    int64_t D = moe_layer_input_dim(l), O = moe_layer_output_dim(l);

    /* rank 0: x, its groups; then every rank learns the shape */
    int xnd = 0;
    int64_t xs[MOE_ST_MAX_DIMS] = {0}, dims[4] = {0, 0, 0, 0}; /* ok, B, N, ndim */
    if (r0 && read_tensor(&x, &xnd, xs, a->x_path, "x", "--input")) {
        int64_t rows = 1;
        for (int d = 0; d + 1 < xnd; d++) rows *= xs[d];
        if (xnd < 2 || xs[xnd - 1] != D)
            fprintf(stderr, "moe forward: --input: 'x' in %s must be (B, N, D) or (T, D) with D = %lld\n", a->x_path,
                    (long long)D);
        else if (xnd == 2 && rows % ep->size)
            fprintf(stderr, "moe forward: --ep: a 2-D x of %lld rows splits into %d groups of equal size: give a "
                            "row count divisible by the ranks, or x (B, N, D)\n", (long long)rows, ep->size);
        else
            dims[0] = 1, dims[2] = xnd == 2 ? rows / ep->size : xs[xnd - 2], dims[1] = rows / dims[2], dims[3] = xnd;
    }
    if (cli_ep_bcast_i64(dims, 4) || !dims[0]) goto done;
    int64_t B = dims[1], N = dims[2], g0, Gr;
    cli_ep_split(B, ep->rank, ep->size, &g0, &Gr);
    int64_t Tr = Gr * N, T = B * N;
    xr = malloc((size_t)(Tr * D + 1) * sizeof(float)), yr = malloc((size_t)(Tr * O + 1) * sizeof(float));
    if (r0) y = malloc((size_t)(T * O + 1) * sizeof(float));
    if (!cli_ep_all_ok(xr && yr && (!r0 || y))) goto done;
    if (cli_ep_scatter(xr, x, B, N * D)) goto done;
    float aux = 0.0f;
    int flags = (a->eval ? MOE_EVAL : MOE_TRAIN) | (a->dy_path ? 0 : MOE_NO_GRAD);
    if ((st = moe_layer_forward_seq(l, yr, &aux, xr, Gr, N, flags)) != MOE_OK) {
        cli_fail("forward", "forward", st);
        goto done;
    }
    if (cli_ep_gather(y, yr, B, N * O)) goto done;
    moe_stats s;
    moe_layer_stats(l, &s);
    /* over all groups: aux and the balance loss are means over groups, the z-loss over tokens */
    double sums[3] = {(double)aux * (double)Gr, s.balance_loss * (double)Gr, s.z_loss * (double)Tr};
    counts = calloc((size_t)s.n_experts + 1, sizeof *counts);
    if (!cli_ep_all_ok(counts != NULL)) goto done;
    memcpy(counts, s.expert_counts, (size_t)s.n_experts * sizeof *counts);
    counts[s.n_experts] = s.dropped;
    cli_ep_sum_f64(sums, 3);
    cli_ep_sum_i64(counts, s.n_experts + 1);
    float aux_all = (float)(sums[0] / (double)B), bal = (float)(sums[1] / (double)B), zl = (float)(sums[2] / (double)T);
    int64_t dropped = counts[s.n_experts];

    if (a->dy_path) { /* rank 0: dy (the shape of y) and daux */
        int dnd = 0, ok = 1;
        int64_t ds[MOE_ST_MAX_DIMS];
        double daux = 1.0;
        if (r0) {
            ok = read_tensor(&dy, &dnd, ds, a->dy_path, "dy", "--grad-output");
            int64_t n = 1;
            for (int d = 0; ok && d < dnd; d++) n *= ds[d];
            if (ok && (dnd != xnd || n != T * O || ds[dnd - 1] != O)) {
                fprintf(stderr, "moe forward: --grad-output: 'dy' in %s must have the shape of y\n", a->dy_path);
                ok = 0;
            }
            moe_st_file *f = NULL;
            float dv = 1.0f;
            if (ok && moe_st_open(&f, a->dy_path) == MOE_OK && moe_st_find(f, "daux")) {
                if ((st = moe_st_read_f32(&dv, f, "daux", 0, NULL)) != MOE_OK) ok = !cli_fail("forward", "--grad-output", st);
            }
            moe_st_close(f);
            daux = dv;
        }
        int64_t bits;
        memcpy(&bits, &daux, sizeof bits);
        if (!cli_ep_all_ok(ok) || cli_ep_bcast_i64(&bits, 1)) goto done;
        memcpy(&daux, &bits, sizeof daux);
        dyr = malloc((size_t)(Tr * O + 1) * sizeof(float)), dxr = malloc((size_t)(Tr * D + 1) * sizeof(float));
        if (r0) dx = malloc((size_t)(T * D + 1) * sizeof(float));
        if (!cli_ep_all_ok(dyr && dxr && (!r0 || dx)) || cli_ep_scatter(dyr, dy, B, N * O)) goto done;
        moe_layer_zero_grad(l);
        /* the global loss: this rank's share of the groups' mean aux loss */
        if ((st = moe_layer_backward(l, dxr, dyr, (float)(daux * (double)Gr / (double)B))) != MOE_OK ||
            (st = cli_ep_allreduce_grads(l)) != MOE_OK) {
            cli_fail("forward", "backward", st);
            goto done;
        }
        if (cli_ep_gather(dx, dxr, B, N * D)) goto done;
    }
    /* the whole layer on rank 0 (its values and gradients), for grad.* */
    st = r0 ? moe_layer_create(&full, &cfg) : MOE_OK;
    if (!cli_ep_all_ok(st == MOE_OK) || (st = cli_ep_gather_layer(l, full)) != MOE_OK) {
        cli_fail("forward", "gathering the layer", st);
        goto done;
    }
    if (!r0) {
        rc = 0;
        goto done;
    }
    if (a->show_stats) {
        printf("expert  tokens\n");
        for (int e = 0; e < s.n_experts; e++) printf("%6d  %6lld\n", e, (long long)counts[e]);
        printf("tokens %lld on %d ranks, dropped %lld, balance loss %.6f, z-loss %.6f\n", (long long)T, ep->size,
               (long long)dropped, bal, zl);
    }
    np = moe_layer_num_params(full);
    ents = calloc((size_t)np + 10, sizeof *ents), names = calloc((size_t)np + 1, sizeof *names);
    if (!ents || !names) goto done;
    int n = 0;
#define PUT(nm, dt, nd, data_)                                                 \
    (ents[n].name = (nm), ents[n].dtype = (dt), ents[n].ndim = (nd), ents[n].data = (data_), n++)
    PUT("y", MOE_DT_F32, xnd, y);
    memcpy(ents[0].shape, xs, sizeof xs), ents[0].shape[xnd - 1] = O;
    if (moe_layer_has_aux_loss(full)) PUT("aux_loss", MOE_DT_F32, 0, &aux_all);
    PUT("stats.expert_counts", MOE_DT_I64, 1, counts), ents[n - 1].shape[0] = s.n_experts;
    PUT("stats.dropped", MOE_DT_I64, 0, &dropped);
    if (cfg.type == MOE_LAYER_TOPK) {
        PUT("stats.balance_loss", MOE_DT_F32, 0, &bal);
        PUT("stats.z_loss", MOE_DT_F32, 0, &zl);
        PUT("stats.capacity", MOE_DT_I64, 0, &s.capacity);
    }
    moe_stats fs;
    moe_layer_stats(full, &fs); /* the bias: rank 0's copy, gathered into full */
    if (s.expert_bias) PUT("stats.expert_bias", MOE_DT_F32, 1, moe_layer_buffer(full, 0)->data), ents[n - 1].shape[0] = s.n_experts;
    if (a->dy_path) {
        PUT("dx", MOE_DT_F32, xnd, dx);
        memcpy(ents[n - 1].shape, xs, sizeof xs);
        if (!forward_add_grads(&ents, &n, names, full)) goto done; /* the whole layer's, global names */
    }
#undef PUT
    if ((st = moe_st_write(a->out_path, ents, n, NULL, 0)) != MOE_OK) {
        cli_fail("forward", "--out", st);
        goto done;
    }
    rc = 0;
done:
    if (names)
        for (int i = 0; i < np; i++) free(names[i]);
    free(names), free(ents), free(counts), free(x), free(dy), free(xr), free(yr), free(dyr), free(dxr), free(y), free(dx);
    moe_layer_free(full);
    moe_layer_free(l);
    return rc;
}

int forward_ep(const forward_args *a, int *argc, char ***argv) {
    cli_ep ep;
    if (cli_ep_start(&ep, "forward", argc, argv)) return 1;
    int64_t threads = a->threads, cores = moe_set_num_threads(0);
    if (!threads) threads = cores / ep.size > 0 ? cores / ep.size : 1;
    moe_set_num_threads((int)threads);
    int rc = run(a, &ep);
    /* every rank's exit code: the worst */
    rc = cli_ep_all_ok(rc == 0) ? 0 : 1;
    cli_ep_stop();
    return rc;
}
