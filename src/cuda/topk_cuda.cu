/*
 * The `topk` layer on one CUDA GPU, fp32, forward and backward (moe_cuda.h).
 * src/cuda is the only place in libmoe with CUDA code. The same definitions as the CPU
 * layer (src/layers/topk.c, router.c, src/bank/bank.c, src/ops/route.c, act.c); the
 * kernels are in topk_kernels.cu, each naming the CPU function it mirrors;
 * this file is the host side: the layer, its parameters, workspace and stages.
 *
 * Dimension key: T tokens, D model dim, H expert hidden dim, H2 = H (MLP) or
 * 2H (GLU), E experts, K top-k, A = T*K expert rows (dropless), NC token
 * chunks of CH tokens (the unit of the deterministic counting sort).
 *
 * Stages (DESIGN.md section 2):
 *   gate GEMM (cuBLAS)  ->  router kernel (one thread per token: scores,
 *   top-k with ties to the lower index, weights, logsumexp)  ->  plan:
 *   per-chunk per-expert counts, an exclusive scan over chunks and experts,
 *   positions (one thread per (chunk, expert) walks its tokens in order, so
 *   each expert's rows are in token order, as moe_dispatch_plan's)  ->
 *   gather  ->  expert GEMMs (one cublasSgemm per expert with rows)  ->
 *   activation  ->  combine (each token gathers its K rows in slot order).
 * No floating-point atomics anywhere: every sum runs in a fixed order, so a
 * run repeats its bits on the same GPU (cuBLAS is deterministic with its
 * default atomics mode, which we do not change).
 *
 * GEMM path: one cublasSgemm per expert over its contiguous rows, the host
 * reading the E+1 row offsets once per forward (one device sync). Chosen
 * because it is the simplest correct path that needs no device to tune; the
 * grouped GEMM (cublasGemmGroupedBatchedEx) and bf16 (cublasGemmEx with
 * CUDA_R_16BF) are the next steps, to be measured on a GPU against
 * strided-batched GEMMs (tests/cuda/bench_cuda.c).
 */
#include "moe_cuda.h"
#include "topk_kernels.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
/* libmoe.a's error reporting (src/core/internal.h) */
moe_status moe_err(moe_status s, const char *fmt, ...);
void moe_err_clear(void);
}


/* ------------------------------------------------------------ the layer */

typedef struct {
    char name[64];
    int ndim;
    int64_t shape[2];
    int64_t numel;
    int64_t off;  /* floats into the parameter block (or the bias buffer) */
    int buffer;   /* 1: the selection-bias buffer, no gradient */
} cu_param;

enum { P_W1, P_B1, P_W2, P_B2, P_WG, P_BG, P_END };

struct moe_layer_cuda {
    moe_config cfg;
    int64_t D, H, H2;
    int E, K, glu;
    int64_t off[P_END + 1];       /* parameter block offsets (floats)             */
    float *dparam, *dgrad;        /* (off[P_END]) device                          */
    float *dbias;                 /* (E) selection bias, device, or NULL          */
    cu_param *tab;
    int n_tab;
    cublasHandle_t blas;
    /* workspace, sized for Tcap tokens */
    int64_t Tcap;
    void *ws;
    float *x, *z, *p, *lse, *w, *dw, *dz, *dp, *xe, *hpre, *ha, *ye, *dye, *dha, *dhpre, *dxe, *ones, *io;
    double *pden, *cps, *lse2, *stats; /* stats: balance, z-loss                     */
    int32_t *sel, *idx, *pos, *slot, *rowexp, *ccnt, *coff;
    long long *hdr;                     /* device: offsets (E+1), counts (E)        */
    int *flag;                          /* device: non-finite flags (2)             */
    /* last forward */
    int cached;                         /* 1: a backward may follow                 */
    int64_t T;
    long long *hoff;                    /* host copy of hdr (2E+1)                  */
    double balance, zloss;
};

/* ------------------------------------------------------------ errors */

