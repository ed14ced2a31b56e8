/*
 * Data and validation for the MoE transformer (see lmdata.h).
 * Dimension key: B sequences, S sequence length, E experts, L blocks.
 */
#include "lmdata.h"

#include "fortunes.h"

#include <errno.h>
#include <sys/stat.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { CORPUS_TRAIN_LINES = 40000, CORPUS_VAL_LINES = 2000 };
#define LMDATA_MAX_FILE ((size_t)4 << 30) /* --data: a larger file (or /dev/zero) is refused */

static void count_classes(lm_data *d, const int8_t *train_class) {
    for (int64_t i = 0; train_class && i < d->n_train; i++)
        if (train_class[i] >= 0 && train_class[i] < d->n_class) d->class_train_bytes[train_class[i]]++;
    for (int64_t i = 0; i < d->n_val; i++) {
        int c = d->val_class ? d->val_class[i] : 0;
        if (c >= 0 && c < d->n_class) d->class_val_bytes[c]++;
    }
    if (!train_class) d->class_train_bytes[0] = d->n_train;
}

static int load_tasks(lm_data *d, const char *cmd, uint64_t seed) {
    corpus tr, va;
    if (corpus_generate(&tr, seed, CORPUS_TRAIN_LINES)) {
        fprintf(stderr, "moe %s: out of memory generating the corpus\n", cmd);
        return 1;
    }
    if (corpus_generate(&va, seed + 0x5eed, CORPUS_VAL_LINES)) {
        corpus_free(&tr);
        fprintf(stderr, "moe %s: out of memory generating the corpus\n", cmd);
        return 1;
    }
    d->kind = LMDATA_TASKS;
    d->train = (uint8_t *)tr.text, d->n_train = tr.len;
    d->val = (uint8_t *)va.text, d->n_val = va.len;
    d->val_class = va.task, d->val_answer = va.answer;
    d->n_class = CORPUS_NTASKS, d->class_title = "task";
    for (int k = 0; k < CORPUS_NTASKS; k++) snprintf(d->class_name[k], sizeof d->class_name[k], "%s", corpus_task_name(k));
    count_classes(d, tr.task);
    free(tr.task), free(tr.answer);
    snprintf(d->desc, sizeof d->desc, "built-in task corpus (copy, reverse, sort, add)");
    return 0;
}

static int load_fortunes(lm_data *d, const char *cmd) {
    fortunes_corpus fc;
    char msg[512];
    if (fortunes_load(&fc, NULL, msg, sizeof msg)) {
        fprintf(stderr, "moe %s: --corpus fortunes: %s\n", cmd, msg);
        return 1;
    }
    d->kind = LMDATA_FORTUNES;
    d->train = fc.train, d->n_train = fc.n_train, d->val = fc.val, d->n_val = fc.n_val;
    d->val_class = fc.val_lang;
    d->n_class = fc.n_lang < LMDATA_MAX_CLASSES ? fc.n_lang : LMDATA_MAX_CLASSES;
    d->class_title = "language";
    for (int k = 0; k < d->n_class; k++) snprintf(d->class_name[k], sizeof d->class_name[k], "%s", fortunes_lang_name(k));
    count_classes(d, fc.train_lang);
    free(fc.train_lang);
    if (fc.skipped)
        fprintf(stderr, "moe %s: --corpus fortunes: skipped %lld entries (%lld not convertible to UTF-8, %lld longer "
                        "than 64 KiB)\n", cmd, (long long)fc.skipped, (long long)fc.skipped_bad,
                (long long)fc.skipped_long);
    if (fc.missing[0]) fprintf(stderr, "moe %s: --corpus fortunes: no text for: %s (install its fortunes-* package)\n", cmd, fc.missing);
    snprintf(d->desc, sizeof d->desc, "fortunes corpus (%d languages, %.1f MB)", d->n_class,
             (double)(d->n_train + d->n_val) * 1e-6);
    return 0;
}

