/*
 * GShard top-2 gating, index-based (see top2.h). Hand-written: this is the
 * MoE-specific routing, and the seeds' dense (B,N,E,C) one-hot dispatch and
 * combine tensors cost more than the experts; here each row carries two
 * (expert, buffer row, gate) triples and nothing is O(N*E*C).
 * Dimension key: R rows, E experts per set, S segments, Ng rows per segment,
 * A kept rows.
 *
 * Per row (seed semantics, importance only on the hierarchical inner level):
 *   eq1 = imp == 1, gt0 = imp > 0
 *   i1 = argmax raw;  a = raw[i1] * eq1;  m1 = eq1
 *   i2 = argmax of raw with i1 masked out when m1 (so i2 == i1 when !eq1)
 *   b = raw[i2];  m2 = gt0
 *   s = a + b + eps;  g1 = a / s;  g2 = b / s
 *   loss += E^2 * mean_{s,e}( mean_rows(raw * eq1) * mean_rows(m1) )  (means over Ng)
 *   m2 *= policy(g2);  first choices take buffer positions in row order, then
 *   second choices after the kept first ones; positions >= capacity are dropped.
 */
#include "top2.h"

#include <math.h>
#include <string.h>

#define TOP2_EPS 1e-9f

int64_t moe_top2_capacity(int64_t Ng, double cf, int E) {
    /* clamped to Ng in double first: a huge capacity factor must not overflow the cast */
    double d = floor((double)Ng * cf / (double)E);
    int64_t c = d >= (double)Ng ? Ng : (int64_t)d;
    return c < 4 ? 4 : c;
}

static int argmax_skip(const float *p, int E, int skip) {
    int best = -1;
    for (int e = 0; e < E; e++)
        if (e != skip && (best < 0 || p[e] > p[best])) best = e;
    return best < 0 ? skip : best; /* E == 1: the only expert */
}

/* Choices, normalised gates and the second-choice policy for one segment;
 * pos[] temporarily holds 1 (candidate) or -1. Returns the segment's
 * sum_e proxy[e] * density[e]. */
static double choose(moe_top2 *g, int s, int64_t *cand2) {
    int E = g->E;
    int64_t r0 = g->seg_start[s], n = g->seg_len[s];
    float *dens = g->density + (int64_t)s * E;
    double *px = g->proxy + (int64_t)s * E; /* sum of raw * eq1, in double */
    float thr_r = g->threshold > TOP2_EPS ? (float)g->threshold : TOP2_EPS;
    memset(dens, 0, (size_t)E * sizeof(float));
    memset(px, 0, (size_t)E * sizeof(double));
    for (int64_t r = r0; r < r0 + n; r++) {
        const float *p = g->raw + r * E;
        float imp = g->imp ? g->imp[r] : 1.0f;
        int eq1 = imp == 1.0f, gt0 = imp > 0.0f;
        int i1 = argmax_skip(p, E, -1);
        int i2 = eq1 ? argmax_skip(p, E, i1) : i1;
        float a = eq1 ? p[i1] : 0.0f, b = p[i2];
        int second = gt0 && !(eq1 && i2 == i1); /* E == 1 leaves no second choice */
        if (!second) b = 0.0f;
        float den = a + b + TOP2_EPS, g1 = a / den, g2 = b / den;
        if (eq1) {
            dens[i1] += 1.0f;
            for (int e = 0; e < E; e++) px[e] += p[e];
        }
        int keep2 = second;
        if (keep2) (*cand2)++;
        switch (g->policy) {
        case MOE_SECOND_ALL: break;
        case MOE_SECOND_NONE: keep2 = 0; break;
        case MOE_SECOND_THRESHOLD: keep2 = keep2 && g2 > (float)g->threshold; break;
        case MOE_SECOND_RANDOM: {
            float u = moe_rng_uniform(g->rng_stream, (uint64_t)((g->seg0 + s) * g->Ng + (r - r0)));
            keep2 = keep2 && u < g2 / thr_r;
            break;
        }
        }
        g->idx[2 * r] = i1, g->idx[2 * r + 1] = i2;
        g->gate[2 * r] = eq1 ? g1 : 0.0f, g->gate[2 * r + 1] = g2;
        g->pos[2 * r] = eq1 ? 1 : -1, g->pos[2 * r + 1] = keep2 ? 1 : -1;
    }
    double inv = 1.0 / (double)g->Ng, acc = 0.0;
    for (int e = 0; e < E; e++) {
        dens[e] = (float)(dens[e] * inv);
        acc += (px[e] * inv) * (double)dens[e];
    }
    return acc;
}

/* Capacity for one segment: positions in row order, first choices first. */
static void fill_capacity(moe_top2 *g, int s, int64_t *dropped, int64_t *kept2) {
    int E = g->E;
    int64_t r0 = g->seg_start[s], n = g->seg_len[s], cap = g->capacity;
    int64_t *cnt = g->counts + (int64_t)s * E;
    int32_t *fill = g->fill + (int64_t)s * E;
    memset(fill, 0, (size_t)E * sizeof *fill);
    for (int64_t r = r0; r < r0 + n; r++) {
        if (g->pos[2 * r] < 0) continue;
        int32_t p = fill[g->idx[2 * r]]++;
        g->pos[2 * r] = p < cap ? p : -1;
        if (p >= cap) g->gate[2 * r] = 0.0f, (*dropped)++;
    }
    for (int e = 0; e < E; e++) cnt[e] = fill[e] < cap ? fill[e] : cap;
    for (int64_t r = r0; r < r0 + n; r++) {
        if (g->pos[2 * r + 1] < 0) {
            g->gate[2 * r + 1] = 0.0f;
            continue;
        }
        int e = g->idx[2 * r + 1];
        int64_t p = cnt[e]++;
        if (p < cap) {
            g->pos[2 * r + 1] = (int32_t)p;
            (*kept2)++;
        } else {
            cnt[e]--;
            g->pos[2 * r + 1] = -1;
            g->gate[2 * r + 1] = 0.0f;
            (*dropped)++;
        }
    }
}

