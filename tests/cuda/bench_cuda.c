/*
 * Benchmark of the CUDA topk layer (fp32) against the ceiling the issue
 * names: cuBLAS strided-batched GEMMs of the same expert shapes on exactly
 * balanced routing (T*K/E rows per expert), fp32 and, for reference, bf16
 * inputs with fp32 accumulation. The layer routes with its own (random)
 * gate, so its expert loads are near-balanced, not exactly: the min/max
 * rows per expert are printed beside the figures.
 *   bench_cuda                 the moe bench shape, then Mixtral-like and DeepSeek-like
 *   bench_cuda T D H E K       one shape (SwiGLU experts)
 * Useful FLOPs: T*K*2*(D*H2 + H*D) forward (H2 = 2H for SwiGLU), twice that
 * for backward. Prints "skipped: no CUDA device" and exits 0 without one.
 * Dimension key: T tokens, D model dim, H hidden dim, E experts, K top-k,
 * M = T*K/E rows per expert.
 */
#include "moe.h"
#include "moe_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    int64_t T, D, H;
    int E, K;
} shape;

static double now_ms(cudaEvent_t a, cudaEvent_t b) {
    float ms = 0;
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    return ms;
}

/* Row-major C (M,N) = A (M,K) op(B), batched over E with strides; as
 * gemm_rm in topk_cuda.cu. dt: CUDA_R_32F or CUDA_R_16BF inputs, fp32 C. */
