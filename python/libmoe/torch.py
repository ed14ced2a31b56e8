"""PyTorch modules backed by libmoe (import libmoe.torch).

Each module owns one C layer (libmoe.Layer, the attribute .layer). Its parameters and
buffers are torch tensors over the C layer's own memory (torch.from_numpy of the
views, no copies): an optimizer stepping them in place, or load_state_dict, changes
what the C forward reads. state_dict names and shapes are the seed modules' (libmoe's
parameter table names), so state_dicts move between these modules and the PyTorch
ones both ways.

Autograd: one torch.autograd.Function per forward whose inputs are x and every
parameter. Its backward runs the C backward with grad_output (and the aux loss's
gradient as daux) and returns dx. The parameter gradients: when every .grad is None
or already the C gradient block's view and no hook is registered on a parameter, the
C backward accumulates straight into that block and the views become .grad (no copy;
accumulation over backwards and optimizer.zero_grad(set_to_none=True or False) behave
as for any torch module). Otherwise (a .grad replaced by another tensor, gradient
hooks) the backward zeroes the block and returns copies, which autograd accumulates.

Modes: module.training -> MOE_TRAIN / MOE_EVAL; torch.no_grad() (or nothing requiring
a gradient) -> MOE_NO_GRAD (nothing kept for backward).

Limits: CPU only; parameters stay float32 (module.double()/.half()/.cuda() would
replace them and break the sharing: the next forward raises). Inputs of other
floating dtypes are cast to float32 (differentiably) and the outputs cast back.
One backward per forward: a second forward of the same module before the backward
of the first invalidates the first (the C layer keeps one forward's cache); its
backward then raises. A module cannot be pickled; copy.deepcopy makes a new C layer.
"""
import copy
import ctypes
import math

import numpy as np
import torch
import torch.nn as nn

from . import MOE_EVAL, MOE_NO_GRAD, MOE_TRAIN, Layer, MoEError

__all__ = ["MoELayer", "SimpleMoE", "BasicMoE", "MoE", "HeirarchicalMoE", "HierarchicalMoE",
           "DynamicSlotsSoftMoE", "SoftMoE", "MoEError"]


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, param_expert, kind, dims, yshape, flags, x, mask, *params):
        y = torch.empty(yshape, dtype=torch.float32)
        maddr = mask.data_ptr() if mask is not None else 0
        aux = layer.forward_raw(y.data_ptr(), x.data_ptr(), maddr, kind, dims, flags, (tuple(x.shape), tuple(yshape)))
        ctx.layer, ctx.count, ctx.xshape = layer, layer.forward_count, tuple(x.shape)
        ctx.yshape = tuple(yshape)
        ctx.param_expert = param_expert
        ctx.params = params  # the leaf Parameters: the backward may hand them the C gradients
        return y, torch.tensor(aux, dtype=torch.float32)

    @staticmethod
    def backward(ctx, gy, gaux):
        layer = ctx.layer
        if layer.forward_count != ctx.count:
            raise RuntimeError(
                "libmoe: this backward belongs to an earlier forward of the same libmoe module; a later "
                f"forward (forward {layer.forward_count}, this one was {ctx.count}) replaced the cached "
                "activations the C backward needs. Run backward before the next forward of a module.")
        if gy is None:
            gy = torch.zeros(ctx.yshape, dtype=torch.float32)
        dy = gy.to(torch.float32).contiguous()
        daux = float(gaux) if gaux is not None else 0.0
        need = ctx.needs_input_grad
        dx = torch.empty(ctx.xshape, dtype=torch.float32) if need[6] else None
        names, params = layer.param_names, ctx.params
        views = layer.grad_tensors()
        # as in PyTorch's top-k modules, an expert that processed no token gets no gradient
        # (None, not zeros: AdamW and momentum then leave it alone)
        idle = set()
        if any(e is not None for e in ctx.param_expert):
            counts = layer.stats()["expert_counts"]
            idle = {e for e in range(len(counts)) if counts[e] == 0}
        # Zero copy: where every parameter's .grad is None or already the C gradient
        # block's view and no gradient hook is registered, the C backward accumulates
        # (+=) straight into the C block and that block becomes .grad: PyTorch's
        # accumulation without copying 4 bytes per parameter twice every backward
        # (README: "Speed"). Otherwise the gradients go through autograd as copies.
        fast = all((p.grad is None or p.grad.data_ptr() == views[n].data_ptr()) and not p._backward_hooks
                   for p, n in zip(params, names))
        if fast:
            for p, n in zip(params, names):
                if p.grad is None:
                    views[n].zero_()
            layer.backward_raw(dx.data_ptr() if dx is not None else 0, dy.data_ptr(), daux)
            for i, (p, n) in enumerate(zip(params, names)):
                if need[8 + i] and p.grad is None and ctx.param_expert[i] not in idle:
                    p.grad = views[n]
            return (None, None, None, None, None, None, dx, None, *([None] * len(params)))
        # copy path: the .grad that are the block's views keep what they hold (saved,
        # restored), the block takes this backward alone, and autograd adds the copies
        kept = {n: views[n].clone() for p, n in zip(params, names)
                if p.grad is not None and p.grad.data_ptr() == views[n].data_ptr()}
        layer.zero_grad()
        layer.backward_raw(dx.data_ptr() if dx is not None else 0, dy.data_ptr(), daux)
        grads = [views[n].clone() if need[8 + i] and ctx.param_expert[i] not in idle
                 else None for i, n in enumerate(names)]
        for n, v in kept.items():
            views[n].copy_(v)
        return (None, None, None, None, None, None, dx, None, *grads)


