/*
 * SVG 1.1 training plot (see plot.h). The picture, 900 x 640 px:
 *
 *   y   0.. 30  title line (the caller's text, centred)
 *   y  46..314  panel 1 "loss": one line per loss series (train, val); every
 *               series after the first also gets point markers (when it has
 *               at most PLOT_MAX_MARKERS points)
 *   y 354..622  panel 2 "expert load": one line per expert (y = share of the
 *               layer's routed rows), dashed black line at the uniform share
 *
 * Each panel: a plot box at x 78..750 with round tick values (1, 2 or 5 times
 * a power of ten), a light grid, tick labels and "step" under the x axis; its
 * legend is a column at x 765..895 to the right of the box.
 *
 * Data: each series is drawn from at most PLOT_MAX_POINTS evenly spaced
 * points (first and last kept). A point with a non-finite x or y is skipped
 * and breaks the line; a point with no drawn neighbour gets a dot. Finite
 * values are clamped to +-PLOT_BIG so spans stay finite, and a zero or tiny
 * range is padded so nothing divides by zero. Pixel coordinates are written
 * with one decimal, which keeps the file small.
 */
#include "plot.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    PLOT_W = 900,
    PLOT_H = 640,
    PLOT_MAX_POINTS = 2000, /* per series, after downsampling */
    PLOT_MAX_MARKERS = 300, /* more points than this: line only */
    PLOT_LEGEND_MAX = 16,   /* more load series than this: one summary entry */
    BOX_LEFT = 78,
    BOX_RIGHT = 750,
    BOX_HEIGHT = 230,
    LOSS_TOP = 54,
    LOAD_TOP = 362,
    LEGEND_X = 765,
    LEGEND_ROW = 13,
};

#define PLOT_BIG 1e300

/* Ten distinguishable colours (the "tab10" palette); a second, third and fourth
 * pass through them uses a dash pattern so up to 40 lines stay apart. */
static const char *const palette[10] = {
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
};
static const char *const dashes[4] = {NULL, "6,3", "2,2", "8,3,2,3"};

typedef struct {
    double lo, hi;
    int any; /* 0: no value seen yet */
} range;

typedef struct {
    double px0, px1, py0, py1; /* plot box in pixels; py0 is the top */
    double xlo, xhi, xstep;    /* x axis: shown range and tick spacing */
    double ylo, yhi, ystep;    /* y axis likewise */
} panel;

/* One line's look. */
typedef struct {
    const char *colour, *dash;
    double width;
    int markers; /* 1: a dot at every point */
} line_style;

