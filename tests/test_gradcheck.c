/*
 * Finite-difference gradient checks for every parameter and the input of the
 * topk, dense, gshard, hierarchical, soft_dynamic and soft layers, on small
 * random shapes (soft: with token masks, padding, image input and dropout;
 * topk: every router option, runtime control, jitter replayed like dropout).
 *
 * Loss L = sum(y * r) + daux * aux_loss for a fixed random r, so dL/dy = r
 * (daux = 0.7 for the layers with a balance loss). For each tensor
 * (every parameter, and x) we compare
 *   - the directional derivative along a random unit direction v:
 *       (L(p + h v) - L(p - h v)) / 2h   against   <grad, v>
 *   - and the same for 3 single elements of the tensor,
 * with h = 1e-3 and tolerance |fd - an| <= 1e-2 * max(|fd|, |an|) + 1e-3
 * (float32 forward: L carries ~1e-6 absolute rounding, / 2h ~ 5e-4).
 * Routing is held fixed: a probe whose perturbation changes a discrete choice
 * (top-k, first/second expert, threshold, capacity) is not a valid finite
 * difference and is skipped; at most 1 in 10 may be. With dropout, every
 * probe's forward replays the first forward's RNG stream (forward_calls is
 * reset), so the dropout mask is held fixed the same way.
 * Every layer type is checked again in eval mode (backward after an eval
 * forward, as PyTorch's m.eval(); y = m(x); y.backward(dy)), with eval
 * settings that differ from the train ones (policy, threshold, capacity;
 * dropout and jitter that eval must leave out).
 * Dimension key: T tokens, D model dim, H hidden dim, O output dim, E experts, K top-k.
 */
