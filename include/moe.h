/*
 * libmoe: Mixture-of-Experts layers in C, forward and backward.
 *
 * Dimension key used in every shape comment:
 *   T tokens, D model (input) dim, H expert hidden dim, O output dim,
 *   E experts, K top-k, C expert capacity, G groups.
 *
 * Conventions
 *   - Every call that can fail returns a moe_status (MOE_OK == 0). On failure
 *     moe_last_error() returns a message naming what was wrong (tensor, shape,
 *     byte offset); it is per thread and stays until the next failing call.
 *   - The library never aborts or exits on anything a caller or a file can get
 *     wrong. A failing call leaves its outputs and the layer's parameters as
 *     they were.
 *   - Tensors are row-major float32 in PyTorch's order. Parameters are stored
 *     exactly as the matching PyTorch module's state_dict stores them
 *     (nn.Linear weight is (out, in)), so a state_dict saved as safetensors
 *     loads with no conversion.
 *   - Gradients accumulate (+=) into the parameter table's grad buffers; call
 *     moe_layer_zero_grad() between steps.
 *   - Argument order: outputs, then inputs, then sizes.
 */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version: MAJOR is the soname (libmoe.so.0); the library is 0.x, so
 * the API may still change between minor versions. */
#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
#define MOE_VERSION "0.1.0"

/* The public API: libmoe.so exports these symbols only (the library is built
 * with -fvisibility=hidden). */
#if defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

/* ---------------------------------------------------------------- status */

typedef enum {
    MOE_OK = 0,
    MOE_ERR_ARG,         /* an argument or config value is invalid            */
    MOE_ERR_SHAPE,       /* a tensor's shape does not match what is expected  */
    MOE_ERR_NONFINITE,   /* NaN or Inf in an input, or produced from finite
                            inputs (float32 overflow): the message says which */
    MOE_ERR_NOMEM,       /* an allocation failed                              */
    MOE_ERR_IO,          /* a file could not be opened, read or written       */
    MOE_ERR_FORMAT,      /* a file or JSON text is malformed                  */
    MOE_ERR_NOTFOUND,    /* a named tensor or parameter is missing            */
    MOE_ERR_STATE,       /* call out of order (backward without a forward)    */
    MOE_ERR_UNSUPPORTED  /* valid request that this build does not implement  */
} moe_status;

/* Short fixed name of a status ("MOE_ERR_SHAPE"). Never NULL. */
MOE_API const char *moe_status_str(moe_status s);
/* Message of the last failing call on this thread ("" if none). Never NULL. */
MOE_API const char *moe_last_error(void);

/* Threads used by the library's OpenMP regions (its GEMMs included). n <= 0:
 * all cores. Returns the number now in use. */
MOE_API int moe_set_num_threads(int n);

/* ---------------------------------------------------------------- CPU kernels */

/* One build runs on every CPU of its architecture: the kernels (conversions,
 * elementwise math, the decode GEMVs, the bf16 GEMMs) are chosen once per
 * process, at the first call that needs one, from the CPU's features, capped
 * by the environment variable MOE_MAX_CPU_ISA (a level's name below), which
 * caps oneDNN's GEMMs too (unless ONEDNN_MAX_CPU_ISA is set: that cap is
 * kept). The name ignores case and surrounding blanks; an unknown one runs at
 * baseline, one above the CPU at the CPU's best, and both say so in
 * moe_cpu_notes(). Levels, lowest first:
 *   x86-64: baseline (x86-64-v2, SSE4.2), avx2 (AVX2 + FMA),
 *           avx512 (AVX-512 F/BW/DQ/VL), avx512_bf16 (+ native bf16 dot products)
 *   arm64:  baseline (plain C), neon (Advanced SIMD) */
typedef enum {
    MOE_ISA_BASELINE = 0,
    MOE_ISA_AVX2,
    MOE_ISA_AVX512,
    MOE_ISA_AVX512_BF16,
    MOE_ISA_NEON,
    MOE_ISA_COUNT
} moe_isa;

MOE_API moe_isa     moe_cpu_isa(void);         /* the level this process runs at */
MOE_API moe_isa     moe_cpu_isa_max(void);     /* the best level this CPU has    */
MOE_API const char *moe_isa_name(moe_isa isa); /* "avx2"; NULL if out of range   */
MOE_API const char *moe_cpu_model(void);       /* "AMD EPYC 9R14 ..." (cpuid's brand string) */
MOE_API const char *moe_cpu_features(void);    /* "sse4.2 avx avx2 fma avx512f ..." */
/* What the library fell back from, one line per kind, said once and then
 * counted ("... (12 times)"; "" if nothing): e.g. a bf16 GEMM that oneDNN
 * cannot run natively and that runs widened to fp32 instead. Never a silent
 * slow path. Never NULL; the text is the calling thread's copy. */
