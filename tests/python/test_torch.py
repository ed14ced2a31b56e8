#!/usr/bin/python3
"""Tests of the Python package python/libmoe (ctypes bindings, numpy Layer, libmoe.torch
modules) against the float64 PyTorch references of tests/parity.

For every layer type, on random small configurations, in train and eval mode: our
module's y, aux loss, dx and every parameter gradient (autograd through libmoe.torch,
float32) against the reference module (float64 autograd on the same float32 weights,
loaded with load_state_dict from ours) within |ours - ref| <= 1e-5 + 1e-4 |ref|; masks and
images for the soft layers; load_state_dict both ways; gradient accumulation and
zero_grad(set_to_none); no_grad; the forward-counter error; dtype and layout handling;
errors carrying the C message; save/load; and a small Linear -> SimpleMoE -> Linear model
trained 50 AdamW steps with the same losses as the model with the reference module.

Run: /usr/bin/python3 tests/python/test_torch.py [-v]   (after `make`; needs python3-torch)
Ends with "python: N passed, N failed"; exits 1 on any failure (torch missing: a failure).
"""
import copy
import math
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VERBOSE = "-v" in sys.argv

try:
    import numpy as np
    import torch
    import torch.nn as nn
except ImportError as exc:  # must fail, not skip
    print(f"python3-torch and python3-numpy are required: apt-get install python3-torch python3-numpy ({exc})")
    print("python: 0 passed, 1 failed")
    sys.exit(1)

if not os.environ.get("MOE_PY_INSTALLED"):  # make test-torch2: the package pip installed
    sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests" / "parity"))
import libmoe  # noqa: E402
import libmoe.torch as lt  # noqa: E402
from libmoe import _lib  # noqa: E402
import reference as ref  # noqa: E402
import reference_gshard as rg  # noqa: E402
import reference_router as rr  # noqa: E402
import reference_soft as rs  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
torch.set_num_threads(1)


class Tally:
    def __init__(self):
        self.passed = self.failed = 0
        self.max_rel = 0.0   # max over elements of |d| / (ATOL + RTOL |ref|), 1 = the tolerance
        self.max_abs = 0.0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            if VERBOSE:
                print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""))


T = Tally()


def close(name, ours, want, what):
    """Check ours (float32) against want (float64) elementwise."""
    a = ours.detach().double()
    b = want.detach().double()
    if a.shape != b.shape:
        T.check(False, f"{what}: {name}", f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
        return
    d = (a - b).abs()
    ratio = float((d / (ATOL + RTOL * b.abs())).max()) if d.numel() else 0.0
    T.max_rel = max(T.max_rel, ratio)
    T.max_abs = max(T.max_abs, float(d.max()) if d.numel() else 0.0)
    T.check(ratio <= 1.0 and bool(torch.isfinite(a).all()), f"{what}: {name}",
            f"max |d| {float(d.max()):.3g}, {ratio:.3g} x the tolerance")


def run_ours(mod, x, dy, daux, mask=None, aux_attr=False):
    """y, aux, dx, grads of sum(y*dy) + daux*aux through libmoe.torch."""
    for p in mod.parameters():
        p.grad = None
    xx = x.clone().requires_grad_()
    if aux_attr:
        y = mod(xx)
        aux = mod.aux_loss
    else:
        out = mod(xx, mask) if mask is not None else mod(xx)
        y, aux = out if isinstance(out, tuple) else (out, None)
    loss = (y * dy).sum() + (daux * aux if aux is not None else 0.0)
    loss.backward()
    g = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in mod.named_parameters()}
    return y, aux, xx.grad, g


def run_ref(model, x, dy, daux, mask=None):
    m = model
    for p in m.parameters():
        p.grad = None
    xx = x.double().clone().requires_grad_()
    out = m(xx, mask) if mask is not None else m(xx)
    y, aux = out if isinstance(out, tuple) else (out, None)
    loss = (y * dy.double()).sum() + (daux * aux if aux is not None else 0.0)
    loss.backward()
    g = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}
    return y, aux, xx.grad, g


def compare_all(ours, want, what, has_aux):
    y, aux, dx, g = ours
    ry, raux, rdx, rg_ = want
    close("y", y, ry, what)
    if has_aux:
        T.check(aux is not None and raux is not None, f"{what}: aux present")
        if aux is not None and raux is not None:
            close("aux", aux.reshape(()), raux.reshape(()), what)
    close("dx", dx, rdx, what)
    T.check(set(g) == set(rg_), f"{what}: same parameter names", f"{sorted(set(g) ^ set(rg_))}")
    for n in g:
        if n in rg_:
            close("grad." + n, g[n], rg_[n], what)


