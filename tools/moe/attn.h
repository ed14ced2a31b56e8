/*
 * Causal multi-head self-attention with rotary position embeddings (RoPE)
 * for the `moe train` transformer (lm.h): forward, backward, one-token
 * decode against a key/value cache, and plain reference twins that the
 * GEMM-based kernels are tested against (tests/test_attn.c).
 *
 * Layout: qkv (T, 3D) holds, per token, q | k | v, each D = NH * hd wide;
 * head h owns columns h*hd .. h*hd+hd-1 of each. Tokens are B sequences of
 * S consecutive rows. o (T, D) has the heads side by side (the input of the
 * output projection).
 *   o_h = softmax(q_h k_h^T / sqrt(hd) + causal mask) v_h     (Vaswani et al.
 *         2017, eq. 1; mask: key j > query i gets probability 0)
 * RoPE (Su et al. 2021, "RoFormer"), rotate-half pairs (i, i + hd/2) as in
 * GPT-NeoX and LLaMA: for i < hd/2, f_i = theta^(-2i/hd), a = pos * f_i,
 *   (u, w) -> (u cos a - w sin a, w cos a + u sin a)
 * computed in double and rounded to float.
 * Dimension key: B sequences, S positions, T = B*S tokens, D model dim,
 * NH heads, hd = D/NH head dim (even), n cached positions.
 */
#ifndef MOE_ATTN_H
#define MOE_ATTN_H

#include <stdint.h>

/* RoPE in place on the q and k parts of qkv (B*S, 3D); position of row s of
 * each sequence is pos0 + s. sign +1 rotates by +a (forward), -1 by -a: the
 * transpose, which is the backward (applied to dq, dk). */
void attn_rope(float *qkv, int64_t B, int64_t S, int64_t pos0, int64_t D, int64_t NH, double theta, int sign);

/* Forward. o (B*S, D) written; P (B, NH, S, S) written: the attention
 * probabilities, 0 above the diagonal (kept for the backward). qkv after
 * RoPE. GEMMs per (sequence, head) through moe_sgemm, the (b, h) pairs in
 * parallel: the result does not depend on the thread count. */
void attn_forward(float *o, float *P, const float *qkv, int64_t B, int64_t S, int64_t D, int64_t NH);
/* Backward. dqkv (B*S, 3D) written (gradients w.r.t. the rotated q, k and
 * v); dout (B*S, D) read; qkv and P as the forward left them; work
 * (B, NH, S, S) scratch. */
void attn_backward(float *dqkv, float *work, const float *dout, const float *qkv, const float *P, int64_t B,
                   int64_t S, int64_t D, int64_t NH);

/* One query against n cached positions (the query's own key and value are
 * the last ones): o (D) written; q (D) rotated; kc, vc (n, ldc) rows of
 * rotated keys and of values (ldc >= D); w (n) scratch. */
void attn_decode(float *o, float *w, const float *q, const float *kc, const float *vc, int64_t ldc, int64_t n,
                 int64_t D, int64_t NH);

/* Plain reference twins: loops, double accumulation, no GEMM. Same
 * arguments as the kernels (attn_backward_ref needs no work buffer). */
void attn_forward_ref(float *o, float *P, const float *qkv, int64_t B, int64_t S, int64_t D, int64_t NH);
void attn_backward_ref(float *dqkv, const float *dout, const float *qkv, const float *P, int64_t B, int64_t S,
                       int64_t D, int64_t NH);

#endif
