/*
 * Allocation-failure injection: for every N, the N-th allocation of a call
 * (moe_alloc, moe_calloc and cJSON's) fails. Each call must then return an
 * error status with a message, free what it took (the ASan build checks for
 * leaks), and leave the layer usable: the same call without the fault gives
 * the same bits as a layer that never saw one, and a failed load or save
 * leaves the parameters and the file on disk as they were.
 * Covers layer create, forward (train and eval, masked, image), backward,
 * optimizer create and step, load, save and config parsing, for every layer
 * type and the router options.
 * Dimension key: B groups of N tokens, D model dim, E experts.
 */
#include "check.h"
#include "internal.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int faults_total;

typedef struct {
    const char *label;
    moe_config c;
    int64_t B, N;
    int mask, image; /* soft layers: a token mask; image input (B, D, 2, N/2) */
} scenario;

static void fill(float *v, int64_t n, unsigned long long seed) {
    for (int64_t i = 0; i < n; i++) v[i] = check_nrand(&seed);
}

static moe_status fwd(moe_layer *l, const scenario *s, float *y, float *aux, const float *x, const uint8_t *m,
                      int train) {
    if (s->image) return moe_layer_forward_image(l, y, aux, x, s->mask ? m : NULL, s->B, 2, s->N / 2, train);
    return moe_layer_forward_masked(l, y, aux, x, s->mask ? m : NULL, s->B, s->N, train);
}

/* A call whose allocation failed: it must report an error, with a message. */
static void count_fault(moe_status st, int64_t *calls, int *bad, int *silent) {
    (*calls)++;
    *bad += st == MOE_OK;
    *silent += moe_last_error()[0] == '\0';
}

/* One failing call per N until a call makes fewer than N+1 allocations. */
#define FOR_EACH_FAULT(n) for (int64_t n = 0, more = 1; more && n < 10000; n++)

static void forward_backward(const scenario *s) {
    int64_t T = s->B * s->N;
    moe_layer *ref = NULL;
    CHECK_STATUS(moe_layer_create(&ref, &s->c), MOE_OK);
    if (!ref) return;
    int64_t D = moe_layer_input_dim(ref), O = moe_layer_output_dim(ref);
    float *x = malloc((size_t)(T * D) * sizeof *x), *y0 = malloc((size_t)(T * O) * sizeof *y0);
    float *y = malloc((size_t)(T * O) * sizeof *y), *dy = malloc((size_t)(T * O) * sizeof *dy);
    float *dx0 = malloc((size_t)(T * D) * sizeof *dx0), *dx = malloc((size_t)(T * D) * sizeof *dx);
    uint8_t *m = malloc((size_t)T);
    fill(x, T * D, 1), fill(dy, T * O, 2);
    for (int64_t i = 0; i < T; i++) m[i] = (uint8_t)(i % 3 != 1);
    float a0 = 0, a = 0;
    CHECK_STATUS(fwd(ref, s, y0, &a0, x, m, 1), MOE_OK);
    CHECK_STATUS(moe_layer_backward(ref, dx0, dy, 0.5f), MOE_OK);
    int bad = 0, silent = 0, unusable = 0;
    int64_t calls = 0;
    /* forward (train) on a fresh layer, then backward */
    FOR_EACH_FAULT(n) {
        moe_layer *l = NULL;
        if (moe_layer_create(&l, &s->c) != MOE_OK) {
            bad++;
            break;
        }
        moe__fault_alloc(n);
        moe_status st = fwd(l, s, y, &a, x, m, 1);
        more = moe__alloc_count() > n;
        if (st == MOE_OK) st = moe_layer_backward(l, dx, dy, 0.5f);
        more = more || moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) {
            count_fault(st, &calls, &bad, &silent);
            /* usable: the same call again gives the bits of the layer that never failed */
            moe_status s2 = fwd(l, s, y, &a, x, m, 1);
            if (s2 == MOE_OK) s2 = moe_layer_backward(l, dx, dy, 0.5f);
            unusable += s2 != MOE_OK || memcmp(y, y0, (size_t)(T * O) * sizeof *y) != 0 ||
                        memcmp(dx, dx0, (size_t)(T * D) * sizeof *dx) != 0 || a != a0;
        }
        moe_layer_free(l);
    }
    CHECK(bad == 0 && silent == 0 && unusable == 0,
          "%s forward/backward: %lld faults: %d not reported, %d without a message, %d left it unusable", s->label,
          (long long)calls, bad, silent, unusable);
    faults_total += (int)calls;
    free(x), free(y0), free(y), free(dy), free(dx0), free(dx), free(m);
    moe_layer_free(ref);
}

