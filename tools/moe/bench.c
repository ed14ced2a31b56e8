/*
 * `moe bench`: forward+backward of a layer against a dense sgemm of the same
 * useful FLOPs, measured in the same run (alternating, medians).
 * The dense baseline runs the very GEMMs a one-expert FFN over all T*K routed
 * rows would: forward X W1^T, act, H W2^T; backward dW2, dH, dW1, dX.
 * Useful FLOPs (DESIGN.md): forward T*K*2*(D*H2 + H*D), H2 = H (MLP) or 2H
 * (GLU); backward twice forward. The gate's FLOPs are not counted.
 * Soft layers have no routing to leave out: every matrix product of the
 * method counts (slot logits, dispatch, combine, the dynamic slot projection,
 * the experts over all B*E*S slots), and the baseline runs the same FLOPs as
 * the FFN GEMMs above over the equivalent number of rows.
 * Dimension key: T tokens, D model dim, H hidden dim, E experts, K top-k, A = T*K.
 */
#include "cli.h"
#include "ep.h"
#include "internal.h" /* moe__check_seconds: the time of the library's result checks */
#include "ops.h"      /* moe_to_bf16: the bf16 baseline's operands, rounded as the library rounds */

#include <oneapi/dnnl/dnnl.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *usage_text =
    "usage: moe bench [--layer topk|gshard|hierarchical|soft_dynamic|soft] [--tokens T]\n"
    "                 [--batch B] [--dim D] [--hidden H] [--experts E] [--inner EI] [--top-k K]\n"
    "                 [--slots S] [--router NAME] [--shared N] [--decode]\n"
    "                 [--expert mlp|swiglu|geglu] [--iters N] [--threads N] [--bf16] [--json] [--ep]\n"
    "\n"
    "Times a layer's forward+backward (train mode) and, in the same run, a dense sgemm of\n"
    "the same useful FLOPs and the arithmetic peaks of the CPU level the process runs at\n"
    "(register-only loops on every thread; the layer's GFLOP/s as a share of the peak). The useful\n"
    "FLOPs are those of the rows the experts actually ran; prints tokens/s, GFLOP/s and the ratios.\n"
    "Every output names the CPU, the level in use and the best level (MOE_MAX_CPU_ISA=baseline|\n"
    "avx2|avx512|avx512_bf16 caps it, libmoe's kernels and oneDNN's alike) and the library's\n"
    "fallbacks (moe_cpu_notes), if any. Peaks by level: baseline 128-bit SSE mul+add pairs\n"
    "(x86-64-v2 has no FMA; a pair counts 2 FLOP per lane), avx2 256-bit FMA, avx512 and\n"
    "avx512_bf16 512-bit FMA, arm64 128-bit NEON FMA; the bf16 peak (vdpbf16ps) at avx512_bf16\n"
    "only. Each thread times its own loop (best of 7): the peak is the sum of the threads' rates,\n"
    "which a preempted thread does not lower; the team's rate (all FLOPs over the wall time) is\n"
    "shown beside it. --json: fp32_peak_gflops and bf16_peak_gflops (0 where not native) are\n"
    "the per-thread sums, fp32_peak_team_gflops and bf16_peak_team_gflops the team's; peak\n"
    "(fp32|bf16) is the one the shares use, with peak_thread_sum_gflops, peak_team_gflops,\n"
    "peak_share and dense_peak_share; cpu, isa, isa_max, cpu_notes, bf16_native (the level has\n"
    "bf16 dot products) and dense_baseline (sgemm|bf16_matmul|bf16_widened_sgemm) say what ran.\n"
    "Defaults: topk, T=4096 D=512 H=2048 E=16 K=2 mlp (relu) experts, 5 timed\n"
    "iterations (medians), all cores. gshard and hierarchical run B=4 sequences of T/B\n"
    "tokens with the seed's defaults (policy random, capacity factor 1.25); hierarchical\n"
    "has E=4 outer and EI=4 inner experts unless given. soft_dynamic and soft run B=4\n"
    "sequences with E=4 experts and GELU experts of H=4*D (the seed's expert_mult 4; geglu:\n"
    "--expert geglu); soft has S = N/E learned slots per expert unless --slots is given.\n"
    "topk takes a router recipe (--router topk|switch|mixtral|st_moe|deepseek_v3|\n"
    "expert_choice) and shared experts (--shared N), whose rows count as useful work.\n"
    "--bf16 (topk): bf16 mixed precision (autocast). At avx512_bf16 the dense baseline runs the same\n"
    "GEMMs as oneDNN bf16 x bf16 -> fp32 matmuls on all threads, and the share is of the bf16 peak.\n"
    "At other levels the library widens bf16 GEMMs to fp32 and runs them as fp32, so the baseline\n"
    "runs the fp32 sgemms on the operands rounded to bf16, and the share is of the fp32 peak.\n"
    "--decode (topk): eval forwards of T = 1, 4 and 16 tokens, each on fresh random tokens;\n"
    "the bytes of the experts they select (plus the gate) over the time, against a memcpy\n"
    "(bytes copied per second), a read-only stream on every thread, and a read-only burst of as\n"
    "many expert-sized blocks as the call read (the reach of a read of a few MB), run between calls.\n"
    "--ep (topk, gshard, hierarchical): expert parallel under mpirun (mpirun -np P moe bench --ep): the\n"
    "T tokens (B groups) split over the P ranks, E/P experts per rank, --threads per rank\n"
    "(default: the cores / P); prints the global tokens/s and GFLOP/s, the bytes the ranks\n"
    "sent each other per step and the time inside the exchanges.\n";

/* The bf16 dense baseline: one oneDNN matmul primitive per GEMM of the
 * baseline, bf16 x bf16 -> fp32 with fixed shapes, on oneDNN's own threads
 * (its best: brgemm kernels where the CPU has AVX512-BF16). */
typedef struct {
    dnnl_engine_t eng;
    dnnl_stream_t strm;
    dnnl_primitive_t p[6];
    dnnl_memory_t m[6][3];
} dense_bf16;

