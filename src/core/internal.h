/*
 * Internal helpers shared by the library's source files (not installed).
 * Dimension key: T tokens, D model dim, H expert hidden dim, O output dim,
 * E experts, K top-k.
 */
#ifndef MOE_INTERNAL_H
#define MOE_INTERNAL_H

#include "moe.h"
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define MOE_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define MOE_PRINTF(a, b)
#endif

/* Record a message for moe_last_error() and return s (so: return moe_err(...)). */
moe_status moe_err(moe_status s, const char *fmt, ...) MOE_PRINTF(2, 3);
/* Clear the thread's message. */
void moe_err_clear(void);

/* Allocation: 64-byte aligned, NULL on failure or n == 0 overflow; never aborts.
 * Pair moe_alloc/moe_free. moe_calloc zero-fills. */
void *moe_alloc(size_t nbytes);
void *moe_calloc(size_t nbytes);
void  moe_free(void *p);
/* A zeroed block like moe_calloc's whose pages are not touched here (a big
 * block's pages come from the system zeroed and are faulted in on first
 * use): for big arrays a run may never use, such as the gradients of a
 * forward-only run. Pair with moe_free_lazy. */
void *moe_calloc_lazy(size_t nbytes);
void  moe_free_lazy(void *p);

/* Tests only: make the n-th allocation from now (0-based) fail, counting
 * moe_alloc/moe_calloc and cJSON's; n < 0 turns it off. moe__alloc_count:
 * allocations since the last moe__fault_alloc. */
void    moe__fault_alloc(int64_t n);
int64_t moe__alloc_count(void);

/* A wall clock in seconds (omp_get_wtime; 0 without OpenMP), for the
 * library's own measurements: the time spent in the result checks (the
 * NaN/Inf scans of y, dx and the gradients, README "Reliability"), in
 * thread-seconds, which `moe bench` shows as a share of the step
 * (moe__check_add adds one scan's seconds, thread-safe), and the time inside
 * the expert-parallel exchanges. */
double moe__clock(void);
void   moe__check_add(double seconds);
/* The parameters' generation: bumped (thread-safe) by whatever may change
 * parameter values (moe_optim_step, load, init, handing out a parameter
 * pointer, moe_layer_params_changed). A bf16 layer refreshes its bf16 weight
 * copies when the generation moved since it made them. */
void     moe__params_bump(void);
uint64_t moe__params_gen(void);
double moe__check_seconds(void);

/* Overflow-checked size arithmetic: return 0 on overflow, 1 on success. */
static inline int moe_mul_size(size_t *out, size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}
static inline int moe_add_size(size_t *out, size_t a, size_t b) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

/* Bump allocator over the workspace: a 64-byte aligned chunk of n1*n2*esize
 * bytes. With base == NULL it only measures. On size overflow *off becomes
 * SIZE_MAX and stays there (the layer reports it as too large). */
static inline void *moe__carve(char *base, size_t *off, int64_t n1, int64_t n2, size_t esize) {
    size_t a, b, o;
    if (*off == SIZE_MAX || n1 < 0 || n2 < 0 || !moe_mul_size(&a, (size_t)n1, (size_t)n2) ||
        !moe_mul_size(&b, a, esize) || !moe_add_size(&o, *off, 63) || !moe_add_size(&o, o & ~(size_t)63, b)) {
        *off = SIZE_MAX;
        return NULL;
    }
    void *p = base ? base + ((*off + 63) & ~(size_t)63) : NULL;
    *off = o;
    return p;
}

/* Counter-based RNG (splitmix64 of seed and counter): the same (seed, counter)
 * gives the same value on any thread count. */
uint64_t moe_rng_u64(uint64_t seed, uint64_t counter);
/* Uniform float in [0, 1) with 24 random bits. */
float    moe_rng_uniform(uint64_t seed, uint64_t counter);

/* safetensors, for the layer's loader (src/io/safetensors.c).
 * moe__st_check_f32: tensor `name` of f exists, has shape[0..ndim) (ndim < 0:
 * any) and a float dtype (F32, F64, F16, BF16): *out is it; otherwise the
 * error moe_st_read_f32 gives, *out NULL. Nothing is read.
 * moe__st_convert_f32: elements [begin, begin + n) of such a tensor (the
 * caller checked the range against t->numel) into dst (n) as float32, read
 * straight from the file's mapping or buffer: one copy, no staging. */
moe_status moe__st_check_f32(const moe_st_tensor **out, const moe_st_file *f, const char *name, int ndim,
                             const int64_t *shape);
void       moe__st_convert_f32(float *dst, const moe_st_tensor *t, size_t begin, size_t n);

#endif
