/*
 * Layer configs from JSON (parsed with cJSON). Keys are the seed modules'
 * own constructor argument names, so a PyTorch user's kwargs carry over.
 */
#include "internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

static moe_status get_int(int64_t *out, const cJSON *v, int64_t lo, int64_t hi) {
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < (double)lo ||
        v->valuedouble > (double)hi)
        return moe_err(MOE_ERR_ARG, "config key \"%s\" must be an integer in [%lld, %lld]", v->string,
                       (long long)lo, (long long)hi);
    *out = (int64_t)v->valuedouble;
    return MOE_OK;
}

static int lookup(const char *s, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (names[i] && strcmp(s, names[i]) == 0) return i;
    return -1;
}

static moe_status get_real(double *out, const cJSON *v) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return moe_err(MOE_ERR_ARG, "config key \"%s\" must be a finite number", v->string);
    *out = v->valuedouble;
    return MOE_OK;
}

static const char *const acts[] = {"relu", "gelu", "silu", "leaky_relu"};
static const char *const policies[] = {"all", "none", "threshold", "random"};

/* Keys of the gshard and hierarchical layers (seed MoE constructor names). */
static moe_status gshard_key(moe_config *c, const cJSON *v, int *known) {
    const char *k = v->string;
    int64_t n = 0;
    double r = 0;
    moe_status st = MOE_OK;
    *known = 1;
    if (strcmp(k, "dim") == 0) {
        if ((st = get_int(&n, v, 0, INT32_MAX)) == MOE_OK) c->input_dim = n;
    } else if (strcmp(k, "hidden_dim") == 0) {
        if (cJSON_IsNull(v)) c->hidden_dim = 0; /* None: 4 * dim */
        else if ((st = get_int(&n, v, 1, INT32_MAX)) == MOE_OK) c->hidden_dim = n;
    } else if (strcmp(k, "num_experts") == 0) {
        if (c->type == MOE_LAYER_HIERARCHICAL) {
            int64_t eo = 0, ei = 0;
            if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2)
                return moe_err(MOE_ERR_ARG, "hierarchical \"num_experts\" must be a pair [outer, inner]");
            if ((st = get_int(&eo, cJSON_GetArrayItem(v, 0), 0, 65536)) != MOE_OK ||
                (st = get_int(&ei, cJSON_GetArrayItem(v, 1), 0, 65536)) != MOE_OK)
                return moe_err(MOE_ERR_ARG, "hierarchical \"num_experts\" must be a pair of integers in [1, 65536]");
            c->num_experts = (int)eo, c->num_experts_inner = (int)ei;
        } else if ((st = get_int(&n, v, 0, 1 << 30)) == MOE_OK) {
            c->num_experts = (int)n;
        }
    } else if (strcmp(k, "activation") == 0) {
        int i = cJSON_IsString(v) ? lookup(v->valuestring, acts, 4) : -1;
        if (i < 0) st = moe_err(MOE_ERR_ARG, "\"activation\" must be one of relu, gelu, silu, leaky_relu");
        else c->activation = (moe_activation)i;
    } else if (strcmp(k, "second_policy_train") == 0 || strcmp(k, "second_policy_eval") == 0) {
        int i = cJSON_IsString(v) ? lookup(v->valuestring, policies, 4) : -1;
        if (i < 0)
            st = moe_err(MOE_ERR_ARG, "\"%s\" must be one of all, none, threshold, random (got %s%s%s)", k,
                         cJSON_IsString(v) ? "\"" : "", cJSON_IsString(v) ? v->valuestring : "a non-string",
                         cJSON_IsString(v) ? "\"" : "");
        else if (k[14] == 't') c->second_policy_train = (moe_second_policy)i;
        else c->second_policy_eval = (moe_second_policy)i;
    } else if (strcmp(k, "second_threshold_train") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->second_threshold_train = r;
    } else if (strcmp(k, "second_threshold_eval") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->second_threshold_eval = r;
    } else if (strcmp(k, "capacity_factor_train") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->capacity_factor_train = r;
    } else if (strcmp(k, "capacity_factor_eval") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->capacity_factor_eval = r;
    } else if (strcmp(k, "loss_coef") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->loss_coef = r;
    } else if (strcmp(k, "seed") == 0) {
        if ((st = get_int(&n, v, 0, INT64_MAX / 2)) == MOE_OK) c->seed = (uint64_t)n;
    } else {
        *known = 0;
    }
    return st;
}

