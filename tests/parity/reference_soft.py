"""PyTorch references for libmoe's soft layers (parity tests, DESIGN.md section 4).

Written from the descriptions of seed 003 (DynamicSlotsSoftMoE -> `soft_dynamic`) and
of lucidrains' SoftMoE with learned slots (-> `soft`), with plain torch ops.

state_dict names, shapes and order (what `moe forward --weights` loads):
  soft_dynamic: norm.gamma (D); to_slot_embeds.0.weight (E*D, D); to_slot_embeds.2.gamma (D);
                experts.{i}.0.weight (H2, D), .0.bias (H2), .3.weight (D, H), .3.bias (D)
  soft        : norm.gamma (D); slot_norm.gamma (D); slot_embeds (E, S, D);
                experts.experts.{i}.0.weight / .0.bias / .3.weight / .3.bias
with H = int(D*mult) (GELU MLP, H2 = H) or int(D*mult*2/3) (GEGLU, H2 = 2H: first half
the value, second half the gate). `soft` keeps slot_embeds (a parameter of the root
module, which torch would save first) in the order above by overriding state_dict.

Semantics (per batch row; token masks are (B, N) bool, True = real token):
  xn = x / max(||x||, 1e-12) * sqrt(D) * norm.gamma
  soft_dynamic: pad N to Np (multiple of E) with zero, masked rows; slot embeddings from
    the masked means of groups of E consecutive tokens, projected by to_slot_embeds
    (Linear -> (S, E, D) -> RMSNorm) to (E, S, D); a slot is masked when its whole group is.
  soft: slot embeddings RMSNorm(slot_embeds) with slot_norm.gamma; token mask only, no padding.
  logits[n, e, s] = xn[n] . K[e, s]; masked rows/slots filled with -finfo.max;
  dispatch = softmax over n, combine = softmax over (e, s); slots = dispatch^T xn;
  expert e on its slots; y = combine . outputs; crop to the N real tokens.
Images (B, D, h, w) become tokens (B, h*w, D) (token i*w + j) and y goes back to
(B, D, h, w) after cropping h*w tokens: the INTENT of the seed, which crops
out[:, :seq_len] with seq_len = h (the channel axis) and cannot unpack when h*w is
not a multiple of E. A 2-D x (N, D) is one sequence, as `moe forward` reads it.

build(cfg) makes a module from the `moe forward` JSON config; naive_forward(model, x,
mask) is an independent per-token loop of the same definition; self_checks(check)
compares the two (and a few invariances) in float64.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TYPES = ("soft_dynamic", "soft")


# ------------------------------------------------------------------ modules

class RMSNorm(nn.Module):
    """x / max(||x||, 1e-12) * sqrt(D) * gamma over the last dim."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        n = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x / n * self.scale * self.gamma


class GEGLU(nn.Module):
    """a * gelu(g): a the first half of the last dim, g the second."""

    def forward(self, h):
        a, g = h.chunk(2, dim=-1)
        return a * F.gelu(g)


class SplitExperts(nn.Module):
    """(..., S, E*D) -> (..., E, S, D): column block e*D..e*D+D belongs to expert e. No params."""

    def __init__(self, num_experts):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, t):
        *lead, s, ed = t.shape
        e = self.num_experts
        t = t.reshape(*lead, s, e, ed // e)
        return t.transpose(-3, -2)


def hidden_dim(dim, mult, geglu):
    return int(dim * mult * 2 / 3) if geglu else int(dim * mult)


def make_expert(dim, mult, dropout, geglu):
    h = hidden_dim(dim, mult, geglu)
    if h < 1:
        raise ValueError(f"expert hidden width {h} < 1 (dim {dim}, expert_mult {mult})")
    return nn.Sequential(nn.Linear(dim, 2 * h if geglu else h), GEGLU() if geglu else nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(h, dim))


class ExpertList(nn.Module):
    """`soft`'s expert container: `experts` a ModuleList; forward (B, E, S, D) -> (B, E, S, D)."""

    def __init__(self, experts):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, slots):
        return torch.stack([ex(slots[:, i]) for i, ex in enumerate(self.experts)], dim=1)