static int mm_make(dense_bf16 *d, int i, int ta, int tb, int64_t M, int64_t N, int64_t K, void *A, void *B, float *C,
                   int sum) {
    dnnl_dims_t ad = {M, K}, bd = {K, N}, cd = {M, N};
    dnnl_memory_desc_t a, b, c;
    dnnl_matmul_desc_t md;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    int ok = dnnl_memory_desc_init_by_tag(&a, 2, ad, dnnl_bf16, ta ? dnnl_ba : dnnl_ab) == dnnl_success &&
             dnnl_memory_desc_init_by_tag(&b, 2, bd, dnnl_bf16, tb ? dnnl_ba : dnnl_ab) == dnnl_success &&
             dnnl_memory_desc_init_by_tag(&c, 2, cd, dnnl_f32, dnnl_ab) == dnnl_success &&
             dnnl_matmul_desc_init(&md, &a, &b, NULL, &c) == dnnl_success &&
             dnnl_primitive_attr_create(&attr) == dnnl_success;
    if (ok && sum)
        ok = dnnl_post_ops_create(&po) == dnnl_success && dnnl_post_ops_append_sum(po, 1.0f) == dnnl_success &&
             dnnl_primitive_attr_set_post_ops(attr, po) == dnnl_success;
    ok = ok && dnnl_primitive_desc_create(&pd, &md, attr, d->eng, NULL) == dnnl_success &&
         dnnl_primitive_create(&d->p[i], pd) == dnnl_success &&
         dnnl_memory_create(&d->m[i][0], &a, d->eng, A) == dnnl_success &&
         dnnl_memory_create(&d->m[i][1], &b, d->eng, B) == dnnl_success &&
         dnnl_memory_create(&d->m[i][2], &c, d->eng, C) == dnnl_success;
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return ok;
}

static int mm_run(dense_bf16 *d) {
    for (int i = 0; i < 6; i++) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, d->m[i][0]}, {DNNL_ARG_WEIGHTS, d->m[i][1]}, {DNNL_ARG_DST, d->m[i][2]}};
        if (dnnl_primitive_execute(d->p[i], d->strm, 3, args) != dnnl_success) return 0;
    }
    return dnnl_stream_wait(d->strm) == dnnl_success;
}

static void mm_free(dense_bf16 *d) {
    for (int i = 0; i < 6; i++) {
        if (d->p[i]) dnnl_primitive_destroy(d->p[i]);
        for (int j = 0; j < 3; j++)
            if (d->m[i][j]) dnnl_memory_destroy(d->m[i][j]);
    }
    if (d->strm) dnnl_stream_destroy(d->strm);
    if (d->eng) dnnl_engine_destroy(d->eng);
}

/* Which dense baseline runs (see cmd_bench). */
typedef enum { DENSE_SGEMM, DENSE_BF16_NATIVE, DENSE_BF16_WIDENED } dense_mode;

/* The fp32 dense baseline's operands: the six GEMMs of an FFN over A rows. */
typedef struct {
    int64_t A, D, H, H2;
    float *X, *W1, *Hp, *Ha, *W2, *Y, *dY, *dW2, *dHa, *dW1, *dX;
} dense_f32;

/* forward X W1^T, act, H W2^T; backward dW2, dH, dW1, dX, on all threads */
static void sgemm_run(const dense_f32 *g) {
    int64_t A = g->A, D = g->D, H = g->H, H2 = g->H2;
    dnnl_sgemm('N', 'T', A, H2, D, 1, g->X, D, g->W1, D, 0, g->Hp, H2);
    dnnl_sgemm('N', 'T', A, D, H, 1, g->Ha, H, g->W2, H, 0, g->Y, D);
    dnnl_sgemm('T', 'N', D, H, A, 1, g->dY, D, g->Ha, H, 1, g->dW2, H);
    dnnl_sgemm('N', 'N', A, H, D, 1, g->dY, D, g->W2, H, 0, g->dHa, H);
    dnnl_sgemm('T', 'N', H2, D, A, 1, g->Hp, H2, g->X, D, 1, g->dW1, D);
    dnnl_sgemm('N', 'N', A, D, H2, 1, g->Hp, H2, g->W1, D, 0, g->dX, D);
}

/* dst (n) = src widened from bf16 (exact) */
static void widen(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = moe_bf16_to_f32(src[i]);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill(float *v, size_t n, uint64_t seed, float scale) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = scale * ((float)(s >> 40) / 16777216.0f - 0.5f);
    }
}

/* ---- the CPU and the level, in every output: a figure means little without
 * the instructions it ran on, and the library's fallbacks are never silent. */

/* "cpu: MODEL, level L (best B; MOE_MAX_CPU_ISA=X)" */
static void cpu_text(void) {
    moe_isa isa = moe_cpu_isa(), best = moe_cpu_isa_max();
    const char *cap = getenv("MOE_MAX_CPU_ISA");
    printf("cpu: %s, level %s", moe_cpu_model(), moe_isa_name(isa));
    if (isa != best || (cap && *cap))
        printf(" (best %s%s%.32s)", moe_isa_name(best), cap && *cap ? "; MOE_MAX_CPU_ISA=" : "", cap ? cap : "");
    printf("\n");
}

/* moe_cpu_notes(), one "note: " line each (nothing when empty); called after
 * the work, when the fallbacks it hit have been noted. */
static void notes_text(void) {
    const char *n = moe_cpu_notes();
    while (*n) {
        const char *e = strchr(n, '\n');
        int len = e ? (int)(e - n) : (int)strlen(n);
        printf("note: %.*s\n", len, n);
        n += len + (e != NULL);
    }
}

/* s as a JSON string (quotes, backslashes and control characters escaped);
 * len < 0: up to the NUL */
static void json_str(const char *s, int len) {
    putchar('"');
    for (int i = 0; len < 0 ? s[i] != '\0' : i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch < 0x20) printf("\\u%04x", ch);
        else putchar(ch);
    }
    putchar('"');
}

/* `"cpu": ..., "isa": ..., "isa_max": ..., "cpu_notes": [...]` (no braces) */
static void cpu_json(void) {
    printf("\"cpu\": ");
    json_str(moe_cpu_model(), -1);
    printf(", \"isa\": \"%s\", \"isa_max\": \"%s\", \"cpu_notes\": [", moe_isa_name(moe_cpu_isa()),
           moe_isa_name(moe_cpu_isa_max()));
    const char *n = moe_cpu_notes();
    for (int k = 0; *n; k++) {
        const char *e = strchr(n, '\n');
        int len = e ? (int)(e - n) : (int)strlen(n);
        printf("%s", k ? ", " : "");
        json_str(n, len);
        n += len + (e != NULL);
    }
    printf("]");
}

