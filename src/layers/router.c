/*
 * Router core (see router.h). Hand-written: selection with forced experts,
 * group limits and masks, capacity in priority order and expert choice are
 * MoE-specific and no library does them. Every loop over tokens writes only
 * its own rows, and every reduction runs in a fixed order, so the results are
 * the same bits on any thread count.
 * Dimension key: T = B*N tokens, E experts, K picks, Ks slot stride,
 * G groups, M groups kept, C capacity.
 */
#include "router.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int64_t moe_router_capacity(double cf, int64_t N, int K, int E, int expert_choice) {
    double c = ceil(cf * (double)N * (expert_choice ? 1.0 : (double)K) / (double)E);
    int64_t C = c >= (double)N ? N : (int64_t)c;
    return C < 1 ? 1 : C;
}

static int enabled_count(const moe_router *r) {
    int n = 0;
    for (int e = 0; e < r->E; e++) n += r->enabled[e] != 0;
    return n;
}

/* p (E) of one token: softmax over the enabled experts (others 0), or sigmoid. */
static void token_probs(const moe_router *r, float *p, const float *z) {
    int E = r->E;
    if (r->score == MOE_SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) p[e] = 1.0f / (1.0f + expf(-z[e]));
        return;
    }
    float m = -INFINITY, s = 0.0f;
    for (int e = 0; e < E; e++)
        if (r->enabled[e] && z[e] > m) m = z[e];
    for (int e = 0; e < E; e++) {
        p[e] = r->enabled[e] ? expf(z[e] - m) : 0.0f;
        s += p[e];
    }
    float inv = 1.0f / s;
    for (int e = 0; e < E; e++) p[e] *= inv;
}

static float logsumexp(const float *z, int E) {
    float m = z[0], s = 0.0f;
    for (int e = 1; e < E; e++) m = z[e] > m ? z[e] : m;
    for (int e = 0; e < E; e++) s += expf(z[e] - m);
    return m + logf(s);
}

static inline float sel_key(const moe_router *r, const float *z, const float *p, int e) {
    float k = r->score == MOE_SCORE_TOPK_SOFTMAX ? z[e] : p[e];
    return r->bias ? k + r->bias[e] : k;
}

/* Group limit of one token: gkeep[g] = 1 for the M groups with the largest
 * sum of their two best enabled keys (ties: lower group first). */
static void choose_groups(const moe_router *r, uint8_t *gkeep, float *gs, const float *z, const float *p) {
    int G = r->G, per = r->E / G;
    for (int g = 0; g < G; g++) {
        float b1 = -INFINITY, b2 = -INFINITY;
        int n = 0;
        for (int e = g * per; e < (g + 1) * per; e++) {
            if (!r->enabled[e]) continue;
            float k = sel_key(r, z, p, e);
            n++;
            if (k > b1) b2 = b1, b1 = k;
            else if (k > b2) b2 = k;
        }
        gs[g] = n == 0 ? -INFINITY : n == 1 ? b1 : b1 + b2;
        gkeep[g] = 0;
    }
    for (int m = 0; m < r->M; m++) {
        int best = -1;
        for (int g = 0; g < G; g++)
            if (!gkeep[g] && (best < 0 || gs[g] > gs[best])) best = g;
        gkeep[best] = 1;
    }
}

/* Token choice for one token: forced experts first, then the best keys
 * among the kept groups' enabled experts, then (if those ran out) the others. */
static void pick_token(const moe_router *r, int32_t *ix, uint8_t *taken, uint8_t *gkeep, float *gs,
                       const float *z, const float *p) {
    int E = r->E, n = 0, limit = r->G > 1 && r->M < r->G;
    memset(taken, 0, (size_t)E);
    if (r->forced)
        for (int e = 0; e < E && n < r->K; e++)
            if (r->forced[e]) ix[n++] = e, taken[e] = 1;
    if (limit) choose_groups(r, gkeep, gs, z, p);
    int per = E / (r->G > 0 ? r->G : 1);
    for (int tier = 0; tier < 2 && n < r->K; tier++) {
        if (tier == 1 && !limit) break;
        while (n < r->K) {
            int best = -1;
            float bk = 0.0f;
            for (int e = 0; e < E; e++) {
                if (!r->enabled[e] || taken[e]) continue;
                if (limit && gkeep[e / per] != (tier == 0)) continue;
                float k = sel_key(r, z, p, e);
                if (best < 0 || k > bk) best = e, bk = k;
            }
            if (best < 0) break;
            ix[n++] = best;
            taken[best] = 1;
        }
    }
}

