/* `--ep` in a build without MPI: every entry point explains how to get one. */
#include "ep.h"

#include <stdio.h>

int cli_ep_start(cli_ep *ep, const char *cmd, int *argc, char ***argv) {
    (void)argc, (void)argv;
    ep->rank = 0, ep->size = 1;
    fprintf(stderr, "moe %s: --ep needs a build with MPI: run tools/deps.sh build (installs libopenmpi-dev and "
                    "openmpi-bin), then make clean && make MPI=1\n", cmd);
    return 1;
}
void cli_ep_stop(void) {}
moe_status cli_ep_create(moe_layer **l, const moe_config *cfg) { return moe_layer_create(l, cfg); }
int cli_ep_bcast_i64(int64_t *v, int n) { return (void)v, (void)n, 0; }
void cli_ep_split(int64_t G, int rank, int size, int64_t *g0, int64_t *Gr) {
    (void)rank, (void)size;
    *g0 = 0, *Gr = G;
}
int cli_ep_scatter(float *mine, const float *all, int64_t G, int64_t rowlen) { return (void)mine, (void)all, (void)G, (void)rowlen, 1; }
int cli_ep_gather(float *all, const float *mine, int64_t G, int64_t rowlen) { return (void)all, (void)mine, (void)G, (void)rowlen, 1; }
int cli_ep_sum_f64(double *v, int n) { return (void)v, (void)n, 0; }
int cli_ep_sum_i64(int64_t *v, int n) { return (void)v, (void)n, 0; }
moe_status cli_ep_gather_layer(moe_layer *l, moe_layer *full) { return (void)l, (void)full, MOE_ERR_UNSUPPORTED; }
moe_status cli_ep_allreduce_grads(moe_layer *l) { return (void)l, MOE_OK; }
int cli_ep_all_ok(int ok) { return ok; }
int cli_ep_sum_f32(float *v, int64_t n) { return (void)v, (void)n, 0; }
int cli_ep_gather_bytes(void **out, int64_t *out_n, const void *send, int64_t n) {
    return (void)out, (void)out_n, (void)send, (void)n, 1;
}
