/*
 * Layers `soft_dynamic` (seed 003, Soft MoE with dynamic slots) and `soft`
 * (Soft MoE of Puigcerver et al. with learned slots), forward and backward.
 *
 * Per batch row b (a group of N tokens):
 *   xn   = x / max(|x|, 1e-12) * sqrt(D) * gamma          (RMSNorm, per token)
 *   slot keys K (J = E*S rows of D):
 *     soft_dynamic: pad N to Np, a multiple of E, with masked zero rows; the
 *       masked mean of each group of E consecutive tokens (S = Np/E groups),
 *       projected by Wp (E*D, D) and RMSNorm'd per (s, e) with gamma2;
 *       slot (e, s) is masked when every token of group s is.
 *     soft: RMSNorm(slot_embeds (E,S,D)) with gamma2 (slot_norm); Np = N.
 *   L (Np, J) = xn K^T, -inf where the token or the slot is masked
 *   dispatch Dw = softmax over tokens (columns), combine Cw = softmax over
 *   slots (rows); a column or row with every entry masked is uniform (the seed
 *   fills masked logits with -finfo.max, whose softmax is uniform).
 *   slots X (e, b, s) = sum_n Dw[n, (e,s)] xn[n]; expert e runs on its B*S
 *   slot rows; y[n] = sum_j Cw[n, j] Y[j] for the first N tokens.
 * Slot j = e*S + s. Everything is index-free dense algebra: GEMMs of the slot
 * layout, no dispatch tensors beyond the (Np, J) weight matrices the method
 * defines.
 *
 * Dimension key: B batch rows, N tokens per row, Np = N padded, D model dim,
 * E experts, S slots per expert, J = E*S, H expert hidden dim, H2 = H or 2H
 * (GLU), R = E*B*S expert rows.
 *
 * Parameters (state_dict order):
 *   soft_dynamic: norm.gamma (D), to_slot_embeds.0.weight (E*D, D),
 *                 to_slot_embeds.2.gamma (D), experts.{e}.0.weight (H2,D),
 *                 .0.bias (H2), .3.weight (D,H), .3.bias (D)
 *   soft:         norm.gamma (D), slot_norm.gamma (D), slot_embeds (E,S,D),
 *                 experts.experts.{e}.0.weight ... (as above)
 * stored as one block: g (D), then Wp (E*D,D) or [g2 (D), P (E,S,D)], then
 * g2 (dynamic), then the expert bank W1 (E,H2,D) b1 (E,H2) W2 (E,D,H) b2 (E,D).
 */
#include "bank.h"
#include "layer_internal.h"
#include "ops.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static const float k_norm_eps = 1e-12f;  /* F.normalize's eps            */
static const float k_count_eps = 1e-5f;  /* the seed's clamp of the count */

typedef struct {
    uint64_t *stream;   /* (1)        dropout stream of the cached forward     */
    float *x;           /* (B*N, D)   copy of the input                        */
    float *rinv;        /* (B*Np)     1/max(|x|, eps); 0 for pad rows          */
    float *xn;          /* (B*Np, D)  normalised, padded input                 */
    uint8_t *m;         /* (B*Np)     1 real token, 0 masked or pad            */
    uint8_t *sm;        /* (B*S)      1 slot group has a real token (dynamic)  */
    float *cnt;         /* (B*S)      max(count, 1e-5) of each group (dynamic) */
    float *gm;          /* (B*S, D)   group means (dynamic)                    */
    float *P;           /* (B*S, E*D) projection before the norm (dynamic)     */
    float *K;           /* (B*S, E*D) dynamic keys; soft: (J, D)               */
    float *rinv2;       /* (B*S*E) or (J)  1/max(|row|, eps) of the key rows   */
    float *Dw, *Cw;     /* (B, Np, J) dispatch and combine weights             */
    float *colmax;      /* (J)        scratch                                  */
    int64_t *offsets;   /* (E+1)      expert e owns rows [e*B*S, (e+1)*B*S)    */
    float *xs;          /* (R, D)     slots, expert-major (e, b, s)            */
    float *hpre;        /* (R, H2)                                             */
    float *ha;          /* (R, H)                                              */
    float *ye;          /* (R, D)                                              */
    float *dye, *dha, *dhpre, *dxs; /* backward: (R,D) (R,H) (R,H2) (R,D)      */
    float *dCw, *dDw;   /* (Np, J)    backward scratch, one row b at a time    */
    float *dxn;         /* (B*Np, D)                                           */
    float *dK;          /* like K                                              */
    float *dgm;         /* (B*S, D)   dynamic                                  */
    float *Kc, *tJ;     /* (J, D)     one row b's keys, contiguous; slot rows  */
} soft_ws;

