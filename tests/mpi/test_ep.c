/*
 * Expert parallelism over MPI against one process. Run under mpirun with
 * P = 1, 2 or 4 ranks (tests/run.sh does all three). Every rank also builds
 * the one-process layer of the same config and feeds it the whole batch
 * (every rank's groups in rank order), so each rank can compare its share:
 *   y, aux_loss (weighted over the ranks' groups), stats, dx, every expert
 *   gradient on its owner, every replicated gradient after
 *   moe_layer_allreduce_grads; within rtol 1e-5, atol 1e-6.
 * Cases: topk with each router recipe (capacity and dropless, shared experts
 * gated or not, selection bias with its global update, group limits,
 * runtime masks and forcing, expert choice), gshard (policies all and
 * threshold, capacity drops), a router sending every token to rank 0's
 * experts, a rank with no tokens, uneven groups per rank, eval mode; dense
 * (O != D, eval, ranks without tokens); hierarchical (policies all,
 * threshold and random, eval, capacity drops, ranks without tokens, uneven
 * groups, other Eo/Ei/N); each rank's aux and daux are its own groups' (one
 * process on those groups alone, hierarchical and gshard); errors: E not
 * divisible by P (hierarchical: Eo), hierarchical ranks with different N,
 * NaN in one rank's x, a bad shape on one rank (every rank gets the error,
 * none hangs); save on P ranks -> load in one process
 * and on P ranks (the file is the one-process file); run-to-run bit
 * identity; the pairwise fallback of the exchange (tiny pieces) gives the
 * same bits as MPI_Alltoallv.
 * Prints "test_ep (P ranks): N passed, N failed" on rank 0 (failures summed
 * over the ranks).
 * Dimension key: P ranks, B groups of N tokens, D model dim, E experts.
 */
#include "check.h"
#include "moe.h"
#include "moe_mpi.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern int64_t moe__mpi_piece; /* src/dist/mpi.c: the largest count of one MPI call */

static int rank, P;
static unsigned long long g_rng = 77;

static float *randv(int64_t n, float s) {
    float *v = malloc((size_t)(n > 0 ? n : 1) * sizeof *v);
    for (int64_t i = 0; i < n; i++) v[i] = s * check_nrand(&g_rng);
    return v;
}

static float *zeros(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

static int close_enough(const float *a, const float *b, int64_t n, double *worst) {
    int ok = 1;
    *worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > *worst) *worst = d;
        if (d > 1e-6 + 1e-5 * fabs((double)b[i])) ok = 0;
    }
    return ok;
}

typedef struct {
    const char *label;
    moe_config cfg;
    const int *groups;   /* (P) groups per rank, NULL: 2 each */
    int64_t N;
    int train;
    uint8_t force[16];   /* forced experts (topk), all 0: none */
    uint8_t mask[16];    /* disabled experts (topk) */
    int use_routing;
} ep_case;