#include "check.h"
#include "layer_internal.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 12345;
static double urand(void) {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}
static float nrand(void) {
    double u1 = urand() + 1e-12, u2 = urand();
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

typedef struct {
    moe_layer *l;
    float *x, *y, *r;
    int64_t T, D, O, B, N;
    int32_t *route, *now; /* (n_route) base routing and the probe's */
    int64_t n_route;
    float daux;
    const uint8_t *mask;  /* (B,N) or NULL                                   */
    int64_t h, w;         /* image input (B,D,h,w) when h > 0                 */
    uint64_t calls;       /* forward_calls of the first forward (RNG replay)  */
} ctx;

/* Runtime routing control and a random selection bias for the next layer
 * gradcheck_full creates (router cases). */
static int g_k;
static const uint8_t *g_mask, *g_force;
static int g_flags = MOE_TRAIN; /* the forwards' mode */

static moe_status forward(ctx *c, float *aux) {
    c->l->forward_calls = c->calls;
    if (c->h > 0) return moe_layer_forward_image(c->l, c->y, aux, c->x, c->mask, c->B, c->h, c->w, g_flags);
    return moe_layer_forward_masked(c->l, c->y, aux, c->x, c->mask, c->B, c->N, g_flags);
}

static double loss(ctx *c) {
    float aux = 0.0f;
    if (forward(c, &aux) != MOE_OK) return NAN;
    double s = (double)c->daux * aux;
    for (int64_t i = 0; i < c->T * c->O; i++) s += (double)c->y[i] * c->r[i];
    return s;
}

static int routing_same(ctx *c) {
    if (!c->route) return 1;
    int64_t n = moe__layer_routing(c->l, c->now, c->n_route);
    return n == c->n_route && memcmp(c->now, c->route, (size_t)n * sizeof *c->now) == 0;
}

/* fd along direction v of tensor data (n); returns 0 if routing changed. */
static int fd_dir(ctx *c, float *data, const float *v, int64_t n, double h, double *out) {
    float *save = malloc((size_t)n * sizeof *save);
    memcpy(save, data, (size_t)n * sizeof *save);
    for (int64_t i = 0; i < n; i++) data[i] = save[i] + (float)h * v[i];
    double lp = loss(c);
    int ok = routing_same(c);
    for (int64_t i = 0; i < n; i++) data[i] = save[i] - (float)h * v[i];
    double lm = loss(c);
    ok = ok && routing_same(c);
    memcpy(data, save, (size_t)n * sizeof *save);
    free(save);
    /* the perturbation actually applied is the float difference, not h*v */
    *out = (lp - lm) / (2.0 * h);
    return ok;
}

static int probes, skipped;

static void check_tensor(ctx *c, const char *what, float *data, const float *grad, int64_t n) {
    const double h = 1e-3;
    float *v = calloc((size_t)n, sizeof *v);
    for (int trial = 0; trial < 4; trial++) {
        double norm = 0;
        if (trial == 0) {
            for (int64_t i = 0; i < n; i++) v[i] = nrand(), norm += (double)v[i] * v[i];
            for (int64_t i = 0; i < n; i++) v[i] = (float)(v[i] / sqrt(norm));
        } else {
            memset(v, 0, (size_t)n * sizeof *v);
            v[(int64_t)(urand() * (double)n) % n] = 1.0f;
        }
        double an = 0, fd;
        for (int64_t i = 0; i < n; i++) an += (double)grad[i] * v[i];
        probes++;
        if (!fd_dir(c, data, v, n, h, &fd)) {
            skipped++;
            continue;
        }
        double tol = 1e-2 * fmax(fabs(fd), fabs(an)) + 1e-3;
        CHECK(fabs(fd - an) <= tol, "%s probe %d: finite difference %.6g, backward %.6g", what, trial, fd, an);
    }
    free(v);
}

/* B groups of N tokens; mask (B,N) or NULL; h > 0: image input with N = h*w. */
static void gradcheck_full(const moe_config *cfg, int64_t B, int64_t N, const uint8_t *mask, int64_t h,
                           int64_t w, const char *label) {
    ctx c = {0};
    int64_t T = B * N;
    CHECK_STATUS(moe_layer_create(&c.l, cfg), MOE_OK);
    if (!c.l) return;
    c.T = T, c.B = B, c.N = N, c.mask = mask, c.h = h, c.w = w;
    if (g_k || g_mask || g_force) CHECK_STATUS(moe_layer_set_routing(c.l, g_k, g_mask, g_force), MOE_OK);
    for (int i = 0; i < moe_layer_num_buffers(c.l); i++) { /* a selection bias away from zero */
        moe_param *bp = moe_layer_buffer(c.l, i);
        for (int64_t j = 0; j < bp->numel; j++) bp->data[j] = 0.1f * nrand();
    }
    /* norm gains start at 1: move them so their gradients are not at a special point */
    for (int i = 0; i < moe_layer_num_params(c.l); i++) {
        moe_param *p = moe_layer_param(c.l, i);
        if (strstr(p->name, "gamma"))
            for (int64_t j = 0; j < p->numel; j++) p->data[j] = 1.0f + 0.3f * nrand();
    }
    c.D = moe_layer_input_dim(c.l);
    c.O = moe_layer_output_dim(c.l);
    c.daux = moe_layer_has_aux_loss(c.l) ? 0.7f : 0.0f;
    c.x = malloc((size_t)(T * c.D) * sizeof *c.x);
    c.y = malloc((size_t)(T * c.O) * sizeof *c.y);
    c.r = malloc((size_t)(T * c.O) * sizeof *c.r);
    float *dx = malloc((size_t)(T * c.D) * sizeof *dx);
    for (int64_t i = 0; i < T * c.D; i++) c.x[i] = nrand();
    for (int64_t i = 0; i < T * c.O; i++) c.r[i] = nrand();
    c.calls = c.l->forward_calls;
    CHECK_STATUS(forward(&c, NULL), MOE_OK);
    c.n_route = moe__layer_routing(c.l, NULL, 0);
    if (c.n_route) {
        c.route = malloc((size_t)c.n_route * sizeof *c.route);
        c.now = malloc((size_t)c.n_route * sizeof *c.now);
        moe__layer_routing(c.l, c.route, c.n_route);
    }
    moe_layer_zero_grad(c.l);
    CHECK_STATUS(moe_layer_backward(c.l, dx, c.r, c.daux), MOE_OK);
    /* the probes' forwards leave the accumulated gradients alone */
    int np = moe_layer_num_params(c.l);
    int before = check_fail_;
    for (int i = 0; i < np; i++) {
        moe_param *p = moe_layer_param(c.l, i);
        char what[160];
        snprintf(what, sizeof what, "%s %s", label, p->name);
        check_tensor(&c, what, p->data, p->grad, p->numel);
    }
    char what[160];
    snprintf(what, sizeof what, "%s x", label);
    check_tensor(&c, what, c.x, dx, T * c.D);
    printf("gradcheck %-44s %s\n", label, check_fail_ == before ? "ok" : "FAILED");
    free(c.x), free(c.y), free(c.r), free(dx), free(c.route), free(c.now);
    moe_layer_free(c.l);
}

static void gradcheck_seq(const moe_config *cfg, int64_t B, int64_t N, const char *label) {
    gradcheck_full(cfg, B, N, NULL, 0, 0, label);
}
static void gradcheck(const moe_config *cfg, int64_t T, const char *label) { gradcheck_seq(cfg, 1, T, label); }

static void soft_cases(void) {
    moe_config c;
    /* dynamic slots: N = 7 padded to 9 (E = 3), no mask */
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 6, c.num_experts = 3, c.expert_mult = 1.5, c.seed = 121;
    gradcheck_seq(&c, 2, 7, "soft_dynamic mlp D=6 E=3 B=2 N=7 (padded)");
    /* a mask: row 0 loses a token and a whole group; row 1 is fully masked */
    uint8_t m1[2 * 8] = {1, 0, 1, 1, 0, 0, 1, 1, /**/ 0, 0, 0, 0, 0, 0, 0, 0};
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 5, c.num_experts = 2, c.expert = MOE_EXPERT_GEGLU, c.expert_mult = 2, c.seed = 131;
    gradcheck_full(&c, 2, 8, m1, 0, 0, "soft_dynamic geglu D=5 E=2 B=2 N=8 masked");
    uint8_t m2[1 * 5] = {1, 1, 0, 1, 1};
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC); /* mask and padding: 5 -> 8 */
    c.input_dim = 4, c.num_experts = 4, c.expert_mult = 1, c.seed = 141;
    gradcheck_full(&c, 1, 5, m2, 0, 0, "soft_dynamic mlp D=4 E=4 N=5 masked+padded");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC); /* one token */
    c.input_dim = 5, c.num_experts = 3, c.expert_mult = 1, c.seed = 151;
    gradcheck_seq(&c, 2, 1, "soft_dynamic D=5 E=3 B=2 N=1");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC); /* image (B,D,h,w), h*w = 6 padded to 8 */
    c.input_dim = 4, c.num_experts = 4, c.expert_mult = 1.5, c.seed = 161;
    gradcheck_full(&c, 2, 6, NULL, 2, 3, "soft_dynamic image B=2 D=4 h=2 w=3 E=4");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC); /* dropout, mask replayed */
    c.input_dim = 6, c.num_experts = 2, c.expert_mult = 2, c.dropout = 0.3f, c.seed = 171;
    gradcheck_seq(&c, 2, 6, "soft_dynamic dropout 0.3 D=6 E=2 B=2 N=6");

    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 5, c.num_experts = 3, c.slots_per_expert = 2, c.expert_mult = 1.2, c.seed = 181;
    gradcheck_seq(&c, 2, 5, "soft mlp D=5 E=3 S=2 B=2 N=5");
    uint8_t m3[2 * 4] = {1, 0, 1, 1, /**/ 0, 0, 0, 0};
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 4, c.num_experts = 2, c.slots_per_expert = 3, c.expert = MOE_EXPERT_GEGLU, c.expert_mult = 2;
    c.seed = 191;
    gradcheck_full(&c, 2, 4, m3, 0, 0, "soft geglu D=4 E=2 S=3 B=2 N=4 masked");
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 3, c.num_experts = 2, c.slots_per_expert = 1, c.expert_mult = 2, c.dropout = 0.25f;
    c.seed = 201;
    gradcheck_full(&c, 1, 4, NULL, 2, 2, "soft image dropout 0.25 D=3 E=2 S=1 h=w=2");
}

