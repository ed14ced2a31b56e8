"""Float64 PyTorch reference of the whole `moe train` transformer (tools/moe/lm.h).

A byte-level decoder-only MoE transformer: pre-norm blocks of causal self-attention with
rotary position embeddings (RoPE) and a libmoe MoE layer, as `moe train` trains it and
`moe eval` / `moe sample` run it. Our own code from the definition in tools/moe/lm.h and
tools/moe/attn.h; the MoE layers are the existing parity references (reference.py,
reference_router.py, reference_gshard.py, reference_soft.py), built from the layer config
in the checkpoint's metadata. run_parity_lm.py compares it with `moe eval --dump`.

Definition (B sequences of S bytes, T = B*S tokens, D model dim, NH heads, hd = D/NH,
V = 256, L blocks):
  x = emb[tok]                                                            (B, S, D)
  per block l:
    a   = RMSNorm(x, attn_norm.weight)
    q | k | v = a qkv.weight^T  (rows of qkv.weight: q, k, v, each D; head h owns
                columns h*hd .. h*hd+hd-1 of each)
    q, k rotated by RoPE, rotate-half pairs (i, i + hd/2) (GPT-NeoX / LLaMA):
                angle = pos * theta^(-2i/hd), i < hd/2, pos 0..S-1 within each sequence,
                computed in float64, cos and sin rounded to float32 (as attn.c);
                (u, w) -> (u cos - w sin, w cos + u sin)
    o   = softmax(q k^T / sqrt(hd) + causal mask) v, per sequence and head
    x   = x + o out.weight^T
    y, aux_l = MoE_l(RMSNorm(x, moe_norm.weight)),  x = x + y
  logits = RMSNorm(x, norm_f.weight) head.weight^T                        (B, S, V)
  aux = sum over blocks of aux_l (eval mode: no jitter, the eval capacity factor)
RMSNorm(x, g) = x / sqrt(mean(x^2) + 1e-5) * g. No biases outside the MoE layers.
Layers with groups (gshard, hierarchical, soft_dynamic, soft) see the T tokens, in
order, as T/N groups of N = config["group"] consecutive tokens; topk and dense layers
see all T tokens as one group (capacity per expert counts the whole batch).
Block l's layer config is the checkpoint's "layer" with seed + 1000003 * (l + 1); the
seed matters here only for the gshard/hierarchical random second policy, whose draws
also depend on the layer's forward count: load_checkpoint sets it from the metadata
"rng" (positions when saved); a caller reproducing a later forward adds the forwards
since (set_rng_calls / advance_rng).

state_dict (the checkpoint's parameter names; `moe inspect CKPT` lists them):
  emb.weight (256, D)
  blocks.{l}.attn_norm.weight (D)   blocks.{l}.attn.qkv.weight (3D, D)
  blocks.{l}.attn.out.weight (D, D) blocks.{l}.moe_norm.weight (D)
  blocks.{l}.moe.<name>             the layer's state_dict (buffers too, e.g.
                                    gate.e_score_correction_bias of a DeepSeek-V3 router)
  norm_f.weight (D)                 head.weight (256, D)
Checkpoints also hold optim.m.* / optim.v.* (AdamW moments): ignored.

Usage:
    import reference_lm as rl
    model, config = rl.load_checkpoint("runs/train/checkpoint.safetensors")  # float64, eval
    logits, aux = model(tokens)           # tokens (B, S) long -> (B, S, 256), scalar
    ce = rl.cross_entropy(logits, targets)  # (B, S) per-token
    model.knife_edges()                   # float32-fragile routing decisions of that forward
Mutation switches for tests: model.rope (False: no RoPE), model.rope_theta,
model.rope_pairs ("half" or "interleaved"), model.causal (False: no mask).
"""
import copy
import json
import math

import torch
import torch.nn as nn

import reference as ref
import reference_gshard as refg
import reference_router as rr
import reference_soft as rs
import stio