/* One case: EP layer vs the one-process layer, forward and backward. */
static void run_case(const ep_case *k) {
    const moe_config *c = &k->cfg;
    int64_t N = k->N, D = c->input_dim, O = c->type == MOE_LAYER_DENSE ? c->output_dim : D;
    int G = 0, g0 = 0, Gr = k->groups ? k->groups[rank] : 2;
    for (int p = 0; p < P; p++) {
        int gp = k->groups ? k->groups[p] : 2;
        if (p < rank) g0 += gp;
        G += gp;
    }
    moe_layer *ep = NULL, *one = NULL;
    CHECK_STATUS(moe_layer_create_mpi(&ep, c, MPI_COMM_WORLD), MOE_OK);
    CHECK_STATUS(moe_layer_create(&one, c), MOE_OK);
    if (!ep || !one) {
        moe_layer_free(ep), moe_layer_free(one);
        return;
    }
    if (k->use_routing) {
        uint8_t en[16];
        for (int e = 0; e < c->num_experts; e++) en[e] = !k->mask[e];
        CHECK_STATUS(moe_layer_set_routing(ep, 0, en, k->force), MOE_OK);
        CHECK_STATUS(moe_layer_set_routing(one, 0, en, k->force), MOE_OK);
    }
    for (int i = 0; i < moe_layer_num_buffers(one); i++) { /* a selection bias away from 0 */
        moe_param *b1 = moe_layer_buffer(one, i), *b2 = moe_layer_buffer(ep, i);
        for (int64_t j = 0; j < b1->numel; j++) b1->data[j] = b2->data[j] = 0.01f * (float)((j * 7) % 5);
    }
    /* the whole batch, the same on every rank (same seed) */
    int64_t T = (int64_t)G * N, Tr = (int64_t)Gr * N, o0 = (int64_t)g0 * N;
    float *x = randv(T * D, 1), *dy = randv(T * O, 1), *y1 = zeros(T * O), *dx1 = zeros(T * D);
    float *yr = zeros(Tr * O), *dxr = zeros(Tr * D), aux1 = 0, auxr = 0;
    int mode = k->train ? MOE_TRAIN : MOE_EVAL;
    CHECK_STATUS(moe_layer_forward_seq(one, y1, &aux1, x, G, N, mode), MOE_OK);
    CHECK_STATUS(moe_layer_forward_seq(ep, yr, &auxr, x + o0 * D, Gr, N, mode), MOE_OK);
    double worst;
    CHECK(close_enough(yr, y1 + o0 * O, Tr * O, &worst), "%s: y differs from one process (max %g)", k->label, worst);
    /* aux: one process averages over all G groups, each rank over its own */
    double wsum = (double)auxr * Gr;
    MPI_Allreduce(MPI_IN_PLACE, &wsum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    CHECK(fabs(wsum / G - aux1) <= 1e-6 + 1e-5 * fabs(aux1), "%s: aux %g vs one process %g", k->label, wsum / G,
          (double)aux1);
    moe_stats s1, sr;
    moe_layer_stats(one, &s1), moe_layer_stats(ep, &sr);
    int64_t cnt[64] = {0}, sums[5] = {sr.dropped, sr.assignments, sr.second_candidates, sr.second_kept, sr.tokens};
    for (int e = 0; e < sr.n_experts && e < 64; e++) cnt[e] = sr.expert_counts[e];
    MPI_Allreduce(MPI_IN_PLACE, cnt, 64, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, sums, 5, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    int same = sums[0] == s1.dropped && sums[1] == s1.assignments && sums[2] == s1.second_candidates &&
               sums[3] == s1.second_kept && sums[4] == s1.tokens && sr.n_experts == s1.n_experts;
    for (int e = 0; e < s1.n_experts && e < 64; e++) same &= cnt[e] == s1.expert_counts[e];
    CHECK(same, "%s: expert counts / dropped / assignments / second choices summed over ranks differ from one "
          "process", k->label);
    /* backward of the global loss: dy as is, daux scaled by this rank's share of groups */
    moe_layer_zero_grad(one), moe_layer_zero_grad(ep);
    CHECK_STATUS(moe_layer_backward(one, dx1, dy, 0.7f), MOE_OK);
    CHECK_STATUS(moe_layer_backward(ep, dxr, dy + o0 * O, 0.7f * (float)Gr / (float)G), MOE_OK);
    CHECK_STATUS(moe_layer_allreduce_grads(ep), MOE_OK);
    CHECK(close_enough(dxr, dx1 + o0 * D, Tr * D, &worst), "%s: dx differs (max %g)", k->label, worst);
    for (int i = 0; i < moe_layer_num_params(ep); i++) {
        moe_param *p = moe_layer_param(ep, i), *q = moe_layer_find_param(one, p->name);
        CHECK(q != NULL, "%s: one process has no '%s'", k->label, p->name);
        if (!q) continue;
        /* gshard: this rank's slice of the (E, ...) tensor */
        int first = 0;
        moe_layer_ep_info(ep, NULL, NULL, &first, NULL);
        int64_t off = q->numel != p->numel ? (q->numel / q->shape[0]) * first : 0;
        CHECK(close_enough(p->data, q->data + off, p->numel, &worst), "%s: '%s' values differ at init", k->label,
              p->name);
        CHECK(close_enough(p->grad, q->grad + off, p->numel, &worst), "%s: grad '%s' differs (max %g, %s)", k->label,
              p->name, worst, moe_layer_param_is_expert(ep, i) ? "expert" : "replicated");
    }
    /* run to run: the same bits */
    float *y2 = zeros(Tr * O), aux2 = 0;
    moe_layer_set_rng_position(ep, moe_layer_rng_position(ep) - 1);
    CHECK_STATUS(moe_layer_forward_seq(ep, y2, &aux2, x + o0 * D, Gr, N, mode), MOE_OK);
    CHECK(memcmp(y2, yr, (size_t)(Tr * O) * sizeof *yr) == 0 && aux2 == auxr, "%s: not bit-identical run to run",
          k->label);
    /* the pairwise fallback of the exchange: the same bits */
    moe__mpi_piece = 3;
    moe_layer_set_rng_position(ep, moe_layer_rng_position(ep) - 1);
    CHECK_STATUS(moe_layer_forward_seq(ep, y2, &aux2, x + o0 * D, Gr, N, mode), MOE_OK);
    moe__mpi_piece = 2147483647;
    CHECK(memcmp(y2, yr, (size_t)(Tr * O) * sizeof *yr) == 0 && aux2 == auxr, "%s: the pieced exchange changes y",
          k->label);
    /* the selection bias: updated from the global loads, as one process does */
    if (c->expert_bias && k->train) {
        moe_layer_set_rng_position(ep, moe_layer_rng_position(ep) - 1);
        CHECK_STATUS(moe_layer_forward_seq(ep, y2, &aux2, x + o0 * D, Gr, N, mode), MOE_OK);
        CHECK_STATUS(moe_layer_update_bias(one), MOE_OK);
        CHECK_STATUS(moe_layer_update_bias(ep), MOE_OK);
        /* the EP layer counted two forwards' loads (the run-to-run one too), one process one: same signs */
        moe_param *b1 = moe_layer_buffer(one, 0), *b2 = moe_layer_buffer(ep, 0);
        CHECK(memcmp(b1->data, b2->data, (size_t)b1->numel * sizeof(float)) == 0,
              "%s: the selection bias update differs from one process", k->label);
    }
    if (rank == 0) printf("ep %-44s P=%d ok so far\n", k->label, P);
    moe_layer_free(ep), moe_layer_free(one);
    free(x), free(dy), free(y1), free(dx1), free(yr), free(dxr), free(y2);
}

/* aux_loss of a rank is the one-process aux of its groups alone, and its
 * daux weighs exactly those: with dy = 0 and daux on rank q only, every
 * gradient equals one process's on rank q's groups with that daux. For the
 * hierarchical layer the inner losses are computed on the owners of the
 * outer experts, so this checks they come back to the right ranks and that
 * each rank's daux reaches the owners. (A policy without random draws: one
 * process on a part of the batch numbers its groups from 0.) */
static void aux_per_rank(const char *label, const moe_config *c, const int *groups, int64_t N) {
    int64_t D = c->input_dim, G = 0, g0 = 0;
    for (int p = 0; p < P; p++) {
        if (p < rank) g0 += groups[p];
        G += groups[p];
    }
    moe_layer *ep = NULL;
    CHECK_STATUS(moe_layer_create_mpi(&ep, c, MPI_COMM_WORLD), MOE_OK);
    if (!ep) return;
    float *x = randv(G * N * D, 1), *dy0 = zeros(G * N * D), *y = zeros(G * N * D), auxr = 0, aux1 = 0;
    CHECK_STATUS(moe_layer_forward_seq(ep, y, &auxr, x + g0 * N * D, groups[rank], N, MOE_TRAIN), MOE_OK);
    for (int q = 0, o = 0; q < P; o += groups[q], q++) {
        if (groups[q] == 0) continue;
        moe_layer *one = NULL;
        CHECK_STATUS(moe_layer_create(&one, c), MOE_OK);
        if (!one) break;
        CHECK_STATUS(moe_layer_forward_seq(one, y, &aux1, x + (int64_t)o * N * D, groups[q], N, MOE_TRAIN), MOE_OK);
        if (rank == q)
            CHECK(fabs(auxr - aux1) <= 1e-6 + 1e-5 * fabs(aux1), "%s: rank %d's aux %g vs one process on its groups %g",
                  label, q, (double)auxr, (double)aux1);
        moe_layer_zero_grad(one), moe_layer_zero_grad(ep);
        CHECK_STATUS(moe_layer_backward(one, NULL, dy0, 0.9f), MOE_OK);
        CHECK_STATUS(moe_layer_backward(ep, NULL, dy0, rank == q ? 0.9f : 0.0f), MOE_OK);
        CHECK_STATUS(moe_layer_allreduce_grads(ep), MOE_OK);
        int first = 0;
        moe_layer_ep_info(ep, NULL, NULL, &first, NULL);
        double worst;
        for (int i = 0; i < moe_layer_num_params(ep); i++) {
            moe_param *pe = moe_layer_param(ep, i), *p1 = moe_layer_find_param(one, pe->name);
            int64_t off = p1->numel != pe->numel ? (p1->numel / p1->shape[0]) * first : 0;
            CHECK(close_enough(pe->grad, p1->grad + off, pe->numel, &worst), "%s: daux on rank %d: grad '%s' (max %g)",
                  label, q, pe->name, worst);
        }
        moe_layer_free(one);
    }
    if (rank == 0) printf("ep %-44s P=%d ok so far\n", label, P);
    moe_layer_free(ep);
    free(x), free(dy0), free(y);
}

static moe_config topk_cfg(const char *recipe, int E, int K) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 12, c.hidden_dim = 10, c.num_experts = E, c.top_k = K, c.seed = 3;
    if (recipe) moe_config_set_router(&c, recipe);
    return c;
}

static void cases(void) {
    static const int skew[4] = {3, 0, 1, 2}, zero_last[4] = {2, 2, 2, 0}, uneven[4] = {3, 1, 2, 1};
    int one_rank[4] = {2, 0, 0, 0};
    ep_case k;
    memset(&k, 0, sizeof k);
    k.N = 7, k.train = 1;
    k.label = "topk (seed 004)", k.cfg = topk_cfg(NULL, 8, 2);
    run_case(&k);
    k.label = "topk swiglu, eval mode", k.cfg = topk_cfg(NULL, 8, 2), k.cfg.expert = MOE_EXPERT_SWIGLU, k.train = 0;
    run_case(&k);
    k.train = 1;
    k.label = "switch: capacity, jitter", k.cfg = topk_cfg("switch", 8, 1), k.cfg.capacity_factor_train = 0.8;
    run_case(&k);
    k.label = "mixtral", k.cfg = topk_cfg("mixtral", 8, 2), k.cfg.z_loss_coef = 1e-3;
    run_case(&k);
    k.label = "st_moe, capacity drops", k.cfg = topk_cfg("st_moe", 4, 2), k.cfg.capacity_factor_train = 0.5;
    run_case(&k);
    k.label = "deepseek_v3: bias, groups, shared gated", k.cfg = topk_cfg("deepseek_v3", 8, 2);
    k.cfg.num_groups = 4, k.cfg.topk_groups = 2, k.cfg.num_shared = 1, k.cfg.shared_gate = 1, k.cfg.balance_coef = 0.1;
    run_case(&k);
    k.label = "expert_choice + 2 shared", k.cfg = topk_cfg("expert_choice", 8, 2), k.cfg.num_shared = 2;
    run_case(&k);
    k.label = "mask 3, force 1", k.cfg = topk_cfg("mixtral", 8, 2), k.use_routing = 1, k.mask[3] = 1, k.force[1] = 1;
    run_case(&k);
    memset(k.mask, 0, sizeof k.mask), memset(k.force, 0, sizeof k.force);
    k.label = "every token to rank 0's experts", k.cfg = topk_cfg(NULL, 8, 2), k.force[0] = k.force[1] = 1;
    run_case(&k);
    memset(k.force, 0, sizeof k.force), k.use_routing = 0;
    k.label = "uneven groups per rank", k.cfg = topk_cfg("st_moe", 8, 2), k.groups = skew;
    if (P == 4) run_case(&k);
    k.label = "a rank with no tokens", k.cfg = topk_cfg("mixtral", 8, 2), k.groups = zero_last;
    if (P == 4) run_case(&k);
    k.label = "only rank 0 has tokens", k.cfg = topk_cfg("deepseek_v3", 8, 2), k.groups = one_rank;
    if (P > 1) run_case(&k);
    k.groups = NULL;
    moe_config g;
    moe_config_init(&g, MOE_LAYER_GSHARD);
    g.input_dim = 12, g.hidden_dim = 10, g.num_experts = 8, g.seed = 5, g.second_policy_train = MOE_SECOND_ALL;
    g.capacity_factor_train = 1.0;
    k.label = "gshard all, drops", k.cfg = g, k.N = 16;
    run_case(&k);
    g.second_policy_eval = MOE_SECOND_THRESHOLD, g.capacity_factor_eval = 1.5;
    k.label = "gshard threshold, eval", k.cfg = g, k.train = 0;
    run_case(&k);
    k.label = "gshard, a rank with no tokens", k.train = 1, k.groups = zero_last;
    if (P == 4) run_case(&k);
    k.groups = NULL;
    /* dense: every token through every expert, partial sums from every rank */
    moe_config d;
    moe_config_init(&d, MOE_LAYER_DENSE);
    d.input_dim = 12, d.output_dim = 9, d.num_experts = 8, d.seed = 7;
    k.label = "dense (O != D)", k.cfg = d, k.N = 7;
    run_case(&k);
    k.label = "dense, eval", k.train = 0;
    run_case(&k);
    k.label = "dense, a rank with no tokens", k.train = 1, k.groups = zero_last;
    if (P == 4) run_case(&k);
    k.label = "dense, only rank 0 has tokens", k.groups = one_rank;
    if (P > 1) run_case(&k);
    k.groups = NULL;
    /* hierarchical: sharded by outer expert, the inner level on the owner */
    moe_config h;
    moe_config_init(&h, MOE_LAYER_HIERARCHICAL);
    h.input_dim = 12, h.hidden_dim = 10, h.num_experts = 4, h.num_experts_inner = 3, h.seed = 9;
    h.second_policy_train = MOE_SECOND_ALL;
    k.label = "hierarchical all", k.cfg = h, k.N = 32;
    run_case(&k);
    h.second_policy_train = MOE_SECOND_THRESHOLD, h.second_threshold_train = 0.3;
    k.label = "hierarchical threshold", k.cfg = h;
    run_case(&k);
    h.second_policy_train = MOE_SECOND_RANDOM;
    k.label = "hierarchical random (train)", k.cfg = h;
    run_case(&k);
    k.label = "hierarchical random, eval", k.cfg = h, k.train = 0;
    run_case(&k);
    k.train = 1;
    h.second_policy_train = MOE_SECOND_ALL, h.capacity_factor_train = 0.5;
    k.label = "hierarchical all, capacity drops", k.cfg = h;
    run_case(&k);
    h.second_policy_train = MOE_SECOND_RANDOM, h.capacity_factor_train = 1.25;
    k.label = "hierarchical, a rank with no tokens", k.cfg = h, k.groups = zero_last;
    if (P == 4) run_case(&k);
    k.label = "hierarchical, uneven groups per rank", k.groups = uneven;
    if (P > 1) run_case(&k);
    k.label = "hierarchical, skewed groups, one rank without", k.groups = skew;
    if (P == 4) run_case(&k);
    k.label = "hierarchical, only rank 0 has tokens", k.groups = one_rank;
    if (P > 1) run_case(&k);
    k.groups = NULL;
    h.num_experts = 8, h.num_experts_inner = 2, h.input_dim = 8, h.hidden_dim = 6;
    k.label = "hierarchical Eo=8 Ei=2, N=5", k.cfg = h, k.N = 5;
    run_case(&k);
    /* the aux of each rank: its own groups' */
    static const int per_rank[4] = {2, 1, 3, 2};
    h.num_experts = 4, h.num_experts_inner = 3, h.input_dim = 12, h.hidden_dim = 10;
    h.second_policy_train = MOE_SECOND_ALL, h.capacity_factor_train = 1.0;
    aux_per_rank("hierarchical: aux per rank, daux per rank", &h, per_rank, 16);
    g.second_policy_train = MOE_SECOND_THRESHOLD;
    aux_per_rank("gshard: aux per rank, daux per rank", &g, per_rank, 16);
}

/* Experts' weights that overflow float32: y is Inf on every rank (the rows
 * go through every rank's experts), the error names the intermediate. */
static void overflow(moe_layer *l, const char *label, const float *x, float *y) {
    for (int i = 0; i < moe_layer_num_params(l); i++)
        if (moe_layer_param_is_expert(l, i) && strncmp(moe_layer_param(l, i)->name, "experts.", 8) == 0) {
            moe_param *p = moe_layer_param(l, i);
            for (int64_t j = 0; j < p->numel; j++) p->data[j] = 3e38f;
        }
    moe_status st = moe_layer_forward_seq(l, y, NULL, x, 1, 5, MOE_TRAIN);
    CHECK(st == MOE_ERR_NONFINITE && strstr(moe_last_error(), "although the input x"),
          "%s, overflowing experts: %s: %s", label, moe_status_str(st), moe_last_error());
}

/* Errors reach every rank; nobody waits in a collective. */
static void errors(void) {
    moe_config c = topk_cfg(NULL, 5, 2);
    moe_layer *l = NULL;
    moe_status st = moe_layer_create_mpi(&l, &c, MPI_COMM_WORLD);
    if (P > 1) {
        CHECK(st == MOE_ERR_ARG && strstr(moe_last_error(), "not divisible by the"), "E=5 on %d ranks: %s: %s", P,
              moe_status_str(st), moe_last_error());
    } else {
        CHECK_STATUS(st, MOE_OK);
    }
    moe_layer_free(l);
    c = topk_cfg("mixtral", 8, 2);
    CHECK_STATUS(moe_layer_create_mpi(&l, &c, MPI_COMM_WORLD), MOE_OK);
    int64_t N = 5, D = c.input_dim;
    float *x = randv(2 * N * D, 1), *y = zeros(2 * N * D), *dy = randv(2 * N * D, 1), *dx = zeros(2 * N * D);
    int bad = P > 1 ? 1 : 0;
    if (rank == bad) x[3] = NAN;
    st = moe_layer_forward_seq(l, y, NULL, x, 2, N, MOE_TRAIN);
    CHECK(st == MOE_ERR_NONFINITE, "NaN on rank %d: got %s", bad, moe_status_str(st));
    if (rank != bad) {
        char want[32];
        snprintf(want, sizeof want, "rank %d: x[0][3] is NaN", bad);
        CHECK(strstr(moe_last_error(), want) != NULL, "message on rank %d: %s", rank, moe_last_error());
    }
    x[3] = 0.5f;
    /* a bad shape on one rank: B = -1 */
    st = moe_layer_forward_seq(l, y, NULL, x, rank == bad ? -1 : 2, N, MOE_TRAIN);
    CHECK(st == MOE_ERR_ARG, "bad shape on rank %d: got %s", bad, moe_status_str(st));
    /* after the errors the layer works, and a NaN dy on one rank fails the backward everywhere */
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 2, N, MOE_TRAIN), MOE_OK);
    if (rank == bad) dy[7] = INFINITY;
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_ERR_NONFINITE);
    dy[7] = 0.1f;
    CHECK_STATUS(moe_layer_backward(l, dx, dy, 1.0f), MOE_OK);
    moe_layer_free(l);
    /* layers that stay in one process */
    moe_config s;
    moe_config_init(&s, MOE_LAYER_SOFT_DYNAMIC);
    CHECK_STATUS(moe_layer_create_mpi(&l, &s, MPI_COMM_WORLD), MOE_ERR_UNSUPPORTED);
    moe_config_init(&s, MOE_LAYER_SOFT);
    CHECK_STATUS(moe_layer_create_mpi(&l, &s, MPI_COMM_WORLD), MOE_ERR_UNSUPPORTED);
    /* hierarchical: the outer experts are sharded, so P must divide Eo */
    moe_config h;
    moe_config_init(&h, MOE_LAYER_HIERARCHICAL);
    h.num_experts = 3, h.num_experts_inner = 4, h.input_dim = 8;
    st = moe_layer_create_mpi(&l, &h, MPI_COMM_WORLD);
    if (P > 1) {
        CHECK(st == MOE_ERR_ARG && strstr(moe_last_error(), "Eo = 3") &&
                  strstr(moe_last_error(), "not divisible by the"),
              "hierarchical Eo=3 on %d ranks: %s: %s", P, moe_status_str(st), moe_last_error());
    } else {
        CHECK_STATUS(st, MOE_OK);
    }
    moe_layer_free(l);
    l = NULL;
    /* hierarchical: ranks with different N fail alike */
    h.num_experts = 4;
    CHECK_STATUS(moe_layer_create_mpi(&l, &h, MPI_COMM_WORLD), MOE_OK);
    int64_t Nr = P > 1 && rank == 1 ? 4 : 5;
    st = moe_layer_forward_seq(l, y, NULL, x, 1, Nr, MOE_TRAIN);
    if (P > 1) {
        CHECK(st == MOE_ERR_ARG && strstr(moe_last_error(), "same number of tokens"), "hierarchical, N differs: %s: %s",
              moe_status_str(st), moe_last_error());
    } else {
        CHECK_STATUS(st, MOE_OK);
    }
    CHECK_STATUS(moe_layer_forward_seq(l, y, NULL, x, 1, 5, MOE_TRAIN), MOE_OK);
    overflow(l, "hierarchical", x, y);
    moe_layer_free(l);
    moe_config d;
    moe_config_init(&d, MOE_LAYER_DENSE);
    d.input_dim = 8, d.output_dim = 8, d.num_experts = 4;
    CHECK_STATUS(moe_layer_create_mpi(&l, &d, MPI_COMM_WORLD), MOE_OK);
    overflow(l, "dense", x, y);
    moe_layer_free(l);
    free(x), free(y), free(dy), free(dx);
}