/* Decode: eval forwards of a few tokens are bound by reading the selected
 * experts' weights. Each call gets new random tokens, so the experts it reads
 * are mostly not in cache (E experts of 2*D*H floats each). A memcpy on every
 * thread runs between the calls (alternating, as the training benchmark does
 * with its sgemm), so both see the same state of the machine. */
static double copy_seconds(char *dst, const char *src, size_t nb) {
    double t0 = cli_now();
#pragma omp parallel
    {
        size_t nt = 1, id = 0;
#ifdef _OPENMP
        nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
#endif
        size_t a = nb * id / nt, b = nb * (id + 1) / nt;
        memcpy(dst + a, src + a, b - a);
    }
    return cli_now() - t0;
}

/* A read-only stream over nb bytes on every thread (the ceiling of a
 * workload that only reads, as decode does); returns seconds. */
static double read_seconds(const float *src, size_t nb, float *sink) {
    size_t n = nb / sizeof(float);
    float tot = 0.0f;
    double t0 = cli_now();
#pragma omp parallel for reduction(+ : tot) schedule(static)
    for (size_t i = 0; i < n; i += 16) {
        float s = 0.0f;
        for (int k = 0; k < 16; k++) s += src[i + k];
        tot += s;
    }
    *sink += tot;
    return cli_now() - t0;
}

/* A read-only burst shaped like a decode call: the k blocks of `per` bytes
 * listed in pick (each a stand-in for one selected expert's weights, in a
 * buffer of E such blocks) read on every thread, a block per task as the
 * expert bank runs its experts. A long stream (read_seconds) keeps the
 * hardware prefetchers at full speed; a few MB read in pieces do not, and
 * this is the yardstick a decode call can actually reach. Returns seconds. */
static double burst_seconds(const char *buf, size_t per, const int *pick, int k, float *sink) {
    float tot = 0.0f;
    size_t n = per / sizeof(float) / 64 * 64;
    double t0 = cli_now();
#pragma omp parallel for reduction(+ : tot) schedule(dynamic, 1)
    for (int i = 0; i < k; i++) {
        const float *v = (const float *)(buf + (size_t)pick[i] * per);
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f; /* one element per 64-byte line, 4 chains */
        for (size_t j = 0; j < n; j += 64) s0 += v[j], s1 += v[j + 16], s2 += v[j + 32], s3 += v[j + 48];
        tot += s0 + s1 + s2 + s3;
    }
    *sink += tot;
    return cli_now() - t0;
}

static int bench_decode(moe_layer *l, int64_t D, int64_t H2, int64_t H, int64_t iters, int json) {
    const moe_config *c = moe_layer_config(l);
    int E = c->num_experts;
    int64_t pool = 64, tmax = 16, reps = iters * 20;
    size_t nb = (size_t)256 << 20; /* far beyond the last-level cache */
    float *x = malloc((size_t)(pool * tmax * D) * sizeof(float)), *y = malloc((size_t)(tmax * D) * sizeof(float));
    char *src = malloc(nb), *dst = malloc(nb);
    double *t = malloc((size_t)reps * sizeof(double)), *tc = malloc((size_t)reps * sizeof(double));
    double *tr = malloc((size_t)reps * sizeof(double)), *tb = malloc((size_t)reps * sizeof(double));
    float sink = 0.0f;
    int rc = 1;
    /* bytes an expert's forward reads: bf16 weights (2 bytes) in bf16 mode, fp32 biases */
    double per_expert = (double)((H2 * D + D * H) * (c->bf16 ? 2 : 4) + (H2 + D) * 4);
    size_t per = ((size_t)per_expert + 63) / 64 * 64;
    char *wb = malloc(per * (size_t)E);
    int *pick = malloc((size_t)E * sizeof *pick);
    if (!x || !y || !src || !dst || !t || !tc || !tr || !tb || !wb || !pick) {
        fprintf(stderr, "moe bench: out of memory\n");
        goto done;
    }
    fill(x, (size_t)(pool * tmax * D), 11, 4.0f);
    memset(src, 1, nb), memset(dst, 2, nb), memset(wb, 3, per * (size_t)E);
    double gate = (double)(E * (D + 1) * (int64_t)sizeof(float));
    if (!json) {
        printf("decode (eval forward), %s, medians of %lld calls on fresh tokens, each followed by a\n"
               "memcpy and a read of %zu MB on every thread, then a read-only burst of as many expert-sized\n"
               "blocks as the call used (random ones of E, a block per task): GB/s of the experts' weights\n"
               "read, of bytes copied (read + written: twice that), of the read-only stream and of the burst\n",
               c->bf16 ? "bf16 weights" : "fp32", (long long)reps, nb >> 20);
        cpu_text();
        printf("%-6s %9s %8s %8s %8s %9s %8s %8s %8s %8s %8s\n", "tokens", "us/call", "experts", "MB", "GB/s",
               "memcpy", "read", "burst", "/memcpy", "/read", "/burst");
    }
    const int64_t Ts[3] = {1, 4, 16};
    for (int k = 0; k < 3; k++) {
        int64_t T = Ts[k];
        double bytes = 0, bburst = 0;
        uint64_t brng = 0x9e3779b97f4a7c15ull * (uint64_t)(k + 1);
        for (int64_t r = 0; r < reps; r++) {
            const float *xr = x + (r % pool) * tmax * D;
            double t0 = cli_now();
            moe_status st = moe_layer_forward(l, y, NULL, xr, T, MOE_EVAL | MOE_NO_GRAD);
            t[r] = cli_now() - t0;
            if (st != MOE_OK) {
                rc = cli_fail("bench", "decode", st);
                goto done;
            }
            tc[r] = copy_seconds(dst, src, nb);
            tr[r] = read_seconds((const float *)dst, nb, &sink);
            src[r % 64] ^= dst[nb - 1 - (size_t)(r % 64)]; /* keep the copies live */
            moe_stats s;
            moe_layer_stats(l, &s);
            int used = 0;
            for (int e = 0; e < s.n_experts; e++) used += s.expert_counts[e] > 0;
            for (int e = 0; e < E; e++) pick[e] = e; /* `used` distinct random blocks */
            for (int e = 0; e < used; e++) {
                brng = brng * 6364136223846793005ull + 1442695040888963407ull; /* LCG: any spread will do */
                int j = e + (int)((brng >> 33) % (uint64_t)(E - e)), tmp = pick[e];
                pick[e] = pick[j], pick[j] = tmp;
            }
            tb[r] = burst_seconds(wb, per, pick, used, &sink);
            bburst += (double)used * (double)per / (double)reps;
            bytes += (used * per_expert + gate) / (double)reps;
        }
        qsort(t, (size_t)reps, sizeof *t, cmp_double);
        qsort(tc, (size_t)reps, sizeof *tc, cmp_double);
        qsort(tr, (size_t)reps, sizeof *tr, cmp_double);
        qsort(tb, (size_t)reps, sizeof *tb, cmp_double);
        double tm = t[reps / 2], bw = bytes / tm, bw_copy = (double)nb / tc[reps / 2], bw_read = (double)nb / tr[reps / 2];
        double bw_burst = bburst / tb[reps / 2];
        if (json) {
            printf("{\"mode\": \"decode\", \"T\": %lld, \"D\": %lld, \"H\": %lld, \"E\": %d, \"K\": %d, "
                   "\"seconds\": %.7f, \"bytes\": %.0f, \"gbps\": %.2f, \"memcpy_gbps\": %.2f, \"read_gbps\": %.2f, "
                   "\"burst_gbps\": %.2f, \"ratio\": %.3f, \"ratio_read\": %.3f, \"ratio_burst\": %.3f, ",
                   (long long)T, (long long)D, (long long)H, E, c->top_k, tm, bytes, bw * 1e-9, bw_copy * 1e-9,
                   bw_read * 1e-9, bw_burst * 1e-9, bw / bw_copy, bw / bw_read, bw / bw_burst);
            cpu_json();
            printf("}\n");
        } else
            printf("%-6lld %9.1f %8.2f %8.2f %8.1f %9.1f %8.1f %8.1f %8.2f %8.2f %8.2f\n", (long long)T, tm * 1e6,
                   bytes / per_expert, bytes * 1e-6, bw * 1e-9, bw_copy * 1e-9, bw_read * 1e-9, bw_burst * 1e-9,
                   bw / bw_copy, bw / bw_read, bw / bw_burst);
    }
    if (!json) notes_text();
    rc = 0;
done:
    free(x), free(y), free(src), free(dst), free(t), free(tc), free(tr), free(tb), free(wb), free(pick);
    if (sink == 12345.0f) printf(" "); /* keep the reads */
    return rc;
}

