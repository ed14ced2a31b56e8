/*
 * The layer's parameters on disk and across ranks: safetensors load and save
 * (a bad file leaves the layer as it was; saves are atomic), and for
 * expert-parallel layers the gather of every rank's experts onto rank 0, the
 * one-process file it writes, a rank's part read back, and the sum of the
 * replicated gradients over the ranks.
 * Dimension key: E experts, P ranks, El = E/P.
 */
#include "layer_internal.h"
#include "ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------- load/save */

int moe_layer_param_is_expert(const moe_layer *l, int i) {
    /* every layer names its experts' tensors "experts.*" (state_dict names);
     * hierarchical: each outer expert's inner gate (gate_inner.*) is its too */
    if (!l || i < 0 || i >= l->n_params) return 0;
    const char *n = l->params[i].name;
    return strncmp(n, "experts.", 8) == 0 ||
           (l->cfg.type == MOE_LAYER_HIERARCHICAL && strncmp(n, "gate_inner.", 11) == 0);
}

/* Elements per step of the loader's conversions and scans: 256 KiB of
 * float32, so a step's values are still in cache when they are scanned. */
#define LOAD_CHUNK ((size_t)1 << 16)

/* Saved tensor i of l (a parameter, then the buffers) in f, checked: present,
 * the shape the layer wants, a float dtype. *t is it and *begin the first
 * element to read: 0, or for a rank's slice of a tensor split over ranks
 * (global_dim0[i] > 0) the slice's offset in the whole tensor. */
static moe_status find_saved(const moe_st_tensor **t, size_t *begin, moe_layer *l, int i, const moe_st_file *f,
                             const char *path) {
    const moe_param *p = moe__saved_tensor(l, i);
    *t = NULL;
    *begin = 0;
    if (!moe_st_find(f, p->name))
        return moe_err(MOE_ERR_NOTFOUND, "%s: tensor '%s' is missing (a %s layer needs it)", path, p->name,
                       moe_layer_type_name(l->cfg.type));
    int64_t shape[MOE_ST_MAX_DIMS];
    for (int d = 0; d < p->ndim; d++) shape[d] = p->shape[d];
    if (i < l->n_params && l->global_dim0[i]) shape[0] = l->global_dim0[i], *begin = (size_t)l->init_skip[i];
    moe_status st = moe__st_check_f32(t, f, p->name, p->ndim, shape);
    if (st != MOE_OK) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        return moe_err(st, "%s: %s (check the layer config against the weights)", path, msg);
    }
    return MOE_OK;
}

/* Where saved tensor i lives in the layer. */
static float *saved_dst(moe_layer *l, int i) { return moe__saved_tensor(l, i)->data; }

/* Convert elements [begin, begin + n) of t to float32 and check them, LOAD_CHUNK
 * at a time: into dst (n) when dst is not NULL, else only checked (an F32
 * tensor on a float boundary is scanned where it lies, others go through
 * scratch (LOAD_CHUNK)). Non-finite: the error, naming the element. */
static moe_status read_checked(float *dst, float *scratch, const moe_st_tensor *t, size_t begin, size_t n,
                               const char *path) {
    const unsigned char *src = t->dtype == MOE_DT_F32 ? (const unsigned char *)t->data + 4 * begin : NULL;
    int in_place = !dst && src && (uintptr_t)src % sizeof(float) == 0;
    for (size_t c = 0; c < n; c += LOAD_CHUNK) {
        size_t m = n - c < LOAD_CHUNK ? n - c : LOAD_CHUNK;
        const float *v = in_place ? (const float *)src + c : dst ? dst + c : scratch;
        if (!in_place) moe__st_convert_f32(dst ? dst + c : scratch, t, begin + c, m);
        if (moe_any_nonfinite(v, (int64_t)m))
            return moe_err(MOE_ERR_NONFINITE, "%s: tensor '%s' element %lld is not finite", path, t->name,
                           (long long)(c + (size_t)moe_find_nonfinite(v, (int64_t)m)));
    }
    return MOE_OK;
}

/* An expert GEMM weight (the tensors a bf16 layer uses as bf16 copies):
 * topk's experts.{i}.net.{0,2}.weight and shared_experts.{i}.net.{0,2}.weight,
 * gshard's and hierarchical's experts.w1 and experts.w2. */
static int gemm_weight(const moe_layer *l, int i) {
    if (i >= l->n_params) return 0;
    const char *n = l->params[i].name;
    size_t len = strlen(n);
    if (strncmp(n, "experts.", 8) != 0 && strncmp(n, "shared_experts.", 15) != 0) return 0;
    return (len > 7 && strcmp(n + len - 7, ".weight") == 0) || strcmp(n, "experts.w1") == 0 ||
           strcmp(n, "experts.w2") == 0;
}

