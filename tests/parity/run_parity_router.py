#!/usr/bin/python3
"""PyTorch parity tests of `moe forward` for the routers of the `topk` layer.

For each case: build the reference (reference_router.py) from a seeded torch RNG (random
gate biases; with expert_bias the buffer gate.e_score_correction_bias ~ N(0, 0.1); skew
adds to gate.bias[0] so most tokens want expert 0 and capacity overflows), save
LAYER.json, W.safetensors (state_dict incl. the buffer, float32), X.safetensors ('x'),
DY.safetensors ('dy', optional scalar 'daux'), run
    moe forward --config LAYER.json --weights W.safetensors --input X.safetensors
                --out OUT.safetensors [--eval] [--grad-output DY.safetensors]
                [--top-k K] [--mask-experts LIST] [--force-experts LIST]
and compare OUT's y, aux_loss (layers with a balance or z-loss coefficient), dx,
grad.<param> and the scalars stats.balance_loss and stats.z_loss with float64 PyTorch
autograd of sum(y * dy) + daux * aux_loss on the same float32 weights and inputs
(|ours - torch| <= 1e-5 + 1e-4 * |torch| per element), and stats.expert_counts (I64, E:
kept routed rows per expert) and stats.dropped (I64 scalar) exactly.
Inputs are redrawn while any routing decision is float32-fragile (reference_router.
knife_edges: top-K boundaries, group ranks, expert-choice boundaries and, with capacity,
the slot order of the picks). Eval cases run the backward too (m.eval(); the backward of
the eval forward: eval capacity, no jitter), except one forward-only case. Two fixed cases
follow the numbers of an issue: sigmoid scores that underflow float32 for one token (ties
broken toward the lower expert; guarded shares keep everything finite; daux saved with
shape () and (1)), and gate logits near 1e30 whose z-loss overflows float32 (exit 1).

Usage (from anywhere; needs Debian's python3-torch, run as /usr/bin/python3):
    /usr/bin/python3 tests/parity/run_parity_router.py              # needs build/moe (make)
    MOE_BIN=path/to/moe /usr/bin/python3 tests/parity/run_parity_router.py
    /usr/bin/python3 tests/parity/run_parity_router.py --self-test  # torch only, no binary
    add -v to print every tensor's max error
Ends with "parity-router: N passed, N failed"; exits 1 if anything failed.
"""
import copy
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # repository root

try:
    import torch
    import numpy  # run_parity and stio need it
    del numpy
except ImportError as exc:  # the test must fail, not skip, without torch
    print(f"python3-torch is required: apt-get install python3-torch python3-numpy ({exc})")
    print("parity-router: 0 passed, 1 failed")
    sys.exit(1)

sys.path.insert(0, str(HERE))
import reference_router as rr  # noqa: E402
import stio  # noqa: E402
from run_parity import (RTOL, ATOL, Tally, compare, expect_error, forward_args, locate_moe, mode_label,  # noqa: E402
                        report, run_moe, run_tool, write_case)


# ------------------------------------------------------------------ cases
# x: (B, N, D) | (T, D). flags: runtime options of `moe forward`. skew: added to gate.bias[0].
# ebias: random selection bias in the weights (layers with expert_bias). daux: scalar in DY.
# want: extra checks, "drops" (stats.dropped > 0), "masked" (masked experts count 0),
# "forced" (forced experts take every token, capacity off). train False: eval mode; grad
# False: forward only. Eval cases give train mode another capacity factor where they can, so
# a tool using the wrong mode's settings would show (the self-test checks it); one sets
# jitter 0.5, which eval must not apply.

def tc(x, E=4, H=12, train=True, flags=(), skew=0.0, daux=None, want=(), grad=True, **keys):
    cfg = dict(type="topk", num_experts=E, input_dim=x[-1], hidden_dim=H, activation="relu", expert="mlp")
    cfg.update(keys)
    try:
        ebias = rr.resolve(cfg)["expert_bias"]
    except ValueError:  # the configs of the error cases
        ebias = False
    return dict(cfg=cfg, x=x, train=train, grad=grad, flags=list(flags), skew=skew, daux=daux, ebias=ebias,
                want=want)


def mask(*e):
    return ["--mask-experts", ",".join(str(i) for i in e)]


