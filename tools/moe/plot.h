/*
 * Training plots for `moe train`: one standalone SVG file with a loss panel
 * (train and validation loss over steps) above an expert-load panel (each
 * expert's share of the routed rows over steps). libc + libm only, no state.
 */
#ifndef MOE_PLOT_H
#define MOE_PLOT_H

#include <stdint.h>

/* One series: n points (x[i], y[i]); NaN y values are gaps. */
typedef struct {
    const char *label;
    const double *x, *y;
    int64_t n;
} plot_series;

/* Write the SVG to path atomically (write path.tmp, fflush, fsync, rename). Returns 0, or -1
 * with errno set and nothing at path changed. loss: n_loss series (train, val) for panel 1;
 * load: n_load series (one per expert) for panel 2, uniform = 1/E (<= 0: no line). */
int plot_write_svg(const char *path, const char *title,
                   const plot_series *loss, int n_loss,
                   const plot_series *load, int n_load, double uniform);

#endif
