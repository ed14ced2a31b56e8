/*
 * The expert bank: E expert feed-forward networks whose weights are in one
 * format, run over expert-sorted rows: expert e owns rows
 * [offsets[e], offsets[e+1]). One bank serves every layer that runs experts
 * on gathered rows (topk, gshard, hierarchical, the soft layers); a layer
 * names neither a precision nor an ISA: it fills a moe_bank (its
 * parameters; moe__layer_bank adds the format and the format's weights) and
 * carves the format's row copies with moe_bank_carve_lowp.
 * Dimension key: D model dim, H hidden width, H2 = H (MLP) or 2H (GLU),
 * E experts, R rows in all (offsets[E]), n rows of one expert.
 *
 *   expert(x) = W2 drop(f(W1 x + b1)) + b2
 * nn.Linear layout (topk, soft): W1 (E,H2,D)  b1 (E,H2)  W2 (E,D,H)  b2 (E,D)
 * transposed (gshard, hierarchical: x @ w1 as the seed): W1 (E,D,H2)
 *   W2 (E,H,D), no biases (b1, b2 NULL).
 * f is the activation (MLP) or a*f(g) over the halves [a | g] (GLU).
 * drop is inverted dropout with probability p (train mode only): element
 * (r, j) of the activation is zeroed when moe_rng_uniform(stream, r*H + j) < p
 * and the rest scaled by 1/(1-p), so the mask depends only on the stream and
 * the row order, never on the thread count.
 *
 * Formats (bank/f32.c, bank/bf16.c; q8_0, q4_k later): how the weights are
 * stored and what the GEMMs take. bf16 is autocast: the GEMM inputs
 * (rows, activations, gradients, weights) rounded to bf16, fp32 sums and
 * outputs; biases, activations and dropout stay fp32.
 */
#ifndef MOE_BANK_H
#define MOE_BANK_H

#include "internal.h"

/* The format's copies of the GEMM inputs, R rows each (all NULL for f32):
 * x (R,D) the rows in, h (R,H) the activations, dy (R,D) the output
 * gradients, dhp (R,H2) the pre-activation gradients. */
typedef struct {
    uint16_t *x, *h, *dy, *dhp;
} moe_bank_lowp;

/* A weight format: its GEMMs. Every matrix dense row-major; op(A) (M,K) is
 * A (M,K), or A (K,M) when ta; op(B) (K,N) is B (K,N), or B (N,K) when tb.
 *   gemm: C (M,N) = op(A) op(B) + beta C (beta 0 or 1), from the fp32
 *         operands (A, B) or the format's copies (A16, B16): each format
 *         reads the ones it stores.
 *   gemv_nt: decode, C (n,N) += A (n,K) W^T for n <= MOE_SMALL_ROWS, W (N,K)
 *         in nn.Linear's layout: reads W once.
 *   lowp: 1 if the GEMMs read 16-bit copies of the rows, which the bank
 *         makes with to_lowp (elementwise, on the calling thread). */
typedef struct moe_bank_format {
    const char *name;
    int lowp;
    void (*to_lowp)(uint16_t *dst, const float *src, int64_t n);
    void (*gemm)(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, const uint16_t *A16,
                 const float *B, const uint16_t *B16, float beta, float *C);
    void (*gemv_nt)(float *C, const float *A, const uint16_t *A16, const float *W, const uint16_t *W16, int64_t n,
                    int64_t N, int64_t K);
} moe_bank_format;

extern const moe_bank_format moe_bank_f32, moe_bank_bf16;
/* The format of a layer's config: cfg.bf16 (MOE_BF16_WEIGHTS too) is bf16. */
static inline const moe_bank_format *moe_bank_format_of(int bf16) { return bf16 ? &moe_bank_bf16 : &moe_bank_f32; }

typedef struct moe_bank {
    const float *W1, *b1, *W2, *b2; /* parameters (shapes above; b1, b2 may be NULL)  */
    float *dW1, *db1, *dW2, *db2;   /* their gradients (accumulated); backward        */
    int64_t D, H;
    int E;
    int transposed;                 /* weights (E,D,H2), (E,H,D): x @ W1              */
    moe_expert_kind kind;
    moe_activation act;             /* MLP experts                                    */
    float slope;                    /* leaky_relu                                     */
    float dropout;                  /* p in [0, 1); 0: none                           */
    uint64_t stream;                /* dropout RNG stream of this forward             */
    /* the format and its weights (moe__layer_bank), its row copies (moe_bank_carve_lowp) */
    const moe_bank_format *fmt;
    const uint16_t *W1q, *W2q;      /* W1, W2 in the format (lowp formats), else NULL */
    moe_bank_lowp lp;
} moe_bank;

static inline int64_t moe_bank_h2(const moe_bank *b) { return b->kind == MOE_EXPERT_MLP ? b->H : 2 * b->H; }

/* Carve the format's row copies of R rows (widths D, H, D, H2) from base at
 * *off (base NULL: measure only; 0 rows for fp32). */
static inline void moe_bank_carve_lowp(const moe_bank_format *fmt, char *base, size_t *off, int64_t R, int64_t D,
                                       int64_t H, int64_t H2, moe_bank_lowp *lp);

/* Forward over R = offsets[E] rows:
 *   xe (R,D) read; hpre (R,H2) pre-activation, ha (R,H) activation after
 *   dropout, ye (R,D) written. For MLP experts ha may be hpre (the
 *   activation in place) when no backward follows. */
void moe_bank_forward(const moe_bank *b, const int64_t *offsets, const float *xe, float *hpre, float *ha, float *ye);
/* Backward from dye (R,D): parameter gradients accumulate, dha (R,H) and
 * dhpre (R,H2) are scratch (they may be one buffer for MLP experts), dxe
 * (R,D) written (skipped when NULL). Returns 1 if a gradient it accumulated
 * into holds a NaN or Inf (each expert's are scanned in its task right after
 * they are written, while in cache), else 0. */
int moe_bank_backward(const moe_bank *b, const int64_t *offsets, const float *xe, const float *hpre, const float *ha,
                      const float *dye, float *dha, float *dhpre, float *dxe);

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
void moe_each_expert(const int64_t *offsets, int E, void (*fn)(void *ctx, int e, int64_t r0, int64_t n), void *ctx);

/* ---- inline ---- */
static inline void moe_bank_carve_lowp(const moe_bank_format *fmt, char *base, size_t *off, int64_t R, int64_t D,
                                       int64_t H, int64_t H2, moe_bank_lowp *lp) {
    if (!fmt->lowp) { /* the GEMMs read the fp32 rows */
        lp->x = lp->h = lp->dy = lp->dhp = NULL;
        return;
    }
    int64_t r = R;
    lp->x = moe__carve(base, off, r, D, sizeof(uint16_t));
    lp->h = moe__carve(base, off, r, H, sizeof(uint16_t));
    lp->dy = moe__carve(base, off, r, D, sizeof(uint16_t));
    lp->dhp = moe__carve(base, off, r, H2, sizeof(uint16_t));
}

#endif