def to_ref(ours, refmod):
    """ours -> reference via load_state_dict (strict), the reference then float64."""
    refmod.load_state_dict(ours.state_dict())
    return refmod.double()


# ------------------------------------------------------------------ topk and dense

def test_topk():
    gen = torch.Generator().manual_seed(1)
    for i, (E, D, H, K, act) in enumerate([(4, 8, 16, 2, "relu"), (5, 6, 12, 1, "gelu"), (3, 8, 8, 3, "silu")]):
        for train in (True, False):
            ours = lt.SimpleMoE(E, D, H, K, activation=act, seed=10 + i).train(train)
            r = to_ref(ours, ref.TopKMoE(E, D, H, K, activation=act)).train(train)
            cfg = {"type": "topk", "num_experts": E, "input_dim": D, "hidden_dim": H, "top_k": K, "activation": act}
            x = draw_topk(rr.build(cfg), (13, D), train, gen)
            dy = torch.randn(13, D, generator=gen)
            what = f"SimpleMoE({E},{D},{H},{K},{act}) {'train' if train else 'eval'}"
            compare_all(run_ours(ours, x, dy, 0.0), run_ref(r, x, dy, 0.0), what, False)


def draw_topk(model, shape, train, gen):
    model.load_state_dict(model.state_dict())
    for _ in range(100):
        x = torch.randn(shape, generator=gen)
        if not rr.knife_edges(model, x, train):
            return x
    raise RuntimeError("no knife-edge-free input")


def test_router():
    gen = torch.Generator().manual_seed(2)
    cases = [dict(router="mixtral", balance_coef=0.05),
             dict(router="st_moe"),                        # capacity, balance and z-loss
             dict(router="deepseek_v3", num_shared_experts=1, shared_gate=True),
             dict(score="softmax", normalize=True, z_loss_coef=1e-2, capacity_factor=1.0)]
    for i, opts in enumerate(cases):
        for train in (True, False):
            ours = lt.SimpleMoE(4, 8, 12, 2, seed=20 + i, **opts).train(train)
            if "expert_bias" in dict(ours.named_buffers()) or any("bias" in n for n, _ in ours.named_buffers()):
                with torch.no_grad():
                    for _, b in ours.named_buffers():
                        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            cfg = {"type": "topk", "num_experts": 4, "input_dim": 8, "hidden_dim": 12, "top_k": 2, **opts}
            r = rr.build(cfg)
            r.load_state_dict(ours.state_dict())
            r = r.double().train(train)
            x = draw_topk(r, (2, 7, 8), train, gen)
            dy = torch.randn(2, 7, 8, generator=gen)
            what = f"SimpleMoE router {opts} {'train' if train else 'eval'}"
            has_aux = ours.layer.has_aux_loss
            got = run_ours(ours, x, dy, 0.7, aux_attr=True)
            compare_all(got, run_ref(r, x, dy, 0.7), what, has_aux)
            st = ours.stats()
            T.check(np.array_equal(st["expert_counts"], r.stats["expert_counts"].numpy())
                    and st["dropped"] == r.stats["dropped"], f"{what}: stats expert_counts and dropped",
                    f"{st['expert_counts']} vs {r.stats['expert_counts'].tolist()}")


def test_dense():
    gen = torch.Generator().manual_seed(3)
    for i, (D, O, E) in enumerate([(8, 6, 3), (5, 5, 1), (16, 4, 6)]):
        for train in (True, False):
            ours = lt.BasicMoE(D, O, E, seed=30 + i).train(train)
            r = to_ref(ours, ref.DenseMoE(E, D, O)).train(train)
            x = torch.randn(9, D, generator=gen)
            dy = torch.randn(9, O, generator=gen)
            what = f"BasicMoE({D},{O},{E}) {'train' if train else 'eval'}"
            compare_all(run_ours(ours, x, dy, 0.0), run_ref(r, x, dy, 0.0), what, False)


# ------------------------------------------------------------------ gshard and hierarchical