typedef struct {
    int64_t D, H, H2, E, S, Np, J, R, B, N;
    int dyn;
} soft_dims;

static int is_dyn(const moe_layer *l) { return l->cfg.type == MOE_LAYER_SOFT_DYNAMIC; }

static soft_dims dims_of(const moe_layer *l, int64_t B, int64_t N) {
    const moe_config *c = &l->cfg;
    soft_dims d;
    d.D = c->input_dim;
    d.H = c->hidden_dim;
    d.H2 = c->expert == MOE_EXPERT_MLP ? d.H : 2 * d.H;
    d.E = c->num_experts;
    d.dyn = is_dyn(l);
    d.B = B;
    d.N = N;
    d.Np = d.dyn ? (N + d.E - 1) / d.E * d.E : N;
    d.S = d.dyn ? d.Np / d.E : c->slots_per_expert;
    d.J = d.E * d.S;
    d.R = d.E * B * d.S;
    return d;
}

static size_t layout(const moe_layer *l, int64_t B, int64_t N, char *base, soft_ws *w) {
    soft_dims d = dims_of(l, B, N);
    size_t off = 0, F = sizeof(float);
    int64_t BS = d.dyn ? B * d.S : 0, nK = d.dyn ? BS * d.E : d.J;
    /* (Np, J) products can overflow int64 before moe__carve sees them */
    if (d.Np > INT64_MAX / (d.J ? d.J : 1) / (B ? B : 1) || d.R > INT64_MAX / (d.H2 + 1)) return SIZE_MAX;
    w->stream = moe__carve(base, &off, 1, 1, sizeof(uint64_t));
    w->x = moe__carve(base, &off, B * N, d.D, F);
    w->rinv = moe__carve(base, &off, B * d.Np, 1, F);
    w->xn = moe__carve(base, &off, B * d.Np, d.D, F);
    w->m = moe__carve(base, &off, B * d.Np, 1, 1);
    w->sm = moe__carve(base, &off, BS, 1, 1);
    w->cnt = moe__carve(base, &off, BS, 1, F);
    w->gm = moe__carve(base, &off, BS, d.D, F);
    w->P = moe__carve(base, &off, BS, d.E * d.D, F);
    w->K = moe__carve(base, &off, nK, d.D, F);
    w->rinv2 = moe__carve(base, &off, nK, 1, F);
    w->Dw = moe__carve(base, &off, B * d.Np, d.J, F);
    w->Cw = moe__carve(base, &off, B * d.Np, d.J, F);
    w->colmax = moe__carve(base, &off, 2 * d.J, 1, F);
    w->offsets = moe__carve(base, &off, d.E + 1, 1, sizeof(int64_t));
    w->xs = moe__carve(base, &off, d.R, d.D, F);
    w->hpre = moe__carve(base, &off, d.R, d.H2, F);
    w->ha = moe__carve(base, &off, d.R, d.H, F);
    w->ye = moe__carve(base, &off, d.R, d.D, F);
    w->dye = moe__carve(base, &off, d.R, d.D, F);
    w->dha = moe__carve(base, &off, d.R, d.H, F);
    w->dhpre = moe__carve(base, &off, d.R, d.H2, F);
    w->dxs = moe__carve(base, &off, d.R, d.D, F);
    w->dCw = moe__carve(base, &off, d.Np, d.J, F);
    w->dDw = moe__carve(base, &off, d.Np, d.J, F);
    w->dxn = moe__carve(base, &off, B * d.Np, d.D, F);
    w->dK = moe__carve(base, &off, nK, d.D, F);
    w->dgm = moe__carve(base, &off, BS, d.D, F);
    w->Kc = moe__carve(base, &off, d.J, d.D, F);
    w->tJ = moe__carve(base, &off, d.J, d.D, F);
    return off;
}

static size_t soft_workspace_bytes(const moe_layer *l, int64_t B, int64_t N) {
    soft_ws w;
    return layout(l, B, N, NULL, &w);
}

/* ---------------------------------------------------------------- parameters */

typedef struct {
    float *g, *Wp, *g2, *slots, *W1, *b1, *W2, *b2;
} soft_params;

/* Offsets (in floats) of each parameter in the block, and its end. */
typedef struct {
    int64_t g, Wp, g2, slots, W1, b1, W2, b2, end;
} soft_offs;

static soft_offs offs_of(const moe_layer *l) {
    soft_dims d = dims_of(l, 1, 1);
    soft_offs o;
    o.g = 0;
    if (d.dyn) {
        o.Wp = d.D;
        o.g2 = o.Wp + d.E * d.D * d.D;
        o.slots = -1;
        o.W1 = o.g2 + d.D;
    } else {
        o.Wp = -1;
        o.g2 = d.D;
        o.slots = o.g2 + d.D;
        o.W1 = o.slots + d.J * d.D;
    }
    o.b1 = o.W1 + d.E * d.H2 * d.D;
    o.W2 = o.b1 + d.E * d.H2;
    o.b2 = o.W2 + d.E * d.D * d.H;
    o.end = o.b2 + d.E * d.D;
    return o;
}