static int load_file(lm_data *d, const char *cmd, const char *path) {
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        fprintf(stderr, "moe %s: --data: %s is a directory; give a text file\n", cmd, path);
        return 1;
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
            uint8_t *b = cap >= LMDATA_MAX_FILE ? NULL : realloc(buf, cap * 2);
            if (!b) free(buf);
            buf = b, cap *= 2;
        }
    }
    int err = ferror(f);
    fclose(f);
    if (!buf || err) {
        free(buf);
        fprintf(stderr, "moe %s: --data: %s %s\n", cmd, path,
                err ? "could not be read" : "is too large (more than 4 GiB) or memory ran out");
        return 1;
    }
    if (n < 100) {
        free(buf);
        fprintf(stderr, "moe %s: --data: %s has %zu bytes; give a text of at least 100 bytes (90%% trains, "
                        "10%% validates)\n", cmd, path, n);
        return 1;
    }
    int64_t nv = (int64_t)n / 10;
    d->kind = LMDATA_FILE;
    d->n_train = (int64_t)n - nv, d->n_val = nv;
    d->train = buf;
    d->val = malloc((size_t)nv);
    if (!d->val) {
        lmdata_free(d);
        fprintf(stderr, "moe %s: out of memory\n", cmd);
        return 1;
    }
    memcpy(d->val, buf + d->n_train, (size_t)nv);
    d->n_class = 1, d->class_title = "text";
    snprintf(d->class_name[0], sizeof d->class_name[0], "all");
    count_classes(d, NULL);
    snprintf(d->desc, sizeof d->desc, "%.100s", path);
    return 0;
}

int lmdata_load(lm_data *d, const char *cmd, const char *corpus, const char *path, uint64_t seed) {
    memset(d, 0, sizeof *d);
    if (path && *path) return load_file(d, cmd, path);
    if (!corpus || !*corpus || !strcmp(corpus, "fortunes")) return load_fortunes(d, cmd);
    if (!strcmp(corpus, "tasks")) return load_tasks(d, cmd, seed);
    fprintf(stderr, "moe %s: --corpus: expected fortunes or tasks, got '%s' (or give --data FILE)\n", cmd, corpus);
    return 1;
}

void lmdata_free(lm_data *d) {
    free(d->train), free(d->val), free(d->val_class), free(d->val_answer);
    memset(d, 0, sizeof *d);
}

