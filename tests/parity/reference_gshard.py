"""PyTorch references for libmoe's `gshard` and `hierarchical` layers (DESIGN.md section 4).

Written from the semantics of seeds 000/001 (MoE + Top2Gating, and the two-level
HeirarchicalMoE); the code is ours. state_dict names and shapes follow the seeds,
so a state_dict saved as safetensors is what libmoe loads:

  gshard      : gate.w_gating (D,E), experts.w1 (E,D,H), experts.w2 (E,H,D)
  hierarchical: gate_outer.w_gating (D,Eo), gate_inner.w_gating (Eo,D,Ei),
                experts.w1 (Eo,Ei,D,H), experts.w2 (Eo,Ei,H,D)

Top-2 gating of one group of N rows (a sequence; for the hierarchical inner level,
the Co capacity slots of one outer expert for one sequence), per row:
  raw = softmax(x @ w) over E;  i1 = argmax raw
  with an importance (inner level only): sure = imp == 1, alive = imp > 0;
  m1 = onehot(i1) * sure;  i2 = argmax of raw * (1 - m1), g2 = that maximum
  (so a row with imp 0.5 has no first choice and its "second" is its argmax);
  g1 = raw[i1] * sure;  g1, g2 /= (g1 + g2 + 1e-9);  m2 = onehot(i2) * alive
  loss = E^2 * mean over (groups, E) of mean_rows(raw * sure) * mean_rows(m1)
         (m1 before capacity trimming)
  policy on m2: all | none | threshold: keep if g2 > t (per row; the seed's line
  does not broadcast, we implement its intent) | random: keep if u < g2 / max(t, eps),
  u drawn as libmoe draws it (below), so the random policy is reproduced exactly
  capacity C = max(min(N, floor(N * cf / E)), 4), cf by module.training;
  positions: first choices in row order, then second choices after the kept first
  choices of that expert; a position >= C is dropped (contributes nothing).
Gradients flow through g1, g2 and the loss's proxy (autograd of this formulation).

libmoe's random draws (README: gshard): a counter-based splitmix64 keyed by the config's
"seed" (default 0) and the number of forwards so far (0 in `moe forward`): the outer gate
draws u = uniform(stream, b*N + n), stream = u64(seed, 0x3000000 + 2*calls); the inner
gate of the hierarchical layer uniform(stream + 1, (eo*B + b)*Co + c). In both, the counter
is the row-major index of the row in this formulation's (*outer, B, N) layout.

Everything here is autograd-friendly and dtype-generic; the parity harness runs
it in float64 on libmoe's float32 weights and inputs.
"""
import copy
import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from reference import make_activation

EPS = 1e-9
MASK64 = (1 << 64) - 1
STREAM_GSHARD = 0x3000000  # libmoe's counter offset of the gshard/hierarchical streams
MIN_CAPACITY = 4
POLICIES = ("all", "none", "threshold", "random")
TYPES = ("gshard", "hierarchical")


def capacity(group_size, factor, num_experts):
    """Rows each expert takes from one group: max(min(N, floor(N*cf/E)), 4)."""
    return max(min(group_size, int(math.floor(group_size * factor / num_experts))), MIN_CAPACITY)


def _exclusive_cumsum(m, dim):
    return torch.cumsum(m, dim=dim) - m