static void create_optim_io(const scenario *s) {
    int bad = 0, silent = 0;
    int64_t calls = 0;
    FOR_EACH_FAULT(n) { /* layer create */
        moe_layer *l = (moe_layer *)1;
        moe__fault_alloc(n);
        moe_status st = moe_layer_create(&l, &s->c);
        more = moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) {
            count_fault(st, &calls, &bad, &silent);
            bad += st != MOE_OK && l != NULL; /* *out is NULL on failure */
        }
        if (st == MOE_OK) moe_layer_free(l);
    }
    moe_layer *l = NULL;
    CHECK_STATUS(moe_layer_create(&l, &s->c), MOE_OK);
    if (!l) return;
    int np = moe_layer_num_params(l);
    FOR_EACH_FAULT(n) { /* optimizer create and a step */
        moe_optim_config oc;
        moe_optim_config_init(&oc, MOE_OPTIM_ADAMW);
        moe_optim *o = NULL;
        moe__fault_alloc(n);
        moe_status st = moe_optim_create(&o, &oc, moe_layer_param(l, 0), np);
        if (st == MOE_OK) st = moe_optim_step(o);
        more = moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) {
            count_fault(st, &calls, &bad, &silent);
        }
        moe_optim_free(o);
    }
    /* save: a failure leaves the file that was there; load: the parameters */
    char path[64], other[64];
    snprintf(path, sizeof path, "build/test_faults_%d.safetensors", (int)getpid());
    snprintf(other, sizeof other, "build/test_faults_%d_b.safetensors", (int)getpid());
    CHECK_STATUS(moe_layer_save(l, other), MOE_OK); /* a different layer's weights to load */
    moe_layer_init_params(l, 99);
    CHECK_STATUS(moe_layer_save(l, path), MOE_OK);
    int64_t nw = moe_layer_num_weights(l);
    float *before = malloc((size_t)nw * sizeof *before);
    memcpy(before, moe_layer_param(l, 0)->data, (size_t)nw * sizeof *before);
    int changed = 0;
    FOR_EACH_FAULT(n) {
        moe__fault_alloc(n);
        moe_status st = moe_layer_load(l, other);
        more = moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) {
            count_fault(st, &calls, &bad, &silent);
            changed += memcmp(before, moe_layer_param(l, 0)->data, (size_t)nw * sizeof *before) != 0;
        }
        if (st == MOE_OK) memcpy(moe_layer_param(l, 0)->data, before, (size_t)nw * sizeof *before);
    }
    moe_layer_init_params(l, 7); /* other values than the file at path holds */
    FOR_EACH_FAULT(n) {
        moe__fault_alloc(n);
        moe_status st = moe_layer_save(l, path);
        more = moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) {
            count_fault(st, &calls, &bad, &silent);
            moe_layer *chk = NULL; /* the old file is intact: it loads and holds the old values */
            moe_layer_create(&chk, &s->c);
            changed += moe_layer_load(chk, path) != MOE_OK ||
                       memcmp(before, moe_layer_param(chk, 0)->data, (size_t)nw * sizeof *before) != 0;
            moe_layer_free(chk);
        } else {
            CHECK_STATUS(st, MOE_OK);
        }
    }
    CHECK(bad == 0 && silent == 0 && changed == 0,
          "%s create/optim/load/save: %lld faults: %d not reported, %d without a message, %d changed the "
          "parameters or the file", s->label, (long long)calls, bad, silent, changed);
    faults_total += (int)calls;
    char tmpname[96];
    snprintf(tmpname, sizeof tmpname, "%s.tmp.%d", path, (int)getpid());
    CHECK(access(tmpname, F_OK) != 0, "%s: a failed save left its temp file", s->label);
    remove(path), remove(other);
    free(before);
    moe_layer_free(l);
}

