/*
 * Checkpoints of the MoE language model (lm.h) as safetensors:
 *   every parameter by name, float32 (loads in PyTorch as a state_dict);
 *   "optim.m.<name>" and "optim.v.<name>" the AdamW moments;
 *   __metadata__: "format" = "libmoe-lm2", "config" (model JSON), "train"
 *   (training settings JSON), "step", "optim.steps", "rng" (each layer's
 *   random-stream position, comma separated).
 * Written to a temporary file, fsync'd and renamed (moe_st_write), so a crash
 * leaves the previous checkpoint whole.
 */
#ifndef MOE_CKPT_H
#define MOE_CKPT_H

#include "lm.h"

typedef struct {
    int64_t steps;        /* total steps of the schedule                        */
    int64_t batch;        /* sequences per step (of the model's context bytes)  */
    int64_t warmup;       /* linear warmup steps, then cosine to lr * min_lr    */
    int64_t eval_every;   /* validation every N steps                           */
    int64_t seed;         /* data order                                         */
    double lr, min_lr, weight_decay;
    char data[1024];      /* --data file, "" for a corpus                       */
    char corpus[16];      /* "fortunes", "tasks", or "" with --data             */
} train_opts;

/* Model config <-> JSON text (malloc'd; NULL on failure). */
char      *ckpt_config_json(const lm_config *c);
moe_status ckpt_config_parse(lm_config *c, const char *json);

moe_status ckpt_save(const char *path, lm *m, moe_optim *opt, int64_t step, const train_opts *to);
/* Expert parallel (`moe train --ep`): every rank calls it; rank 0 gathers the
 * experts' parameters and AdamW moments of every rank (gather: rank 0 gets
 * every rank's bytes in rank order, malloc'd) into a one-process model and
 * writes the file ckpt_save writes, which any number of ranks dividing E can
 * resume from. Returns rank 0's status on rank 0, MOE_OK elsewhere. */
typedef int (*ckpt_gather_fn)(void **out, int64_t *out_n, const void *send, int64_t n);
moe_status ckpt_save_gathered(const char *path, lm *m, moe_optim *opt, int64_t step, const train_opts *to,
                              int rank, ckpt_gather_fn gather);
/* Create the model (and, if opt_out, an AdamW optimizer with the saved state)
 * from a checkpoint (expert parallel, with lm_set_layer_creator set: this
 * rank's part: its experts, its slices of split tensors, every replicated
 * tensor; every rank calls it). Any missing, extra or mis-shaped tensor is an error
 * naming it (moe_last_error-style message in msg). to may be NULL. */
moe_status ckpt_load(const char *path, lm **m_out, moe_optim **opt_out, int64_t *step, train_opts *to,
                     char *msg, size_t msg_len);

#endif
