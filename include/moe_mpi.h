/*
 * libmoe expert parallelism over MPI: the layers' experts spread over the
 * ranks of a communicator, each token's row sent to the rank that holds its
 * expert with an all-to-all, as GShard, Switch, DeepSpeed-MoE, Tutel and
 * Megatron-Core do. Only programs that use MPI include this header (and link
 * libmoe_mpi); moe.h never includes mpi.h.
 *
 * Dimension key: P ranks, E experts (hierarchical: Eo outer experts), El =
 * E/P experts per rank, T_r tokens of rank r, D model dim.
 *
 * Layout. Rank r owns the routed experts [r*El, (r+1)*El). Their parameters
 * exist on rank r only, under their global names ("experts.5.net.0.weight",
 * dense "experts.5.weight"; gshard: "experts.w1" is rank r's slice (El, D, H)
 * of the (E, D, H) tensor). hierarchical is sharded by outer expert (E = Eo,
 * the outer experts): rank r owns outer experts [r*El, (r+1)*El) with their
 * inner gates and inner experts, its slices of dim 0 of gate_inner.w_gating,
 * experts.w1 and experts.w2. Everything else (the (outer) gate, shared
 * experts, the shared gate, the selection bias) is replicated: every rank
 * holds a copy. A layer created here starts from the values one process
 * would draw with the same seed.
 *
 * Data parallel. Each rank brings its own tokens; a rank may bring none
 * (T_r = 0: it still serves its experts). The tokens of one rank form its
 * groups, as in GShard and DeepSpeed-MoE: moe_layer_forward's T_r rows are
 * one group, moe_layer_forward_seq's B_r x N are B_r groups; capacity, the
 * balance loss, the z-loss and expert choice are per group. So P ranks
 * equal one process whose batch holds the same groups (for one group per
 * rank: one process's moe_layer_forward_seq with B = P); aux_loss and the
 * stats are this rank's. dense sends every token to every rank (all of its
 * experts see all tokens) and adds the ranks' partial outputs in rank
 * order: y differs from one process's by float rounding only. hierarchical:
 * the inner level of an outer expert runs on its owner, over the rows of
 * every rank's groups; aux_loss is still this rank's groups' loss, outer
 * and inner (the owners send each group's inner loss terms back), i.e. what
 * one process returns for these groups alone; the inner level's stats
 * (expert_counts, its drops and second choices, assignments) are counted on
 * the owner, so summed over the ranks every stat is one process's. Every
 * rank's groups must have the same N (the inner capacity depends on it).
 *
 * Every call on such a layer is collective: forward, backward, set_routing,
 * update_bias, load, save, moe_layer_allreduce_grads must be entered by every
 * rank, in the same order. Errors never leave a rank waiting: the ranks
 * agree on the status before and after each exchange, so bad input on one
 * rank (a NaN in its x, a wrong shape) fails the call on every rank, with
 * the message "rank R: ..." naming the rank and the problem.
 *
 * Gradients and the loss. A step over the global batch of one process is
 *   loss = sum over ranks of loss_r,  loss_r = sum(y_r * dy_r) + daux_r * aux_r,
 * so each rank passes the dy of the GLOBAL loss for its own rows (e.g. a
 * mean over all T = sum T_r tokens divides by T, not by T_r), and for the
 * auxiliary loss daux_r = daux * G_r / G, G_r its groups and G all groups
 * (equal groups per rank: daux / P), because one process averages the
 * balance loss over all G groups. Then expert gradients are complete on
 * their owner, and each replicated parameter's gradient is the sum of the
 * ranks' contributions: moe_layer_allreduce_grads adds them up, after which
 * every rank holds the one-process gradient and every optimizer takes the
 * same step.
 */
#ifndef MOE_MPI_H
#define MOE_MPI_H

#include <mpi.h>

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Create a layer whose routed experts are spread over the ranks of comm
 * (collective over comm; every rank passes the same config). libmoe keeps
 * its own duplicate of comm (MPI_Comm_dup, errors returned, never aborting)
 * and never touches MPI_COMM_WORLD; MPI must be initialised (MPI_Init)
 * before and finalised after the layer is freed. Errors: num_experts (for
 * hierarchical: Eo, the outer experts) not divisible by the number of ranks
 * (MOE_ERR_ARG, naming both), a layer type that stays in one process
 * (soft_dynamic, soft: MOE_ERR_UNSUPPORTED), MPI not initialised
 * (MOE_ERR_STATE). Layer types: topk with every router option, dense,
 * gshard, hierarchical. */
MOE_API moe_status moe_layer_create_mpi(moe_layer **out, const moe_config *cfg, MPI_Comm comm);

/* moe_layer_allreduce_grads (declared in moe.h, it needs no MPI type) sums
 * the replicated gradients over the ranks. */

/* moe_layer_gather (moe.h) gives rank 0 the whole layer with its gradients. */

#ifdef __cplusplus
}
#endif
#endif /* MOE_MPI_H */
