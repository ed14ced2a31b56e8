/*
 * Activations and GLU, forward and backward, matching torch's definitions:
 * relu (grad 0 at 0), exact erf gelu, silu, leaky_relu (grad slope at x <= 0).
 * silu and SwiGLU go through vmath.c's vectorised exp (within 1 ulp of e^x;
 * libm's expf: 0.5; the same bits on every path); gelu keeps libm's erff and expf.
 * Dimension key: M rows, H hidden width, n elements.
 */
#include "ops.h"

#include <math.h>

static const float k_inv_sqrt2 = 0.70710678118654752440f;
static const float k_inv_sqrt_2pi = 0.39894228040143267794f;

static inline float gelu(float x) { return 0.5f * x * (1.0f + erff(x * k_inv_sqrt2)); }
static inline float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * k_inv_sqrt2)) + x * k_inv_sqrt_2pi * expf(-0.5f * x * x);
}

/* Elementwise ops over n split in chunks for the threads; any split gives
 * the same bits. */
#define ACT_CHUNK 4096

void moe_act_forward(float *out, const float *pre, int64_t n, moe_activation act, float slope) {
    switch (act) {
    case MOE_ACT_RELU: /* simd: a select, not a branch a random sign mispredicts half the time */
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) out[i] = pre[i] > 0.0f ? pre[i] : 0.0f;
        break;
    case MOE_ACT_GELU:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) out[i] = gelu(pre[i]);
        break;
    case MOE_ACT_SILU:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i += ACT_CHUNK) moe_vsilu(out + i, pre + i, n - i < ACT_CHUNK ? n - i : ACT_CHUNK);
        break;
    case MOE_ACT_LEAKY_RELU:
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) out[i] = pre[i] > 0.0f ? pre[i] : pre[i] * slope;
        break;
    }
}

void moe_act_backward(float *din, const float *dout, const float *pre, int64_t n,
                      moe_activation act, float slope) {
    switch (act) {
    case MOE_ACT_RELU:
        /* dout[i] read unconditionally: a load under the condition vectorises only with
         * masked loads (AVX2 and up), and the baseline build has none: it became a
         * branch per element there */
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float d = dout[i];
            din[i] = pre[i] > 0.0f ? d : 0.0f;
        }
        break;
    case MOE_ACT_GELU:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) din[i] = dout[i] * gelu_grad(pre[i]);
        break;
    case MOE_ACT_SILU:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i += ACT_CHUNK)
            moe_vsilu_backward(din + i, dout + i, pre + i, n - i < ACT_CHUNK ? n - i : ACT_CHUNK);
        break;
    case MOE_ACT_LEAKY_RELU:
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float d = dout[i]; /* read unconditionally, as for relu */
            din[i] = pre[i] > 0.0f ? d : d * slope;
        }
        break;
    }
}

void moe_glu_forward(float *out, const float *pre, int64_t M, int64_t H, moe_expert_kind kind) {
    int swi = kind == MOE_EXPERT_SWIGLU;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const float *a = pre + r * 2 * H, *g = a + H;
        float *o = out + r * H;
        if (swi) moe_vswiglu(o, a, g, H);
        else
            for (int64_t j = 0; j < H; j++) o[j] = a[j] * gelu(g[j]);
    }
}

void moe_glu_backward(float *dpre, const float *dout, const float *pre, int64_t M, int64_t H,
                      moe_expert_kind kind) {
    int swi = kind == MOE_EXPERT_SWIGLU;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const float *a = pre + r * 2 * H, *g = a + H, *d = dout + r * H;
        float *da = dpre + r * 2 * H, *dg = da + H;
        if (swi) { /* one exp per element for both silu and silu' */
            moe_vswiglu_backward(da, dg, d, a, g, H);
            continue;
        }
        for (int64_t j = 0; j < H; j++) {
            /* one erff per element for both f and f': the formulas of gelu/gelu_grad */
            float x = g[j];
            float er = erff(x * k_inv_sqrt2);
            float f = 0.5f * x * (1.0f + er);
            float fp = 0.5f * (1.0f + er) + x * k_inv_sqrt_2pi * expf(-0.5f * x * x);
            da[j] = d[j] * f;
            dg[j] = d[j] * a[j] * fp;
        }
    }
}