static soft_params params_of(const moe_layer *l, float *mem) {
    soft_offs o = offs_of(l);
    soft_params p = {mem + o.g, o.Wp >= 0 ? mem + o.Wp : NULL, mem + o.g2, o.slots >= 0 ? mem + o.slots : NULL,
                     mem + o.W1, mem + o.b1, mem + o.W2, mem + o.b2};
    return p;
}

/* The expert bank over the slots (the layer's format: fp32, the soft layers have no bf16). */
static moe_bank ffn_of(const moe_layer *l, soft_params p, const soft_params *g, float dropout, uint64_t stream) {
    const moe_config *c = &l->cfg;
    moe_bank f = {p.W1, p.b1, p.W2, p.b2, g ? g->W1 : NULL, g ? g->b1 : NULL, g ? g->W2 : NULL,
                  g ? g->b2 : NULL, c->input_dim, c->hidden_dim, c->num_experts, 0, c->expert,
                  c->activation, c->leaky_slope, dropout, stream, NULL, NULL, NULL, {NULL, NULL, NULL, NULL}};
    moe__layer_bank(l, &f);
    return f;
}

/* ---------------------------------------------------------------- RMSNorm */

/* out (M, D) = u / max(|u|, eps) * sqrt(D) * g per row; rinv (M) keeps 1/max.
 * Rows are u + r*ldu and out + r*ldo. */
static void rmsnorm_rows(float *out, int64_t ldo, float *rinv, const float *u, int64_t ldu, const float *g,
                         int64_t M, int64_t D) {
    float sq = sqrtf((float)D);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const float *ur = u + r * ldu;
        double ss = 0.0;
        for (int64_t k = 0; k < D; k++) ss += (double)ur[k] * ur[k];
        float nrm = (float)sqrt(ss);
        float ri = 1.0f / (nrm > k_norm_eps ? nrm : k_norm_eps);
        rinv[r] = ri;
        float *o = out + r * ldo;
        for (int64_t k = 0; k < D; k++) o[k] = ur[k] * ri * sq * g[k];
    }
}

/* Backward of rmsnorm_rows: du (M, D) written (may alias dout), dg (D) += ..
 *   du = sqrt(D) * (r * g*dout - u * r^3 * <u, g*dout>)  when |u| > eps,
 *   du = sqrt(D) * r * g*dout                             when clamped. */
static void rmsnorm_rows_backward(float *du, int64_t lddu, float *dg, const float *dout, int64_t ldd,
                                  const float *u, int64_t ldu, const float *rinv, const float *g, int64_t M,
                                  int64_t D) {
    float sq = sqrtf((float)D);
    /* dg first (dout may be overwritten below), in blocks of 16 columns so
     * each sum runs in row order on one thread */
#pragma omp parallel for schedule(static)
    for (int64_t k0 = 0; k0 < D; k0 += 16) {
        int64_t k1 = k0 + 16 < D ? k0 + 16 : D;
        float s[16] = {0};
        for (int64_t r = 0; r < M; r++)
            for (int64_t k = k0; k < k1; k++) s[k - k0] += dout[r * ldd + k] * u[r * ldu + k] * rinv[r];
        for (int64_t k = k0; k < k1; k++) dg[k] += s[k - k0] * sq;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const float *ur = u + r * ldu, *dr = dout + r * ldd;
        float ri = rinv[r], dot = 0.0f;
        int clamped = ri >= 1.0f / k_norm_eps;
        for (int64_t k = 0; k < D; k++) dot += ur[k] * g[k] * dr[k];
        float c3 = clamped ? 0.0f : ri * ri * ri * dot;
        float *o = du + r * lddu;
        for (int64_t k = 0; k < D; k++) o[k] = sq * (ri * g[k] * dr[k] - ur[k] * c3);
    }
}

/* ---------------------------------------------------------------- softmaxes */

/* Cw (Np, J) = softmax of each row of L, Dw (Np, J) = softmax of each column
 * (Dw may alias L). -inf entries get 0; an all -inf row or column is uniform. */