def force(*e):
    return ["--force-experts", ",".join(str(i) for i in e)]


CASES = [
    # recipes
    tc((2, 12, 16), top_k=2),                                               # the topk default
    tc((24, 16), E=6, activation="gelu", router="topk", top_k=2),           # explicit recipe, (T, D)
    tc((2, 16, 16), router="switch", jitter=0.0, want=("drops",)),          # C = ceil(1.25*16/4) = 5
    tc((2, 16, 16), router="switch", train=False, skew=1.5, want=("drops",)),  # eval: jitter off, cf 2.0
    tc((2, 10, 16), E=8, router="mixtral", top_k=2, activation="silu"),
    tc((2, 9, 16), E=4, H=10, router="mixtral", top_k=2, expert="swiglu"),  # swiglu with mixtral
    tc((3, 16, 16), router="st_moe", top_k=2, skew=1.5, daux=0.7, want=("drops",)),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=2),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=3, num_groups=4, topk_groups=2),
    tc((2, 10, 16), E=8, router="deepseek_v3", top_k=3, num_groups=4, topk_groups=1),  # groups run out
    tc((2, 12, 16), router="expert_choice", capacity_factor=1.0),           # C = 3
    tc((2, 12, 16), E=6, router="expert_choice", activation="gelu"),        # cf 2: C = 4
    tc((2, 13, 16), router="expert_choice", capacity_factor=0.5),           # C = 2
    tc((3, 10, 16), E=5, router="expert_choice", capacity_factor_train=0.5, train=False),  # eval cf 2
    # sizes
    tc((2, 11, 16), E=5, router="token_choice", top_k=1),                   # k = 1
    tc((2, 9, 16), E=4, top_k=4, score="softmax", normalize=True),          # k = E
    tc((3, 16), E=8, top_k=2, score="softmax"),                             # T < E
    tc((1, 16), E=4, top_k=2, router="st_moe"),                             # one token
    tc((2, 13, 7), E=5, H=5, top_k=2, score="softmax", capacity_factor=1.0, balance_coef=0.05),  # odd sizes
    tc((3, 20, 16), E=4, top_k=2, score="softmax", capacity_factor=1.0, skew=1.5,
       balance_coef=0.02, want=("drops",)),                                 # B = 3 with drops
    # scores and weights
    tc((2, 10, 16), E=6, top_k=2, score="softmax", normalize=False),
    tc((2, 10, 16), E=6, top_k=3, score="softmax", normalize=True, route_scale=2.5),
    tc((2, 10, 16), E=6, top_k=2, score="topk_softmax", route_scale=2.5),
    tc((2, 10, 16), E=6, top_k=2, score="sigmoid", normalize=False),
    tc((2, 10, 16), E=6, top_k=3, score="sigmoid", normalize=True, route_scale=2.5, expert_bias=True),
    # shared experts
    tc((2, 10, 16), E=4, top_k=2, num_shared_experts=1),
    tc((2, 10, 16), E=4, top_k=2, num_shared_experts=2, shared_gate=True),
    tc((2, 10, 16), E=6, top_k=2, router="mixtral", num_shared_experts=2),
    tc((2, 10, 16), E=4, H=8, top_k=1, num_shared_experts=1, shared_gate=True, expert="geglu"),
    # losses
    tc((2, 12, 16), E=4, top_k=2, z_loss_coef=0.01, daux=0.7),             # z-loss alone
    tc((2, 12, 16), E=4, top_k=2, score="topk_softmax", balance_coef=0.05),
    tc((2, 12, 16), E=4, top_k=2, score="softmax", balance_coef=0.05, daux=1.3),
    tc((2, 12, 16), E=4, top_k=2, score="sigmoid", normalize=True, balance_coef=0.05),
    # runtime control
    tc((2, 12, 16), E=4, top_k=2, score="softmax", capacity_factor=1.25, skew=1.0,
       flags=["--top-k", "1"], want=("drops",)),                            # C = ceil(1.25*12*1/4) = 4
    tc((2, 12, 16), E=5, top_k=2, score="softmax", balance_coef=0.05, flags=mask(1), want=("masked",)),
    tc((2, 12, 16), E=4, top_k=2, flags=force(2), want=("forced",)),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=2, num_groups=4, topk_groups=2, balance_coef=0.05,
       flags=mask(0, 1, 5), want=("masked",)),                               # mask + groups
    tc((2, 12, 16), E=6, top_k=3, score="softmax", normalize=True, capacity_factor=1.0,
       flags=mask(4) + force(0, 3), want=("masked", "drops")),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=2, num_groups=4, topk_groups=1, flags=force(7)),
    tc((2, 12, 16), E=5, router="expert_choice", capacity_factor=1.0, flags=mask(2), want=("masked",)),
    tc((2, 12, 16), E=5, top_k=2, score="sigmoid", balance_coef=0.1, flags=mask(0, 3), want=("masked",)),
    # eval mode, with the backward
    tc((2, 12, 16), E=4, top_k=2, capacity_factor_train=0.5, capacity_factor_eval=1.0, skew=1.5,
       train=False, want=("drops",)),
    tc((2, 16, 16), E=8, top_k=2, router="st_moe", skew=2.0, train=False, want=("drops",)),  # C = 8
    # train mode (kept here for its seed): expert choice, z-loss, a gated shared expert; eval twin below
    tc((2, 12, 16), E=6, router="expert_choice", z_loss_coef=0.01, num_shared_experts=1, shared_gate=True),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=2, num_groups=4, topk_groups=2,
       num_shared_experts=1, capacity_factor_train=0.5, train=False),
    tc((2, 12, 16), train=False, top_k=2),                                     # the topk default
    tc((2, 12, 16), router="switch", jitter=0.5, skew=1.0, daux=0.7, train=False, want=("drops",)),  # big jitter
    tc((2, 9, 16), E=4, H=10, router="mixtral", top_k=2, expert="swiglu", capacity_factor_train=0.5,
       train=False),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=3, num_groups=4, topk_groups=2, num_shared_experts=2,
       shared_gate=True, balance_coef=0.02, capacity_factor_train=0.5, daux=1.3, train=False),  # bias, groups
    tc((2, 10, 16), E=8, router="deepseek_v3", top_k=3, num_groups=4, topk_groups=1, capacity_factor_train=0.5,
       train=False),                                                           # groups run out
    tc((2, 12, 16), E=6, router="expert_choice", z_loss_coef=0.01, num_shared_experts=1, shared_gate=True,
       capacity_factor_train=1.0, train=False),
    tc((3, 16, 16), router="st_moe", top_k=2, skew=1.5, daux=0.7, capacity_factor_train=2.0,
       capacity_factor_eval=1.0, train=False, want=("drops",)),
    tc((2, 10, 16), E=6, top_k=3, score="sigmoid", normalize=True, route_scale=2.5, expert_bias=True,
       balance_coef=0.05, capacity_factor_train=0.5, train=False),
    # eval mode with the runtime flags
    tc((2, 12, 16), E=4, top_k=2, score="softmax", capacity_factor_train=2.0, capacity_factor_eval=1.25, skew=1.0,
       flags=["--top-k", "1"], train=False, want=("drops",)),                  # C = 4
    tc((2, 12, 16), E=6, top_k=3, score="softmax", normalize=True, capacity_factor_train=0.5,
       capacity_factor_eval=1.0, flags=mask(4) + force(0, 3), train=False, want=("masked", "drops")),
    tc((2, 12, 16), E=5, router="expert_choice", capacity_factor_train=2.0, capacity_factor_eval=1.0,
       flags=mask(2), train=False, want=("masked",)),
    tc((2, 12, 16), E=5, top_k=2, score="sigmoid", balance_coef=0.1, capacity_factor_train=0.5, flags=mask(0, 3),
       train=False, want=("masked",)),
    tc((2, 12, 16), E=8, router="deepseek_v3", top_k=2, num_groups=4, topk_groups=1, capacity_factor_train=0.5,
       flags=force(7), train=False, want=("forced",)),
    tc((2, 12, 16), E=4, top_k=2, flags=force(2), train=False, want=("forced",)),
    # eval mode, forward only (no --grad-output)
    tc((2, 16, 16), router="switch", train=False, skew=1.5, grad=False, want=("drops",)),
]