class _Container(nn.Module):
    """A parameter holder mirroring the seed module's tree; m.experts[0] and len() work
    as on nn.ModuleList / nn.Sequential. It has no forward: the C layer computes."""

    def __getitem__(self, i):
        return self._modules[str(i)]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class MoELayer(nn.Module):
    """Any libmoe layer from its config dict (the JSON keys of `moe forward`).

    forward(x, mask=None) -> (y, aux_loss): x (T, D) one group, (B, N, D) B groups,
    (B, D, h, w) images (soft layers); mask (B, N) / (B, h, w) marks real tokens (soft)."""

    def __init__(self, config):
        super().__init__()
        self._attach(Layer(config))

    # ------------------------------------------------------------ plumbing
    def _attach(self, layer):
        self.layer = layer
        # state_dict order: libmoe's parameter table, each buffer after its module's parameters
        order = list(layer.param_names)
        for b in layer.buffers:
            pre = b.rsplit(".", 1)[0] + "." if "." in b else ""
            last = max((i for i, n in enumerate(order) if n.startswith(pre) and n.count(".") == b.count(".")),
                       default=len(order) - 1)
            order.insert(last + 1, b)
        self._order = order
        self._moe_params = []
        for name in layer.param_names:
            owner, leaf = self._owner(name)
            p = nn.Parameter(torch.from_numpy(layer.params[name]))
            owner.register_parameter(leaf, p)
            self._moe_params.append(p)
        for name, view in layer.buffers.items():
            owner, leaf = self._owner(name)
            owner.register_buffer(leaf, torch.from_numpy(view))
        self._addrs = [int(layer.params[n].ctypes.data) for n in layer.param_names]
        # topk: the routed expert each parameter belongs to (None: gate, shared experts)
        topk = layer.config.get("type") == "topk"
        self._param_expert = tuple(int(n.split(".")[1]) if topk and n.startswith("experts.") else None
                                   for n in layer.param_names)

    def _owner(self, name):
        parts = name.split(".")
        mod = self
        for part in parts[:-1]:
            child = mod._modules.get(part)
            if child is None:
                child = _Container()
                mod.add_module(part, child)
            mod = child
        return mod, parts[-1]

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        layer = Layer(self.layer.config)
        for n in self.layer.params:
            layer.params[n][...] = self.layer.params[n]
        for n in self.layer.buffers:
            layer.buffers[n][...] = self.layer.buffers[n]
        layer.rng_position = self.layer.rng_position
        new._attach(layer)
        skip = {"_parameters", "_buffers", "_modules", "layer", "_order", "_moe_params", "_addrs", "_param_expert"}
        for k, v in self.__dict__.items():
            if k not in skip and k not in new.__dict__:
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.training = self.training
        for p, q in zip(self._moe_params, new._moe_params):
            q.requires_grad_(p.requires_grad)
            if p.grad is not None:
                q.grad = p.grad.clone()
        new.train(self.training)
        memo[id(self)] = new
        return new

    def __getstate__(self):
        raise TypeError("libmoe modules cannot be pickled (they own C memory); save the state_dict")

    def state_dict(self, *args, **kwargs):
        """The state_dict, in libmoe's parameter order when called on this module itself."""
        sd = super().state_dict(*args, **kwargs)
        top = not args and kwargs.get("destination") is None and not kwargs.get("prefix")
        if not top:
            return sd
        out = type(sd)((k, sd[k]) for k in self._order if k in sd)
        out.update((k, v) for k, v in sd.items() if k not in out)
        if hasattr(sd, "_metadata"):
            out._metadata = sd._metadata
        return out

    def _check_shared(self):
        for p, addr, name in zip(self._moe_params, self._addrs, self.layer.param_names):
            if p.data_ptr() != addr or p.dtype != torch.float32 or p.device.type != "cpu":
                raise RuntimeError(
                    f"libmoe: parameter {name} no longer shares memory with the C layer ({p.dtype} on "
                    f"{p.device}); libmoe modules are float32 on the CPU: do not .double(), .half() or "
                    ".cuda() them, or replace p.data")

    def _run(self, x, mask=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"libmoe: x must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise RuntimeError(f"libmoe: x is on {x.device}; libmoe runs on the CPU only")
        if not x.is_floating_point():
            raise TypeError(f"libmoe: x must be a floating-point tensor, got {x.dtype}")
        self._check_shared()
        layer = self.layer
        kind, dims, yshape = layer.layout(x.shape)
        m = None
        if mask is not None:
            mask = torch.as_tensor(mask)
            want = dims[0] * (dims[1] if kind == "seq" else dims[1] * dims[2])
            if mask.numel() != want or mask.dim() < 1 or mask.shape[0] != dims[0]:
                raise MoEError("MOE_ERR_SHAPE", f"mask has shape {tuple(mask.shape)}, expected "
                                                f"({dims[0]}, {want // max(dims[0], 1)}) for x {tuple(x.shape)}")
            m = (mask != 0).to(torch.uint8).contiguous()
        x32 = x if x.dtype == torch.float32 else x.to(torch.float32)
        x32c = x32.contiguous()
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._moe_params))
        flags = (MOE_TRAIN if self.training else MOE_EVAL) | (0 if grad else MOE_NO_GRAD)
        y, aux = _MoEFunction.apply(layer, self._param_expert, kind, dims, yshape, flags, x32c, m, *self._moe_params)
        if x.dtype != torch.float32:
            y, aux = y.to(x.dtype), aux.to(x.dtype)
        return y, aux

    # ------------------------------------------------------------ API
    def forward(self, x, mask=None):
        return self._run(x, mask)

    def stats(self):
        """Routing statistics of the latest forward (libmoe.Layer.stats)."""
        return self.layer.stats()

    def update_bias(self):
        """DeepSeek-V3 selection-bias update; call after each optimizer step (no-op otherwise)."""
        self.layer.update_bias()

    def load(self, path):
        """Load a safetensors file into the shared parameters."""
        self.layer.load(path)

    def save(self, path):
        self.layer.save(path)

    def extra_repr(self):
        return f"libmoe {self.layer.config}"


