/*
 * Expert parallelism over MPI: the transport behind the seam of ep.h, and
 * moe_layer_create_mpi. The only file of the library that includes mpi.h;
 * it is built into libmoe_mpi (make MPI=1, or whenever mpicc is found).
 *
 * Every collective runs on libmoe's own duplicate of the caller's
 * communicator, with errors returned (MPI_ERRORS_RETURN) so a failing call
 * becomes a status, never an abort. Rows move as an MPI contiguous type of
 * one row (W floats), so counts are rows, not bytes: a forward has fewer
 * than 2^31 rows per rank, but a rank may receive more than that from many
 * ranks, so when a count or displacement exceeds INT_MAX the exchange falls
 * back to pairwise MPI_Sendrecv in pieces of at most INT_MAX rows
 * (moe__mpi_piece lowers the piece size for tests).
 * Dimension key: P ranks, E experts, El = E/P.
 */
#include "layer_internal.h"
#include "moe_mpi.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tests: the largest count one MPI call may carry (INT_MAX by default). */
int64_t moe__mpi_piece = INT_MAX;

typedef struct {
    MPI_Comm comm;
} mpi_impl;

static MPI_Comm comm_of(moe_ep *ep) { return ((mpi_impl *)ep->impl)->comm; }

static moe_status mpi_fail(int rc, const char *what) {
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS) snprintf(s, sizeof s, "MPI error %d", rc);
    return moe_err(MOE_ERR_IO, "%s failed: %s", what, s);
}

/* The first failing rank's status and message, on every rank. */
static moe_status mpi_agree(moe_ep *ep, moe_status st) {
    MPI_Comm c = comm_of(ep);
    int mine = st == MOE_OK ? ep->size : ep->rank, first = ep->size;
    int rc = MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, c);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Allreduce (status)");
    if (first == ep->size) return MOE_OK;
    struct {
        int status;
        char msg[1000];
    } m;
    memset(&m, 0, sizeof m);
    if (ep->rank == first) m.status = (int)st, snprintf(m.msg, sizeof m.msg, "%s", moe_last_error());
    rc = MPI_Bcast(&m, (int)sizeof m, MPI_BYTE, first, c);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Bcast (status)");
    if (ep->rank == first) return st;
    return moe_err((moe_status)m.status, "rank %d: %s", first, m.msg);
}

/* One row of esize bytes as an MPI type. */
static int row_type(MPI_Datatype *t, size_t esize) {
    int rc = MPI_Type_contiguous((int)esize, MPI_BYTE, t);
    return rc == MPI_SUCCESS ? MPI_Type_commit(t) : rc;
}

/* Pairwise exchange in pieces: for the counts MPI_Alltoallv cannot carry. */
static moe_status alltoallv_pieces(moe_ep *ep, char *recv, const int64_t *rc, const char *send, const int64_t *sc,
                                   size_t esize, MPI_Datatype t) {
    MPI_Comm c = comm_of(ep);
    int P = ep->size, r = ep->rank;
    int64_t *rd = malloc(2 * (size_t)P * sizeof *rd), *sd = rd ? rd + P : NULL;
    if (!rd) return moe_err(MOE_ERR_NOMEM, "cannot allocate the exchange displacements");
    rd[0] = sd[0] = 0;
    for (int p = 1; p < P; p++) rd[p] = rd[p - 1] + rc[p - 1], sd[p] = sd[p - 1] + sc[p - 1];
    moe_status st = MOE_OK;
    /* step k: send to r+k, receive from r-k, each in its own number of pieces
     * (the sender's count of pieces to a rank is that rank's count from it) */
    for (int k = 0; k < P && st == MOE_OK; k++) {
        int to = (r + k) % P, from = (r - k + P) % P;
        int64_t ns = (sc[to] + moe__mpi_piece - 1) / moe__mpi_piece, nr = (rc[from] + moe__mpi_piece - 1) / moe__mpi_piece;
        MPI_Request *req = malloc((size_t)(ns + nr + 1) * sizeof *req);
        if (!req) {
            st = moe_err(MOE_ERR_NOMEM, "cannot allocate the exchange requests");
            break;
        }
        int n = 0, err = MPI_SUCCESS;
        for (int64_t i = 0; i < nr && err == MPI_SUCCESS; i++) {
            int64_t o = i * moe__mpi_piece, len = rc[from] - o < moe__mpi_piece ? rc[from] - o : moe__mpi_piece;
            err = MPI_Irecv(recv + (size_t)(rd[from] + o) * esize, (int)len, t, from, 7, c, &req[n++]);
        }
        for (int64_t i = 0; i < ns && err == MPI_SUCCESS; i++) {
            int64_t o = i * moe__mpi_piece, len = sc[to] - o < moe__mpi_piece ? sc[to] - o : moe__mpi_piece;
            err = MPI_Isend(send + (size_t)(sd[to] + o) * esize, (int)len, t, to, 7, c, &req[n++]);
        }
        if (err == MPI_SUCCESS) err = MPI_Waitall(n, req, MPI_STATUSES_IGNORE);
        if (err != MPI_SUCCESS) st = mpi_fail(err, "MPI_Isend/MPI_Irecv (rows)");
        free(req);
    }
    free(rd);
    return st;
}