def rng_u64(seed, counter):
    """libmoe's stateless generator: splitmix64's finaliser over a mix of seed and counter
    (64-bit wrap-around arithmetic, written with python ints)."""
    z = (seed * 0xD1342543DE82EF95 + counter * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def rng_uniform(seed, counter):
    """Element `counter` of stream `seed` in [0, 1): the top 24 bits, exact in float32 and float64."""
    return (rng_u64(seed, counter) >> 40) * 2.0 ** -24


class Top2Gating(nn.Module):
    """w_gating (*outer, D, E). route(x (*outer, B, N, D), importance (*outer, B, N))."""

    def __init__(self, dim, num_gates, outer_dims=(), second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2, second_threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2.0, eps=EPS):
        super().__init__()
        for p in (second_policy_train, second_policy_eval):
            if p not in POLICIES:
                raise ValueError(f"unknown second policy {p!r} (known: {', '.join(POLICIES)})")
        self.num_gates, self.eps = num_gates, eps
        self.w_gating = nn.Parameter(torch.randn(*outer_dims, dim, num_gates))
        self.modes = {True: (second_policy_train, second_threshold_train, capacity_factor_train),
                      False: (second_policy_eval, second_threshold_eval, capacity_factor_eval)}
        self.rng_seed, self.rng_calls = 0, 0  # libmoe's config seed and forwards so far
        self.rng_level = 0     # 0: the outer (or only) gate, 1: the inner gate (stream + 1)
        self.last = None       # the latest Routing, for stats and knife-edge checks

    def stream(self):
        """The random policy's stream at this level, as libmoe keys it."""
        return (rng_u64(self.rng_seed, STREAM_GSHARD + 2 * self.rng_calls) + self.rng_level) & MASK64

    def uniforms(self, shape, dtype):
        """u for every row of `shape` (*outer, B, N): counter = the row-major row index."""
        st, n = self.stream(), math.prod(shape)
        return torch.tensor([rng_uniform(st, i) for i in range(n)], dtype=dtype).reshape(shape)

    def route(self, x, importance=None):
        E, N = self.num_gates, x.shape[-2]
        policy, threshold, factor = self.modes[self.training]
        raw = torch.matmul(x, self.w_gating.unsqueeze(-3)).softmax(dim=-1)  # (*o, B, N, E)
        ones = torch.ones(raw.shape[:-1], dtype=raw.dtype)
        sure = ones if importance is None else (importance == 1).to(raw.dtype)
        alive = ones if importance is None else (importance > 0).to(raw.dtype)

        first = raw.argmax(dim=-1)
        oh1 = F.one_hot(first, E).to(raw.dtype)
        m1 = oh1 * sure.unsqueeze(-1)
        rest = raw * (1 - m1)
        second = rest.argmax(dim=-1)
        oh2 = F.one_hot(second, E).to(raw.dtype)
        g1 = raw.gather(-1, first.unsqueeze(-1)).squeeze(-1) * sure
        g2 = rest.gather(-1, second.unsqueeze(-1)).squeeze(-1)
        denom = g1 + g2 + self.eps
        g1, g2 = g1 / denom, g2 / denom

        # balance loss: first-choice density (before capacity) times the soft proxy
        density = m1.mean(dim=-2)
        proxy = (raw * sure.unsqueeze(-1)).mean(dim=-2)
        loss = (proxy * density).mean() * float(E * E)

        # second-choice candidates before the policy; with E == 1 the "second" of a row that
        # has a first choice is that same expert with gate 0: no choice (libmoe's reading)
        cand2 = oh2 * (alive - (m1 * oh2).sum(-1)).unsqueeze(-1)
        if policy == "all":
            keep = ones
        elif policy == "none":
            keep = torch.zeros_like(ones)
        elif policy == "threshold":
            keep = (g2 > threshold).to(raw.dtype)
        else:
            u = self.uniforms(g2.shape, raw.dtype)
            keep = (u < g2 / max(threshold, self.eps)).to(raw.dtype)
        m2 = cand2 * keep.detach().unsqueeze(-1)

        C = capacity(N, factor, E)
        pos1 = _exclusive_cumsum(m1, -2)
        keep1 = m1 * (pos1 < C).to(raw.dtype)
        pos2 = _exclusive_cumsum(m2, -2) + keep1.sum(dim=-2, keepdim=True)
        keep2 = m2 * (pos2 < C).to(raw.dtype)
        k1, k2 = keep1.sum(-1), keep2.sum(-1)  # per row: 1 if that choice was kept
        slot1 = F.one_hot((pos1 * m1).sum(-1).long().clamp(max=C - 1), C).to(raw.dtype) * k1.unsqueeze(-1)
        slot2 = F.one_hot((pos2 * m2).sum(-1).long().clamp(max=C - 1), C).to(raw.dtype) * k2.unsqueeze(-1)
        combine = ((g1 * k1)[..., None, None] * oh1.unsqueeze(-1) * slot1.unsqueeze(-2)
                   + (g2 * k2)[..., None, None] * oh2.unsqueeze(-1) * slot2.unsqueeze(-2))  # (*o,B,N,E,C)
        self.last = SimpleNamespace(
            raw=raw.detach(), first=first, second=second, sure=sure, alive=alive,
            g1=g1.detach(), g2=g2.detach(), cand2=cand2, policy=policy, threshold=threshold,
            u=u if policy == "random" else None, kept2=int((cand2 * keep.unsqueeze(-1)).sum()),
            capacity=C, combine=combine, dispatch=(combine != 0).to(raw.dtype), loss=loss,
            counts=(keep1 + keep2).sum(dim=(-3, -2)).long(),  # (*o, E)
            dropped=int((m1 - keep1).sum() + (m2 - keep2).sum()))
        return self.last

    def forward(self, x, importance=None):
        r = self.route(x, importance)
        return r.dispatch, r.combine, r.loss


class Experts(nn.Module):
    """w1 (*E, D, H), w2 (*E, H, D): out = act(x @ w1) @ w2, no biases."""

    def __init__(self, dim, experts_shape, hidden_dim, activation="relu"):
        super().__init__()
        w1 = torch.empty(*experts_shape, dim, hidden_dim)
        w2 = torch.empty(*experts_shape, hidden_dim, dim)
        nn.init.uniform_(w1, -hidden_dim ** -0.5, hidden_dim ** -0.5)  # 1/sqrt(last dim), as the seed
        nn.init.uniform_(w2, -dim ** -0.5, dim ** -0.5)
        self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)
        self.act = make_activation(activation)

    def forward(self, x):  # (*E, R, D)
        return torch.matmul(self.act(torch.matmul(x, self.w1)), self.w2)