def _opts(**kw):
    return {k: v for k, v in kw.items() if v is not None}


class SimpleMoE(MoELayer):
    """Seed 004: SimpleMoE(num_experts, input_dim, hidden_dim, top_k, **router_options);
    forward(x (T, D) or (B, N, D)) -> y. router_options are libmoe's topk JSON keys
    (router="mixtral", balance_coef=0.01, activation, expert, seed, ...). With a balance or
    z-loss, the aux loss of the latest forward is self.aux_loss (in the autograd graph)."""

    def __init__(self, num_experts=4, input_dim=64, hidden_dim=128, top_k=2, **router_options):
        cfg = {"type": "topk", "num_experts": num_experts, "input_dim": input_dim,
               "hidden_dim": hidden_dim, "top_k": top_k}
        cfg.update(router_options)
        super().__init__(cfg)
        self.aux_loss = None

    def forward(self, x):
        y, aux = self._run(x)
        self.aux_loss = aux
        return y


class BasicMoE(MoELayer):
    """Seed 002: BasicMoE(input_dim, output_dim, num_experts); forward(x (B, D)) -> y (B, O),
    the per-row mixture (README "Layers": the seed's batch-mixing matmul is not reproduced)."""

    def __init__(self, input_dim=64, output_dim=64, num_experts=4, seed=None):
        super().__init__(_opts(type="dense", input_dim=input_dim, output_dim=output_dim,
                               num_experts=num_experts, seed=seed))

    def forward(self, x):
        return self._run(x)[0]