/* Keys of the soft layers (seed 003 DynamicSlotsSoftMoE and SoftMoE
 * constructor names). seq_len is kept aside: S = seq_len / E once E is known. */
static moe_status soft_key(moe_config *c, const cJSON *v, int *known, int64_t *seq_len, int *have_slots) {
    const char *k = v->string;
    int64_t n = 0;
    double r = 0;
    moe_status st = MOE_OK;
    int soft = c->type == MOE_LAYER_SOFT;
    *known = 1;
    if (strcmp(k, "dim") == 0) {
        if ((st = get_int(&n, v, 0, INT32_MAX)) == MOE_OK) c->input_dim = n;
    } else if (strcmp(k, "num_experts") == 0) {
        if ((st = get_int(&n, v, 0, 1 << 30)) == MOE_OK) c->num_experts = (int)n;
    } else if (strcmp(k, "expert_mult") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->expert_mult = r;
    } else if (strcmp(k, "dropout") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) {
            if (r < 0.0 || r >= 1.0) st = moe_err(MOE_ERR_ARG, "\"dropout\" must be in [0, 1), got %g", r);
            else c->dropout = (float)r;
        }
    } else if (strcmp(k, "geglu") == 0) {
        if (!cJSON_IsBool(v)) st = moe_err(MOE_ERR_ARG, "\"geglu\" must be true or false");
        else c->expert = cJSON_IsTrue(v) ? MOE_EXPERT_GEGLU : MOE_EXPERT_MLP;
    } else if (strcmp(k, "seed") == 0) {
        if ((st = get_int(&n, v, 0, INT64_MAX / 2)) == MOE_OK) c->seed = (uint64_t)n;
    } else if (soft && (strcmp(k, "num_slots") == 0 || strcmp(k, "slots_per_expert") == 0)) {
        if (*have_slots) return moe_err(MOE_ERR_ARG, "soft: give one of num_slots, slots_per_expert, seq_len");
        if ((st = get_int(&n, v, 1, INT32_MAX)) == MOE_OK) c->slots_per_expert = n, *have_slots = 1;
    } else if (soft && strcmp(k, "seq_len") == 0) {
        if (*have_slots) return moe_err(MOE_ERR_ARG, "soft: give one of num_slots, slots_per_expert, seq_len");
        if ((st = get_int(&n, v, 1, INT32_MAX)) == MOE_OK) *seq_len = n, *have_slots = 1;
    } else {
        *known = 0;
    }
    return st;
}

