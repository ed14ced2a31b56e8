/*
 * `--ep` under mpirun: MPI start and stop, the layer over MPI_COMM_WORLD,
 * and the group split, scatter and gather `moe forward --ep` and
 * `moe bench --ep` use. The only CLI file that includes mpi.h.
 * Dimension key: P ranks, G groups, rowlen floats per group.
 */
#include "ep.h"
#include "moe_mpi.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cli_ep_start(cli_ep *ep, const char *cmd, int *argc, char ***argv) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited && MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "moe %s: MPI_Init failed (start it with mpirun -np P moe %s --ep ...)\n", cmd, cmd);
        return 1;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &ep->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ep->size);
    return 0;
}

void cli_ep_stop(void) {
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (inited && !fin) MPI_Finalize();
}

moe_status cli_ep_create(moe_layer **l, const moe_config *cfg) { return moe_layer_create_mpi(l, cfg, MPI_COMM_WORLD); }

int cli_ep_bcast_i64(int64_t *v, int n) { return MPI_Bcast(v, n, MPI_INT64_T, 0, MPI_COMM_WORLD) != MPI_SUCCESS; }

void cli_ep_split(int64_t G, int rank, int size, int64_t *g0, int64_t *Gr) {
    int64_t q = G / size, rem = G % size;
    *Gr = q + (rank < rem);
    *g0 = rank * q + (rank < rem ? rank : rem);
}

/* counts and displacements in floats of every rank's share, for rank 0 */
static int shares(int **cnt, int **dsp, int64_t G, int64_t rowlen, int size) {
    *cnt = malloc(2 * (size_t)size * sizeof **cnt);
    if (!*cnt) return 1;
    *dsp = *cnt + size;
    for (int p = 0; p < size; p++) {
        int64_t g0, gr;
        cli_ep_split(G, p, size, &g0, &gr);
        if (gr * rowlen > 2147483647 || g0 * rowlen > 2147483647) return free(*cnt), 1;
        (*cnt)[p] = (int)(gr * rowlen), (*dsp)[p] = (int)(g0 * rowlen);
    }
    return 0;
}

int cli_ep_scatter(float *mine, const float *all, int64_t G, int64_t rowlen) {
    int size, rank, *cnt, *dsp;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (shares(&cnt, &dsp, G, rowlen, size)) return 1;
    float dummy;
    int rc = MPI_Scatterv(all, cnt, dsp, MPI_FLOAT, cnt[rank] ? mine : &dummy, cnt[rank], MPI_FLOAT, 0,
                          MPI_COMM_WORLD);
    free(cnt);
    return rc != MPI_SUCCESS;
}

int cli_ep_gather(float *all, const float *mine, int64_t G, int64_t rowlen) {
    int size, rank, *cnt, *dsp;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (shares(&cnt, &dsp, G, rowlen, size)) return 1;
    float dummy = 0;
    int rc = MPI_Gatherv(cnt[rank] ? mine : &dummy, cnt[rank], MPI_FLOAT, all, cnt, dsp, MPI_FLOAT, 0,
                         MPI_COMM_WORLD);
    free(cnt);
    return rc != MPI_SUCCESS;
}

int cli_ep_sum_f64(double *v, int n) {
    return MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS;
}
int cli_ep_sum_i64(int64_t *v, int n) {
    return MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS;
}
moe_status cli_ep_gather_layer(moe_layer *l, moe_layer *full) { return moe_layer_gather(l, full); }
moe_status cli_ep_allreduce_grads(moe_layer *l) { return moe_layer_allreduce_grads(l); }
int cli_ep_all_ok(int ok) {
    int all = ok;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all;
}

int cli_ep_sum_f32(float *v, int64_t n) {
    for (int64_t o = 0; o < n; o += 1 << 30) {
        int k = (int)(n - o < (1 << 30) ? n - o : (1 << 30));
        if (MPI_Allreduce(MPI_IN_PLACE, v + o, k, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS) return 1;
    }
    return 0;
}

int cli_ep_gather_bytes(void **out, int64_t *out_n, const void *send, int64_t n) {
    int size, rank;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    *out = NULL, *out_n = 0;
    int64_t *counts = malloc((size_t)size * sizeof *counts);
    if (!cli_ep_all_ok(counts != NULL)) return free(counts), 1;
    if (MPI_Gather(&n, 1, MPI_INT64_T, counts, 1, MPI_INT64_T, 0, MPI_COMM_WORLD) != MPI_SUCCESS) return free(counts), 1;
    char *all = NULL;
    int64_t total = 0;
    if (rank == 0) {
        for (int p = 0; p < size; p++) total += counts[p];
        all = malloc((size_t)(total ? total : 1));
    }
    int rc = !cli_ep_all_ok(rank != 0 || all != NULL);
    /* one rank at a time, in pieces that fit an int */
    int64_t off = 0;
    for (int p = 0; !rc && p < size; p++) {
        int64_t len = rank == 0 ? counts[p] : (p == rank ? n : 0);
        for (int64_t o = 0; !rc && o < len; o += 1 << 30) {
            int k = (int)(len - o < (1 << 30) ? len - o : (1 << 30));
            if (rank == 0 && p == 0) memcpy(all + o, (const char *)send + o, (size_t)k);
            else if (rank == 0) rc = MPI_Recv(all + off + o, k, MPI_BYTE, p, 9, MPI_COMM_WORLD, MPI_STATUS_IGNORE) != MPI_SUCCESS;
            else if (p == rank) rc = MPI_Send((const char *)send + o, k, MPI_BYTE, 0, 9, MPI_COMM_WORLD) != MPI_SUCCESS;
        }
        if (rank == 0) off += counts[p];
    }
    free(counts);
    if (rc || rank != 0) free(all), all = NULL, total = 0;
    *out = all, *out_n = total;
    return rc;
}
