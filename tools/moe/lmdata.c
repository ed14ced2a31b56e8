/*
 * Data and validation for the MoE language model (see lmdata.h).
 * Dimension key: T tokens, W window, E experts, L blocks.
 */
#include "lmdata.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { CORPUS_TRAIN_LINES = 40000, CORPUS_VAL_LINES = 1000 };

int lmdata_load(lm_data *d, const char *cmd, const char *path, uint64_t seed) {
    memset(d, 0, sizeof *d);
    if (!path || !*path) {
        corpus tr, va;
        if (corpus_generate(&tr, seed, CORPUS_TRAIN_LINES) ||
            corpus_generate(&va, seed + 0x5eed, CORPUS_VAL_LINES)) {
            fprintf(stderr, "moe %s: out of memory generating the corpus\n", cmd);
            return 1;
        }
        d->train = (uint8_t *)tr.text, d->n_train = tr.len;
        d->val = (uint8_t *)va.text, d->n_val = va.len;
        d->val_task = va.task, d->val_answer = va.answer;
        free(tr.task), free(tr.answer);
        d->tasks = CORPUS_NTASKS;
        return 0;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "moe %s: --data: cannot open %s: %s\n", cmd, path, strerror(errno));
        return 1;
    }
    size_t cap = 1 << 16, n = 0, got;
    uint8_t *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            uint8_t *b = cap > ((size_t)1 << 40) ? NULL : realloc(buf, cap * 2);
            if (!b) free(buf);
            buf = b, cap *= 2;
        }
    }
    int err = ferror(f);
    fclose(f);
    if (!buf || err) {
        free(buf);
        fprintf(stderr, "moe %s: --data: %s %s\n", cmd, path, err ? "could not be read" : "is too large");
        return 1;
    }
    if (n < 100) {
        free(buf);
        fprintf(stderr, "moe %s: --data: %s has %zu bytes; give a text of at least 100 bytes (90%% trains, "
                        "10%% validates)\n", cmd, path, n);
        return 1;
    }
    int64_t nv = (int64_t)n / 10;
    d->n_train = (int64_t)n - nv, d->n_val = nv;
    d->train = buf;
    d->val = malloc((size_t)nv);
    if (!d->val) {
        lmdata_free(d);
        fprintf(stderr, "moe %s: out of memory\n", cmd);
        return 1;
    }
    memcpy(d->val, buf + d->n_train, (size_t)nv);
    return 0;
}

void lmdata_free(lm_data *d) {
    free(d->train), free(d->val), free(d->val_task), free(d->val_answer);
    memset(d, 0, sizeof *d);
}

void lmdata_window(uint8_t *ctx, const uint8_t *text, int64_t p, int64_t W) {
    for (int64_t j = 0; j < W; j++) {
        int64_t q = p - W + j;
        ctx[j] = q >= 0 ? text[q] : 0;
    }
}

static int g_rank, g_ranks = 1;
static int (*g_sum)(double *v, int n);

void lmdata_set_data_parallel(int rank, int P, int (*sum)(double *v, int n)) {
    g_rank = rank, g_ranks = P > 1 ? P : 1, g_sum = sum;
}

static int n_experts_of(lm *m) {
    moe_stats s;
    moe_layer_stats(lm_layer(m, 0), &s);
    return s.n_experts;
}

/* Run positions pos (n) in batches; accumulate loss sums, answer figures of
 * task k (k < 0: none) and the routing counts route (L, n_experts). */
static moe_status run_positions(lm *m, const lm_data *d, const int64_t *pos, int64_t n, int64_t batch, int k,
                                double *loss_sum, double *ans_loss, int64_t *ans_n, int64_t *ans_ok, double *route) {
    const lm_config *c = lm_get_config(m);
    int64_t W = c->W, E = n_experts_of(m);
    uint8_t *ctx = malloc((size_t)(batch * W)), *tgt = malloc((size_t)batch), *pred = malloc((size_t)batch);
    float *ce = malloc((size_t)batch * sizeof *ce);
    moe_status st = (ctx && tgt && pred && ce) ? MOE_OK : MOE_ERR_NOMEM;
    /* data parallel: this rank's share [j0, j0 + bl) of every batch */
    int64_t bl = batch / g_ranks, j0 = (int64_t)g_rank * bl;
    for (int64_t i0 = 0; i0 < n && st == MOE_OK; i0 += batch) {
        /* a short last batch is filled up with its last position (counted once) */
        int64_t real = n - i0 < batch ? n - i0 : batch;
        for (int64_t j = 0; j < bl; j++) {
            int64_t p = pos[i0 + (j0 + j < real ? j0 + j : real - 1)];
            lmdata_window(ctx + j * W, d->val, p, W);
            tgt[j] = d->val[p];
        }
        if ((st = lm_forward(m, NULL, ce, pred, ctx, tgt, bl, 0)) != MOE_OK) break;
        for (int64_t j = 0; j < bl && j0 + j < real; j++) {
            int64_t p = pos[i0 + j0 + j];
            *loss_sum += ce[j];
            if (k >= 0 && d->val_answer[p]) {
                ans_loss[k] += ce[j];
                ans_n[k]++;
                ans_ok[k] += pred[j] == tgt[j];
            }
        }
        for (int64_t l = 0; l < c->L; l++) {
            moe_stats s;
            moe_layer_stats(lm_layer(m, l), &s);
            for (int64_t e = 0; e < E && e < s.n_experts; e++) route[l * E + e] += (double)s.expert_counts[e];
        }
    }
    free(ctx), free(tgt), free(pred), free(ce);
    return st;
}

