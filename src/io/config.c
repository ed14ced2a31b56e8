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

moe_status moe_config_from_json(moe_config *out, const char *json_text) {
    moe_err_clear();
    if (!out || !json_text) return moe_err(MOE_ERR_ARG, "moe_config_from_json: NULL argument");
    cJSON *root = cJSON_Parse(json_text);
    if (!root) return moe_err(MOE_ERR_FORMAT, "layer config is not valid JSON (near: %.40s)",
                              cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() : "?");
    moe_status st = MOE_OK;
    moe_config c;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "type");
    const char *types[] = {"dense", "topk"};
    int ti = -1;
    if (!cJSON_IsObject(root))
        st = moe_err(MOE_ERR_FORMAT, "layer config must be a JSON object");
    else if (!cJSON_IsString(type))
        st = moe_err(MOE_ERR_ARG, "layer config needs \"type\": one of \"topk\", \"dense\"");
    else if ((ti = lookup(type->valuestring, types, 2)) < 0)
        st = moe_err(MOE_ERR_UNSUPPORTED, "unknown layer type \"%s\" (known: topk, dense)", type->valuestring);
    if (st != MOE_OK) {
        cJSON_Delete(root);
        return st;
    }
    moe_config_init(&c, (moe_layer_type)ti);
    const char *acts[] = {"relu", "gelu", "silu", "leaky_relu"};
    const char *kinds[] = {"mlp", "swiglu", "geglu"};
    int is_topk = c.type == MOE_LAYER_TOPK;
    const cJSON *v;
    cJSON_ArrayForEach(v, root) {
        const char *k = v->string;
        int64_t n = 0;
        if (strcmp(k, "type") == 0) continue;
        if (strcmp(k, "num_experts") == 0) {
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
                                   "leaky_slope, seed"
                                 : "num_experts, input_dim, output_dim, seed");
        }
        if (st != MOE_OK) break;
    }
    cJSON_Delete(root);
    if (st == MOE_OK) *out = c;
    return st;
}