def test_gshard():
    gen = torch.Generator().manual_seed(4)
    cases = [(lt.MoE, "gshard", dict(dim=8, num_experts=4, hidden_dim=16)),
             (lt.MoE, "gshard", dict(dim=6, num_experts=3, activation=nn.GELU, second_policy_train="threshold",
                                     second_policy_eval="all", capacity_factor_train=1.0)),
             (lt.HeirarchicalMoE, "hierarchical", dict(dim=8, num_experts=(2, 3), hidden_dim=12)),
             (lt.HierarchicalMoE, "hierarchical", dict(dim=6, num_experts=(3, 2), hidden_dim=8,
                                                       second_policy_train="threshold",
                                                       second_policy_eval="none", loss_coef=0.1))]
    for i, (cls, kind, kw) in enumerate(cases):
        seed = 40 + i
        ours = cls(seed=seed, **kw)
        rcfg = {"type": kind, "seed": seed, **kw}
        if "activation" in rcfg:
            rcfg["activation"] = lt._activation(rcfg["activation"])
        r = rg.build(rcfg)
        r.load_state_dict(ours.state_dict())
        r = r.double()
        for step, train in enumerate((True, False, True)):  # 3 forwards: the random draws move on
            ours.train(train)
            r.train(train)
            for g in rg.gates(r):
                g.rng_calls = ours.layer.rng_position
            x = rg.draw_input(r, 2, 10, 1.5, train, gen)
            dy = torch.randn(2, 10, kw["dim"], generator=gen)
            what = f"{cls.__name__}({kw}) {'train' if train else 'eval'} forward {step}"
            compare_all(run_ours(ours, x, dy, 0.5), run_ref(r, x, dy, 0.5), what, True)
            for g in rg.gates(r):
                g.last = None   # holds autograd tensors, which deepcopy (draw_input) refuses
            st = ours.stats()
            T.check(np.array_equal(st["expert_counts"], r.stats["expert_counts"].numpy())
                    and st["dropped"] == r.stats["dropped"], f"{what}: stats",
                    f"{st['expert_counts']} {st['dropped']} vs {r.stats['expert_counts'].tolist()} "
                    f"{r.stats['dropped']}")
    # (N, D) is one group
    ours = lt.MoE(8, 4, 16, seed=3)
    x = torch.randn(10, 8, generator=gen)
    with torch.no_grad():
        y2, a2 = ours(x)
        y3, a3 = ours(x[None])
    T.check(y2.shape == (10, 8) and torch.equal(y2, y3[0]) and torch.equal(a2, a3),
            "MoE: (N, D) input is one group (== (1, N, D))")


# ------------------------------------------------------------------ soft layers

def test_soft():
    gen = torch.Generator().manual_seed(5)
    cases = [(lambda s: lt.DynamicSlotsSoftMoE(8, 3, expert_mult=2, seed=s),
              dict(type="soft_dynamic", dim=8, num_experts=3, expert_mult=2)),
             (lambda s: lt.DynamicSlotsSoftMoE(6, 4, expert_mult=2.5, geglu=True, seed=s),
              dict(type="soft_dynamic", dim=6, num_experts=4, expert_mult=2.5, geglu=True)),
             (lambda s: lt.SoftMoE(8, 3, num_slots=2, expert_mult=2, seed=s),
              dict(type="soft", dim=8, num_experts=3, num_slots=2, expert_mult=2)),
             (lambda s: lt.SoftMoE(6, 2, seq_len=7, expert_mult=2, geglu=True, seed=s),
              dict(type="soft", dim=6, num_experts=2, seq_len=7, expert_mult=2, geglu=True))]
    for i, (make, cfg) in enumerate(cases):
        ours = make(50 + i)
        rs.perturb(ours, gen)                 # gammas away from 1, in place in the C memory
        r = rs.build(cfg)
        r.load_state_dict(ours.state_dict())
        r = r.double()
        D = cfg["dim"]
        for shape, mk in (((2, 7, D), None), ((3, 9, D), "rand"), ((3, 5, D), "dead"),
                          ((2, D, 3, 2), None), ((2, D, 2, 3), "rand"), ((6, D), None)):
            for train in (True, False):
                ours.train(train)
                r.train(train)
                x = torch.randn(shape, generator=gen)
                mask = None
                if mk:
                    b = shape[0]
                    n = shape[2] * shape[3] if len(shape) == 4 else shape[1]
                    mask = rs.random_mask((b, n), gen, dead_rows=(0,) if mk == "dead" else ())
                    if len(shape) == 4:
                        mask = mask.reshape(b, shape[2], shape[3])
                dy = torch.randn(shape, generator=gen)
                what = f"{type(ours).__name__} {cfg} x{list(shape)} mask={mk} {'train' if train else 'eval'}"
                compare_all(run_ours(ours, x, dy, 0.0, mask=mask), run_ref(r, x, dy, 0.0, mask=mask), what, False)
    # dropout: eval mode ignores it
    ours = lt.DynamicSlotsSoftMoE(8, 2, expert_mult=2, dropout=0.5, seed=7).eval()
    r = rs.build(dict(type="soft_dynamic", dim=8, num_experts=2, expert_mult=2, dropout=0.5))
    r.load_state_dict(ours.state_dict())
    r = r.double().eval()
    x = torch.randn(2, 6, 8, generator=gen)
    dy = torch.randn(2, 6, 8, generator=gen)
    compare_all(run_ours(ours, x, dy, 0.0), run_ref(r, x, dy, 0.0), "DynamicSlotsSoftMoE dropout 0.5 eval", False)