static moe_status cuda_fail(cudaError_t e, const char *what) {
    cudaGetLastError(); /* clear a sticky-free error */
    if (e == cudaErrorMemoryAllocation)
        return moe_err(MOE_ERR_NOMEM, "CUDA: %s: out of device memory (%s)", what, cudaGetErrorString(e));
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        return moe_err(MOE_ERR_UNSUPPORTED, "CUDA: %s: %s", what, cudaGetErrorString(e));
    return moe_err(MOE_ERR_STATE, "CUDA: %s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

static moe_status blas_fail(cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_ALLOC_FAILED) return moe_err(MOE_ERR_NOMEM, "cuBLAS: %s: out of device memory", what);
    return moe_err(MOE_ERR_STATE, "cuBLAS: %s failed with status %d", what, (int)s);
}

#define CU(call)                                                                                                     \
    do {                                                                                                             \
        cudaError_t e_ = (call);                                                                                     \
        if (e_ != cudaSuccess) return cuda_fail(e_, #call);                                                          \
    } while (0)
#define BL(call)                                                                                                     \
    do {                                                                                                             \
        cublasStatus_t s_ = (call);                                                                                  \
        if (s_ != CUBLAS_STATUS_SUCCESS) return blas_fail(s_, #call);                                                \
    } while (0)
#define LAUNCHED(what)                                                                                               \
    do {                                                                                                             \
        cudaError_t e_ = cudaGetLastError();                                                                         \
        if (e_ != cudaSuccess) return cuda_fail(e_, what);                                                           \
    } while (0)

/* Row-major C (M,N) = alpha op(A) op(B) + beta C, as moe_sgemm's arguments:
 * op(A) (M,K) is A (M,K), or A (K,M) when ta; op(B) (K,N) is B (K,N), or
 * B (N,K) when tb. cuBLAS is column-major: C^T = op(B)^T op(A)^T. */
static cublasStatus_t gemm_rm(cublasHandle_t h, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                              const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                              int64_t ldc) {
    return cublasSgemm(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K,
                       &alpha, B, (int)ldb, A, (int)lda, &beta, C, (int)ldc);
}

/* db (N) += column sums of g (M,N) row-major: a GEMV with a ones vector. */
static cublasStatus_t colsum_acc(cublasHandle_t h, float *db, const float *g, int64_t M, int64_t N,
                                 const float *ones) {
    const float one = 1.0f;
    return cublasSgemv(h, CUBLAS_OP_N, (int)N, (int)M, &one, g, (int)N, ones, 1, &one, db, 1);
}

static unsigned blocks_for(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : b > 65535LL * 1024 ? 65535LL * 1024 : b);
}

/* ------------------------------------------------------------ host side */

extern "C" int moe_cuda_available(char *msg, size_t len) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        if (msg && len)
            snprintf(msg, len, "no CUDA device: cudaGetDeviceCount returned %s (%s), %d device%s",
                     cudaGetErrorName(e), cudaGetErrorString(e), n, n == 1 ? "" : "s");
        return 0;
    }
    cudaDeviceProp pr;
    e = cudaGetDeviceProperties(&pr, 0);
    if (e != cudaSuccess) {
        cudaGetLastError();
        if (msg && len) snprintf(msg, len, "CUDA device 0 unusable: %s", cudaGetErrorString(e));
        return 0;
    }
    if (msg && len)
        snprintf(msg, len, "%s (compute capability %d.%d, %.1f GiB), %d device%s", pr.name, pr.major, pr.minor,
                 (double)pr.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), n, n == 1 ? "" : "s");
    return 1;
}

/* The settings the GPU layer covers; MOE_ERR_UNSUPPORTED naming the first it does not. */
static moe_status check_supported(const moe_config *c) {
    if (c->type != MOE_LAYER_TOPK)
        return moe_err(MOE_ERR_UNSUPPORTED,
                       "the CUDA backend implements the topk layer only; a %s layer runs on the CPU "
                       "(moe_layer_create)",
                       moe_layer_type_name(c->type) ? moe_layer_type_name(c->type) : "(unknown type)");
    const char *what = NULL;
    if (c->router != MOE_ROUTER_TOKEN_CHOICE) what = "expert choice routing";
    else if (c->capacity_factor_train > 0 || c->capacity_factor_eval > 0) what = "capacity (capacity_factor > 0)";
    else if (c->jitter > 0) what = "jitter";
    else if (c->num_shared > 0) what = "shared experts";
    else if (c->num_groups > 1) what = "group-limited routing (num_groups > 1)";
    else if (c->bf16) what = "bf16";
    if (what)
        return moe_err(MOE_ERR_UNSUPPORTED,
                       "the CUDA topk layer does not implement %s yet (dropless token choice, fp32 only; "
                       "include/moe_cuda.h lists what it covers)",
                       what);
    return MOE_OK;
}

/* The config moe_layer_create accepts? Checked on a CPU layer of the same
 * routing settings and small D, H (its own messages; nothing big allocated). */
static moe_status check_config(const moe_config *cfg) {
    moe_config small = *cfg;
    if (small.input_dim > 4) small.input_dim = 4;
    if (small.hidden_dim > 4) small.hidden_dim = 4;
    moe_layer *tmp = NULL;
    moe_status st = moe_layer_create(&tmp, &small);
    moe_layer_free(tmp);
    if (st != MOE_OK) return st;
    if (cfg->input_dim < 1 || cfg->input_dim > INT_MAX / 4 || cfg->hidden_dim > INT_MAX / 4)
        return moe_err(MOE_ERR_ARG, "input_dim = %lld and hidden_dim = %lld must be in [1, %d] on the GPU",
                       (long long)cfg->input_dim, (long long)cfg->hidden_dim, INT_MAX / 4);
    return MOE_OK;
}