/* The router options of the topk layer; large loss coefficients so the
 * balance and z-loss gradients are tested. */
/* The router options of the topk layer; large loss coefficients so the
 * balance and z-loss gradients are tested; smooth (gelu) experts, since a
 * ReLU kink within h of a probe is not a valid finite difference. */
static void router_cases(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK); /* Switch: top-1, capacity drops, jitter replayed */
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 4, c.activation = MOE_ACT_GELU, c.seed = 301;
    moe_config_set_router(&c, "switch");
    c.capacity_factor_train = 0.6, c.jitter = 0.1, c.balance_coef = 3.0;
    gradcheck_seq(&c, 2, 8, "router switch cf=0.6 jitter B=2 N=8 E=4");
    moe_config_init(&c, MOE_LAYER_TOPK); /* Mixtral: softmax, renormalised, swiglu */
    c.input_dim = 6, c.hidden_dim = 3, c.num_experts = 5, c.top_k = 2, c.expert = MOE_EXPERT_SWIGLU, c.activation = MOE_ACT_GELU, c.seed = 311;
    moe_config_set_router(&c, "mixtral");
    c.balance_coef = 3.0, c.z_loss_coef = 0.5;
    gradcheck(&c, 9, "router mixtral swiglu bal+z T=9 E=5 K=2");
    moe_config_init(&c, MOE_LAYER_TOPK); /* ST-MoE with drops */
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 3, c.top_k = 2, c.activation = MOE_ACT_GELU, c.seed = 321;
    moe_config_set_router(&c, "st_moe");
    c.capacity_factor_train = 1.0, c.z_loss_coef = 0.5, c.balance_coef = 2.0;
    gradcheck_seq(&c, 2, 6, "router st_moe cf=1 B=2 N=6 E=3 K=2");
    moe_config_init(&c, MOE_LAYER_TOPK); /* DeepSeek-V3: sigmoid, bias, groups, scale */
    c.input_dim = 6, c.hidden_dim = 3, c.num_experts = 8, c.top_k = 3, c.activation = MOE_ACT_GELU, c.seed = 331;
    moe_config_set_router(&c, "deepseek_v3");
    c.num_groups = 4, c.topk_groups = 2, c.route_scale = 2.5, c.balance_coef = 2.0;
    gradcheck(&c, 10, "router deepseek_v3 G=4 M=2 scale 2.5 E=8 K=3");
    moe_config_init(&c, MOE_LAYER_TOPK); /* sigmoid without renormalisation, z-loss */
    c.input_dim = 4, c.hidden_dim = 5, c.num_experts = 4, c.top_k = 2, c.activation = MOE_ACT_GELU, c.seed = 341;
    c.score = MOE_SCORE_SIGMOID, c.z_loss_coef = 0.5;
    gradcheck(&c, 7, "router sigmoid raw z-loss E=4 K=2");
    moe_config_init(&c, MOE_LAYER_TOPK); /* expert choice + a gated shared expert */
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 4, c.activation = MOE_ACT_GELU, c.seed = 351;
    moe_config_set_router(&c, "expert_choice");
    c.capacity_factor_train = 1.0, c.z_loss_coef = 0.5, c.num_shared = 1, c.shared_gate = 1;
    gradcheck_seq(&c, 2, 8, "router expert_choice cf=1 shared gated B=2 N=8");
    moe_config_init(&c, MOE_LAYER_TOPK); /* expert choice, one token per group */
    c.input_dim = 4, c.hidden_dim = 3, c.num_experts = 3, c.activation = MOE_ACT_GELU, c.seed = 361;
    moe_config_set_router(&c, "expert_choice");
    gradcheck_seq(&c, 3, 1, "router expert_choice N=1 B=3 E=3");
    moe_config_init(&c, MOE_LAYER_TOPK); /* two ungated shared experts, seed 004 scoring */
    c.input_dim = 5, c.hidden_dim = 3, c.num_experts = 3, c.top_k = 2, c.activation = MOE_ACT_GELU, c.seed = 371;
    c.num_shared = 2, c.route_scale = 1.5, c.balance_coef = 3.0, c.capacity_factor_train = 0.5;
    gradcheck_seq(&c, 2, 6, "router topk_softmax shared=2 cf=0.5 bal");
    /* runtime control: expert 1 masked, expert 3 forced, K 3 instead of 2 */
    static const uint8_t mask[6] = {1, 0, 1, 1, 1, 1}, force[6] = {0, 0, 0, 1, 0, 0};
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 6, c.top_k = 2, c.activation = MOE_ACT_GELU, c.seed = 381;
    c.score = MOE_SCORE_SOFTMAX, c.normalize = 1, c.balance_coef = 3.0;
    g_k = 3, g_mask = mask, g_force = force;
    gradcheck(&c, 8, "router runtime k=3 mask 1 force 3 E=6");
    g_k = 0, g_mask = g_force = NULL;
}