# ------------------------------------------------------------------ state_dict both ways

def test_state_dict():
    pairs = [(lambda: lt.SimpleMoE(4, 8, 16, 2), lambda: ref.TopKMoE(4, 8, 16, 2)),
             (lambda: lt.BasicMoE(8, 6, 3), lambda: ref.DenseMoE(3, 8, 6)),
             (lambda: lt.MoE(8, 4, 16), lambda: rg.GShardMoE(8, 4, 16)),
             (lambda: lt.HeirarchicalMoE(8, (2, 3), 12), lambda: rg.HierarchicalMoE(8, (2, 3), 12)),
             (lambda: lt.DynamicSlotsSoftMoE(8, 3, 2), lambda: rs.DynamicSlotsSoftMoE(8, 3, 2)),
             (lambda: lt.SoftMoE(8, 3, 2, 2), lambda: rs.SoftMoE(8, 3, 2, 2)),
             (lambda: lt.SimpleMoE(4, 8, 16, 2, router="deepseek_v3", num_shared_experts=1, shared_gate=True),
              lambda: rr.build(dict(type="topk", num_experts=4, input_dim=8, hidden_dim=16, top_k=2,
                                    router="deepseek_v3", num_shared_experts=1, shared_gate=True)))]
    for i, (mk_ours, mk_ref) in enumerate(pairs):
        torch.manual_seed(100 + i)
        ours, r = mk_ours(), mk_ref()
        with torch.no_grad():
            for _, b in r.named_buffers():
                b.normal_()
        name = type(ours).__name__
        so, sr = ours.state_dict(), r.state_dict()
        a = [(k, tuple(v.shape)) for k, v in so.items()]
        b = [(k, tuple(v.shape)) for k, v in sr.items()]
        T.check(a == b, f"{name}: state_dict names, shapes and order == the reference's",
                f"{[e for e in a if e not in b]} vs {[e for e in b if e not in a]}; order {a == sorted(a, key=b.index) if set(a) == set(b) else '-'}")
        # reference -> ours
        res = ours.load_state_dict(r.state_dict())
        same = all(torch.equal(ours.state_dict()[k], v.float()) for k, v in r.state_dict().items())
        views = all(np.array_equal(ours.layer.params[k], v.numpy()) for k, v in r.state_dict().items()
                    if k in ours.layer.params)
        T.check(same and views and not res.missing_keys and not res.unexpected_keys,
                f"{name}: load_state_dict reference -> ours (the C memory holds the weights)")
        # ours -> reference
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(1.0)
        r.load_state_dict(ours.state_dict())
        T.check(all(torch.equal(r.state_dict()[k], v) for k, v in ours.state_dict().items()),
                f"{name}: load_state_dict ours -> reference")


# ------------------------------------------------------------------ semantics