GATE_KEYS = ("second_policy_train", "second_policy_eval", "second_threshold_train",
             "second_threshold_eval", "capacity_factor_train", "capacity_factor_eval")


class GShardMoE(nn.Module):
    def __init__(self, dim, num_experts=16, hidden_dim=None, activation="relu", second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2, second_threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2.0, loss_coef=1e-2, seed=0):
        super().__init__()
        kw = dict(zip(GATE_KEYS, (second_policy_train, second_policy_eval, second_threshold_train,
                                  second_threshold_eval, capacity_factor_train, capacity_factor_eval)))
        self.num_experts, self.loss_coef = num_experts, loss_coef
        self.gate = Top2Gating(dim, num_experts, **kw)
        self.gate.rng_seed = seed
        self.experts = Experts(dim, (num_experts,), hidden_dim or 4 * dim, activation)
        self.stats = None

    def forward(self, x):  # (B, N, D) -> (y (B, N, D), aux loss)
        B, N, D = x.shape
        r = self.gate.route(x)
        xin = torch.einsum("bnd,bnec->ebcd", x, r.dispatch)
        E, _, C, _ = xin.shape
        out = self.experts(xin.reshape(E, B * C, D)).reshape(E, B, C, D)
        y = torch.einsum("ebcd,bnec->bnd", out, r.combine)
        self.stats = {"expert_counts": r.counts.reshape(-1), "dropped": r.dropped}
        return y, r.loss * self.loss_coef