static void dispatch_combine(float *Dw, float *Cw, const float *L, float *colmax, int64_t Np, int64_t J) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < Np; n++) {
        const float *lr = L + n * J;
        float *cr = Cw + n * J;
        float mx = -INFINITY;
        for (int64_t j = 0; j < J; j++) mx = lr[j] > mx ? lr[j] : mx;
        if (mx == -INFINITY) {
            for (int64_t j = 0; j < J; j++) cr[j] = 1.0f / (float)J;
            continue;
        }
        moe_vexpf_sub(cr, lr, mx, J); /* vectorised exp (ops.h), the sum in slot order */
        float s = 0.0f;
        for (int64_t j = 0; j < J; j++) s += cr[j];
        float inv = 1.0f / s;
        for (int64_t j = 0; j < J; j++) cr[j] *= inv;
    }
    float *colsum = colmax + J;
    /* columns in blocks of 64: each block's sums run in row order on one thread */
#pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < J; j0 += 64) {
        int64_t j1 = j0 + 64 < J ? j0 + 64 : J;
        for (int64_t j = j0; j < j1; j++) colmax[j] = -INFINITY, colsum[j] = 0.0f;
        for (int64_t n = 0; n < Np; n++)
            for (int64_t j = j0; j < j1; j++) colmax[j] = L[n * J + j] > colmax[j] ? L[n * J + j] : colmax[j];
        for (int64_t n = 0; n < Np; n++) {
            float *dr = Dw + n * J;
            for (int64_t j = j0; j < j1; j++) dr[j] = L[n * J + j] - colmax[j];
            moe_vexpf(dr + j0, dr + j0, j1 - j0);
            for (int64_t j = j0; j < j1; j++) {
                if (colmax[j] == -INFINITY) dr[j] = 1.0f; /* an all-masked column: uniform */
                colsum[j] += dr[j];
            }
        }
        for (int64_t j = j0; j < j1; j++) colsum[j] = 1.0f / colsum[j];
        for (int64_t n = 0; n < Np; n++)
            for (int64_t j = j0; j < j1; j++) Dw[n * J + j] *= colsum[j];
    }
}

/* ---------------------------------------------------------------- layouts */

/* Slot rows of batch row b: tJ (J, D) contiguous, row e*S+s  <->  rows
 * (e*B + b)*S + s of the expert-major buffer (R, D). */
static void slots_gather(float *tJ, const float *rows, int64_t b, const soft_dims *d) {
    for (int64_t e = 0; e < d->E; e++)
        memcpy(tJ + e * d->S * d->D, rows + (e * d->B + b) * d->S * d->D, (size_t)(d->S * d->D) * sizeof(float));
}
static void slots_scatter(float *rows, const float *tJ, int64_t b, const soft_dims *d) {
    for (int64_t e = 0; e < d->E; e++)
        memcpy(rows + (e * d->B + b) * d->S * d->D, tJ + e * d->S * d->D, (size_t)(d->S * d->D) * sizeof(float));
}
/* Keys of row b: dynamic keys live as (S, E*D) per b (the projection's
 * layout); Kc (J, D) is the same in slot order j = e*S + s. to_kc 0 copies
 * back (for gradients). */
static void keys_copy(float *Kc, float *K, int64_t b, const soft_dims *d, int to_kc) {
    for (int64_t e = 0; e < d->E; e++)
        for (int64_t s = 0; s < d->S; s++) {
            float *k = K + ((b * d->S + s) * d->E + e) * d->D, *c = Kc + (e * d->S + s) * d->D;
            if (to_kc) memcpy(c, k, (size_t)d->D * sizeof(float));
            else memcpy(k, c, (size_t)d->D * sizeof(float));
        }
}

/* ---------------------------------------------------------------- forward */