moe_status lmdata_evaluate(lm_eval *ev, lm *m, const lm_data *d, int64_t batch, int64_t max_tokens) {
    memset(ev, 0, sizeof *ev);
    const lm_config *c = lm_get_config(m);
    int64_t E = n_experts_of(m), G = d->tasks ? d->tasks : 1;
    ev->n_experts = (int)E;
    ev->route = calloc((size_t)(c->L * G * E), sizeof *ev->route);
    int64_t *pos = malloc((size_t)d->n_val * sizeof *pos);
    double *tmp = calloc((size_t)(c->L * E), sizeof *tmp);
    if (!ev->route || !pos || !tmp) {
        free(pos), free(tmp);
        return MOE_ERR_NOMEM;
    }
    double loss_sum = 0, ans_loss[CORPUS_NTASKS] = {0};
    int64_t ans_n[CORPUS_NTASKS] = {0}, ans_ok[CORPUS_NTASKS] = {0};
    moe_status st = MOE_OK;
    for (int64_t g = 0; g < G && st == MOE_OK; g++) {
        int64_t n = 0;
        if (d->tasks) {
            for (int64_t p = 0; p < d->n_val; p++)
                if (d->val_task[p] == g) pos[n++] = p;
        } else {
            int64_t want = max_tokens > 0 && max_tokens < d->n_val ? max_tokens : d->n_val;
            for (int64_t i = 0; i < want; i++) pos[n++] = i * d->n_val / want;
        }
        if (n == 0) continue;
        memset(tmp, 0, (size_t)(c->L * E) * sizeof *tmp);
        st = run_positions(m, d, pos, n, batch, d->tasks ? (int)g : -1, &loss_sum, ans_loss, ans_n, ans_ok, tmp);
        for (int64_t l = 0; l < c->L; l++)
            for (int64_t e = 0; e < E; e++) ev->route[(l * G + g) * E + e] = tmp[l * E + e];
        ev->tokens += n;
    }
    if (g_ranks > 1 && st == MOE_OK) { /* every rank's sums */
        int64_t nr = c->L * G * E;
        double *v = malloc((size_t)(1 + 3 * CORPUS_NTASKS + nr) * sizeof *v);
        if (!v) st = MOE_ERR_NOMEM;
        if (v) {
            v[0] = loss_sum;
            for (int k = 0; k < CORPUS_NTASKS; k++)
                v[1 + k] = ans_loss[k], v[1 + CORPUS_NTASKS + k] = (double)ans_n[k],
                v[1 + 2 * CORPUS_NTASKS + k] = (double)ans_ok[k];
            memcpy(v + 1 + 3 * CORPUS_NTASKS, ev->route, (size_t)nr * sizeof *v);
            if (g_sum(v, (int)(1 + 3 * CORPUS_NTASKS + nr))) st = MOE_ERR_IO;
            loss_sum = v[0];
            for (int k = 0; k < CORPUS_NTASKS; k++)
                ans_loss[k] = v[1 + k], ans_n[k] = (int64_t)v[1 + CORPUS_NTASKS + k],
                ans_ok[k] = (int64_t)v[1 + 2 * CORPUS_NTASKS + k];
            memcpy(ev->route, v + 1 + 3 * CORPUS_NTASKS, (size_t)nr * sizeof *v);
            free(v);
        }
    }
    ev->loss = ev->tokens ? loss_sum / (double)ev->tokens : NAN;
    for (int k = 0; k < CORPUS_NTASKS; k++) {
        ev->task_answers[k] = ans_n[k];
        ev->task_loss[k] = ans_n[k] ? ans_loss[k] / (double)ans_n[k] : NAN;
        ev->task_acc[k] = ans_n[k] ? (double)ans_ok[k] / (double)ans_n[k] : NAN;
    }
    free(pos), free(tmp);
    return st;
}

void lmdata_print_eval(FILE *f, const lm_eval *ev, const lm *m, const lm_data *d) {
    fprintf(f, "validation loss %.4f nats/byte over %lld bytes\n", ev->loss, (long long)ev->tokens);
    if (!d->tasks) return;
    fprintf(f, "\nper task, on the answer bytes (after '='):\n  %-8s %10s %9s %8s\n", "task", "loss", "accuracy",
            "bytes");
    for (int k = 0; k < d->tasks; k++)
        fprintf(f, "  %-8s %10.4f %8.1f%% %8lld\n", corpus_task_name(k), ev->task_loss[k], 100.0 * ev->task_acc[k],
                (long long)ev->task_answers[k]);
    const lm_config *c = lm_get_config(m);
    int64_t E = ev->n_experts, G = d->tasks;
    for (int64_t l = 0; l < c->L; l++) {
        fprintf(f, "\nrouting, block %lld: share of each task's expert rows per expert (%%)\n  %-8s", (long long)l,
                "task");
        for (int64_t e = 0; e < E && e < 32; e++) fprintf(f, " %5lld", (long long)e);
        fprintf(f, "%s\n", E > 32 ? " ..." : "");
        for (int64_t g = 0; g < G; g++) {
            const double *r = ev->route + (l * G + g) * E;
            double tot = 0;
            for (int64_t e = 0; e < E; e++) tot += r[e];
            fprintf(f, "  %-8s", corpus_task_name((int)g));
            for (int64_t e = 0; e < E && e < 32; e++) fprintf(f, " %5.1f", tot > 0 ? 100.0 * r[e] / tot : 0.0);
            fprintf(f, "\n");
        }
    }
}
