/*
 * Data and evaluation for the MoE language model: the training and
 * validation texts (a --data file split into train and held-out parts, or
 * the built-in task corpus), windows of previous bytes, and validation
 * figures (overall loss; for the corpus, per-task loss and accuracy on the
 * answer bytes and a task x expert routing table).
 * Dimension key: T tokens, W window, E experts, L blocks.
 */
#ifndef MOE_LMDATA_H
#define MOE_LMDATA_H

#include "corpus.h"
#include "lm.h"

#include <stdio.h>

#define LMDATA_MAX_EXPERTS 4096

typedef struct {
    uint8_t *train, *val;      /* texts                                         */
    int64_t n_train, n_val;
    int8_t *val_task;          /* (n_val) task of each byte, corpus only          */
    uint8_t *val_answer;       /* (n_val) 1 on answer bytes, corpus only          */
    int tasks;                 /* CORPUS_NTASKS for the corpus, 0 for a file      */
} lm_data;

/* Load --data path (train on the first 90%, validate on the rest), or with
 * path NULL or "" generate the corpus (train and validation lines from
 * different seeds). Returns 0, or 1 after printing "moe CMD: ..." with the
 * fix. */
int  lmdata_load(lm_data *d, const char *cmd, const char *path, uint64_t seed);
void lmdata_free(lm_data *d);

/* ctx (W) = the W bytes before text[p] (0 before the start). */
void lmdata_window(uint8_t *ctx, const uint8_t *text, int64_t p, int64_t W);

typedef struct {
    double loss;               /* mean cross-entropy over the validation bytes   */
    int64_t tokens;
    double task_loss[CORPUS_NTASKS], task_acc[CORPUS_NTASKS]; /* answer bytes     */
    int64_t task_answers[CORPUS_NTASKS];
    int n_experts;             /* per layer                                      */
    /* routing (L, tasks or 1, n_experts): rows sent to each expert in eval mode */
    double *route;
} lm_eval;

/* Evaluate on at most max_tokens validation bytes (evenly spread; all of them
 * when max_tokens <= 0), in batches of `batch` tokens. Fills *ev (free
 * ev->route). Returns a moe_status. */
moe_status lmdata_evaluate(lm_eval *ev, lm *m, const lm_data *d, int64_t batch, int64_t max_tokens);
/* Expert parallel (`moe train --ep`): each of P ranks evaluates its share
 * [r*batch/P, (r+1)*batch/P) of every batch, so the layers see the groups one
 * process sees, and the sums are added over the ranks with sum (in place,
 * 0 on success). P = 1 (the default) evaluates alone. */
void lmdata_set_data_parallel(int rank, int P, int (*sum)(double *v, int n));
/* Print the per-task table and the routing table (corpus), to f. */
void lmdata_print_eval(FILE *f, const lm_eval *ev, const lm *m, const lm_data *d);

#endif
