/*
 * The operations the layers use. The CPU kernels among them (conversions,
 * elementwise math, the decode GEMVs, the GEMM entries, softmax, top-k) go
 * through the kernel table (src/kernels/kernels.h), made once per process
 * for the CPU's level; the rest is plain C here.
 * Dimension key: T tokens, D model dim, H expert hidden dim, O output dim,
 * E experts, K top-k, A = T*K routed assignments.
 */
#ifndef MOE_OPS_H
#define MOE_OPS_H

#include "../kernels/generic/generic.h"
#include "internal.h"

/* moe_sgemm (C = alpha op(A) op(B) + beta C through oneDNN, with libmoe's
 * thread-count-independent tiling) is public: see moe.h. While moe__in_task
 * is set on a thread (moe_each_expert's tasks), its GEMMs are one
 * single-threaded oneDNN call each, untiled, on any thread count. */
extern _Thread_local int moe__in_task;

/* The plain twin of moe_sgemm (same arguments, row-major, ta/tb transpose A/B):
 * each element a dot product summed in double, then rounded (generic/gemm_ref.c).
 * Tests compare moe_sgemm against it; moe_sgemm falls back to it if oneDNN
 * fails (and says so in moe_cpu_notes). */
void moe_sgemm_ref(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

/* ---- bf16 mixed precision (bf16.c) ----
 * bf16 values are uint16_t: the upper half of a float32. */
/* moe_f32_to_bf16, moe_bf16_to_f32: one value each way (generic/generic.h) */
void     moe_to_bf16(uint16_t *dst, const float *src, int64_t n);     /* this thread */
void     moe_to_bf16_par(uint16_t *dst, const float *src, int64_t n); /* all threads */
/* dst (n) = f(src) over every thread, in chunks (f elementwise: any split gives the same bits). */
void     moe_convert_par(void (*f)(uint16_t *dst, const float *src, int64_t n), uint16_t *dst, const float *src,
                         int64_t n);
/* C (M,N) = op(A) op(B) + beta C, beta 0 or 1, A and B bf16, C and the
 * accumulation fp32, every matrix dense row-major: op(A) (M,K) is A (M,K), or
 * A (K,M) when ta; op(B) (K,N) is B (K,N), or B (N,K) when tb. Native bf16
 * (oneDNN, avx512_bf16 level) as one single-threaded call (the expert tasks
 * are the parallelism), or widened to fp32 and run as moe_sgemm (every other
 * level): either way the bits depend only on the shape and the level. If
 * the native path fails it runs widened; if that fails too, the plain twin
 * (each said once in moe_cpu_notes). */
void moe_gemm_bf16(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                   float beta, float *C);
/* The widened path itself (src/kernels/onednn.c); 0 if its scratch could
 * not be allocated (nothing written). */
int moe__gemm_bf16_widen(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                         float beta, float *C);
/* Decode: C (n,N) += A (n,K) W^T for few rows (n <= MOE_SMALL_ROWS), A and W
 * (N,K) bf16 dense: reads W once (the table's GEMV: vdpbf16ps where the CPU
 * has it, widened in registers otherwise; kernels.h gives its sums). The
 * same product as moe_gemm_bf16(0, 1, n, N, K, A, W, 1, C) up to float
 * rounding. */
void moe_gemm_bf16_nt_small(float *C, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N, int64_t K);
/* Its plain twin: exact products summed in double. Any beta. */
void moe_gemm_bf16_ref(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                       float beta, float *C);

/* C (n,N) += A (n,K) W^T for W (N,K) row-major (nn.Linear's layout), for
 * few rows (decode: n <= MOE_SMALL_ROWS): reads W once, where a library GEMM
 * packs it first. The same product as moe_sgemm(0, 1, n, N, K, 1, A, lda,
 * W, K, 1, C, ldc) up to float rounding. */
#define MOE_SMALL_ROWS 8
void moe_sgemm_nt_small(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                        int64_t N, int64_t K);

/* rows (M,N): each row r += b (N). */
void moe_add_bias_rows(float *rows, const float *b, int64_t M, int64_t N);
/* db (N) += column sums of g (M,N), summed in row order (deterministic). */
void moe_colsum_acc(float *db, const float *g, int64_t M, int64_t N);

/* ---- activations (elementwise; `pre` is the pre-activation input) ---- */
/* out (n) = act(pre). out may alias pre. */
void moe_act_forward(float *out, const float *pre, int64_t n, moe_activation act, float slope);
/* din (n) = dout * act'(pre). din may alias dout. */
void moe_act_backward(float *din, const float *dout, const float *pre, int64_t n,
                      moe_activation act, float slope);
/* GLU: pre (M, 2H) = [a | g]; out (M, H) = a * f(g), f silu (SWIGLU) or exact
 * gelu (GEGLU). */
void moe_glu_forward(float *out, const float *pre, int64_t M, int64_t H, moe_expert_kind kind);
/* dpre (M, 2H) from dout (M, H) and pre (M, 2H). */
void moe_glu_backward(float *dpre, const float *dout, const float *pre, int64_t M, int64_t H,
                      moe_expert_kind kind);

/* ---- vectorised elementwise math (vmath.c) ----
 * exp by Cody-Waite range reduction and a degree-7 polynomial (SLEEF's
 * xexpf coefficients): within 1 ulp of the exact value for every float
 * (0.988 measured over all 2^32; tests assert <= 2; libm's expf: 0.5 ulp,
 * but a scalar call gcc does not vectorise without -ffast-math). Special
 * cases exact: NaN -> NaN (quiet), +inf -> +inf, -inf -> +0,
 * x > ln(FLT_MAX) ~ 88.7228 -> +inf, denormal results rounded once (gradual
 * underflow), x < -150 ln2 ~ -103.972 -> +0.
 * Each array function runs the kernel table's version for the CPU's level
 * (AVX-512, AVX2, NEON or the scalar twins, src/kernels); all give the
 * same bits for every input, any length and alignment. Outputs may alias
 * inputs exactly (y == x), not partially. Elementwise, so independent of the
 * thread count. Not for routing decisions: the routers keep libm's expf.
 * The scalar twins (moe_expf, moe_sigmoidf, moe_siluf, moe_silu_gradf) are
 * declared in generic/generic.h. The silu/SwiGLU array functions return the
 * one quiet NaN 0x7fc00000 for a NaN result. */
/* y (n) = e^x (n). */
void moe_vexpf(float *y, const float *x, int64_t n);
/* y (n) = e^(x - c) for x (n): a softmax's numerators (bits of moe_expf(x[i] - c)). */
void moe_vexpf_sub(float *y, const float *x, float c, int64_t n);
/* y (n) = silu(x) (n), bits of moe_siluf. */
void moe_vsilu(float *y, const float *x, int64_t n);
/* dx (n) = dy (n) * silu'(x (n)), bits of dy[i] * moe_silu_gradf(x[i]). */
void moe_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n);
/* SwiGLU: o (n) = a * silu(g) for a, g (n): bits of a[i] * moe_siluf(g[i]). */
void moe_vswiglu(float *o, const float *a, const float *g, int64_t n);
/* Its backward for d = dL/do (n): da (n) = d * silu(g), dg (n) = (d * a) * silu'(g)
 * (written, not accumulated); bits of the twins in that order. */