def describe(c):
    cfg = c["cfg"]
    s = f"topk E={cfg['num_experts']} D={cfg['input_dim']} H={cfg['hidden_dim']}"
    for k, v in cfg.items():
        if k not in ("type", "num_experts", "input_dim", "hidden_dim") and (k, v) not in (
                ("activation", "relu"), ("expert", "mlp")):
            s += f" {k}={v}"
    s += f" x{list(c['x'])}"
    for k in ("skew", "daux"):
        s += f" {k}={c[k]}" if c[k] else ""
    s += (" " + " ".join(c["flags"])) if c["flags"] else ""
    return mode_label(c["train"], c["grad"]) + s


# ------------------------------------------------------------------ one case

def parse_flags(flags):
    """set_routing() arguments from the runtime flags."""
    kw = {}
    for name, val in zip(flags[::2], flags[1::2]):
        if name == "--top-k":
            kw["top_k"] = int(val)
        elif name == "--mask-experts":
            kw["disabled"] = [int(v) for v in val.split(",")]
        elif name == "--force-experts":
            kw["forced"] = [int(v) for v in val.split(",")]
    return kw


def make_case(c, seed, d):
    """Write LAYER.json, W/X/DY.safetensors into d; return (model, x, dy, daux)."""
    cfg = c["cfg"]
    torch.manual_seed(seed)
    model = rr.build(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.gate.bias[0] += c["skew"]
        if c["ebias"]:
            model.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg["num_experts"], generator=gen))
    model.set_routing(**parse_flags(c["flags"]))
    for _ in range(200):  # redraw x (deterministically) while a routing decision is fragile
        x = torch.randn(c["x"], generator=gen)
        if not rr.knife_edges(model, x, c["train"]):
            break
    else:
        raise RuntimeError(f"no knife-edge-free input found for {describe(c)}")
    dy = torch.randn(c["x"], generator=gen)
    return model, x, dy, write_case(d, cfg, model, x, dy, c["daux"])