void moe_top2_forward(moe_top2 *g) {
    int E = g->E, S = g->S;
    int nk = g->n_sets * E;
    g->capacity = moe_top2_capacity(g->Ng, g->capacity_factor, E);
    double *seg_loss = g->proxy + (int64_t)S * E; /* (S) */
    int64_t cand2 = 0, kept2 = 0, dropped = 0;
    /* Segments are independent; each is scanned in row order (positions
     * depend on it), and the loss is summed in segment order afterwards so
     * the result does not depend on the thread count. */
#pragma omp parallel for schedule(static) reduction(+ : cand2, kept2, dropped)
    for (int s = 0; s < S; s++) {
        seg_loss[s] = choose(g, s, &cand2);
        fill_capacity(g, s, &dropped, &kept2);
    }
    double loss = 0.0;
    for (int s = 0; s < S; s++) loss += seg_loss[s];
    g->cand2 = cand2, g->kept2 = kept2, g->dropped = dropped;
    g->loss = S ? loss * (double)E / (double)S : 0.0; /* mean over (S,E), times E^2; no segments: a rank
                                                          without tokens (expert parallel) */

    /* Expert-buffer rows: expert k = set*E + e owns a block; inside it the
     * segments follow in order, each with its kept positions 0..counts-1. */
    int64_t *off = g->offsets, *run = g->cursor;
    memset(off, 0, (size_t)(nk + 1) * sizeof *off);
    memset(run, 0, (size_t)nk * sizeof *run);
    for (int s = 0; s < S; s++) {
        int set = g->seg_set ? g->seg_set[s] : 0;
        for (int e = 0; e < E; e++) off[set * E + e + 1] += g->counts[(int64_t)s * E + e];
    }
    for (int k = 0; k < nk; k++) {
        if (g->expert_counts) g->expert_counts[k] = off[k + 1];
        off[k + 1] += off[k];
    }
    g->A = off[nk];
    for (int s = 0; s < S; s++) { /* fill becomes each segment's first row per expert */
        int set = g->seg_set ? g->seg_set[s] : 0;
        for (int e = 0; e < E; e++) {
            int k = set * E + e;
            g->fill[(int64_t)s * E + e] = (int32_t)(off[k] + run[k]);
            run[k] += g->counts[(int64_t)s * E + e];
        }
    }
#pragma omp parallel for schedule(static)
    for (int s = 0; s < S; s++) {
        int64_t r0 = g->seg_start[s], n = g->seg_len[s];
        const int32_t *base = g->fill + (int64_t)s * E;
        for (int64_t r = r0; r < r0 + n; r++)
            for (int j = 0; j < 2; j++) {
                int32_t p = g->pos[2 * r + j];
                if (p < 0) continue;
                int32_t row = base[g->idx[2 * r + j]] + p;
                g->pos[2 * r + j] = row;
                g->src[row] = (int32_t)r;
            }
    }
}

const double *moe_top2_segment_terms(const moe_top2 *g) { return g->proxy + (int64_t)g->S * g->E; }

void moe_top2_backward(const moe_top2 *g, float *dlogits, const float *dgate, float dloss) {
    int E = g->E;
    /* d loss / d raw[r][e] = dloss * E^2 / (S*E) * density[s][e] / Ng * eq1 (seg_w: seg_w[s] * density / Ng) */
    float lscale0 = (float)((double)dloss * (double)E / (double)g->S / (double)g->Ng);
#pragma omp parallel for schedule(static)
    for (int s = 0; s < g->S; s++) {
        float lscale = g->seg_w ? (float)(g->seg_w[s] / (double)g->Ng) : lscale0;
        int64_t r0 = g->seg_start[s], n = g->seg_len[s];
        const float *dens = g->density + (int64_t)s * E;
        for (int64_t r = r0; r < r0 + n; r++) {
            const float *p = g->raw + r * E;
            float *dl = dlogits + r * E;
            float imp = g->imp ? g->imp[r] : 1.0f;
            int eq1 = imp == 1.0f, second = imp > 0.0f;
            int i1 = g->idx[2 * r], i2 = g->idx[2 * r + 1];
            if (eq1 && i2 == i1) second = 0;
            float a = eq1 ? p[i1] : 0.0f, b = second ? p[i2] : 0.0f;
            float den = a + b + TOP2_EPS;
            float dg1 = g->pos[2 * r] >= 0 ? dgate[2 * r] : 0.0f;
            float dg2 = g->pos[2 * r + 1] >= 0 ? dgate[2 * r + 1] : 0.0f;
            float da = (dg1 * (den - a) - dg2 * b) / (den * den);
            float db = (dg2 * (den - b) - dg1 * a) / (den * den);
            /* dl holds d raw first, then becomes d logits */
            for (int e = 0; e < E; e++) dl[e] = eq1 ? lscale * dens[e] : 0.0f;
            if (eq1) dl[i1] += da;
            if (second) dl[i2] += db;
            float sum = 0.0f;
            for (int e = 0; e < E; e++) sum += p[e] * dl[e];
            for (int e = 0; e < E; e++) dl[e] = p[e] * (dl[e] - sum);
        }
    }
}