MOE_API const char *moe_cpu_notes(void);

/* ---------------------------------------------------------------- config */

typedef enum {
    MOE_LAYER_DENSE = 0, /* seed 002 BasicMoE: softmax gate over all E, linear experts */
    MOE_LAYER_TOPK  = 1, /* seed 004 SimpleMoE: top-k gate, 2-layer MLP experts        */
    MOE_LAYER_GSHARD = 2,      /* seeds 000/001 MoE: GShard top-2 gate, capacity, loss */
    MOE_LAYER_HIERARCHICAL = 3, /* seeds 000/001 two-level MoE: outer and inner top-2  */
    MOE_LAYER_SOFT_DYNAMIC = 4, /* seed 003 Soft MoE with dynamic slots (means of E tokens) */
    MOE_LAYER_SOFT = 5          /* Soft MoE (Puigcerver et al.) with learned slots (E,S,D)  */
} moe_layer_type;

/* What becomes of each token's second choice (GShard top-2 gating). */
typedef enum {
    MOE_SECOND_ALL = 0,     /* always kept                                          */
    MOE_SECOND_NONE,        /* always dropped                                       */
    MOE_SECOND_THRESHOLD,   /* kept if its normalised gate > threshold              */
    MOE_SECOND_RANDOM       /* kept if u < gate / max(threshold, eps), u ~ U[0,1)
                               from the layer's seeded counter-based RNG            */
} moe_second_policy;

typedef enum {
    MOE_ACT_RELU = 0,
    MOE_ACT_GELU,        /* exact (erf) GELU, as torch.nn.GELU()                 */
    MOE_ACT_SILU,
    MOE_ACT_LEAKY_RELU   /* slope cfg.leaky_slope (torch default 0.01)           */
} moe_activation;

typedef enum {
    MOE_EXPERT_MLP = 0,  /* Linear(D,H) -> act -> Linear(H,D)                     */
    MOE_EXPERT_SWIGLU,   /* Linear(D,2H) -> a*silu(g) -> Linear(H,D); a first half */
    MOE_EXPERT_GEGLU     /* Linear(D,2H) -> a*gelu(g) -> Linear(H,D); a first half */
} moe_expert_kind;

/* Router of the `topk` layer, the token-choice core (see README "Routers"). */
typedef enum {
    MOE_ROUTER_TOKEN_CHOICE = 0, /* each token picks K experts                      */
    MOE_ROUTER_EXPERT_CHOICE     /* each expert picks its top-C tokens (Zhou et al.) */
} moe_router_kind;

/* How the gate's logits z (T,E) become selection scores and combine weights. */
typedef enum {
    MOE_SCORE_TOPK_SOFTMAX = 0, /* seed 004: the K largest logits, softmax over those K    */
    MOE_SCORE_SOFTMAX,          /* p = softmax(z) over all E, the K largest p, weights p
                                   (renormalised over the K if cfg.normalize): Switch,
                                   Mixtral, Qwen                                          */
    MOE_SCORE_SIGMOID           /* s = sigmoid(z), the K largest s + bias, weights s
                                   (renormalised if cfg.normalize): DeepSeek-V3           */
} moe_score_func;

