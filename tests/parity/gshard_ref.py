"""PyTorch references for libmoe's `gshard` and `hierarchical` layers.

Written from the seeds 000/001 (MoE with Top2Gating, and the two-level MoE)
and DESIGN.md section 4, in the seeds' dense formulation: dispatch and combine
tensors of shape (..., B, N, E, C), experts run on every capacity slot. That
is the opposite of libmoe's index-based dispatch, which makes it a useful
independent check. state_dict names and shapes are the seed modules':

  gshard:       gate.w_gating (D,E), experts.w1 (E,D,H), experts.w2 (E,H,D)
  hierarchical: gate_outer.w_gating (D,Eo), gate_inner.w_gating (Eo,D,Ei),
                experts.w1 (Eo,Ei,D,H), experts.w2 (Eo,Ei,H,D)

Two readings of the seeds, as libmoe implements them:
  - policy "threshold": the seed multiplies the (..,N,E) mask by a (..,N) test,
    which does not broadcast; its intent, a per-token keep if g2 > threshold,
    is implemented here.
  - "random" draws from torch's RNG here and from libmoe's counter-based RNG
    there, so it is not parity-tested (test_gshard.c checks its statistics).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-9
POLICIES = ("all", "none", "threshold", "random")


def activation(name):
    acts = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "leaky_relu": nn.LeakyReLU()}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}")
    return acts[name]


def capacity(n, cf, e):
    """Expert capacity of a group of n rows: max(min(n, floor(n*cf/e)), 4)."""
    return max(min(n, math.floor(n * cf / e)), 4)


class Probe:
    """Collects how close the discrete decisions of one forward came to flipping
    (the smallest margin seen), so a parity case can redraw knife-edge inputs."""

    def __init__(self):
        self.margin = math.inf

    def see(self, m):
        if m.numel():
            self.margin = min(self.margin, float(m.min()))


class Top2Gate(nn.Module):
    def __init__(self, dim, num_gates, outer=(), policy_train="random", policy_eval="random",
                 threshold_train=0.2, threshold_eval=0.2, cf_train=1.25, cf_eval=2.0):
        super().__init__()
        for p in (policy_train, policy_eval):
            if p not in POLICIES:
                raise ValueError(f"unknown policy {p!r}")
        self.num_gates = num_gates
        self.w_gating = nn.Parameter(torch.randn(*outer, dim, num_gates))
        self.policy = (policy_train, policy_eval)
        self.threshold = (threshold_train, threshold_eval)
        self.cf = (cf_train, cf_eval)

    def forward(self, x, importance=None, probe=None, stats=None):
        """x (..., B, N, D) -> dispatch, combine (..., B, N, E, C), balance loss."""
        mode = 0 if self.training else 1
        policy, thr, cf = self.policy[mode], self.threshold[mode], self.cf[mode]
        E, N = self.num_gates, x.shape[-2]
        raw = torch.einsum("...bnd,...de->...bne", x, self.w_gating).softmax(dim=-1)
        # rows that take part (importance > 0; the inner gate also sees empty slots)
        live = torch.ones_like(raw[..., 0], dtype=torch.bool) if importance is None else importance > 0
        if probe is not None and E > 1:  # first vs second, second vs third
            s = raw.detach().sort(dim=-1, descending=True).values
            probe.see(((s[..., 0] - s[..., 1]) / s[..., 0])[live])
            if E > 2:
                probe.see(((s[..., 1] - s[..., 2]) / s[..., 1])[live])
        g1, i1 = raw.max(dim=-1)
        m1 = F.one_hot(i1, E).to(raw.dtype)
        proxy = raw
        if importance is not None:
            eq1 = (importance == 1.0).to(raw.dtype)
            m1, g1, proxy = m1 * eq1[..., None], g1 * eq1, raw * eq1[..., None]
        g2, i2 = (raw * (1.0 - m1)).max(dim=-1)
        m2 = F.one_hot(i2, E).to(raw.dtype)
        if importance is not None:
            m2 = m2 * (importance > 0).to(raw.dtype)[..., None]
        # E == 1: the second choice would be the first again, with gate 0; libmoe reads it as
        # no second choice (the seed reserves a capacity slot for it that nothing fills)
        m2 = m2 * (1.0 - (m1 * m2).sum(dim=-1))[..., None]
        denom = g1 + g2 + EPS
        g1, g2 = g1 / denom, g2 / denom
        loss = (proxy.mean(dim=-2) * m1.mean(dim=-2)).mean() * float(E ** 2)
        if policy == "none":
            m2 = m2 * 0.0
        elif policy == "threshold":
            if probe is not None:
                probe.see((g2.detach() - thr).abs()[live])
            m2 = m2 * (g2 > thr).to(raw.dtype)[..., None]
        elif policy == "random":
            u = torch.rand_like(g2)
            m2 = m2 * (u < g2 / max(thr, EPS)).to(raw.dtype)[..., None]
        C = capacity(N, cf, E)
        # positions in token order: exclusive running count per expert
        pos1 = (torch.cumsum(m1, dim=-2) - m1) * m1
        offered = m1.sum() + m2.sum()
        m1 = m1 * (pos1 < C).to(raw.dtype)
        count1 = m1.sum(dim=-2, keepdim=True)
        pos2 = (torch.cumsum(m2, dim=-2) - m2 + count1) * m2
        m2 = m2 * (pos2 < C).to(raw.dtype)
        keep1, keep2 = m1.sum(dim=-1), m2.sum(dim=-1)
        slot1 = F.one_hot(pos1.sum(dim=-1).long().clamp(max=C - 1), C).to(raw.dtype)
        slot2 = F.one_hot(pos2.sum(dim=-1).long().clamp(max=C - 1), C).to(raw.dtype)
        combine = ((g1 * keep1)[..., None, None] * m1[..., None] * slot1[..., None, :]
                   + (g2 * keep2)[..., None, None] * m2[..., None] * slot2[..., None, :])
        dispatch = (combine != 0).to(raw.dtype)
        if stats is not None:
            stats["dropped"] = stats.get("dropped", 0) + int(offered - m1.sum() - m2.sum())
        return dispatch, combine, loss


class Experts(nn.Module):
    def __init__(self, dim, num_experts, hidden_dim, act):
        super().__init__()
        shape = tuple(num_experts) if isinstance(num_experts, (tuple, list)) else (num_experts,)
        self.w1 = nn.Parameter(torch.empty(*shape, dim, hidden_dim).uniform_(-hidden_dim ** -0.5, hidden_dim ** -0.5))
        self.w2 = nn.Parameter(torch.empty(*shape, hidden_dim, dim).uniform_(-dim ** -0.5, dim ** -0.5))
        self.act = activation(act)

    def forward(self, x):  # (..., rows, D)
        return self.act(x @ self.w1) @ self.w2


def _gate_kwargs(kw):
    return dict(policy_train=kw["second_policy_train"], policy_eval=kw["second_policy_eval"],
                threshold_train=kw["second_threshold_train"], threshold_eval=kw["second_threshold_eval"],
                cf_train=kw["capacity_factor_train"], cf_eval=kw["capacity_factor_eval"])


class GShardMoE(nn.Module):
    def __init__(self, dim, num_experts=16, hidden_dim=None, **kw):
        super().__init__()
        self.num_experts, self.loss_coef = num_experts, kw["loss_coef"]
        self.gate = Top2Gate(dim, num_experts, **_gate_kwargs(kw))
        self.experts = Experts(dim, num_experts, hidden_dim or 4 * dim, kw["activation"])

    def forward(self, x, probe=None, stats=None):  # x (B, N, D)
        dispatch, combine, loss = self.gate(x, probe=probe, stats=stats)
        xe = torch.einsum("bnd,bnec->ebcd", x, dispatch)
        ye = self.experts(xe.reshape(self.num_experts, -1, x.shape[-1])).reshape(xe.shape)
        if stats is not None:
            stats["expert_counts"] = dispatch.sum(dim=(0, 1, 3)).long()
        return torch.einsum("ebcd,bnec->bnd", ye, combine), loss * self.loss_coef


class HierarchicalMoE(nn.Module):
    def __init__(self, dim, num_experts=(4, 4), hidden_dim=None, **kw):
        super().__init__()
        self.eo, self.ei = num_experts
        self.loss_coef = kw["loss_coef"]
        self.gate_outer = Top2Gate(dim, self.eo, **_gate_kwargs(kw))
        self.gate_inner = Top2Gate(dim, self.ei, outer=(self.eo,), **_gate_kwargs(kw))
        self.experts = Experts(dim, (self.eo, self.ei), hidden_dim or 4 * dim, kw["activation"])

    def forward(self, x, probe=None, stats=None):  # x (B, N, D)
        d_out, c_out, loss_out = self.gate_outer(x, probe=probe, stats=stats)
        xo = torch.einsum("bnd,bnec->ebcd", x, d_out)  # (Eo, B, C, D)
        gate_of_slot = c_out.permute(2, 0, 3, 1).sum(dim=-1)  # (Eo, B, C)
        if probe is not None:
            filled = gate_of_slot.detach()[gate_of_slot.detach() > 0]
            probe.see((filled - 0.5).abs())
        importance = 0.5 * ((gate_of_slot > 0.5).to(x.dtype) + (gate_of_slot > 0).to(x.dtype))
        d_in, c_in, loss_in = self.gate_inner(xo, importance=importance, probe=probe, stats=stats)
        xi = torch.einsum("ebnd,ebnfc->efbcd", xo, d_in)  # (Eo, Ei, B, C2, D)
        yi = self.experts(xi.reshape(self.eo, self.ei, -1, x.shape[-1])).reshape(xi.shape)
        yo = torch.einsum("efbcd,ebnfc->ebnd", yi, c_in)
        if stats is not None:
            stats["expert_counts"] = d_in.sum(dim=(1, 2, 4)).reshape(-1).long()
        return torch.einsum("ebcd,bnec->bnd", yo, c_out), (loss_out + loss_in) * self.loss_coef


DEFAULTS = dict(hidden_dim=None, activation="relu", second_policy_train="random", second_policy_eval="random",
                second_threshold_train=0.2, second_threshold_eval=0.2, capacity_factor_train=1.25,
                capacity_factor_eval=2.0, loss_coef=1e-2)


def build(config):
    """Module from a libmoe layer config dict (the seed constructors' names)."""
    kind = config.get("type")
    if kind not in ("gshard", "hierarchical"):
        raise ValueError(f"type must be gshard or hierarchical, got {kind!r}")
    unknown = set(config) - set(DEFAULTS) - {"type", "seed", "dim", "num_experts"}
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    kw = dict(DEFAULTS)
    kw.update({k: v for k, v in config.items() if k in DEFAULTS})
    hidden = kw.pop("hidden_dim")
    if kind == "gshard":
        return GShardMoE(config["dim"], config.get("num_experts", 16), hidden, **kw)
    return HierarchicalMoE(config["dim"], tuple(config.get("num_experts", (4, 4))), hidden, **kw)
