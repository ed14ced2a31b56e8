/*
 * The kernel seam: ONE table of CPU kernel function pointers, filled once
 * per process for the level the CPU has (cpu.c, MOE_MAX_CPU_ISA caps it).
 *
 *   generic/         the oracle of every kernel: plain C, built for the
 *                    baseline; where it promises bits, every variant gives them
 *   x86_avx2/        AVX2 + FMA          (built with -mavx2 -mfma)
 *   x86_avx512/      AVX-512 F/BW/DQ/VL  (built with -mavx512f ...)
 *   x86_avx512bf16/  + AVX512-BF16       (built with ... -mavx512bf16)
 *   arm_neon/        Advanced SIMD       (arm64)
 *   onednn.c         the GEMM entry: fp32 through oneDNN; bf16 natively
 *                    (oneDNN's bf16 matmul where the CPU has bf16 dot
 *                    products) or widened to fp32 (exact) and run as fp32
 *
 * The table for a level is the generic table with each folder up to that
 * level laid over it (moe__kernels_fill_<isa>): a folder fills only what it
 * does better. Adding an ISA is adding a folder and one line in kernels.c.
 * tests/test_kernels.c runs every level the CPU has against generic.
 *
 * Only this header and the folders' own files are compiled with ISA flags;
 * nothing here includes OpenMP or oneDNN, so an ISA file cannot leak wide
 * instructions into code that runs before dispatch.
 *
 * Dimension key: n elements or rows, N output columns, K inner dim,
 * M rows of a GEMM.
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include "moe.h"

#include <stdint.h>

typedef struct moe_kernels {
    moe_isa isa; /* the level this table is for */

    /* ---- conversions (bits: every variant exactly generic's) ----
     * dst (n) = src rounded to bf16, nearest even; NaN stays a quiet NaN,
     * denormals kept (torch's .to(torch.bfloat16), not vcvtneps2bf16). */
    void (*to_bf16)(uint16_t *dst, const float *src, int64_t n);
    /* dst (n) = src widened to fp32 (exact). */
    void (*bf16_to_f32)(float *dst, const uint16_t *src, int64_t n);

    /* ---- elementwise math (bits: every variant exactly generic's; see
     * generic/vmath.c for the method and ops.h for the contracts) ---- */
    void (*vexpf_sub)(float *y, const float *x, float c, int64_t n);
    void (*vsilu)(float *y, const float *x, int64_t n);
    void (*vsilu_backward)(float *dx, const float *dy, const float *x, int64_t n);
    void (*vswiglu)(float *o, const float *a, const float *g, int64_t n);
    void (*vswiglu_backward)(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n);

    /* dst (cols, rows) dense = src (rows, cols; row stride ld)^T: a copy
     * (bits: exact on every level). */
    void (*transpose)(float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld);

    /* ---- decode GEMVs: C (n,N) += A (n,K) W^T for W (N,K) row-major
     * (nn.Linear's layout) and few rows n <= MOE_SMALL_ROWS: each row of W
     * read once. Summation (generic.h, moe__dot_tree): 16 fp32 lanes, lane
     * i summing elements k = 16 j + i in order of j, then a fixed tree
     * over the lanes, then the K % 16 tail in order, so a result depends
     * only on K.
     * fp32: products then sums (no fused multiply-add): bits of generic on
     * every level.
     * bf16: blocks of 32, lane i taking element 2i+1 then 2i of each block
     * (the order of vdpbf16ps), the K % 32 tail in order, products then
     * sums (a product of two bf16 is exact in fp32 only while it is
     * normal): every level gives generic's bits, AVX512-BF16 too unless a
     * value, a product or a partial sum is subnormal (vdpbf16ps flushes
     * those to zero). NaN: a NaN result is a NaN everywhere, but which one
     * (payload, sign) when both operands of a product are NaN is the
     * hardware's and the compiler's choice. */
    void (*sgemm_nt_small)(float *C, int64_t ldc, const float *A, int64_t lda, const float *W, int64_t n,
                           int64_t N, int64_t K);
    void (*gemm_bf16_nt_small)(float *C, int64_t ldc, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N,
                               int64_t K);

    /* ---- GEMM entries (onednn.c) ----
     * sgemm1: one single-threaded call C = alpha op(A) op(B) + beta C
     * (moe_sgemm's tile); 0 if the library failed (nothing written).
     * sgemm_prefers_nt: moe_sgemm turns a big GEMM that is not A B^T into
     * one by transposing its operands into the thread's scratch first (set
     * at the avx2 level: oneDNN 2.6's AVX2 sgemm runs A B^T 2.0-2.5x faster
     * than A B or A^T B at expert shapes, measured on AMD Zen 4; at
     * avx512 all four run alike). */
    int (*sgemm1)(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
    int sgemm_prefers_nt;
    /* C (M,N) = op(A) op(B) + beta C, A and B bf16 dense row-major, C fp32,
     * beta 0 or 1 (see moe_gemm_bf16 in ops.h); 0 if it failed (nothing
     * written). Native bf16 (oneDNN) or widened to fp32. */
    int (*gemm_bf16)(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                     float beta, float *C);

    /* ---- routing (generic only: they keep libm's expf, whose bits the
     * routing decisions and the parity tests rely on) ---- */
    void (*softmax_rows)(float *p, const float *logits, int64_t T, int64_t E);
    void (*topk_softmax)(int32_t *idx, float *w, const float *logits, int64_t T, int64_t E, int K);
} moe_kernels;

