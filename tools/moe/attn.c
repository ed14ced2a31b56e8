/*
 * Causal multi-head self-attention with RoPE (see attn.h).
 * Written by hand because it is the transformer's hot path beside the MoE
 * layers and no C library on this machine offers causal attention on the
 * CPU; its GEMMs go to oneDNN through moe_sgemm. Each (sequence, head) pair
 * is one task: per block of query rows two GEMMs and a masked softmax in
 * forward, four GEMMs in backward, always in the same order, so results do
 * not depend on the thread count. The softmax numerators use libmoe's
 * vectorised exp (moe_vexpf_sub, within 1 ulp; libm's expf is a scalar call
 * gcc does not vectorise), the sums stay in key order.
 * Dimension key: B sequences, S positions, T = B*S tokens, D model dim,
 * NH heads, hd = D/NH head dim, n cached positions.
 */
#include "attn.h"

#include "moe.h"
#include "ops.h" /* moe_vexpf_sub */

#include <math.h>
#include <string.h>

void attn_rope(float *qkv, int64_t B, int64_t S, int64_t pos0, int64_t D, int64_t NH, double theta, int sign) {
    int64_t hd = D / NH, half = hd / 2;
    /* by position: each angle's cos and sin once, for the B rows that share it */
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < S; s++) {
        double pos = (double)(pos0 + s);
        for (int64_t i = 0; i < half; i++) {
            double a = pos * pow(theta, -2.0 * (double)i / (double)hd);
            float c = (float)cos(a), sn = (float)(sign > 0 ? sin(a) : -sin(a));
            for (int64_t b = 0; b < B; b++) {
                float *row = qkv + (b * S + s) * 3 * D;
                for (int64_t part = 0; part < 2; part++) /* q, then k */
                    for (int64_t h = 0; h < NH; h++) {
                        float *u = row + part * D + h * hd + i, *w = u + half;
                        float u0 = *u, w0 = *w;
                        *u = u0 * c - w0 * sn;
                        *w = w0 * c + u0 * sn;
                    }
            }
        }
    }
}

/* Row i of a (S, S) score block: softmax over keys 0..i, zeros after. */
static void causal_softmax_row(float *p, int64_t i, int64_t S) {
    float mx = p[0];
    for (int64_t j = 1; j <= i; j++) mx = p[j] > mx ? p[j] : mx;
    moe_vexpf_sub(p, p, mx, i + 1);
    double sum = 0;
    for (int64_t j = 0; j <= i; j++) sum += p[j];
    float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j <= i; j++) p[j] *= inv;
    for (int64_t j = i + 1; j < S; j++) p[j] = 0.0f;
}

/* Query rows go in blocks of ATTN_ROWS: block r attends to keys 0..r0+rn-1
 * only, so the GEMMs skip most of the masked half (S = 256: 62% of the full
 * square) while each stays large enough for the GEMM kernels. */
#define ATTN_ROWS 64

void attn_forward(float *o, float *P, const float *qkv, int64_t B, int64_t S, int64_t D, int64_t NH) {
    int64_t hd = D / NH, D3 = 3 * D;
    float alpha = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * NH; bh++) {
        int64_t b = bh / NH, h = bh % NH;
        const float *q = qkv + b * S * D3 + h * hd, *k = q + D, *v = q + 2 * D;
        float *p = P + bh * S * S;
        for (int64_t r0 = 0; r0 < S; r0 += ATTN_ROWS) {
            int64_t rn = S - r0 < ATTN_ROWS ? S - r0 : ATTN_ROWS, kn = r0 + rn;
            moe_sgemm(0, 1, rn, kn, hd, alpha, q + r0 * D3, D3, k, D3, 0.0f, p + r0 * S, S);
            for (int64_t i = r0; i < kn; i++) causal_softmax_row(p + i * S, i, S);
            moe_sgemm(0, 0, rn, hd, kn, 1.0f, p + r0 * S, S, v, D3, 0.0f, o + (b * S + r0) * D + h * hd, D);
        }
    }
}

void attn_backward(float *dqkv, float *work, const float *dout, const float *qkv, const float *P, int64_t B,
                   int64_t S, int64_t D, int64_t NH) {
    int64_t hd = D / NH, D3 = 3 * D;
    float alpha = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * NH; bh++) {
        int64_t b = bh / NH, h = bh % NH;
        const float *q = qkv + b * S * D3 + h * hd, *k = q + D, *v = q + 2 * D;
        const float *p = P + bh * S * S, *dO = dout + b * S * D + h * hd;
        float *dq = dqkv + b * S * D3 + h * hd, *dk = dq + D, *dv = dq + 2 * D, *ds = work + bh * S * S;
        for (int64_t j = 0; j < S; j++) /* dK and dV accumulate over the row blocks */
            memset(dk + j * D3, 0, (size_t)hd * sizeof *dk), memset(dv + j * D3, 0, (size_t)hd * sizeof *dv);
        for (int64_t r0 = 0; r0 < S; r0 += ATTN_ROWS) {
            int64_t rn = S - r0 < ATTN_ROWS ? S - r0 : ATTN_ROWS, kn = r0 + rn;
            float *dsr = ds + r0 * S;
            const float *pr0 = p + r0 * S, *dOr = dO + r0 * D;
            moe_sgemm(0, 1, rn, kn, hd, 1.0f, dOr, D, v, D3, 0.0f, dsr, S); /* dP = dO V^T */
            for (int64_t i = r0; i < kn; i++) {                             /* dS = P (dP - rowsum(P dP)) */
                const float *pr = p + i * S;
                float *dr = ds + i * S;
                double dot = 0;
                for (int64_t j = 0; j <= i; j++) dot += (double)pr[j] * dr[j];
                for (int64_t j = 0; j <= i; j++) dr[j] = pr[j] * (dr[j] - (float)dot);
                for (int64_t j = i + 1; j < kn; j++) dr[j] = 0.0f;
            }
            moe_sgemm(0, 0, rn, hd, kn, alpha, dsr, S, k, D3, 0.0f, dq + r0 * D3, D3); /* dQ = a dS K   */
            moe_sgemm(1, 0, kn, hd, rn, alpha, dsr, S, q + r0 * D3, D3, 1.0f, dk, D3);  /* dK += a dS^T Q */
            moe_sgemm(1, 0, kn, hd, rn, 1.0f, pr0, S, dOr, D, 1.0f, dv, D3);            /* dV += P^T dO  */
        }
    }
}