/* Combine weights of one token's K picks. Softmax scores renormalised over
 * the picks are p_i / sum_j p_j = exp(z_i) / sum_j exp(z_j): a softmax over
 * the picks' logits, computed as such so that picks whose p underflowed to 0
 * (a forced expert, a selection bias, a group limit) still get their exact
 * share instead of 0/0. Sigmoid scores are divided by sum + 1e-20, as
 * DeepSeek-V3 does: picks whose scores all underflow get weight 0. */
static int picks_softmax(const moe_router *r) {
    return r->score == MOE_SCORE_TOPK_SOFTMAX || (r->score == MOE_SCORE_SOFTMAX && r->normalize);
}

static void pick_weights(const moe_router *r, float *w, const int32_t *ix, const float *z, const float *p) {
    int K = r->K;
    if (picks_softmax(r)) {
        float m = z[ix[0]], s = 0.0f;
        for (int j = 1; j < K; j++) m = z[ix[j]] > m ? z[ix[j]] : m;
        for (int j = 0; j < K; j++) s += (w[j] = expf(z[ix[j]] - m));
        for (int j = 0; j < K; j++) w[j] = w[j] / s * r->scale;
        return;
    }
    float s = 0.0f;
    for (int j = 0; j < K; j++) s += (w[j] = p[ix[j]]);
    float den = !r->normalize ? 1.0f : s + 1e-20f; /* normalize: sigmoid here */
    for (int j = 0; j < K; j++) w[j] = w[j] / den * r->scale;
}

static int cmp_pair(const void *a, const void *b) {
    const moe_ec_pair *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return (x->t > y->t) - (x->t < y->t);
}

/* Expert choice: expert e takes its C best tokens of each group. */
static void expert_choice(moe_router *r) {
    int E = r->E, Ks = r->Ks;
    int64_t N = r->N, T = r->B * N, C = r->capacity;
    for (int64_t t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            r->idx[t * Ks + e] = e;
            r->w[t * Ks + e] = 0.0f;
            r->pos[t * Ks + e] = -1;
        }
    for (int64_t b = 0; b < r->B; b++) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int e = 0; e < E; e++) {
            if (!r->enabled[e]) continue;
            moe_ec_pair *pr = r->pairs + (int64_t)e * N;
            for (int64_t n = 0; n < N; n++) pr[n].v = r->p[(b * N + n) * E + e], pr[n].t = (int32_t)n;
            qsort(pr, (size_t)N, sizeof *pr, cmp_pair);
            for (int64_t c = 0; c < C; c++) {
                int64_t t = b * N + pr[c].t;
                r->pos[t * Ks + e] = 0;
                r->w[t * Ks + e] = r->scale * r->p[t * E + e];
            }
        }
        for (int e = 0; e < E; e++) r->load[b * E + e] = r->enabled[e] ? C : 0;
    }
}

void moe_router_forward(moe_router *r) {
    int E = r->E, K = r->K, Ks = r->Ks;
    int64_t N = r->N, T = r->B * N;
    int limit = r->G > 1 && r->M < r->G;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *z = r->z + t * E;
        float *p = r->p + t * E;
        token_probs(r, p, z);
        r->lse[t] = logsumexp(z, E);
        if (r->expert_choice) continue;
        int32_t *ix = r->idx + t * Ks;
        pick_token(r, ix, r->taken + t * E, limit ? r->gkeep + t * r->G : NULL, limit ? r->gscore + t * r->G : NULL,
                   z, p);
        pick_weights(r, r->w + t * Ks, ix, z, p);
    }
    double zl = 0.0;
    for (int64_t t = 0; t < T; t++) zl += (double)r->lse[t] * r->lse[t];
    r->zloss = T ? zl / (double)T : 0.0; /* expert parallel: a rank may have no tokens */
    r->dropped = 0;
    r->balance = 0.0;
    r->capacity = r->cf > 0 ? moe_router_capacity(r->cf, N, K, E, r->expert_choice) : 0;
    if (r->expert_choice) {
        expert_choice(r);
        return;
    }
    /* loads, capacity (slot by slot, tokens in order) and the balance loss, per group */
    int en = enabled_count(r);
    for (int64_t b = 0; b < r->B; b++) {
        int64_t *load = r->load + b * E;
        memset(load, 0, (size_t)E * sizeof *load);
        memset(r->fill, 0, (size_t)E * sizeof *r->fill);
        for (int j = 0; j < K; j++)
            for (int64_t t = b * N; t < (b + 1) * N; t++) {
                int32_t e = r->idx[t * Ks + j];
                load[e]++;
                int keep = r->capacity == 0 || r->fill[e] < r->capacity;
                r->fill[e] += keep;
                r->pos[t * Ks + j] = keep ? 0 : -1;
                r->dropped += !keep;
            }
        /* P_e: mean router probability (sigmoid: the share s / (sum of enabled
         * s + 1e-20), 0 for a token whose scores all underflow) */
        double *P = r->psum, bal = 0.0;
        memset(P, 0, (size_t)E * sizeof *P);
        for (int64_t t = b * N; t < (b + 1) * N; t++) {
            const float *p = r->p + t * E;
            double den = 1.0;
            if (r->score == MOE_SCORE_SIGMOID) {
                den = 1e-20;
                for (int e = 0; e < E; e++) den += r->enabled[e] ? p[e] : 0.0f;
            }
            for (int e = 0; e < E; e++) P[e] += r->enabled[e] ? p[e] / den : 0.0;
        }
        for (int e = 0; e < E; e++) bal += (double)load[e] / ((double)N * K) * (P[e] / (double)N);
        r->balance += bal * en;
    }
    r->balance = r->B ? r->balance / (double)r->B : 0.0;
}