static moe_status soft_forward(moe_layer *l, float *y, float *aux, const float *x, int64_t T, int train) {
    soft_dims d = dims_of(l, l->B, l->N);
    int64_t D = d.D, E = d.E, S = d.S, J = d.J, Np = d.Np, B = d.B, N = d.N;
    soft_ws w;
    layout(l, B, N, l->ws, &w);
    soft_params p = params_of(l, l->wmem);

    if (l->keep) memcpy(w.x, x, (size_t)(T * D) * sizeof(float));
    /* token mask and normalised padded input */
    for (int64_t b = 0; b < B; b++)
        for (int64_t n = 0; n < Np; n++)
            w.m[b * Np + n] = n < N ? (l->mask ? l->mask[b * N + n] != 0 : 1) : 0;
    for (int64_t b = 0; b < B; b++) {
        rmsnorm_rows(w.xn + b * Np * D, D, w.rinv + b * Np, x + b * N * D, D, p.g, N, D);
        memset(w.xn + (b * Np + N) * D, 0, (size_t)((Np - N) * D) * sizeof(float));
        for (int64_t n = N; n < Np; n++) w.rinv[b * Np + n] = 0.0f;
    }

    /* slot keys */
    if (d.dyn) {
        int64_t BS = B * S;
#pragma omp parallel for schedule(static)
        for (int64_t q = 0; q < BS; q++) { /* group q = (b, s): tokens b*Np + s*E + [0, E) */
            const uint8_t *mq = w.m + q * E;
            const float *xq = w.xn + q * E * D;
            float *gq = w.gm + q * D;
            int64_t c = 0;
            memset(gq, 0, (size_t)D * sizeof(float));
            for (int64_t j = 0; j < E; j++)
                if (mq[j]) {
                    c++;
                    for (int64_t k = 0; k < D; k++) gq[k] += xq[j * D + k];
                }
            float den = (float)c > k_count_eps ? (float)c : k_count_eps;
            for (int64_t k = 0; k < D; k++) gq[k] /= den;
            w.cnt[q] = den;
            w.sm[q] = c > 0;
        }
        /* P (B*S, E*D) = gm Wp^T; each D-wide block (q, e) is then RMSNorm'd */
        moe_sgemm(0, 1, BS, E * D, D, 1.0f, w.gm, D, p.Wp, D, 0.0f, w.P, E * D);
        rmsnorm_rows(w.K, D, w.rinv2, w.P, D, p.g2, BS * E, D);
    } else {
        rmsnorm_rows(w.K, D, w.rinv2, p.slots, D, p.g2, J, D);
    }

    for (int64_t b = 0; b < B; b++) {
        float *Db = w.Dw + b * Np * J, *Cb = w.Cw + b * Np * J;
        const float *xb = w.xn + b * Np * D;
        /* logits (Np, J) into Db: one GEMM against the row's keys in slot order */
        const float *Kb = w.K;
        if (d.dyn) {
            keys_copy(w.Kc, w.K, b, &d, 1);
            Kb = w.Kc;
        }
        moe_sgemm(0, 1, Np, J, D, 1.0f, xb, D, Kb, D, 0.0f, Db, J);
        const uint8_t *mb = w.m + b * Np, *smb = d.dyn ? w.sm + b * S : NULL;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < Np; n++) {
            float *lr = Db + n * J;
            if (!mb[n]) {
                for (int64_t j = 0; j < J; j++) lr[j] = -INFINITY;
            } else if (smb) {
                for (int64_t j = 0; j < J; j++)
                    if (!smb[j % S]) lr[j] = -INFINITY;
            }
        }
        dispatch_combine(Db, Cb, Db, w.colmax, Np, J);
        /* slots of row b: (J, D) = Dw^T xn_b, then to the expert-major rows */
        moe_sgemm(1, 0, J, D, Np, 1.0f, Db, J, xb, D, 0.0f, w.tJ, D);
        slots_scatter(w.xs, w.tJ, b, &d);
    }

    /* experts */
    for (int64_t e = 0; e <= E; e++) w.offsets[e] = e * B * S;
    float drop = train ? l->cfg.dropout : 0.0f;
    *w.stream = moe_rng_u64(l->cfg.seed ^ 0x50f7d20d5e1a7ull, l->forward_calls);
    moe_bank f = ffn_of(l, p, NULL, drop, *w.stream);
    /* no backward to follow: the activation in place (topk.c says why) */
    moe_bank_forward(&f, w.offsets, w.xs, w.hpre, moe__act_in_place(l) ? w.hpre : w.ha, w.ye);

    /* combine, cropped to the N real positions: y_b = sum_e Cw[:N, e*S..] Y(e, b) */
    for (int64_t b = 0; b < B; b++) {
        slots_gather(w.tJ, w.ye, b, &d);
        moe_sgemm(0, 0, N, D, J, 1.0f, w.Cw + b * Np * J, J, w.tJ, D, 0.0f, y + b * N * D, D);
    }

    for (int64_t e = 0; e < E; e++) l->expert_counts[e] = B * S;
    l->assignments = B * J;
    l->dropped = 0;
    l->second_candidates = l->second_kept = 0;
    (void)aux;
    return MOE_OK;
}

/* ---------------------------------------------------------------- backward */

