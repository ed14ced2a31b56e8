/*
 * The CUDA kernels of the topk layer (declared in topk_kernels.cuh): router,
 * counting-sort dispatch, gather, activations, combine and their backward,
 * each mirroring the CPU function it names. No floating-point atomics.
 * Dimension key: T tokens, D model dim, H expert hidden dim, H2 = H (MLP) or
 * 2H (GLU), E experts, K top-k, A = T*K expert rows, NC token chunks of CH.
 */
#include "topk_kernels.cuh"

#include <math.h>

__device__ static inline float d_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ static inline float d_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
__device__ static inline float d_gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * 0.70710678118654752440f)) + x * 0.39894228040143267794f * expf(-0.5f * x * x);
}
__device__ static inline float d_silu_grad(float x) {
    float s = d_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

/* flag[0] = 1 if v (n) holds a NaN or Inf (every writer writes 1: no race on the value). */
__global__ void k_nonfinite(int *flag, const float *v, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        if (!isfinite(v[i])) *flag = 1;
}

/* rows (T,N) += b (N) */
__global__ void k_add_bias(float *rows, const float *b, int64_t T, int64_t N) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T * N; i += (int64_t)gridDim.x * blockDim.x)
        rows[i] += b[i % N];
}

/* rows (A,N) = b[rowexp[r]] (E,N): each row its expert's bias (the GEMM then adds with beta 1) */
__global__ void k_bias_rows(float *rows, const float *b, const int32_t *rowexp, int64_t A, int64_t N) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < A * N; i += (int64_t)gridDim.x * blockDim.x)
        rows[i] = b[(int64_t)rowexp[i / N] * N + i % N];
}

/* The router for one token per thread: token_probs, logsumexp, pick_token
 * (no masks, groups or forced experts) and pick_weights of router.c.
 *   z (T,E) logits; p (T,E) probabilities; lse (T); pden (T) the balance
 *   loss's denominator (1, or 1e-20 + sum of sigmoids, in double);
 *   sel (T,E) slot of each picked expert or -1; idx, w (T,K). */
__global__ void k_router(float *p, float *lse, double *pden, int32_t *sel, int32_t *idx, float *w, const float *z,
                         const float *bias, int64_t T, int E, int K, int score, int normalize, float scale) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *zt = z + t * E;
    float *pt = p + t * E;
    int32_t *st = sel + t * E, *ix = idx + t * K;
    float *wt = w + t * K;
    if (score == MOE_SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) pt[e] = 1.0f / (1.0f + expf(-zt[e]));
    } else {
        float m = -INFINITY, s = 0.0f;
        for (int e = 0; e < E; e++)
            if (zt[e] > m) m = zt[e];
        for (int e = 0; e < E; e++) {
            pt[e] = expf(zt[e] - m);
            s += pt[e];
        }
        float inv = 1.0f / s;
        for (int e = 0; e < E; e++) pt[e] *= inv;
    }
    {
        float m = zt[0], s = 0.0f;
        for (int e = 1; e < E; e++) m = zt[e] > m ? zt[e] : m;
        for (int e = 0; e < E; e++) s += expf(zt[e] - m);
        lse[t] = m + logf(s);
    }
    double den = 1.0;
    if (score == MOE_SCORE_SIGMOID) {
        den = 1e-20;
        for (int e = 0; e < E; e++) den += pt[e];
    }
    pden[t] = den;
    /* selection: K passes of arg-max, ties to the lower index */
    for (int e = 0; e < E; e++) st[e] = -1;
    for (int j = 0; j < K; j++) {
        int best = -1;
        float bk = 0.0f;
        for (int e = 0; e < E; e++) {
            if (st[e] >= 0) continue;
            float k = score == MOE_SCORE_TOPK_SOFTMAX ? zt[e] : pt[e];
            if (bias) k += bias[e];
            if (best < 0 || k > bk) best = e, bk = k;
        }
        ix[j] = best;
        st[best] = j;
    }
    /* weights */
    if (score == MOE_SCORE_TOPK_SOFTMAX || (score == MOE_SCORE_SOFTMAX && normalize)) {
        float m = zt[ix[0]], s = 0.0f;
        for (int j = 1; j < K; j++) m = zt[ix[j]] > m ? zt[ix[j]] : m;
        for (int j = 0; j < K; j++) s += (wt[j] = expf(zt[ix[j]] - m));
        for (int j = 0; j < K; j++) wt[j] = wt[j] / s * scale;
    } else {
        float s = 0.0f;
        for (int j = 0; j < K; j++) s += (wt[j] = pt[ix[j]]);
        float d = !normalize ? 1.0f : s + 1e-20f;
        for (int j = 0; j < K; j++) wt[j] = wt[j] / d * scale;
    }
}