static void config_json(void) {
    const char *js = "{\"type\": \"topk\", \"num_experts\": 8, \"router\": \"deepseek_v3\", \"num_groups\": 4, "
                     "\"topk_groups\": 2, \"num_shared_experts\": 1}";
    int bad = 0, calls = 0;
    FOR_EACH_FAULT(n) {
        moe_config c;
        moe__fault_alloc(n);
        moe_status st = moe_config_from_json(&c, js);
        more = moe__alloc_count() > n;
        moe__fault_alloc(-1);
        if (more) calls++, bad += st == MOE_OK || moe_last_error()[0] == '\0';
    }
    CHECK(bad == 0 && calls > 0, "config JSON: %d of %d faults not reported", bad, calls);
    faults_total += calls;
}

int main(void) {
    moe_set_num_threads(2);
    scenario sc[8];
    int n = 0;
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 8, c.hidden_dim = 6, c.num_experts = 4;
    sc[n++] = (scenario){"topk", c, 1, 12, 0, 0};
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 8, c.hidden_dim = 6, c.num_experts = 8, c.top_k = 3, c.expert = MOE_EXPERT_SWIGLU;
    moe_config_set_router(&c, "deepseek_v3");
    c.num_groups = 4, c.topk_groups = 2, c.num_shared = 1, c.shared_gate = 1, c.capacity_factor_train = 1.0;
    sc[n++] = (scenario){"topk deepseek_v3+shared+capacity", c, 2, 10, 0, 0};
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = 8, c.hidden_dim = 6, c.num_experts = 4;
    moe_config_set_router(&c, "expert_choice");
    sc[n++] = (scenario){"topk expert_choice", c, 2, 8, 0, 0};
    moe_config_init(&c, MOE_LAYER_DENSE);
    c.input_dim = 6, c.output_dim = 5, c.num_experts = 3;
    sc[n++] = (scenario){"dense", c, 1, 7, 0, 0};
    moe_config_init(&c, MOE_LAYER_GSHARD);
    c.input_dim = 8, c.hidden_dim = 6, c.num_experts = 4;
    sc[n++] = (scenario){"gshard", c, 2, 12, 0, 0};
    moe_config_init(&c, MOE_LAYER_HIERARCHICAL);
    c.input_dim = 8, c.hidden_dim = 6, c.num_experts = 2, c.num_experts_inner = 2;
    sc[n++] = (scenario){"hierarchical", c, 2, 12, 0, 0};
    moe_config_init(&c, MOE_LAYER_SOFT_DYNAMIC);
    c.input_dim = 8, c.num_experts = 3, c.expert_mult = 1, c.dropout = 0.2f;
    sc[n++] = (scenario){"soft_dynamic masked", c, 2, 7, 1, 0};
    moe_config_init(&c, MOE_LAYER_SOFT);
    c.input_dim = 8, c.num_experts = 2, c.slots_per_expert = 2, c.expert_mult = 1;
    sc[n++] = (scenario){"soft image", c, 2, 6, 0, 1};
    for (int i = 0; i < n; i++) {
        forward_backward(&sc[i]);
        create_optim_io(&sc[i]);
    }
    config_json();
    printf("faults injected: %d\n", faults_total);
    CHECK(faults_total > 100, "only %d faults were injected", faults_total);
    return check_summary("test_faults");
}
