/*
 * Data and evaluation for the MoE transformer: the training and validation
 * texts, sequences of the model's context, and validation figures.
 * Corpora:
 *   fortunes  Debian's fortune cookies in 8 languages (fortunes.h), each
 *             entry tagged "<xx> "; validated per language
 *   tasks     the generated copy/reverse/sort/add lines (corpus.h); validated
 *             per task, with accuracy on the answer bytes
 *   --data    any file: 90% trains, the last 10% validates
 * Validation cuts each class's bytes (a language's or a task's validation
 * text, in order) into sequences of S bytes, so every batch holds one class
 * and the routing counts of a batch are that class's: the class x expert
 * table. Losses are in nats per byte; bits per byte = nats / ln 2.
 * Dimension key: B sequences, S sequence length, E experts, L blocks.
 */
#ifndef MOE_LMDATA_H
#define MOE_LMDATA_H

#include "corpus.h"
#include "lm.h"

#include <stdio.h>

#define LMDATA_MAX_EXPERTS 4096
#define LMDATA_MAX_CLASSES 16

typedef enum { LMDATA_FILE, LMDATA_TASKS, LMDATA_FORTUNES } lmdata_kind;

typedef struct {
    lmdata_kind kind;
    uint8_t *train, *val;        /* texts                                            */
    int64_t n_train, n_val;
    int8_t *val_class;           /* (n_val) task or language of each byte; NULL: one class */
    uint8_t *val_answer;         /* (n_val) tasks: 1 on answer bytes; else NULL        */
    int n_class;                 /* 1 for a file                                      */
    char class_name[LMDATA_MAX_CLASSES][16];
    const char *class_title;     /* "task", "language" or "text"                      */
    int64_t class_train_bytes[LMDATA_MAX_CLASSES], class_val_bytes[LMDATA_MAX_CLASSES];
    char desc[160];              /* what it is, for the progress lines                */
} lm_data;

/* Load the corpus by name ("fortunes" or "tasks") or, with path non-empty,
 * the file (corpus ignored). The fortunes come from /usr/share/games/fortunes
 * (or $MOE_FORTUNES_DIR). Returns 0, or 1 after printing "moe CMD: ..." with
 * the fix (for missing fortunes: the apt-get command). */
int  lmdata_load(lm_data *d, const char *cmd, const char *corpus, const char *path, uint64_t seed);
void lmdata_free(lm_data *d);

/* tok (S) = text[p .. p+S-1], tgt (S) = text[p+1 .. p+S]; needs p + S < n. */
void lmdata_sequence(uint8_t *tok, uint8_t *tgt, const uint8_t *text, int64_t p, int64_t S);

typedef struct {
    double loss;                 /* mean cross-entropy (nats/byte) over the bytes     */
    int64_t tokens;
    double class_loss[LMDATA_MAX_CLASSES];  /* per class, nats/byte                   */
    int64_t class_tokens[LMDATA_MAX_CLASSES];
    double task_loss[CORPUS_NTASKS], task_acc[CORPUS_NTASKS]; /* tasks: answer bytes */
    int64_t task_answers[CORPUS_NTASKS];
    int n_experts;               /* per layer                                         */
    /* routing (L, n_class, n_experts): rows sent to each expert in eval mode */
    double *route;
    char why[200];               /* lmdata_evaluate's failure in words, when it has one */
} lm_eval;

/* Evaluate in batches of `batch` sequences of the model's context, on at most
 * max_tokens validation bytes per class (sequences evenly spread; all when
 * max_tokens <= 0). Fills *ev (free ev->route). Returns a moe_status. */
moe_status lmdata_evaluate(lm_eval *ev, lm *m, const lm_data *d, int64_t batch, int64_t max_tokens);
/* Expert parallel (`moe train --ep`): each of P ranks evaluates its share
 * [r*batch/P, (r+1)*batch/P) of every batch, so the layers see the groups one
 * process sees, and the sums are added over the ranks with sum (in place,
 * 0 on success). P = 1 (the default) evaluates alone. */
void lmdata_set_data_parallel(int rank, int P, int (*sum)(double *v, int n));
/* Print the per-class table (bits per byte; tasks: answer accuracy) and the
 * class x expert routing table of every block, to f. */
void lmdata_print_eval(FILE *f, const lm_eval *ev, const lm *m, const lm_data *d);

#endif