/* Per chunk c of CH tokens and expert e: ccnt (NC,E) tokens routed to e,
 * cps (NC,E) sum of p / pden over the chunk's tokens (double, token order);
 * lse2 (NC) the chunk's sum of lse^2 (double, token order). */
__global__ void k_chunk_counts(int32_t *ccnt, double *cps, double *lse2, const int32_t *sel, const float *p,
                               const double *pden, const float *lse, int64_t T, int E) {
    int64_t c = blockIdx.x, t0 = c * CH, t1 = t0 + CH < T ? t0 + CH : T;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int n = 0;
        double s = 0.0;
        for (int64_t t = t0; t < t1; t++) {
            n += sel[t * E + e] >= 0;
            s += (double)p[t * E + e] / pden[t];
        }
        ccnt[c * E + e] = n;
        cps[c * E + e] = s;
    }
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int64_t t = t0; t < t1; t++) s += (double)lse[t] * lse[t];
        lse2[c] = s;
    }
}

/* One block: coff (NC,E) exclusive scan of ccnt over the chunks, hdr =
 * offsets (E+1) then counts (E); stats[0] the balance loss E * sum_e
 * f_e P_e, stats[1] the z-loss mean lse^2 (router.c's definitions, one
 * group). */
__global__ void k_scan(int32_t *coff, long long *hdr, double *stats, double *psum, const int32_t *ccnt,
                       const double *cps, const double *lse2, int64_t NC, int64_t T, int E, int K) {
    long long *offsets = hdr, *counts = hdr + E + 1;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        long long run = 0;
        double P = 0.0;
        for (int64_t c = 0; c < NC; c++) {
            coff[c * E + e] = (int32_t)run;
            run += ccnt[c * E + e];
            P += cps[c * E + e];
        }
        counts[e] = run;
        psum[e] = P;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        offsets[0] = 0;
        double bal = 0.0, zl = 0.0;
        for (int e = 0; e < E; e++) {
            offsets[e + 1] = offsets[e] + counts[e];
            bal += (double)counts[e] / ((double)T * K) * (psum[e] / (double)T);
        }
        for (int64_t c = 0; c < NC; c++) zl += lse2[c];
        stats[0] = bal * E;
        stats[1] = zl / (double)T;
    }
}

/* Positions (moe_dispatch_plan): expert e's rows of chunk c start at
 * offsets[e] + coff[c,e] and follow token order. pos (T,K) row of each pick,
 * slot (A) token of each row, rowexp (A) expert of each row. */
__global__ void k_positions(int32_t *pos, int32_t *slot, int32_t *rowexp, const int32_t *sel, const int32_t *coff,
                            const long long *hdr, int64_t T, int E, int K) {
    int64_t c = blockIdx.x, t0 = c * CH, t1 = t0 + CH < T ? t0 + CH : T;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        long long r = hdr[e] + coff[c * E + e];
        for (int64_t t = t0; t < t1; t++) {
            int j = sel[t * E + e];
            if (j < 0) continue;
            pos[t * K + j] = (int32_t)r;
            slot[r] = (int32_t)t;
            rowexp[r] = e;
            r++;
        }
    }
}

/* xe (A,D): xe[r] = x[slot[r]] (moe_gather_rows); one block per row. */
__global__ void k_gather(float *xe, const float *x, const int32_t *slot, int64_t A, int64_t D) {
    for (int64_t r = blockIdx.x; r < A; r += gridDim.x) {
        const float *src = x + (int64_t)slot[r] * D;
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) xe[r * D + d] = src[d];
    }
}

