/*
 * Vectorised elementwise math: the entries of the kernel table's exp, silu
 * and SwiGLU (src/kernels/generic/vmath.c has the method and the scalar
 * twins; each ISA folder gives the same bits for every input).
 * Dimension key: n elements.
 */
#include "ops.h"

/* x - 0 is x for every float (-0 and NaN included), so exp is exp_sub at 0. */
void moe_vexpf(float *y, const float *x, int64_t n) { moe_k()->vexpf_sub(y, x, 0.0f, n); }
void moe_vexpf_sub(float *y, const float *x, float c, int64_t n) { moe_k()->vexpf_sub(y, x, c, n); }
void moe_vsilu(float *y, const float *x, int64_t n) { moe_k()->vsilu(y, x, n); }
void moe_vsilu_backward(float *dx, const float *dy, const float *x, int64_t n) { moe_k()->vsilu_backward(dx, dy, x, n); }
void moe_vswiglu(float *o, const float *a, const float *g, int64_t n) { moe_k()->vswiglu(o, a, g, n); }
void moe_vswiglu_backward(float *da, float *dg, const float *d, const float *a, const float *g, int64_t n) {
    moe_k()->vswiglu_backward(da, dg, d, a, g, n);
}