/* Backward after an eval-mode forward, for every layer type; each config's
 * eval settings differ from its train ones, and train-only randomness
 * (dropout, jitter) is on, so a backward that used the train settings fails. */
static void eval_cases(void) {
    moe_config c;
    g_flags = MOE_EVAL;
    moe_config_init(&c, MOE_LAYER_TOPK); /* Switch: jitter (train only), eval capacity 0.75 drops */
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 4, c.activation = MOE_ACT_GELU, c.seed = 401;
    moe_config_set_router(&c, "switch");
    c.capacity_factor_train = 4.0, c.capacity_factor_eval = 0.75, c.jitter = 0.3, c.balance_coef = 3.0;
    gradcheck_seq(&c, 2, 8, "eval router switch jitter cf_eval=0.75 B=2 N=8");
    moe_config_init(&c, MOE_LAYER_TOPK); /* DeepSeek-V3 with shared experts and groups */
    c.input_dim = 6, c.hidden_dim = 3, c.num_experts = 8, c.top_k = 2, c.activation = MOE_ACT_GELU, c.seed = 411;
    moe_config_set_router(&c, "deepseek_v3");
    c.num_groups = 4, c.topk_groups = 2, c.num_shared = 1, c.shared_gate = 1, c.balance_coef = 2.0;
    gradcheck(&c, 9, "eval router deepseek_v3 shared gated G=4 M=2");
    moe_config_init(&c, MOE_LAYER_TOPK); /* expert choice: eval capacity */
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 4, c.activation = MOE_ACT_GELU, c.seed = 421;
    moe_config_set_router(&c, "expert_choice");
    c.capacity_factor_train = 2.0, c.capacity_factor_eval = 0.5, c.z_loss_coef = 0.5;
    gradcheck_seq(&c, 2, 8, "eval router expert_choice cf_eval=0.5 B=2 N=8");
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 3, c.top_k = 2, c.expert = MOE_EXPERT_SWIGLU, c.seed = 431;
    gradcheck(&c, 7, "eval topk swiglu D=5 H=4 E=3 K=2 T=7");
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 5, c.output_dim = 3, c.num_experts = 4, c.seed = 441;
    gradcheck(&c, 6, "eval dense D=5 O=3 E=4 T=6");
    /* gshard and hierarchical: every eval policy; the train settings differ */
    const moe_second_policy pols[] = {MOE_SECOND_ALL, MOE_SECOND_NONE, MOE_SECOND_THRESHOLD, MOE_SECOND_RANDOM};
    for (int i = 0; i < 4; i++) {
        moe_config_init(&c, MOE_LAYER_GSHARD);
        c.input_dim = 6, c.hidden_dim = 5, c.num_experts = 4, c.seed = 451 + (uint64_t)i;
        c.activation = MOE_ACT_GELU, c.loss_coef = 3.0;
        c.second_policy_eval = pols[i], c.second_threshold_eval = 0.15, c.capacity_factor_eval = i % 2 ? 0.5 : 1.5;
        c.second_policy_train = pols[(i + 1) % 4], c.second_threshold_train = 0.4, c.capacity_factor_train = 3.0;
        char label[96];
        snprintf(label, sizeof label, "eval gshard %s cf_eval=%g B=2 N=12", moe_second_policy_name(pols[i]),
                 c.capacity_factor_eval);
        gradcheck_seq(&c, 2, 12, label);
    }
    for (int i = 0; i < 4; i++) {
        moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
        c.input_dim = 5, c.hidden_dim = 3, c.num_experts = 3, c.num_experts_inner = 2, c.seed = 461 + (uint64_t)i;
        c.activation = MOE_ACT_GELU, c.loss_coef = 3.0;
        c.second_policy_eval = pols[i], c.second_threshold_eval = 0.15, c.capacity_factor_eval = i % 2 ? 0.6 : 2.0;
        c.second_policy_train = pols[(i + 2) % 4], c.capacity_factor_train = 1.0;
        char label[96];
        snprintf(label, sizeof label, "eval hierarchical %s cf_eval=%g (3,2) B=2 N=16",
                 moe_second_policy_name(pols[i]), c.capacity_factor_eval);
        gradcheck_seq(&c, 2, 16, label);
    }
    /* soft layers: dropout (train only), masks, image input */
    uint8_t m1[2 * 8] = {1, 0, 1, 1, 0, 0, 1, 1, /**/ 0, 0, 0, 0, 0, 0, 0, 0};
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 5, c.num_experts = 2, c.expert = MOE_EXPERT_GEGLU, c.expert_mult = 2, c.dropout = 0.4f;
    c.seed = 471;
    gradcheck_full(&c, 2, 8, m1, 0, 0, "eval soft_dynamic geglu dropout masked B=2 N=8");
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 4, c.num_experts = 4, c.expert_mult = 1.5, c.dropout = 0.4f, c.seed = 481;
    gradcheck_full(&c, 2, 6, NULL, 2, 3, "eval soft_dynamic image dropout B=2 h=2 w=3");
    uint8_t m3[2 * 4] = {1, 0, 1, 1, /**/ 0, 1, 1, 0};
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 4, c.num_experts = 2, c.slots_per_expert = 3, c.expert_mult = 2, c.dropout = 0.4f, c.seed = 491;
    gradcheck_full(&c, 2, 4, m3, 0, 0, "eval soft dropout masked S=3 B=2 N=4");
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 3, c.num_experts = 2, c.slots_per_expert = 1, c.expert_mult = 2, c.dropout = 0.4f, c.seed = 501;
    gradcheck_full(&c, 1, 4, NULL, 2, 2, "eval soft image dropout h=w=2");
    g_flags = MOE_TRAIN;
}