/* bf16 weights only: tensor i (an expert GEMM weight) into the bf16 copy,
 * checked: a BF16 file's bytes as they are (never widened), an F32 or other
 * float file rounded once, through scratch (LOAD_CHUNK). */
static moe_status read_bf16(moe_layer *l, int i, float *scratch, const moe_st_tensor *t, const char *path) {
    uint16_t *dst = l->w16 + l->param_off[i];
    size_t n = (size_t)l->params[i].numel;
    for (size_t c = 0; c < n; c += LOAD_CHUNK) {
        size_t m = n - c < LOAD_CHUNK ? n - c : LOAD_CHUNK;
        if (t->dtype == MOE_DT_BF16) {
            memcpy(dst + c, (const unsigned char *)t->data + 2 * c, 2 * m);
            for (size_t j = 0; j < m; j++)
                if ((dst[c + j] & 0x7f80u) == 0x7f80u)
                    return moe_err(MOE_ERR_NONFINITE, "%s: tensor '%s' element %lld is not finite", path, t->name,
                                   (long long)(c + j));
        } else {
            moe__st_convert_f32(scratch, t, c, m);
            int64_t bad = moe_find_nonfinite(scratch, (int64_t)m);
            if (bad >= 0)
                return moe_err(MOE_ERR_NONFINITE, "%s: tensor '%s' element %lld is not finite", path, t->name,
                               (long long)(c + (size_t)bad));
            moe_to_bf16(dst + c, scratch, (int64_t)m);
        }
    }
    return MOE_OK;
}

/* Load the layer's parameters and buffers from f. Every tensor is checked
 * (present, shape, dtype, finite values, nothing unexpected in the file)
 * before any parameter changes, so a bad file leaves the layer as it was;
 * the values are then copied straight from the file's mapping into the
 * parameter block, converted where the dtype is not F32: no staging copy.
 * fresh: the layer's parameters hold nothing yet (a layer being created from
 * the file, freed on failure), so each tensor is copied and checked in the
 * same pass. */
static moe_status load_from(moe_layer *l, const moe_st_file *f, const char *path, int fresh) {
    int n = l->n_params + l->n_buffers, w16 = l->cfg.bf16 == MOE_BF16_WEIGHTS;
    if (w16 && !fresh)
        return moe_err(MOE_ERR_UNSUPPORTED, "%s: a bf16-weights-only layer is loaded once, by "
                                            "moe_layer_create_load", path);
    float *scratch = fresh && !w16 ? NULL : moe_alloc(LOAD_CHUNK * sizeof(float));
    if (!scratch && (!fresh || w16)) return moe_err(MOE_ERR_NOMEM, "cannot allocate a buffer to check the weights");
    moe_status st = MOE_OK;
    int first = 0; /* the first tensor the sequential pass reads */
    if (fresh && !w16) {
        /* Copied and checked on every thread, a tensor per task (topk and the
         * soft layers have tensors per expert; gshard's weights are two
         * tensors, one per thread on two threads): most of a load's
         * time is first-touch page faults on the fresh parameter block (about
         * 0.4 ms per MB on these VMs), and those run in parallel. The first
         * failing tensor, if any, is then checked again below on this thread,
         * which sets its message (messages are per thread). */
        int bad = n;
#pragma omp parallel for schedule(dynamic, 1) reduction(min : bad)
        for (int i = 0; i < n; i++) {
            const moe_st_tensor *t;
            size_t begin;
            if (find_saved(&t, &begin, l, i, f, path) != MOE_OK ||
                read_checked(saved_dst(l, i), NULL, t, begin, (size_t)moe__saved_tensor(l, i)->numel, path) != MOE_OK)
                bad = i < bad ? i : bad;
        }
        first = bad; /* n: all done, nothing left for the loop below */
    }
    for (int i = first; i < n && st == MOE_OK; i++) {
        const moe_st_tensor *t;
        size_t begin;
        if ((st = find_saved(&t, &begin, l, i, f, path)) != MOE_OK) break;
        if (w16 && gemm_weight(l, i)) st = read_bf16(l, i, scratch, t, path); /* one process: begin is 0 */
        else
            st = read_checked(fresh ? saved_dst(l, i) : NULL, scratch, t, begin,
                              (size_t)moe__saved_tensor(l, i)->numel, path);
    }
    for (int i = 0; i < moe_st_count(f) && st == MOE_OK; i++) {
        const char *name = moe_st_tensor_at(f, i)->name;
        int found = moe_layer_find_param(l, name) != NULL;
        for (int b = 0; b < l->n_buffers; b++) found |= strcmp(l->buffers[b].name, name) == 0;
        if (l->ep && strncmp(name, "experts.", 8) == 0) found = 1; /* another rank's expert */
        if (!found)
            st = moe_err(MOE_ERR_FORMAT, "%s: unexpected tensor '%s' (not a parameter of this %s layer)",
                         path, name, moe_layer_type_name(l->cfg.type));
    }
    for (int i = 0; i < n && st == MOE_OK && !fresh; i++) { /* all checked: copy */
        const moe_st_tensor *t;
        size_t begin;
        st = find_saved(&t, &begin, l, i, f, path);
        if (st == MOE_OK) moe__st_convert_f32(saved_dst(l, i), t, begin, (size_t)moe__saved_tensor(l, i)->numel);
    }
    moe_free(scratch);
    return st;
}

