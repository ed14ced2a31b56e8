"""PyTorch reference layers for libmoe's parity tests (DESIGN.md section 4).

Written from the seeds' descriptions (002 BasicMoE -> DenseMoE, 004 SimpleMoE ->
TopKMoE); state_dict names and shapes are the seeds', so a state_dict saved as
safetensors is exactly what libmoe loads:

  topk : experts.{i}.net.0.weight (H,D) [(2H,D) for GLU experts], experts.{i}.net.0.bias,
         experts.{i}.net.2.weight (D,H), experts.{i}.net.2.bias (D), gate.weight (E,D), gate.bias (E)
  dense: experts.{i}.weight (O,D), experts.{i}.bias (O), gate.weight (E,D), gate.bias (E)

Experts are registered before the gate (as in the seeds), so state_dict order is
experts.* then gate.*.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedUnit(nn.Module):
    """GLU activation: split the last dim into halves a (first) and g (second),
    return a * act(g) with act = silu (SwiGLU) or exact-erf gelu (GeGLU)."""

    def __init__(self, kind):
        super().__init__()
        if kind not in ("swiglu", "geglu"):
            raise ValueError(f"unknown GLU kind {kind!r}")
        self.kind = kind

    def forward(self, h):
        a, g = h.chunk(2, dim=-1)
        return a * (F.silu(g) if self.kind == "swiglu" else F.gelu(g))


def make_activation(name, leaky_slope=0.01):
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()  # exact (erf) form, torch's default
    if name == "silu":
        return nn.SiLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_slope)
    raise ValueError(f"unknown activation {name!r}")


class Expert(nn.Module):
    """Two-layer FFN, net = Sequential(Linear(D, H or 2H), act, Linear(H, D))."""

    def __init__(self, input_dim, hidden_dim, activation="relu", expert="mlp", leaky_slope=0.01):
        super().__init__()
        if expert == "mlp":
            first, act = nn.Linear(input_dim, hidden_dim), make_activation(activation, leaky_slope)
        else:  # GLU experts: one Linear producing both halves [a | g]
            first, act = nn.Linear(input_dim, 2 * hidden_dim), GatedUnit(expert)
        self.net = nn.Sequential(first, act, nn.Linear(hidden_dim, input_dim))

    def forward(self, x):
        return self.net(x)


class Fp32Gate(nn.Module):
    """A gate that runs in float32 under torch.autocast, as MoE code runs routers
    (libmoe's bf16 mode keeps its router fp32): for the bf16 parity and benchmarks."""

    def __init__(self, gate):
        super().__init__()
        self.inner = gate

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.inner(x.float())


class TopKMoE(nn.Module):
    """Seed 004 SimpleMoE: top-k gate, softmax over the k selected logits only,
    each expert runs only on the rows routed to it, outputs combined by weight."""

    def __init__(self, num_experts=4, input_dim=64, hidden_dim=128, top_k=2,
                 activation="relu", expert="mlp", leaky_slope=0.01):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k = {top_k} must be in [1, num_experts = {num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.experts = nn.ModuleList(
            [Expert(input_dim, hidden_dim, activation, expert, leaky_slope) for _ in range(num_experts)])
        self.gate = nn.Linear(input_dim, num_experts)

    def forward(self, x):  # x (T, D) -> (T, D)
        logits = self.gate(x)                                   # (T, E)
        top_vals, top_idx = torch.topk(logits, self.top_k, dim=-1)  # (T, K), sorted
        weights = F.softmax(top_vals, dim=-1)                   # (T, K)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # (token, slot) pairs that chose expert e; a token picks e at most once.
            tok, slot = torch.nonzero(top_idx == e, as_tuple=True)
            if tok.numel() == 0:
                continue  # expert unused: its parameters get no gradient (.grad None)
            y_e = expert(x[tok]) * weights[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, y_e)
        return out


class DenseMoE(nn.Module):
    """Seed 002 BasicMoE: every expert is Linear(D, O), softmax gate over all E.

    Implements the INTENDED per-row mixture
        y[b] = sum_e softmax(gate(x))[b, e] * expert_e(x[b]).
    The seed's forward computes something else; see seed_broadcast_output()."""

    def __init__(self, num_experts=4, input_dim=64, output_dim=64):
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList([nn.Linear(input_dim, output_dim) for _ in range(num_experts)])
        self.gate = nn.Linear(input_dim, num_experts)

    def expert_outputs(self, x):  # (B, E, O)
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def forward(self, x):  # x (B, D) -> (B, O)
        g = F.softmax(self.gate(x), dim=-1)                      # (B, E)
        return (g.unsqueeze(-1) * self.expert_outputs(x)).sum(dim=1)


def seed_broadcast_output(model, x):
    """What seed 002's forward actually returns for a DenseMoE `model`.

    The seed does `gate_outputs @ expert_outputs` with gate_outputs (B, E) and
    expert_outputs (B, E, O). torch.matmul treats the 2-D left operand as one
    matrix broadcast over the batch of the right one, giving (B, B, O) with
        r[b, b', o] = sum_e g[b', e] * out[b, e, o],
    and the seed's sum(dim=1) then sums over b':
        y[b] = sum_e (sum_b' g[b', e]) * expert_e(x[b]).
    So every row is mixed with the gate weights of the WHOLE batch summed, not
    its own: rows influence each other and the weights no longer sum to 1 (they
    sum to B). For B == 1 it equals the intended mixture. libmoe implements the
    intended per-row sum (DenseMoE.forward); this function exists only to
    document and test the difference.
    """
    g = F.softmax(model.gate(x), dim=-1)     # (B, E)
    r = torch.matmul(g, model.expert_outputs(x))  # (B, E) @ (B, E, O) -> (B, B, O)
    return r.sum(dim=1)


# Constructor arguments each layer type accepts from a config dict.
TOPK_KEYS = ("num_experts", "input_dim", "hidden_dim", "top_k", "activation", "expert", "leaky_slope")
DENSE_KEYS = ("num_experts", "input_dim", "output_dim")


def build(config):
    """Module from a libmoe layer config dict {"type": "topk"|"dense", ...}.
    Missing keys take the seed module's defaults; "seed" is ignored here (the
    caller seeds torch); any other unknown key is an error, as in libmoe."""
    kind = config.get("type")
    keys, cls = {"topk": (TOPK_KEYS, TopKMoE), "dense": (DENSE_KEYS, DenseMoE)}.get(kind, (None, None))
    if cls is None:
        raise ValueError(f"config type must be 'topk' or 'dense', got {kind!r}")
    unknown = set(config) - set(keys) - {"type", "seed"}
    if unknown:
        raise ValueError(f"unknown config keys for {kind}: {sorted(unknown)}")
    return cls(**{k: config[k] for k in keys if k in config})


def output_dim(module):
    """Width of the layer's output rows (D for topk, O for dense)."""
    if isinstance(module, TopKMoE):
        return module.gate.in_features
    return module.experts[0].out_features