class HierarchicalMoE(nn.Module):
    def __init__(self, dim, num_experts=(4, 4), hidden_dim=None, activation="relu", second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2, second_threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2.0, loss_coef=1e-2, seed=0):
        super().__init__()
        if len(num_experts) != 2:
            raise ValueError("hierarchical num_experts must be a pair (outer, inner)")
        kw = dict(zip(GATE_KEYS, (second_policy_train, second_policy_eval, second_threshold_train,
                                  second_threshold_eval, capacity_factor_train, capacity_factor_eval)))
        self.eo, self.ei = (int(v) for v in num_experts)
        self.loss_coef = loss_coef
        self.gate_outer = Top2Gating(dim, self.eo, **kw)
        self.gate_inner = Top2Gating(dim, self.ei, outer_dims=(self.eo,), **kw)
        self.gate_outer.rng_seed = self.gate_inner.rng_seed = seed
        self.gate_inner.rng_level = 1
        self.experts = Experts(dim, (self.eo, self.ei), hidden_dim or 4 * dim, activation)
        self.stats = None

    def forward(self, x):  # (B, N, D) -> (y (B, N, D), aux loss)
        B, N, D = x.shape
        ro = self.gate_outer.route(x)
        xo = torch.einsum("bnd,bnec->ebcd", x, ro.dispatch)          # (Eo, B, Co, D)
        imp = ro.combine.sum(dim=1).permute(1, 0, 2)                  # (Eo, B, Co): gate of the slot's token
        imp = 0.5 * ((imp > 0.5).to(x.dtype) + (imp > 0).to(x.dtype))
        ri = self.gate_inner.route(xo, importance=imp)                # combine (Eo, B, Co, Ei, Ci)
        xin = torch.einsum("ebnd,ebnfc->efbcd", xo, ri.dispatch)       # (Eo, Ei, B, Ci, D)
        Ci = xin.shape[3]
        out = self.experts(xin.reshape(self.eo, self.ei, B * Ci, D)).reshape(xin.shape)
        yo = torch.einsum("efbcd,ebnfc->ebnd", out, ri.combine)
        y = torch.einsum("ebcd,bnec->bnd", yo, ro.combine)
        self.stats = {"expert_counts": ri.counts.reshape(-1), "dropped": ro.dropped + ri.dropped}
        return y, (ro.loss + ri.loss) * self.loss_coef


CONFIG_KEYS = ("dim", "num_experts", "hidden_dim", "activation") + GATE_KEYS + ("loss_coef",)


def build(config):
    """Module from a libmoe config dict {"type": "gshard"|"hierarchical", "dim", ...};
    missing keys take the seed defaults, "seed" keys the random policy's draws (the caller
    seeds torch for the init), unknown keys are errors."""
    kind = config.get("type")
    if kind not in TYPES:
        raise ValueError(f"config type must be 'gshard' or 'hierarchical', got {kind!r}")
    unknown = set(config) - set(CONFIG_KEYS) - {"type", "seed"}
    if unknown:
        raise ValueError(f"unknown config keys for {kind}: {sorted(unknown)}")
    if "dim" not in config:
        raise ValueError(f"{kind} config needs 'dim'")
    kw = {k: config[k] for k in CONFIG_KEYS if k in config}
    kw["seed"] = int(config.get("seed", 0))
    if kind == "hierarchical":
        kw["num_experts"] = tuple(kw.get("num_experts", (4, 4)))
        return HierarchicalMoE(**kw)
    return GShardMoE(**kw)


def gates(model):
    return [model.gate] if isinstance(model, GShardMoE) else [model.gate_outer, model.gate_inner]


def outputs(model, x, dy=None, daux=1.0, train=True, dtype=torch.float64):
    """Reference results as libmoe's `moe forward` writes them: y, aux_loss, stats.*
    and, with dy (in either mode), dx and grad.<name> of sum(y * dy) + daux * aux_loss.
    The model is copied and cast to dtype; its train/eval mode is set from `train`."""
    m = copy.deepcopy(model).to(dtype).train(train)
    xr = x.to(dtype).requires_grad_(dy is not None)
    with torch.set_grad_enabled(dy is not None):
        y, aux = m(xr)
    out = {"y": y.detach(), "aux_loss": aux.detach().reshape(())}
    if dy is not None:
        ((y * dy.to(dtype)).sum() + float(daux) * aux).backward()
        out["dx"] = xr.grad
        for name, p in m.named_parameters():
            out["grad." + name] = p.grad if p.grad is not None else torch.zeros_like(p)
    out["stats.expert_counts"] = m.stats["expert_counts"].to(torch.int64)
    out["stats.dropped"] = torch.tensor(m.stats["dropped"], dtype=torch.int64)
    return out