def test_semantics():
    gen = torch.Generator().manual_seed(6)
    m = lt.SimpleMoE(4, 8, 16, 2, seed=1)
    x = torch.randn(6, 8, generator=gen)
    # parameters share memory with C
    p = m.gate.weight
    T.check(p.data_ptr() == m.layer.params["gate.weight"].ctypes.data and p.dtype == torch.float32,
            "parameters are views of the C memory (same address)")
    # accumulation over two backwards, set_to_none, in-place zero
    m(x).sum().backward()
    g1 = {n: q.grad.clone() for n, q in m.named_parameters()}
    m(x).sum().backward()
    T.check(all(torch.allclose(q.grad, 2 * g1[n], rtol=1e-6, atol=1e-7) for n, q in m.named_parameters()),
            "two backwards accumulate into .grad (2x one backward)")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    T.check(all(q.grad is None for q in m.parameters()), "optimizer.zero_grad(set_to_none=True): grads None")
    m(x).sum().backward()
    T.check(all(torch.allclose(q.grad, g1[n], rtol=1e-6, atol=1e-7) for n, q in m.named_parameters()),
            "after set_to_none, the next backward gives one backward's gradient")
    opt.zero_grad(set_to_none=False)
    m(x).sum().backward()
    T.check(all(torch.allclose(q.grad, g1[n], rtol=1e-6, atol=1e-7) for n, q in m.named_parameters()),
            "after zero_grad(set_to_none=False), one backward's gradient")
    before = m.layer.params["gate.weight"].copy()
    opt.step()
    want = before - 0.1 * g1["gate.weight"].numpy()
    T.check(np.allclose(m.layer.params["gate.weight"], want, rtol=1e-6, atol=1e-7)
            and torch.equal(m.gate.weight.detach(), torch.from_numpy(m.layer.params["gate.weight"])),
            "optimizer.step updates the C layer's weights in place")
    # zero copy: .grad is the C gradient block itself; a replaced .grad or a hook takes the copy path
    opt.zero_grad(set_to_none=True)
    m(x).sum().backward()
    T.check(m.gate.weight.grad.data_ptr() == m.layer.grads["gate.weight"].ctypes.data,
            ".grad is a view of the C gradient block (no copy)")
    g2 = {n: q.grad.clone() for n, q in m.named_parameters()}  # at the weights after the step
    x2 = torch.randn(6, 8, generator=gen)
    opt.zero_grad(set_to_none=True)
    m(x2).sum().backward()
    g3 = {n: q.grad.clone() for n, q in m.named_parameters()}
    opt.zero_grad(set_to_none=True)
    m(x).sum().backward()
    m.gate.weight.grad = m.gate.weight.grad.clone()  # a foreign tensor: the copy path
    m(x2).sum().backward()
    T.check(all(torch.allclose(q.grad, g2[n] + g3[n], rtol=1e-6, atol=1e-6) for n, q in m.named_parameters()),
            "a replaced .grad: the next backward still accumulates (g(x) + g(x2), through autograd)")
    seen = []
    h = m.gate.bias.register_hook(lambda g: seen.append(g.clone()))
    opt.zero_grad(set_to_none=True)
    m(x).sum().backward()
    h.remove()
    T.check(len(seen) == 1 and torch.allclose(seen[0], g2["gate.bias"], rtol=1e-6, atol=1e-7)
            and all(torch.allclose(q.grad, g2[n], rtol=1e-6, atol=1e-7) for n, q in m.named_parameters()),
            "a gradient hook on a parameter fires once with the gradient (copy path)")
    # requires_grad False on a parameter: no grad for it, others still
    m.gate.bias.requires_grad_(False)
    opt.zero_grad(set_to_none=True)
    m(x).sum().backward()
    T.check(m.gate.bias.grad is None and m.gate.weight.grad is not None,
            "a frozen parameter (requires_grad False) gets no gradient")
    m.gate.bias.requires_grad_(True)
    # an expert that got no token: grad None, as the PyTorch module (AdamW then skips it)
    one = lt.SimpleMoE(4, 8, 16, 1, seed=2)
    one(torch.randn(1, 8, generator=gen)).sum().backward()
    idle = [e for e in range(4) if one.experts[e].net[0].weight.grad is None]
    T.check(len(idle) == 3 and one.gate.weight.grad is not None
            and int(one.stats()["expert_counts"].sum()) == 1, "experts with no token get grad None (3 of 4)",
            f"idle {idle}")
    # second forward before backward: a clear error
    y1 = m(x)
    m(x)
    try:
        y1.sum().backward()
        T.check(False, "backward after a second forward raises")
    except RuntimeError as e:
        T.check("earlier forward" in str(e), "backward after a second forward raises a clear error", str(e))
    # no_grad: MOE_NO_GRAD (the C layer keeps nothing: its backward is refused)
    with torch.no_grad():
        y = m(x)
    T.check(not y.requires_grad, "under torch.no_grad the output needs no grad")
    try:
        m.layer.backward(np.ones((6, 8), np.float32))
        T.check(False, "no_grad forward ran with MOE_NO_GRAD")
    except libmoe.MoEError as e:
        T.check(e.status == "MOE_ERR_STATE", "no_grad forward ran with MOE_NO_GRAD (C backward refused)", str(e))
    # eval vs train of a gshard layer: different capacity factors change the result
    g = lt.MoE(8, 4, 16, second_policy_train="all", second_policy_eval="all", capacity_factor_train=0.5,
               capacity_factor_eval=4.0, seed=2)
    xg = torch.randn(2, 16, 8, generator=gen) + 2.0
    with torch.no_grad():
        g.train()
        yt, _ = g(xg)
        dt = g.stats()["dropped"]
        g.eval()
        ye, _ = g(xg)
        de = g.stats()["dropped"]
    T.check(dt > 0 and de == 0 and not torch.equal(yt, ye), "module.train()/.eval() select MOE_TRAIN/MOE_EVAL",
            f"dropped train {dt}, eval {de}")
    # float64 and non-contiguous inputs
    r = to_ref(m, ref.TopKMoE(4, 8, 16, 2))
    xd = torch.randn(8, 6, generator=gen, dtype=torch.float64).t()   # (6, 8) non-contiguous float64
    xx = xd.clone().requires_grad_()
    y = m(xx)
    y.sum().backward()
    ry, _, rdx, _ = run_ref(r, xd, torch.ones(6, 8), 0.0)
    T.check(y.dtype == torch.float64 and xx.grad.dtype == torch.float64, "float64 input: float64 output and dx")
    close("y (float64 input)", y, ry, "float64 input")
    close("dx (float64 input)", xx.grad, rdx, "float64 input")
    xn = torch.randn(8, 6, generator=gen).t()
    with torch.no_grad():
        T.check(torch.equal(m(xn), m(xn.contiguous())), "non-contiguous float32 input == its contiguous copy")
    # only the aux loss used (y unused): backward still works
    s = lt.MoE(8, 4, 16, seed=4)
    xs = torch.randn(2, 8, 8, generator=gen, requires_grad=True)
    _, aux = s(xs)
    aux.backward()
    T.check(xs.grad is not None and s.gate.w_gating.grad is not None and float(s.experts.w1.grad.abs().sum()) == 0,
            "backward of the aux loss alone (grad of y None)")
    # deepcopy: a new C layer with the same weights, not shared
    c = copy.deepcopy(m)
    with torch.no_grad():
        same = torch.equal(c(x), m(x))
    T.check(same and c.gate.weight.data_ptr() != m.gate.weight.data_ptr()
            and c.gate.weight.data_ptr() == c.layer.params["gate.weight"].ctypes.data,
            "copy.deepcopy: a new C layer, same outputs, its own shared memory")
    # .double() breaks the sharing: refused clearly
    d = lt.BasicMoE(4, 4, 2).double()
    try:
        d(torch.randn(3, 4))
        T.check(False, ".double() module refused")
    except RuntimeError as e:
        T.check("shares memory" in str(e) or "no longer" in str(e), ".double() module refused clearly", str(e))