def torch_f32_tool(d, train, grad, flags):
    """Stand-in for the binary (--self-test): the reference in float32 on the same files
    (with --stats it prints the binary's summary line)."""
    cfg = json.loads((d / "LAYER.json").read_text())
    model = rr.build(cfg)
    model.load_state_dict(stio.load(d / "W.safetensors"))
    show_stats = "--stats" in flags
    model.set_routing(**parse_flags([f for f in flags if f != "--stats"]))
    x = stio.load(d / "X.safetensors")["x"]
    dyf = stio.load(d / "DY.safetensors") if grad else {}
    out = rr.outputs(model, x, dyf.get("dy"), float(dyf.get("daux", 1.0)), train, torch.float32)
    out["stats.balance_loss"] = out["stats.balance_loss"].float()
    out["stats.z_loss"] = out["stats.z_loss"].float()
    stio.save(d / "OUT.safetensors", out)
    return 0, (f"balance loss {float(out['stats.balance_loss']):.6f}, z-loss {float(out['stats.z_loss']):.6f}"
               if show_stats else "")


EXACT = ("stats.expert_counts", "stats.dropped", "stats.capacity")


def check_outputs(ours, want, c, model):
    """Failure strings: tolerance compare of the float outputs, exact routing stats,
    no aux_loss for layers without one, and the case's extra checks."""
    want = dict(want)
    exact = {k: want.pop(k) for k in EXACT}
    problems = []
    for k in want:
        if k in ours and ours[k].is_floating_point() and not bool(torch.isfinite(ours[k]).all()):
            problems.append(f"{k} has non-finite values")
    problems += compare(ours, want)
    for k, w in exact.items():
        o = ours.get(k)
        if o is None:
            problems.append(f"OUT lacks {k}")
        elif o.dtype != torch.int64 or tuple(o.shape) != tuple(w.shape) or not torch.equal(o, w):
            problems.append(f"{k} {o.dtype} {list(o.shape)} {o.tolist()}, want int64 {list(w.shape)} {w.tolist()}")
    if "aux_loss" not in want and "aux_loss" in ours:
        problems.append("OUT has 'aux_loss' (the layer has no balance or z-loss coefficient)")
    for k in ("stats.balance_loss", "stats.z_loss"):
        if k in ours and (ours[k].dtype != torch.float32 or ours[k].dim() != 0):
            problems.append(f"{k} is {ours[k].dtype} {list(ours[k].shape)}, want a float32 scalar")
    counts = exact["stats.expert_counts"]
    routing = parse_flags(c["flags"])
    if "drops" in c["want"] and int(exact["stats.dropped"]) == 0:
        problems.append("the case drops nothing: it does not test capacity overflow")
    if "masked" in c["want"] and any(int(counts[e]) for e in routing["disabled"]):
        problems.append("the reference routes tokens to a masked expert")
    if "forced" in c["want"]:
        tokens = c["x"][0] * (c["x"][1] if len(c["x"]) == 3 else 1)
        if any(int(counts[e]) != tokens for e in routing["forced"]):
            problems.append("a forced expert does not take every token in the reference")
    return problems


