#!/usr/bin/python3
"""PyTorch parity tests of `moe forward` for the gshard and hierarchical layers.

For each case: build the reference module (gshard_ref.py) from a seeded torch
RNG, save its config, weights, x (B, N, D) and dy (plus daux = 0.7, the weight
of the balance loss), run `moe forward` in train mode (with --grad-output) or
eval mode, and compare y, aux_loss, dx and every parameter gradient with
PyTorch autograd of (sum(y * dy) + daux * aux_loss), and the routing
statistics (stats.expert_counts, stats.dropped) exactly.

The reference runs in float64 on the same float32 weights and inputs, so the
tolerance (rtol 1e-4, atol 1e-5) measures only libmoe's float32 error. Inputs
are redrawn while a discrete decision sits within 1e-5 of flipping (first vs
second and second vs third gate, normalised g2 vs the threshold, an outer gate
value vs 0.5): float32 could then legitimately decide otherwise.

    /usr/bin/python3 tests/parity/run_parity_gshard.py [--self-test] [-v]
--self-test checks the reference alone (no binary). Ends with
"parity-gshard: N passed, N failed"; exits 1 if anything failed.
"""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

try:
    import torch
except ImportError as exc:  # fail, not skip, without torch
    print(f"python3-torch is required: apt-get install python3-torch python3-numpy ({exc})")
    print("parity-gshard: 0 passed, 1 failed")
    sys.exit(1)

sys.path.insert(0, str(HERE))
import gshard_ref as ref  # noqa: E402
import stio  # noqa: E402

RTOL, ATOL, MARGIN, DAUX = 1e-4, 1e-5, 1e-5, 0.7
VERBOSE = "-v" in sys.argv


class Tally:
    def __init__(self):
        self.passed = self.failed = 0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"PASS {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f" : {detail}" if detail else ""))
        sys.stdout.flush()
        return ok


def gs(D, E, H, B, N, pol="all", act="relu", **kw):
    cfg = dict(type="gshard", dim=D, num_experts=E, hidden_dim=H, activation=act,
               second_policy_train=pol, second_policy_eval=pol, **kw)
    return cfg, B, N


def hi(D, Eo, Ei, H, B, N, pol="all", act="relu", **kw):
    cfg = dict(type="hierarchical", dim=D, num_experts=[Eo, Ei], hidden_dim=H, activation=act,
               second_policy_train=pol, second_policy_eval=pol, **kw)
    return cfg, B, N


# (cfg, B, N), skew: skew > 0 adds skew to gate column 0 and makes x positive, so most
# tokens pick expert 0 and capacity overflows
CASES = [
    (gs(16, 4, 24, 2, 16), 0),
    (gs(16, 4, 24, 2, 16, "none"), 0),
    (gs(16, 4, 24, 2, 16, "threshold", second_threshold_train=0.3, second_threshold_eval=0.25), 0),
    (gs(24, 8, 20, 3, 40, "all", "gelu", capacity_factor_train=1.0), 2.0),
    (gs(24, 8, 20, 3, 40, "threshold", "leaky_relu", capacity_factor_train=0.75), 2.0),
    (gs(12, 6, 16, 2, 3), 0),                                     # N < E: capacity 4 > N
    (gs(20, 5, 12, 1, 37, "all", "silu", capacity_factor_train=0.5), 0),  # capacity at the minimum 4
    (gs(32, 4, 48, 2, 50, "all", "relu", capacity_factor_train=4.0), 0),  # capacity = N
    (gs(8, 1, 8, 2, 9, "all"), 0),                                # one expert
    (gs(16, 4, None, 2, 24, "all", loss_coef=0.5), 0),           # hidden_dim None: 4 * dim
    (hi(16, 2, 3, 12, 2, 20), 0),
    (hi(16, 2, 3, 12, 2, 20, "none"), 0),
    (hi(16, 2, 3, 12, 2, 20, "threshold", "gelu", second_threshold_train=0.3), 0),
    (hi(20, 4, 4, 16, 3, 40, "all", "relu", capacity_factor_train=0.8), 1.5),
    (hi(12, 3, 2, 10, 2, 33, "threshold", "leaky_relu", capacity_factor_train=1.0, second_threshold_train=0.1), 0),
    (hi(8, 2, 4, 8, 1, 5), 0),                                     # N < Eo*Ei
]
EVAL_CASES = [  # eval mode: the eval policy, threshold and capacity factor
    (gs(16, 4, 24, 2, 16, "threshold", second_threshold_eval=0.35, capacity_factor_eval=1.0), 0),
    (gs(24, 8, 20, 3, 40, "all", "gelu", capacity_factor_eval=0.75), 2.0),
    (gs(16, 4, 24, 2, 16, "none"), 0),
    (hi(16, 2, 3, 12, 2, 20, "all"), 0),
    (hi(20, 4, 4, 16, 3, 40, "threshold", capacity_factor_eval=0.9), 1.5),
]