typedef struct {
    moe_layer_type  type;
    int64_t         input_dim;    /* D                                         */
    int64_t         hidden_dim;   /* H (topk)                                  */
    int64_t         output_dim;   /* O (dense); topk: ignored, output is D     */
    int             num_experts;  /* E >= 1                                    */
    int             top_k;        /* K, 1 <= K <= E (topk)                     */
    moe_activation  activation;   /* topk MLP experts                          */
    float           leaky_slope;  /* MOE_ACT_LEAKY_RELU                        */
    moe_expert_kind expert;       /* topk                                      */
    uint64_t        seed;         /* drives init and every random choice       */
    /* gshard and hierarchical (defaults are the seed module's) */
    int             num_experts_inner;      /* hierarchical: Ei; num_experts is Eo */
    moe_second_policy second_policy_train;  /* default random                    */
    moe_second_policy second_policy_eval;   /* default random                    */
    double          second_threshold_train; /* default 0.2                       */
    double          second_threshold_eval;  /* default 0.2                       */
    double          capacity_factor_train;  /* default 1.25, must be > 0         */
    double          capacity_factor_eval;   /* default 2.0, must be > 0          */
    double          loss_coef;              /* default 1e-2                      */
    /* soft_dynamic and soft (defaults are the seed module's): experts are
     * Linear(D,H) -> gelu -> dropout -> Linear(H,D), or with expert GEGLU
     * Linear(D,2H) -> a*gelu(g) -> dropout -> Linear(H,D). hidden_dim 0 means
     * int(D * expert_mult) (MLP) or int(D * expert_mult * 2/3) (GLU).       */
    double          expert_mult;            /* default 4                         */
    float           dropout;                /* default 0; in [0, 1), train only  */
    int64_t         slots_per_expert;       /* soft: S >= 1                      */
    /* topk router options (defaults give seed 004's router). Capacity uses
     * capacity_factor_train/_eval above, whose topk default is 0: dropless.
     * Token choice, cf > 0: each expert takes at most C = ceil(cf * N * K / E)
     * assignments per group of N tokens, first choices of every token before
     * second choices, in token order; an assignment over capacity is dropped
     * (contributes nothing). Expert choice: each expert takes its C =
     * min(N, ceil(cf * N / E)) highest-scoring tokens per group (cf > 0). */
    moe_router_kind router;                 /* default token choice              */
    moe_score_func  score;                  /* default MOE_SCORE_TOPK_SOFTMAX    */
    int             normalize;              /* softmax, sigmoid: weights / their sum over the K */
    double          route_scale;            /* weights times this, default 1     */
    double          jitter;                 /* train only: gate input x * U(1-j, 1+j) elementwise
                                               (Switch's multiplicative jitter), 0 off */
    double          balance_coef;           /* Switch balance loss E' * sum_e f_e * P_e, per
                                               group, averaged: f_e the share of the group's
                                               N*K selections (before capacity) going to e,
                                               P_e the mean router probability (softmax over
                                               the enabled experts; sigmoid: s / sum s); E'
                                               enabled experts. Balanced routing gives 1.  */
    double          z_loss_coef;            /* ST-MoE z-loss: mean_t logsumexp(z_t)^2 (all E) */
    int             num_shared;             /* DeepSeekMoE shared experts, on every token (weight 1) */
    int             shared_gate;            /* 1: shared expert i weighted sigmoid(g_i . x)
                                               (Qwen-MoE), g = shared_gate.weight (Ns,D) */
    int             expert_bias;            /* 1: selection bias b (E) added to the scores for
                                               selection only (DeepSeek-V3), a state buffer
                                               "gate.e_score_correction_bias", not a gradient
                                               parameter; see moe_layer_update_bias        */
    double          bias_update_rate;       /* gamma of the bias update (DeepSeek-V3: 1e-3);
                                               used only with expert_bias           */
    int             num_groups;             /* G: experts in G equal groups; 0 or 1: no groups */
    int             topk_groups;            /* tokens choose among the experts of the best M
                                               groups (group score: sum of its top-2 scores + bias) */
    /* bf16 mixed precision, as torch.autocast('cpu', dtype=torch.bfloat16)
     * runs the experts' nn.Linear layers (JSON "bf16": true, `--bf16`): the
     * expert GEMMs, forward and backward, take their inputs rounded to bf16
     * (weights through bf16 copies, activations and gradients converted on
     * the fly) and accumulate and write fp32. Parameters, gradients and the
     * optimizer state stay fp32 (master weights); the router, biases,
     * activations, combine and losses are fp32. The bf16 copies are refreshed
     * at the first forward after the parameters change (moe_optim_step,
     * moe_layer_load, moe_layer_init_params, moe_layer_param/find_param, or
     * moe_layer_params_changed). Implemented for topk, gshard and
     * hierarchical; the other types return MOE_ERR_UNSUPPORTED at create.
     * 0 (default): fp32 everywhere.
     * MOE_BF16_WEIGHTS (2; JSON "bf16": "weights", `moe forward
     * --bf16-weights`): inference from bf16 weights. As 1, but the experts'
     * GEMM weights exist only as bf16: moe_layer_create_load copies a BF16
     * file's bytes into them (never widened to fp32; an F32 file is rounded
     * once) and their fp32 parameters are never written (they read as 0 and
     * take no memory). Made only by moe_layer_create_load, in one process;
     * backward, save, gather and a second load return MOE_ERR_UNSUPPORTED. */
    int             bf16;
} moe_config;
#define MOE_BF16_WEIGHTS 2

