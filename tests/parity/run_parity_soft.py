#!/usr/bin/python3
"""PyTorch parity tests of `moe forward` for the soft layers (soft_dynamic, soft).

For each case: build the reference module (reference_soft.py; RMSNorm gammas moved away
from 1), save LAYER.json, W.safetensors (state_dict, float32), X.safetensors ('x' float32,
optional 'mask' BOOL/U8) and DY.safetensors ('dy'), run
    moe forward --config LAYER.json --weights W.safetensors --input X.safetensors
                --out OUT.safetensors [--eval] [--grad-output DY.safetensors]
and compare OUT's y, dx and grad.<param> with float64 PyTorch autograd on the same
float32 weights and inputs (|ours - torch| <= 1e-5 + 1e-4 * |torch| per element), and
stats.expert_counts (I64, E entries, each B*S: every expert processes its S slots of
every batch row) and stats.dropped (I64 scalar 0) exactly. Eval cases run the backward
too (m.eval(); m(x).backward(dy): no dropout), except one forward-only case.

Usage (from anywhere; needs Debian's python3-torch, run as /usr/bin/python3):
    /usr/bin/python3 tests/parity/run_parity_soft.py              # needs build/moe (make)
    MOE_BIN=path/to/moe /usr/bin/python3 tests/parity/run_parity_soft.py
    /usr/bin/python3 tests/parity/run_parity_soft.py --self-test  # torch only, no binary
    add -v to print every tensor's max error
Ends with "parity-soft: N passed, N failed"; exits 1 if anything failed.
"""
import copy
import json
import os
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
    print("parity-soft: 0 passed, 1 failed")
    sys.exit(1)

sys.path.insert(0, str(HERE))
import reference_soft as rs  # noqa: E402
import stio  # noqa: E402
from run_parity import (RTOL, ATOL, Tally, compare, expect_error, forward_args, locate_moe, report,  # noqa: E402
                        run_moe, run_tool)


# ------------------------------------------------------------------ cases
# x: (B, N, D) | (N, D) | image (B, D, h, w). mask: None | "rand" (each token real with
# p 0.6) | "dead" (random, batch row 0 fully masked) | "allmasked" (every row masked).
# mdtype: mask dtype in X.safetensors; mshape "hw": an image mask saved as (B, h, w).
# train False: eval mode; grad False: forward only (no --grad-output). Dropout > 0 only in
# eval cases (train-mode dropout draws from libmoe's RNG): eval must not apply it, and at
# these rates applying it would show (the self-test checks that, case by case).
# Gradient cases keep D <= 24: logits grow like D (two RMS-normed vectors of norm sqrt(D)),
# and at D = 64 even PyTorch's own float32 backward misses rtol 1e-4 on
# grad.to_slot_embeds.0.weight (by up to 2x); D = 64 is checked forward only.

def sd(D, E, x, mult=2, geglu=False, mask=None, train=True, dropout=0.0, grad=True, **kw):
    cfg = dict(type="soft_dynamic", dim=D, num_experts=E, expert_mult=mult, dropout=dropout, geglu=geglu)
    return dict(cfg=cfg, x=x, mask=mask, train=train, grad=grad, **kw)


def soft(D, E, x, slots=None, mult=2, geglu=False, mask=None, train=True, dropout=0.0, key="num_slots",
         grad=True, **kw):
    cfg = dict(type="soft", dim=D, num_experts=E, expert_mult=mult, dropout=dropout, geglu=geglu)
    if slots is not None:
        cfg[key] = slots
    return dict(cfg=cfg, x=x, mask=mask, train=train, grad=grad, **kw)