/* Expert parallel: the global batch split over the ranks (groups), every
 * rank times its forward+backward between barriers; a step's time is the
 * slowest rank's. Prints on rank 0. */
static int bench_ep(const moe_config *c, const cli_ep *ep, int64_t T, int64_t B, int64_t iters, int64_t threads,
                    int64_t shared, int json) {
    int64_t D = c->input_dim, N = T / B, g0, Gr;
    cli_ep_split(B, ep->rank, ep->size, &g0, &Gr);
    int64_t Tr = Gr * N;
    moe_layer *l = NULL;
    moe_status st = cli_ep_create(&l, c);
    if (st != MOE_OK) return cli_fail("bench", "--ep", st);
    size_t n = (size_t)(Tr > 0 ? Tr : 1) * (size_t)D;
    float *x = malloc(n * 4), *y = malloc(n * 4), *dy = malloc(n * 4), *dx = malloc(n * 4);
    double *tm = malloc((size_t)iters * sizeof *tm), rows = 0, xs0 = 0, xs1 = 0;
    int64_t xb0 = 0, xb1 = 0;
    int ok = x && y && dy && dx && tm;
    if (!cli_ep_all_ok(ok)) {
        fprintf(stderr, "moe bench: out of memory\n");
        goto done;
    }
    fill(x, n, 1 + (uint64_t)ep->rank, 2.0f), fill(dy, n, 100 + (uint64_t)ep->rank, 0.01f);
    /* warm-up, then the timed steps */
    for (int64_t it = -1; it < iters; it++) {
        cli_ep_all_ok(1); /* a barrier: every rank starts the step together */
        if (it == 0) moe_layer_ep_traffic(l, &xs0, &xb0);
        double t0 = cli_now();
        if ((st = moe_layer_forward_seq(l, y, NULL, x, Gr, N, MOE_TRAIN)) != MOE_OK ||
            (st = moe_layer_backward(l, dx, dy, 1.0f)) != MOE_OK) {
            cli_fail("bench", "--ep", st);
            goto done;
        }
        double t = cli_now() - t0;
        if (it < 0) continue;
        /* the slowest rank's time: every rank's time summed into its slot */
        double all[1024] = {0};
        if (ep->size <= 1024) all[ep->rank] = t;
        cli_ep_sum_f64(all, ep->size <= 1024 ? ep->size : 1);
        double mx = 0;
        for (int p = 0; p < ep->size && p < 1024; p++) mx = all[p] > mx ? all[p] : mx;
        tm[it] = mx;
        moe_stats s;
        moe_layer_stats(l, &s);
        rows += (double)(s.assignments + Tr * shared) / (double)iters;
    }
    moe_layer_ep_traffic(l, &xs1, &xb1);
    double xsec = (xs1 - xs0) / (double)iters, xbytes = (double)(xb1 - xb0) / (double)iters;
    double sums[3] = {rows, xsec, xbytes};
    cli_ep_sum_f64(sums, 3);
    qsort(tm, (size_t)iters, sizeof *tm, cmp_double);
    double t_step = tm[iters / 2];
    int glu = c->expert != MOE_EXPERT_MLP;
    double per_row = 3.0 * 2.0 * (double)(D * (glu ? 2 : 1) * c->hidden_dim + c->hidden_dim * D);
    double gf = sums[0] * per_row / t_step * 1e-9, xs_mean = sums[1] / ep->size;
    if (ep->rank == 0) {
        if (json) {
            printf("{\"mode\": \"ep\", \"layer\": \"%s\", \"ranks\": %d, \"threads_per_rank\": %lld, \"T\": %lld, "
                   "\"D\": %lld, \"H\": %lld, \"E\": %d, \"K\": %d, \"seconds\": %.6f, \"tokens_per_s\": %.1f, "
                   "\"gflops\": %.2f, \"exchange_seconds\": %.6f, \"bytes_per_step\": %.0f, ",
                   moe_layer_type_name(c->type), ep->size, (long long)threads, (long long)T, (long long)D,
                   (long long)c->hidden_dim, c->num_experts, c->top_k, t_step, (double)T / t_step, gf, xs_mean,
                   sums[2]);
            cpu_json();
            printf("}\n");
        } else {
            printf("forward+backward, fp32, expert parallel: %d ranks x %lld threads, %lld groups of %lld tokens "
                   "split over the ranks, median of %lld\n", ep->size, (long long)threads, (long long)B,
                   (long long)N, (long long)iters);
            cpu_text(); /* rank 0's CPU: the ranks of one mpirun may differ, each notes its own */
            printf("%-10s T=%lld D=%lld H=%lld E=%d (%d per rank) K=%d: %.0f tokens/s, %.1f GFLOP/s, %.1f ms per "
                   "step\n", moe_layer_type_name(c->type), (long long)T, (long long)D, (long long)c->hidden_dim,
                   c->num_experts, c->num_experts / ep->size, c->top_k, (double)T / t_step, gf, t_step * 1e3);
            printf("exchanges (counts and rows, forward and backward): %.2f ms per step per rank (%.1f%% of the "
                   "step), %.1f MB sent between ranks per step\n", xs_mean * 1e3, 100.0 * xs_mean / t_step,
                   sums[2] / 1e6);
            notes_text();
        }
    }
done:
    free(x), free(y), free(dy), free(dx), free(tm);
    moe_layer_free(l);
    return st == MOE_OK && ok ? 0 : 1;
}