def knife_edges(model, x, train, margin=1e-4):
    """Reasons why float32 could route x differently from float64 (empty: safe).
    Checks, on every row that matters at each gate level: the top-1/top-2 raw gates
    (and top-2/top-3 where a second choice exists) closer than `margin` relative;
    the normalised g2 within `margin` of the threshold (threshold policy) or g2 / t
    within `margin` of the row's draw u (random policy); a second raw gate below 1e-30
    (float32 underflow); and (hierarchical) an outer gate value of a kept slot within
    `margin` of 0.5 (the importance split)."""
    m = copy.deepcopy(model).double().train(train)
    with torch.no_grad():
        m(x.double())
    why = []
    for level, g in enumerate(gates(m)):
        r = g.last
        E = r.raw.shape[-1]
        s = r.raw.sort(dim=-1, descending=True).values
        alive, sure = r.alive > 0, r.sure > 0
        if E >= 2 and bool(((s[..., 0] - s[..., 1]) < margin * s[..., 0])[alive].any()):
            why.append(f"level {level}: top-1/top-2 gates within {margin:g}")
        if E >= 3 and bool(((s[..., 1] - s[..., 2]) < margin * s[..., 1])[sure].any()):
            why.append(f"level {level}: top-2/top-3 gates within {margin:g}")
        if E >= 2 and bool((s[..., 1] < 1e-30)[sure].any()):
            why.append(f"level {level}: a second gate underflows float32")
        cand = r.cand2.sum(-1) > 0
        if r.policy == "threshold" and bool(((r.g2 - r.threshold).abs() < margin)[cand].any()):
            why.append(f"level {level}: normalised g2 within {margin:g} of threshold {r.threshold}")
        if r.policy == "random" and bool(((r.g2 / max(r.threshold, EPS) - r.u).abs() < margin)[cand].any()):
            why.append(f"level {level}: g2 / {r.threshold} within {margin:g} of the random draw")
        if level == 0 and isinstance(m, HierarchicalMoE):
            c = r.combine[r.combine != 0]
            if bool(((c - 0.5).abs() < margin).any()):
                why.append(f"outer gate value within {margin:g} of 0.5")
    return why


def second_choices(model, x, train):
    """(second-choice candidates, of them kept by the policy before capacity), summed over
    the gate levels of one forward of x in the given mode."""
    m = copy.deepcopy(model).double().train(train)
    with torch.no_grad():
        m(x.double())
    return sum(int(g.last.cand2.sum()) for g in gates(m)), sum(g.last.kept2 for g in gates(m))


def draw_input(model, B, N, skew, train, gen, tries=200):
    """x (B, N, D) float32 = randn + skew * u, redrawn from `gen` while knife_edges()
    finds a fragile decision (RuntimeError if no draw of `tries` is safe). u is the unit
    direction of gate column 0 (hierarchical: plus inner column 0 of outer expert 0),
    so with skew of a few units most tokens pick expert 0 and capacity overflows."""
    with torch.no_grad():
        g = gates(model)
        cols = [g[0].w_gating[:, 0]] + ([g[1].w_gating[0, :, 0]] if len(g) > 1 else [])
        u = sum(v / v.norm() for v in cols)
        u = (u / u.norm()).float()
    for _ in range(tries):
        x = torch.randn(B, N, u.numel(), generator=gen) + skew * u
        if not knife_edges(model, x, train):
            return x
    raise RuntimeError(f"no knife-edge-free input in {tries} draws (B={B}, N={N}, skew={skew})")


# ---------------------------------------------------------------- index-based loops (self-test)