/* Set the router fields of a topk config c to a named recipe: "topk" (seed
 * 004), "switch" (K = 1, softmax, no renormalisation, capacity 1.25 / 2.0,
 * jitter 0.01, balance 0.01), "mixtral" (softmax, renormalised, dropless,
 * balance 0.01), "st_moe" (softmax, renormalised, capacity 1.25 / 2.0, balance
 * 0.01, z-loss 1e-3), "deepseek_v3" (sigmoid, renormalised, selection bias
 * updated with gamma 1e-3, dropless, no balance loss), "expert_choice"
 * (expert choice, softmax, capacity 2 / 2). Sizes (E, K except Switch's 1,
 * groups, shared experts) are left as they are. */
MOE_API moe_status moe_config_set_router(moe_config *c, const char *recipe);
MOE_API const char *moe_score_func_name(moe_score_func f);   /* "topk_softmax", "softmax", "sigmoid" */
MOE_API const char *moe_router_kind_name(moe_router_kind k); /* "token_choice", "expert_choice" */

/* Fill c with the defaults of the seed module of this type (SimpleMoE:
 * E=4, D=64, H=128, K=2, relu; BasicMoE: E=4, D=64, O=64; GShard MoE: E=16,
 * D=64, H=0 meaning 4*D, relu, policies random, thresholds 0.2, capacity
 * factors 1.25 (train) and 2 (eval), loss_coef 1e-2; hierarchical: the same
 * with (Eo, Ei) = (4, 4); soft_dynamic: E=4, D=64, expert_mult 4, GELU
 * MLP experts, dropout 0; soft: the same with S=1 slot per expert). */
MOE_API void moe_config_init(moe_config *c, moe_layer_type type);

/* Parse a layer config from JSON text: {"type": "topk"|"dense", plus the seed
 * module's constructor argument names: num_experts, input_dim, hidden_dim,
 * output_dim, top_k; "activation": "relu"|"gelu"|"silu"|"leaky_relu";
 * "expert": "mlp"|"swiglu"|"geglu"; "seed": N}. For "gshard" and
 * "hierarchical": dim, num_experts (an int; a pair [Eo, Ei] for hierarchical),
 * hidden_dim, activation, second_policy_train/_eval ("all"|"none"|"threshold"|
 * "random"), second_threshold_train/_eval, capacity_factor_train/_eval,
 * loss_coef, seed. For "soft_dynamic" and "soft": dim, num_experts,
 * expert_mult, dropout, geglu (bool), seed; "soft" also num_slots (or its
 * synonym slots_per_expert) or seq_len (S = seq_len / num_experts). topk
 * router keys: "router" (a recipe of moe_config_set_router, applied before
 * the other keys, or "token_choice"), score ("topk_softmax"|"softmax"|
 * "sigmoid"), normalize (bool), route_scale, capacity_factor (both modes) or
 * capacity_factor_train/_eval, jitter, balance_coef, z_loss_coef,
 * num_shared_experts, shared_gate (bool), expert_bias (bool),
 * bias_update_rate, num_groups, topk_groups. Unknown keys are an error. */
MOE_API moe_status moe_config_from_json(moe_config *out, const char *json_text);
/* Human-readable names, NULL for out-of-range values. */
MOE_API const char *moe_layer_type_name(moe_layer_type t);
MOE_API const char *moe_activation_name(moe_activation a);
MOE_API const char *moe_expert_kind_name(moe_expert_kind k);
MOE_API const char *moe_second_policy_name(moe_second_policy p);

/* ---------------------------------------------------------------- layer */

typedef struct moe_layer moe_layer;

typedef struct {
    const char *name;      /* state_dict name, e.g. "experts.3.net.0.weight"   */
    int         ndim;
    int64_t     shape[4];
    int64_t     numel;
    float      *data;      /* numel floats, owned by the layer                 */
    float      *grad;      /* numel floats, accumulated by backward            */
} moe_param;

/* Create a layer; parameters are initialised from cfg->seed as PyTorch's
 * nn.Linear does (uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and
 * bias), gradients zeroed. */
MOE_API moe_status moe_layer_create(moe_layer **out, const moe_config *cfg);
MOE_API void       moe_layer_free(moe_layer *l);
MOE_API const moe_config *moe_layer_config(const moe_layer *l);
/* Width of x rows (D) and of y rows (D for topk, O for dense). */
MOE_API int64_t moe_layer_input_dim(const moe_layer *l);
MOE_API int64_t moe_layer_output_dim(const moe_layer *l);
/* 1 if this layer type returns an auxiliary (balance) loss. */
MOE_API int     moe_layer_has_aux_loss(const moe_layer *l);

