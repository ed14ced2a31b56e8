/*
 * Helpers shared by the `moe` subcommands: flag parsing with checked
 * numbers, file reading, error printing.
 */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include "moe.h"

#include <stdint.h>

/* Flag matching: returns the value of `--name VALUE` or `--name=VALUE` at
 * argv[*i] (advancing *i past a separate value), or NULL if argv[*i] is not
 * this flag. A missing value prints an error and sets *bad. */
const char *cli_flag(int argc, char **argv, int *i, const char *name, int *bad);
/* Parse whole strings; print "moe CMD: --flag: ..." and return 0 on error. */
int cli_int(const char *cmd, const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out);
int cli_float(const char *cmd, const char *flag, const char *s, double lo, double hi, double *out);
/* Read a whole file as a NUL-terminated string (malloc'd); NULL + message on error. */
char *cli_read_text(const char *cmd, const char *path);
/* Print "moe CMD: what: STATUS: message" to stderr; return 1. */
int cli_fail(const char *cmd, const char *what, moe_status st);
/* Monotonic seconds. */
double cli_now(void);
/* 1 if stderr is a terminal. */
int cli_isatty_err(void);

int cmd_forward(int argc, char **argv);

/* The arithmetic peak of the level this process runs at (moe_cpu_isa()),
 * measured now on `threads` threads by register-only loops (peak.c): fp32
 * (bf16 = 0; FMA, or SSE mul+add pairs at x86-64's baseline) or native bf16
 * dot products (bf16 = 1; vdpbf16ps, only at avx512_bf16). */
typedef struct {
    double thread_sum; /* GFLOP/s: sum over threads of each thread's FLOPs / its own time, best of 7 each */
    double team;       /* GFLOP/s: all threads' FLOPs / the parallel region's wall time, best of 7 */
    int threads;       /* the threads that ran */
    const char *loop;  /* the instructions timed, in words ("none" if no such peak) */
} cli_peak;
/* 1 and *p filled; 0 (zeros) when the level has no such instructions (bf16
 * below avx512_bf16) or out of memory. Half a second or so per call. */
int cli_peak_measure(cli_peak *p, int bf16, int threads);
/* cli_peak_measure's thread_sum (the figure shares of the peak use); 0 when none. */
double cli_peak_gflops(int bf16, int threads);

/* `moe forward`'s parsed flags, for the expert-parallel path (forward_ep.c). */
typedef struct {
    const char *cfg_path, *w_path, *x_path, *out_path, *dy_path, *mask_list, *force_list;
    int eval, have_seed, show_stats;
    int64_t seed, threads, top_k;
    int bf16;
} forward_args;
int forward_ep(const forward_args *a, int *argc, char ***argv);
/* Append "grad.<name>" entries (the gradients of every parameter of l) to
 * *ents (grown; *n entries so far); names (num_params) gets the malloc'd
 * names. 1 on success, 0 out of memory. */
int forward_add_grads(moe_st_entry **ents, int *n, char **names, moe_layer *l);
/* --top-k, --mask-experts, --force-experts on layer l; 1 on success, else prints why and returns 0 */
int forward_routing(moe_layer *l, const moe_config *cfg, int64_t top_k, const char *mask_list, const char *force_list);
int cmd_train(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_sample(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_cpu(int argc, char **argv);
int cmd_inspect(int argc, char **argv);

#endif