/* The table of this process (made on first use; the same pointer after). */
extern const moe_kernels *volatile moe__kt;
const moe_kernels *moe__kernels_init(void);
static inline const moe_kernels *moe_k(void) {
    const moe_kernels *k = __atomic_load_n(&moe__kt, __ATOMIC_ACQUIRE);
    return k ? k : moe__kernels_init();
}

/* The table of a level (tests: each level against generic), or NULL if
 * this CPU or this build lacks it. The tables share the process's oneDNN
 * cap (made for moe_cpu_isa()). */
const moe_kernels *moe__kernels_at(moe_isa isa);

/* The calling thread's scratch for the GEMM entries (onednn.c): slot's
 * buffer of at least n floats, 64-byte aligned, kept for the thread's next
 * call (no allocation per step once the shapes have been seen) and freed at
 * the thread's exit; NULL if it cannot be allocated. Slots: the widened
 * bf16 operands, and the transposed fp32 operands (moe_sgemm). */
enum { MOE_SCRATCH_WIDE_A, MOE_SCRATCH_WIDE_B, MOE_SCRATCH_T_A, MOE_SCRATCH_T_B, MOE_SCRATCH_SLOTS };
float *moe__kernel_scratch(int slot, size_t n);
/* The GEMM entries work in blocks of C whose copied operands hold at most
 * this many floats each (4 MB), so the scratch stays bounded per thread
 * however big an expert's weights are (a Mixtral-size expert matrix is 58M
 * floats): moe__gemm_block(L, K) is the rows (of L) of a block with inner
 * dimension K, a multiple of 16 (at least 16). */
#define MOE_SCRATCH_BLOCK ((int64_t)1 << 20)
int64_t moe__gemm_block(int64_t L, int64_t K);
/* The block size in floats in use: MOE_SCRATCH_BLOCK; tests lower it to
 * run the blocked paths on small matrices. */
extern int64_t moe__scratch_block;

/* Each folder lays its kernels over a table (kernels.c calls them in order). */
void moe__kernels_fill_generic(moe_kernels *k);
void moe__kernels_fill_onednn(moe_kernels *k);
#if defined(__x86_64__)
void moe__kernels_fill_avx2(moe_kernels *k);
void moe__kernels_fill_avx512(moe_kernels *k);
void moe__kernels_fill_avx512bf16(moe_kernels *k);
#elif defined(__aarch64__)
void moe__kernels_fill_neon(moe_kernels *k);
#endif

#endif