/* Parameter table in state_dict order. */
MOE_API int              moe_layer_num_params(const moe_layer *l);
MOE_API moe_param       *moe_layer_param(moe_layer *l, int i);          /* NULL if out of range */
MOE_API moe_param       *moe_layer_find_param(moe_layer *l, const char *name); /* NULL if absent */
MOE_API int64_t          moe_layer_num_weights(const moe_layer *l);      /* total floats */
MOE_API void             moe_layer_zero_grad(moe_layer *l);
/* Say that parameter values were written directly (through a pointer held
 * from before, by another library, ...): a bf16 layer (cfg.bf16) then
 * refreshes its bf16 weight copies at its next forward. Cheap; any layer. */
MOE_API void             moe_layer_params_changed(moe_layer *l);
/* Re-initialise every parameter from seed (same rule as create). */
MOE_API void             moe_layer_init_params(moe_layer *l, uint64_t seed);

/* Forward flags, or-ed together: the mode (PyTorch's module.train() and
 * .eval()) and whether the forward keeps what a backward needs (PyTorch's
 * torch.no_grad()). The mode changes what the forward computes, not whether
 * gradients flow: a backward follows an eval-mode forward as it follows a
 * train-mode one (input attributions, fine-tuning with dropout off, checking
 * the eval path), as in PyTorch.
 *   MOE_EVAL     eval mode: second-expert policy, threshold and capacity
 *                factor of eval; no dropout, no jitter; the selection-bias
 *                loads are not counted
 *   MOE_TRAIN    train mode: the train settings, dropout, jitter, bias loads
 *   MOE_NO_GRAD  keep nothing for backward (inference, decode): the input is
 *                not copied, and a backward after this forward is refused
 *                with MOE_ERR_STATE. Results are the same bits as without it.
 * The old int argument `train` keeps its meaning: 1 is MOE_TRAIN, 0 MOE_EVAL. */
#define MOE_EVAL    0
#define MOE_TRAIN   1
#define MOE_NO_GRAD 2

/* Forward.
 *   y        (T, out_dim)  written
 *   aux_loss scalar, may be NULL; set to 0 for layers without one
 *   x        (T, D)        read; NaN/Inf is an error
 *   flags    MOE_TRAIN or MOE_EVAL, optionally | MOE_NO_GRAD (above);
 *            other bits: MOE_ERR_ARG
 * T == 0 is an error (empty batch). The T rows form one group (sequence);
 * for gshard and hierarchical, where capacity and the balance loss are per
 * group, use moe_layer_forward_seq.
 * Results are checked: when y or aux_loss is NaN or Inf although x and the
 * parameters are finite (float32 overflow, e.g. a z-loss of logits near
 * 1e30), the call returns MOE_ERR_NONFINITE with a message naming the tensor,
 * the first bad element and the likely cause; y and aux_loss then hold what
 * was computed (to inspect), and no backward may follow. The check reads y
 * once (well under 1% of a forward+backward; README "Reliability"). */
MOE_API moe_status moe_layer_forward(moe_layer *l, float *y, float *aux_loss,
                             const float *x, int64_t T, int flags);
/* Forward of x (B, N, D): B groups (sequences) of N tokens; y (B, N, out_dim).
 * The same as moe_layer_forward with T = B*N for layers without groups. */
MOE_API moe_status moe_layer_forward_seq(moe_layer *l, float *y, float *aux_loss,
                                 const float *x, int64_t B, int64_t N, int flags);

/* Forward with a token mask: mask (B, N), nonzero for a real token, 0 for a
 * masked one (padding); NULL means every token is real. Only the soft layers
 * take a mask (others: MOE_ERR_UNSUPPORTED). A masked token gets no dispatch
 * weight; its own output row is what the seed module gives it (combine
 * weights uniform over all slots), and a row with every token masked gives
 * finite output (uniform dispatch and combine), never NaN. */
MOE_API moe_status moe_layer_forward_masked(moe_layer *l, float *y, float *aux_loss, const float *x,
                                    const uint8_t *mask, int64_t B, int64_t N, int flags);
/* Forward of images x (B, D, h, w) (channels first, as PyTorch's conv
 * layers): each image is a group of N = h*w tokens, token i*w + j being
 * x[b, :, i, j]; y (B, out_dim, h, w). mask (B, h*w) or NULL as above. After
 * this forward, moe_layer_backward takes dy (B, out_dim, h, w) and writes dx
 * (B, D, h, w). */
MOE_API moe_status moe_layer_forward_image(moe_layer *l, float *y, float *aux_loss, const float *x,
                                   const uint8_t *mask, int64_t B, int64_t h, int64_t w, int flags);

