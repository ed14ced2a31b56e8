/*
 * Row softmax and top-k selection, generic. They keep libm's expf: the
 * routing decisions and the parity tests' reference values rely on its
 * bits, so no ISA folder replaces them.
 * Dimension key: T tokens, E experts, K top-k.
 */
#include "generic.h"

#include <math.h>

void moe__g_softmax_rows(float *p, const float *logits, int64_t T, int64_t E) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float *q = p + t * E;
        float m = l[0];
        for (int64_t e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
        float s = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            q[e] = expf(l[e] - m);
            s += q[e];
        }
        float inv = 1.0f / s;
        for (int64_t e = 0; e < E; e++) q[e] *= inv;
    }
}

void moe__g_topk_softmax(int32_t *idx, float *w, const float *logits, int64_t T, int64_t E, int K) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        int32_t *ix = idx + t * K;
        float *wt = w + t * K;
        /* K passes of arg-max over the not yet chosen experts: K and E are
         * small, and this gives torch.topk's largest-first order. */
        for (int j = 0; j < K; j++) {
            int32_t best = -1;
            for (int32_t e = 0; e < (int32_t)E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ix[i] == e;
                if (!taken && (best < 0 || l[e] > l[best])) best = e;
            }
            ix[j] = best;
        }
        float m = l[ix[0]], s = 0.0f;
        for (int j = 0; j < K; j++) {
            wt[j] = expf(l[ix[j]] - m);
            s += wt[j];
        }
        float inv = 1.0f / s;
        for (int j = 0; j < K; j++) wt[j] *= inv;
    }
}