void moe_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n);

/* ---- softmax and routing ---- */
/* p (T,E) = softmax over each row of logits (T,E). p may alias logits. */
void moe_softmax_rows(float *p, const float *logits, int64_t T, int64_t E);
/* Backward of a row softmax: dlogit (T,E) = p * (dp - sum(p * dp)). */
void moe_softmax_rows_backward(float *dlogit, const float *p, const float *dp, int64_t T, int64_t E);

/* idx (T,K): the K largest logits of each row, largest first (ties: lower
 * index first); w (T,K): softmax over those K logits (seed 004). */
void moe_topk_softmax(int32_t *idx, float *w, const float *logits, int64_t T, int64_t E, int K);

/* Index-based dispatch plan (a counting sort in token order, deterministic):
 *   counts  (E)    rows routed to each expert
 *   offsets (E+1)  prefix sums of counts; expert e owns rows [offsets[e], offsets[e+1])
 *   pos     (T*K)  in: < 0 for an assignment that is dropped (capacity) or
 *                  unused, else anything; out: its row in the expert-sorted
 *                  buffers, -1 kept for the dropped ones
 *   slot_tok (A)   token of each row
 * from idx (T,K). */
void moe_dispatch_plan(int64_t *counts, int64_t *offsets, int32_t *pos, int32_t *slot_tok,
                       const int32_t *idx, int64_t T, int K, int E);
/* dst (A,D): dst[r] = src[slot_tok[r]] for src (T,D). */
void moe_gather_rows(float *dst, const float *src, const int32_t *slot_tok, int64_t A, int64_t D);
/* y (T,D) = sum_j w[t,j] * ye[pos[t,j]] for ye (A,D). In these three, an
 * assignment with pos < 0 was dropped (capacity): it contributes nothing and
 * gets dw = 0. */
void moe_combine(float *y, const float *ye, const float *w, const int32_t *pos,
                 int64_t T, int K, int64_t D);
/* Backward of moe_combine: dye[pos[t,j]] = w[t,j] * dy[t]; dw[t,j] = <dy[t], ye[pos[t,j]]>. */
void moe_combine_backward(float *dye, float *dw, const float *dy, const float *ye,
                          const float *w, const int32_t *pos, int64_t T, int K, int64_t D);
/* dx (T,D) += sum_j dxe[pos[t,j]]. */
void moe_scatter_add(float *dx, const float *dxe, const int32_t *pos, int64_t T, int K, int64_t D);

/* Index of the first non-finite value in v (n), or -1 if all are finite
 * (threaded over chunks). */
int64_t moe_find_nonfinite(const float *v, int64_t n);
/* 1 if v (n) holds a NaN or Inf, else 0; on the calling thread (for tasks). */
int     moe_any_nonfinite(const float *v, int64_t n);

#endif