def parity_case(tally, tool, c, seed):
    with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
        d = Path(tmp)
        model, x, dy, daux = make_case(c, seed, d)
        want = rr.outputs(model, x, dy if c["grad"] else None, daux, c["train"])
        what = describe(c) + f" [C={capacity(model, c)} dropped {int(want['stats.dropped'])}]"
        ours = run_tool(tally, lambda dd, train, grad: tool(dd, train, grad, c["flags"]), d, c["train"], c["grad"],
                        what)
        if ours is None:
            return
        problems = check_outputs(ours, want, c, model)
        if not c["grad"]:
            problems += [f"forward-only OUT has '{k}'" for k in ours if k == "dx" or k.startswith("grad.")]
        report(tally, what, problems)


def capacity(model, c):
    """C of the case's mode (0: dropless)."""
    s = model.cfg
    cf = s["capacity_factor_train" if c["train"] else "capacity_factor_eval"]
    N = c["x"][-2] if len(c["x"]) == 3 else c["x"][0]
    if s["router"] == "expert_choice":
        return rr.expert_capacity(cf, N, model.num_experts)
    return rr.token_capacity(cf, N, model.k, model.num_experts)


# ------------------------------------------------------------------ the issue's fixed cases
# Fixed weights and inputs (no redraw): token 0's gate logits are about -100, so its four
# sigmoid scores underflow float32 to exact zeros. libmoe breaks those ties toward the lower
# expert (0, 1); the float64 reference's scores are distinct tiny numbers in the same order,
# so it picks 0, 1 as well (torch.topk on four float32 zeros would pick 2, 3, which gives
# balance 0.671506 instead of 0.681184). Its normalised weights s / (sum s + 1e-20) and
# balance shares are then 0 in float32: y, dx of token 0 exactly 0 and nothing NaN.
# The balance loss is 0.68118350 (float64); the issue quotes libmoe's float32 value as
# printed, 0.681184, so the checks allow 1e-6 around it.

ISSUE_CFG = {"type": "topk", "num_experts": 4, "input_dim": 2, "hidden_dim": 2, "top_k": 2, "score": "sigmoid",
             "normalize": True, "balance_coef": 0.01}
ISSUE_BALANCE, TOPK_TIE_BALANCE = 0.681184, 0.671506


def near(v, want, tol=1e-6):
    return abs(v - want) <= tol