/* Backward of the last forward (train or eval mode; not after MOE_NO_GRAD,
 * a failed forward, or moe_layer_set_routing: MOE_ERR_STATE).
 *   dx    (T, D)        written (not accumulated); may be NULL
 *   dy    (T, out_dim)  read; NaN/Inf is an error
 *   daux  weight of the auxiliary loss's gradient (ignored without one)
 * Parameter gradients accumulate (+=). Results are checked as forward's are:
 * a NaN or Inf in dx or in a parameter gradient from finite dy and
 * parameters (float32 overflow) returns MOE_ERR_NONFINITE naming the tensor
 * and element; the gradients then hold what was computed (moe_optim_step
 * refuses them; call moe_layer_zero_grad before the next step). */
MOE_API moe_status moe_layer_backward(moe_layer *l, float *dx, const float *dy, float daux);

/* Runtime routing control of a topk layer, without rebuilding it; it holds
 * for every later forward until changed (and a pending backward is
 * invalidated: run forward again).
 *   top_k          0: the config's K; else 1..E (token choice only)
 *   expert_mask    (E) 0: the expert is disabled and gets no tokens (its
 *                  logit is left out of the softmax and of selection); NULL:
 *                  all enabled
 *   force_experts  (E) 1: every token uses this expert (it takes one of the K
 *                  picks, before the free picks; token choice only); NULL: none
 * Errors: k out of range, fewer enabled experts than k, more forced experts
 * than k, a forced expert disabled, expert choice with k or forced experts,
 * a layer that is not topk (MOE_ERR_UNSUPPORTED). On error nothing changes. */
MOE_API moe_status moe_layer_set_routing(moe_layer *l, int top_k, const uint8_t *expert_mask,
                                 const uint8_t *force_experts);

/* State buffers: tensors saved and loaded with the parameters but not trained
 * (grad is NULL; give only moe_layer_param's to an optimizer). The topk
 * layer with expert_bias has one: "gate.e_score_correction_bias" (E). */
MOE_API int        moe_layer_num_buffers(const moe_layer *l);
MOE_API moe_param *moe_layer_buffer(moe_layer *l, int i);   /* NULL if out of range */

/* Auxiliary-loss-free balancing (DeepSeek-V3): call after each successful
 * optimizer step. With expert_bias and bias_update_rate g > 0, for every
 * enabled expert e: b_e += g * sign(mean load - load_e), the loads being the
 * selections (before capacity) counted over the train-mode forwards since the
 * last call; the counts then restart. A no-op (MOE_OK) for other layers. */
MOE_API moe_status moe_layer_update_bias(moe_layer *l);

/* Expert parallelism (layers created by moe_layer_create_mpi, moe_mpi.h).
 * moe_layer_ep_info: this rank, the number of ranks and the routed experts
 * this rank holds, [first, first + count) (hierarchical: outer experts, each
 * with its inner gate and inner experts); a one-process layer is rank 0 of
 * 1 holding all. moe_layer_param_is_expert: 1 if parameter i is an expert's
 * (held by one rank; its gradient stays there; hierarchical: experts.* and
 * gate_inner.*), 0 if replicated (the gate, shared experts, norms). moe_layer_ep_traffic: seconds this rank spent in
 * the exchanges (counts and rows, forward and backward) and the bytes it sent
 * to other ranks in them, since the layer was created (0 in one process). */
MOE_API moe_status moe_layer_ep_info(const moe_layer *l, int *rank, int *size, int *first, int *count);
MOE_API int        moe_layer_param_is_expert(const moe_layer *l, int i);
MOE_API void       moe_layer_ep_traffic(const moe_layer *l, double *seconds, int64_t *bytes);
/* Elements of the whole tensor before this rank's part of parameter i (a
 * gshard expert tensor split over the ranks along dim 0), else 0. */
MOE_API int64_t    moe_layer_param_offset(const moe_layer *l, int i);
/* Sum the gradients of the replicated parameters over the ranks (an
 * MPI_Allreduce, in place; collective). Call once per optimizer step, after
 * the backward(s) and before moe_optim_step. Expert gradients are left as
 * they are (each has one owner). A one-process layer: MOE_OK, no-op. */
MOE_API moe_status moe_layer_allreduce_grads(moe_layer *l);

/* The whole layer on rank 0: full, a one-process layer of the same config
 * (moe_layer_create) on rank 0 and NULL elsewhere, receives every rank's
 * parameters and gradients (expert tensors from their owners, replicated
 * ones and the buffers from rank 0; call moe_layer_allreduce_grads first
 * for the summed replicated gradients). Collective. moe_layer_save on an
 * expert-parallel layer does this and writes the one file a single process
 * writes; moe_layer_load reads a rank's part of such a file (every rank must
 * see the path). */
