/*
 * A byte-level decoder-only MoE transformer: the model `moe train` trains,
 * `moe sample` and `moe eval` run. Pre-norm blocks as in Mixtral / LLaMA,
 * whose feed-forward part is any libmoe layer:
 *
 *   x_0 = emb[tok]                                                   (T, D)
 *   for l = 0..L-1:
 *     a   = RMSNorm(x, blocks.l.attn_norm.weight)
 *     qkv = a Wqkv^T                  Wqkv = blocks.l.attn.qkv.weight  (3D, D)
 *           rows of Wqkv: [q; k; v], each D; head h owns columns h*hd..h*hd+hd-1
 *     q, k rotated by RoPE (rotate-half pairs (i, i + hd/2), the GPT-NeoX /
 *           LLaMA convention): angle = pos * theta^(-2i/hd), i < hd/2,
 *           (u, w) -> (u cos - w sin, w cos + u sin), theta = cfg.rope_theta
 *     o   = softmax(q k^T / sqrt(hd) + causal mask) v   per sequence and head
 *     x   = x + o Wo^T                Wo = blocks.l.attn.out.weight    (D, D)
 *     x   = x + MoE_l(RMSNorm(x, blocks.l.moe_norm.weight))
 *                                     layer parameters blocks.l.moe.<name>
 *   z = RMSNorm(x, norm_f.weight) head.weight^T                      (T, V)
 *   loss = mean cross-entropy + sum of the layers' auxiliary losses
 * RMSNorm(x, g) = x / sqrt(mean(x^2) + 1e-5) * g. No biases outside the MoE
 * layers. pos is the position inside each sequence (0..S-1).
 * Layers with groups (gshard, hierarchical, soft) see the T = B*S tokens as
 * T/N groups of N = cfg.group tokens.
 * Dimension key: B sequences, S sequence length (<= cfg.S, the context),
 * T = B*S tokens, D model dim, NH heads, hd = D/NH head dim, V = 256
 * vocabulary, L blocks.
 */
#ifndef MOE_LM_H
#define MOE_LM_H

#include "moe.h"

#include <stdint.h>

#define LM_VOCAB 256

typedef struct {
    int64_t S;           /* context: the longest sequence (positions)      */
    int64_t D, L;        /* model dim, blocks                               */
    int64_t heads;       /* attention heads NH; D % NH == 0, hd even         */
    double rope_theta;   /* RoPE base (10000)                               */
    int64_t group;       /* tokens per group for layers with groups         */
    moe_config moe;      /* every block's layer (its seed is offset by l)   */
    int dense;           /* the --dense comparison model (E = K = 1)        */
} lm_config;

typedef struct lm lm;

/* Create with parameters initialised from cfg->moe.seed: emb N(0, 1), the
 * projections and head U(-1/sqrt(D), 1/sqrt(D)) (nn.Embedding's and
 * nn.Linear's defaults), norms 1; each block's layer from its own seed.
 * MOE_ERR_ARG for a config lm_config_check refuses (call it for the reason);
 * a layer's own errors as moe_layer_create returns them. */
moe_status lm_create(lm **out, const lm_config *cfg);
/* Check a config; 0 if fine, else -1 with the reason in msg. */
int lm_config_check(const lm_config *cfg, char *msg, size_t msg_len);
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
 * "emb.weight", "blocks.0.attn.qkv.weight", "blocks.0.moe.gate.weight", ...). */
int        lm_num_params(const lm *m);
moe_param *lm_params(lm *m);
int64_t    lm_num_weights(const lm *m);
/* Multiply-adds per token of one forward, attention at full context S
 * counted as S/2 keys on average (the causal half), for model FLOP
 * utilisation: 2 * this * 3 FLOPs per trained token. */
double     lm_macs_per_token(const lm *m, int64_t S);
moe_layer *lm_layer(lm *m, int64_t l);
void       lm_zero_grad(lm *m);

/* Forward over B sequences of S bytes: tok (B, S) inputs, tgt (B, S) next
 * bytes (NULL: no loss). Writes the mean loss (cross-entropy + aux) and, if
 * given, ce (B*S) per-token cross-entropy and pred (B*S) argmax bytes;
 * logits stay in the model (lm_logits). train 1 caches for lm_backward.
 * S <= cfg.S; B*S must be a multiple of cfg.group for layers with groups. */
moe_status lm_forward(lm *m, double *loss, float *ce, uint8_t *pred, const uint8_t *tok, const uint8_t *tgt,
                      int64_t B, int64_t S, int train);
/* Logits (B*S, V) of the last forward (or (1, V) after lm_decode). */
const float *lm_logits(const lm *m);
/* Backward of the last train forward's mean loss; gradients accumulate. */
moe_status lm_backward(lm *m);

/* Incremental decoding with a key/value cache (sampling): lm_decode_reset
 * empties the cache; lm_decode appends one byte at the next position
 * (0, 1, ... < cfg.S) and leaves its next-byte logits in lm_logits. With
 * token-choice layers (topk without expert choice, dense) these are the
 * logits lm_forward gives at that position of the whole sequence. Layers
 * with groups see a group of N copies of the token: they mix a group's
 * tokens (not causal), so no decode can equal their forward.
 * MOE_ERR_ARG when the cache is full (S bytes): reset and feed a shorter
 * context. */
moe_status lm_decode_reset(lm *m);
moe_status lm_decode(lm *m, uint8_t tok);
int64_t    lm_decode_pos(const lm *m);

#endif