def describe(cfg, B, N, skew, train):
    c = dict(cfg)
    t = c.pop("type")
    extra = {k: v for k, v in c.items() if k not in ("dim", "num_experts", "hidden_dim", "activation",
                                                      "second_policy_train", "second_policy_eval")}
    return (f"{'' if train else 'eval '}{t} D={c['dim']} E={c['num_experts']} H={c.get('hidden_dim')} "
            f"B={B} N={N} {c['second_policy_train']} {c['activation']}" + (f" skew={skew}" if skew else "")
            + (f" {extra}" if extra else ""))


def reference(model, x, dy, train, dtype=torch.float64, probe=None):
    m = copy.deepcopy(model).to(dtype)
    m.train(train)
    stats = {}
    xr = x.to(dtype).requires_grad_(train)
    y, aux = m(xr, probe=probe, stats=stats)
    out = {"y": y.detach(), "aux_loss": aux.detach(), "stats.expert_counts": stats["expert_counts"],
           "stats.dropped": torch.tensor(stats["dropped"], dtype=torch.int64)}
    if train:
        ((y * dy.to(dtype)).sum() + DAUX * aux).backward()
        out["dx"] = xr.grad
        for name, p in m.named_parameters():
            out["grad." + name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def make_case(cfg, B, N, skew, seed, train, d):
    torch.manual_seed(seed)
    model = ref.build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "w_gating" in name and skew:
                p[..., 0] += skew
    gen = torch.Generator().manual_seed(seed + 1)
    D = cfg["dim"]
    for _ in range(200):
        x = torch.randn(B, N, D, generator=gen)
        if skew:
            x = x.abs()
        probe = ref.Probe()
        with torch.no_grad():
            m = copy.deepcopy(model).double()
            m.train(train)
            m(x.double(), probe=probe)
        if probe.margin > MARGIN:
            break
    else:
        raise RuntimeError("no knife-edge-free input found")
    dy = torch.randn(B, N, D, generator=gen)
    (d / "LAYER.json").write_text(json.dumps(cfg))
    stio.save(d / "W.safetensors", model.state_dict())
    stio.save(d / "X.safetensors", {"x": x})
    stio.save(d / "DY.safetensors", {"dy": dy, "daux": torch.tensor(DAUX)})
    return model, x, dy


def compare(ours, want):
    problems = [f"OUT lacks {k}" for k in want if k not in ours]
    for name, r in want.items():
        if name not in ours:
            continue
        o = ours[name]
        if tuple(o.shape) != tuple(r.shape):
            problems.append(f"{name} shape {list(o.shape)}, want {list(r.shape)}")
            continue
        if name.startswith("stats."):
            if not torch.equal(o.to(torch.int64), r.to(torch.int64)):
                problems.append(f"{name} {o.tolist()}, want {r.tolist()}")
            continue
        o64, r64 = o.double(), r.double()
        err = (o64 - r64).abs()
        bad = ~torch.isclose(o64, r64, rtol=RTOL, atol=ATOL)
        if VERBOSE:
            print(f"     {name:28s} max abs err {float(err.max()) if err.numel() else 0:.3g}")
        if bad.any():
            i = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err))))
            problems.append(f"{name} max abs err {float(err.max()):.3g} (ours {float(o64.flatten()[i]):.6g}, "
                            f"torch {float(r64.flatten()[i]):.6g}), {int(bad.sum())} of {r.numel()} off")
    return problems