int cmd_bench(int argc, char **argv) {
    const char *cmd = "bench";
    int64_t T = 4096, D = 512, H = 2048, E = -1, K = 2, iters = 5, threads = 0, B = -1, Ei = 4, S = 0;
    int64_t shared = 0;
    int have_k = 0, decode = 0, use_ep = 0, bf16 = 0;
    const char *router = NULL;
    int json = 0, bad = 0;
    moe_layer_type type = MOE_LAYER_TOPK;
    moe_expert_kind kind = MOE_EXPERT_MLP;
    for (int i = 1; i < argc && !bad; i++) {
        const char *v;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage_text, stdout);
            return 0;
        } else if ((v = cli_flag(argc, argv, &i, "--tokens", &bad))) {
            if (!cli_int(cmd, "--tokens", v, 1, 1 << 20, &T)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--dim", &bad))) {
            if (!cli_int(cmd, "--dim", v, 1, 1 << 16, &D)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--hidden", &bad))) {
            if (!cli_int(cmd, "--hidden", v, 1, 1 << 17, &H)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--experts", &bad))) {
            if (!cli_int(cmd, "--experts", v, 1, 4096, &E)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--inner", &bad))) {
            if (!cli_int(cmd, "--inner", v, 1, 4096, &Ei)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--batch", &bad))) {
            if (!cli_int(cmd, "--batch", v, 1, 1 << 20, &B)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--layer", &bad))) {
            if (!strcmp(v, "topk")) type = MOE_LAYER_TOPK;
            else if (!strcmp(v, "gshard")) type = MOE_LAYER_GSHARD;
            else if (!strcmp(v, "hierarchical")) type = MOE_LAYER_HIERARCHICAL;
            else if (!strcmp(v, "soft_dynamic")) type = MOE_LAYER_SOFT_DYNAMIC;
            else if (!strcmp(v, "soft")) type = MOE_LAYER_SOFT;
            else {
                fprintf(stderr, "moe bench: --layer: expected topk, gshard, hierarchical, soft_dynamic or soft, "
                                "got '%s'\n", v);
                return 2;
            }
        } else if ((v = cli_flag(argc, argv, &i, "--top-k", &bad))) {
            if (!cli_int(cmd, "--top-k", v, 1, 4096, &K)) return 2;
            have_k = 1;
        } else if ((v = cli_flag(argc, argv, &i, "--router", &bad))) {
            router = v;
        } else if ((v = cli_flag(argc, argv, &i, "--shared", &bad))) {
            if (!cli_int(cmd, "--shared", v, 0, 1024, &shared)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--slots", &bad))) {
            if (!cli_int(cmd, "--slots", v, 1, 1 << 20, &S)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--iters", &bad))) {
            if (!cli_int(cmd, "--iters", v, 1, 10000, &iters)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--threads", &bad))) {
            if (!cli_int(cmd, "--threads", v, 1, 1024, &threads)) return 2;
        } else if ((v = cli_flag(argc, argv, &i, "--expert", &bad))) {
            if (!strcmp(v, "mlp")) kind = MOE_EXPERT_MLP;
            else if (!strcmp(v, "swiglu")) kind = MOE_EXPERT_SWIGLU;
            else if (!strcmp(v, "geglu")) kind = MOE_EXPERT_GEGLU;
            else {
                fprintf(stderr, "moe bench: --expert: expected mlp, swiglu or geglu, got '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--decode")) decode = 1;
        else if (!strcmp(argv[i], "--bf16")) bf16 = 1;
        else if (!strcmp(argv[i], "--ep")) use_ep = 1;
        else if (!bad) {
            fprintf(stderr, "moe bench: unknown option '%s'\n\n%s", argv[i], usage_text);
            return 2;
        }
    }
    if (bad) return 2;
    int topk = type == MOE_LAYER_TOPK;
    int soft = type == MOE_LAYER_SOFT_DYNAMIC || type == MOE_LAYER_SOFT;
    if (E < 0) E = type == MOE_LAYER_HIERARCHICAL || soft ? 4 : 16;
    int b_given = B > 0;
    if (B < 0) B = topk ? 1 : 4;
    if (topk && K > E) {
        fprintf(stderr, "moe bench: --top-k %lld is more than --experts %lld\n", (long long)K, (long long)E);
        return 2;
    }
    if (T % B) {
        fprintf(stderr, "moe bench: --tokens %lld is not a multiple of --batch %lld\n", (long long)T, (long long)B);
        return 2;
    }
    if (soft && kind == MOE_EXPERT_SWIGLU) {
        fprintf(stderr, "moe bench: --expert: soft layers have GELU (mlp) or geglu experts\n");
        return 2;
    }
    if (!topk && !soft && kind != MOE_EXPERT_MLP) {
        fprintf(stderr, "moe bench: --expert: %s layers have MLP experts only\n", moe_layer_type_name(type));
        return 2;
    }
    cli_ep ep = {0, 1};
    if (use_ep) {
        if (soft) {
            fprintf(stderr, "moe bench: --ep is for --layer topk, gshard or hierarchical (soft layers stay in one "
                            "process)\n");
            return 2;
        }
        if (cli_ep_start(&ep, cmd, &argc, &argv)) return 1;
        /* data parallel: at least one group per rank (topk: one group of T/P tokens each) */
        if (!b_given && B < ep.size) B = ep.size;
        if (T % B) {
            if (ep.rank == 0) fprintf(stderr, "moe bench: --tokens %lld is not a multiple of %lld groups (one per rank "
                                              "at least; give --batch)\n", (long long)T, (long long)B);
            cli_ep_stop();
            return 2;
        }
#ifdef _OPENMP
        if (!threads) threads = omp_get_num_procs() / ep.size > 0 ? omp_get_num_procs() / ep.size : 1;
#endif
    }
    /* the level first: it caps oneDNN's ISA too (MOE_MAX_CPU_ISA), which
     * holds only if it is set before oneDNN runs anything */
    moe_isa isa = moe_cpu_isa();
    threads = moe_set_num_threads((int)threads);
    int glu = kind != MOE_EXPERT_MLP;
    int64_t H2 = glu ? 2 * H : H, N = T / B;

    moe_config c;
    moe_config_init(&c, type);
    c.input_dim = D, c.hidden_dim = H, c.num_experts = (int)E, c.top_k = (int)K, c.expert = kind, c.seed = 7;
    if (type == MOE_LAYER_HIERARCHICAL) c.num_experts_inner = (int)Ei;
    if ((router || shared) && !topk) {
        fprintf(stderr, "moe bench: --router and --shared are for --layer topk\n");
        return 2;
    }
    if (router && moe_config_set_router(&c, router) != MOE_OK) return cli_fail(cmd, "--router", MOE_ERR_ARG);
    if (!router || have_k) c.top_k = (int)K; /* a recipe's K (Switch: 1) unless --top-k */
    K = c.top_k, c.num_shared = (int)shared;
    c.bf16 = bf16;
    if (soft) {
        c.activation = MOE_ACT_GELU;
        if (S == 0) S = N / E > 0 ? N / E : 1;
        c.slots_per_expert = S;
    }
    if (use_ep) {
        int r = bench_ep(&c, &ep, T, B, iters, threads, shared, json);
        cli_ep_stop();
        return r;
    }
    moe_layer *l = NULL;
    moe_status st = moe_layer_create(&l, &c);
    if (st != MOE_OK) return cli_fail(cmd, "layer", st);
    if (decode) {
        int r = topk ? bench_decode(l, D, H2, H, iters, json) : 2;
        if (!topk) fprintf(stderr, "moe bench: --decode is for --layer topk\n");
        moe_layer_free(l);
        return r;
    }

    size_t nx = (size_t)(T * D);
    float *x = malloc(nx * 4), *y = malloc(nx * 4), *dy = malloc(nx * 4), *dx = malloc(nx * 4);
    float *X = NULL, *W1 = NULL, *Hp = NULL, *Ha = NULL, *W2 = NULL, *Y = NULL, *dY = NULL, *dW2 = NULL;
    float *dHa = NULL, *dW1 = NULL, *dX = NULL;
    uint16_t *X16 = NULL, *W116 = NULL, *W216 = NULL, *Hp16 = NULL, *Ha16 = NULL, *dY16 = NULL;
    dense_bf16 dd;
    memset(&dd, 0, sizeof dd);
    double *tm = malloc((size_t)iters * sizeof *tm), *td = malloc((size_t)iters * sizeof *td), rows = 0;
    int rc = 1;
    if (!x || !y || !dy || !dx || !tm || !td) {
        fprintf(stderr, "moe bench: out of memory\n");
        goto done;
    }
    fill(x, nx, 1, 2.0f), fill(dy, nx, 2, 0.01f);
    /* warm-up: also tells how many rows the experts run (A = T*K for topk;
     * the kept assignments for gshard and hierarchical) */
    if ((st = moe_layer_forward_seq(l, y, NULL, x, B, N, 1)) != MOE_OK ||
        (st = moe_layer_backward(l, dx, dy, 1.0f)) != MOE_OK) {
        cli_fail(cmd, moe_layer_type_name(type), st);
        goto done;
    }
    moe_stats stats;
    moe_layer_stats(l, &stats);
    int64_t A = stats.assignments + T * shared > 0 ? stats.assignments + T * shared : 1;
    double per_row = 3.0 * 2.0 * (double)(D * H2 + H * D), soft_flops = 0, soft_route = 0;
    if (soft) { /* every product of the method, forward; backward is twice that */
        int64_t Np = type == MOE_LAYER_SOFT_DYNAMIC ? (N + E - 1) / E * E : N;
        int64_t Sl = type == MOE_LAYER_SOFT_DYNAMIC ? Np / E : S, J = E * Sl;
        soft_route = 2.0 * (double)B * (double)J * (double)D * (double)(2 * Np + N);
        if (type == MOE_LAYER_SOFT_DYNAMIC) soft_route += 2.0 * (double)(B * Sl) * (double)(E * D) * (double)D;
        soft_flops = 3.0 * (soft_route + (double)(B * J) * 2.0 * (double)(D * H2 + H * D));
        A = (int64_t)(soft_flops / per_row + 0.5); /* baseline rows of the same FLOPs */
        if (A < 1) A = 1;
    }
    size_t na = (size_t)(A * D), nh2 = (size_t)(A * H2), nh = (size_t)(A * H);
    X = malloc(na * 4), W1 = malloc((size_t)(H2 * D) * 4), Hp = malloc(nh2 * 4), Ha = malloc(nh * 4);
    W2 = malloc((size_t)(D * H) * 4), Y = malloc(na * 4), dY = malloc(na * 4);
    dW2 = malloc((size_t)(D * H) * 4), dHa = malloc(nh2 * 4), dW1 = malloc((size_t)(H2 * D) * 4);
    dX = malloc(na * 4);
    if (!X || !W1 || !Hp || !Ha || !W2 || !Y || !dY || !dW2 || !dHa || !dW1 || !dX) {
        fprintf(stderr, "moe bench: out of memory\n");
        goto done;
    }
    fill(X, na, 3, 2.0f), fill(W1, (size_t)(H2 * D), 4, 0.1f);
    fill(W2, (size_t)(D * H), 5, 0.1f), fill(dY, na, 6, 0.01f), fill(Hp, nh2, 7, 1.0f), fill(Ha, nh, 8, 1.0f);
    memset(dW1, 0, (size_t)(H2 * D) * 4), memset(dW2, 0, (size_t)(D * H) * 4);
    /* The dense baseline. bf16 at avx512_bf16: oneDNN's bf16 matmuls (native
     * vdpbf16ps). bf16 elsewhere: the library widens bf16 GEMMs to fp32 and runs
     * them as fp32 (src/kernels/onednn.c), so the best it could do is the fp32
     * baseline itself: the same sgemms, on the operands rounded to bf16
     * (exact in fp32), widened once before the timing. */
    dense_mode mode = bf16 ? (isa == MOE_ISA_AVX512_BF16 ? DENSE_BF16_NATIVE : DENSE_BF16_WIDENED) : DENSE_SGEMM;
    int native_failed = 0;
    if (bf16) { /* the baseline's operands in bf16 */
        X16 = malloc(na * 2), W116 = malloc((size_t)(H2 * D) * 2), W216 = malloc((size_t)(D * H) * 2);
        Hp16 = malloc(nh2 * 2), Ha16 = malloc(nh * 2), dY16 = malloc(na * 2);
        if (!X16 || !W116 || !W216 || !Hp16 || !Ha16 || !dY16) {
            fprintf(stderr, "moe bench: out of memory\n");
            goto done;
        }
        moe_to_bf16(X16, X, (int64_t)na), moe_to_bf16(W116, W1, H2 * D), moe_to_bf16(W216, W2, D * H);
        moe_to_bf16(Hp16, Hp, (int64_t)nh2), moe_to_bf16(Ha16, Ha, (int64_t)nh), moe_to_bf16(dY16, dY, (int64_t)na);
    }
    if (mode == DENSE_BF16_NATIVE && /* its six matmuls; their first run JIT-compiles them, untimed */
        (dnnl_engine_create(&dd.eng, dnnl_cpu, 0) != dnnl_success ||
         dnnl_stream_create(&dd.strm, dd.eng, dnnl_stream_default_flags) != dnnl_success ||
         !mm_make(&dd, 0, 0, 1, A, H2, D, X16, W116, Hp, 0) || !mm_make(&dd, 1, 0, 1, A, D, H, Ha16, W216, Y, 0) ||
         !mm_make(&dd, 2, 1, 0, D, H, A, dY16, Ha16, dW2, 1) || !mm_make(&dd, 3, 0, 0, A, H, D, dY16, W216, dHa, 0) ||
         !mm_make(&dd, 4, 1, 0, H2, D, A, Hp16, X16, dW1, 1) || !mm_make(&dd, 5, 0, 0, A, D, H2, Hp16, W116, dX, 0) ||
         !mm_run(&dd))) {
        /* as the library does when oneDNN cannot: widened, and said (below) */
        mm_free(&dd);
        memset(&dd, 0, sizeof dd);
        mode = DENSE_BF16_WIDENED, native_failed = 1;
    }
    if (mode == DENSE_BF16_WIDENED) {
        widen(X, X16, na), widen(W1, W116, (size_t)(H2 * D)), widen(W2, W216, (size_t)(D * H));
        widen(Hp, Hp16, nh2), widen(Ha, Ha16, nh), widen(dY, dY16, na);
    }
    dense_f32 g = {A, D, H, H2, X, W1, Hp, Ha, W2, Y, dY, dW2, dHa, dW1, dX};
    if (mode != DENSE_BF16_NATIVE) sgemm_run(&g); /* untimed, as the layer's warm-up: oneDNN's first call JITs */

    double check0 = moe__check_seconds();
    for (int64_t it = 0; it < iters; it++) {
        double t0 = cli_now();
        if ((st = moe_layer_forward_seq(l, y, NULL, x, B, N, 1)) != MOE_OK ||
            (st = moe_layer_backward(l, dx, dy, 1.0f)) != MOE_OK) {
            cli_fail(cmd, moe_layer_type_name(type), st);
            goto done;
        }
        double t1 = cli_now();
        moe_layer_stats(l, &stats);
        rows += (soft ? (double)A : (double)(stats.assignments + T * shared)) / (double)iters;
        if (mode == DENSE_BF16_NATIVE) mm_run(&dd);
        else sgemm_run(&g);
        double t2 = cli_now();
        tm[it] = t1 - t0, td[it] = t2 - t1;
    }
    qsort(tm, (size_t)iters, sizeof *tm, cmp_double);
    qsort(td, (size_t)iters, sizeof *td, cmp_double);
    double t_moe = tm[iters / 2], t_dense = td[iters / 2];
    /* the share of the result checks (README "Reliability"): the library's
     * own count of the thread-seconds its NaN/Inf scans of y, dx and every
     * gradient took over the timed calls, per call and thread */
    double t_check = (moe__check_seconds() - check0) / (double)iters / (double)threads;
    /* useful FLOPs: the rows the experts ran (mean over the timed calls for
     * the layer; the warm-up's count for the dense baseline) */
    double gf_moe = rows * per_row / t_moe * 1e-9, gf_dense = (double)A * per_row / t_dense * 1e-9;
    const char *kn = moe_expert_kind_name(kind);
    /* the peaks of the level: fp32 always (the ceiling of the widened bf16
     * GEMMs too); bf16 only where it is native. Shares of the peak use the
     * per-thread sum (peak.c: a preempted thread does not lower it). */
    cli_peak p32, p16;
    cli_peak_measure(&p32, 0, (int)threads);
    int have16 = cli_peak_measure(&p16, 1, (int)threads);
    const cli_peak *pk = mode == DENSE_BF16_NATIVE ? &p16 : &p32; /* the ceiling of the baseline's GEMMs */
    const char *pk_name = pk == &p16 ? "bf16" : "fp32";
    double share = pk->thread_sum > 0 ? gf_moe / pk->thread_sum : 0.0;
    double dshare = pk->thread_sum > 0 ? gf_dense / pk->thread_sum : 0.0;
    static const char *const mode_json[] = {"sgemm", "bf16_matmul", "bf16_widened_sgemm"};
    if (json) {
        printf("{\"layer\": \"%s\", \"expert\": \"%s\", \"T\": %lld, \"B\": %lld, \"D\": %lld, \"H\": %lld, "
               "\"E\": %lld, \"K\": %lld, \"rows\": %.1f, \"threads\": %lld, \"iters\": %lld, \"seconds\": %.6f, "
               "\"tokens_per_s\": %.1f, \"gflops\": %.2f, \"dense_seconds\": %.6f, \"dense_gflops\": %.2f, "
               "\"ratio\": %.3f, \"check_seconds\": %.6f, \"fp32_peak_gflops\": %.1f, \"bf16_peak_gflops\": %.1f, "
               "\"fp32_peak_team_gflops\": %.1f, \"bf16_peak_team_gflops\": %.1f, \"bf16\": %s, "
               "\"bf16_native\": %s, \"dense_baseline\": \"%s\", \"peak\": \"%s\", \"peak_loop\": \"%s\", "
               "\"peak_thread_sum_gflops\": %.1f, \"peak_team_gflops\": %.1f, \"peak_share\": %.3f, "
               "\"dense_peak_share\": %.3f, ",
               moe_layer_type_name(type), kn, (long long)T, (long long)B, (long long)D, (long long)H,
               (long long)(type == MOE_LAYER_HIERARCHICAL ? E * Ei : E), (long long)(topk ? K : 2), rows,
               (long long)threads, (long long)iters, t_moe, (double)T / t_moe, gf_moe, t_dense, gf_dense,
               gf_moe / gf_dense, t_check, p32.thread_sum, p16.thread_sum, p32.team, p16.team,
               bf16 ? "true" : "false", isa == MOE_ISA_AVX512_BF16 ? "true" : "false", mode_json[mode], pk_name,
               pk->loop, pk->thread_sum, pk->team, share, dshare);
        cpu_json();
        printf("}\n");
    } else {
        printf("forward+backward, %s, %lld threads, median of %lld\n", bf16 ? "bf16 mixed precision (autocast)" : "fp32",
               (long long)threads, (long long)iters);
        cpu_text();
        printf("%-24s %-34s %10s %9s %9s %7s\n", "layer", "shape", "tokens/s", "GFLOP/s", "ms", "ratio");
        char shape[96];
        if (topk)
            snprintf(shape, sizeof shape, "T=%lld D=%lld H=%lld E=%lld K=%lld", (long long)T, (long long)D,
                     (long long)H, (long long)E, (long long)K);
        else if (soft)
            snprintf(shape, sizeof shape, "B=%lld N=%lld D=%lld H=%lld E=%lld S=%lld", (long long)B, (long long)N,
                     (long long)D, (long long)H, (long long)E,
                     (long long)(type == MOE_LAYER_SOFT ? S : (N + E - 1) / E));
        else if (type == MOE_LAYER_GSHARD)
            snprintf(shape, sizeof shape, "B=%lld N=%lld D=%lld H=%lld E=%lld", (long long)B, (long long)N,
                     (long long)D, (long long)H, (long long)E);
        else
            snprintf(shape, sizeof shape, "B=%lld N=%lld D=%lld H=%lld E=%lldx%lld", (long long)B, (long long)N,
                     (long long)D, (long long)H, (long long)E, (long long)Ei);
        char name[40];
        if (router || shared)
            snprintf(name, sizeof name, "%s%s%s", router ? router : "topk", shared ? "+shared" : "",
                     glu ? " glu" : "");
        else
            snprintf(name, sizeof name, "%s (%s)", moe_layer_type_name(type), kn);
        static const char *const mode_text[] = {"dense sgemm, same FLOP", "dense bf16, same FLOP",
                                                "dense widened, same FLOP"};
        printf("%-24s %-34s %10.0f %9.1f %9.1f %7.3f\n", name, shape, (double)T / t_moe, gf_moe, t_moe * 1e3,
               gf_moe / gf_dense);
        printf("%-24s %-34s %10.0f %9.1f %9.1f %7.3f\n", mode_text[mode], shape, (double)T / t_dense, gf_dense,
               t_dense * 1e3, 1.0);
        printf("result checks (NaN/Inf scans of y, dx and every gradient): %.2f ms per step, %.2f%% of "
               "forward+backward\n", t_check * 1e3, 100.0 * t_check / t_moe);
        if (mode == DENSE_BF16_WIDENED)
            printf("bf16 at level %s: %s, so the library widens its bf16 GEMMs to fp32 (exact) and runs them as fp32; "
                   "the dense baseline runs the fp32 sgemms on the operands rounded to bf16 (widened once, untimed), "
                   "and the shares are of the fp32 peak\n", moe_isa_name(isa),
                   native_failed ? "oneDNN could not make the bf16 matmuls of the dense baseline"
                                 : "no native bf16 dot products");
        printf("peak of level %s, measured now on %d threads, each thread timed alone (in parentheses: the team "
               "timed together): fp32 %.0f (%.0f) GFLOP/s [%s]", moe_isa_name(isa), p32.threads, p32.thread_sum, p32.team,
               p32.loop);
        if (have16) printf(", bf16 %.0f (%.0f) GFLOP/s [%s]", p16.thread_sum, p16.team, p16.loop);
        else printf(", no native bf16 peak at this level");
        printf("\nthis layer (%s) runs at %.2f of the %s peak, the dense baseline at %.2f\n", bf16 ? "bf16" : "fp32",
               share, pk_name, dshare);
        if (soft)
            printf("useful work per call: %.1f GFLOP (experts %.0f%%, slot logits/dispatch/combine%s %.0f%%)\n",
                   soft_flops * 1e-9, 100.0 * (1.0 - 3.0 * soft_route / soft_flops),
                   type == MOE_LAYER_SOFT_DYNAMIC ? "/slot projection" : "", 100.0 * 3.0 * soft_route / soft_flops);
        else if (!topk)
            printf("expert rows per call: %.0f of %lld tokens x 2 choices (the rest dropped by policy or "
                   "capacity)\n", rows, (long long)T);
        notes_text();
    }
    rc = 0;
done:
    free(x), free(y), free(dy), free(dx), free(X), free(W1), free(Hp), free(Ha), free(W2), free(Y), free(dY);
    free(dW2), free(dHa), free(dW1), free(dX), free(tm), free(td);
    free(X16), free(W116), free(W216), free(Hp16), free(Ha16), free(dY16);
    mm_free(&dd);
    moe_layer_free(l);
    return rc;
}