void attn_decode(float *o, float *w, const float *q, const float *kc, const float *vc, int64_t ldc, int64_t n,
                 int64_t D, int64_t NH) {
    int64_t hd = D / NH;
    double alpha = 1.0 / sqrt((double)hd);
    for (int64_t h = 0; h < NH; h++) {
        const float *qh = q + h * hd;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const float *kr = kc + j * ldc + h * hd;
            double s = 0;
            for (int64_t c = 0; c < hd; c++) s += (double)qh[c] * kr[c];
            w[j] = (float)(s * alpha);
            mx = w[j] > mx ? w[j] : mx;
        }
        moe_vexpf_sub(w, w, mx, n);
        double sum = 0;
        for (int64_t j = 0; j < n; j++) sum += w[j];
        float *oh = o + h * hd;
        for (int64_t c = 0; c < hd; c++) {
            double acc = 0;
            for (int64_t j = 0; j < n; j++) acc += (double)w[j] * vc[j * ldc + h * hd + c];
            oh[c] = (float)(acc / sum);
        }
    }
}

/* ---------------------------------------------------------------- reference twins */

void attn_forward_ref(float *o, float *P, const float *qkv, int64_t B, int64_t S, int64_t D, int64_t NH) {
    int64_t hd = D / NH, D3 = 3 * D;
    double alpha = 1.0 / sqrt((double)hd);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++)
            for (int64_t i = 0; i < S; i++) {
                const float *qi = qkv + (b * S + i) * D3 + h * hd;
                float *p = P + ((b * NH + h) * S + i) * S;
                double mx = -INFINITY;
                for (int64_t j = 0; j <= i; j++) {
                    const float *kj = qkv + (b * S + j) * D3 + D + h * hd;
                    double s = 0;
                    for (int64_t c = 0; c < hd; c++) s += (double)qi[c] * kj[c];
                    p[j] = (float)(s * alpha);
                    mx = p[j] > mx ? p[j] : mx;
                }
                double sum = 0;
                for (int64_t j = 0; j <= i; j++) sum += exp(p[j] - mx);
                for (int64_t j = 0; j <= i; j++) p[j] = (float)(exp(p[j] - mx) / sum);
                for (int64_t j = i + 1; j < S; j++) p[j] = 0.0f;
                for (int64_t c = 0; c < hd; c++) {
                    double acc = 0;
                    for (int64_t j = 0; j <= i; j++) acc += (double)p[j] * qkv[(b * S + j) * D3 + 2 * D + h * hd + c];
                    o[(b * S + i) * D + h * hd + c] = (float)acc;
                }
            }
}

void attn_backward_ref(float *dqkv, const float *dout, const float *qkv, const float *P, int64_t B, int64_t S,
                       int64_t D, int64_t NH) {
    int64_t hd = D / NH, D3 = 3 * D;
    double alpha = 1.0 / sqrt((double)hd);
    memset(dqkv, 0, (size_t)(B * S * D3) * sizeof *dqkv);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++)
            for (int64_t i = 0; i < S; i++) {
                const float *p = P + ((b * NH + h) * S + i) * S, *dO = dout + (b * S + i) * D + h * hd;
                const float *qi = qkv + (b * S + i) * D3 + h * hd;
                /* dP_ij = dO_i . v_j; dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) */
                double dot = 0;
                for (int64_t j = 0; j <= i; j++) {
                    double dp = 0;
                    for (int64_t c = 0; c < hd; c++) dp += (double)dO[c] * qkv[(b * S + j) * D3 + 2 * D + h * hd + c];
                    dot += p[j] * dp;
                }
                for (int64_t j = 0; j <= i; j++) {
                    const float *vj = qkv + (b * S + j) * D3 + 2 * D + h * hd, *kj = qkv + (b * S + j) * D3 + D + h * hd;
                    double dp = 0;
                    for (int64_t c = 0; c < hd; c++) dp += (double)dO[c] * vj[c];
                    double ds = p[j] * (dp - dot) * alpha;
                    float *dqi = dqkv + (b * S + i) * D3 + h * hd, *dkj = dqkv + (b * S + j) * D3 + D + h * hd;
                    float *dvj = dqkv + (b * S + j) * D3 + 2 * D + h * hd;
                    for (int64_t c = 0; c < hd; c++) {
                        dqi[c] += (float)(ds * kj[c]);
                        dkj[c] += (float)(ds * qi[c]);
                        dvj[c] += (float)(p[j] * (double)dO[c]);
                    }
                }
            }
}