def _loop_group(rows, w, imp, gate, first, eps=EPS):
    """One group by explicit loops. rows (R, D), w (D, E), imp: list or None; the random
    policy draws rng_uniform(gate.stream(), first + r) for row r (libmoe's counter).
    Returns (kept [(row, expert, position, gate)], sum_e proxy*density, dropped)."""
    policy, t, factor = gate.modes[gate.training]
    R, E = rows.shape[0], w.shape[1]
    C = capacity(R, factor, E)
    raw = torch.softmax(rows @ w, dim=-1)
    firsts, seconds, density = [], [], [0.0] * E
    proxy = torch.zeros(E, dtype=rows.dtype)
    for r in range(R):
        p = raw[r]
        sure = imp is None or imp[r] == 1
        alive = imp is None or imp[r] > 0
        i1 = max(range(E), key=lambda e: float(p[e]))
        if sure:
            others = [e for e in range(E) if e != i1]
            i2 = max(others, key=lambda e: float(p[e])) if others else None
            a, b = p[i1], (p[i2] if others else p.new_zeros(()))
            density[i1] += 1.0 / R
            proxy = proxy + p / R
        else:
            i2, a, b = i1, p.new_zeros(()), p[i1]
        s = a + b + eps
        g1, g2 = a / s, b / s
        if sure:
            firsts.append((r, i1, g1))
        if policy == "random":
            keep2 = rng_uniform(gate.stream(), first + r) < float(g2) / max(t, eps)
        else:
            keep2 = {"all": True, "none": False, "threshold": float(g2) > t}[policy]
        if alive and keep2 and i2 is not None:
            seconds.append((r, i2, g2))
    fill, kept, dropped = [0] * E, [], 0
    for r, e, g in firsts + seconds:  # all first choices (row order), then the seconds
        if fill[e] < C:
            kept.append((r, e, fill[e], g))
            fill[e] += 1
        else:
            dropped += 1
    return kept, sum(proxy[e] * density[e] for e in range(E)), dropped


def loop_forward(model, x):
    """(y, aux, expert_counts list, dropped) of `model` on x (B, N, D), computed row by
    row from the definition; no dense (B,N,E,C) tensors. Every policy."""
    B, N, D = x.shape
    ex = model.experts

    def expert(idx, v):
        return ex.act(v @ ex.w1[idx]) @ ex.w2[idx]

    ys = [[x.new_zeros(D) for _ in range(N)] for _ in range(B)]
    if isinstance(model, GShardMoE):
        E, lsum, dropped, counts = model.num_experts, 0.0, 0, [0] * model.num_experts
        for b in range(B):
            kept, ls, dr = _loop_group(x[b], model.gate.w_gating, None, model.gate, b * N)
            lsum, dropped = lsum + ls, dropped + dr
            for r, e, _, g in kept:
                ys[b][r] = ys[b][r] + g * expert(e, x[b, r])
                counts[e] += 1
        aux = lsum / (B * E) * E * E * model.loss_coef
    else:
        Eo, Ei = model.eo, model.ei
        lo, li, dropped, counts = 0.0, 0.0, 0, [0] * (Eo * Ei)
        Co = capacity(N, model.gate_outer.modes[model.training][2], Eo)
        for b in range(B):
            kept, ls, dr = _loop_group(x[b], model.gate_outer.w_gating, None, model.gate_outer, b * N)
            lo, dropped = lo + ls, dropped + dr
            for eo in range(Eo):
                slots = {c: (r, g) for r, e, c, g in kept if e == eo}
                buf = torch.stack([x[b, slots[c][0]] if c in slots else x.new_zeros(D) for c in range(Co)])
                imp = [0.0 if c not in slots else (1.0 if float(slots[c][1]) > 0.5 else 0.5) for c in range(Co)]
                kin, ls, dr = _loop_group(buf, model.gate_inner.w_gating[eo], imp, model.gate_inner,
                                          (eo * B + b) * Co)
                li, dropped = li + ls, dropped + dr
                for c, f, _, g in kin:
                    r, go = slots[c]
                    ys[b][r] = ys[b][r] + go * g * expert((eo, f), buf[c])
                    counts[eo * Ei + f] += 1
        aux = (lo / (B * Eo) * Eo * Eo + li / (Eo * B * Ei) * Ei * Ei) * model.loss_coef
    y = torch.stack([torch.stack(row) for row in ys])
    return y, aux, counts, dropped