void moe_router_backward(const moe_router *r, float *dz, float *dp, const float *dw, float dbal, float dzl) {
    int E = r->E, K = r->K, Ks = r->Ks, en = enabled_count(r);
    int64_t N = r->N, T = r->B * N;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *z = r->z + t * E, *p = r->p + t * E, *dwt = dw + t * Ks;
        const int32_t *ix = r->idx + t * Ks, *ps = r->pos + t * Ks;
        float *dzt = dz + t * E, *dpt = dp + t * E;
        memset(dzt, 0, (size_t)E * sizeof *dzt);
        memset(dpt, 0, (size_t)E * sizeof *dpt);
        if (r->expert_choice) {
            for (int e = 0; e < E; e++)
                if (ps[e] >= 0) dpt[e] += r->scale * dwt[e];
        } else if (picks_softmax(r)) {
            const float *wt = r->w + t * Ks;
            float c = 0.0f;
            for (int j = 0; j < K; j++) c += wt[j] * (ps[j] >= 0 ? dwt[j] : 0.0f);
            /* dz_i = u_i (g_i - sum_j u_j g_j), u = w / scale, g = scale * dw */
            for (int j = 0; j < K; j++) dzt[ix[j]] += wt[j] * ((ps[j] >= 0 ? dwt[j] : 0.0f) - c / r->scale);
        } else {
            /* w_j = scale * r_j / S (normalised sigmoid, S = sum + 1e-20) or
             * scale * r_j, r_j = p[pick j] */
            float S = 0.0f, c = 0.0f;
            for (int j = 0; j < K; j++) {
                float g = ps[j] >= 0 ? dwt[j] : 0.0f;
                S += p[ix[j]];
                c += g * p[ix[j]];
            }
            S += 1e-20f;
            for (int j = 0; j < K; j++) {
                float g = ps[j] >= 0 ? dwt[j] : 0.0f;
                dpt[ix[j]] += r->normalize ? r->scale * (g / S - c / (S * S)) : r->scale * g;
            }
        }
        if (dbal != 0.0f && !r->expert_choice) {
            /* d balance / d q[t,e] = E' * f_e / N / B, f_e = load / (N*K) */
            const int64_t *load = r->load + (t / N) * E;
            float k = dbal * (float)en / (float)((double)N * N * K * r->B);
            if (r->score != MOE_SCORE_SIGMOID) {
                for (int e = 0; e < E; e++)
                    if (r->enabled[e]) dpt[e] += k * (float)load[e];
            } else { /* q = s / (sum s over enabled + 1e-20), as the forward */
                float sum = 0.0f, c = 0.0f;
                for (int e = 0; e < E; e++)
                    if (r->enabled[e]) sum += p[e];
                sum += 1e-20f;
                for (int e = 0; e < E; e++)
                    if (r->enabled[e]) c += k * (float)load[e] * p[e] / sum;
                for (int e = 0; e < E; e++)
                    if (r->enabled[e]) dpt[e] += (k * (float)load[e] - c) / sum;
            }
        }
        if (r->score == MOE_SCORE_SIGMOID) {
            for (int e = 0; e < E; e++) dzt[e] += dpt[e] * p[e] * (1.0f - p[e]);
        } else {
            float c = 0.0f;
            for (int e = 0; e < E; e++) c += p[e] * dpt[e];
            for (int e = 0; e < E; e++)
                if (r->enabled[e]) dzt[e] += p[e] * (dpt[e] - c);
        }
        if (dzl != 0.0f) {
            float g = dzl * 2.0f * r->lse[t] / (float)T;
            for (int e = 0; e < E; e++) dzt[e] += g * expf(z[e] - r->lse[t]);
        }
    }
}