static moe_status mpi_alltoallv(moe_ep *ep, void *recv, const int64_t *rc, const void *send, const int64_t *sc,
                                size_t esize) {
    int P = ep->size;
    int *ci = malloc(4 * (size_t)P * sizeof *ci);
    if (!ci) return moe_err(MOE_ERR_NOMEM, "cannot allocate the exchange counts");
    int *sci = ci, *sdi = ci + P, *rci = ci + 2 * P, *rdi = ci + 3 * P;
    int64_t so = 0, ro = 0;
    int fits = 1;
    for (int p = 0; p < P; p++) {
        fits &= sc[p] <= moe__mpi_piece && rc[p] <= moe__mpi_piece && so <= moe__mpi_piece && ro <= moe__mpi_piece;
        sci[p] = (int)sc[p], sdi[p] = (int)so, rci[p] = (int)rc[p], rdi[p] = (int)ro;
        so += sc[p], ro += rc[p];
    }
    fits &= so <= moe__mpi_piece && ro <= moe__mpi_piece;
    MPI_Datatype t;
    int err = row_type(&t, esize);
    moe_status st = err == MPI_SUCCESS ? MOE_OK : mpi_fail(err, "MPI_Type_contiguous");
    if (st == MOE_OK) {
        /* every rank decides alike which path to take (the counts are global facts) */
        int all = fits, rc2 = MPI_Allreduce(&fits, &all, 1, MPI_INT, MPI_MIN, comm_of(ep));
        if (rc2 != MPI_SUCCESS) st = mpi_fail(rc2, "MPI_Allreduce (exchange path)");
        else if (all) {
            /* MPI wants non-NULL buffers even for zero counts on some builds */
            static char dummy[64];
            err = MPI_Alltoallv(send ? send : dummy, sci, sdi, t, recv ? recv : dummy, rci, rdi, t, comm_of(ep));
            if (err != MPI_SUCCESS) st = mpi_fail(err, "MPI_Alltoallv (rows)");
        } else {
            st = alltoallv_pieces(ep, recv, rc, send, sc, esize, t);
        }
        MPI_Type_free(&t);
    }
    free(ci);
    return st;
}

static moe_status allreduce(moe_ep *ep, void *v, int64_t n, MPI_Datatype t, size_t esize) {
    for (int64_t o = 0; o < n; o += moe__mpi_piece) {
        int64_t k = n - o < moe__mpi_piece ? n - o : moe__mpi_piece;
        int err = MPI_Allreduce(MPI_IN_PLACE, (char *)v + (size_t)o * esize, (int)k, t, MPI_SUM, comm_of(ep));
        if (err != MPI_SUCCESS) return mpi_fail(err, "MPI_Allreduce (sum)");
    }
    return MOE_OK;
}
static moe_status mpi_allreduce_f32(moe_ep *ep, float *v, int64_t n) { return allreduce(ep, v, n, MPI_FLOAT, 4); }
static moe_status mpi_allreduce_f64(moe_ep *ep, double *v, int64_t n) { return allreduce(ep, v, n, MPI_DOUBLE, 8); }
static moe_status mpi_allreduce_i64(moe_ep *ep, int64_t *v, int64_t n) {
    return allreduce(ep, v, n, MPI_INT64_T, 8);
}