int main(void) {
    moe_set_num_threads(2);
    moe_config c;
    const moe_activation acts[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_SILU, MOE_ACT_LEAKY_RELU};
    for (int a = 0; a < 4; a++) {
        moe_config_init(&c, MOE_LAYER_TOPK);
        c.input_dim = 6, c.hidden_dim = 5, c.num_experts = 4, c.top_k = 2, c.activation = acts[a];
        c.seed = 11 + (uint64_t)a;
        char label[96];
        snprintf(label, sizeof label, "topk %s D=6 H=5 E=4 K=2 T=9", moe_activation_name(acts[a]));
        gradcheck(&c, 9, label);
    }
    const moe_expert_kind kinds[] = {MOE_EXPERT_SWIGLU, MOE_EXPERT_GEGLU};
    for (int k = 0; k < 2; k++) {
        moe_config_init(&c, MOE_LAYER_TOPK);
        c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 3, c.top_k = 2, c.expert = kinds[k], c.seed = 21;
        char label[96];
        snprintf(label, sizeof label, "topk %s D=5 H=4 E=3 K=2 T=7", moe_expert_kind_name(kinds[k]));
        gradcheck(&c, 7, label);
    }
    moe_config_init(&c, MOE_LAYER_TOPK); /* k = 1 */
    c.input_dim = 4, c.hidden_dim = 6, c.num_experts = 5, c.top_k = 1, c.activation = MOE_ACT_GELU, c.seed = 31;
    gradcheck(&c, 8, "topk gelu K=1 D=4 H=6 E=5 T=8");
    moe_config_init(&c, MOE_LAYER_TOPK); /* k = E */
    c.input_dim = 4, c.hidden_dim = 3, c.num_experts = 3, c.top_k = 3, c.activation = MOE_ACT_SILU, c.seed = 41;
    gradcheck(&c, 5, "topk silu K=E=3 D=4 H=3 T=5");
    moe_config_init(&c, MOE_LAYER_TOPK); /* one token, T < E */
    c.input_dim = 7, c.hidden_dim = 4, c.num_experts = 6, c.top_k = 2, c.expert = MOE_EXPERT_SWIGLU, c.seed = 51;
    gradcheck(&c, 1, "topk swiglu T=1 < E=6 D=7 H=4 K=2");

    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 5, c.output_dim = 3, c.num_experts = 4, c.seed = 61;
    gradcheck(&c, 6, "dense D=5 O=3 E=4 T=6");
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 4, c.output_dim = 4, c.num_experts = 1, c.seed = 71;
    gradcheck(&c, 1, "dense D=O=4 E=1 T=1");

    /* gshard: policies all and threshold, capacity that drops tokens, B > 1, N < E */
    const moe_second_policy pols[] = {MOE_SECOND_ALL, MOE_SECOND_THRESHOLD, MOE_SECOND_NONE};
    for (int i = 0; i < 3; i++) {
        moe_config_init(&c, MOE_LAYER_GSHARD);
        c.input_dim = 6, c.hidden_dim = 5, c.num_experts = 4, c.seed = 81 + (uint64_t)i;
        c.second_policy_train = pols[i], c.activation = acts[i];
        c.capacity_factor_train = i == 0 ? 0.5 : 1.25; /* capacity 4 of 12: drops */
        c.loss_coef = 3.0; /* large enough that the balance loss's gradient is tested */
        char label[96];
        snprintf(label, sizeof label, "gshard %s %s B=2 N=12 D=6 H=5 E=4", moe_second_policy_name(pols[i]),
                 moe_activation_name(acts[i]));
        gradcheck_seq(&c, 2, 12, label);
    }
    moe_config_init(&c, MOE_LAYER_GSHARD); /* N < E */
    c.input_dim = 5, c.hidden_dim = 4, c.num_experts = 6, c.seed = 91, c.second_policy_train = MOE_SECOND_ALL;
    c.loss_coef = 3.0;
    gradcheck_seq(&c, 3, 3, "gshard all B=3 N=3 < E=6 D=5 H=4");
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 6, c.hidden_dim = 4, c.num_experts = 2, c.num_experts_inner = 3, c.seed = 101;
    c.second_policy_train = MOE_SECOND_ALL, c.loss_coef = 3.0;
    gradcheck_seq(&c, 2, 10, "hierarchical all (2,3) B=2 N=10 D=6 H=4");
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 5, c.hidden_dim = 3, c.num_experts = 3, c.num_experts_inner = 2, c.seed = 111;
    c.second_policy_train = MOE_SECOND_THRESHOLD, c.capacity_factor_train = 0.6, c.activation = MOE_ACT_GELU;
    c.loss_coef = 3.0;
    gradcheck_seq(&c, 2, 16, "hierarchical threshold gelu (3,2) cf=0.6 B=2 N=16");

    soft_cases();
    router_cases();
    eval_cases();

    printf("probes %d, skipped for a routing change %d\n", probes, skipped);
    CHECK(skipped * 10 <= probes, "too many probes changed the routing: %d of %d", skipped, probes);
    return check_summary("test_gradcheck");
}