static moe_status get_bool(int *out, const cJSON *v) {
    if (!cJSON_IsBool(v)) return moe_err(MOE_ERR_ARG, "config key \"%s\" must be true or false", v->string);
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

/* Router keys of the topk layer ("router" itself is applied before all keys). */
static moe_status router_key(moe_config *c, const cJSON *v, int *known) {
    static const char *const scores[] = {"topk_softmax", "softmax", "sigmoid"};
    const char *k = v->string;
    int64_t n = 0;
    double r = 0;
    moe_status st = MOE_OK;
    *known = 1;
    if (strcmp(k, "router") == 0) {
        /* applied first */
    } else if (strcmp(k, "score") == 0) {
        int i = cJSON_IsString(v) ? lookup(v->valuestring, scores, 3) : -1;
        if (i < 0) st = moe_err(MOE_ERR_ARG, "\"score\" must be one of topk_softmax, softmax, sigmoid");
        else c->score = (moe_score_func)i;
    } else if (strcmp(k, "normalize") == 0) {
        st = get_bool(&c->normalize, v);
    } else if (strcmp(k, "shared_gate") == 0) {
        st = get_bool(&c->shared_gate, v);
    } else if (strcmp(k, "expert_bias") == 0) {
        st = get_bool(&c->expert_bias, v);
    } else if (strcmp(k, "route_scale") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->route_scale = r;
    } else if (strcmp(k, "capacity_factor") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->capacity_factor_train = c->capacity_factor_eval = r;
    } else if (strcmp(k, "capacity_factor_train") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->capacity_factor_train = r;
    } else if (strcmp(k, "capacity_factor_eval") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->capacity_factor_eval = r;
    } else if (strcmp(k, "jitter") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->jitter = r;
    } else if (strcmp(k, "balance_coef") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->balance_coef = r;
    } else if (strcmp(k, "z_loss_coef") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->z_loss_coef = r;
    } else if (strcmp(k, "bias_update_rate") == 0) {
        if ((st = get_real(&r, v)) == MOE_OK) c->bias_update_rate = r;
    } else if (strcmp(k, "num_shared_experts") == 0) {
        if ((st = get_int(&n, v, 0, 1024)) == MOE_OK) c->num_shared = (int)n;
    } else if (strcmp(k, "num_groups") == 0) {
        if ((st = get_int(&n, v, 0, 65536)) == MOE_OK) c->num_groups = (int)n;
    } else if (strcmp(k, "topk_groups") == 0) {
        if ((st = get_int(&n, v, 0, 65536)) == MOE_OK) c->topk_groups = (int)n;
    } else {
        *known = 0;
    }
    return st;
}

moe_status moe_config_from_json(moe_config *out, const char *json_text) {
    moe_err_clear();
    if (!out || !json_text) return moe_err(MOE_ERR_ARG, "moe_config_from_json: NULL argument");
    cJSON *root = cJSON_Parse(json_text);
    if (!root) return moe_err(MOE_ERR_FORMAT, "layer config is not valid JSON (near: %.40s)",
                              cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() : "?");
    moe_status st = MOE_OK;
    moe_config c;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "type");
    const char *types[] = {"dense", "topk", "gshard", "hierarchical", "soft_dynamic", "soft"};
    int ti = -1;
    if (!cJSON_IsObject(root))
        st = moe_err(MOE_ERR_FORMAT, "layer config must be a JSON object");
    else if (!cJSON_IsString(type))
        st = moe_err(MOE_ERR_ARG, "layer config needs \"type\": one of \"topk\", \"dense\", \"gshard\", "
                                  "\"hierarchical\", \"soft_dynamic\", \"soft\"");
    else if ((ti = lookup(type->valuestring, types, 6)) < 0)
        st = moe_err(MOE_ERR_UNSUPPORTED, "unknown layer type \"%s\" (known: topk, dense, gshard, hierarchical, "
                                          "soft_dynamic, soft)", type->valuestring);
    if (st != MOE_OK) {
        cJSON_Delete(root);
        return st;
    }
    moe_config_init(&c, (moe_layer_type)ti);
    const char *kinds[] = {"mlp", "swiglu", "geglu"};
    int is_topk = c.type == MOE_LAYER_TOPK;
    int is_gshard = c.type == MOE_LAYER_GSHARD || c.type == MOE_LAYER_HIERARCHICAL;
    int is_soft = c.type == MOE_LAYER_SOFT_DYNAMIC || c.type == MOE_LAYER_SOFT;
    int64_t seq_len = 0;
    int have_slots = 0;
    const cJSON *v, *rec = cJSON_GetObjectItemCaseSensitive(root, "router");
    if (is_topk && rec) { /* a recipe first, so the other keys refine it */
        if (!cJSON_IsString(rec))
            st = moe_err(MOE_ERR_ARG, "\"router\" must be a string: topk, switch, mixtral, st_moe, deepseek_v3, "
                                      "expert_choice");
        else
            st = moe_config_set_router(&c, rec->valuestring);
        if (st != MOE_OK) {
            cJSON_Delete(root);
            return st;
        }
    }
    cJSON_ArrayForEach(v, root) {
        const char *k = v->string;
        int64_t n = 0;
        int known = 0;
        if (strcmp(k, "type") == 0) continue;
        if (strcmp(k, "bf16") == 0) { /* any type; moe_layer_create says which implement it */
            if (cJSON_IsString(v) && strcmp(v->valuestring, "weights") == 0) c.bf16 = MOE_BF16_WEIGHTS;
            else if (!cJSON_IsBool(v)) {
                st = moe_err(MOE_ERR_ARG, "config key \"bf16\" must be true, false or \"weights\"");
                break;
            } else c.bf16 = cJSON_IsTrue(v);
            continue;
        }
        if (is_topk) {
            st = router_key(&c, v, &known);
            if (st != MOE_OK) break;
            if (known) continue;
        }
        if (is_soft) {
            st = soft_key(&c, v, &known, &seq_len, &have_slots);
            if (!known)
                st = moe_err(MOE_ERR_ARG, "unknown config key \"%s\" for a %s layer (known: dim, num_experts, "
                                          "expert_mult, dropout, geglu, seed%s)", k, types[ti],
                             c.type == MOE_LAYER_SOFT ? ", num_slots (or slots_per_expert), seq_len" : "");
        } else if (is_gshard) {
            st = gshard_key(&c, v, &known);
            if (!known)
                st = moe_err(MOE_ERR_ARG, "unknown config key \"%s\" for a %s layer (known: dim, num_experts, "
                                          "hidden_dim, activation, second_policy_train, second_policy_eval, "
                                          "second_threshold_train, second_threshold_eval, capacity_factor_train, "
                                          "capacity_factor_eval, loss_coef, seed)", k, types[ti]);
        } else if (strcmp(k, "num_experts") == 0) {
            if ((st = get_int(&n, v, 0, 1 << 30)) == MOE_OK) c.num_experts = (int)n;
        } else if (strcmp(k, "input_dim") == 0) {
            if ((st = get_int(&n, v, 0, INT32_MAX)) == MOE_OK) c.input_dim = n;
        } else if (strcmp(k, "seed") == 0) {
            if ((st = get_int(&n, v, 0, INT64_MAX / 2)) == MOE_OK) c.seed = (uint64_t)n;
        } else if (!is_topk && strcmp(k, "output_dim") == 0) {
            if ((st = get_int(&n, v, 0, INT32_MAX)) == MOE_OK) c.output_dim = n;
        } else if (is_topk && strcmp(k, "hidden_dim") == 0) {
            if ((st = get_int(&n, v, 0, INT32_MAX)) == MOE_OK) c.hidden_dim = n;
        } else if (is_topk && strcmp(k, "top_k") == 0) {
            if ((st = get_int(&n, v, 0, 1 << 30)) == MOE_OK) c.top_k = (int)n;
        } else if (is_topk && strcmp(k, "activation") == 0) {
            int i = cJSON_IsString(v) ? lookup(v->valuestring, acts, 4) : -1;
            if (i < 0) st = moe_err(MOE_ERR_ARG, "\"activation\" must be one of relu, gelu, silu, leaky_relu");
            else c.activation = (moe_activation)i;
        } else if (is_topk && strcmp(k, "expert") == 0) {
            int i = cJSON_IsString(v) ? lookup(v->valuestring, kinds, 3) : -1;
            if (i < 0) st = moe_err(MOE_ERR_ARG, "\"expert\" must be one of mlp, swiglu, geglu");
            else c.expert = (moe_expert_kind)i;
        } else if (is_topk && strcmp(k, "leaky_slope") == 0) {
            if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
                st = moe_err(MOE_ERR_ARG, "\"leaky_slope\" must be a finite number");
            else c.leaky_slope = (float)v->valuedouble;
        } else {
            st = moe_err(MOE_ERR_ARG, "unknown config key \"%s\" for a %s layer (known: %s)", k,
                         types[ti],
                         is_topk ? "num_experts, input_dim, hidden_dim, top_k, activation, expert, "
                                   "leaky_slope, seed, router, score, normalize, route_scale, capacity_factor, "
                                   "capacity_factor_train, capacity_factor_eval, jitter, balance_coef, "
                                   "z_loss_coef, num_shared_experts, shared_gate, expert_bias, "
                                   "bias_update_rate, num_groups, topk_groups, bf16"
                                 : "num_experts, input_dim, output_dim, seed");
        }
        if (st != MOE_OK) break;
    }
    cJSON_Delete(root);
    if (st == MOE_OK && c.type == MOE_LAYER_SOFT) {
        if (!have_slots)
            st = moe_err(MOE_ERR_ARG, "a soft layer needs \"num_slots\" (slots per expert) or \"seq_len\" "
                                      "(then num_slots = seq_len / num_experts)");
        else if (seq_len) {
            if (c.num_experts < 1 || seq_len / c.num_experts < 1)
                st = moe_err(MOE_ERR_ARG, "soft: seq_len %lld / num_experts %d gives no slots; seq_len must be "
                                          ">= num_experts", (long long)seq_len, c.num_experts);
            else c.slots_per_expert = seq_len / c.num_experts;
        }
    }
    if (st == MOE_OK) *out = c;
    return st;
}
