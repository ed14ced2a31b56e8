/*
 * A character-level language model whose feed-forward blocks are MoE layers:
 * the model `moe train` trains, `moe sample` and `moe eval` run.
 *
 *   e   = concat(emb[c_1], ..., emb[c_W])        the W previous bytes   (T, W*C)
 *   x_0 = e Wp^T + bp                                                   (T, D)
 *   x_l = x_{l-1} + MoE_l(RMSNorm_l(x_{l-1}))     l = 1..L               (T, D)
 *   z   = RMSNorm_f(x_L) Wh^T + bh                logits over 256 bytes (T, V)
 *   loss = mean cross-entropy + sum of the layers' auxiliary losses
 * RMSNorm(x) = x / sqrt(mean(x^2) + 1e-5) * g.
 * Layers with groups (gshard, hierarchical, soft) see the T tokens as T/N
 * groups of N = cfg.group tokens.
 * Dimension key: T tokens (batch rows), W window, C embedding dim, D model
 * dim, V = 256 vocabulary, L blocks.
 */
#ifndef MOE_LM_H
#define MOE_LM_H

#include "moe.h"

#include <stdint.h>

#define LM_VOCAB 256

typedef struct {
    int64_t W, C, D, L;  /* window, embedding dim, model dim, blocks      */
    int64_t group;       /* tokens per group for layers with groups        */
    moe_config moe;      /* every block's layer (its seed is offset by l)  */
    int dense;           /* the --dense comparison model (E = K = 1)       */
} lm_config;

typedef struct lm lm;

/* Create with parameters initialised from cfg->moe.seed. */
moe_status lm_create(lm **out, const lm_config *cfg);
/* The function that creates the MoE blocks' layers (moe_layer_create when
 * NULL, the default): `moe train --ep` sets the expert-parallel one. Returns
 * the previous one. */
typedef moe_status (*lm_layer_creator)(moe_layer **out, const moe_config *cfg);
lm_layer_creator lm_set_layer_creator(lm_layer_creator fn);
/* Data parallel over P ranks, each with its own T tokens of a global batch
 * of P*T: the loss (and so the gradient) of one rank becomes its share of the
 * global loss, sum CE / (P*T) + aux / P, so the sum over the ranks of the
 * losses, and of the replicated gradients (lm_sum_grads), is one process's. */
void lm_set_data_parallel(lm *m, int P);
/* Sum the gradients of every replicated parameter over the ranks: the
 * model's own through sum (in place, over n floats), the layers' with
 * moe_layer_allreduce_grads. Returns MOE_OK or the first failure. */
moe_status lm_sum_grads(lm *m, int (*sum)(float *v, int64_t n));
/* For parameter i of the table: its layer and index there, or -1 for the
 * model's own parameters. */
int lm_param_layer(const lm *m, int i, int *layer_index);
void       lm_free(lm *m);
const lm_config *lm_get_config(const lm *m);
/* Every parameter, the model's own and the layers', in one table (names
 * "emb.weight", "blocks.0.moe.gate.weight", ...). */
int        lm_num_params(const lm *m);
moe_param *lm_params(lm *m);
int64_t    lm_num_weights(const lm *m);
moe_layer *lm_layer(lm *m, int64_t l);
void       lm_zero_grad(lm *m);

/* Forward over T windows: ctx (T, W) bytes, tgt (T) next bytes (NULL: no
 * loss). Writes the mean loss (cross-entropy + aux) and, if given,
 * ce (T) per-token cross-entropy and pred (T) argmax bytes; logits stay
 * in the model for sampling (lm_logits). train 1 caches for lm_backward.
 * T must be a multiple of cfg.group for layers with groups. */
moe_status lm_forward(lm *m, double *loss, float *ce, uint8_t *pred, const uint8_t *ctx, const uint8_t *tgt,
                      int64_t T, int train);
/* Logits (T, V) of the last forward. */
const float *lm_logits(const lm *m);
/* Backward of the last train forward's mean loss; gradients accumulate. */
moe_status lm_backward(lm *m);

#endif