static void add_tab(moe_layer_cuda *l, const char *name, int ndim, int64_t s0, int64_t s1, int64_t off, int buffer) {
    cu_param *p = &l->tab[l->n_tab++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim, p->shape[0] = s0, p->shape[1] = s1, p->numel = ndim == 1 ? s0 : s0 * s1;
    p->off = off, p->buffer = buffer;
}

extern "C" void moe_cuda_layer_free(moe_layer_cuda *l) {
    if (!l) return;
    cudaFree(l->dparam);
    cudaFree(l->dgrad);
    cudaFree(l->dbias);
    cudaFree(l->ws);
    if (l->blas) cublasDestroy(l->blas);
    free(l->tab);
    free(l->hoff);
    free(l);
    cudaGetLastError();
}

/* Allocate the layer for cfg (checked), parameters uninitialised. */
static moe_status alloc_layer(moe_layer_cuda **out, const moe_config *cfg) {
    *out = NULL;
    moe_status st = check_supported(cfg);
    if (st == MOE_OK) st = check_config(cfg);
    if (st != MOE_OK) return st;
    char why[256];
    if (!moe_cuda_available(why, sizeof why))
        return moe_err(MOE_ERR_UNSUPPORTED, "the CUDA topk layer needs a CUDA device: %s", why);
    moe_layer_cuda *l = (moe_layer_cuda *)calloc(1, sizeof *l);
    if (!l) return moe_err(MOE_ERR_NOMEM, "cannot allocate the CUDA layer");
    l->cfg = *cfg;
    l->D = cfg->input_dim, l->H = cfg->hidden_dim, l->glu = cfg->expert != MOE_EXPERT_MLP;
    l->H2 = l->glu ? 2 * l->H : l->H, l->E = cfg->num_experts, l->K = cfg->top_k;
    int64_t D = l->D, H = l->H, H2 = l->H2, E = l->E;
    l->off[P_W1] = 0;
    l->off[P_B1] = E * H2 * D;
    l->off[P_W2] = l->off[P_B1] + E * H2;
    l->off[P_B2] = l->off[P_W2] + E * D * H;
    l->off[P_WG] = l->off[P_B2] + E * D;
    l->off[P_BG] = l->off[P_WG] + E * D;
    l->off[P_END] = l->off[P_BG] + E;
    l->tab = (cu_param *)calloc((size_t)(4 * E + 3), sizeof *l->tab);
    l->hoff = (long long *)calloc((size_t)(2 * E + 1), sizeof *l->hoff);
    if (!l->tab || !l->hoff) return moe_cuda_layer_free(l), moe_err(MOE_ERR_NOMEM, "cannot allocate the CUDA layer");
    char name[64];
    for (int64_t e = 0; e < E; e++) {
        snprintf(name, sizeof name, "experts.%lld.net.0.weight", (long long)e);
        add_tab(l, name, 2, H2, D, l->off[P_W1] + e * H2 * D, 0);
        snprintf(name, sizeof name, "experts.%lld.net.0.bias", (long long)e);
        add_tab(l, name, 1, H2, 0, l->off[P_B1] + e * H2, 0);
        snprintf(name, sizeof name, "experts.%lld.net.2.weight", (long long)e);
        add_tab(l, name, 2, D, H, l->off[P_W2] + e * D * H, 0);
        snprintf(name, sizeof name, "experts.%lld.net.2.bias", (long long)e);
        add_tab(l, name, 1, D, 0, l->off[P_B2] + e * D, 0);
    }
    add_tab(l, "gate.weight", 2, E, D, l->off[P_WG], 0);
    add_tab(l, "gate.bias", 1, E, 0, l->off[P_BG], 0);
    if (cfg->expert_bias) add_tab(l, "gate.e_score_correction_bias", 1, E, 0, 0, 1);
    size_t bytes = (size_t)l->off[P_END] * sizeof(float);
    cudaError_t ce = cudaMalloc((void **)&l->dparam, bytes);
    if (ce == cudaSuccess) ce = cudaMalloc((void **)&l->dgrad, bytes);
    if (ce == cudaSuccess) ce = cudaMemset(l->dgrad, 0, bytes);
    if (ce == cudaSuccess && cfg->expert_bias) ce = cudaMalloc((void **)&l->dbias, (size_t)E * sizeof(float));
    if (ce == cudaSuccess && cfg->expert_bias) ce = cudaMemset(l->dbias, 0, (size_t)E * sizeof(float));
    if (ce != cudaSuccess) {
        st = cuda_fail(ce, "allocating the parameters and gradients");
        moe_cuda_layer_free(l);
        return st;
    }
    cublasStatus_t bs = cublasCreate(&l->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        l->blas = NULL;
        st = blas_fail(bs, "cublasCreate");
        moe_cuda_layer_free(l);
        return st;
    }
    *out = l;
    return MOE_OK;
}

static const cu_param *find(const moe_layer_cuda *l, const char *name) {
    for (int i = 0; i < l->n_tab; i++)
        if (!strcmp(l->tab[i].name, name)) return &l->tab[i];
    return NULL;
}

static float *dev_of(const moe_layer_cuda *l, const cu_param *p, int grad) {
    if (p->buffer) return grad ? NULL : l->dbias + p->off;
    return (grad ? l->dgrad : l->dparam) + p->off;
}

extern "C" moe_status moe_cuda_layer_upload(moe_layer_cuda *l, const moe_layer *cpu) {
    moe_err_clear();
    if (!l || !cpu) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_upload: NULL argument");
    moe_layer *c = (moe_layer *)cpu; /* the table getters take a non-const layer; nothing is written */
    const moe_config *cc = moe_layer_config(cpu);
    if (cc->type != l->cfg.type || cc->input_dim != l->cfg.input_dim || cc->hidden_dim != l->cfg.hidden_dim ||
        cc->num_experts != l->cfg.num_experts || cc->expert != l->cfg.expert || cc->expert_bias != l->cfg.expert_bias)
        return moe_err(MOE_ERR_ARG, "moe_cuda_layer_upload: the CPU layer's config differs from the GPU layer's");
    for (int i = 0; i < l->n_tab; i++) {
        const cu_param *p = &l->tab[i];
        const float *src = NULL;
        if (p->buffer) {
            for (int b = 0; b < moe_layer_num_buffers(cpu); b++)
                if (!strcmp(moe_layer_buffer(c, b)->name, p->name)) src = moe_layer_buffer(c, b)->data;
        } else {
            for (int j = 0; j < moe_layer_num_params(cpu); j++)
                if (!strcmp(moe_layer_param(c, j)->name, p->name)) src = moe_layer_param(c, j)->data;
        }
        if (!src) return moe_err(MOE_ERR_NOTFOUND, "moe_cuda_layer_upload: the CPU layer has no tensor %s", p->name);
        CU(cudaMemcpy(dev_of(l, p, 0), src, (size_t)p->numel * sizeof(float), cudaMemcpyHostToDevice));
    }
    l->cached = 0;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_download(moe_layer *cpu, const moe_layer_cuda *l, int grads) {
    moe_err_clear();
    if (!l || !cpu) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_download: NULL argument");
    const moe_config *cc = moe_layer_config(cpu);
    if (cc->type != l->cfg.type || cc->input_dim != l->cfg.input_dim || cc->hidden_dim != l->cfg.hidden_dim ||
        cc->num_experts != l->cfg.num_experts || cc->expert != l->cfg.expert || cc->expert_bias != l->cfg.expert_bias)
        return moe_err(MOE_ERR_ARG, "moe_cuda_layer_download: the CPU layer's config differs from the GPU layer's");
    for (int i = 0; i < l->n_tab; i++) {
        const cu_param *p = &l->tab[i];
        moe_param *q = NULL;
        if (p->buffer) {
            for (int b = 0; b < moe_layer_num_buffers(cpu); b++)
                if (!strcmp(moe_layer_buffer(cpu, b)->name, p->name)) q = moe_layer_buffer(cpu, b);
        } else {
            for (int j = 0; j < moe_layer_num_params(cpu); j++)
                if (!strcmp(moe_layer_param(cpu, j)->name, p->name)) q = moe_layer_param(cpu, j);
        }
        if (!q) return moe_err(MOE_ERR_NOTFOUND, "moe_cuda_layer_download: the CPU layer has no tensor %s", p->name);
        CU(cudaMemcpy(q->data, dev_of(l, p, 0), (size_t)p->numel * sizeof(float), cudaMemcpyDeviceToHost));
        if (grads && !p->buffer && q->grad)
            CU(cudaMemcpy(q->grad, dev_of(l, p, 1), (size_t)p->numel * sizeof(float), cudaMemcpyDeviceToHost));
    }
    moe_layer_params_changed(cpu);
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_create_from(moe_layer_cuda **out, const moe_layer *cpu) {
    moe_err_clear();
    if (!out) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_create_from: NULL out");
    *out = NULL;
    if (!cpu) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_create_from: NULL CPU layer");
    moe_layer_cuda *l;
    moe_status st = alloc_layer(&l, moe_layer_config(cpu));
    if (st != MOE_OK) return st;
    if ((st = moe_cuda_layer_upload(l, cpu)) != MOE_OK) return moe_cuda_layer_free(l), st;
    *out = l;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_create(moe_layer_cuda **out, const moe_config *cfg) {
    moe_err_clear();
    if (!out) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_create: NULL out");
    *out = NULL;
    if (!cfg) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_create: NULL config");
    /* refuse before the host-side layer is made (it may be large) */
    moe_status st = check_supported(cfg);
    if (st == MOE_OK) st = check_config(cfg);
    char why[256];
    if (st == MOE_OK && !moe_cuda_available(why, sizeof why))
        st = moe_err(MOE_ERR_UNSUPPORTED, "the CUDA topk layer needs a CUDA device: %s", why);
    if (st != MOE_OK) return st;
    moe_layer *cpu = NULL;
    if ((st = moe_layer_create(&cpu, cfg)) != MOE_OK) return st;
    st = moe_cuda_layer_create_from(out, cpu);
    moe_layer_free(cpu);
    return st;
}

extern "C" moe_status moe_cuda_layer_create_device_init(moe_layer_cuda **out, const moe_config *cfg) {
    moe_err_clear();
    if (!out) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_create_device_init: NULL out");
    *out = NULL;
    if (!cfg) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_create_device_init: NULL config");
    moe_layer_cuda *l;
    moe_status st = alloc_layer(&l, cfg);
    if (st != MOE_OK) return st;
    for (int i = 0; i < l->n_tab; i++) {
        const cu_param *p = &l->tab[i];
        if (p->buffer) continue;
        int64_t fan_in = strstr(p->name, ".net.2.") ? l->H : l->D;
        k_init_uniform<<<blocks_for(p->numel, 256), 256>>>(dev_of(l, p, 0), p->numel, 1.0f / sqrtf((float)fan_in),
                                                         (unsigned long long)cfg->seed * 1000003ull + (unsigned)i);
    }
    cudaError_t ce = cudaDeviceSynchronize();
    if (ce == cudaSuccess) ce = cudaGetLastError();
    if (ce != cudaSuccess) return st = cuda_fail(ce, "initialising the parameters"), moe_cuda_layer_free(l), st;
    *out = l;
    return MOE_OK;
}

extern "C" const moe_config *moe_cuda_layer_config(const moe_layer_cuda *l) { return l ? &l->cfg : NULL; }

static moe_status param_copy(const moe_layer_cuda *l, const char *fn, const char *name, int64_t numel, int grad,
                             const cu_param **out) {
    if (!l || !name) return moe_err(MOE_ERR_ARG, "%s: NULL layer or name", fn);
    const cu_param *p = find(l, name);
    if (!p) return moe_err(MOE_ERR_NOTFOUND, "%s: the CUDA layer has no tensor %s", fn, name);
    if (grad && p->buffer) return moe_err(MOE_ERR_NOTFOUND, "%s: %s is a buffer: it has no gradient", fn, name);
    if (numel != p->numel)
        return moe_err(MOE_ERR_SHAPE, "%s: %s has %lld elements, got %lld", fn, name, (long long)p->numel,
                       (long long)numel);
    *out = p;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_set_param(moe_layer_cuda *l, const char *name, const float *host,
                                               int64_t numel) {
    moe_err_clear();
    const cu_param *p;
    moe_status st = param_copy(l, "moe_cuda_layer_set_param", name, numel, 0, &p);
    if (st != MOE_OK) return st;
    if (!host) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_set_param: NULL data for %s", name);
    CU(cudaMemcpy(dev_of(l, p, 0), host, (size_t)numel * sizeof(float), cudaMemcpyHostToDevice));
    l->cached = 0;
    return MOE_OK;
}

/* A parameter (grad 0) or its gradient (grad 1) to the host, for the two
 * public getters below (fn: the caller's name, for messages). */
static moe_status copy_out(const moe_layer_cuda *l, float *host, const char *name, int64_t numel, int grad,
                           const char *fn) {
    moe_err_clear();
    const cu_param *p;
    moe_status st = param_copy(l, fn, name, numel, grad, &p);
    if (st != MOE_OK) return st;
    if (!host) return moe_err(MOE_ERR_ARG, "%s: NULL destination for %s", fn, name);
    CU(cudaMemcpy(host, dev_of(l, p, grad), (size_t)numel * sizeof(float), cudaMemcpyDeviceToHost));
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_get_param(const moe_layer_cuda *l, float *host, const char *name,
                                               int64_t numel) {
    return copy_out(l, host, name, numel, 0, "moe_cuda_layer_get_param");
}

extern "C" moe_status moe_cuda_layer_get_grad(const moe_layer_cuda *l, float *host, const char *name,
                                              int64_t numel) {
    return copy_out(l, host, name, numel, 1, "moe_cuda_layer_get_grad");
}

extern "C" moe_status moe_cuda_layer_zero_grad(moe_layer_cuda *l) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_zero_grad: NULL layer");
    CU(cudaMemset(l->dgrad, 0, (size_t)l->off[P_END] * sizeof(float)));
    return MOE_OK;
}

/* Carve n elements of size sz (256-byte aligned) from base at *off; base NULL measures. */
static void *carve(char *base, size_t *off, int64_t n, size_t sz) {
    size_t o = (*off + 255) & ~(size_t)255;
    *off = o + (size_t)n * sz;
    return base ? base + o : NULL;
}

static size_t ws_layout(moe_layer_cuda *l, int64_t T, char *b) {
    int64_t D = l->D, H = l->H, H2 = l->H2, E = l->E, K = l->K, A = T * K, NC = (T + CH - 1) / CH;
    size_t o = 0, F = sizeof(float), I = sizeof(int32_t), G = sizeof(double);
    l->x = (float *)carve(b, &o, T * D, F);
    l->io = (float *)carve(b, &o, T * D, F);
    l->z = (float *)carve(b, &o, T * E, F);
    l->p = (float *)carve(b, &o, T * E, F);
    l->dz = (float *)carve(b, &o, T * E, F);
    l->dp = (float *)carve(b, &o, T * E, F);
    l->lse = (float *)carve(b, &o, T, F);
    l->w = (float *)carve(b, &o, T * K, F);
    l->dw = (float *)carve(b, &o, T * K, F);
    l->ones = (float *)carve(b, &o, A, F);
    l->xe = (float *)carve(b, &o, A * D, F);
    l->hpre = (float *)carve(b, &o, A * H2, F);
    l->ha = (float *)carve(b, &o, A * H, F);
    l->ye = (float *)carve(b, &o, A * D, F);
    l->dye = (float *)carve(b, &o, A * D, F);
    l->dha = (float *)carve(b, &o, A * H, F);
    l->dhpre = (float *)carve(b, &o, A * H2, F);
    l->dxe = (float *)carve(b, &o, A * D, F);
    l->pden = (double *)carve(b, &o, T, G);
    l->cps = (double *)carve(b, &o, NC * E, G);
    l->lse2 = (double *)carve(b, &o, NC, G);
    l->stats = (double *)carve(b, &o, 2 + E, G); /* balance, z-loss, then P (E) */
    l->sel = (int32_t *)carve(b, &o, T * E, I);
    l->idx = (int32_t *)carve(b, &o, T * K, I);
    l->pos = (int32_t *)carve(b, &o, T * K, I);
    l->slot = (int32_t *)carve(b, &o, A, I);
    l->rowexp = (int32_t *)carve(b, &o, A, I);
    l->ccnt = (int32_t *)carve(b, &o, NC * E, I);
    l->coff = (int32_t *)carve(b, &o, NC * E, I);
    l->hdr = (long long *)carve(b, &o, 2 * E + 1, sizeof(long long));
    l->flag = (int *)carve(b, &o, 2, sizeof(int));
    return o;
}

static moe_status reserve(moe_layer_cuda *l, int64_t T) {
    if (T <= l->Tcap) {
        ws_layout(l, l->Tcap, (char *)l->ws);
        return MOE_OK;
    }
    if (T * l->K > INT_MAX / 2) return moe_err(MOE_ERR_ARG, "T = %lld is too large for the CUDA layer", (long long)T);
    size_t bytes = ws_layout(l, T, NULL);
    cudaFree(l->ws);
    l->ws = NULL, l->Tcap = 0, l->cached = 0;
    CU(cudaMalloc(&l->ws, bytes));
    l->Tcap = T;
    ws_layout(l, T, (char *)l->ws);
    k_fill<<<blocks_for(T * l->K, 256), 256>>>(l->ones, 1.0f, T * l->K);
    LAUNCHED("k_fill");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_forward(moe_layer_cuda *l, float *y, float *aux_loss, const float *x, int64_t T,
                                             int flags) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_forward: NULL layer");
    l->cached = 0;
    if (!y || !x) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_forward: NULL %s", !x ? "x" : "y");
    if (flags & ~(MOE_TRAIN | MOE_NO_GRAD | MOE_CUDA_DEVICE_PTRS))
        return moe_err(MOE_ERR_ARG, "moe_cuda_layer_forward: unknown flag bits 0x%x",
                       flags & ~(MOE_TRAIN | MOE_NO_GRAD | MOE_CUDA_DEVICE_PTRS));
    if (T < 1) return moe_err(MOE_ERR_ARG, "empty batch: T = %lld; forward needs at least one row", (long long)T);
    moe_status st = reserve(l, T);
    if (st != MOE_OK) return st;
    const moe_config *c = &l->cfg;
    int dev = (flags & MOE_CUDA_DEVICE_PTRS) != 0;
    int64_t D = l->D, H = l->H, H2 = l->H2, E = l->E, K = l->K, A = T * K, NC = (T + CH - 1) / CH;
    float *Wg = l->dparam + l->off[P_WG], *bg = l->dparam + l->off[P_BG];
    float *W1 = l->dparam + l->off[P_W1], *b1 = l->dparam + l->off[P_B1];
    float *W2 = l->dparam + l->off[P_W2], *b2 = l->dparam + l->off[P_B2];
    size_t xbytes = (size_t)(T * D) * sizeof(float);

    CU(cudaMemcpy(l->x, x, xbytes, dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice));
    CU(cudaMemset(l->flag, 0, 2 * sizeof(int)));
    k_nonfinite<<<blocks_for(T * D, 256), 256>>>(l->flag, l->x, T * D);
    /* gate: z (T,E) = x Wg^T + bg */
    BL(gemm_rm(l->blas, 0, 1, T, E, D, 1.0f, l->x, D, Wg, D, 0.0f, l->z, E));
    k_add_bias<<<blocks_for(T * E, 256), 256>>>(l->z, bg, T, E);
    k_router<<<blocks_for(T, 128), 128>>>(l->p, l->lse, l->pden, l->sel, l->idx, l->w, l->z, l->dbias, T, (int)E,
                                          (int)K, (int)c->score, c->normalize, (float)c->route_scale);
    int eth = E < 256 ? (int)((E + 31) / 32 * 32) : 256;
    k_chunk_counts<<<(unsigned)NC, eth>>>(l->ccnt, l->cps, l->lse2, l->sel, l->p, l->pden, l->lse, T, (int)E);
    k_scan<<<1, eth>>>(l->coff, l->hdr, l->stats, l->stats + 2, l->ccnt, l->cps, l->lse2, NC, T, (int)E, (int)K);
    k_positions<<<(unsigned)NC, eth>>>(l->pos, l->slot, l->rowexp, l->sel, l->coff, l->hdr, T, (int)E, (int)K);
    LAUNCHED("the router kernels");
    /* the host needs the row offsets to size the expert GEMMs: the one sync */
    int hflag[2];
    double hstats[2];
    CU(cudaMemcpy(l->hoff, l->hdr, (size_t)(2 * E + 1) * sizeof(long long), cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(hflag, l->flag, sizeof hflag, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(hstats, l->stats, sizeof hstats, cudaMemcpyDeviceToHost));
    if (hflag[0]) return moe_err(MOE_ERR_NONFINITE, "x holds a NaN or Inf: inputs must be finite");
    if (l->hoff[E] != A)
        return moe_err(MOE_ERR_STATE, "CUDA layer: the dispatch plan has %lld rows, expected %lld (internal error)",
                       (long long)l->hoff[E], (long long)A);

    k_gather<<<(unsigned)(A < 65535 * 16 ? A : 65535 * 16), 128>>>(l->xe, l->x, l->slot, A, D);
    k_bias_rows<<<blocks_for(A * H2, 256), 256>>>(l->hpre, b1, l->rowexp, A, H2);
    LAUNCHED("gather");
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = l->hoff[e], n = l->hoff[e + 1] - r0;
        if (n == 0) continue;
        BL(gemm_rm(l->blas, 0, 1, n, H2, D, 1.0f, l->xe + r0 * D, D, W1 + e * H2 * D, D, 1.0f, l->hpre + r0 * H2,
                   H2));
    }
    k_act<<<blocks_for(A * H, 256), 256>>>(l->ha, l->hpre, A, H, (int)c->expert, (int)c->activation, c->leaky_slope);
    k_bias_rows<<<blocks_for(A * D, 256), 256>>>(l->ye, b2, l->rowexp, A, D);
    LAUNCHED("activation");
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = l->hoff[e], n = l->hoff[e + 1] - r0;
        if (n == 0) continue;
        BL(gemm_rm(l->blas, 0, 1, n, D, H, 1.0f, l->ha + r0 * H, H, W2 + e * D * H, H, 1.0f, l->ye + r0 * D, D));
    }
    float *yd = dev ? y : l->io;
    k_combine<<<(unsigned)(T < 65535 * 16 ? T : 65535 * 16), 128>>>(yd, l->ye, l->w, l->pos, T, (int)K, D);
    k_nonfinite<<<blocks_for(T * D, 256), 256>>>(l->flag + 1, yd, T * D);
    LAUNCHED("combine");
    if (!dev) CU(cudaMemcpy(y, l->io, xbytes, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(hflag, l->flag, sizeof hflag, cudaMemcpyDeviceToHost));

    l->T = T;
    l->balance = hstats[0], l->zloss = hstats[1];
    float aux = (float)(c->balance_coef * l->balance + c->z_loss_coef * l->zloss);
    if (aux_loss) *aux_loss = c->balance_coef > 0 || c->z_loss_coef > 0 ? aux : 0.0f;
    if (hflag[1])
        return moe_err(MOE_ERR_NONFINITE, "y holds a NaN or Inf although x is finite (float32 overflow in the "
                                          "experts or the parameters hold NaN/Inf)");
    l->cached = !(flags & MOE_NO_GRAD);
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_backward(moe_layer_cuda *l, float *dx, const float *dy, float daux, int flags) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_backward: NULL layer");
    if (!dy) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_backward: NULL dy");
    if (flags & ~MOE_CUDA_DEVICE_PTRS)
        return moe_err(MOE_ERR_ARG, "moe_cuda_layer_backward: unknown flag bits 0x%x", flags & ~MOE_CUDA_DEVICE_PTRS);
    if (!l->cached)
        return moe_err(MOE_ERR_STATE, "moe_cuda_layer_backward: no forward to go back through (none yet, a failed "
                                      "one, MOE_NO_GRAD, or parameters changed since)");
    const moe_config *c = &l->cfg;
    int dev = (flags & MOE_CUDA_DEVICE_PTRS) != 0;
    int64_t T = l->T, D = l->D, H = l->H, H2 = l->H2, E = l->E, K = l->K, A = T * K;
    size_t xbytes = (size_t)(T * D) * sizeof(float);
    float *W1 = l->dparam + l->off[P_W1], *W2 = l->dparam + l->off[P_W2], *Wg = l->dparam + l->off[P_WG];
    float *dW1 = l->dgrad + l->off[P_W1], *db1 = l->dgrad + l->off[P_B1];
    float *dW2 = l->dgrad + l->off[P_W2], *db2 = l->dgrad + l->off[P_B2];
    float *dWg = l->dgrad + l->off[P_WG], *dbg = l->dgrad + l->off[P_BG];
    const float *dyd = dy;
    if (!dev) {
        CU(cudaMemcpy(l->io, dy, xbytes, cudaMemcpyHostToDevice));
        dyd = l->io;
    }
    unsigned gT = (unsigned)(T < 65535 * 16 ? T : 65535 * 16);
    k_combine_backward<<<gT, 256>>>(l->dye, l->dw, dyd, l->ye, l->w, l->pos, T, (int)K, D);
    LAUNCHED("combine backward");
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = l->hoff[e], n = l->hoff[e + 1] - r0;
        if (n == 0) continue;
        const float *dye = l->dye + r0 * D;
        BL(colsum_acc(l->blas, db2 + e * D, dye, n, D, l->ones));
        BL(gemm_rm(l->blas, 1, 0, D, H, n, 1.0f, dye, D, l->ha + r0 * H, H, 1.0f, dW2 + e * D * H, H));
        BL(gemm_rm(l->blas, 0, 0, n, H, D, 1.0f, dye, D, W2 + e * D * H, H, 0.0f, l->dha + r0 * H, H));
    }
    k_act_backward<<<blocks_for(A * H, 256), 256>>>(l->dhpre, l->dha, l->hpre, A, H, (int)c->expert,
                                                    (int)c->activation, c->leaky_slope);
    LAUNCHED("activation backward");
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = l->hoff[e], n = l->hoff[e + 1] - r0;
        if (n == 0) continue;
        const float *dhp = l->dhpre + r0 * H2;
        BL(gemm_rm(l->blas, 1, 0, H2, D, n, 1.0f, dhp, H2, l->xe + r0 * D, D, 1.0f, dW1 + e * H2 * D, D));
        BL(colsum_acc(l->blas, db1 + e * H2, dhp, n, H2, l->ones));
        if (dx) BL(gemm_rm(l->blas, 0, 0, n, D, H2, 1.0f, dhp, H2, W1 + e * H2 * D, D, 0.0f, l->dxe + r0 * D, D));
    }
    k_router_backward<<<blocks_for(T, 128), 128>>>(l->dz, l->dp, l->dw, l->z, l->p, l->w, l->lse, l->idx, l->pos,
                                                   l->hdr + E + 1, T, (int)E, (int)K, (int)c->score, c->normalize,
                                                   (float)c->route_scale, daux * (float)c->balance_coef,
                                                   daux * (float)c->z_loss_coef);
    LAUNCHED("router backward");
    BL(gemm_rm(l->blas, 1, 0, E, D, T, 1.0f, l->dz, E, l->x, D, 1.0f, dWg, D));
    BL(colsum_acc(l->blas, dbg, l->dz, T, E, l->ones));
    if (dx) {
        float *dxd = dev ? dx : l->io; /* dy's staging copy is no longer needed */
        BL(gemm_rm(l->blas, 0, 0, T, D, E, 1.0f, l->dz, E, Wg, D, 0.0f, dxd, D));
        k_scatter_add<<<gT, 128>>>(dxd, l->dxe, l->pos, T, (int)K, D);
        LAUNCHED("scatter-add");
        if (!dev) CU(cudaMemcpy(dx, l->io, xbytes, cudaMemcpyDeviceToHost));
    }
    CU(cudaDeviceSynchronize());
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_routing(const moe_layer_cuda *l, int64_t *counts, int32_t *idx, double *balance,
                                             double *z_loss) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_cuda_layer_routing: NULL layer");
    if (l->T == 0) return moe_err(MOE_ERR_STATE, "moe_cuda_layer_routing: no forward yet");
    if (counts)
        for (int e = 0; e < l->E; e++) counts[e] = l->hoff[l->E + 1 + e];
    if (idx) CU(cudaMemcpy(idx, l->idx, (size_t)(l->T * l->K) * sizeof(int32_t), cudaMemcpyDeviceToHost));
    if (balance) *balance = l->balance;
    if (z_loss) *z_loss = l->zloss;
    return MOE_OK;
}