static cublasStatus_t sb(cublasHandle_t h, int ta, int tb, int M, int N, int K, const void *A, int lda, long long sA,
                         const void *B, int ldb, long long sB, float beta, float *C, int ldc, long long sC, int E,
                         cudaDataType dt) {
    float one = 1.0f;
    return cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                      &one, B, dt, ldb, sB, A, dt, lda, sA, &beta, C, CUDA_R_32F, ldc, sC, E,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

/* The ceiling: forward (2 GEMMs) and backward (4 GEMMs) of E experts of M rows. */
static int ceiling(const shape *s, cudaDataType dt, int iters, double *fwd_ms, double *bwd_ms) {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 1;
    int64_t E = s->E, M = s->T * s->K / E, D = s->D, H = s->H, H2 = 2 * H;
    size_t el = dt == CUDA_R_32F ? 4 : 2;
    void *x, *w1, *w2, *hh, *dy, *dh;
    float *hp, *y, *dw1, *dw2, *dx, *dhf;
    int bad = 0;
    bad |= cudaMalloc(&x, (size_t)(E * M * D) * el) != cudaSuccess;
    bad |= cudaMalloc(&w1, (size_t)(E * H2 * D) * el) != cudaSuccess;
    bad |= cudaMalloc(&w2, (size_t)(E * D * H) * el) != cudaSuccess;
    bad |= cudaMalloc(&hh, (size_t)(E * M * H) * el) != cudaSuccess;
    bad |= cudaMalloc(&dy, (size_t)(E * M * D) * el) != cudaSuccess;
    bad |= cudaMalloc(&dh, (size_t)(E * M * H2) * el) != cudaSuccess;
    bad |= cudaMalloc((void **)&hp, (size_t)(E * M * H2) * 4) != cudaSuccess;
    bad |= cudaMalloc((void **)&y, (size_t)(E * M * D) * 4) != cudaSuccess;
    bad |= cudaMalloc((void **)&dw1, (size_t)(E * H2 * D) * 4) != cudaSuccess;
    bad |= cudaMalloc((void **)&dw2, (size_t)(E * D * H) * 4) != cudaSuccess;
    bad |= cudaMalloc((void **)&dx, (size_t)(E * M * D) * 4) != cudaSuccess;
    bad |= cudaMalloc((void **)&dhf, (size_t)(E * M * H) * 4) != cudaSuccess;
    if (!bad) {
        /* small finite values (0x3c bytes: about 0.0115 as bf16, 0.0115 as fp32) */
        cudaMemset(x, 0x3c, (size_t)(E * M * D) * el), cudaMemset(w1, 0x3c, (size_t)(E * H2 * D) * el);
        cudaMemset(w2, 0x3c, (size_t)(E * D * H) * el), cudaMemset(hh, 0x3c, (size_t)(E * M * H) * el);
        cudaMemset(dy, 0x3c, (size_t)(E * M * D) * el), cudaMemset(dh, 0x3c, (size_t)(E * M * H2) * el);
        cudaEvent_t a, b, c;
        cudaEventCreate(&a), cudaEventCreate(&b), cudaEventCreate(&c);
        for (int it = -1; it < iters; it++) {
            if (it == 0) cudaEventRecord(a, 0);
            /* forward: hpre (M,H2) = x W1^T ; y (M,D) = h W2^T */
            sb(h, 0, 1, (int)M, (int)H2, (int)D, x, (int)D, M * D, w1, (int)D, H2 * D, 0, hp, (int)H2, M * H2, (int)E, dt);
            sb(h, 0, 1, (int)M, (int)D, (int)H, hh, (int)H, M * H, w2, (int)H, D * H, 0, y, (int)D, M * D, (int)E, dt);
        }
        cudaEventRecord(b, 0);
        *fwd_ms = now_ms(a, b) / iters;
        for (int it = -1; it < iters; it++) {
            if (it == 0) cudaEventRecord(b, 0);
            /* dW2 (D,H) += dy^T h ; dh (M,H) = dy W2 ; dW1 (H2,D) += dhpre^T x ; dx (M,D) = dhpre W1 */
            sb(h, 1, 0, (int)D, (int)H, (int)M, dy, (int)D, M * D, hh, (int)H, M * H, 1, dw2, (int)H, D * H, (int)E, dt);
            sb(h, 0, 0, (int)M, (int)H, (int)D, dy, (int)D, M * D, w2, (int)H, D * H, 0, dhf, (int)H, M * H, (int)E, dt);
            sb(h, 1, 0, (int)H2, (int)D, (int)M, dh, (int)H2, M * H2, x, (int)D, M * D, 1, dw1, (int)D, H2 * D, (int)E,
               dt);
            sb(h, 0, 0, (int)M, (int)D, (int)H2, dh, (int)H2, M * H2, w1, (int)D, H2 * D, 0, dx, (int)D, M * D, (int)E,
               dt);
        }
        cudaEventRecord(c, 0);
        *bwd_ms = now_ms(b, c) / iters;
        cudaEventDestroy(a), cudaEventDestroy(b), cudaEventDestroy(c);
    }
    cudaFree(x), cudaFree(w1), cudaFree(w2), cudaFree(hh), cudaFree(dy), cudaFree(dh);
    cudaFree(hp), cudaFree(y), cudaFree(dw1), cudaFree(dw2), cudaFree(dx), cudaFree(dhf);
    cublasDestroy(h);
    cudaError_t e = cudaGetLastError();
    return bad || e != cudaSuccess;
}

static int run_shape(const shape *s, int iters) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    c.input_dim = s->D, c.hidden_dim = s->H, c.num_experts = s->E, c.top_k = s->K;
    c.expert = MOE_EXPERT_SWIGLU, c.activation = MOE_ACT_SILU, c.score = MOE_SCORE_SOFTMAX, c.normalize = 1;
    c.seed = 7;
    double flop = (double)s->T * s->K * 2.0 * (2.0 * s->D * s->H + (double)s->H * s->D);
    printf("\n%s: T %lld D %lld H %lld E %d K %d, SwiGLU experts, %.2f TFLOP forward\n", s->name, (long long)s->T,
           (long long)s->D, (long long)s->H, s->E, s->K, flop / 1e12);
    fflush(stdout);
    moe_layer_cuda *l = NULL;
    moe_status st = moe_cuda_layer_create_device_init(&l, &c);
    if (st != MOE_OK) {
        printf("  layer: create failed: %s: %s\n", moe_status_str(st), moe_last_error());
        return 1;
    }
    size_t n = (size_t)(s->T * s->D);
    float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL;
    int bad = cudaMalloc((void **)&x, n * 4) != cudaSuccess || cudaMalloc((void **)&y, n * 4) != cudaSuccess ||
              cudaMalloc((void **)&dy, n * 4) != cudaSuccess || cudaMalloc((void **)&dx, n * 4) != cudaSuccess;
    if (bad) {
        printf("  cudaMalloc of x, y, dy, dx failed\n");
        moe_cuda_layer_free(l);
        return 1;
    }
    /* x: some variety so the router spreads the tokens */
    float *hx = malloc(n * 4);
    unsigned long long r = 42;
    for (size_t i = 0; i < n; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        hx[i] = (float)((double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
    cudaMemcpy(x, hx, n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dy, hx, n * 4, cudaMemcpyHostToDevice);
    free(hx);
    int fl = MOE_TRAIN | MOE_CUDA_DEVICE_PTRS;
    cudaEvent_t a, b, c2;
    cudaEventCreate(&a), cudaEventCreate(&b), cudaEventCreate(&c2);
    st = moe_cuda_layer_forward(l, y, NULL, x, s->T, fl); /* warm-up */
    if (st == MOE_OK) st = moe_cuda_layer_backward(l, dx, dy, 1.0f, MOE_CUDA_DEVICE_PTRS);
    double fwd = 0, fb = 0;
    for (int it = 0; it < iters && st == MOE_OK; it++) {
        cudaEventRecord(a, 0);
        st = moe_cuda_layer_forward(l, y, NULL, x, s->T, fl);
        cudaEventRecord(b, 0);
        if (st == MOE_OK) st = moe_cuda_layer_backward(l, dx, dy, 1.0f, MOE_CUDA_DEVICE_PTRS);
        cudaEventRecord(c2, 0);
        fwd += now_ms(a, b), fb += now_ms(a, c2);
    }
    if (st != MOE_OK) {
        printf("  layer: %s: %s\n", moe_status_str(st), moe_last_error());
        moe_cuda_layer_free(l);
        return 1;
    }
    fwd /= iters, fb /= iters;
    int64_t counts[256];
    moe_cuda_layer_routing(l, counts, NULL, NULL, NULL);
    int64_t lo = counts[0], hi = counts[0];
    for (int e = 1; e < s->E && e < 256; e++) lo = counts[e] < lo ? counts[e] : lo, hi = counts[e] > hi ? counts[e] : hi;
    printf("  rows per expert: balanced %lld, the layer's routing min %lld max %lld\n",
           (long long)(s->T * s->K / s->E), (long long)lo, (long long)hi);
    printf("  layer fp32              forward %8.2f ms %6.1f TFLOP/s   fwd+bwd %8.2f ms %6.1f TFLOP/s\n", fwd,
           flop / fwd / 1e9, fb, 3 * flop / fb / 1e9);
    moe_cuda_layer_free(l);
    cudaFree(x), cudaFree(y), cudaFree(dy), cudaFree(dx);
    cudaEventDestroy(a), cudaEventDestroy(b), cudaEventDestroy(c2);
    double cf = 0, cb = 0;
    for (int p = 0; p < 2; p++) {
        cudaDataType dt = p ? CUDA_R_16BF : CUDA_R_32F;
        if (ceiling(s, dt, iters, &cf, &cb)) {
            printf("  strided-batched %s: failed (%s)\n", p ? "bf16" : "fp32", cudaGetErrorString(cudaGetLastError()));
            continue;
        }
        printf("  strided-batched %-8s forward %8.2f ms %6.1f TFLOP/s   fwd+bwd %8.2f ms %6.1f TFLOP/s\n",
               p ? "bf16" : "fp32", cf, flop / cf / 1e9, cf + cb, 3 * flop / (cf + cb) / 1e9);
        if (!p)
            printf("  layer / fp32 ceiling: forward %.2f (target 0.9), fwd+bwd %.2f (target 0.8)\n", cf / fwd,
                   (cf + cb) / fb);
    }
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    char msg[256];
    if (!moe_cuda_available(msg, sizeof msg)) {
        printf("bench_cuda: skipped: no CUDA device (%s)\n", msg);
        return 0;
    }
    printf("bench_cuda: %s\n", msg);
    shape all[] = {{"moe bench shape", 4096, 512, 2048, 16, 2},
                   {"Mixtral-like", 8192, 4096, 14336, 8, 2},
                   {"DeepSeek-like", 8192, 7168, 2048, 64, 8}};
    int fails = 0;
    if (argc == 6) {
        shape one = {"given shape", atoll(argv[1]), atoll(argv[2]), atoll(argv[3]), atoi(argv[4]), atoi(argv[5])};
        fails += run_shape(&one, 3);
    } else {
        for (int i = 0; i < 3; i++) fails += run_shape(&all[i], i == 0 ? 10 : 3);
    }
    return fails ? 1 : 0;
}
