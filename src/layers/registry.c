/*
 * The layer kinds (layer_internal.h, moe_layer_kind): one entry per
 * moe_layer_type, defined in the kind's own file. A new kind is a file that
 * defines its moe_layer_kind and one line here.
 */
#include "layer_internal.h"

static const moe_layer_kind *const k_kinds[] = {
    &moe__kind_dense, &moe__kind_topk, &moe__kind_gshard, &moe__kind_hierarchical, &moe__kind_soft_dynamic,
    &moe__kind_soft,
};

const moe_layer_kind *moe__layer_kind(moe_layer_type type) {
    for (size_t i = 0; i < sizeof k_kinds / sizeof k_kinds[0]; i++)
        if (k_kinds[i]->type == type) return k_kinds[i];
    return NULL;
}