def to_tokens(x, mask):
    """x (B, N, D) | (N, D) | image (B, D, h, w) -> (tokens (B, N, D), mask (B, N) or None, undo)."""
    if x.dim() == 2:
        return x.unsqueeze(0), (None if mask is None else mask.reshape(1, -1)), lambda y: y[0]
    if x.dim() == 3:
        return x, mask, lambda y: y
    if x.dim() != 4:
        raise ValueError(f"x must be (N, D), (B, N, D) or (B, D, h, w), got {list(x.shape)}")
    b, d, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, d)
    if mask is not None:
        mask = mask.reshape(b, h * w)
    return tokens, mask, lambda y: y.reshape(b, h, w, d).permute(0, 3, 1, 2)


def route(xn, keys, tok_mask, slot_mask, experts):
    """xn (B, N, D); keys (B, E, S, D); tok_mask (B, N) bool; slot_mask (B, S) bool;
    experts: (B, E, S, D) -> (B, E, S, D). Returns y (B, N, D)."""
    b, n, d = xn.shape
    e, s = keys.shape[1], keys.shape[2]
    logits = torch.einsum("bnd,besd->bnes", xn, keys)
    fill = -torch.finfo(logits.dtype).max
    logits = logits.masked_fill(~tok_mask[:, :, None, None], fill)
    logits = logits.masked_fill(~slot_mask[:, None, None, :], fill)
    dispatch = logits.softmax(dim=1)
    combine = logits.reshape(b, n, e * s).softmax(dim=-1)
    slots = torch.einsum("bnd,bnes->besd", xn, dispatch)
    out = experts(slots).reshape(b, e * s, d)
    return torch.einsum("bsd,bns->bnd", out, combine)


