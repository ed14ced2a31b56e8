/*
 * libmoe CUDA backend (optional part): the `topk` layer's forward and
 * backward on one NVIDIA GPU, fp32, with the same definitions as the CPU
 * layer (src/layers/topk.c, router.c, src/bank/bank.c). Built into build/libmoe_cuda.a
 * when nvcc is found (`make cuda`); link a program with
 *   libmoe_cuda.a libmoe.a -lcublas -lcudart (and libmoe.a's own libraries)
 * libmoe_cuda.a uses libmoe.a's internal error reporting, so link it with the
 * static libmoe.a, not libmoe.so. A program that does not include this header
 * never depends on CUDA; libmoe.a and libmoe.so never do.
 *
 * STATUS: this backend compiles and its host-side checks run, but it has NOT
 * yet run on a GPU (none was available when it was written). Treat its
 * results as unverified until tests/cuda/device_check.sh has passed on a
 * GPU (README "CUDA backend").
 *
 * Dimension key: T tokens, D model dim, H expert hidden dim, H2 = H (MLP) or
 * 2H (GLU), E experts, K top-k.
 *
 * Conventions are moe.h's: every call returns a moe_status (MOE_OK == 0) and
 * on failure moe_last_error() says what was wrong; nothing aborts or exits;
 * tensors are row-major float32 in PyTorch's order; gradients accumulate
 * (+=); argument order is outputs, inputs, sizes. A CUDA runtime or cuBLAS
 * failure is reported as MOE_ERR_UNSUPPORTED (no usable device) or
 * MOE_ERR_NOMEM (device memory) or MOE_ERR_STATE (another CUDA error, named
 * in the message).
 *
 * What the GPU layer covers (anything else is refused at create with
 * MOE_ERR_UNSUPPORTED and a message naming the setting):
 *   type topk, token-choice router, score topk_softmax / softmax / sigmoid,
 *   normalize, route_scale, expert_bias (the selection bias, a state buffer:
 *   set it by name; moe_layer_update_bias is CPU only), balance loss, z-loss,
 *   expert kinds mlp / swiglu / geglu, activations relu / gelu / silu /
 *   leaky_relu, dropless (capacity_factor_train == capacity_factor_eval == 0),
 *   fp32 (bf16 == 0).
 * Not covered yet: capacity, jitter, shared experts, group-limited routing,
 * expert choice, runtime routing control, bf16, expert parallelism.
 * A forward's T tokens are one group (as moe_layer_forward's).
 */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if a CUDA device is usable (device 0), 0 if not. msg (len bytes, may be
 * NULL) receives a one-line explanation: the device's name and compute
 * capability, or why there is none ("no CUDA device: cudaGetDeviceCount
 * returned ..."). Never fails, never aborts. */
MOE_API int moe_cuda_available(char *msg, size_t len);

typedef struct moe_layer_cuda moe_layer_cuda;

/* Create a GPU topk layer. Its parameters are initialised exactly as
 * moe_layer_create(cfg) initialises the CPU layer's (they are made on the
 * host by a temporary CPU layer and uploaded), gradients zeroed.
 * Errors: MOE_ERR_ARG (NULL, a config moe_layer_create refuses),
 * MOE_ERR_UNSUPPORTED (not topk, a setting the GPU layer does not cover, no
 * CUDA device), MOE_ERR_NOMEM (host or device memory). On error *out is NULL. */
MOE_API moe_status moe_cuda_layer_create(moe_layer_cuda **out, const moe_config *cfg);
/* Create a GPU layer with cpu's config, parameters and selection-bias buffer
 * (copied; cpu is not kept). Errors as moe_cuda_layer_create. */
MOE_API moe_status moe_cuda_layer_create_from(moe_layer_cuda **out, const moe_layer *cpu);
/* For benchmarks: as moe_cuda_layer_create, but the parameters are drawn on
 * the device, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the same
 * distribution as PyTorch's nn.Linear, not the CPU layer's values), so a
 * large layer needs no host memory or host time. */
MOE_API moe_status moe_cuda_layer_create_device_init(moe_layer_cuda **out, const moe_config *cfg);
/* Free the layer and its device memory. NULL is a no-op. */
MOE_API void       moe_cuda_layer_free(moe_layer_cuda *l);
MOE_API const moe_config *moe_cuda_layer_config(const moe_layer_cuda *l); /* NULL for NULL */

/* Parameters and buffers by the CPU layer's state_dict names
 * ("experts.{e}.net.0.weight" (H2,D), ".net.0.bias" (H2), ".net.2.weight"
 * (D,H), ".net.2.bias" (D), "gate.weight" (E,D), "gate.bias" (E), buffer
 * "gate.e_score_correction_bias" (E) with expert_bias).
 *   set_param   host (numel) -> device parameter or buffer `name`
 *   get_param   device parameter or buffer -> host (numel)
 *   get_grad    device gradient -> host (numel) (buffers have none:
 *               MOE_ERR_NOTFOUND)
 * numel must equal the tensor's element count (MOE_ERR_SHAPE); an unknown
 * name is MOE_ERR_NOTFOUND. Synchronous. */
MOE_API moe_status moe_cuda_layer_set_param(moe_layer_cuda *l, const char *name, const float *host, int64_t numel);
MOE_API moe_status moe_cuda_layer_get_param(const moe_layer_cuda *l, float *host, const char *name, int64_t numel);
MOE_API moe_status moe_cuda_layer_get_grad(const moe_layer_cuda *l, float *host, const char *name, int64_t numel);
/* Every parameter and buffer of cpu (same config: MOE_ERR_ARG otherwise)
 * uploaded into l (upload) or l's downloaded into cpu (download, which also
 * writes cpu's gradients from l's when grads is nonzero and calls
 * moe_layer_params_changed(cpu)). Synchronous. */
MOE_API moe_status moe_cuda_layer_upload(moe_layer_cuda *l, const moe_layer *cpu);
MOE_API moe_status moe_cuda_layer_download(moe_layer *cpu, const moe_layer_cuda *l, int grads);
/* Zero the device gradients. */
MOE_API moe_status moe_cuda_layer_zero_grad(moe_layer_cuda *l);

/* Forward flag (or-ed with moe.h's MOE_TRAIN / MOE_EVAL / MOE_NO_GRAD):
 * x and y (forward), dx and dy (backward) are device pointers (cudaMalloc'd,
 * or managed). Without it they are host pointers and the call copies them
 * (synchronously). */
#define MOE_CUDA_DEVICE_PTRS 0x100

/* Forward of T tokens (one group).
 *   y        (T, D)  written (host or device pointer, see flags)
 *   aux_loss scalar on the host, may be NULL: balance_coef * balance +
 *            z_loss_coef * z_loss (0 without those losses)
 *   x        (T, D)  read (host or device pointer); NaN/Inf is MOE_ERR_NONFINITE
 *   flags    MOE_TRAIN or MOE_EVAL, | MOE_NO_GRAD, | MOE_CUDA_DEVICE_PTRS
 * T >= 1. The workspace (device memory) grows to the largest T seen; the
 * call returns when y is written (the device is synchronised once, to read
 * the expert row counts that size the expert GEMMs). Results are the same
 * bits run to run on the same GPU and T (no floating-point atomics). A NaN or
 * Inf in y from finite x returns MOE_ERR_NONFINITE (y holds what was
 * computed, no backward may follow). */
MOE_API moe_status moe_cuda_layer_forward(moe_layer_cuda *l, float *y, float *aux_loss, const float *x, int64_t T,
                                          int flags);

/* Backward of the last forward (not after MOE_NO_GRAD or a failed forward:
 * MOE_ERR_STATE).
 *   dx    (T, D) written (not accumulated), may be NULL
 *   dy    (T, D) read
 *   daux  weight of the auxiliary loss's gradient
 *   flags 0 (host pointers) or MOE_CUDA_DEVICE_PTRS
 * Parameter gradients accumulate (+=) on the device: read them with
 * moe_cuda_layer_get_grad or moe_cuda_layer_download. */
MOE_API moe_status moe_cuda_layer_backward(moe_layer_cuda *l, float *dx, const float *dy, float daux, int flags);

/* Routing statistics of the last forward, on the host.
 *   counts  (E) rows each expert processed, may be NULL
 *   idx     (T, K) expert of each pick (largest first), may be NULL
 *   balance, z_loss: the losses before their coefficients, may be NULL */
MOE_API moe_status moe_cuda_layer_routing(const moe_layer_cuda *l, int64_t *counts, int32_t *idx, double *balance,
                                          double *z_loss);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_H */