static moe_status load_local(moe_layer *l, const char *path, int fresh) {
    moe_st_file *f = NULL;
    moe_status st = moe_st_open(&f, path);
    if (st == MOE_OK) st = load_from(l, f, path, fresh);
    moe_st_close(f);
    return st;
}

moe_status moe__layer_load_fresh(moe_layer *l, const char *path) { return load_local(l, path, 1); }

moe_status moe_layer_load(moe_layer *l, const char *path) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_load: NULL argument");
    /* expert parallel: every rank reads its own part of the one file (a path
     * every rank sees), and a failure on any rank fails them all */
    moe_status st = path ? load_local(l, path, 0) : moe_err(MOE_ERR_ARG, "moe_layer_load: NULL path");
    moe__params_bump();
    return l->ep ? l->ep->agree(l->ep, st) : st;
}

/* Expert parallel: rank 0's one-process layer `full` (same config) gets
 * every rank's parameters and gradients: expert tensors from their owners,
 * replicated ones from rank 0. Collective. */
moe_status moe_layer_gather(moe_layer *l, moe_layer *full) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_gather: NULL layer");
    if (l->cfg.bf16 == MOE_BF16_WEIGHTS || (full && full->cfg.bf16 == MOE_BF16_WEIGHTS))
        return moe_err(MOE_ERR_UNSUPPORTED, "moe_layer_gather: not for bf16-weights-only layers");
    moe_ep *ep = l->ep;
    moe_status st = MOE_OK;
    if ((!ep || ep->rank == 0) && (!full || full->ep || full->n_weights < l->n_weights ||
                                   full->cfg.type != l->cfg.type || full->cfg.num_experts != l->cfg.num_experts))
        st = moe_err(MOE_ERR_ARG, "moe_layer_gather: rank 0 needs a one-process layer of the same config");
    if (!ep) { /* one process: a copy */
        if (st == MOE_OK) {
            memcpy(full->wmem, l->wmem, (size_t)l->n_weights * sizeof(float));
            memcpy(full->gmem, l->gmem, (size_t)l->n_weights * sizeof(float));
            for (int b = 0; b < l->n_buffers; b++)
                memcpy(full->buffers[b].data, l->buffers[b].data, (size_t)l->buffers[b].numel * sizeof(float));
        }
        return st;
    }
    /* pack: per expert tensor, its name, slice offset, count, values and gradients */
    typedef struct {
        char name[MOE_NAME_MAX];
        int64_t offset, numel;
    } head;
    int64_t bytes = 0;
    for (int i = 0; i < l->n_params; i++)
        if (moe_layer_param_is_expert(l, i)) bytes += (int64_t)sizeof(head) + 2 * l->params[i].numel * 4;
    char *pack = moe_alloc((size_t)(bytes ? bytes : 1));
    int64_t *counts = moe_alloc((size_t)ep->size * sizeof *counts);
    if (st == MOE_OK && (!pack || !counts)) st = moe_err(MOE_ERR_NOMEM, "cannot allocate the expert tensors to send");
    st = ep->agree(ep, st);
    void *all = NULL;
    int64_t all_n = 0;
    if (st == MOE_OK) {
        char *o = pack;
        for (int i = 0; i < l->n_params; i++) {
            if (!moe_layer_param_is_expert(l, i)) continue;
            head h;
            memset(&h, 0, sizeof h);
            snprintf(h.name, sizeof h.name, "%s", l->params[i].name);
            h.offset = l->global_dim0[i] ? l->init_skip[i] : 0, h.numel = l->params[i].numel;
            memcpy(o, &h, sizeof h), o += sizeof h;
            memcpy(o, l->params[i].data, (size_t)h.numel * 4), o += h.numel * 4;
            memcpy(o, l->params[i].grad, (size_t)h.numel * 4), o += h.numel * 4;
        }
        st = ep->gather(ep, &all, &all_n, counts, pack, bytes);
    }
    moe_free(pack);
    moe_free(counts);
    if (st == MOE_OK && ep->rank == 0) {
        for (int i = 0; i < l->n_params + l->n_buffers; i++) {
            const moe_param *p = moe__saved_tensor(l, i);
            if (i < l->n_params && moe_layer_param_is_expert(l, i)) continue;
            moe_param *q = i < l->n_params ? moe_layer_find_param(full, p->name) : moe_layer_buffer(full, i - l->n_params);
            if (!q) continue;
            memcpy(q->data, p->data, (size_t)p->numel * 4); /* replicated: rank 0's copy */
            if (p->grad && q->grad) memcpy(q->grad, p->grad, (size_t)p->numel * 4);
        }
        for (const char *c = all; st == MOE_OK && c < (const char *)all + all_n;) {
            head h;
            memcpy(&h, c, sizeof h), c += sizeof h;
            moe_param *q = moe_layer_find_param(full, h.name);
            if (!q || h.offset + h.numel > q->numel)
                st = moe_err(MOE_ERR_FORMAT, "gathered tensor '%s' does not fit the layer", h.name);
            else memcpy(q->data + h.offset, c, (size_t)h.numel * 4), memcpy(q->grad + h.offset, c + h.numel * 4,
                                                                              (size_t)h.numel * 4);
            c += 2 * h.numel * 4;
        }
    }
    free(all);
    return ep->agree(ep, st);
}