def self_checks(check):
    """Torch-only checks of this reference; check(ok, what, detail) records each."""
    cap = [(16, 1.25, 4, 5), (10, 1.25, 16, 4), (3, 2.0, 2, 4), (64, 4.0, 2, 64), (37, 1.5, 6, 9), (40, 1.0, 2, 20)]
    got = [capacity(n, f, e) for n, f, e, _ in cap]
    check(got == [c for *_, c in cap], "gshard: capacity = max(min(N, floor(N*cf/E)), 4) on 6 known values", str(got))

    try:  # the seed's threshold line: (b,n,e) mask times a (b,n) test does not broadcast
        torch.ones(2, 5, 4) * (torch.rand(2, 5) > 0.2).float()
        check(False, "gshard: seed's literal threshold line fails to broadcast (B=2,N=5,E=4)", "it broadcast")
    except RuntimeError:
        check(True, "gshard: seed's literal threshold line fails to broadcast (B=2,N=5,E=4)")

    specs = [  # (config, B, N, skew toward expert 0, train)
        (dict(type="gshard", dim=8, num_experts=4, hidden_dim=12, second_policy_train="all"), 2, 13, 0.0, True),
        (dict(type="gshard", dim=6, num_experts=3, hidden_dim=10, activation="gelu", second_policy_train="threshold",
              second_threshold_train=0.3, capacity_factor_train=0.75), 2, 17, 2.5, True),
        (dict(type="gshard", dim=8, num_experts=5, hidden_dim=8, activation="leaky_relu", second_policy_eval="none",
              capacity_factor_eval=1.0), 1, 12, 3.0, False),
        (dict(type="hierarchical", dim=8, num_experts=[2, 3], hidden_dim=12, second_policy_train="all",
              capacity_factor_train=1.0), 2, 14, 2.0, True),
        (dict(type="hierarchical", dim=6, num_experts=[3, 2], hidden_dim=8, activation="silu",
              second_policy_train="threshold", second_threshold_train=0.25), 2, 9, 0.0, True),
        (dict(type="hierarchical", dim=6, num_experts=[2, 2], hidden_dim=8, second_policy_eval="none"), 1, 10, 2.0, False),
        (dict(type="gshard", dim=6, num_experts=1, hidden_dim=8, second_policy_train="all",
              capacity_factor_train=0.5), 2, 9, 0.0, True),
        (dict(type="hierarchical", dim=6, num_experts=[2, 1], hidden_dim=8, second_policy_train="all"), 2, 11, 0.0, True),
        # the random policy with libmoe's draws, both levels, both modes, a non-default seed
        (dict(type="gshard", dim=8, num_experts=4, hidden_dim=12, second_policy_train="random",
              second_threshold_train=0.5, seed=11), 2, 13, 0.0, True),
        (dict(type="gshard", dim=6, num_experts=3, hidden_dim=10, second_policy_eval="random",
              second_threshold_eval=0.6, capacity_factor_eval=1.0), 2, 15, 2.0, False),
        (dict(type="hierarchical", dim=8, num_experts=[2, 3], hidden_dim=12, second_policy_eval="random",
              second_threshold_eval=0.5, seed=5), 2, 14, 0.0, False),
    ]
    for i, (cfg, B, N, skew, train) in enumerate(specs):
        torch.manual_seed(50 + i)
        model = build(cfg).double().train(train)
        for g in gates(model):
            with torch.no_grad():
                g.w_gating.mul_(cfg["dim"] ** -0.5)
        x = torch.randn(B, N, cfg["dim"], dtype=torch.float64)
        w0 = gates(model)[0].w_gating[:, 0].detach()
        x = x + skew * w0 / w0.norm()
        dy = torch.randn_like(x)
        res = []
        for fn in (lambda m, xx: m(xx) + (m.stats["expert_counts"].tolist(), m.stats["dropped"]),
                   loop_forward):
            m = copy.deepcopy(model)
            xx = x.clone().requires_grad_()
            y, aux, counts, dropped = fn(m, xx)
            ((y * dy).sum() + 0.7 * aux).backward()
            res.append(dict(y=y.detach(), aux=aux.detach(), dx=xx.grad, counts=counts, dropped=dropped,
                            **{n: p.grad for n, p in m.named_parameters()}))
        a, b = res
        bad = [k for k in a if k not in ("counts", "dropped") and not torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12)]
        bad += [k for k in ("counts", "dropped") if a[k] != b[k]]
        cand, kept = second_choices(model, x, train)
        if "random" in (cfg.get("second_policy_train"), cfg.get("second_policy_eval")) and not 0 < kept < cand:
            bad.append(f"the random policy keeps {kept} of {cand} second choices: it decides nothing")
        check(not bad, f"{cfg['type']}: dense one-hot formulation == index-based loops (y, aux, dx, grads, stats) "
              f"case {i} ({'train' if train else 'eval'}, dropped {a['dropped']})", f"differs in {bad}")

    for cfg in (dict(type="gshard", dim=16), dict(type="hierarchical", dim=16)):
        try:  # seed defaults incl. the random policy, B=1, under autograd
            m = build(cfg)
            y, aux = m(torch.randn(1, 20, 16))
            (y.sum() + aux).backward()
            ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
            check(ok, f"{cfg['type']}: seed defaults, random policy, B=1: forward + backward run", "bad grads")
        except Exception as exc:  # noqa: BLE001 - report any failure as a check
            check(False, f"{cfg['type']}: seed defaults, random policy, B=1: forward + backward run", repr(exc))

    # libmoe's generator: 24-bit uniforms, about uniform, a stream per seed, calls and level
    us = [rng_uniform(rng_u64(0, STREAM_GSHARD), i) for i in range(4000)]
    g = Top2Gating(4, 3)
    s0 = g.stream()
    g.rng_level = 1
    s1 = g.stream()
    g.rng_seed, g.rng_level = 7, 0
    s7 = g.stream()
    g.rng_seed, g.rng_calls = 0, 1
    s_next = g.stream()
    ok = all(0.0 <= u < 1.0 and (u * 2 ** 24).is_integer() for u in us) and abs(sum(us) / len(us) - 0.5) < 0.02
    ok = ok and s1 == (s0 + 1) & MASK64 and len({s0, s7, s_next}) == 3 and s0 == rng_u64(0, STREAM_GSHARD)
    check(ok, "gshard: libmoe's draws are 24-bit uniforms (mean 0.5) keyed by seed, forward count and level",
          f"mean {sum(us) / len(us):.4f}")

    torch.manual_seed(9)  # random policy with t -> 0 keeps every second choice: equals 'all'
    m = build(dict(type="gshard", dim=8, num_experts=4, second_policy_train="random", second_threshold_train=0.0))
    x = torch.randn(2, 11, 8)
    y_rand = m(x)[0]
    m.gate.modes[True] = ("all",) + m.gate.modes[True][1:]
    check(torch.allclose(y_rand, m(x)[0]), "gshard: random policy with threshold 0 == policy all")

    want = {"gshard": [("gate.w_gating", [6, 5]), ("experts.w1", [5, 6, 24]), ("experts.w2", [5, 24, 6])],
            "hierarchical": [("gate_outer.w_gating", [6, 2]), ("gate_inner.w_gating", [2, 6, 3]),
                             ("experts.w1", [2, 3, 6, 10]), ("experts.w2", [2, 3, 10, 6])]}
    for kind, cfg in (("gshard", dict(type="gshard", dim=6, num_experts=5)),
                      ("hierarchical", dict(type="hierarchical", dim=6, num_experts=[2, 3], hidden_dim=10))):
        got = [(k, list(v.shape)) for k, v in build(cfg).state_dict().items()]
        check(got == want[kind], f"{kind}: state_dict names/shapes/order (hidden_dim None -> 4*dim)", str(got))
    msgs = []
    for bad in (dict(type="gshard", dim=4, top_k=2), dict(type="gshard", dim=4, second_policy_eval="sometimes"),
                dict(type="hierarchical", dim=4, num_experts=[2, 2, 2]), dict(type="gshard")):
        try:
            build(bad)
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    check(None not in msgs, "gshard/hierarchical build(): rejects unknown keys, policies, 3 levels, no dim", str(msgs))
