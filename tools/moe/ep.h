/*
 * Expert parallelism in the CLI: `--ep` under mpirun. ep_mpi.c in builds
 * with MPI (the only CLI file that includes mpi.h), ep_none.c otherwise
 * (every entry point says how to get an MPI build).
 * Dimension key: P ranks, B groups, N tokens per group, D row width.
 */
#ifndef MOE_CLI_EP_H
#define MOE_CLI_EP_H

#include "moe.h"

typedef struct {
    int rank, size;
} cli_ep;

/* Start MPI (MPI_Init) for `cmd`; 0 on success, else prints why and returns 1. */
int  cli_ep_start(cli_ep *ep, const char *cmd, int *argc, char ***argv);
void cli_ep_stop(void);
/* The expert-parallel layer over all ranks (moe_layer_create_mpi on MPI_COMM_WORLD). */
moe_status cli_ep_create(moe_layer **l, const moe_config *cfg);
/* rank 0's *n int64s to every rank */
int cli_ep_bcast_i64(int64_t *v, int n);
/* Rows in groups: rank 0's all (G, rowlen floats) split by groups, rank r
 * gets groups [g0(r), g0(r)+G_r) into mine (G_r, rowlen). split: the even
 * split of G groups over the ranks (the first G % P ranks one more). */
void cli_ep_split(int64_t G, int rank, int size, int64_t *g0, int64_t *Gr);
int  cli_ep_scatter(float *mine, const float *all, int64_t G, int64_t rowlen);
int  cli_ep_gather(float *all, const float *mine, int64_t G, int64_t rowlen);
/* in place sums over the ranks */
int cli_ep_sum_f64(double *v, int n);
int cli_ep_sum_i64(int64_t *v, int n);
/* moe_layer_gather / moe_layer_allreduce_grads (moe_mpi.h) */
moe_status cli_ep_gather_layer(moe_layer *l, moe_layer *full);
moe_status cli_ep_allreduce_grads(moe_layer *l);
/* in place float sums over the ranks (gradients); 0 on success */
int cli_ep_sum_f32(float *v, int64_t n);
/* rank 0 gets every rank's n bytes in rank order (*out malloc'd); 0 on success */
int cli_ep_gather_bytes(void **out, int64_t *out_n, const void *send, int64_t n);
/* 1 if every rank passes ok != 0 (collective) */
int cli_ep_all_ok(int ok);

#endif