static moe_status soft_backward(moe_layer *l, float *dx, const float *dy, float daux) {
    soft_dims d = dims_of(l, l->B, l->N);
    int64_t D = d.D, E = d.E, S = d.S, J = d.J, Np = d.Np, B = d.B, N = d.N;
    soft_ws w;
    layout(l, B, N, l->ws, &w);
    soft_params p = params_of(l, l->wmem), g = params_of(l, l->gmem);

    /* combine: dY(e, b) = Cw[:N, e*S..]^T dy_b ; dCw is computed per row b below */
    for (int64_t b = 0; b < B; b++) {
        moe_sgemm(1, 0, J, D, N, 1.0f, w.Cw + b * Np * J, J, dy + b * N * D, D, 0.0f, w.tJ, D);
        slots_scatter(w.dye, w.tJ, b, &d);
    }
    /* the forward's dropout mask (none after an eval-mode forward) */
    moe_bank f = ffn_of(l, p, &g, l->cached_train ? l->cfg.dropout : 0.0f, *w.stream);
    l->grad_bad = moe_bank_backward(&f, w.offsets, w.xs, w.hpre, w.ha, w.dye, w.dha, w.dhpre, w.dxs);

    if (!d.dyn) memset(w.dK, 0, (size_t)(J * D) * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        const float *Db = w.Dw + b * Np * J, *Cb = w.Cw + b * Np * J, *xb = w.xn + b * Np * D;
        float *dxb = w.dxn + b * Np * D;
        /* dCw (Np, J): rows < N from dy, pad rows 0 ; dDw (Np, J) = xn dX(e,b)^T ;
         * dxn = sum_e Dw[:, e*S..] dX(e, b) */
        memset(w.dCw + N * J, 0, (size_t)((Np - N) * J) * sizeof(float));
        slots_gather(w.tJ, w.ye, b, &d);
        moe_sgemm(0, 1, N, J, D, 1.0f, dy + b * N * D, D, w.tJ, D, 0.0f, w.dCw, J);
        slots_gather(w.tJ, w.dxs, b, &d);
        moe_sgemm(0, 1, Np, J, D, 1.0f, xb, D, w.tJ, D, 0.0f, w.dDw, J);
        moe_sgemm(0, 0, Np, D, J, 1.0f, Db, J, w.tJ, D, 0.0f, dxb, D);
        /* dL = Cw * (dCw - rowsum(Cw dCw)) + Dw * (dDw - colsum(Dw dDw)), 0 where masked;
         * written into dCw */
        float *cs = w.colmax;
#pragma omp parallel for schedule(static)
        for (int64_t j0 = 0; j0 < J; j0 += 64) {
            int64_t j1 = j0 + 64 < J ? j0 + 64 : J;
            for (int64_t j = j0; j < j1; j++) cs[j] = 0.0f;
            for (int64_t n = 0; n < Np; n++)
                for (int64_t j = j0; j < j1; j++) cs[j] += Db[n * J + j] * w.dDw[n * J + j];
        }
        const uint8_t *mb = w.m + b * Np, *smb = d.dyn ? w.sm + b * S : NULL;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < Np; n++) {
            float *dl = w.dCw + n * J;
            const float *cr = Cb + n * J, *dr = Db + n * J, *ddr = w.dDw + n * J;
            if (!mb[n]) {
                memset(dl, 0, (size_t)J * sizeof(float));
                continue;
            }
            float rs = 0.0f;
            for (int64_t j = 0; j < J; j++) rs += cr[j] * dl[j];
            for (int64_t j = 0; j < J; j++) {
                float v = cr[j] * (dl[j] - rs) + dr[j] * (ddr[j] - cs[j]);
                dl[j] = (smb && !smb[j % S]) ? 0.0f : v;
            }
        }
        /* through L = xn K^T: dxn += dL K ; dK (+)= dL^T xn */
        if (d.dyn) {
            keys_copy(w.Kc, w.K, b, &d, 1);
            moe_sgemm(0, 0, Np, D, J, 1.0f, w.dCw, J, w.Kc, D, 1.0f, dxb, D);
            moe_sgemm(1, 0, J, D, Np, 1.0f, w.dCw, J, xb, D, 0.0f, w.Kc, D);
            keys_copy(w.Kc, w.dK, b, &d, 0);
        } else {
            moe_sgemm(0, 0, Np, D, J, 1.0f, w.dCw, J, w.K, D, 1.0f, dxb, D);
            moe_sgemm(1, 0, J, D, Np, 1.0f, w.dCw, J, xb, D, 1.0f, w.dK, D);
        }
    }

    /* slot keys */
    if (d.dyn) {
        int64_t BS = B * S;
        /* dP (in place of dK) ; dWp += dP^T gm ; dgm = dP Wp ; mean backward into dxn */
        rmsnorm_rows_backward(w.dK, D, g.g2, w.dK, D, w.P, D, w.rinv2, p.g2, BS * E, D);
        moe_sgemm(1, 0, E * D, D, BS, 1.0f, w.dK, E * D, w.gm, D, 1.0f, g.Wp, D);
        moe_sgemm(0, 0, BS, D, E * D, 1.0f, w.dK, E * D, p.Wp, D, 0.0f, w.dgm, D);
#pragma omp parallel for schedule(static)
        for (int64_t q = 0; q < BS; q++) {
            const float *dg = w.dgm + q * D;
            float inv = 1.0f / w.cnt[q];
            for (int64_t j = 0; j < E; j++) {
                if (!w.m[q * E + j]) continue;
                float *o = w.dxn + (q * E + j) * D;
                for (int64_t k = 0; k < D; k++) o[k] += dg[k] * inv;
            }
        }
    } else {
        /* dslots (J, D) += RMSNorm backward of dK */
        rmsnorm_rows_backward(w.dK, D, g.g2, w.dK, D, p.slots, D, w.rinv2, p.g2, J, D);
        for (int64_t i = 0; i < J * D; i++) g.slots[i] += w.dK[i];
    }

    /* input RMSNorm: dx for the N real rows of each b (pad rows have no input) */
    for (int64_t b = 0; b < B; b++) {
        float *dst = dx ? dx + b * N * D : w.dxn + b * Np * D; /* in place when dx is not wanted */
        rmsnorm_rows_backward(dst, D, g.g, w.dxn + b * Np * D, D, w.x + b * N * D, D, w.rinv + b * Np, p.g, N,
                              D);
    }
    (void)daux;
    return MOE_OK;
}

