/*
 * The CUDA kernels of the topk layer (topk_kernels.cu), launched by the host
 * side in topk_cuda.cu; each kernel's comment in topk_kernels.cu names the
 * CPU function it mirrors.
 * Dimension key: T tokens, D model dim, H expert hidden dim, E experts,
 * K top-k, A = T*K expert rows, NC token chunks of CH tokens.
 */
#ifndef MOE_CUDA_TOPK_KERNELS_CUH
#define MOE_CUDA_TOPK_KERNELS_CUH

#include "moe.h"

#include <stdint.h>

#define CH 256 /* tokens per chunk of the counting sort */

__global__ void k_nonfinite(int *flag, const float *v, int64_t n);
__global__ void k_add_bias(float *rows, const float *b, int64_t T, int64_t N);
__global__ void k_bias_rows(float *rows, const float *b, const int32_t *rowexp, int64_t A, int64_t N);
__global__ void k_router(float *p, float *lse, double *pden, int32_t *sel, int32_t *idx, float *w, const float *z,
                         const float *bias, int64_t T, int E, int K, int score, int normalize, float scale);
__global__ void k_chunk_counts(int32_t *ccnt, double *cps, double *lse2, const int32_t *sel, const float *p,
                               const double *pden, const float *lse, int64_t T, int E);
__global__ void k_scan(int32_t *coff, long long *hdr, double *stats, double *psum, const int32_t *ccnt,
                       const double *cps, const double *lse2, int64_t NC, int64_t T, int E, int K);
__global__ void k_positions(int32_t *pos, int32_t *slot, int32_t *rowexp, const int32_t *sel, const int32_t *coff,
                            const long long *hdr, int64_t T, int E, int K);
__global__ void k_gather(float *xe, const float *x, const int32_t *slot, int64_t A, int64_t D);
__global__ void k_act(float *ha, const float *hpre, int64_t A, int64_t H, int kind, int act, float slope);
__global__ void k_act_backward(float *dhpre, const float *dha, const float *hpre, int64_t A, int64_t H, int kind,
                               int act, float slope);
__global__ void k_combine(float *y, const float *ye, const float *w, const int32_t *pos, int64_t T, int K,
                          int64_t D);
__global__ void k_combine_backward(float *dye, float *dw, const float *dy, const float *ye, const float *w,
                                   const int32_t *pos, int64_t T, int K, int64_t D);
__global__ void k_scatter_add(float *dx, const float *dxe, const int32_t *pos, int64_t T, int K, int64_t D);
__global__ void k_router_backward(float *dz, float *dp, const float *dw, const float *z, const float *p,
                                  const float *w, const float *lse, const int32_t *idx, const int32_t *pos,
                                  const long long *counts, int64_t T, int E, int K, int score, int normalize,
                                  float scale, float dbal, float dzl);
__global__ void k_fill(float *v, float x, int64_t n);
__global__ void k_init_uniform(float *v, int64_t n, float b, unsigned long long seed);

#endif