static moe_status mpi_exscan_i64(moe_ep *ep, int64_t *v, int n) {
    int64_t in[8];
    if (n > 8) return moe_err(MOE_ERR_ARG, "internal: exscan of %d values", n);
    memcpy(in, v, (size_t)n * sizeof *v);
    int err = MPI_Exscan(in, v, n, MPI_INT64_T, MPI_SUM, comm_of(ep));
    if (err != MPI_SUCCESS) return mpi_fail(err, "MPI_Exscan (token offsets)");
    if (ep->rank == 0) memset(v, 0, (size_t)n * sizeof *v); /* MPI leaves rank 0's undefined */
    return MOE_OK;
}

/* MPI_Allgatherv when every count and displacement fits an int (every rank
 * holds the same counts, so all take the same path without asking); else an
 * all-to-all that sends the same rows to everyone, in pieces. */
static moe_status mpi_allgatherv(moe_ep *ep, void *recv, const int64_t *counts, const void *send, int64_t n,
                                 size_t esize) {
    int P = ep->size;
    int64_t total = 0;
    int fits = 1;
    for (int p = 0; p < P; p++) {
        fits &= counts[p] <= moe__mpi_piece && total <= moe__mpi_piece;
        total += counts[p];
    }
    fits &= total <= moe__mpi_piece;
    int64_t *sc = malloc(2 * (size_t)P * sizeof *sc);
    int *ci = malloc(2 * (size_t)P * sizeof *ci);
    moe_status st = sc && ci ? MOE_OK : moe_err(MOE_ERR_NOMEM, "cannot allocate the gather counts");
    if (st == MOE_OK && fits) {
        int *cnt = ci, *dsp = ci + P;
        for (int p = 0, o = 0; p < P; p++) cnt[p] = (int)counts[p], dsp[p] = o, o += cnt[p];
        MPI_Datatype t;
        int err = row_type(&t, esize);
        if (err == MPI_SUCCESS) {
            static char dummy[64]; /* non-NULL buffers for zero counts */
            err = MPI_Allgatherv(send && n ? send : dummy, (int)n, t, recv ? recv : dummy, cnt, dsp, t,
                                 comm_of(ep));
            MPI_Type_free(&t);
        }
        if (err != MPI_SUCCESS) st = mpi_fail(err, "MPI_Allgatherv (rows)");
    } else if (st == MOE_OK) {
        int64_t *rc = sc + P;
        char *rep = malloc((size_t)(n ? n : 1) * esize * (size_t)P);
        st = rep ? MOE_OK : moe_err(MOE_ERR_NOMEM, "cannot allocate the gather buffer");
        if (st == MOE_OK) {
            for (int p = 0; p < P; p++) {
                sc[p] = n, rc[p] = counts[p];
                if (n) memcpy(rep + (size_t)p * (size_t)n * esize, send, (size_t)n * esize);
            }
            st = mpi_alltoallv(ep, recv, rc, rep, sc, esize);
        }
        free(rep);
    }
    free(sc);
    free(ci);
    return st;
}

static moe_status mpi_gather(moe_ep *ep, void **out, int64_t *out_n, int64_t *counts, const void *send, int64_t n) {
    int P = ep->size;
    *out = NULL, *out_n = 0;
    int err = MPI_Gather(&n, 1, MPI_INT64_T, counts, 1, MPI_INT64_T, 0, comm_of(ep));
    if (err != MPI_SUCCESS) return mpi_fail(err, "MPI_Gather (sizes)");
    /* the bytes, one rank after the other, in pieces */
    moe_status st = MOE_OK;
    char *all = NULL;
    if (ep->rank == 0) {
        int64_t total = 0;
        for (int p = 0; p < P; p++) total += counts[p];
        all = malloc((size_t)(total ? total : 1));
        if (!all) st = moe_err(MOE_ERR_NOMEM, "cannot allocate %lld bytes for the gathered tensors", (long long)total);
        *out_n = total;
    }
    st = mpi_agree(ep, st);
    if (st != MOE_OK) {
        free(all);
        *out_n = 0;
        return st;
    }
    int64_t off = 0;
    for (int p = 0; p < P && st == MOE_OK; p++) {
        int64_t len = ep->rank == 0 ? counts[p] : (p == ep->rank ? n : 0);
        for (int64_t o = 0; o < len && st == MOE_OK; o += moe__mpi_piece) {
            int k = (int)(len - o < moe__mpi_piece ? len - o : moe__mpi_piece);
            if (ep->rank == 0 && p == 0) memcpy(all + off + o, (const char *)send + o, (size_t)k);
            else if (ep->rank == 0) err = MPI_Recv(all + off + o, k, MPI_BYTE, p, 8, comm_of(ep), MPI_STATUS_IGNORE);
            else err = MPI_Send((const char *)send + o, k, MPI_BYTE, 0, 8, comm_of(ep));
            if (err != MPI_SUCCESS) st = mpi_fail(err, "gathering the expert tensors");
        }
        if (ep->rank == 0) off += counts[p];
    }
    if (st != MOE_OK || ep->rank != 0) {
        free(all);
        all = NULL;
        *out_n = 0;
    }
    *out = all;
    return st;
}