MOE_API moe_status moe_layer_gather(moe_layer *l, moe_layer *full);

/* Routing statistics of the last forward. */
typedef struct {
    int64_t tokens;          /* T of the last forward                          */
    int64_t assignments;     /* token-expert pairs computed (T*K for topk)     */
    int64_t dropped;         /* assignments dropped for capacity (gshard and
                                hierarchical: first and second choices, both
                                levels; 0 for topk and dense)                  */
    int64_t second_candidates; /* top-2 layers: rows that had a second choice  */
    int64_t second_kept;     /* ... and kept it (policy and capacity)          */
    int     n_experts;       /* length of expert_counts (Eo*Ei hierarchical)   */
    const int64_t *expert_counts; /* (n_experts) rows each expert processed
                                     (routed experts; shared ones take every token) */
    int     top_k;           /* topk: K in effect (runtime control), else 0    */
    int64_t capacity;        /* topk with capacity: C per group, else 0        */
    double  balance_loss;    /* topk: the balance loss before its coefficient  */
    double  z_loss;          /* topk: the z-loss before its coefficient        */
    const float *expert_bias; /* (n_experts) selection bias, or NULL           */
} moe_stats;
MOE_API moe_status moe_layer_stats(const moe_layer *l, moe_stats *out);

/* Position of the layer's random stream: the number of forwards run so far
 * (every random choice of a forward, a `random` second-expert draw or a
 * dropout mask, is keyed by the seed and this count). Save it in a checkpoint
 * and restore it to resume bit for bit. */
MOE_API uint64_t moe_layer_rng_position(const moe_layer *l);
MOE_API void     moe_layer_set_rng_position(moe_layer *l, uint64_t pos);

/* Weights as safetensors (names and shapes of the state_dict). Load checks
 * every tensor before copying any: a missing, extra or mis-shaped tensor is an
 * error naming it, and the parameters stay as they were. F32, F64, F16 and
 * BF16 tensors are converted to float32. Save is atomic (temp file + rename). */
MOE_API moe_status moe_layer_load(moe_layer *l, const char *path);
MOE_API moe_status moe_layer_save(moe_layer *l, const char *path);
/* moe_layer_create followed by moe_layer_load(path), in one call and without
 * the random initialisation the load would overwrite: the parameters (every
 * tensor of the state_dict, shapes as cfg gives them, F32/F64/F16/BF16) and
 * buffers are read from the file straight into the layer, gradients zeroed.
 * The layer is bit-identical to the create + load one. Errors: those of
 * moe_layer_create (cfg) and moe_layer_load (the file: MOE_ERR_IO,
 * MOE_ERR_FORMAT, MOE_ERR_NOTFOUND, MOE_ERR_SHAPE, MOE_ERR_UNSUPPORTED,
 * MOE_ERR_NONFINITE), MOE_ERR_ARG for a NULL argument; on error *out is NULL
 * and nothing is leaked. One process (expert-parallel layers: create, then
 * moe_layer_load). */
MOE_API moe_status moe_layer_create_load(moe_layer **out, const moe_config *cfg, const char *path);

/* ---------------------------------------------------------------- optim */

typedef enum { MOE_OPTIM_SGD = 0, MOE_OPTIM_ADAMW = 1 } moe_optim_type;

typedef struct {
    moe_optim_type type;
    float lr;            /* default 1e-3                                        */
    float beta1, beta2;  /* AdamW, default 0.9, 0.999                           */
    float eps;           /* AdamW, default 1e-8                                 */
    float weight_decay;  /* decoupled (AdamW) or L2 added to grad (SGD); 0.01 / 0 */
    float momentum;      /* SGD, default 0                                      */
} moe_optim_config;

MOE_API void moe_optim_config_init(moe_optim_config *c, moe_optim_type type);

typedef struct moe_optim moe_optim;

/* The optimizer keeps pointers to params[i].data/grad (which must outlive it)
 * and owns its state. Semantics follow torch.optim.AdamW / SGD. */
MOE_API moe_status moe_optim_create(moe_optim **out, const moe_optim_config *cfg,
                            moe_param *params, int n_params);
MOE_API void       moe_optim_free(moe_optim *o);
MOE_API void       moe_optim_set_lr(moe_optim *o, float lr);
/* One step. If any gradient is NaN/Inf the step is skipped, nothing changes,
 * and MOE_ERR_NONFINITE names the parameter. */
MOE_API moe_status moe_optim_step(moe_optim *o);
MOE_API int64_t    moe_optim_steps(const moe_optim *o);
/* Checkpoints: the state of parameter i (the order given to create): *m and *v
 * point at its numel floats of first and second moments (AdamW) or momentum
 * (SGD: *v is NULL). Read them to save, write them to restore. */
