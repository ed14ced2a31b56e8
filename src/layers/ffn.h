/*
 * A bank of E expert feed-forward networks in PyTorch's nn.Linear layout, run
 * over expert-sorted rows: expert e owns rows [offsets[e], offsets[e+1]).
 * Shared by the `topk` and soft layers (gshard's experts have no biases and
 * (in, out) weights, so they keep their own loop).
 * Dimension key: D model dim, H hidden width, H2 = H (MLP) or 2H (GLU),
 * E experts, R rows in all (offsets[E]).
 *
 *   expert(x) = W2 drop(f(W1 x + b1)) + b2
 *   W1 (E,H2,D)  b1 (E,H2)  W2 (E,D,H)  b2 (E,D)
 * f is the activation (MLP) or a*f(g) over the halves [a | g] (GLU).
 * drop is inverted dropout with probability p (train mode only): element
 * (r, j) of the activation is zeroed when moe_rng_uniform(stream, r*H + j) < p
 * and the rest scaled by 1/(1-p), so the mask depends only on the stream and
 * the row order, never on the thread count.
 */
#ifndef MOE_FFN_H
#define MOE_FFN_H

#include "internal.h"

typedef struct {
    const float *W1, *b1, *W2, *b2; /* parameters (shapes above)                */
    float *dW1, *db1, *dW2, *db2;   /* their gradients (accumulated); backward  */
    int64_t D, H;
    int E;
    moe_expert_kind kind;
    moe_activation act;             /* MLP experts                              */
    float slope;                    /* leaky_relu                               */
    float dropout;                  /* p in [0, 1); 0: none                     */
    uint64_t stream;                /* dropout RNG stream of this forward       */
    /* bf16 mixed precision (autocast): W1h, W2h the bf16 copies of W1, W2;
     * NULL runs fp32. Then the GEMMs take bf16 inputs and accumulate and
     * write fp32: x16 (R,D), h16 (R,H) are the forward's inputs rounded to
     * bf16 (kept for the backward), dy16 (R,D) and dhp16 (R,H2) the
     * backward's scratch. Biases, activations, dropout stay fp32. */
    const uint16_t *W1h, *W2h;
    uint16_t *x16, *h16, *dy16, *dhp16;
} moe_ffn;

static inline int64_t moe_ffn_h2(const moe_ffn *f) { return f->kind == MOE_EXPERT_MLP ? f->H : 2 * f->H; }

/* Forward over R = offsets[E] rows:
 *   xe (R,D) read; hpre (R,H2) pre-activation, ha (R,H) activation after
 *   dropout, ye (R,D) written. For MLP experts ha may be hpre (the
 *   activation in place) when no backward follows. */
void moe_ffn_forward(const moe_ffn *f, const int64_t *offsets, const float *xe,
                     float *hpre, float *ha, float *ye);
/* Backward from dye (R,D): parameter gradients accumulate, dha (R,H) and
 * dhpre (R,H2) are scratch, dxe (R,D) written (skipped when NULL). Returns 1
 * if a gradient it accumulated into holds a NaN or Inf (each expert's are
 * scanned in its task right after they are written, while in cache), else 0. */
int moe_ffn_backward(const moe_ffn *f, const int64_t *offsets, const float *xe,
                      const float *hpre, const float *ha, const float *dye,
                      float *dha, float *dhpre, float *dxe);

/* Run fn(ctx, e, r0, n) for every expert e with n > 0 rows [r0, r0+n) of
 * offsets (E+1). Experts run in parallel, one OpenMP thread per expert at a
 * time (schedule dynamic, the experts holding more than 1/(2 threads) of the
 * rows first), and every GEMM fn makes is one single-threaded GEMM call (oneDNN)
 * (moe__in_task): many GEMMs side by side keep every core busy with no
 * fork/join per GEMM, and each expert's numbers are the same on any thread
 * count. fn must only write its own expert's rows and gradients; the
 * elementwise helpers it calls run on its thread (nested regions are off).
 * With E == 1 (one FFN) fn runs once outside any task, so its GEMMs and
 * helpers use every thread (moe_sgemm's shape-only tiling keeps the bits). */
void moe_each_expert(const int64_t *offsets, int E, void (*fn)(void *ctx, int e, int64_t r0, int64_t n),
                     void *ctx);

#endif