static void mpi_free_ep(moe_ep *ep) {
    if (!ep) return;
    mpi_impl *m = ep->impl;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (m && !finalized) MPI_Comm_free(&m->comm);
    free(m);
    free(ep);
}

moe_status moe_layer_create_mpi(moe_layer **out, const moe_config *cfg, MPI_Comm comm) {
    moe_err_clear();
    if (!out || !cfg) return moe_err(MOE_ERR_ARG, "moe_layer_create_mpi: NULL argument");
    *out = NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) return moe_err(MOE_ERR_STATE, "moe_layer_create_mpi: call MPI_Init first");
    moe_ep *ep = calloc(1, sizeof *ep);
    mpi_impl *m = calloc(1, sizeof *m);
    if (!ep || !m) {
        free(ep), free(m);
        return moe_err(MOE_ERR_NOMEM, "cannot allocate the expert-parallel state");
    }
    int err = MPI_Comm_dup(comm, &m->comm);
    if (err != MPI_SUCCESS) {
        free(ep), free(m);
        return mpi_fail(err, "MPI_Comm_dup");
    }
    MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m->comm, &ep->rank);
    MPI_Comm_size(m->comm, &ep->size);
    ep->impl = m;
    ep->agree = mpi_agree;
    ep->alltoallv = mpi_alltoallv;
    ep->allreduce_f32 = mpi_allreduce_f32;
    ep->allreduce_f64 = mpi_allreduce_f64;
    ep->allreduce_i64 = mpi_allreduce_i64;
    ep->exscan_i64 = mpi_exscan_i64;
    ep->allgatherv = mpi_allgatherv;
    ep->gather = mpi_gather;
    ep->free = mpi_free_ep;
    int E = cfg->num_experts, P = ep->size;
    moe_status st = MOE_OK;
    if (E >= 1 && E % P != 0 && cfg->type == MOE_LAYER_HIERARCHICAL)
        st = moe_err(MOE_ERR_ARG, "hierarchical: num_experts = Eo = %d, the outer experts, is not divisible by the %d "
                     "ranks: each rank owns Eo / ranks outer experts with their inner gates and inner experts; run on "
                     "a number of ranks that divides %d", E, P, E);
    else if (E < 1 || E % P != 0)
        st = moe_err(MOE_ERR_ARG, "num_experts = %d is not divisible by the %d ranks: each rank owns num_experts / "
                     "ranks experts; run on a number of ranks that divides %d", E, P, E);
    ep->E = E, ep->e_count = E / P, ep->e_first = ep->rank * (E / P);
    if (st != MOE_OK) {
        mpi_free_ep(ep);
        return st; /* every rank sees the same config: all fail alike, nobody waits */
    }
    /* creation itself can fail on one rank (memory): agree before returning,
     * on a duplicate of its own (ep, and its communicator, go with a failed layer) */
    moe_layer *l = NULL;
    st = moe__layer_create_ep(&l, cfg, ep); /* owns ep from here, also on failure */
    MPI_Comm c2;
    int bad = st != MOE_OK, any = bad;
    if ((err = MPI_Comm_dup(comm, &c2)) == MPI_SUCCESS) {
        MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, c2);
        MPI_Comm_free(&c2);
    }
    if (bad) return st;
    if (any || err != MPI_SUCCESS) {
        moe_layer_free(l);
        return moe_err(MOE_ERR_NOMEM, "another rank could not create its part of the layer");
    }
    *out = l;
    return MOE_OK;
}