FORMAT = "libmoe-lm2"
VOCAB = 256
RMS_EPS = 1e-5
GROUPED = ("gshard", "hierarchical", "soft_dynamic", "soft")
LAYER_SEED_STRIDE = 1000003  # lm.c: block l's layer seed = seed + 1000003 * (l + 1)
MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------ pieces

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (LLaMA's; not reference_soft's)."""

    def __init__(self, dim, eps=RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rope_tables(S, hd, theta, dtype=torch.float64):
    """cos, sin (S, hd/2): angle pos * theta^(-2i/hd) in float64, rounded to float32 as
    libmoe rounds them, then cast to dtype."""
    i = torch.arange(hd // 2, dtype=torch.float64)
    freq = torch.pow(torch.tensor(float(theta), dtype=torch.float64), -2.0 * i / hd)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cos(ang).float().to(dtype), torch.sin(ang).float().to(dtype)


def apply_rope(x, cos, sin, pairs="half"):
    """x (B, S, NH, hd); cos, sin (S, hd/2). pairs "half": (i, i + hd/2) (libmoe's);
    "interleaved": (2i, 2i+1) (GPT-J's; only for the mutation checks)."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if pairs == "half":
        u, w = x.chunk(2, dim=-1)
        return torch.cat([u * c - w * s, w * c + u * s], dim=-1)
    u, w = x[..., 0::2], x[..., 1::2]
    return torch.stack([u * c - w * s, w * c + u * s], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; qkv (3D, D), out (D, D), no biases."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of an even size")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, rope=True, pairs="half", causal=True):
        B, S, D = x.shape
        NH = self.heads
        hd = D // NH
        q, k, v = (t.reshape(B, S, NH, hd) for t in self.qkv(x).split(D, dim=-1))
        if rope:
            q, k = apply_rope(q, cos, sin, pairs), apply_rope(k, cos, sin, pairs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # (B, NH, S, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)                   # (B, NH, S, S)
        if causal:
            above = torch.ones(S, S, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(above, -math.inf)
        o = torch.softmax(scores, dim=-1) @ v                              # (B, NH, S, hd)
        return self.out(o.transpose(1, 2).reshape(B, S, D))


# ------------------------------------------------------------------ the MoE layers

def block_seed(config, l):
    return (int(config["layer"].get("seed", "0")) + LAYER_SEED_STRIDE * (l + 1)) & MASK64


def router_config(y, D):
    """reference_router config of a checkpoint's topk layer config y."""
    c = dict(type="topk", num_experts=int(y["num_experts"]), input_dim=D, hidden_dim=int(y["hidden_dim"]),
             top_k=int(y["top_k"]), activation=y["activation"], expert=y["expert"],
             leaky_slope=float(y["leaky_slope"]))
    r = y.get("router")
    if r is None:  # checkpoints older than the router options: seed 004, dropless
        c["router"] = "topk"
        return c
    c.update(router=r["kind"], score=r["score"], normalize=bool(r["normalize"]),
             route_scale=float(r["route_scale"]), jitter=float(r["jitter"]),
             capacity_factor_train=float(y["capacity_factor_train"]),
             capacity_factor_eval=float(y["capacity_factor_eval"]),
             balance_coef=float(r["balance_coef"]), z_loss_coef=float(r["z_loss_coef"]),
             num_shared_experts=int(r["num_shared"]), shared_gate=bool(r["shared_gate"]),
             expert_bias=bool(r["expert_bias"]), bias_update_rate=float(r["bias_update_rate"]),
             num_groups=int(r["num_groups"]), topk_groups=int(r["topk_groups"]))
    return c


def soft_expert(D, h, geglu, dropout):
    """A soft layer's expert with an explicit hidden width h (the layer config's hidden_dim)."""
    return nn.Sequential(nn.Linear(D, 2 * h if geglu else h), rs.GEGLU() if geglu else nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(h, D))


def build_layer(config, l):
    """(module, kind) of block l's MoE layer from the checkpoint's model config."""
    y, D = config["layer"], int(config["dim"])
    kind = y["type"]
    if kind == "topk":
        return rr.build(router_config(y, D)), kind
    if kind == "dense":  # `moe train --layer dense`: Linear(D, D) experts (output_dim = D)
        return ref.build(dict(type="dense", num_experts=int(y["num_experts"]), input_dim=D, output_dim=D)), kind
    if kind in refg.TYPES:
        c = dict(type=kind, dim=D, activation=y["activation"], loss_coef=float(y["loss_coef"]),
                 seed=block_seed(config, l))
        c["num_experts"] = [int(y["num_experts"]), int(y["num_experts_inner"])] if kind == "hierarchical" \
            else int(y["num_experts"])
        if int(y["hidden_dim"]) > 0:
            c["hidden_dim"] = int(y["hidden_dim"])
        for k in refg.GATE_KEYS:
            c[k] = y[k] if k.startswith("second_policy") else float(y[k])
        return refg.build(c), kind
    if kind in rs.TYPES:
        geglu = y["expert"] == "geglu"
        if y["expert"] not in ("mlp", "geglu"):
            raise ValueError(f"soft layers take mlp or geglu experts, not {y['expert']!r}")
        c = dict(type=kind, dim=D, num_experts=int(y["num_experts"]), expert_mult=float(y["expert_mult"]),
                 dropout=float(y["dropout"]), geglu=geglu)
        if kind == "soft":
            c["slots_per_expert"] = int(y["slots_per_expert"])
        m = rs.build(c)
        h = int(y["hidden_dim"])
        if h > 0 and h != rs.hidden_dim(D, float(y["expert_mult"]), geglu):  # an explicit width
            experts = m.experts.experts if kind == "soft" else m.experts
            for i in range(len(experts)):
                experts[i] = soft_expert(D, h, geglu, float(y["dropout"]))
        return m, kind
    raise ValueError(f"unknown layer type {kind!r}")


def layer_gates(module, kind):
    """The Top2Gating modules of a gshard/hierarchical layer (their random streams)."""
    return refg.gates(module) if kind in refg.TYPES else []


class Block(nn.Module):
    def __init__(self, config, l):
        super().__init__()
        D = int(config["dim"])
        self.attn_norm = RMSNorm(D)
        self.attn = Attention(D, int(config["heads"]))
        self.moe_norm = RMSNorm(D)
        self.moe, self.kind = build_layer(config, l)
        self.group = int(config["group"])
        self.last_moe_input = None

    def run_moe(self, h):
        """h (B, S, D) -> (y (B, S, D), aux scalar)."""
        B, S, D = h.shape
        T = B * S
        x = h.reshape(T, D)
        if self.kind in GROUPED:
            N = self.group
            if T % N:
                raise ValueError(f"{T} tokens are not a multiple of the group size {N}")
            x = x.reshape(T // N, N, D)
        self.last_moe_input = x.detach()
        out = self.moe(x)
        y, aux = out if isinstance(out, tuple) else (out, None)
        if aux is None:
            aux = h.new_zeros(())
        return y.reshape(B, S, D), aux.reshape(())

    def forward(self, x, cos, sin, sw):
        x = x + self.attn(self.attn_norm(x), cos, sin, **sw)
        y, aux = self.run_moe(self.moe_norm(x))
        return x + y, aux


class MoETransformer(nn.Module):
    """The `moe train` model from its config (the checkpoint's "config" JSON, a dict or a
    string). forward(tokens (B, S) long) -> (logits (B, S, 256), aux scalar)."""

    def __init__(self, config):
        super().__init__()
        if isinstance(config, str):
            config = json.loads(config)
        self.config = config
        D, L = int(config["dim"]), int(config["blocks"])
        self.context = int(config["context"])
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(config, l) for l in range(L)])
        self.norm_f = RMSNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        # mutation switches (run_parity_lm.py shows the comparison notices each)
        self.rope, self.rope_theta, self.rope_pairs, self.causal = True, float(config["rope_theta"]), "half", True
        self.eval()

    def set_rng_calls(self, calls):
        """The forward count each block's layer draws its random second choices at (an int
        for every block or a list per block); only gshard/hierarchical layers use it."""
        calls = list(calls) if isinstance(calls, (list, tuple)) else [int(calls)] * len(self.blocks)
        for blk, c in zip(self.blocks, calls):
            for g in layer_gates(blk.moe, blk.kind):
                g.rng_calls = int(c)

    def advance_rng(self, n):
        for blk in self.blocks:
            for g in layer_gates(blk.moe, blk.kind):
                g.rng_calls += int(n)

    def rng_calls(self):
        return [layer_gates(b.moe, b.kind)[0].rng_calls if layer_gates(b.moe, b.kind) else None
                for b in self.blocks]

    def forward(self, tokens):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, S), got {list(tokens.shape)}")
        B, S = tokens.shape
        if S > self.context:
            raise ValueError(f"sequence length {S} > context {self.context}")
        x = self.emb(tokens.long())
        hd = x.shape[-1] // self.blocks[0].attn.heads
        cos, sin = rope_tables(S, hd, self.rope_theta, x.dtype)
        sw = dict(rope=self.rope, pairs=self.rope_pairs, causal=self.causal)
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, a = blk(x, cos, sin, sw)
            aux = aux + a
        return self.head(self.norm_f(x)), aux

    def knife_edges(self, margin=1e-4):
        """Routing decisions of the last forward that float32 could take differently
        (reference_router / reference_gshard knife_edges of each block's layer on its
        input): a list of strings, empty when every decision is safe."""
        why = []
        for l, blk in enumerate(self.blocks):
            x = blk.last_moe_input
            if x is None:
                continue
            if blk.kind == "topk":
                found = rr.knife_edges(blk.moe, x, self.training, margin)
            elif blk.kind in refg.TYPES:
                found = refg.knife_edges(blk.moe, x, self.training, margin)
            else:
                found = []  # dense and soft layers make no discrete decisions
            why += [f"block {l}: {w}" for w in found]
        return why


def cross_entropy(logits, targets):
    """Per-token cross-entropy (B, S) of logits (B, S, V) against targets (B, S)."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------ checkpoints

def model_tensors(path):
    """The checkpoint's tensors without the optimizer's (optim.*)."""
    return {k: v for k, v in stio.load(path).items() if not k.startswith("optim.")}


def table_problems(tensors, model):
    """Differences between a checkpoint's tensor table and the model's state_dict
    (names and shapes): a list of strings, empty when they match exactly."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"missing {k} {list(want[k])}" for k in want if k not in have]
    problems += [f"unexpected {k} {list(have[k])}" for k in have if k not in want]
    problems += [f"{k} has shape {list(have[k])}, the module {list(want[k])}" for k in want
                 if k in have and have[k] != want[k]]
    return problems


def load_checkpoint(path, dtype=torch.float64):
    """(model, config) of a `moe train` checkpoint: the model in eval mode, in dtype
    (float64 by default), its parameters and buffers loaded with strict checking of names
    and shapes (optim.* ignored), its layers' random streams at the saved positions."""
    meta = stio.load_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, want {FORMAT!r}")
    config = json.loads(meta["config"])
    model = MoETransformer(config)
    tensors = model_tensors(path)
    bad = table_problems(tensors, model)
    if bad:
        raise ValueError(f"{path}: the tensors do not match the model: " + "; ".join(bad))
    model.load_state_dict(tensors, strict=True)
    if meta.get("rng"):
        model.set_rng_calls([int(v) for v in meta["rng"].split(",")])
    return model.to(dtype).eval(), config


def save_checkpoint(path, model, rng=None, optim=True, train=None):
    """Write a checkpoint as `moe train` lays it out (for the torch-only self-test):
    parameters, optim.m/v zeros of every parameter, buffers, and the metadata."""
    sd = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    out = {}
    for k, v in sd.items():
        if k in params:
            out[k] = v.float()
            if optim:
                out["optim.m." + k] = torch.zeros_like(v, dtype=torch.float32)
                out["optim.v." + k] = torch.zeros_like(v, dtype=torch.float32)
    out.update({k: v.float() for k, v in sd.items() if k not in params})
    L = len(model.blocks)
    meta = {"format": FORMAT, "config": json.dumps(model.config), "step": "0", "optim.steps": "0",
            "train": json.dumps(train or {}),
            "rng": ",".join(str(v) for v in (rng if rng is not None else [0] * L))}
    stio.save(path, out, meta)


def copy_model(model, dtype=None):
    m = copy.deepcopy(model)
    return m if dtype is None else m.to(dtype)