void lmdata_sequence(uint8_t *tok, uint8_t *tgt, const uint8_t *text, int64_t p, int64_t S) {
    memcpy(tok, text + p, (size_t)S);
    memcpy(tgt, text + p + 1, (size_t)S);
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

/* Figures of one class: its text (n bytes) and answer flags (or NULL). */
typedef struct {
    double loss;
    int64_t tokens, ans_n, ans_ok;
    double ans_loss;
} class_sums;

/* Evaluate the sequences starting at starts (n) of text in batches of B;
 * add to *cs and to route (L, E). */
static moe_status run_sequences(lm *m, const uint8_t *text, const uint8_t *answer, const int64_t *starts, int64_t n,
                                int64_t B, int64_t S, class_sums *cs, double *route) {
    const lm_config *c = lm_get_config(m);
    int64_t E = n_experts_of(m), Bl = B / g_ranks, j0 = (int64_t)g_rank * Bl, T = Bl * S;
    uint8_t *tok = malloc((size_t)T), *tgt = malloc((size_t)T), *pred = malloc((size_t)T);
    float *ce = malloc((size_t)T * sizeof *ce);
    moe_status st = (tok && tgt && pred && ce) ? MOE_OK : MOE_ERR_NOMEM;
    for (int64_t i0 = 0; i0 < n && st == MOE_OK; i0 += B) {
        /* a short last batch is filled up with its last sequence (counted once) */
        int64_t real = n - i0 < B ? n - i0 : B;
        for (int64_t j = 0; j < Bl; j++)
            lmdata_sequence(tok + j * S, tgt + j * S, text, starts[i0 + (j0 + j < real ? j0 + j : real - 1)], S);
        if ((st = lm_forward(m, NULL, ce, pred, tok, tgt, Bl, S, 0)) != MOE_OK) break;
        for (int64_t j = 0; j < Bl && j0 + j < real; j++) {
            int64_t p0 = starts[i0 + j0 + j];
            for (int64_t s = 0; s < S; s++) {
                int64_t t = j * S + s;
                cs->loss += ce[t];
                cs->tokens++;
                if (answer && answer[p0 + 1 + s]) {
                    cs->ans_loss += ce[t];
                    cs->ans_n++;
                    cs->ans_ok += pred[t] == tgt[t];
                }
            }
        }
        for (int64_t l = 0; l < c->L; l++) {
            moe_stats s;
            moe_layer_stats(lm_layer(m, l), &s);
            for (int64_t e = 0; e < E && e < s.n_experts; e++) route[l * E + e] += (double)s.expert_counts[e];
        }
    }
    free(tok), free(tgt), free(pred), free(ce);
    return st;
}

moe_status lmdata_evaluate(lm_eval *ev, lm *m, const lm_data *d, int64_t batch, int64_t max_tokens) {
    memset(ev, 0, sizeof *ev);
    const lm_config *c = lm_get_config(m);
    int64_t E = n_experts_of(m), G = d->n_class, L = c->L, S = c->S;
    ev->n_experts = (int)E;
    ev->route = calloc((size_t)(L * G * E), sizeof *ev->route);
    uint8_t *text = malloc((size_t)d->n_val + 1), *ans = d->val_answer ? malloc((size_t)d->n_val + 1) : NULL;
    int64_t *starts = malloc(((size_t)d->n_val / (size_t)S + 1) * sizeof *starts);
    double *tmp = calloc((size_t)(L * E), sizeof *tmp);
    class_sums cs[LMDATA_MAX_CLASSES];
    memset(cs, 0, sizeof cs);
    moe_status st = ev->route && text && starts && tmp && (ans || !d->val_answer) ? MOE_OK : MOE_ERR_NOMEM;
    for (int64_t g = 0; g < G && st == MOE_OK; g++) {
        int64_t n = 0; /* the class's validation text, in order */
        for (int64_t i = 0; i < d->n_val; i++)
            if (!d->val_class || d->val_class[i] == g) {
                if (ans) ans[n] = d->val_answer[i];
                text[n++] = d->val[i];
            }
        int64_t chunks = n > S ? (n - 1) / S : 0, want = chunks;
        if (max_tokens > 0 && want * S > max_tokens) want = max_tokens / S > 0 ? max_tokens / S : 1;
        if (want == 0) continue;
        for (int64_t i = 0; i < want; i++) starts[i] = (i * chunks / want) * S;
        memset(tmp, 0, (size_t)(L * E) * sizeof *tmp);
        st = run_sequences(m, text, ans, starts, want, batch, S, &cs[g], tmp);
        for (int64_t l = 0; l < L; l++)
            for (int64_t e = 0; e < E; e++) ev->route[(l * G + g) * E + e] = tmp[l * E + e];
    }
    if (g_ranks > 1 && st == MOE_OK) { /* every rank's sums */
        int64_t nr = L * G * E, nv = 5 * G + nr;
        double *v = malloc((size_t)nv * sizeof *v);
        if (!v) st = MOE_ERR_NOMEM;
        if (v) {
            for (int64_t g = 0; g < G; g++)
                v[5 * g] = cs[g].loss, v[5 * g + 1] = (double)cs[g].tokens, v[5 * g + 2] = cs[g].ans_loss,
                v[5 * g + 3] = (double)cs[g].ans_n, v[5 * g + 4] = (double)cs[g].ans_ok;
            memcpy(v + 5 * G, ev->route, (size_t)nr * sizeof *v);
            if (g_sum(v, (int)nv)) st = MOE_ERR_IO;
            for (int64_t g = 0; g < G; g++)
                cs[g].loss = v[5 * g], cs[g].tokens = (int64_t)v[5 * g + 1], cs[g].ans_loss = v[5 * g + 2],
                cs[g].ans_n = (int64_t)v[5 * g + 3], cs[g].ans_ok = (int64_t)v[5 * g + 4];
            memcpy(ev->route, v + 5 * G, (size_t)nr * sizeof *v);
            free(v);
        }
    }
    double sum = 0;
    for (int64_t g = 0; g < G; g++) {
        sum += cs[g].loss, ev->tokens += cs[g].tokens;
        ev->class_tokens[g] = cs[g].tokens;
        ev->class_loss[g] = cs[g].tokens ? cs[g].loss / (double)cs[g].tokens : NAN;
        if (d->kind == LMDATA_TASKS && g < CORPUS_NTASKS) {
            ev->task_answers[g] = cs[g].ans_n;
            ev->task_loss[g] = cs[g].ans_n ? cs[g].ans_loss / (double)cs[g].ans_n : NAN;
            ev->task_acc[g] = cs[g].ans_n ? (double)cs[g].ans_ok / (double)cs[g].ans_n : NAN;
        }
    }
    ev->loss = ev->tokens ? sum / (double)ev->tokens : NAN;
    if (st == MOE_OK && !ev->tokens)
        st = MOE_ERR_ARG, snprintf(ev->why, sizeof ev->why, "the validation text (%lld bytes) is shorter than one "
                                   "sequence of the model's context (%lld bytes) plus one byte",
                                   (long long)d->n_val, (long long)S);
    free(text), free(ans), free(starts), free(tmp);
    return st;
}

void lmdata_print_eval(FILE *f, const lm_eval *ev, const lm *m, const lm_data *d) {
    const double ln2 = 0.6931471805599453;
    fprintf(f, "validation: %.4f bits/byte (%.4f nats) over %lld bytes\n", ev->loss / ln2, ev->loss,
            (long long)ev->tokens);
    if (d->n_class > 1) {
        if (d->kind == LMDATA_TASKS) {
            fprintf(f, "\nper task (loss over all bytes; accuracy on the answer bytes after '='):\n"
                       "  %-9s %10s %12s %9s %8s\n", "task", "bits/byte", "answer loss", "accuracy", "bytes");
            for (int k = 0; k < d->n_class; k++)
                fprintf(f, "  %-9s %10.4f %12.4f %8.1f%% %8lld\n", d->class_name[k], ev->class_loss[k] / ln2,
                        ev->task_loss[k], 100.0 * ev->task_acc[k], (long long)ev->class_tokens[k]);
        } else {
            fprintf(f, "\nper %s:\n  %-9s %10s %10s\n", d->class_title, d->class_title, "bits/byte", "bytes");
            for (int k = 0; k < d->n_class; k++)
                if (ev->class_tokens[k])
                    fprintf(f, "  %-9s %10.4f %10lld\n", d->class_name[k], ev->class_loss[k] / ln2,
                            (long long)ev->class_tokens[k]);
        }
    }
    const lm_config *c = lm_get_config(m);
    int64_t E = ev->n_experts, G = d->n_class;
    if (c->dense || E < 2) return;
    for (int64_t l = 0; l < c->L; l++) {
        fprintf(f, "\nrouting, block %lld: share of each %s's expert rows per expert (%%)\n  %-9s", (long long)l,
                d->class_title, d->class_title);
        for (int64_t e = 0; e < E && e < 32; e++) fprintf(f, " %5lld", (long long)e);
        fprintf(f, "%s\n", E > 32 ? " ..." : "");
        for (int64_t g = 0; g < G; g++) {
            const double *r = ev->route + (l * G + g) * E;
            double tot = 0;
            for (int64_t e = 0; e < E; e++) tot += r[e];
            if (tot <= 0) continue;
            fprintf(f, "  %-9s", d->class_name[g]);
            for (int64_t e = 0; e < E && e < 32; e++) fprintf(f, " %5.1f", 100.0 * r[e] / tot);
            fprintf(f, "\n");
        }
    }
}
