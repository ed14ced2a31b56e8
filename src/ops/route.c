/*
 * Softmax and top-k selection (entries of the kernel table, generic/route.c)
 * and index-based dispatch: counts, offsets, gather, weighted combine and
 * their backward. Hand-written because they are the
 * MoE-specific part of the layer (no BLAS routine does them).
 * Dimension key: T tokens, D model dim, E experts, K top-k, A = T*K rows.
 */
#include "ops.h"

#include <math.h>
#include <string.h>

void moe_softmax_rows(float *p, const float *logits, int64_t T, int64_t E) { moe_k()->softmax_rows(p, logits, T, E); }

void moe_softmax_rows_backward(float *dlogit, const float *p, const float *dp, int64_t T, int64_t E) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *q = p + t * E, *d = dp + t * E;
        float s = 0.0f;
        for (int64_t e = 0; e < E; e++) s += q[e] * d[e];
        for (int64_t e = 0; e < E; e++) dlogit[t * E + e] = q[e] * (d[e] - s);
    }
}

void moe_topk_softmax(int32_t *idx, float *w, const float *logits, int64_t T, int64_t E, int K) {
    moe_k()->topk_softmax(idx, w, logits, T, E, K);
}

void moe_dispatch_plan(int64_t *counts, int64_t *offsets, int32_t *pos, int32_t *slot_tok,
                       const int32_t *idx, int64_t T, int K, int E) {
    memset(counts, 0, (size_t)E * sizeof *counts);
    for (int64_t a = 0; a < T * K; a++)
        if (pos[a] >= 0) counts[idx[a]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    /* Fill in token order so each expert's rows are sorted by token; counts
     * is reused as the per-expert cursor and ends equal to itself again. */
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (int64_t t = 0; t < T; t++)
        for (int j = 0; j < K; j++) {
            if (pos[t * K + j] < 0) continue; /* dropped: stays -1 */
            int32_t e = idx[t * K + j];
            int64_t r = offsets[e] + counts[e]++;
            pos[t * K + j] = (int32_t)r;
            slot_tok[r] = (int32_t)t;
        }
}

void moe_gather_rows(float *dst, const float *src, const int32_t *slot_tok, int64_t A, int64_t D) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < A; r++)
        memcpy(dst + r * D, src + (int64_t)slot_tok[r] * D, (size_t)D * sizeof(float));
}

void moe_combine(float *y, const float *ye, const float *w, const int32_t *pos,
                 int64_t T, int K, int64_t D) {
    /* Per token, in choice order: no races, same bits on any thread count. */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *yt = y + t * D;
        memset(yt, 0, (size_t)D * sizeof(float));
        for (int j = 0; j < K; j++) {
            if (pos[t * K + j] < 0) continue; /* dropped */
            const float *r = ye + (int64_t)pos[t * K + j] * D;
            float wj = w[t * K + j];
            for (int64_t d = 0; d < D; d++) yt[d] += wj * r[d];
        }
    }
}

void moe_combine_backward(float *dye, float *dw, const float *dy, const float *ye,
                          const float *w, const int32_t *pos, int64_t T, int K, int64_t D) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *g = dy + t * D;
        for (int j = 0; j < K; j++) {
            int64_t r = pos[t * K + j];
            if (r < 0) { /* dropped */
                dw[t * K + j] = 0.0f;
                continue;
            }
            const float *yr = ye + r * D;
            float *dr = dye + r * D, wj = w[t * K + j], s = 0.0f;
            for (int64_t d = 0; d < D; d++) {
                s += g[d] * yr[d];
                dr[d] = wj * g[d];
            }
            dw[t * K + j] = s;
        }
    }
}

void moe_scatter_add(float *dx, const float *dxe, const int32_t *pos, int64_t T, int K, int64_t D) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *o = dx + t * D;
        for (int j = 0; j < K; j++) {
            if (pos[t * K + j] < 0) continue; /* dropped */
            const float *r = dxe + (int64_t)pos[t * K + j] * D;
            for (int64_t d = 0; d < D; d++) o[d] += r[d];
        }
    }
}

/* NaN and Inf are the floats whose exponent bits are all ones; an OR over
 * that test vectorises (isfinite with an index does not). These scans run on
 * every forward's y and every backward's gradients, so they must cost little
 * beside the GEMMs (README "Reliability"). */
int moe_any_nonfinite(const float *v, int64_t n) {
    uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, v + i, sizeof u);
        bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    return bad != 0;
}

int64_t moe_find_nonfinite(const float *v, int64_t n) {
    int bad = 0;
    const int64_t chunk = 1 << 16;
#pragma omp parallel for schedule(static) reduction(| : bad) if (n > 2 * chunk)
    for (int64_t c = 0; c < n; c += chunk) bad |= moe_any_nonfinite(v + c, n - c < chunk ? n - c : chunk);
    if (!bad) return -1;
    for (int64_t i = 0; i < n; i++) /* only on the error path: the index */
        if (!isfinite(v[i])) return i;
    return -1;
}