def expect_moe_error(fn, what, status=None, needle=None):
    try:
        fn()
    except libmoe.MoEError as e:
        c_msg = _lib.last_error()
        ok = (status is None or e.status == status) and (needle is None or needle in str(e))
        if needle is None:   # a C error: the text carries moe_last_error()'s message
            ok = ok and c_msg != "" and c_msg in str(e)
        T.check(ok, what, f"{e.status}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        T.check(False, what, f"raised {type(e).__name__}: {e}")
        return
    T.check(False, what, "no error")


def test_errors():
    m = lt.SimpleMoE(4, 8, 16, 2)
    expect_moe_error(lambda: m(torch.randn(3, 7)), "wrong width -> MoEError(MOE_ERR_SHAPE)", "MOE_ERR_SHAPE",
                     "input width is 8")
    expect_moe_error(lambda: m(torch.full((3, 8), float("nan"))), "NaN input -> MoEError with the C message",
                     "MOE_ERR_NONFINITE")
    expect_moe_error(lambda: m(torch.randn(0, 8)), "empty batch -> MoEError with the C message")
    expect_moe_error(lambda: lt.SimpleMoE(4, 8, 16, 5), "top_k > num_experts -> MoEError with the C message",
                     "MOE_ERR_ARG")
    expect_moe_error(lambda: lt.SimpleMoE(4, 8, 16, 2, bogus=1), "unknown router option -> MoEError (C message)",
                     "MOE_ERR_ARG")
    expect_moe_error(lambda: lt.MoELayer({"type": "nope"}), "unknown layer type -> MoEError (C message)")
    expect_moe_error(lambda: lt.BasicMoE(8, 4, 2)(torch.randn(2, 8), mask=None) if False else
                     lt.MoELayer({"type": "dense", "input_dim": 8, "output_dim": 4, "num_experts": 2})(
                         torch.randn(1, 3, 8), torch.ones(1, 3)), "mask on a dense layer -> MoEError (C message)",
                     "MOE_ERR_UNSUPPORTED")
    s = lt.DynamicSlotsSoftMoE(8, 2)
    expect_moe_error(lambda: s(torch.randn(2, 5, 8), torch.ones(2, 4)), "mask of the wrong shape -> MoEError",
                     "MOE_ERR_SHAPE", "mask has shape")
    try:
        m(torch.randn(3, 8).to(torch.int64))
        T.check(False, "integer input refused")
    except TypeError as e:
        T.check("floating" in str(e), "integer input refused with TypeError", str(e))
    # numpy layer: backward before any forward, dy of a wrong shape
    L = libmoe.Layer({"type": "topk", "num_experts": 4, "input_dim": 8, "hidden_dim": 16, "top_k": 2})
    expect_moe_error(lambda: L.backward(np.zeros((2, 8), np.float32)), "numpy backward before forward -> MoEError",
                     "MOE_ERR_STATE", "no successful forward")
    L.forward(np.zeros((2, 8), np.float32))
    expect_moe_error(lambda: L.backward(np.zeros((3, 8), np.float32)), "numpy dy of a wrong shape", "MOE_ERR_SHAPE",
                     "dy has shape")
    expect_moe_error(lambda: L.load("/nonexistent/w.safetensors"), "load of a missing file -> C error", "MOE_ERR_IO")


# ------------------------------------------------------------------ numpy Layer

def test_numpy_layer():
    gen = np.random.default_rng(7)
    cfg = {"type": "topk", "num_experts": 4, "input_dim": 8, "hidden_dim": 16, "top_k": 2, "seed": 3}
    L = libmoe.Layer(cfg)
    x = gen.standard_normal((2, 5, 8))
    y, aux = L.forward(x)                    # float64 input converted
    dy = gen.standard_normal(y.shape).astype(np.float32)
    dx = L.backward(dy)
    g1 = {k: v.copy() for k, v in L.grads.items()}
    L.forward(x)
    L.backward(dy)
    T.check(all(np.allclose(L.grads[k], 2 * g1[k], rtol=1e-6, atol=1e-7) for k in g1),
            "numpy Layer: gradients accumulate (C semantics) until zero_grad")
    L.zero_grad()
    T.check(all(not v.any() for v in L.grads.values()), "numpy Layer: zero_grad")
    # same as the torch module with the same weights
    m = lt.SimpleMoE(4, 8, 16, 2, seed=3)
    xt = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    yt = m(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    T.check(np.array_equal(y, yt.detach().numpy()) and np.array_equal(dx, xt.grad.numpy())
            and all(np.array_equal(g1[k], p.grad.numpy()) for k, p in m.named_parameters()),
            "numpy Layer == libmoe.torch module (same seed): y, dx, grads bit for bit")
    # groups: (T, D) with groups=B == (B, N, D)
    y2, _ = L.forward(x.reshape(10, 8), groups=2)
    T.check(np.array_equal(y2, y.reshape(10, 8)), "numpy Layer: (T, D) with groups=2 == (2, N, D)")
    # save / load round trip; the views see the loaded weights
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        L.save(path)
        L2 = libmoe.Layer(dict(cfg, seed=99))
        view = L2.params["gate.weight"]
        L2.load(path)
        T.check(all(np.array_equal(L.params[k], L2.params[k]) for k in L.params)
                and np.array_equal(view, L.params["gate.weight"]), "numpy Layer: save / load round trip")
    st = L.stats()
    T.check(st["tokens"] == 10 and st["expert_counts"].sum() == 20 and set(st) >= {
        "tokens", "expert_counts", "dropped", "balance_loss", "z_loss", "capacity"}, "numpy Layer: stats()", str(st))
    # the views keep the layer alive
    w = libmoe.Layer(cfg).params["gate.weight"]
    T.check(w.shape == (4, 8) and np.isfinite(w).all(), "a parameter view outlives its Layer object safely")
    # image forward in numpy
    S = libmoe.Layer({"type": "soft_dynamic", "dim": 8, "num_experts": 2, "expert_mult": 2})
    xi = gen.standard_normal((2, 8, 3, 2)).astype(np.float32)
    yi, _ = S.forward(xi, mask=np.ones((2, 3, 2)))
    dxi = S.backward(np.ones_like(yi))
    T.check(yi.shape == (2, 8, 3, 2) and dxi.shape == xi.shape, "numpy Layer: image forward/backward shapes")


# ------------------------------------------------------------------ training

def test_training():
    D, H, O = 8, 16, 3

    def model(moe):
        return nn.Sequential(nn.Linear(6, D), moe, nn.Linear(D, O))

    torch.manual_seed(0)
    ours = model(lt.SimpleMoE(4, D, H, 2, seed=5))
    theirs = model(ref.TopKMoE(4, D, H, 2))
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(8)
    xs = torch.randn(4, 16, 6, generator=gen)                     # 4 batches, cycled
    ts = torch.tanh(xs @ torch.randn(6, O, generator=gen))        # a learnable target
    losses = []
    for net in (ours, theirs):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
        traj = []
        for step in range(50):
            opt.zero_grad(set_to_none=True)
            loss = ((net(xs[step % 4]) - ts[step % 4]) ** 2).mean()
            loss.backward()
            opt.step()
            traj.append(float(loss))
        losses.append(traj)
    d = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(*losses))
    T.check(d <= 1e-4, "Linear -> SimpleMoE -> Linear, 50 AdamW steps: same loss trajectory as the reference",
            f"max relative difference {d:.3g}; ours {losses[0][-1]:.6f} ref {losses[1][-1]:.6f}")
    T.check(losses[0][-1] < losses[0][0], "training lowers the loss", f"{losses[0][0]} -> {losses[0][-1]}")
    T.train_diff = d
    w = ours[1].gate.weight
    T.check(torch.equal(w.detach(), torch.from_numpy(ours[1].layer.params["gate.weight"]))
            and torch.allclose(w, theirs[1].gate.weight, rtol=1e-3, atol=1e-5),
            "after training: the C weights are the torch parameters, close to the reference's")


def test_bf16():
    """A bf16 (autocast) module: a PyTorch optimizer writes the parameters the C layer shares,
    and the next forward uses the new values (the bf16 copies are refreshed), as a fresh module
    with those parameters computes; and its output is within bf16's precision of fp32."""
    cfg = {"type": "topk", "num_experts": 4, "input_dim": 16, "hidden_dim": 32, "top_k": 2, "seed": 3, "bf16": True}
    m = lt.MoELayer(cfg)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    y0, _ = m(x)
    y0.square().sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    with torch.no_grad():
        y1, _ = m(x)
        fresh = lt.MoELayer(cfg)
        fresh.load_state_dict(m.state_dict())
        y2, _ = fresh(x)
        f32 = lt.MoELayer({**cfg, "bf16": False})
        f32.load_state_dict(m.state_dict())
        y3, _ = f32(x)
    T.check(not torch.equal(y0.detach(), y1), "bf16: the optimizer step changed the output")
    T.check(torch.equal(y1, y2), "bf16: after a torch optimizer step the forward uses the new parameters")
    rel = float((y1 - y3).norm() / y3.norm())
    T.check(0 < rel < 1e-2, "bf16 module within bf16 precision of fp32", f"relative L2 {rel:.3g}")


def test_cpu():
    """libmoe.cpu(): the kernel level this process runs at, as MOE_MAX_CPU_ISA set it."""
    c = libmoe.cpu()
    levels = ["baseline", "avx2", "avx512", "avx512_bf16", "neon"]
    T.check(c["isa"] in levels and c["isa_max"] in levels and isinstance(c["notes"], list) and c["model"],
            "libmoe.cpu() names the level, the best level, the model and the notes", str(c))
    cap = os.environ.get("MOE_MAX_CPU_ISA", "").strip().lower()
    if cap in levels and levels.index(cap) <= levels.index(c["isa_max"]):
        T.check(c["isa"] == cap, "libmoe.cpu(): the level follows MOE_MAX_CPU_ISA", f"{c['isa']} vs {cap}")
    print(f"kernel level {c['isa']} (best {c['isa_max']}), notes {c['notes']}")


def main():
    print(f"libmoe: {libmoe.library_path}")
    for t in (test_topk, test_router, test_dense, test_gshard, test_soft, test_state_dict, test_semantics,
              test_errors, test_numpy_layer, test_training, test_bf16, test_cpu):
        try:
            t()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            T.check(False, f"{t.__name__} raised {type(e).__name__}: {e}")
    print(f"max |ours - reference| {T.max_abs:.3g}; max error / tolerance {T.max_rel:.3g}; "
          f"training loss max relative difference {getattr(T, 'train_diff', float('nan')):.3g}")
    print(f"python: {T.passed} passed, {T.failed} failed")
    sys.exit(1 if T.failed else 0)


if __name__ == "__main__":
    main()