CASES = [
    sd(16, 4, (2, 16, 16), mult=4),                              # N % E == 0, seed's mult
    sd(16, 4, (2, 13, 16)),                                      # padding 13 -> 16
    sd(24, 3, (3, 12, 24), mask="rand"),
    sd(16, 4, (3, 10, 16), mask="dead"),                         # padding + a fully masked row
    sd(16, 4, (2, 16, 4, 4)),                                    # image, h*w = 16 = 4 * 4
    sd(16, 4, (2, 16, 3, 5)),                                    # image, h*w = 15: padded
    sd(12, 3, (2, 12, 3, 3), mask="dead"),                       # image with a (B, h*w) mask
    sd(12, 4, (2, 12, 2, 3), mask="rand", mshape="hw"),          # image mask given as (B, h, w)
    sd(24, 4, (2, 16, 24), mult=4, geglu=True),
    sd(16, 3, (2, 11, 16), mult=2.5, geglu=True, mask="rand"),   # fractional mult, GLU (H = 26)
    sd(20, 4, (2, 9, 20), mult=2.5),                             # fractional mult, MLP (H = 50)
    sd(16, 1, (2, 7, 16), mask="rand"),                          # E = 1
    sd(16, 4, (3, 1, 16)),                                       # N = 1
    sd(16, 8, (1, 24, 16)),                                      # B = 1, S = 3
    sd(16, 4, (10, 16)),                                         # (N, D): one sequence
    sd(16, 2, (2, 9, 16), mask="rand", mdtype="u8"),             # U8 mask
    sd(16, 3, (2, 8, 16), mask="allmasked"),                     # every token masked
    sd(64, 4, (2, 32, 64), mult=4, train=False, grad=False),     # the seed's defaults, forward only
    sd(16, 4, (2, 12, 16), train=False, dropout=0.1),            # eval: dropout off
    sd(16, 3, (2, 10, 16), geglu=True, mask="dead", train=False),
    sd(16, 4, (2, 16, 3, 5), mask="rand", train=False, dropout=0.3),           # eval image + mask, padded
    sd(12, 4, (2, 12, 2, 3), mask="dead", mshape="hw", mdtype="u8", train=False, dropout=0.5, geglu=True),
    sd(16, 3, (3, 11, 16), mult=2.5, mask="rand", train=False, dropout=0.2),   # eval mask, padding
    sd(16, 4, (9, 16), train=False, dropout=0.25),                             # eval (N, D)
    sd(16, 3, (2, 8, 16), mask="allmasked", train=False, dropout=0.3),
    soft(16, 4, (2, 12, 16), slots=2),
    soft(16, 4, (2, 10, 16), slots=12, key="seq_len"),           # S = 12 // 4 = 3
    soft(16, 3, (3, 9, 16), slots=1, key="slots_per_expert", mult=2.5, mask="dead"),
    soft(16, 2, (2, 16, 3, 3), slots=2, mask="rand"),            # image
    soft(24, 3, (2, 8, 24), slots=2, geglu=True),
    soft(16, 4, (2, 1, 16), slots=2),                            # N = 1
    soft(16, 1, (2, 6, 16), slots=3, mask="rand"),               # E = 1
    soft(16, 2, (7, 16), slots=2),                               # (N, D)
    soft(16, 3, (1, 6, 16), slots=2, train=False, dropout=0.1, geglu=True),
    soft(16, 2, (2, 16, 3, 3), slots=2, mask="rand", train=False, dropout=0.3),   # eval image + mask
    soft(16, 3, (3, 9, 16), slots=1, key="slots_per_expert", mult=2.5, mask="dead", train=False,
         dropout=0.4),
    soft(12, 4, (2, 12, 2, 4), slots=2, mask="rand", mshape="hw", train=False, dropout=0.5, geglu=True),
]


def describe(c):
    cfg = c["cfg"]
    s = f"{cfg['type']} D={cfg['dim']} E={cfg['num_experts']} mult={cfg['expert_mult']}"
    s += " geglu" if cfg["geglu"] else " mlp"
    for k in ("num_slots", "slots_per_expert", "seq_len"):
        if k in cfg:
            s += f" {k}={cfg[k]}"
    s += f" x{list(c['x'])}" + (" image" if len(c["x"]) == 4 else "")
    if c["mask"]:
        s += f" mask={c['mask']}" + (f" {c['mdtype']}" if c.get("mdtype") else "") \
            + (" (B,h,w)" if c.get("mshape") else "")
    if cfg["dropout"]:
        s += f" dropout={cfg['dropout']}"
    return ("" if c["train"] else "eval ") + ("" if c["grad"] else "forward-only ") + s


# ------------------------------------------------------------------ one case

def draw_mask(c, gen):
    shape = c["x"]
    if not c["mask"]:
        return None
    b = shape[0]
    n = shape[2] * shape[3] if len(shape) == 4 else shape[1]
    dead = {"dead": (0,), "allmasked": tuple(range(b))}.get(c["mask"], ())
    return rs.random_mask((b, n), gen, dead_rows=dead)