_ACTS = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu"}


def _activation(act):
    if isinstance(act, str):
        return act
    if isinstance(act, nn.Module):
        act = type(act)
    if act in _ACTS:
        return _ACTS[act]
    raise ValueError(f"libmoe: activation {act!r} not supported (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU "
                     "or their names)")


class MoE(MoELayer):
    """Seeds 000/001 GShard MoE: forward(x (B, N, D) or (N, D)) -> (y, aux_loss).
    seed (keyword) keys libmoe's init and the random second policy's draws."""

    _type = "gshard"

    def __init__(self, dim, num_experts=16, hidden_dim=None, activation=nn.ReLU, second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2, second_threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2., loss_coef=1e-2, experts=None, seed=None):
        if experts is not None:
            raise NotImplementedError("libmoe: custom experts modules are not supported (experts=None)")
        ne = list(num_experts) if isinstance(num_experts, (tuple, list)) else num_experts
        super().__init__(_opts(type=self._type, dim=dim, num_experts=ne, hidden_dim=hidden_dim,
                               activation=_activation(activation), second_policy_train=second_policy_train,
                               second_policy_eval=second_policy_eval,
                               second_threshold_train=second_threshold_train,
                               second_threshold_eval=second_threshold_eval,
                               capacity_factor_train=capacity_factor_train,
                               capacity_factor_eval=capacity_factor_eval, loss_coef=loss_coef, seed=seed))
        self.num_experts, self.loss_coef = num_experts, loss_coef

    def forward(self, x):
        return self._run(x)


class HeirarchicalMoE(MoE):
    """Seeds 000/001 two-level MoE (seed spelling); num_experts = (outer, inner)."""

    _type = "hierarchical"

    def __init__(self, dim, num_experts=(4, 4), hidden_dim=None, activation=nn.ReLU, **kwargs):
        if len(num_experts) != 2:
            raise ValueError("only 2 levels of hierarchy (num_experts = (outer, inner))")
        super().__init__(dim, tuple(num_experts), hidden_dim, activation, **kwargs)
        self.num_experts_outer, self.num_experts_inner = num_experts


HierarchicalMoE = HeirarchicalMoE


class DynamicSlotsSoftMoE(MoELayer):
    """Seed 003: forward(x, mask=None) -> y; x (B, N, D), (N, D) or an image (B, D, h, w)."""

    def __init__(self, dim, num_experts=4, expert_mult=4, dropout=0., geglu=False, seed=None):
        super().__init__(_opts(type="soft_dynamic", dim=dim, num_experts=num_experts, expert_mult=expert_mult,
                               dropout=dropout, geglu=bool(geglu), seed=seed))
        self.dim, self.num_experts = dim, num_experts

    def forward(self, x, mask=None):
        return self._run(x, mask)[0]


class SoftMoE(MoELayer):
    """Soft MoE with learned slots (E, S, D) (tests/parity/reference_soft.py's SoftMoE);
    num_slots S per expert, or seq_len (S = seq_len // num_experts)."""

    def __init__(self, dim, num_experts=4, num_slots=None, expert_mult=4, dropout=0., geglu=False,
                 seq_len=None, seed=None):
        if num_slots is not None and seq_len is not None:
            raise ValueError("give num_slots or seq_len, not both")
        super().__init__(_opts(type="soft", dim=dim, num_experts=num_experts, num_slots=num_slots,
                               seq_len=seq_len, expert_mult=expert_mult, dropout=dropout, geglu=bool(geglu),
                               seed=seed))
        self.dim, self.num_experts = dim, num_experts
        self.slots = self.layer.params["slot_embeds"].shape[1]

    def forward(self, x, mask=None):
        return self._run(x, mask)[0]