/* Expert parallel save: rank 0 gathers the whole layer into a one-process
 * layer of the same config and saves that, so the file is the one a single
 * process writes (global names and shapes). Collective. */
static moe_status save_gathered(moe_layer *l, const char *path) {
    moe_layer *full = NULL;
    moe_status st = l->ep->rank == 0 ? moe__layer_create_ep(&full, &l->cfg, NULL) : MOE_OK;
    st = l->ep->agree(l->ep, st);
    if (st == MOE_OK) st = moe_layer_gather(l, full);
    if (st == MOE_OK && l->ep->rank == 0) st = moe_layer_save(full, path);
    moe_layer_free(full);
    return l->ep->agree(l->ep, st);
}

moe_status moe_layer_ep_info(const moe_layer *l, int *rank, int *size, int *first, int *count) {
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_ep_info: NULL layer");
    int E = l->cfg.num_experts; /* hierarchical: the outer experts */
    if (rank) *rank = l->ep ? l->ep->rank : 0;
    if (size) *size = l->ep ? l->ep->size : 1;
    if (first) *first = l->ep ? l->ep->e_first : 0;
    if (count) *count = l->ep ? l->ep->e_count : E;
    return MOE_OK;
}

int64_t moe_layer_param_offset(const moe_layer *l, int i) {
    return l && i >= 0 && i < l->n_params && l->global_dim0[i] ? l->init_skip[i] : 0;
}

void moe_layer_ep_traffic(const moe_layer *l, double *seconds, int64_t *bytes) {
    if (seconds) *seconds = l && l->ep ? l->ep->xchg_seconds : 0.0;
    if (bytes) *bytes = l && l->ep ? l->ep->xchg_bytes : 0;
}

moe_status moe_layer_allreduce_grads(moe_layer *l) {
    moe_err_clear();
    if (!l) return moe_err(MOE_ERR_ARG, "moe_layer_allreduce_grads: NULL layer");
    if (!l->ep) return MOE_OK;
    moe_status st = MOE_OK;
    for (int i = 0; i < l->n_params && st == MOE_OK; i++)
        if (!moe_layer_param_is_expert(l, i)) st = l->ep->allreduce_f32(l->ep, l->params[i].grad, l->params[i].numel);
    return l->ep->agree(l->ep, st);
}

moe_status moe_layer_save(moe_layer *l, const char *path) {
    moe_err_clear();
    if (!l || !path) return moe_err(MOE_ERR_ARG, "moe_layer_save: NULL argument");
    if (l->cfg.bf16 == MOE_BF16_WEIGHTS)
        return moe_err(MOE_ERR_UNSUPPORTED, "moe_layer_save: a bf16-weights-only layer has no fp32 expert weights to "
                                            "save; keep the file it was loaded from");
    if (l->ep) return save_gathered(l, path);
    int n = l->n_params + l->n_buffers;
    moe_st_entry *ents = moe_calloc((size_t)n * sizeof *ents);
    if (!ents) return moe_err(MOE_ERR_NOMEM, "cannot allocate the tensor list");
    for (int i = 0; i < n; i++) {
        const moe_param *p = moe__saved_tensor(l, i);
        ents[i].name = p->name;
        ents[i].dtype = MOE_DT_F32;
        ents[i].ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) ents[i].shape[d] = p->shape[d];
        ents[i].data = p->data;
    }
    const char *meta[] = {"format", "pt", "libmoe.type", moe_layer_type_name(l->cfg.type)};
    moe_status st = moe_st_write(path, ents, n, meta, 2);
    moe_free(ents);
    return st;
}