/* ha (A,H) from hpre (A,H2): act (MLP) or a * f(g) (GLU), as act.c. */
__global__ void k_act(float *ha, const float *hpre, int64_t A, int64_t H, int kind, int act, float slope) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < A * H; i += (int64_t)gridDim.x * blockDim.x) {
        if (kind == MOE_EXPERT_MLP) {
            float x = hpre[i];
            ha[i] = act == MOE_ACT_RELU         ? (x > 0.0f ? x : 0.0f)
                    : act == MOE_ACT_GELU       ? d_gelu(x)
                    : act == MOE_ACT_SILU       ? x * d_sigmoid(x)
                                                : (x > 0.0f ? x : x * slope);
        } else {
            int64_t r = i / H, j = i % H;
            float a = hpre[r * 2 * H + j], g = hpre[r * 2 * H + H + j];
            ha[i] = a * (kind == MOE_EXPERT_SWIGLU ? g * d_sigmoid(g) : d_gelu(g));
        }
    }
}

/* dhpre (A,H2) from dha (A,H) and hpre (A,H2): moe_act_backward / moe_glu_backward. */
__global__ void k_act_backward(float *dhpre, const float *dha, const float *hpre, int64_t A, int64_t H, int kind,
                               int act, float slope) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < A * H; i += (int64_t)gridDim.x * blockDim.x) {
        if (kind == MOE_EXPERT_MLP) {
            float x = hpre[i], d = dha[i];
            dhpre[i] = act == MOE_ACT_RELU   ? (x > 0.0f ? d : 0.0f)
                       : act == MOE_ACT_GELU ? d * d_gelu_grad(x)
                       : act == MOE_ACT_SILU ? d * d_silu_grad(x)
                                             : (x > 0.0f ? d : d * slope);
        } else {
            int64_t r = i / H, j = i % H;
            float a = hpre[r * 2 * H + j], x = hpre[r * 2 * H + H + j], d = dha[i], f, fp;
            if (kind == MOE_EXPERT_SWIGLU) {
                float sg = d_sigmoid(x);
                f = x * sg;
                fp = sg * (1.0f + x * (1.0f - sg));
            } else {
                float er = erff(x * 0.70710678118654752440f);
                f = 0.5f * x * (1.0f + er);
                fp = 0.5f * (1.0f + er) + x * 0.39894228040143267794f * expf(-0.5f * x * x);
            }
            dhpre[r * 2 * H + j] = d * f;
            dhpre[r * 2 * H + H + j] = d * a * fp;
        }
    }
}

/* y (T,D) = sum_j w[t,j] ye[pos[t,j]] in slot order (moe_combine); one block per token. */
__global__ void k_combine(float *y, const float *ye, const float *w, const int32_t *pos, int64_t T, int K,
                          int64_t D) {
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x)
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
            float s = 0.0f;
            for (int j = 0; j < K; j++) {
                int32_t r = pos[t * K + j];
                if (r >= 0) s += w[t * K + j] * ye[(int64_t)r * D + d];
            }
            y[t * D + d] = s;
        }
}

/* moe_combine_backward: dye[pos[t,j]] = w[t,j] dy[t]; dw[t,j] = <dy[t], ye[pos[t,j]]>
 * (a fixed-shape block reduction: 256 threads). One block per token. */
__global__ void k_combine_backward(float *dye, float *dw, const float *dy, const float *ye, const float *w,
                                   const int32_t *pos, int64_t T, int K, int64_t D) {
    __shared__ float red[256];
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x)
        for (int j = 0; j < K; j++) {
            int32_t r = pos[t * K + j];
            if (r < 0) {
                if (threadIdx.x == 0) dw[t * K + j] = 0.0f;
                continue;
            }
            float wj = w[t * K + j], s = 0.0f;
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
                float g = dy[t * D + d];
                s += g * ye[(int64_t)r * D + d];
                dye[(int64_t)r * D + d] = wj * g;
            }
            red[threadIdx.x] = s;
            __syncthreads();
            for (int h = blockDim.x / 2; h > 0; h /= 2) {
                if ((int)threadIdx.x < h) red[threadIdx.x] += red[threadIdx.x + h];
                __syncthreads();
            }
            if (threadIdx.x == 0) dw[t * K + j] = red[0];
            __syncthreads();
        }
}

