/*
 * The router core of the token-choice `topk` layer: scores, selection
 * (forced experts, group limits, selection bias, expert masks), combine
 * weights, capacity, expert choice, balance loss and z-loss, and the
 * backward of all of it to the gate logits. The layer owns the gate GEMM,
 * shared experts and dispatch; this file owns every routing decision.
 * Dimension key: T = B*N tokens in B groups of N, E experts, K picks per
 * token, Ks row stride of the assignment arrays (>= K; E for expert choice),
 * G expert groups, M groups kept, C capacity per group and expert.
 */
#ifndef MOE_ROUTER_H
#define MOE_ROUTER_H

#include "internal.h"

typedef struct {
    float   v;  /* score                                                     */
    int32_t t;  /* token within the group                                    */
} moe_ec_pair;

typedef struct {
    /* ---- settings ---- */
    int E, K, Ks;
    int expert_choice;
    moe_score_func score;
    int normalize;
    float scale;              /* route_scale                                      */
    double cf;                /* capacity factor of this mode; 0: dropless        */
    int G, M;                 /* groups, groups kept; G <= 1 or M >= G: no limit  */
    const uint8_t *enabled;   /* (E) nonzero: enabled                             */
    const uint8_t *forced;    /* (E) nonzero: forced on every token, or NULL      */
    const float *bias;        /* (E) selection bias, or NULL                      */
    int64_t B, N;
    /* ---- buffers (the caller's workspace) ---- */
    const float *z;           /* (T,E) gate logits                                */
    float   *p;               /* (T,E) softmax over enabled experts, or sigmoid   */
    float   *lse;             /* (T)   logsumexp of z over all E                   */
    float   *gscore;          /* (T,G) scratch                                    */
    uint8_t *gkeep;           /* (T,G) scratch                                    */
    uint8_t *taken;           /* (T,E) scratch                                    */
    moe_ec_pair *pairs;       /* (E,N) scratch, expert choice                     */
    int64_t *fill;            /* (E)   scratch                                    */
    double  *psum;            /* (E)   scratch                                    */
    int32_t *idx;             /* (T,Ks) expert of each slot                       */
    float   *w;               /* (T,Ks) combine weight                            */
    int32_t *pos;             /* (T,Ks) routed slots: 0 kept, -1 dropped/unused   */
    int64_t *load;            /* (B,E) selections per group before capacity      */
    /* ---- results ---- */
    int64_t capacity;         /* C, 0 when dropless                               */
    int64_t dropped;          /* assignments dropped for capacity                 */
    double balance;           /* balance loss before its coefficient (token choice) */
    double zloss;             /* z-loss before its coefficient                    */
} moe_router;

/* Capacity per group and expert: token choice min(N, ceil(cf*N*K/E)), expert
 * choice min(N, ceil(cf*N/E)); at least 1. */
int64_t moe_router_capacity(double cf, int64_t N, int K, int E, int expert_choice);

/* Fill p, lse, the routed slots of idx/w/pos (slots 0..K-1, or 0..E-1 for
 * expert choice), load and the results. */
void moe_router_forward(moe_router *r);

/* dz (T,E) written, from dw (T,Ks) (the gradient of the routed weights;
 * entries of dropped slots are ignored), dbal (weight of the balance loss)
 * and dzl (weight of the z-loss). dp (T,E) is scratch. */
void moe_router_backward(const moe_router *r, float *dz, float *dp, const float *dw, float dbal, float dzl);

#endif