/* ---- text and numbers ---------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence of an XML character at p (1..4), or 0. */
static int utf8_len(const unsigned char *p)
{
    int n = p[0] < 0x80 ? 1 : (p[0] & 0xE0) == 0xC0 ? 2 : (p[0] & 0xF0) == 0xE0 ? 3 : (p[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || (n == 2 && p[0] < 0xC2) || (n == 4 && p[0] > 0xF4)) return 0;
    for (int i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    if ((p[0] == 0xE0 && p[1] < 0xA0) || (p[0] == 0xED && p[1] >= 0xA0)) return 0; /* overlong, surrogate */
    if ((p[0] == 0xF0 && p[1] < 0x90) || (p[0] == 0xF4 && p[1] >= 0x90)) return 0; /* overlong, > U+10FFFF */
    if (p[0] == 0xEF && p[1] == 0xBF && p[2] >= 0xBE) return 0;                   /* U+FFFE, U+FFFF */
    return n;
}

/* Write s as XML character data: markup characters escaped; control
 * characters and bytes that are not UTF-8 become '?'. NULL writes nothing. */
static void put_text(FILE *fp, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    while (*p) {
        int n = utf8_len(p);
        if (n > 1) {
            fwrite(p, 1, (size_t)n, fp);
            p += n;
            continue;
        }
        switch (*p) {
        case '&': fputs("&amp;", fp); break;
        case '<': fputs("&lt;", fp); break;
        case '>': fputs("&gt;", fp); break;
        case '"': fputs("&quot;", fp); break;
        default: fputc(n == 1 && *p >= 0x20 && *p != 0x7F ? *p : '?', fp);
        }
        p++;
    }
}

/* A pixel coordinate with one decimal, "12.0" written as "12". */
static void put_px(FILE *fp, double v)
{
    char b[32];
    snprintf(b, sizeof b, "%.1f", v);
    size_t n = strlen(b);
    if (n > 2 && b[n - 2] == '.' && b[n - 1] == '0') b[n - 2] = '\0';
    fputs(strcmp(b, "-0") == 0 ? "0" : b, fp);
}

static void put_stroke(FILE *fp, const line_style *st);

/* A straight line from (x1, y1) to (x2, y2): in style st, or a grid line when st is NULL. */
static void put_line(FILE *fp, const line_style *st, double x1, double x2, double y1, double y2)
{
    fputs("<line ", fp);
    if (st) put_stroke(fp, st);
    else fputs("stroke=\"#e4e4e4\"", fp);
    const double v[4] = {x1, x2, y1, y2};
    const char *k[4] = {" x1=\"", "\" x2=\"", "\" y1=\"", "\" y2=\""};
    for (int i = 0; i < 4; i++) {
        fputs(k[i], fp);
        put_px(fp, v[i]);
    }
    fputs("\"/>\n", fp);
}

/* A tick value as text: as many decimals as the tick spacing needs, or %.6g
 * where that would be wider than the left margin holds. */
static void format_tick(char *buf, size_t cap, double v, double step)
{
    if (fabs(v) < step * 1e-6) v = 0; /* no "-0" or "1e-17" at zero */
    if (fabs(v) < 1e7 && step >= 1e-6) {
        int decimals = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);
        snprintf(buf, cap, "%.*f", decimals, v);
        if (strlen(buf) <= 10) return;
    }
    snprintf(buf, cap, "%.6g", v);
}

/* ---- data ---------------------------------------------------------------- */

/* How many points of a series are drawn, and which index the k-th one is. */
static int64_t sample_count(int64_t n)
{
    return n < PLOT_MAX_POINTS ? n : PLOT_MAX_POINTS;
}

static int64_t sample_index(int64_t n, int64_t k)
{
    int64_t m = sample_count(n);
    if (m == n) return k;
    if (k == m - 1) return n - 1;
    return (int64_t)((double)k * (double)(n - 1) / (double)(m - 1));
}

static double clamp_big(double v)
{
    return v > PLOT_BIG ? PLOT_BIG : v < -PLOT_BIG ? -PLOT_BIG : v;
}

/* The k-th drawn point of s in data units; 0 if it is not finite (a gap). */
static int sample_point(const plot_series *s, int64_t k, double *x, double *y)
{
    int64_t i = sample_index(s->n, k);
    if (!isfinite(s->x[i]) || !isfinite(s->y[i])) return 0;
    *x = clamp_big(s->x[i]);
    *y = clamp_big(s->y[i]);
    return 1;
}

static void range_add(range *r, double v)
{
    if (!r->any) {
        r->lo = r->hi = v;
        r->any = 1;
    } else {
        r->lo = fmin(r->lo, v);
        r->hi = fmax(r->hi, v);
    }
}

/* Widen rx, ry to hold every drawn point of the n series. */
static void series_ranges(const plot_series *s, int n, range *rx, range *ry)
{
    for (int i = 0; i < n; i++) {
        int64_t m = sample_count(s[i].n);
        for (int64_t k = 0; k < m; k++) {
            double x, y;
            if (!sample_point(&s[i], k, &x, &y)) continue;
            range_add(rx, x);
            range_add(ry, y);
        }
    }
}

/* ---- axes ---------------------------------------------------------------- */

/* Round tick spacing (1, 2 or 5 times a power of ten) giving about `target` intervals over span > 0. */
static double nice_step(double span, int target)
{
    double raw = span / target, mag = pow(10, floor(log10(raw))), f = raw / mag;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

/* Turn a data range into an axis: pad an empty or (nearly) zero-width range,
 * then widen it to whole ticks. */
static void axis_fit(range r, int target, double *lo, double *hi, double *step)
{
    double a = r.any ? r.lo : 0, b = r.any ? r.hi : 1;
    if (b - a <= fmax(fabs(a), fabs(b)) * 1e-9) {
        double c = 0.5 * a + 0.5 * b, pad = fabs(c) < 1e-200 ? 1 : fabs(c) * 0.05;
        a = c - pad;
        b = c + pad;
    }
    *step = nice_step(b - a, target);
    *lo = floor(a / *step) * *step;
    *hi = ceil(b / *step) * *step;
}

static panel panel_at(double top, range rx, range ry)
{
    panel p = {.px0 = BOX_LEFT, .px1 = BOX_RIGHT, .py0 = top, .py1 = top + BOX_HEIGHT};
    axis_fit(rx, 8, &p.xlo, &p.xhi, &p.xstep);
    axis_fit(ry, 5, &p.ylo, &p.yhi, &p.ystep);
    return p;
}

static double map_x(const panel *p, double x)
{
    return p->px0 + (x - p->xlo) / (p->xhi - p->xlo) * (p->px1 - p->px0);
}

static double map_y(const panel *p, double y)
{
    return p->py1 - (y - p->ylo) / (p->yhi - p->ylo) * (p->py1 - p->py0);
}

/* Tick values lo, lo + step, ... up to hi (lo is a whole number of steps). */
static int tick_count(double lo, double hi, double step)
{
    int n = 0;
    while (n < 100 && lo + n * step <= hi + step * 1e-6) n++;
    return n;
}

static void draw_y_ticks(FILE *fp, const panel *p)
{
    int n = tick_count(p->ylo, p->yhi, p->ystep);
    for (int i = 0; i < n; i++) {
        double v = p->ylo + i * p->ystep, y = map_y(p, v);
        char label[64];
        format_tick(label, sizeof label, v, p->ystep);
        put_line(fp, NULL, p->px0, p->px1, y, y);
        fputs("<text text-anchor=\"end\" x=\"", fp);
        put_px(fp, p->px0 - 5);
        fputs("\" y=\"", fp);
        put_px(fp, y + 4);
        fprintf(fp, "\">%s</text>\n", label);
    }
}

static void draw_x_ticks(FILE *fp, const panel *p)
{
    int n = tick_count(p->xlo, p->xhi, p->xstep);
    for (int i = 0; i < n; i++) {
        double v = p->xlo + i * p->xstep, x = map_x(p, v);
        char label[64];
        format_tick(label, sizeof label, v, p->xstep);
        put_line(fp, NULL, x, x, p->py0, p->py1);
        fputs("<text text-anchor=\"middle\" x=\"", fp);
        put_px(fp, x);
        fputs("\" y=\"", fp);
        put_px(fp, p->py1 + 15);
        fprintf(fp, "\">%s</text>\n", label);
    }
}

/* Panel name above the box, grid, tick labels, the box itself and "step" under it. */
static void draw_frame(FILE *fp, const panel *p, const char *name)
{
    fputs("<text font-size=\"12\" font-weight=\"bold\" x=\"", fp);
    put_px(fp, p->px0);
    fputs("\" y=\"", fp);
    put_px(fp, p->py0 - 8);
    fputs("\">", fp);
    put_text(fp, name);
    fputs("</text>\n", fp);
    draw_y_ticks(fp, p);
    draw_x_ticks(fp, p);
    fputs("<rect fill=\"none\" stroke=\"#444\" x=\"", fp);
    put_px(fp, p->px0);
    fputs("\" y=\"", fp);
    put_px(fp, p->py0);
    fputs("\" width=\"", fp);
    put_px(fp, p->px1 - p->px0);
    fputs("\" height=\"", fp);
    put_px(fp, p->py1 - p->py0);
    fputs("\"/>\n<text text-anchor=\"middle\" x=\"", fp);
    put_px(fp, 0.5 * (p->px0 + p->px1));
    fputs("\" y=\"", fp);
    put_px(fp, p->py1 + 30);
    fputs("\">step</text>\n", fp);
}

static void draw_no_data(FILE *fp, const panel *p)
{
    fputs("<text text-anchor=\"middle\" fill=\"#888\" x=\"", fp);
    put_px(fp, 0.5 * (p->px0 + p->px1));
    fputs("\" y=\"", fp);
    put_px(fp, 0.5 * (p->py0 + p->py1));
    fputs("\">no data</text>\n", fp);
}

/* ---- lines and legend ---------------------------------------------------- */

static void put_stroke(FILE *fp, const line_style *st)
{
    fprintf(fp, "stroke=\"%s\" stroke-width=\"%g\"", st->colour, st->width);
    if (st->dash) fprintf(fp, " stroke-dasharray=\"%s\"", st->dash);
}

static void put_dot(FILE *fp, double x, double y, double r, const char *colour)
{
    fputs("<circle cx=\"", fp);
    put_px(fp, x);
    fputs("\" cy=\"", fp);
    put_px(fp, y);
    fprintf(fp, "\" r=\"%g\" fill=\"%s\"/>\n", r, colour);
}

/* 1 if the k-th drawn point of s and a neighbour are both drawable, i.e. the point is on a line. */
static int on_line(const plot_series *s, int64_t k)
{
    int64_t m = sample_count(s->n);
    double x, y;
    return (k > 0 && sample_point(s, k - 1, &x, &y)) || (k + 1 < m && sample_point(s, k + 1, &x, &y));
}

/* The series as one path (a new subpath after each gap), then its dots:
 * every point with markers, otherwise only points with no drawn neighbour. */
static void draw_series(FILE *fp, const panel *p, const plot_series *s, const line_style *st)
{
    int64_t m = sample_count(s->n);
    int started = 0, pen = 0;
    double x, y;
    for (int64_t k = 0; k < m; k++) {
        if (!sample_point(s, k, &x, &y)) {
            pen = 0;
            continue;
        }
        if (!started) {
            fputs("<path fill=\"none\" stroke-linejoin=\"round\" ", fp);
            put_stroke(fp, st);
            fputs(" d=\"", fp);
            started = 1;
        }
        fputs(pen ? " " : "M", fp); /* after M, further pairs are implicit line-tos */
        put_px(fp, map_x(p, x));
        fputc(' ', fp);
        put_px(fp, map_y(p, y));
        pen = 1;
    }
    if (started) fputs("\"/>\n", fp);
    for (int64_t k = 0; k < m; k++) {
        if (!sample_point(s, k, &x, &y) || (!st->markers && on_line(s, k))) continue;
        put_dot(fp, map_x(p, x), map_y(p, y), st->markers ? 2.5 : 2, st->colour);
    }
}

/* Legend entry `row` of the panel: a short line sample (and dot) and the label. */
static void draw_legend_entry(FILE *fp, const panel *p, int row, const line_style *st, const char *label)
{
    double y = p->py0 + 10 + row * LEGEND_ROW;
    if (st) {
        put_line(fp, st, LEGEND_X, LEGEND_X + 22, y, y);
        if (st->markers) put_dot(fp, LEGEND_X + 11, y, 2.5, st->colour);
    }
    fprintf(fp, "<text x=\"%d\" y=\"", LEGEND_X + (st ? 28 : 0));
    put_px(fp, y + 4);
    fputs("\">", fp);
    put_text(fp, label);
    fputs("</text>\n", fp);
}

/* ---- panels -------------------------------------------------------------- */

static line_style loss_style(const plot_series *s, int i)
{
    line_style st = {palette[i % 10], dashes[(i / 10) % 4], 1.6, 0};
    st.markers = i > 0 && sample_count(s->n) <= PLOT_MAX_MARKERS;
    return st;
}

static void draw_loss_panel(FILE *fp, const plot_series *s, int n)
{
    range rx = {0}, ry = {0};
    series_ranges(s, n, &rx, &ry);
    panel p = panel_at(LOSS_TOP, rx, ry);
    draw_frame(fp, &p, "loss");
    if (!ry.any) draw_no_data(fp, &p);
    for (int i = 0; i < n; i++) {
        line_style st = loss_style(&s[i], i);
        draw_series(fp, &p, &s[i], &st);
    }
    for (int i = 0; i < n && i < PLOT_LEGEND_MAX; i++) {
        line_style st = loss_style(&s[i], i);
        char name[32];
        snprintf(name, sizeof name, "series %d", i);
        draw_legend_entry(fp, &p, i, &st, s[i].label ? s[i].label : name);
    }
}

static void draw_uniform_line(FILE *fp, const panel *p, double uniform, const line_style *st)
{
    double y = map_y(p, uniform);
    put_line(fp, st, p->px0, p->px1, y, y);
}

static void draw_load_panel(FILE *fp, const plot_series *s, int n, double uniform)
{
    int has_uniform = uniform > 0 && uniform <= PLOT_BIG;
    range rx = {0}, ry = {0};
    series_ranges(s, n, &rx, &ry);
    int any = ry.any;
    range_add(&ry, 0);
    if (has_uniform) range_add(&ry, uniform);
    panel p = panel_at(LOAD_TOP, rx, ry);
    draw_frame(fp, &p, "expert load (share of routed rows)");
    if (!any) draw_no_data(fp, &p);
    for (int i = 0; i < n; i++) {
        line_style st = {palette[i % 10], dashes[(i / 10) % 4], 1.2, 0};
        draw_series(fp, &p, &s[i], &st);
    }
    line_style uni = {"#000", "8,4", 1.5, 0};
    if (has_uniform) draw_uniform_line(fp, &p, uniform, &uni);

    int row = 0;
    if (n > PLOT_LEGEND_MAX) {
        char text[32];
        snprintf(text, sizeof text, "%d experts", n);
        draw_legend_entry(fp, &p, row++, NULL, text);
    }
    for (int i = 0; i < n && n <= PLOT_LEGEND_MAX; i++) {
        line_style st = {palette[i % 10], dashes[(i / 10) % 4], 1.2, 0};
        char name[32];
        snprintf(name, sizeof name, "expert %d", i);
        draw_legend_entry(fp, &p, row++, &st, s[i].label ? s[i].label : name);
    }
    if (has_uniform) draw_legend_entry(fp, &p, row, &uni, "uniform 1/E");
}

/* ---- file ---------------------------------------------------------------- */

static int write_svg(FILE *fp, const char *title, const plot_series *loss, int n_loss,
                     const plot_series *load, int n_load, double uniform)
{
    fprintf(fp,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\">\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/>\n"
            "<g font-family=\"sans-serif\" font-size=\"11\" fill=\"#222\">\n"
            "<text text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\" x=\"%d\" y=\"22\">",
            PLOT_W, PLOT_H, PLOT_W, PLOT_H, PLOT_W / 2);
    put_text(fp, title);
    fputs("</text>\n", fp);
    draw_loss_panel(fp, loss, n_loss);
    draw_load_panel(fp, load, n_load, uniform);
    fputs("</g>\n</svg>\n", fp);
    return ferror(fp) ? -1 : 0;
}

static int series_valid(const plot_series *s, int n)
{
    if (n < 0 || (n > 0 && !s)) return 0;
    for (int i = 0; i < n; i++)
        if (s[i].n < 0 || (s[i].n > 0 && (!s[i].x || !s[i].y))) return 0;
    return 1;
}

int plot_write_svg(const char *path, const char *title,
                   const plot_series *loss, int n_loss,
                   const plot_series *load, int n_load, double uniform)
{
    if (!path || !*path || !series_valid(loss, n_loss) || !series_valid(load, n_load)) {
        errno = EINVAL;
        return -1;
    }
    size_t cap = strlen(path) + 5;
    char *tmp = malloc(cap);
    if (!tmp) {
        errno = ENOMEM;
        return -1;
    }
    snprintf(tmp, cap, "%s.tmp", path);
    FILE *fp = fopen(tmp, "w");
    if (!fp) {
        int err = errno;
        free(tmp);
        errno = err;
        return -1;
    }
    errno = 0;
    int ok = write_svg(fp, title, loss, n_loss, load, n_load, uniform) == 0 && fflush(fp) == 0 &&
             fsync(fileno(fp)) == 0;
    int err = errno;
    if (fclose(fp) != 0 && ok) ok = 0, err = errno;
    if (ok && rename(tmp, path) != 0) ok = 0, err = errno;
    if (!ok) unlink(tmp);
    free(tmp);
    if (!ok) {
        errno = err ? err : EIO;
        return -1;
    }
    return 0;
}