/* dx (T,D) += sum_j dxe[pos[t,j]] in slot order (moe_scatter_add as a gather). */
__global__ void k_scatter_add(float *dx, const float *dxe, const int32_t *pos, int64_t T, int K, int64_t D) {
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x)
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
            float s = dx[t * D + d];
            for (int j = 0; j < K; j++) {
                int32_t r = pos[t * K + j];
                if (r >= 0) s += dxe[(int64_t)r * D + d];
            }
            dx[t * D + d] = s;
        }
}

/* moe_router_backward for one token per thread (token choice, all experts
 * enabled, one group of T tokens): dz (T,E) written, dp (T,E) scratch. */
__global__ void k_router_backward(float *dz, float *dp, const float *dw, const float *z, const float *p,
                                  const float *w, const float *lse, const int32_t *idx, const int32_t *pos,
                                  const long long *counts, int64_t T, int E, int K, int score, int normalize,
                                  float scale, float dbal, float dzl) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *zt = z + t * E, *pt = p + t * E, *dwt = dw + t * K, *wt = w + t * K;
    const int32_t *ix = idx + t * K, *ps = pos + t * K;
    float *dzt = dz + t * E, *dpt = dp + t * E;
    for (int e = 0; e < E; e++) dzt[e] = 0.0f, dpt[e] = 0.0f;
    if (score == MOE_SCORE_TOPK_SOFTMAX || (score == MOE_SCORE_SOFTMAX && normalize)) {
        float c = 0.0f;
        for (int j = 0; j < K; j++) c += wt[j] * (ps[j] >= 0 ? dwt[j] : 0.0f);
        for (int j = 0; j < K; j++) dzt[ix[j]] += wt[j] * ((ps[j] >= 0 ? dwt[j] : 0.0f) - c / scale);
    } else {
        float S = 0.0f, c = 0.0f;
        for (int j = 0; j < K; j++) {
            float g = ps[j] >= 0 ? dwt[j] : 0.0f;
            S += pt[ix[j]];
            c += g * pt[ix[j]];
        }
        S += 1e-20f;
        for (int j = 0; j < K; j++) {
            float g = ps[j] >= 0 ? dwt[j] : 0.0f;
            dpt[ix[j]] += normalize ? scale * (g / S - c / (S * S)) : scale * g;
        }
    }
    if (dbal != 0.0f) {
        float k = dbal * (float)E / (float)((double)T * T * K);
        if (score != MOE_SCORE_SIGMOID) {
            for (int e = 0; e < E; e++) dpt[e] += k * (float)counts[e];
        } else {
            float sum = 0.0f, c = 0.0f;
            for (int e = 0; e < E; e++) sum += pt[e];
            sum += 1e-20f;
            for (int e = 0; e < E; e++) c += k * (float)counts[e] * pt[e] / sum;
            for (int e = 0; e < E; e++) dpt[e] += (k * (float)counts[e] - c) / sum;
        }
    }
    if (score == MOE_SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) dzt[e] += dpt[e] * pt[e] * (1.0f - pt[e]);
    } else {
        float c = 0.0f;
        for (int e = 0; e < E; e++) c += pt[e] * dpt[e];
        for (int e = 0; e < E; e++) dzt[e] += pt[e] * (dpt[e] - c);
    }
    if (dzl != 0.0f) {
        float g = dzl * 2.0f * lse[t] / (float)T;
        for (int e = 0; e < E; e++) dzt[e] += g * expf(zt[e] - lse[t]);
    }
}

__global__ void k_fill(float *v, float x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        v[i] = x;
}

/* uniform(-b, b) from a counter hash (splitmix64 of seed and index): the
 * device-side initialisation (moe_cuda_layer_create_device_init). */
__global__ void k_init_uniform(float *v, int64_t n, float b, unsigned long long seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        unsigned long long x = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1);
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        x ^= x >> 31;
        float u = (float)(x >> 40) * (1.0f / 16777216.0f);
        v[i] = (2.0f * u - 1.0f) * b;
    }
}