MOE_API moe_status moe_optim_state(moe_optim *o, int i, float **m, float **v);
/* Restore the step count (bias correction) from a checkpoint; steps >= 0. */
MOE_API moe_status moe_optim_set_steps(moe_optim *o, int64_t steps);

/* ---------------------------------------------------------------- gemm */

/* C (M,N) = alpha * op(A) op(B) + beta * C, row-major float32, through
 * oneDNN's sgemm with libmoe's own threading: C is cut into at most 4 tiles
 * along its longer side (the cut depends only on the shape), each one
 * single-threaded oneDNN call, so the result has the same bits on any thread
 * count, inside or outside an OpenMP parallel region (a GEMM left to its own
 * threads changes the last bits with the thread count). op(A) (M,K) is A (M,K) with lda, or
 * A (K,M) when ta; op(B) (K,N) is B (K,N) with ldb, or B (N,K) when tb. Does
 * nothing when M or N is 0; with K == 0 it scales C by beta. */
MOE_API void moe_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
               const float *A, int64_t lda, const float *B, int64_t ldb,
               float beta, float *C, int64_t ldc);

/* ---------------------------------------------------------------- safetensors */

typedef enum {
    MOE_DT_F64 = 0, MOE_DT_F32, MOE_DT_F16, MOE_DT_BF16,
    MOE_DT_I64, MOE_DT_I32, MOE_DT_I16, MOE_DT_I8,
    MOE_DT_U64, MOE_DT_U32, MOE_DT_U16, MOE_DT_U8,
    MOE_DT_BOOL, MOE_DT_F8_E4M3, MOE_DT_F8_E5M2,
    MOE_DT_COUNT
} moe_dtype;

MOE_API const char *moe_dtype_name(moe_dtype t);   /* "F32"; NULL if out of range */
MOE_API size_t      moe_dtype_size(moe_dtype t);   /* bytes per element; 0 if out of range */

#define MOE_ST_MAX_DIMS 8

typedef struct {
    const char *name;
    moe_dtype   dtype;
    int         ndim;
    int64_t     shape[MOE_ST_MAX_DIMS];
    int64_t     numel;
    const void *data;     /* inside the file's buffer; may be unaligned */
    size_t      nbytes;
} moe_st_tensor;

typedef struct moe_st_file moe_st_file;

/* Map a file (mmap, read-only, private: tensors' data points into the
 * mapping until moe_st_close) and validate it whole: header length, JSON,
 * every dtype, shape, offset and size checked against the file's size when
 * opened (with overflow checks; a file shorter than its header says is
 * MOE_ERR_FORMAT, nothing past its end is touched), no overlapping tensors,
 * the checksum if the file has one, before any tensor is exposed. The file
 * must not be truncated by another process while it is open. */
MOE_API moe_status moe_st_open(moe_st_file **out, const char *path);
/* Same from a buffer the caller keeps alive while the file is open. */
MOE_API moe_status moe_st_parse(moe_st_file **out, const void *buf, size_t len);
MOE_API void       moe_st_close(moe_st_file *f);
MOE_API int                  moe_st_count(const moe_st_file *f);
MOE_API const moe_st_tensor *moe_st_tensor_at(const moe_st_file *f, int i);
MOE_API const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name);
/* "__metadata__" value for key, NULL if absent. */
MOE_API const char          *moe_st_metadata(const moe_st_file *f, const char *key);
/* Copy tensor `name` into dst as float32, converting F64/F16/BF16. If ndim >= 0
 * the tensor's shape must equal shape[0..ndim); a scalar (ndim 0) may also be
 * saved with shape (1), as torch.tensor([1.0]) is. Errors name the tensor. */
MOE_API moe_status moe_st_read_f32(float *dst, const moe_st_file *f, const char *name,
                           int ndim, const int64_t *shape);

typedef struct {
    const char *name;
    moe_dtype   dtype;
    int         ndim;
    int64_t     shape[MOE_ST_MAX_DIMS];
    const void *data;     /* numel * dtype_size bytes */
} moe_st_entry;

/* Write entries (and metadata pairs meta_kv[2*i], meta_kv[2*i+1]) atomically:
 * a temp file in the same directory, fsync, rename. Names must be unique. */
MOE_API moe_status moe_st_write(const char *path, const moe_st_entry *entries, int n,
                        const char *const *meta_kv, int n_meta);

#ifdef __cplusplus
}
#endif
#endif /* MOE_H */