def parity_case(tally, moe, cfg, B, N, skew, seed, train):
    what = describe(cfg, B, N, skew, train)
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        d = Path(tmp)
        model, x, dy = make_case(cfg, B, N, skew, seed, train, d)
        args = [moe, "forward", "--config", str(d / "LAYER.json"), "--weights", str(d / "W.safetensors"),
                "--input", str(d / "X.safetensors"), "--out", str(d / "OUT.safetensors")]
        args += ["--grad-output", str(d / "DY.safetensors")] if train else ["--eval"]
        p = subprocess.run(args, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            tally.check(False, what, f"moe forward exited {p.returncode}: {(p.stdout + p.stderr).strip()[:300]}")
            return
        ours = stio.load(d / "OUT.safetensors")
        want = reference(model, x, dy, train)
        problems = compare(ours, want)
        if skew and int(want["stats.dropped"]) == 0:
            problems.append("skewed case dropped nothing: it does not test capacity")
        tally.check(not problems, what + f" (dropped {int(want['stats.dropped'])})", "; ".join(problems[:2]))


def self_test(tally):
    """The reference alone: capacity values, autograd runs, and shapes."""
    tally.check([ref.capacity(1024, 1.25, 16), ref.capacity(3, 1.25, 6), ref.capacity(10, 100, 2)] == [80, 4, 10],
                "capacity formula: 80, 4 (minimum), N (cap)")
    for (cfg, B, N), skew in CASES[:1] + CASES[10:11]:
        torch.manual_seed(0)
        m = ref.build(cfg).double()
        x = torch.randn(B, N, cfg["dim"], dtype=torch.float64, requires_grad=True)
        stats = {}
        y, aux = m(x, stats=stats)
        (y.sum() + aux).backward()
        E = cfg["num_experts"] if cfg["type"] == "gshard" else cfg["num_experts"][0] * cfg["num_experts"][1]
        tally.check(y.shape == x.shape and aux.dim() == 0 and x.grad is not None and
                    stats["expert_counts"].numel() == E,
                    f"reference {cfg['type']} runs under autograd with the seed's shapes")
    names = [(k, list(v.shape)) for k, v in ref.build(hi(6, 2, 3, 5, 1, 1)[0]).state_dict().items()]
    tally.check(names == [("gate_outer.w_gating", [6, 2]), ("gate_inner.w_gating", [2, 6, 3]),
                          ("experts.w1", [2, 3, 6, 5]), ("experts.w2", [2, 3, 5, 6])],
                "hierarchical state_dict names and shapes", str(names))


def main():
    tally = Tally()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    self_test(tally)
    if "--self-test" not in sys.argv:
        moe = os.path.abspath(os.environ["MOE_BIN"]) if os.environ.get("MOE_BIN") else str(ROOT / "build" / "moe")
        if not os.access(moe, os.X_OK):
            print(f"moe binary not found at {moe}, run make first")
            tally.check(False, "moe binary present")
        else:
            for i, ((cfg, B, N), skew) in enumerate(CASES):
                parity_case(tally, moe, cfg, B, N, skew, 3000 + i, True)
            for i, ((cfg, B, N), skew) in enumerate(EVAL_CASES):
                parity_case(tally, moe, cfg, B, N, skew, 4000 + i, False)
    print(f"parity-gshard: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
