/*
 * libFuzzer target: the safetensors reader on arbitrary bytes. A file that
 * parses must expose only tensors whose bytes lie inside the buffer: every
 * tensor is read as float32 (with conversion) and every metadata key looked up.
 */
#include "moe.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    moe_st_file *f = NULL;
    if (moe_st_parse(&f, data, size) != MOE_OK) {
        if (f || !moe_last_error()[0]) abort(); /* an error always comes with a message, no handle */
        return 0;
    }
    for (int i = 0; i < moe_st_count(f); i++) {
        const moe_st_tensor *t = moe_st_tensor_at(f, i);
        if (!t || moe_st_find(f, t->name) == NULL) abort();
        if (t->numel > (1 << 20)) continue;
        float *dst = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *dst);
        if (dst) moe_st_read_f32(dst, f, t->name, -1, NULL);
        free(dst);
    }
    moe_st_metadata(f, "format");
    moe_st_metadata(f, "libmoe.checksum");
    moe_st_close(f);
    return 0;
}