/* Save on P ranks: the one-process file; load it in one process and on P ranks. */
static void save_load(moe_config c) {
    moe_layer *ep = NULL, *ep2 = NULL, *one = NULL;
    CHECK_STATUS(moe_layer_create_mpi(&ep, &c, MPI_COMM_WORLD), MOE_OK);
    if (!ep) return;
    int nb = moe_layer_num_buffers(ep);
    /* make every parameter differ from init, and the bias */
    for (int i = 0; i < moe_layer_num_params(ep); i++) {
        moe_param *p = moe_layer_param(ep, i);
        for (int64_t j = 0; j < p->numel; j++) p->data[j] += 0.001f * (float)(j % 13);
    }
    if (nb) moe_layer_buffer(ep, 0)->data[2] = 0.25f;
    char path[64] = "/tmp/moe_test_ep.safetensors";
    MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
    CHECK_STATUS(moe_layer_save(ep, path), MOE_OK);
    moe_config c2 = c;
    c2.seed = 99; /* other init: the load must overwrite everything */
    CHECK_STATUS(moe_layer_create(&one, &c2), MOE_OK);
    CHECK_STATUS(moe_layer_load(one, path), MOE_OK);
    CHECK_STATUS(moe_layer_create_mpi(&ep2, &c2, MPI_COMM_WORLD), MOE_OK);
    CHECK_STATUS(moe_layer_load(ep2, path), MOE_OK);
    int first = 0;
    moe_layer_ep_info(ep, NULL, NULL, &first, NULL);
    for (int i = 0; i < moe_layer_num_params(ep); i++) {
        moe_param *p = moe_layer_param(ep, i), *q = moe_layer_find_param(one, p->name), *r = moe_layer_param(ep2, i);
        int64_t off = q && q->numel != p->numel ? (q->numel / q->shape[0]) * first : 0; /* a slice */
        CHECK(q && memcmp(p->data, q->data + off, (size_t)p->numel * 4) == 0, "'%s' after save (P=%d) and load (P=1)",
              p->name, P);
        CHECK(memcmp(p->data, r->data, (size_t)p->numel * 4) == 0, "'%s' after save and load on P=%d", p->name, P);
    }
    CHECK(!nb || moe_layer_buffer(one, 0)->data[2] == 0.25f, "the bias buffer in the file");
    moe_layer_free(ep), moe_layer_free(ep2), moe_layer_free(one);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) unlink(path);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &P);
    moe_set_num_threads(1);
    cases();
    errors();
    moe_config c = topk_cfg("deepseek_v3", 8, 2);
    c.num_shared = 1;
    save_load(c);
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 6, c.output_dim = 5, c.num_experts = 4;
    save_load(c);
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 6, c.hidden_dim = 5, c.num_experts = 4, c.num_experts_inner = 3;
    save_load(c);
    int counts[2] = {check_pass_, check_fail_};
    MPI_Allreduce(MPI_IN_PLACE, counts, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("test_ep (%d ranks): %d passed, %d failed\n", P, counts[0], counts[1]);
    MPI_Finalize();
    return counts[1] ? 1 : 0;
}
