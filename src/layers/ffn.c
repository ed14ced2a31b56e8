/*
 * Expert FFN bank (see ffn.h): one GEMM per expert and per matrix over the
 * expert's contiguous rows, elementwise activation and dropout between.
 * Dimension key: D model dim, H hidden width, H2 = H or 2H (GLU), E experts,
 * R rows.
 */
#include "ffn.h"
#include "ops.h"

/* Inverted dropout on ha (R,H) in place; returns nothing when p == 0. */
static void dropout_apply(float *ha, int64_t R, int64_t H, float p, uint64_t stream) {
    if (p <= 0.0f) return;
    float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < H; j++) {
            uint64_t i = (uint64_t)(r * H + j);
            ha[r * H + j] = moe_rng_uniform(stream, i) < p ? 0.0f : ha[r * H + j] * scale;
        }
}

void moe_ffn_forward(const moe_ffn *f, const int64_t *offsets, const float *xe, float *hpre, float *ha,
                     float *ye) {
    int64_t D = f->D, H = f->H, H2 = moe_ffn_h2(f), R = offsets[f->E];
    for (int e = 0; e < f->E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        moe_sgemm(0, 1, n, H2, D, 1.0f, xe + r0 * D, D, f->W1 + e * H2 * D, D, 0.0f, hpre + r0 * H2, H2);
        moe_add_bias_rows(hpre + r0 * H2, f->b1 + e * H2, n, H2);
    }
    if (f->kind != MOE_EXPERT_MLP)
        moe_glu_forward(ha, hpre, R, H, f->kind);
    else
        moe_act_forward(ha, hpre, R * H, f->act, f->slope);
    dropout_apply(ha, R, H, f->dropout, f->stream);
    for (int e = 0; e < f->E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        moe_sgemm(0, 1, n, D, H, 1.0f, ha + r0 * H, H, f->W2 + e * D * H, H, 0.0f, ye + r0 * D, D);
        moe_add_bias_rows(ye + r0 * D, f->b2 + e * D, n, D);
    }
}

void moe_ffn_backward(const moe_ffn *f, const int64_t *offsets, const float *xe, const float *hpre,
                      const float *ha, const float *dye, float *dha, float *dhpre, float *dxe) {
    int64_t D = f->D, H = f->H, H2 = moe_ffn_h2(f), R = offsets[f->E];
    for (int e = 0; e < f->E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        moe_colsum_acc(f->db2 + e * D, dye + r0 * D, n, D);
        /* dW2 (D,H) += dye^T ha ; dha (n,H) = dye W2 */
        moe_sgemm(1, 0, D, H, n, 1.0f, dye + r0 * D, D, ha + r0 * H, H, 1.0f, f->dW2 + e * D * H, H);
        moe_sgemm(0, 0, n, H, D, 1.0f, dye + r0 * D, D, f->W2 + e * D * H, H, 0.0f, dha + r0 * H, H);
    }
    /* through dropout: the same mask, the same scale (regenerated from the stream) */
    dropout_apply(dha, R, H, f->dropout, f->stream);
    if (f->kind != MOE_EXPERT_MLP)
        moe_glu_backward(dhpre, dha, hpre, R, H, f->kind);
    else
        moe_act_backward(dhpre, dha, hpre, R * H, f->act, f->slope);
    for (int e = 0; e < f->E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        /* dW1 (H2,D) += dhpre^T xe ; db1 += colsum ; dxe (n,D) = dhpre W1 */
        moe_sgemm(1, 0, H2, D, n, 1.0f, dhpre + r0 * H2, H2, xe + r0 * D, D, 1.0f, f->dW1 + e * H2 * D, D);
        moe_colsum_acc(f->db1 + e * H2, dhpre + r0 * H2, n, H2);
        if (dxe)
            moe_sgemm(0, 0, n, D, H2, 1.0f, dhpre + r0 * H2, H2, f->W1 + e * H2 * D, D, 0.0f, dxe + r0 * D, D);
    }
}