def make_case(c, seed, d):
    """Write LAYER.json, W/X/DY.safetensors into d; return (model, x, mask, dy)."""
    cfg = c["cfg"]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = rs.perturb(rs.build(cfg), gen)
    x = torch.randn(c["x"], generator=gen)
    mask = draw_mask(c, gen)
    dy = torch.randn(c["x"], generator=gen)
    (d / "LAYER.json").write_text(json.dumps(cfg))
    stio.save(d / "W.safetensors", model.state_dict())
    xs = {"x": x}
    if mask is not None:
        m = mask.reshape(c["x"][0], *c["x"][2:]) if c.get("mshape") == "hw" else mask
        xs["mask"] = m.to(torch.uint8) if c.get("mdtype") == "u8" else m
    stio.save(d / "X.safetensors", xs)
    stio.save(d / "DY.safetensors", {"dy": dy})
    return model, x, mask, dy


def batch_and_tokens(x):
    if x.dim() == 2:
        return 1, x.shape[0]
    if x.dim() == 4:
        return x.shape[0], x.shape[2] * x.shape[3]
    return x.shape[0], x.shape[1]


def reference_outputs(model, x, mask, dy, dtype=torch.float64, train=True):
    """{'y', 'dx', 'grad.<name>'} by autograd in train or eval mode (only 'y', under
    no_grad, when dy is None)."""
    m = copy.deepcopy(model).to(dtype).train(train)
    xr = x.to(dtype).requires_grad_()
    if dy is None:
        with torch.no_grad():
            return {"y": m(xr.detach(), mask)}
    y = m(xr, mask)
    y.backward(dy.to(dtype))
    out = {"y": y.detach(), "dx": xr.grad}
    for name, p in m.named_parameters():
        out["grad." + name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def expected_stats(model, x):
    b, n = batch_and_tokens(x)
    return {"stats.expert_counts": torch.full((model.num_experts,), b * model.num_slots(n), dtype=torch.int64),
            "stats.dropped": torch.tensor(0, dtype=torch.int64)}


def load_input(d):
    xs = stio.load(d / "X.safetensors")
    return xs["x"], xs.get("mask")


def torch_f32_tool(d, train, grad):
    """Stand-in for the binary (--self-test): the reference in float32 on the same files."""
    cfg = json.loads((d / "LAYER.json").read_text())
    model = rs.build(cfg)
    model.load_state_dict(stio.load(d / "W.safetensors"))
    x, mask = load_input(d)
    if mask is not None:
        mask = mask.reshape(x.shape[0], -1) != 0 if x.dim() != 2 else mask.reshape(1, -1) != 0
    dy = stio.load(d / "DY.safetensors")["dy"] if grad else None
    out = reference_outputs(model, x, mask, dy, torch.float32, train)
    out.update(expected_stats(model, x))
    stio.save(d / "OUT.safetensors", out)
    return 0, ""


def check_stats(ours, want):
    problems = []
    for k, w in want.items():
        o = ours.get(k)
        if o is None:
            problems.append(f"OUT lacks {k}")
        elif o.dtype != torch.int64 or tuple(o.shape) != tuple(w.shape) or not torch.equal(o, w):
            problems.append(f"{k} {o.dtype} {list(o.shape)} {o.tolist()}, want int64 {list(w.shape)} {w.tolist()}")
    if "aux_loss" in ours:
        problems.append("OUT has 'aux_loss' (the soft layers have none)")
    return problems


def parity_case(tally, tool, c, seed):
    what = describe(c)
    with tempfile.TemporaryDirectory(prefix="moe-parity-soft-") as tmp:
        d = Path(tmp)
        model, x, mask, dy = make_case(c, seed, d)
        ours = run_tool(tally, tool, d, c["train"], c["grad"], what)
        if ours is None:
            return
        want = reference_outputs(model, x, mask, dy if c["grad"] else None, train=c["train"])
        problems = []
        for k in want:
            if k in ours and ours[k].is_floating_point() and not bool(torch.isfinite(ours[k]).all()):
                problems.append(f"{k} has non-finite values")
        problems += compare(ours, want)
        problems += check_stats(ours, expected_stats(model, x))
        if not c["grad"]:
            problems += [f"forward-only OUT has '{k}'" for k in ours if k == "dx" or k.startswith("grad.")]
        report(tally, what, problems)


# ------------------------------------------------------------------ CLI errors

def error_cases(tally, moe):
    def with_case(c, seed, edit, what, needle):
        with tempfile.TemporaryDirectory(prefix="moe-parity-soft-") as tmp:
            d = Path(tmp)
            _, x, mask, _ = make_case(c, seed, d)
            stio.save(d / "X.safetensors", edit(x, mask))
            expect_error(tally, moe, what, d, needle, fold_case=True)

    c = sd(16, 4, (2, 10, 16), mask="rand")
    with_case(c, 71, lambda x, m: {"x": x, "mask": torch.ones(2, 11, dtype=torch.bool)},
              "error: soft_dynamic mask (2, 11) for x (2, 10, 16) is rejected, naming mask", "mask")
    with_case(c, 72, lambda x, m: {"x": x, "mask": torch.ones(3, 10, dtype=torch.bool)},
              "error: soft_dynamic mask (3, 10) for x (2, 10, 16) is rejected, naming mask", "mask")
    c = soft(16, 2, (2, 16, 3, 3), slots=2, mask="rand")
    with_case(c, 73, lambda x, m: {"x": x, "mask": torch.ones(2, 8, dtype=torch.bool)},
              "error: soft image mask (2, 8) for x (2, 16, 3, 3) is rejected, naming mask", "mask")
    c = sd(16, 4, (2, 10, 16))
    with_case(c, 74, lambda x, m: {"x": torch.randn(2, 10, 17)},
              "error: soft_dynamic x (2, 10, 17) with dim 16 is rejected", None)
    c = soft(16, 4, (2, 10, 16), slots=2)
    with_case(c, 75, lambda x, m: {"x": torch.randn(2, 10, 12)},
              "error: soft x (2, 10, 12) with dim 16 is rejected", None)


# ------------------------------------------------------------------ self-test only

def stand_in_catches_errors(tally):
    """The comparison must notice a wrong tool: a stand-in that ignores the mask fails."""
    c = sd(16, 4, (2, 10, 16), mask="rand")
    with tempfile.TemporaryDirectory(prefix="moe-parity-soft-") as tmp:
        d = Path(tmp)
        model, x, mask, dy = make_case(c, 90, d)
        want = reference_outputs(model, x, mask, dy)
        wrong = reference_outputs(model, x, None, dy, torch.float32)
        wrong.update(expected_stats(model, x))
        bad = compare(wrong, want)
        tally.check(bool(bad), "self-test: a tool ignoring the mask is caught by compare()", "not caught")
        right = reference_outputs(model, x, mask, dy, torch.float32)
        right.update(expected_stats(model, x))
        right["stats.expert_counts"] = right["stats.expert_counts"] + 1
        tally.check(bool(check_stats(right, expected_stats(model, x))),
                    "self-test: wrong stats.expert_counts are caught", "not caught")
    # an eval case with dropout would catch a tool that applied dropout in eval mode (seeded draws)
    for i, c in enumerate(CASES):
        if c["train"] or not c["cfg"]["dropout"]:
            continue
        with tempfile.TemporaryDirectory(prefix="moe-parity-soft-") as tmp:
            model, x, mask, dy = make_case(c, 4000 + 10 * i, Path(tmp))
        dyg = dy if c["grad"] else None
        want = reference_outputs(model, x, mask, dyg, train=False)
        torch.manual_seed(i)
        wrong = reference_outputs(model, x, mask, dyg, torch.float32, train=True)
        tally.check(bool(compare(wrong, want)), f"self-test: dropout applied in eval is caught: {describe(c)}",
                    "not caught")


# ------------------------------------------------------------------ main

def main():
    tally = Tally()
    self_test = "--self-test" in sys.argv
    torch.set_num_threads(min(4, torch.get_num_threads()))
    if self_test:
        print("parity-soft self-test: torch-only checks (no moe binary)")
        rs.self_checks(tally.check)
        stand_in_catches_errors(tally)
        print("-- parity cases with a float32 PyTorch stand-in for the binary:")
        tool = torch_f32_tool
    else:
        moe = locate_moe("parity-soft")
        if moe is None:
            return 1

        def tool(d, train, grad):
            return run_moe(moe, forward_args(d, train, grad))

    for i, c in enumerate(CASES):
        parity_case(tally, tool, c, 4000 + 10 * i)
    if not self_test:
        error_cases(tally, moe)
    print(f"parity-soft: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
