/*
 * bf16 mixed precision (PyTorch's autocast on the CPU with bfloat16): the
 * entries the layers call for the conversions and the bf16 x bf16 -> fp32
 * GEMMs of the expert FFNs. The kernels are the table's (src/kernels): the
 * conversions and the decode GEMV per ISA, the GEMM natively in oneDNN where
 * the CPU has bf16 dot products and widened to fp32 elsewhere
 * (src/kernels/onednn.c). bf16 runs on every CPU, never by a silent slow path.
 */
#include "../core/cpu.h"
#include "ops.h"

void moe_to_bf16(uint16_t *dst, const float *src, int64_t n) { moe_k()->to_bf16(dst, src, n); }

void moe_convert_par(void (*f)(uint16_t *dst, const float *src, int64_t n), uint16_t *dst, const float *src,
                     int64_t n) {
    enum { CHUNK = 1 << 16 };
    int64_t nc = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (nc > 1)
    for (int64_t c = 0; c < nc; c++) {
        int64_t a = c * CHUNK, m = n - a < CHUNK ? n - a : CHUNK;
        f(dst + a, src + a, m);
    }
}

void moe_to_bf16_par(uint16_t *dst, const float *src, int64_t n) { moe_convert_par(moe_k()->to_bf16, dst, src, n); }

void moe_gemm_bf16(int ta, int tb, int64_t M, int64_t N, int64_t K, const uint16_t *A, const uint16_t *B,
                   float beta, float *C) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || (beta != 0.0f && beta != 1.0f)) { /* not a case the layers make: the twin */
        moe_gemm_bf16_ref(ta, tb, M, N, K, A, B, beta, C);
        return;
    }
#ifdef MOE_GEMM_PROBE /* sanitizer builds: touch every operand element here (see src/kernels/onednn.c) */
    for (int64_t i = 0; i < M * K; i++) (void)*(const volatile uint16_t *)&A[i];
    for (int64_t i = 0; i < K * N; i++) (void)*(const volatile uint16_t *)&B[i];
    for (int64_t i = 0; i < M * N; i++) {
        volatile float *c = &C[i];
        *c = *c;
    }
#endif
    const moe_kernels *k = moe_k();
    if (k->gemm_bf16(ta, tb, M, N, K, A, B, beta, C)) return;
    /* the native path failed before writing (it said so): widened */
    if (k->gemm_bf16 != moe__gemm_bf16_widen && moe__gemm_bf16_widen(ta, tb, M, N, K, A, B, beta, C)) return;
    moe_gemm_bf16_ref(ta, tb, M, N, K, A, B, beta, C); /* no scratch (said so): the twin */
}

void moe_gemm_bf16_nt_small(float *C, const uint16_t *A, const uint16_t *W, int64_t n, int64_t N, int64_t K) {
    if (n <= 0 || N <= 0) return;
    moe_k()->gemm_bf16_nt_small(C, N, A, W, n, N, K);
}