static int soft_probes(const moe_layer *l, int backward, moe_probe *pr) {
    soft_dims d = dims_of(l, l->B, l->N);
    soft_ws w;
    layout(l, d.B, d.N, l->ws, &w);
    int64_t BS = d.dyn ? d.B * d.S : 0, nK = d.dyn ? BS * d.E : d.J;
    int n = 0;
    if (!backward) {
        pr[n++] = (moe_probe){"normalised input", w.xn, d.B * d.Np, d.D};
        if (d.dyn) pr[n++] = (moe_probe){"slot projections", w.P, BS, d.E * d.D};
        pr[n++] = (moe_probe){"slot keys", w.K, nK, d.D};
        pr[n++] = (moe_probe){"dispatch weights", w.Dw, d.B * d.Np, d.J};
        pr[n++] = (moe_probe){"combine weights", w.Cw, d.B * d.Np, d.J};
        pr[n++] = (moe_probe){"slot inputs", w.xs, d.R, d.D};
        if (moe__act_in_place(l)) /* one buffer held both (topk.c) */
            pr[n++] = (moe_probe){"expert activations", w.hpre, d.R, d.H};
        else {
            pr[n++] = (moe_probe){"expert pre-activations", w.hpre, d.R, d.H2};
            pr[n++] = (moe_probe){"expert activations", w.ha, d.R, d.H};
        }
        pr[n++] = (moe_probe){"expert outputs", w.ye, d.R, d.D};
    } else {
        pr[n++] = (moe_probe){"slot output gradients", w.dye, d.R, d.D};
        pr[n++] = (moe_probe){"expert pre-activation gradients", w.dhpre, d.R, d.H2};
        pr[n++] = (moe_probe){"slot input gradients", w.dxs, d.R, d.D};
        pr[n++] = (moe_probe){"normalised input gradients", w.dxn, d.B * d.Np, d.D};
        pr[n++] = (moe_probe){"slot key gradients", w.dK, nK, d.D};
    }
    return n;
}

static const moe_layer_ops soft_ops = {soft_workspace_bytes, soft_forward, soft_backward, soft_probes};

/* ---------------------------------------------------------------- create */

