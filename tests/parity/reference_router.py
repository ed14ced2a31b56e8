"""Float64 PyTorch reference of the `topk` layer with its routers (libmoe README "Routers").

Our own plain code, written from the semantics below; the parity harness
(run_parity_router.py) runs it in float64 on libmoe's float32 weights and inputs.

state_dict (nn.Linear layout (out, in); H2 = H for "mlp" experts, 2H for swiglu/geglu):
  experts.{e}.net.0.weight (H2,D) .net.0.bias (H2) .net.2.weight (D,H) .net.2.bias (D)   e < E
  gate.weight (E,D), gate.bias (E)
  gate.e_score_correction_bias (E)             buffer, with expert_bias (not a parameter)
  shared_experts.{i}.net.* (as the experts)     i < Ns = num_shared_experts
  shared_gate.weight (Ns,D)                    with shared_gate (no bias)

x is (B, N, D) (B groups of N tokens) or (T, D) (one group); T = B*N.
  z = gate(x) (T,E); enabled experts: all but the runtime mask.
  p = softmax of z over the enabled experts (disabled: 0); score sigmoid: p = s = sigmoid(z).
  selection key: z (topk_softmax), p (softmax), s (sigmoid); + the bias buffer if expert_bias.
Token choice, per token, K picks in slot order: the forced experts (increasing index), then
  the largest keys (ties: lower index) among the enabled experts not yet picked. Groups (G > 1,
  M < G): group score = sum of the two largest keys of its enabled experts (one: that key;
  none: ranks last); the free picks come from the M best groups (ties: lower group) first and,
  only when those run out, from the others (best key first).
  weights: topk_softmax: softmax of the K picked z; softmax: p (/ sum over the K picks if
  normalize); sigmoid: s (/ (sum + 1e-20) if normalize); all times route_scale.
  capacity cf > 0: C = min(N, ceil(cf*N*K/E)) per group and expert, assignments taken slot by
  slot (j = 0..K-1), token by token; one over C is dropped (contributes nothing).
Expert choice: each enabled expert takes, per group, its C = min(N, ceil(cf*N/E)) tokens of
  largest p[:, e] (ties: lower token), weight route_scale * p[t, e].
y += g_i * shared_i(x), g_i = 1 or sigmoid(shared_gate.weight[i] . x).
aux = balance_coef * balance + z_loss_coef * zloss (a layer has aux only if a coef > 0):
  zloss = mean over T of logsumexp(z_t over all E)^2;
  balance (token choice) = mean over groups of E' * sum_e f_e * P_e, f_e = share of the
  group's N*K picks (before capacity) going to e (a constant), P_e = mean over the group of
  q[:, e], q = p (softmax scores) or s / (sum over enabled s + 1e-20) (sigmoid: as libmoe,
  finite when every s underflows), E' enabled experts.
The routing decisions are constants for autograd; everything else is differentiated.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import reference as ref
from reference import Expert

SCORES = ("topk_softmax", "softmax", "sigmoid")
ROUTERS = ("token_choice", "expert_choice")

DEFAULTS = dict(
    num_experts=4, input_dim=64, hidden_dim=128, top_k=2, activation="relu", expert="mlp",
    leaky_slope=0.01, router="token_choice", score="topk_softmax", normalize=False, route_scale=1.0,
    capacity_factor_train=0.0, capacity_factor_eval=0.0, jitter=0.0, balance_coef=0.0, z_loss_coef=0.0,
    num_shared_experts=0, shared_gate=False, expert_bias=False, bias_update_rate=0.0,
    num_groups=0, topk_groups=0)

RECIPES = {
    "topk": {},
    "token_choice": {},
    "switch": dict(top_k=1, score="softmax", normalize=False, capacity_factor_train=1.25,
                   capacity_factor_eval=2.0, jitter=0.01, balance_coef=0.01),
    "mixtral": dict(score="softmax", normalize=True, capacity_factor_train=0.0, capacity_factor_eval=0.0,
                    balance_coef=0.01),
    "st_moe": dict(score="softmax", normalize=True, capacity_factor_train=1.25, capacity_factor_eval=2.0,
                   balance_coef=0.01, z_loss_coef=1e-3),
    "deepseek_v3": dict(score="sigmoid", normalize=True, expert_bias=True, bias_update_rate=1e-3,
                        capacity_factor_train=0.0, capacity_factor_eval=0.0, balance_coef=0.0),
    "expert_choice": dict(router="expert_choice", score="softmax", capacity_factor_train=2.0,
                          capacity_factor_eval=2.0),
}


def resolve(config):
    """Settings dict of a libmoe topk config: defaults, then the "router" recipe, then the
    other keys in order ("capacity_factor" sets both modes). ValueError on a bad config."""
    if config.get("type") != "topk":
        raise ValueError(f"config type must be 'topk', got {config.get('type')!r}")
    s = dict(DEFAULTS)
    recipe = config.get("router", "topk")
    if recipe not in RECIPES:
        raise ValueError(f"unknown router recipe {recipe!r} (known: {', '.join(RECIPES)})")
    s.update(RECIPES[recipe])
    for k, v in config.items():
        if k in ("type", "seed", "router"):
            continue
        if k == "capacity_factor":
            s["capacity_factor_train"] = s["capacity_factor_eval"] = v
        elif k in DEFAULTS:
            s[k] = v
        else:
            raise ValueError(f"unknown config key {k!r}")
    E, K, G, M = s["num_experts"], s["top_k"], s["num_groups"], s["topk_groups"]
    if s["score"] not in SCORES:
        raise ValueError(f"unknown score {s['score']!r} (known: {', '.join(SCORES)})")
    if not 1 <= K <= E:
        raise ValueError(f"top_k = {K} must be in [1, num_experts = {E}]")
    if G > 1 and E % G:
        raise ValueError(f"num_groups = {G} does not divide num_experts = {E}")
    if M > max(G, 1):
        raise ValueError(f"topk_groups = {M} > num_groups = {G}")
    if s["router"] == "expert_choice":
        if s["score"] != "softmax":
            raise ValueError("expert_choice needs score softmax")
        if s["balance_coef"] > 0:
            raise ValueError("expert_choice has no balance loss (balance_coef must be 0)")
        if min(s["capacity_factor_train"], s["capacity_factor_eval"]) <= 0:
            raise ValueError("expert_choice needs capacity factors > 0")
    return s


def choose(keys, enabled, forced, k, n_groups=0, keep_groups=0):
    """Token choice for one token. keys: E floats. Returns (picks in slot order, edges):
    edges are the float comparisons that decided the routing, (a, b, kind) with a >= b
    preferred: kind "group" (M-th vs next group score), "boundary" (last pick vs first
    unpicked expert of a pool) or "order" (consecutive picks: their slot order)."""
    E = len(keys)
    picks, edges = list(forced), []
    free = [e for e in range(E) if enabled[e] and e not in picks]
    pools = [free]
    if n_groups > 1 and 0 < keep_groups < n_groups:
        size = E // n_groups
        scores = []
        for g in range(n_groups):
            mine = sorted((keys[e] for e in range(g * size, (g + 1) * size) if enabled[e]), reverse=True)
            scores.append(sum(mine[:2]) if mine else -math.inf)
        order = sorted(range(n_groups), key=lambda g: (-scores[g], g))
        kept = set(order[:keep_groups])
        a, b = scores[order[keep_groups - 1]], scores[order[keep_groups]]
        if b > -math.inf:
            edges.append((a, b, "group"))
        pools = [[e for e in free if e // size in kept], [e for e in free if e // size not in kept]]
    need = k - len(picks)
    for pool in pools:
        if need <= 0:
            break
        ranked = sorted(pool, key=lambda e: (-keys[e], e))
        take = ranked[:need]
        edges += [(keys[a], keys[b], "order") for a, b in zip(take, take[1:])]
        if take and len(ranked) > len(take):
            edges.append((keys[take[-1]], keys[ranked[len(take)]], "boundary"))
        picks += take
        need -= len(take)
    return picks, edges


def token_capacity(cf, N, K, E):
    return min(N, math.ceil(cf * N * K / E)) if cf > 0 else 0


def expert_capacity(cf, N, E):
    return min(N, math.ceil(cf * N / E))


class RouterMoE(nn.Module):
    """The topk layer with every router option; forward(x) -> (y, aux or None); after a
    forward, .stats holds expert_counts, dropped, balance_loss, z_loss, capacity, edges."""

    def __init__(self, config):
        super().__init__()
        s = self.cfg = resolve(config)
        E, D, H, Ns = s["num_experts"], s["input_dim"], s["hidden_dim"], s["num_shared_experts"]

        def expert():
            return Expert(D, H, s["activation"], s["expert"], s["leaky_slope"])

        self.experts = nn.ModuleList([expert() for _ in range(E)])
        self.gate = nn.Linear(D, E)
        if s["expert_bias"]:
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(E))
        if Ns > 0:
            self.shared_experts = nn.ModuleList([expert() for _ in range(Ns)])
        if s["shared_gate"] and Ns > 0:
            self.shared_gate = nn.Linear(D, Ns, bias=False)
        self.num_experts = E
        self.has_aux = s["balance_coef"] > 0 or s["z_loss_coef"] > 0
        self.stats = None
        self.set_routing()

    def set_routing(self, top_k=0, disabled=(), forced=()):
        """Runtime control as `moe forward --top-k --mask-experts --force-experts`."""
        E, ec = self.num_experts, self.cfg["router"] == "expert_choice"
        enabled = [e not in set(disabled) for e in range(E)]
        k = top_k or self.cfg["top_k"]
        if any(not 0 <= e < E for e in list(disabled) + list(forced)):
            raise ValueError(f"expert index out of range [0, {E})")
        if ec and (top_k or forced):
            raise ValueError("expert_choice takes no --top-k or --force-experts")
        if not 1 <= k <= E:
            raise ValueError(f"top_k = {k} must be in [1, num_experts = {E}]")
        if sum(enabled) < (1 if ec else k):
            raise ValueError(f"{sum(enabled)} enabled experts, fewer than k = {k}")
        if len(set(forced)) > k:
            raise ValueError(f"{len(set(forced))} forced experts, more than k = {k}")
        if any(not enabled[e] for e in forced):
            raise ValueError("a forced expert is disabled")
        self.k, self.enabled, self.forced = k, enabled, sorted(set(forced))

    # ------------------------------------------------------------- routing
    def route_tokens(self, keys, B, N, cf):
        """Token choice: (idx (T,K) long, kept (T,K) bool, dropped, capacity, edges)."""
        s, K, E = self.cfg, self.k, self.num_experts
        idx, edges = [], []
        for row in keys.tolist():
            picks, e = choose(row, self.enabled, self.forced, K, s["num_groups"], s["topk_groups"])
            idx.append(picks)
            edges += [x for x in e if x[2] != "order" or cf > 0]  # slot order only matters with capacity
        C = token_capacity(cf, N, K, E)
        kept = [[True] * K for _ in idx]
        dropped = 0
        for b in range(B):
            fill = [0] * E
            for j in range(K):
                for n in range(N):
                    t, e = b * N + n, idx[b * N + n][j]
                    if cf > 0 and fill[e] >= C:
                        kept[t][j] = False
                        dropped += 1
                    else:
                        fill[e] += 1
        return torch.tensor(idx, dtype=torch.long).reshape(-1, K), torch.tensor(kept).reshape(-1, K), dropped, C, edges

    def route_experts(self, p, B, N, cf):
        """Expert choice: (dispatch (T,E) bool, capacity, edges)."""
        E = self.num_experts
        C = expert_capacity(cf, N, E)
        dispatch = torch.zeros(B * N, E, dtype=torch.bool)
        edges = []
        for b in range(B):
            for e in range(E):
                if not self.enabled[e]:
                    continue
                col = p[b * N:(b + 1) * N, e].tolist()
                ranked = sorted(range(N), key=lambda n: (-col[n], n))
                for n in ranked[:C]:
                    dispatch[b * N + n, e] = True
                if C < N:
                    edges.append((col[ranked[C - 1]], col[ranked[C]], "boundary"))
        return dispatch, C, edges

    # ------------------------------------------------------------- forward
    def forward(self, x):
        s, E = self.cfg, self.num_experts
        if self.training and s["jitter"] > 0:
            raise ValueError("jitter is random: parity needs jitter 0 in train mode")
        D = x.shape[-1]
        B = 1 if x.dim() <= 2 else math.prod(x.shape[:-2])
        T = x.numel() // D
        N = T // B
        xt = x.reshape(T, D)
        cf = s["capacity_factor_train" if self.training else "capacity_factor_eval"]
        en = torch.tensor(self.enabled)
        n_enabled = int(en.sum())

        z = self.gate(xt)                                              # (T, E)
        if s["score"] == "sigmoid":
            sig = torch.sigmoid(z)
            p = sig
            on = sig * en.to(z.dtype)
            q = on / (on.sum(dim=-1, keepdim=True) + 1e-20)  # guarded: every s may underflow to 0
        else:
            p = torch.softmax(z.masked_fill(~en, -math.inf), dim=-1)    # disabled: exactly 0
            q = p
        keys = (z if s["score"] == "topk_softmax" else p).detach().clone()
        if s["expert_bias"]:
            keys = keys + self.gate.e_score_correction_bias.to(keys.dtype)

        if s["router"] == "expert_choice":
            dispatch, C, edges = self.route_experts(keys, B, N, cf)
            combine = s["route_scale"] * p * dispatch.to(p.dtype)       # (T, E)
            dropped, picks_per_group = 0, None
        else:
            idx, kept, dropped, C, edges = self.route_tokens(keys, B, N, cf)
            if s["score"] == "topk_softmax":
                w = torch.softmax(z.gather(1, idx), dim=-1)
            else:
                w = p.gather(1, idx)
                if s["normalize"]:
                    w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if s["score"] == "sigmoid" else 0.0))
            w = s["route_scale"] * w                                     # (T, K)
            combine = torch.zeros(T, E, dtype=z.dtype).scatter(1, idx, w * kept.to(w.dtype))
            dispatch = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, kept)
            picks_per_group = F.one_hot(idx, E).sum(dim=1).reshape(B, N, E).sum(dim=1)  # (B, E)

        y = torch.zeros_like(xt)
        for e, expert in enumerate(self.experts):
            tok = torch.nonzero(dispatch[:, e]).flatten()
            if tok.numel():
                y = y.index_add(0, tok, combine[tok, e].unsqueeze(-1) * expert(xt[tok]))
        for i in range(s["num_shared_experts"]):
            out = self.shared_experts[i](xt)
            if s["shared_gate"]:
                out = torch.sigmoid(xt @ self.shared_gate.weight[i]).unsqueeze(-1) * out
            y = y + out

        zloss = (torch.logsumexp(z, dim=-1) ** 2).mean()
        if picks_per_group is None:
            balance = z.new_zeros(())
        else:
            f = picks_per_group.to(z.dtype) / (N * self.k)                # constants
            P = q.reshape(B, N, E).mean(dim=1)
            balance = (n_enabled * (f * P).sum(dim=-1)).mean()
        aux = s["balance_coef"] * balance + s["z_loss_coef"] * zloss if self.has_aux else None
        self.stats = dict(expert_counts=dispatch.sum(dim=0).to(torch.int64), dropped=dropped,
                          balance_loss=balance.detach(), z_loss=zloss.detach(), capacity=C, edges=edges)
        return y.reshape(x.shape), aux


def build(config):
    return RouterMoE(config)


def outputs(model, x, dy=None, daux=1.0, train=True, dtype=torch.float64):
    """What `moe forward` writes: y, aux_loss (if the layer has one), stats.* (expert_counts,
    dropped, balance_loss, z_loss, capacity: C of token or expert choice, 0 dropless, and
    expert_bias with expert_bias) and, with dy,
    dx and grad.<param> of sum(y * dy) + daux * aux_loss. The model is copied, cast, and
    set to train/eval by `train`."""
    m = copy.deepcopy(model).to(dtype).train(train)
    xr = x.to(dtype).requires_grad_(dy is not None)
    with torch.set_grad_enabled(dy is not None):
        y, aux = m(xr)
    out = {"y": y.detach()}
    if aux is not None:
        out["aux_loss"] = aux.detach().reshape(())
    if dy is not None:
        loss = (y * dy.to(dtype)).sum() + (float(daux) * aux if aux is not None else 0.0)
        loss.backward()
        out["dx"] = xr.grad
        for name, p in m.named_parameters():
            out["grad." + name] = p.grad if p.grad is not None else torch.zeros_like(p)
    st = m.stats
    out["stats.expert_counts"] = st["expert_counts"]
    out["stats.dropped"] = torch.tensor(st["dropped"], dtype=torch.int64)
    out["stats.balance_loss"] = st["balance_loss"].reshape(())
    out["stats.z_loss"] = st["z_loss"].reshape(())
    out["stats.capacity"] = torch.tensor(st["capacity"], dtype=torch.int64)
    if m.cfg["expert_bias"]:
        out["stats.expert_bias"] = m.gate.e_score_correction_bias.detach().clone()
    return out


def knife_edges(model, x, train, margin=1e-4):
    """Routing decisions of x that float32 could take differently (empty: safe): two keys
    (or group scores) compared by a decision closer than margin * max(0.01, |a|, |b|)."""
    m = copy.deepcopy(model).double().train(train)
    with torch.no_grad():
        m(x.double())
    why = []
    for a, b, kind in m.stats["edges"]:
        if abs(a - b) < margin * max(0.01, abs(a), abs(b)):
            why.append(f"{kind}: {a:.8g} vs {b:.8g}")
    return why


# ---------------------------------------------------------------- self checks (torch only)

def _grads(model, x, dy, daux=1.0):
    m = copy.deepcopy(model).double()
    xx = x.double().clone().requires_grad_()
    y, aux = m(xx)
    ((y * dy).sum() + (daux * aux if aux is not None else 0.0)).backward()
    out = {"y": y.detach(), "dx": xx.grad}
    out.update({n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()})
    return out, m


def _close(a, b, tol=1e-10):
    return [k for k in a if k in b and not torch.allclose(a[k], b[k], rtol=tol, atol=tol)] + \
        [k for k in a if k not in b]


def _seeded(cfg, seed, ebias=False):
    torch.manual_seed(seed)
    m = build(cfg).double()
    if ebias:
        with torch.no_grad():
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    return m


def _finite_differences(model, x, dy, n_coords=3, eps=1e-6):
    """Worst relative mismatch of autograd against central differences of
    sum(y*dy) + aux, on a few coordinates of x and of every parameter."""
    got, _ = _grads(model, x, dy)

    def loss(m, xx):
        y, aux = m(xx)
        return float((y * dy).sum() + (aux if aux is not None else 0.0))

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    targets = [("dx", None)] + [(n, n) for n, _ in model.named_parameters()]
    for key, pname in targets:
        for _ in range(n_coords):
            m, xx = copy.deepcopy(model).double(), x.double().clone()
            t = xx if pname is None else dict(m.named_parameters())[pname].data
            i = int(torch.randint(t.numel(), (1,), generator=gen))
            with torch.no_grad():
                t.view(-1)[i] += eps
                up = loss(m, xx)
                t.view(-1)[i] -= 2 * eps
                down = loss(m, xx)
            num, ana = (up - down) / (2 * eps), float(got[key].reshape(-1)[i])
            worst = max(worst, abs(num - ana) / max(1.0, abs(ana)))
    return worst


def _capacity_by_cumsum(idx, B, N, E, C):
    """Kept mask of slot-major capacity, computed GShard-style with one-hot cumsums."""
    K = idx.shape[1]
    oh = F.one_hot(idx.reshape(B, N, K), E).permute(0, 2, 1, 3).reshape(B, K * N, E)  # slot-major
    pos = (torch.cumsum(oh, dim=1) - oh) * oh
    kept = ((pos < C) | (oh == 0)).all(dim=-1).reshape(B, K, N).permute(0, 2, 1)
    return kept.reshape(B * N, K)


def self_checks(check):
    """Torch-only checks of this reference; check(ok, what, detail) records each."""
    D, H = 6, 8

    def cfg(E=4, **kw):
        return dict(type="topk", num_experts=E, input_dim=D, hidden_dim=H, **kw)

    # 1. default router == reference.TopKMoE (seed 004), forward and every gradient
    for i, kw in enumerate([dict(top_k=2), dict(top_k=1, expert="swiglu"), dict(top_k=3, activation="gelu")]):
        c = cfg(E=5, **kw)
        torch.manual_seed(10 + i)
        m = build(c).double()
        old = ref.build(c).double()
        old.load_state_dict(m.state_dict())
        x, dy = torch.randn(11, D, dtype=torch.float64), torch.randn(11, D, dtype=torch.float64)
        a, _ = _grads(m, x, dy)
        xx = x.clone().requires_grad_()
        y = old(xx)
        (y * dy).sum().backward()
        b = {"y": y.detach(), "dx": xx.grad}
        b.update({n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in old.named_parameters()})
        bad = _close(a, b)
        check(not bad, f"router: default topk == reference.TopKMoE (y, dx, grads) {kw}", str(bad))

    # 2. softmax + normalize over the K picks == softmax of the K picked logits (mixtral == topk)
    torch.manual_seed(20)
    x, dy = torch.randn(2, 9, D, dtype=torch.float64), torch.randn(2, 9, D, dtype=torch.float64)
    a, _ = _grads(_seeded(cfg(E=6, top_k=2, router="mixtral", balance_coef=0.0, route_scale=1.7), 21), x, dy)
    b, _ = _grads(_seeded(cfg(E=6, top_k=2, route_scale=1.7), 21), x, dy)
    check(not _close(a, b), "router: mixtral (renormalised softmax) == topk_softmax (y, dx, grads)", str(_close(a, b)))

    # 3. a masked expert == the layer without it (softmax over the enabled experts)
    m5 = _seeded(cfg(E=5, top_k=2, score="softmax", balance_coef=0.1), 30)
    m5.set_routing(disabled=[2])
    sd = m5.state_dict()
    keep = [0, 1, 3, 4]
    m4 = build(cfg(E=4, top_k=2, score="softmax", balance_coef=0.1)).double()
    sd4 = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    for new, old_e in enumerate(keep):
        sd4.update({k.replace(f"experts.{old_e}.", f"experts.{new}."): v for k, v in sd.items()
                    if k.startswith(f"experts.{old_e}.")})
    sd4["gate.weight"], sd4["gate.bias"] = sd["gate.weight"][keep], sd["gate.bias"][keep]
    m4.load_state_dict(sd4)
    x, dy = torch.randn(13, D, dtype=torch.float64), torch.randn(13, D, dtype=torch.float64)
    a, m5r = _grads(m5, x, dy)
    b, _ = _grads(m4, x, dy)
    same = all(torch.allclose(u, v, rtol=1e-10, atol=1e-12) for u, v in
               ((a["y"], b["y"]), (a["dx"], b["dx"]), (a["gate.weight"][keep], b["gate.weight"])))
    same = same and int(m5r.stats["expert_counts"][2]) == 0 and float(a["gate.weight"][2].abs().max()) == 0.0
    check(same, "router: --mask-experts 2 on E=5 == the E=4 layer without expert 2 (y, dx, gate grads, aux)")

    # 4. groups with M = G == no groups; with M < G the picks stay in the kept groups
    x = torch.randn(3, 10, D, dtype=torch.float64)
    dy = torch.randn_like(x)
    a, _ = _grads(_seeded(cfg(E=8, top_k=3, router="deepseek_v3", num_groups=4, topk_groups=4), 40, True), x, dy)
    b, _ = _grads(_seeded(cfg(E=8, top_k=3, router="deepseek_v3"), 40, True), x, dy)
    check(not _close(a, b), "router: num_groups 4 with topk_groups 4 == no groups (deepseek_v3, bias)")
    picks, _ = choose([0.9, 0.1, 0.5, 0.45, 0.95, -2.0, 0.3, 0.2], [True] * 8, [], 3, 4, 1)
    check(picks == [0, 1, 4], "router: groups G=4 M=1 keep group 0 (score 1.0); the third pick falls back "
          "to the best other expert (4)", str(picks))
    picks, _ = choose([0.9, 0.1, 0.5, 0.45, 0.95, -2.0, 0.3, 0.2], [True] * 8, [], 3, 4, 2)
    check(picks == [0, 2, 3], "router: groups G=4 M=2 keep groups 0 (1.0) and 1 (0.95), picks 0, 2, 3", str(picks))
    picks, _ = choose([0.9, 0.1, 0.5, 0.45, 0.95, -2.0, 0.3, 0.2], [False, False] + [True] * 6, [6], 2, 4, 1)
    check(picks == [6, 2], "router: forced 6 first; group 0 fully masked ranks last; G=4 M=1", str(picks))
    picks, _ = choose([0.0] * 6, [True] * 6, [], 3)
    check(picks == [0, 1, 2], "router: equal keys pick the lower indices first", str(picks))

    # 5. slot-major capacity loop == one-hot cumsum formulation
    m = _seeded(cfg(E=4, top_k=2, score="softmax", capacity_factor=0.75), 50)
    with torch.no_grad():
        m.gate.bias[0] += 2.0
    x = torch.randn(3, 12, D, dtype=torch.float64)
    keys = torch.softmax(m.gate(x.reshape(-1, D)), -1).detach()
    idx, kept, dropped, C, _ = m.route_tokens(keys, 3, 12, 0.75)
    other = _capacity_by_cumsum(idx, 3, 12, 4, C)
    check(torch.equal(kept, other) and dropped == int((~kept).sum()) > 0,
          f"router: capacity loop == one-hot cumsum (C={C}, dropped {dropped})")

    # 6. expert choice == torch.topk over each expert's column, per group
    m = _seeded(cfg(E=4, router="expert_choice", capacity_factor=1.0), 60)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    p = torch.softmax(m.gate(x.reshape(-1, D)), -1).detach()
    disp, C, _ = m.route_experts(p, 2, 10, 1.0)
    want = torch.zeros_like(disp)
    for b in range(2):
        top = torch.topk(p[b * 10:(b + 1) * 10].T, C, dim=-1).indices  # (E, C)
        for e in range(4):
            want[b * 10 + top[e], e] = True
    check(torch.equal(disp, want) and C == 3, f"router: expert choice == per-group torch.topk (C={C})")

    # 7. losses: z-loss by definition; balance 1 when P is uniform; ties -> lower index
    m = _seeded(cfg(E=4, top_k=2, score="softmax", z_loss_coef=1.0, balance_coef=1.0), 70)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with torch.no_grad():
        _, aux = m(x)
        z = m.gate(x.reshape(-1, D))
        zl = float((torch.logsumexp(z, -1) ** 2).mean())
        ok = abs(float(m.stats["z_loss"]) - zl) < 1e-12
        ok = ok and abs(float(aux) - zl - float(m.stats["balance_loss"])) < 1e-12
        m.gate.weight.zero_()
        m.gate.bias.zero_()
        m(x)
        ok = ok and abs(float(m.stats["balance_loss"]) - 1.0) < 1e-12
        ok = ok and m.stats["expert_counts"].tolist() == [14, 14, 0, 0]
    check(ok, "router: z-loss by definition, aux = coefs * losses, uniform P gives balance 1, ties -> low index")

    # 8. autograd == central differences (decisions constant), on the hard configurations
    specs = [
        (cfg(E=4, top_k=2, router="st_moe", capacity_factor=1.0, z_loss_coef=0.05, balance_coef=0.1),
         (2, 9), False, []),
        (cfg(E=8, top_k=2, router="deepseek_v3", num_groups=4, topk_groups=2, num_shared_experts=2,
             shared_gate=True, balance_coef=0.1, expert="swiglu"), (2, 7), True, []),
        (cfg(E=6, top_k=3, score="sigmoid", balance_coef=0.2, route_scale=2.5), (10,), False, [1]),
        (cfg(E=5, router="expert_choice", capacity_factor=0.8, z_loss_coef=0.1, num_shared_experts=1),
         (2, 8), False, [3]),
        (cfg(E=5, top_k=2, balance_coef=0.3, activation="gelu"), (2, 6), False, []),
    ]
    for i, (c, shape, eb, masked) in enumerate(specs):
        m = _seeded(c, 80 + i, eb)
        m.set_routing(disabled=masked)
        gen = torch.Generator().manual_seed(90 + i)
        for _ in range(20):  # a draw whose decisions an eps of 1e-6 cannot flip
            x = torch.randn(*shape, D, dtype=torch.float64, generator=gen)
            if not knife_edges(m, x, True, margin=1e-3):
                break
        dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        worst = _finite_differences(m, x, dy)
        check(worst < 1e-6, f"router: autograd == central differences ({c.get('router', c.get('score', 'topk'))}, "
              f"case {i}, worst rel err {worst:.2g})", f"{worst:.3g}")

    # 9. recipes, overrides and the configurations libmoe must reject
    s = resolve(dict(type="topk", router="switch"))
    s2 = resolve(dict(type="topk", router="switch", top_k=2, capacity_factor=0.5, jitter=0.0))
    ok = (s["top_k"], s["score"], s["capacity_factor_train"], s["capacity_factor_eval"], s["jitter"]) == \
        (1, "softmax", 1.25, 2.0, 0.01) and (s2["top_k"], s2["capacity_factor_eval"], s2["jitter"]) == (2, 0.5, 0.0)
    check(ok, "router: recipe switch, then explicit keys override it")
    bad_cfgs = [cfg(E=4, top_k=5), cfg(router="gshardish"), cfg(score="relu"), cfg(E=6, num_groups=4, topk_groups=2),
                cfg(E=8, num_groups=4, topk_groups=5), cfg(router="expert_choice", balance_coef=0.01),
                cfg(router="expert_choice", capacity_factor=0.0), cfg(bogus=1)]
    msgs = []
    for c in bad_cfgs:
        try:
            build(c)
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    check(None not in msgs, "router: build() rejects k > E, unknown recipe/score/key, bad groups, expert_choice "
          "with balance or capacity 0", str(msgs))
    m = build(cfg(E=4, top_k=2))
    msgs = []
    for kw in (dict(disabled=[0, 1, 2]), dict(disabled=[1], forced=[1]), dict(top_k=5), dict(forced=[0, 1, 2])):
        try:
            m.set_routing(**kw)
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    check(None not in msgs, "router: set_routing() rejects too few enabled, forced+masked, k > E, forced > k",
          str(msgs))