def issue_model():
    """The issue's layer: expert weights 0.5, biases 0; gate.weight 100 on input dim 0 only."""
    model = rr.build(ISSUE_CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("experts."):
                p.fill_(0.5 if name.endswith("weight") else 0.0)
        model.gate.weight.zero_()
        model.gate.weight[:, 0] = 100.0
        model.gate.bias.copy_(torch.tensor([0.0, -0.1, -0.2, -0.3]))
    x = torch.tensor([[-1.0, 1.0], [0.01, 1.0], [0.02, -1.0]])
    return model, x, torch.ones(3, 2)


def balance_with_picks(model, x, picks0):
    """The float64 balance loss if token 0 picked experts picks0 (shares as libmoe: s / (sum s + 1e-20))."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        s = torch.sigmoid(m.gate(x.double()))
        s[0] = torch.sigmoid(model.gate(x[:1]))[0].double()  # token 0's float32 scores: zeros
    picks = [list(picks0)] + [rr.choose(row, [True] * 4, [], 2)[0] for row in s[1:].tolist()]
    f = torch.zeros(4, dtype=torch.float64)
    for row in picks:
        for e in row:
            f[e] += 1.0 / (len(picks) * 2)
    q = s / (s.sum(dim=-1, keepdim=True) + 1e-20)
    return float(4 * (f * q.mean(dim=0)).sum())


def issue_reference_checks(tally):
    """Torch-only: the float64 reference gives the issue's numbers, for the reasons stated."""
    model, x, dy = issue_model()
    want = rr.outputs(model, x, dy, 1.0, True)
    s32 = torch.sigmoid(model.gate(x[:1]))[0].detach()
    bal = float(want["stats.balance_loss"])
    tally.check(rr.knife_edges(model, x, True) != [] and bool((s32 == 0).all())
                and want["stats.expert_counts"].tolist() == [3, 3, 0, 0] and near(bal, ISSUE_BALANCE),
                f"issue example: float32 scores of token 0 are zeros, the reference picks experts 0, 1 for "
                f"every token and its balance loss is {bal:.8f}", f"{s32.tolist()} {want['stats.expert_counts']}")
    tie = torch.topk(torch.zeros(4), 2).indices.tolist()
    alt = balance_with_picks(model, x, tie)
    tally.check(near(balance_with_picks(model, x, [0, 1]), ISSUE_BALANCE)
                and (sorted(tie) == [0, 1] or near(alt, TOPK_TIE_BALANCE)),
                f"issue example: token 0 on experts 0, 1 gives {ISSUE_BALANCE}; on torch.topk's tie order "
                f"{tie} it gives {alt:.6f}", f"{alt:.6f}")


def issue_case(tally, tool, self_test):
    """The issue's example through the tool: train with daux () and (1), eval with daux (1)."""
    model, x, dy = issue_model()
    c = dict(cfg=ISSUE_CFG, x=(3, 2), train=True, grad=True, flags=[], want=())
    results = {}
    for train, shape in ((True, ()), (True, (1,)), (False, (1,))):
        what = f"issue example: {'' if train else 'eval '}sigmoid normalize, token 0's scores underflow, " \
               f"--stats, daux shape ({', '.join(map(str, shape))})"
        with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
            d = Path(tmp)
            write_case(d, ISSUE_CFG, model, x, dy, 1.0, shape)
            rc, log = tool(d, train, True, ["--stats"])
            ours = run_tool(tally, lambda dd, tr, gr: (rc, log), d, train, True, what)
        if ours is None:
            continue
        want = rr.outputs(model, x, dy, 1.0, train)
        problems = check_outputs(ours, want, dict(c, train=train), model)
        problems += [f"{k} is not finite" for k, v in ours.items() if v.is_floating_point()
                     and not bool(torch.isfinite(v).all())]
        bal, aux = float(ours.get("stats.balance_loss", math.nan)), float(ours.get("aux_loss", math.nan))
        if not near(bal, ISSUE_BALANCE):
            problems.append(f"stats.balance_loss {bal:.8f}, want {ISSUE_BALANCE}")
        if not near(aux, 0.01 * ISSUE_BALANCE, 1e-8):
            problems.append(f"aux_loss {aux:.10f}, want 0.01 * {ISSUE_BALANCE}")
        printed = re.search(r"balance loss (\S+?),", log)
        if not printed or not near(float(printed.group(1)), ISSUE_BALANCE):
            problems.append(f"--stats prints no 'balance loss {ISSUE_BALANCE}': {log.strip()[-200:]}")
        # libmoe: exact zeros (the stand-in's float32 torch keeps denormal scores, ~1e-22 here)
        if not self_test and "dx" in ours and not bool((ours["dx"][0] == 0).all()):
            problems.append(f"dx row 0 is {ours['dx'][0].tolist()}, want exactly 0")
        report(tally, what, problems)
        results[(train, shape)] = ours
    a, b = results.get((True, ())), results.get((True, (1,)))
    if a is not None and b is not None:
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        tally.check(same, "issue example: daux saved as shape (1) gives exactly the results of shape ()",
                    f"differs in {[k for k in a if k not in b or not torch.equal(a[k], b[k])]}")


def zloss_overflow_model():
    """topk with z_loss_coef 1e-3 whose float32 gate logits reach about 1e30 (finite inputs)."""
    cfg = dict(type="topk", num_experts=4, input_dim=16, hidden_dim=12, top_k=2, z_loss_coef=1e-3)
    torch.manual_seed(77)
    model = rr.build(cfg)
    gen = torch.Generator().manual_seed(78)
    with torch.no_grad():
        model.gate.weight.mul_(1e30 / model.gate.weight.abs().max())
    x = torch.randn(2, 6, 16, generator=gen)
    return cfg, model, x, torch.randn(2, 6, 16, generator=gen)


def zloss_reference_check(tally):
    """Torch-only: the z-loss case's inputs are finite float32, y is finite, and
    z_loss_coef * z-loss leaves float32's range (so aux_loss must overflow)."""
    cfg, model, x, dy = zloss_overflow_model()
    want = rr.outputs(model, x, None, 1.0, True)
    z = model.gate(x).detach()
    finite_in = all(bool(torch.isfinite(t).all()) for t in [x] + list(model.state_dict().values()))
    zl = 1e-3 * float(want["stats.z_loss"])
    tally.check(finite_in and bool(torch.isfinite(want["y"]).all()) and zl > torch.finfo(torch.float32).max
                and 1e29 < float(z.abs().max()) < 1e31,
                f"z-loss overflow case: finite float32 inputs, logits reach {float(z.abs().max()):.3g}, "
                f"y finite, z_loss_coef * z-loss = {zl:.3g} > float32 max", f"{zl:.3g}")


def zloss_overflow_errors(tally, moe):
    """`moe forward` must refuse the z-loss overflow with exit status 1 and say why."""
    cfg, model, x, dy = zloss_overflow_model()
    needles = ["z-loss overflowed float32", "gate logits reach"]
    for train, grad in ((True, True), (False, True), (False, False)):
        with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
            d = Path(tmp)
            write_case(d, cfg, model, x, dy, None)
            what = f"error: {mode_label(train, grad)}z-loss of gate logits ~1e30 overflows float32: exit 1, " \
                   "naming the z-loss and the logits"
            expect_error(tally, moe, what, d, needles, train=train, grad=grad, code=1)


# ------------------------------------------------------------------ CLI errors

def error_cases(tally, moe):
    def config_error(c, seed, what, needle):
        with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
            d = Path(tmp)
            cfg = c["cfg"]  # a valid case's files, then the bad config over LAYER.json
            make_case(tc(c["x"], E=cfg["num_experts"], H=cfg["hidden_dim"], top_k=1), seed, d)
            (d / "LAYER.json").write_text(json.dumps(cfg))
            try:
                rr.build(cfg)
                tally.check(False, what, "the reference accepts this config")
                return
            except ValueError:
                pass
            expect_error(tally, moe, what, d, needle, fold_case=True)
            if VERBOSE_ERRORS:
                log = run_moe(moe, forward_args(d, train=False, grad=False))[1]
                print("     message: " + log.strip()[:300].replace("\n", " | "))

    def flag_error(c, seed, what, needle):
        with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
            d = Path(tmp)
            flags, c = c["flags"], dict(c, flags=[])
            make_case(c, seed, d)
            try:
                rr.build(c["cfg"]).set_routing(**parse_flags(flags))
                tally.check(False, what, "the reference accepts these flags")
                return
            except ValueError:
                pass
            rc, log = run_moe(moe, forward_args(d, train=False, grad=False) + flags)
            if rc == 0:
                tally.check(False, what, "moe forward succeeded")
            elif rc < 0:
                tally.check(False, what, f"moe forward killed by signal {-rc}: {log.strip()[:300]}")
            else:
                tally.check(needle in log.lower(), what, f"output lacks '{needle}': {log.strip()[:300]}")
            if VERBOSE_ERRORS:
                print("     message: " + log.strip()[:300].replace("\n", " | "))

    x = (2, 6, 8)
    config_error(tc(x, E=4, top_k=5), 71, "error: top_k = 5 > num_experts = 4 is rejected, naming top_k", "top_k")
    config_error(tc(x, top_k=2, router="gshardish"), 72, "error: unknown router recipe is rejected, naming router",
                 "router")
    config_error(tc(x, top_k=2, score="relu"), 73, "error: unknown score is rejected, naming score", "score")
    config_error(tc(x, E=6, top_k=2, num_groups=4, topk_groups=2), 74,
                 "error: num_groups 4 not dividing num_experts 6 is rejected, naming num_groups", "num_groups")
    config_error(tc(x, E=8, top_k=2, num_groups=4, topk_groups=5), 75,
                 "error: topk_groups 5 > num_groups 4 is rejected, naming topk_groups", "topk_groups")
    config_error(tc(x, router="expert_choice", balance_coef=0.01), 76,
                 "error: expert_choice with balance_coef > 0 is rejected, naming balance", "balance")
    config_error(tc(x, router="expert_choice", capacity_factor=0.0), 77,
                 "error: expert_choice with capacity_factor 0 is rejected, naming capacity", "capacity")
    flag_error(tc(x, E=4, top_k=2, flags=mask(0, 1, 2)), 78,
               "error: --mask-experts 0,1,2 leaving 1 enabled expert < k = 2 is rejected, naming enabled", "enabled")
    flag_error(tc(x, E=4, top_k=2, flags=mask(1) + force(1)), 79,
               "error: --force-experts 1 with expert 1 masked is rejected, naming force", "force")
    flag_error(tc(x, E=4, top_k=2, flags=["--top-k", "5"]), 80,
               "error: --top-k 5 > num_experts = 4 is rejected, naming top", "top")


VERBOSE_ERRORS = "-v" in sys.argv


# ------------------------------------------------------------------ self-test only

def stand_in_catches_errors(tally):
    """The comparison must notice a wrong tool: one that forgets normalize, one that
    ignores capacity, one with a wrong balance loss."""
    c = tc((2, 12, 16), E=4, top_k=2, score="softmax", normalize=True, capacity_factor=1.0, skew=1.5,
           balance_coef=0.05)
    with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
        d = Path(tmp)
        model, x, dy, daux = make_case(c, 90, d)
        want = rr.outputs(model, x, dy, daux)
        for label, edit in (("forgets normalize", dict(normalize=False)),
                            ("ignores capacity", dict(capacity_factor=0)),
                            ("drops the balance loss", dict(balance_coef=0.0, z_loss_coef=0.05))):
            m = rr.build(dict(c["cfg"], **edit))
            m.load_state_dict(model.state_dict())
            wrong = rr.outputs(m, x, dy, daux, True, torch.float32)
            tally.check(bool(check_outputs(wrong, want, c, model)), f"self-test: a tool that {label} is caught",
                        "not caught")


def mode_sensitivity(tally):
    """Each eval case whose capacity factors differ between the modes would catch a tool that
    used the train one (the reference cannot draw libmoe's jitter, so the train reference
    runs without it: the capacity alone must show)."""
    for i, c in enumerate(CASES):
        s = rr.resolve(c["cfg"])
        if c["train"] or s["capacity_factor_train"] == s["capacity_factor_eval"]:
            continue
        with tempfile.TemporaryDirectory(prefix="moe-parity-router-") as tmp:
            model, x, dy, daux = make_case(c, 5000 + 10 * i, Path(tmp))
        dyg = dy if c["grad"] else None
        want = rr.outputs(model, x, dyg, daux, False)
        m = rr.build(dict(c["cfg"], jitter=0.0))
        m.load_state_dict(model.state_dict())
        m.set_routing(**parse_flags(c["flags"]))
        wrong = rr.outputs(m, x, dyg, daux, True, torch.float32)
        tally.check(bool(check_outputs(wrong, want, c, model)), f"self-test: train capacity in eval is caught: "
                    f"{describe(c)}", "train and eval give the same results")


# ------------------------------------------------------------------ main

def main():
    tally = Tally()
    self_test = "--self-test" in sys.argv
    torch.set_num_threads(min(4, torch.get_num_threads()))
    if self_test:
        print("parity-router self-test: torch-only checks (no moe binary)")
        rr.self_checks(tally.check)
        stand_in_catches_errors(tally)
        mode_sensitivity(tally)
        print("-- parity cases with a float32 PyTorch stand-in for the binary:")
        tool = torch_f32_tool
    else:
        moe = locate_moe("parity-router")
        if moe is None:
            return 1

        def tool(d, train, grad, flags):
            return run_moe(moe, forward_args(d, train, grad) + flags)

    for i, c in enumerate(CASES):
        parity_case(tally, tool, c, 5000 + 10 * i)
    issue_reference_checks(tally)
    issue_case(tally, tool, self_test)
    zloss_reference_check(tally)
    if not self_test:
        zloss_overflow_errors(tally, moe)
        error_cases(tally, moe)
    print(f"parity-router: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