static moe_status soft_create(moe_layer *l) {
    moe_config *c = &l->cfg;
    const char *kind = moe_layer_type_name(c->type);
    int dyn = is_dyn(l);
    if (l->ep)
        return moe_err(MOE_ERR_UNSUPPORTED, "%s layers stay in one process: every slot mixes every token of its "
                       "group, so there are no rows to send to an expert's owner; use expert parallelism with "
                       "topk or gshard layers", kind);
    int64_t D = c->input_dim, E = c->num_experts;
    if (!(c->expert_mult > 0.0) || !isfinite(c->expert_mult) || c->expert_mult > 1e6)
        return moe_err(MOE_ERR_ARG, "%s: expert_mult must be a number in (0, 1e6], got %g", kind, c->expert_mult);
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f))
        return moe_err(MOE_ERR_ARG, "%s: dropout must be in [0, 1), got %g", kind, (double)c->dropout);
    if (!moe_expert_kind_name(c->expert))
        return moe_err(MOE_ERR_ARG, "%s: unknown expert kind %d", kind, (int)c->expert);
    if (!moe_activation_name(c->activation))
        return moe_err(MOE_ERR_ARG, "%s: unknown activation %d", kind, (int)c->activation);
    if (c->hidden_dim == 0) { /* the seed's int(dim * mult) or int(dim * mult * 2 / 3), left to right */
        double h = c->expert == MOE_EXPERT_MLP ? (double)D * c->expert_mult : (double)D * c->expert_mult * 2.0 / 3.0;
        if (h >= (double)(INT_MAX / 4))
            return moe_err(MOE_ERR_ARG, "%s: hidden width dim * expert_mult = %g is too large", kind, h);
        c->hidden_dim = (int64_t)h;
        if (c->hidden_dim < 1)
            return moe_err(MOE_ERR_ARG, "%s: hidden width int(dim * expert_mult%s) = 0 for dim %lld and "
                           "expert_mult %g; raise expert_mult", kind,
                           c->expert == MOE_EXPERT_MLP ? "" : " * 2/3", (long long)D, c->expert_mult);
    }
    if (c->hidden_dim < 1 || c->hidden_dim > INT_MAX / 4)
        return moe_err(MOE_ERR_ARG, "%s: hidden_dim must be in [1, %d], got %lld", kind, INT_MAX / 4,
                       (long long)c->hidden_dim);
    if (!dyn && (c->slots_per_expert < 1 || c->slots_per_expert > INT_MAX / 4))
        return moe_err(MOE_ERR_ARG, "soft: slots_per_expert (num_slots) must be in [1, %d], got %lld "
                       "(or give seq_len >= num_experts)", INT_MAX / 4, (long long)c->slots_per_expert);
    int64_t H = c->hidden_dim, H2 = c->expert == MOE_EXPERT_MLP ? H : 2 * H, S = c->slots_per_expert;
    /* parameter count, in double first to rule out overflow: all terms are < 2^62 when this passes */
    double total = (double)D * 2 + (dyn ? (double)E * D * D : (double)E * S * D) +
                   (double)E * ((double)H2 * D + H2 + (double)D * H + D);
    if (total > (double)(INT64_MAX / 8))
        return moe_err(MOE_ERR_ARG, "%s layer too large: dim %lld, %lld experts, hidden %lld", kind,
                       (long long)D, (long long)E, (long long)H);

    l->ops = &soft_ops;
    l->in_dim = D;
    l->out_dim = D;
    l->has_aux = 0;
    soft_offs o = offs_of(l);
    int64_t s_d[1] = {D}, s_wp[2] = {E * D, D}, s_sl[3] = {E, S, D};
    moe_status st = moe__layer_add_param(l, "norm.gamma", 1, s_d, 0, -1);
    if (dyn) {
        if (st == MOE_OK) st = moe__layer_add_param(l, "to_slot_embeds.0.weight", 2, s_wp, o.Wp, D);
        if (st == MOE_OK) st = moe__layer_add_param(l, "to_slot_embeds.2.gamma", 1, s_d, o.g2, -1);
    } else {
        if (st == MOE_OK) st = moe__layer_add_param(l, "slot_norm.gamma", 1, s_d, o.g2, -1);
        if (st == MOE_OK) st = moe__layer_add_param(l, "slot_embeds", 3, s_sl, o.slots, 0);
    }
    const char *pre = dyn ? "experts" : "experts.experts";
    char name[MOE_NAME_MAX];
    for (int64_t e = 0; e < E && st == MOE_OK; e++) {
        int64_t s_w1[2] = {H2, D}, s_b1[1] = {H2}, s_w2[2] = {D, H};
        snprintf(name, sizeof name, "%s.%lld.0.weight", pre, (long long)e);
        st = moe__layer_add_param(l, name, 2, s_w1, o.W1 + e * H2 * D, D);
        snprintf(name, sizeof name, "%s.%lld.0.bias", pre, (long long)e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_b1, o.b1 + e * H2, D);
        snprintf(name, sizeof name, "%s.%lld.3.weight", pre, (long long)e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 2, s_w2, o.W2 + e * D * H, H);
        snprintf(name, sizeof name, "%s.%lld.3.bias", pre, (long long)e);
        if (st == MOE_OK) st = moe__layer_add_param(l, name, 1, s_d, o.b2 + e * D, H);
    }
    if (st == MOE_OK) st = moe__layer_alloc(l, o.end);
    l->grad_lo = o.W1, l->grad_hi = o.end; /* the bank's gradients: checked by moe_bank_backward */
    return st;
}

static void soft_defaults(moe_config *c) {
    c->hidden_dim = 0; /* from expert_mult */
    c->activation = MOE_ACT_GELU;
    c->slots_per_expert = c->type == MOE_LAYER_SOFT ? 1 : 0;
}

const moe_layer_kind moe__kind_soft_dynamic = {MOE_LAYER_SOFT_DYNAMIC, "soft_dynamic", soft_defaults, soft_create, 0,
                                               1, NULL, NULL};
const moe_layer_kind moe__kind_soft = {MOE_LAYER_SOFT, "soft", soft_defaults, soft_create, 0, 1, NULL, NULL};