class DynamicSlotsSoftMoE(nn.Module):
    """Seed 003: slots per expert S = ceil(N / E), slot embeddings from token-group means."""

    def __init__(self, dim, num_experts=4, expert_mult=4, dropout=0.0, geglu=False):
        super().__init__()
        self.dim, self.num_experts = dim, num_experts
        self.norm = RMSNorm(dim)
        self.to_slot_embeds = nn.Sequential(nn.Linear(dim, dim * num_experts, bias=False),
                                            SplitExperts(num_experts), RMSNorm(dim))
        self.experts = nn.ModuleList([make_expert(dim, expert_mult, dropout, geglu)
                                      for _ in range(num_experts)])

    def num_slots(self, n):
        return -(-n // self.num_experts)

    def run_experts(self, slots):
        return torch.stack([ex(slots[:, i]) for i, ex in enumerate(self.experts)], dim=1)

    def forward(self, x, mask=None):
        x, mask, undo = to_tokens(x, mask)
        b, n, d = x.shape
        e = self.num_experts
        xn = self.norm(x)
        s = self.num_slots(n)
        pad = s * e - n
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        mask = mask.to(torch.bool)
        if pad:
            xn = torch.cat([xn, xn.new_zeros(b, pad, d)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
        groups = mask.reshape(b, s, e)
        summed = (xn.reshape(b, s, e, d) * groups[..., None].to(xn.dtype)).sum(dim=2)
        means = summed / groups.to(xn.dtype).sum(dim=2, keepdim=True).clamp_min(1e-5)
        keys = self.to_slot_embeds(means)  # (B, E, S, D)
        y = route(xn, keys, mask, groups.any(dim=-1), self.run_experts)
        return undo(y[:, :n])


class SoftMoE(nn.Module):
    """lucidrains SoftMoE with learned slot embeddings (E, S, D)."""

    def __init__(self, dim, num_experts=4, num_slots=1, expert_mult=4, dropout=0.0, geglu=False):
        super().__init__()
        self.dim, self.num_experts, self.slots = dim, num_experts, num_slots
        self.norm = RMSNorm(dim)
        self.slot_norm = RMSNorm(dim)
        self.slot_embeds = nn.Parameter(torch.randn(num_experts, num_slots, dim))
        self.experts = ExpertList([make_expert(dim, expert_mult, dropout, geglu)
                                   for _ in range(num_experts)])

    def num_slots(self, n):
        return self.slots

    def state_dict(self, *args, **kwargs):
        """torch puts the root's own parameter first; libmoe's order has it after the norms."""
        sd = super().state_dict(*args, **kwargs)
        first = ["norm.gamma", "slot_norm.gamma", "slot_embeds"]
        out = type(sd)((k, sd[k]) for k in first if k in sd)
        out.update((k, v) for k, v in sd.items() if k not in first)
        if hasattr(sd, "_metadata"):
            out._metadata = sd._metadata
        return out

    def forward(self, x, mask=None):
        x, mask, undo = to_tokens(x, mask)
        b, n, _ = x.shape
        xn = self.norm(x)
        keys = self.slot_norm(self.slot_embeds).unsqueeze(0).expand(b, -1, -1, -1)
        mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        y = route(xn, keys, mask, torch.ones(b, self.slots, dtype=torch.bool), self.experts)
        return undo(y)


KEYS = {"type", "dim", "num_experts", "expert_mult", "dropout", "geglu", "seed"}


def build(cfg):
    """Module from a `moe forward` JSON config (defaults: the seed module's)."""
    t = cfg.get("type")
    if t not in TYPES:
        raise ValueError(f"unknown soft layer type {t!r}")
    extra = {"num_slots", "slots_per_expert", "seq_len"} if t == "soft" else set()
    unknown = set(cfg) - KEYS - extra
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} for {t}")
    kw = dict(dim=int(cfg.get("dim", 64)), num_experts=int(cfg.get("num_experts", 4)),
              expert_mult=cfg.get("expert_mult", 4), dropout=float(cfg.get("dropout", 0.0)),
              geglu=bool(cfg.get("geglu", False)))
    if kw["num_experts"] < 1:
        raise ValueError("num_experts must be >= 1")
    if t == "soft_dynamic":
        return DynamicSlotsSoftMoE(**kw)
    given = [k for k in ("num_slots", "slots_per_expert", "seq_len") if k in cfg]
    if len(given) > 1:
        raise ValueError(f"give one of num_slots, slots_per_expert, seq_len (got {given})")
    if given == ["seq_len"]:
        s = int(cfg["seq_len"]) // kw["num_experts"]
    else:
        s = int(cfg[given[0]]) if given else 1
    if s < 1:
        raise ValueError(f"slots per expert {s} < 1")
    return SoftMoE(num_slots=s, **kw)


def spec_names(cfg):
    """[(name, shape)] in libmoe's order, written out from the spec (for the layout check)."""
    m = build(cfg)
    d, e = m.dim, m.num_experts
    h = hidden_dim(d, float(cfg.get("expert_mult", 4)), bool(cfg.get("geglu", False)))
    h2 = 2 * h if cfg.get("geglu") else h
    if cfg["type"] == "soft_dynamic":
        names, pre = [("norm.gamma", [d]), ("to_slot_embeds.0.weight", [d * e, d]),
                      ("to_slot_embeds.2.gamma", [d])], "experts."
    else:
        names, pre = [("norm.gamma", [d]), ("slot_norm.gamma", [d]), ("slot_embeds", [e, m.slots, d])], \
            "experts.experts."
    for i in range(e):
        names += [(f"{pre}{i}.0.weight", [h2, d]), (f"{pre}{i}.0.bias", [h2]),
                  (f"{pre}{i}.3.weight", [d, h]), (f"{pre}{i}.3.bias", [d])]
    return names


def perturb(model, gen, scale=0.1):
    """Move every RMSNorm gamma away from 1 (1 + scale * N(0,1)) so its gradient matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return model


# ------------------------------------------------------------------ naive loop

def _rms(v, gamma):
    return v / torch.clamp(torch.sqrt((v * v).sum()), min=1e-12) * math.sqrt(v.shape[0]) * gamma


def _gelu(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def _expert(seq, v):
    lin1, lin2 = seq[0], seq[3]
    h = lin1.weight @ v + lin1.bias
    if isinstance(seq[1], GEGLU):
        half = h.shape[0] // 2
        h = h[:half] * _gelu(h[half:])
    else:
        h = _gelu(h)
    return lin2.weight @ h + lin2.bias


def _softmax_allowed(vals, allowed):
    """Softmax over the allowed entries (0 elsewhere); uniform over all when none is allowed."""
    if not any(allowed):
        return [1.0 / len(vals)] * len(vals)
    idx = [i for i, a in enumerate(allowed) if a]
    m = max(float(vals[i]) for i in idx)
    ex = {i: torch.exp(vals[i] - m) for i in idx}
    tot = sum(ex.values())
    return [ex[i] / tot if a else 0.0 for i, a in enumerate(allowed)]


def naive_forward(model, x, mask=None):
    """The layer written token by token with python loops (float64, small sizes only)."""
    image = x.dim() == 4
    if image:
        b_, d_, h_, w_ = x.shape
        toks = [[x[b, :, i, j] for i in range(h_) for j in range(w_)] for b in range(b_)]
    elif x.dim() == 2:
        toks = [[x[n] for n in range(x.shape[0])]]
    else:
        toks = [[x[b, n] for n in range(x.shape[1])] for b in range(x.shape[0])]
    dyn = isinstance(model, DynamicSlotsSoftMoE)
    E, D = model.num_experts, model.dim
    experts = model.experts if dyn else model.experts.experts
    rows = []
    for b, row in enumerate(toks):
        N = len(row)
        real = [True] * N if mask is None else [bool(v) for v in mask.reshape(len(toks), N)[b]]
        xn = [_rms(t, model.norm.gamma) for t in row]
        if dyn:
            S = -(-N // E)
            while len(xn) < S * E:  # padding: zero vectors, masked
                xn.append(torch.zeros(D, dtype=x.dtype))
                real.append(False)
            keys, slot_real = [[None] * S for _ in range(E)], []
            lin, g2 = model.to_slot_embeds[0].weight, model.to_slot_embeds[2].gamma
            for s in range(S):
                members = [s * E + j for j in range(E) if real[s * E + j]]
                mean = sum((xn[n] for n in members), torch.zeros(D, dtype=x.dtype)) / max(len(members), 1e-5)
                slot_real.append(bool(members))
                proj = lin @ mean
                for e in range(E):
                    keys[e][s] = _rms(proj[e * D:(e + 1) * D], g2)
        else:
            S = model.slots
            keys = [[_rms(model.slot_embeds[e, s], model.slot_norm.gamma) for s in range(S)] for e in range(E)]
            slot_real = [True] * S
        Np = len(xn)
        logit = [[[xn[n] @ keys[e][s] for s in range(S)] for e in range(E)] for n in range(Np)]
        out = [[None] * S for _ in range(E)]
        for e in range(E):
            for s in range(S):
                col = [logit[n][e][s] for n in range(Np)]
                w = _softmax_allowed(col, [real[n] and slot_real[s] for n in range(Np)])
                slot = sum((w[n] * xn[n] for n in range(Np)), torch.zeros(D, dtype=x.dtype))
                out[e][s] = _expert(experts[e], slot)
        ys = []
        for n in range(N):
            flat = [logit[n][e][s] for e in range(E) for s in range(S)]
            w = _softmax_allowed(flat, [real[n] and slot_real[s] for e in range(E) for s in range(S)])
            ys.append(sum((w[e * S + s] * out[e][s] for e in range(E) for s in range(S)),
                          torch.zeros(D, dtype=x.dtype)))
        rows.append(torch.stack(ys))
    y = torch.stack(rows)
    if image:
        return y.reshape(b_, h_, w_, d_).permute(0, 3, 1, 2)
    return y[0] if x.dim() == 2 else y


# ------------------------------------------------------------------ checks

def grads_of(model, fn, x, mask, dy):
    """{'y', 'dx', 'grad.<name>'} of sum(fn(model, x, mask) * dy) (float64 autograd)."""
    m = copy.deepcopy(model)
    xx = x.clone().requires_grad_()
    y = fn(m, xx, mask)
    y.backward(dy)
    out = {"y": y.detach(), "dx": xx.grad}
    out.update({"grad." + n: (p.grad if p.grad is not None else torch.zeros_like(p))
                for n, p in m.named_parameters()})
    return out


def random_mask(shape, gen, p_keep=0.6, dead_rows=()):
    m = torch.rand(shape, generator=gen) < p_keep
    for r in dead_rows:
        m[r] = False
    return m


# (cfg, x shape, mask kind: None | "rand" | "dead" (random, row 0 fully masked))
NAIVE_CASES = [
    (dict(type="soft_dynamic", dim=8, num_experts=4, expert_mult=2), (2, 8, 8), None),
    (dict(type="soft_dynamic", dim=8, num_experts=3, expert_mult=2), (2, 7, 8), None),       # padding
    (dict(type="soft_dynamic", dim=6, num_experts=4, expert_mult=2.5, geglu=True), (3, 9, 6), "rand"),
    (dict(type="soft_dynamic", dim=8, num_experts=2, expert_mult=1.5), (3, 5, 8), "dead"),
    (dict(type="soft_dynamic", dim=8, num_experts=4, expert_mult=2), (2, 8, 3, 2), None),    # image, 6 % 4
    (dict(type="soft_dynamic", dim=8, num_experts=3, expert_mult=2, geglu=True), (2, 8, 2, 3), "dead"),
    (dict(type="soft_dynamic", dim=8, num_experts=1, expert_mult=2), (2, 5, 8), "rand"),     # E = 1
    (dict(type="soft_dynamic", dim=8, num_experts=3, expert_mult=2), (2, 1, 8), None),       # N = 1
    (dict(type="soft_dynamic", dim=8, num_experts=3, expert_mult=2), (5, 8), None),          # (N, D)
    (dict(type="soft", dim=8, num_experts=3, num_slots=2, expert_mult=2), (2, 7, 8), None),
    (dict(type="soft", dim=8, num_experts=2, seq_len=7, expert_mult=2, geglu=True), (3, 6, 8), "dead"),
    (dict(type="soft", dim=6, num_experts=4, slots_per_expert=1, expert_mult=2.5), (2, 6, 3, 3), "rand"),
    (dict(type="soft", dim=8, num_experts=2, num_slots=3, expert_mult=2), (4, 8), None),
]


def draw(cfg, shape, mask_kind, seed):
    """float64 model (gammas perturbed), x, mask, dy for a check."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = perturb(build(cfg), gen).double()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = None
    if mask_kind:
        b = shape[0]
        n = shape[2] * shape[3] if len(shape) == 4 else shape[1]
        mask = random_mask((b, n), gen, dead_rows=(0,) if mask_kind == "dead" else ())
    dy = torch.randn(model(x, mask).shape, generator=gen, dtype=torch.float64)
    return model, x, mask, dy


def _close(a, b, tol=1e-10):
    return [k for k in a if k not in b or a[k].shape != b[k].shape
            or not torch.allclose(a[k], b[k], rtol=tol, atol=tol)]


def self_checks(check):
    """Module vs naive loop (y, dx, every grad) and invariances, float64. check(ok, what, detail)."""
    for i, (cfg, shape, mk) in enumerate(NAIVE_CASES):
        model, x, mask, dy = draw(cfg, shape, mk, 500 + i)
        a = grads_of(model, lambda m, xx, mm: m(xx, mm), x, mask, dy)
        b = grads_of(model, naive_forward, x, mask, dy)
        bad = _close(a, b)
        finite = all(bool(torch.isfinite(v).all()) for v in a.values())
        check(not bad and finite, f"soft reference == naive loop (y, dx, grads): {cfg} x{list(shape)} mask={mk}",
              f"differs in {bad}" if bad else "non-finite values")

    # padding == explicit zero tokens that are masked
    model, x, _, _ = draw(dict(type="soft_dynamic", dim=8, num_experts=4, expert_mult=2), (2, 6, 8), None, 601)
    xp = torch.cat([x, torch.zeros(2, 2, 8, dtype=x.dtype)], dim=1)
    mp = torch.cat([torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    check(torch.allclose(model(x), model(xp, mp)[:, :6], rtol=1e-12, atol=1e-12),
          "soft_dynamic: N=6, E=4 padding == two zero tokens masked")
    # an all-True mask changes nothing
    for cfg in (dict(type="soft_dynamic", dim=8, num_experts=3), dict(type="soft", dim=8, num_experts=3, num_slots=2)):
        model, x, _, _ = draw(cfg, (2, 7, 8), None, 602)
        check(torch.allclose(model(x), model(x, torch.ones(2, 7, dtype=torch.bool)), rtol=1e-12, atol=1e-12),
              f"{cfg['type']}: all-True mask == no mask")
    # masked tokens' values do not reach the real tokens' outputs
    for cfg in (dict(type="soft_dynamic", dim=8, num_experts=3), dict(type="soft", dim=8, num_experts=3, num_slots=2)):
        model, x, mask, _ = draw(cfg, (3, 8, 8), "rand", 603)
        x2 = torch.where(mask[..., None], x, 5 * torch.randn_like(x))
        y1, y2 = model(x, mask), model(x2, mask)
        check(torch.allclose(y1[mask], y2[mask], rtol=1e-12, atol=1e-12),
              f"{cfg['type']}: masked tokens' values do not change real tokens' outputs")
    # image == its tokens (B, h*w, D), token i*w + j
    for cfg in (dict(type="soft_dynamic", dim=8, num_experts=4), dict(type="soft", dim=8, num_experts=2, num_slots=2)):
        model, x, _, _ = draw(cfg, (2, 8, 3, 3), None, 604)
        tok = torch.stack([torch.stack([x[b, :, i, j] for i in range(3) for j in range(3)]) for b in range(2)])
        yt = model(tok)
        yi = model(x)
        want = torch.stack([torch.stack([torch.stack([yt[b, i * 3 + j] for j in range(3)], dim=-1)
                                         for i in range(3)], dim=-2) for b in range(2)])
        check(yi.shape == x.shape and torch.allclose(yi, want, rtol=1e-12, atol=1e-12),
              f"{cfg['type']}: image (B, D, 3, 3) == its 9 tokens, restored to (B, D, h, w)")
    # a fully masked row: uniform dispatch and combine, finite
    model, x, _, _ = draw(dict(type="soft_dynamic", dim=8, num_experts=2), (2, 4, 8), None, 605)
    mask = torch.tensor([[False] * 4, [True] * 4])
    y = model(x, mask)
    with torch.no_grad():
        xn = model.norm(x[0])
        slot = xn.mean(dim=0)  # uniform dispatch over the 4 tokens
        outs = torch.stack([ex(slot) for ex in model.experts])
        want = outs.mean(dim=0).expand(4, -1)  # uniform combine over E * S = 2 * 2 slots (equal pairs)
    check(bool(torch.isfinite(y).all()) and torch.allclose(y[0], want, rtol=1e-12, atol=1e-12),
          "soft_dynamic: a fully masked row gives every token the mean of uniform-dispatch slot outputs")
    # hidden widths and defaults
    widths = [hidden_dim(16, 2.5, False), hidden_dim(16, 2.5, True), hidden_dim(64, 4, True), hidden_dim(9, 4, True)]
    m = build({"type": "soft_dynamic"})
    s = build({"type": "soft", "seq_len": 10, "num_experts": 3})
    check(widths == [40, 26, 170, 24] and (m.dim, m.num_experts, m.experts[0][0].out_features) == (64, 4, 256)
          and s.slots == 3, "soft build(): H = int(D*mult) / int(D*mult*2/3), seed defaults, seq_len // E",
          f"{widths} {(m.dim, m.num_experts)} {s.slots}")
    # state_dict names / shapes / order
    for cfg in (dict(type="soft_dynamic", dim=6, num_experts=3, expert_mult=2),
                dict(type="soft_dynamic", dim=6, num_experts=2, expert_mult=2.5, geglu=True),
                dict(type="soft", dim=6, num_experts=3, num_slots=2, expert_mult=2),
                dict(type="soft", dim=6, num_experts=2, seq_len=9, expert_mult=3, geglu=True)):
        got = [(k, list(v.shape)) for k, v in build(cfg).state_dict().items()]
        check(got == spec_names(cfg), f"soft state_dict names/shapes/order: {cfg}", f"got {got}")
