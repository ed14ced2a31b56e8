#!/usr/bin/python3
"""PyTorch parity tests for `moe forward` (libmoe's CLI).

For each case: build the reference module (reference.py) from a seeded torch RNG,
save its config, weights, input x and output gradient dy, run
    moe forward --config LAYER.json --weights W.safetensors --input X.safetensors
                --out OUT.safetensors [--eval] [--grad-output DY.safetensors]
and compare OUT's `y`, `dx` and `grad.<param>` with PyTorch autograd. Mode and gradients
are independent: a case runs in train or eval mode (module.train()/.eval()), and with
--grad-output (the backward follows that mode's forward, as `m.eval(); m(x).backward(dy)`)
or without (forward only, as under torch.no_grad()).

The reference runs in float64 on the same float32 weights and inputs, so the
tolerance (rtol 1e-4, atol 1e-5) measures only libmoe's float32 error.
Top-k inputs are drawn so that no token's k-th and (k+1)-th gate logits are
within 1e-4: near ties could legitimately route differently in float32.
gshard/hierarchical (reference_gshard.py) also compare aux_loss and, exactly,
stats.expert_counts and stats.dropped; the backward is of sum(y*dy) + daux*aux_loss
(daux saved with shape () or (1)); their inputs are redrawn while any routing decision is
float32-fragile (reference_gshard.knife_edges). The random second policy is reproduced
exactly: the reference draws libmoe's counter-based uniforms (reference_gshard.rng_uniform).
bf16 mixed precision (`moe forward --bf16`, topk, gshard, hierarchical) is compared with an
emulation of libmoe's autocast (reference_bf16.py: every expert GEMM input rounded to bf16,
sums in float64) within fixed bounds, and with float64; PyTorch's own autocast is an extra
check only where its bf16 GEMMs sum in fp32 (probed; otherwise the run says it skipped it).
Run it under MOE_MAX_CPU_ISA=baseline|avx2|avx512|avx512_bf16 to test each kernel level.

Usage (from anywhere; needs Debian's python3-torch, run as /usr/bin/python3):
    /usr/bin/python3 tests/parity/run_parity.py              # needs build/moe (make)
    MOE_BIN=path/to/moe /usr/bin/python3 tests/parity/run_parity.py
    /usr/bin/python3 tests/parity/run_parity.py --self-test  # torch-only checks, no binary
    add -v to print every tensor's max error
Ends with "parity: N passed, N failed"; exits 1 if anything failed.
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
ROOT = HERE.parents[1]  # repository root: two directories above this file

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # the test must fail, not skip, without torch
    print(f"python3-torch is required: apt-get install python3-torch python3-numpy ({exc})")
    print("parity: 0 passed, 1 failed")
    sys.exit(1)

sys.path.insert(0, str(HERE))
import reference as ref  # noqa: E402
import reference_bf16 as bf16ref  # noqa: E402
import reference_gshard as refg  # noqa: E402
import stio  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
VERBOSE = "-v" in sys.argv


class Tally:
    def __init__(self, quiet=False):
        self.passed = self.failed = 0
        self.quiet = quiet  # count only (a self-test's expected failures)

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        if not self.quiet:
            print(f"PASS {what}" if ok else f"FAIL {what}" + (f" : {detail}" if detail else ""))
            sys.stdout.flush()
        return ok


# ------------------------------------------------------------------ cases

def topk(D, H, E, k, T, act="relu", expert="mlp", **extra):
    cfg = dict(type="topk", num_experts=E, input_dim=D, hidden_dim=H, top_k=k,
               activation=act, expert=expert, **extra)
    return cfg, T


def dense(D, O, E, T):
    return dict(type="dense", num_experts=E, input_dim=D, output_dim=O), T


def train_cases():
    cases = [
        topk(64, 128, 4, 2, 16),                      # the seed's defaults
        topk(32, 48, 8, 2, 40, "gelu"),
        topk(48, 64, 6, 3, 80, "silu"),
        topk(16, 32, 8, 2, 5),                        # T < E
        topk(8, 8, 10, 2, 3),                         # T << E: most experts unused
        topk(24, 40, 5, 1, 30),                       # k = 1
        topk(20, 36, 4, 4, 25, "gelu"),               # k = E
        topk(40, 72, 6, 2, 1, "silu"),                # one token
        topk(16, 24, 1, 1, 12, "gelu"),               # a single expert
        topk(32, 64, 4, 2, 33, "leaky_relu"),
        topk(28, 44, 5, 2, 24, "leaky_relu", leaky_slope=0.2),
        topk(48, 96, 8, 2, 64, expert="swiglu"),
        topk(40, 80, 6, 3, 50, expert="geglu"),
        topk(64, 160, 4, 1, 7, expert="swiglu"),      # GLU, k = 1
        topk(96, 128, 3, 3, 20, expert="geglu"),      # GLU, k = E
        topk(32, 64, 4, 2, 1, expert="swiglu"),       # GLU, one token
    ]
    rng = np.random.default_rng(12345)                # a few random shapes, fixed seed
    for _ in range(4):
        E = int(rng.integers(1, 11))
        cases.append(topk(int(rng.integers(4, 97)), int(rng.integers(4, 161)), E,
                          int(rng.integers(1, E + 1)), int(rng.integers(1, 81)),
                          str(rng.choice(["relu", "gelu", "silu", "leaky_relu"])),
                          str(rng.choice(["mlp", "mlp", "swiglu", "geglu"]))))
    cases += [
        dense(64, 64, 4, 16),                         # the seed's defaults, O == D
        dense(32, 48, 6, 40),                         # O != D
        dense(48, 16, 3, 1),                          # one row
        dense(20, 20, 8, 5),                          # T < E
        dense(96, 80, 5, 80),
        dense(12, 24, 1, 10),                         # a single expert
    ]
    return cases


# (cfg, T, grad): eval mode with the backward, and one forward-only case (no --grad-output)
EVAL_CASES = [
    (*topk(32, 64, 6, 2, 20, "gelu"), True),
    (*topk(24, 48, 5, 3, 17, expert="swiglu"), True),
    (*topk(16, 24, 4, 1, 9, "leaky_relu", leaky_slope=0.2), True),
    (*dense(24, 40, 4, 12), True),
    (*topk(32, 64, 6, 2, 20, "gelu"), False),
]


def mode_label(train, grad):
    return ("" if train else "eval ") + ("" if grad else "forward-only ")


def describe(cfg, T):
    c = cfg
    if c["type"] == "topk":
        s = (f"topk D={c['input_dim']} H={c['hidden_dim']} E={c['num_experts']} k={c['top_k']} "
             f"T={T} act={c['activation']} expert={c['expert']}")
        return s + (f" slope={c['leaky_slope']}" if "leaky_slope" in c else "")
    return f"dense D={c['input_dim']} O={c['output_dim']} E={c['num_experts']} T={T}"


# ------------------------------------------------------------------ one case

def gate_logits64(model, x):
    """Gate logits in float64 (T, E), without touching the model."""
    with torch.no_grad():
        return copy.deepcopy(model.gate).double()(x.double())


def near_tie(model, x):
    """True if some token's k-th and (k+1)-th gate logits are within 1e-4."""
    if not isinstance(model, ref.TopKMoE) or model.top_k == model.num_experts:
        return False
    s = gate_logits64(model, x).sort(dim=-1, descending=True).values
    k = model.top_k
    return bool((s[:, k - 1] - s[:, k]).min() < 1e-4)


def make_case(cfg, T, seed, d):
    """Write LAYER.json, W/X/DY.safetensors into dir d; return (model, x, dy)."""
    torch.manual_seed(seed)
    model = ref.build(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(100):  # redraw x (deterministically) while a routing near-tie exists
        x = torch.randn(T, cfg["input_dim"], generator=gen)
        if not near_tie(model, x):
            break
    else:
        raise RuntimeError(f"no tie-free input found for {describe(cfg, T)}")
    dy = torch.randn(T, ref.output_dim(model), generator=gen)
    with open(d / "LAYER.json", "w") as f:
        json.dump(cfg, f)
    stio.save(d / "W.safetensors", model.state_dict())
    stio.save(d / "X.safetensors", {"x": x})
    stio.save(d / "DY.safetensors", {"dy": dy})
    return model, x, dy


def reference_outputs(model, x, dy, dtype=torch.float64, train=True):
    """{'y', 'dx', 'grad.<name>'} from torch autograd in train or eval mode (only 'y',
    under no_grad, if dy is None)."""
    m = copy.deepcopy(model).to(dtype).train(train)
    xr = x.to(dtype).requires_grad_()
    if dy is None:
        with torch.no_grad():
            return {"y": m(xr)}
    y = m(xr)
    y.backward(dy.to(dtype))
    out = {"y": y.detach(), "dx": xr.grad}
    for name, p in m.named_parameters():  # unused experts: .grad None -> zeros
        out["grad." + name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def routed_counts(model, x):
    idx = gate_logits64(model, x).topk(model.top_k, dim=-1).indices
    return torch.bincount(idx.flatten(), minlength=model.num_experts)


def compare(ours, want, model=None, x=None):
    """List of failure strings (empty when everything matches)."""
    problems = []
    missing = [k for k in want if k not in ours]
    if missing:
        problems.append(f"OUT lacks tensors {missing}")
    for name, r in want.items():
        if name not in ours:
            continue
        o = ours[name]
        if tuple(o.shape) != tuple(r.shape):
            problems.append(f"{name} shape {list(o.shape)}, want {list(r.shape)}")
            continue
        o64, r64 = o.to(torch.float64), r.to(torch.float64)
        err = (o64 - r64).abs()
        bad = ~torch.isclose(o64, r64, rtol=RTOL, atol=ATOL)  # same test as allclose, per element
        worst = float(err.max()) if err.numel() else 0.0
        if VERBOSE:
            print(f"     {name:28s} max abs err {worst:.3g}")
        if bad.any():
            i = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err))))
            at = tuple(int(v) for v in np.unravel_index(i, tuple(r.shape))) if r.dim() else ()
            problems.append(f"{name} max abs err {worst:.3g} (at index {list(at)}: "
                            f"ours {float(o64.flatten()[i]):.6g}, torch {float(r64.flatten()[i]):.6g}), "
                            f"{int(bad.sum())} of {r.numel()} elements off")
    # optional: routing counts, if the tool writes them (top-k only; unambiguous there)
    if isinstance(model, ref.TopKMoE) and "stats.expert_counts" in ours:
        got = ours["stats.expert_counts"].to(torch.int64).flatten()
        exp = routed_counts(model, x)
        if not torch.equal(got, exp):
            problems.append(f"stats.expert_counts {got.tolist()}, want {exp.tolist()}")
    return problems


def write_case(d, cfg, model, x, dy, daux, daux_shape=()):
    """LAYER.json, W, X and DY (with 'daux' unless None, saved with shape () or (1), as
    torch.tensor(v) or torch.tensor([v])) in d; returns daux (default 1)."""
    (d / "LAYER.json").write_text(json.dumps(cfg))
    stio.save(d / "W.safetensors", model.state_dict())
    stio.save(d / "X.safetensors", {"x": x})
    extra = {} if daux is None else {"daux": torch.tensor(daux).reshape(daux_shape)}
    stio.save(d / "DY.safetensors", {"dy": dy, **extra})
    return 1.0 if daux is None else daux


def locate_moe(label):
    """The moe binary (MOE_BIN or build/moe), or None after printing the failing summary."""
    moe = os.path.abspath(os.environ["MOE_BIN"]) if os.environ.get("MOE_BIN") else str(ROOT / "build" / "moe")
    if not os.access(moe, os.X_OK):
        print(f"moe binary not found at {moe}, run make first")
        print(f"{label}: 0 passed, 1 failed")
        return None
    print(f"{label}: {moe} against PyTorch {torch.__version__} (rtol {RTOL}, atol {ATOL})")
    return moe


def run_moe(moe, args):
    """Run the moe binary; return (returncode, stderr)."""
    try:
        p = subprocess.run([moe] + args, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return 124, "timed out after 300 s"
    return p.returncode, p.stdout + p.stderr


def forward_args(d, train, grad):
    """`moe forward` on the case in d: eval mode unless train; the backward when grad."""
    a = ["forward", "--config", str(d / "LAYER.json"), "--weights", str(d / "W.safetensors"),
         "--input", str(d / "X.safetensors"), "--out", str(d / "OUT.safetensors")]
    return a + ([] if train else ["--eval"]) + (["--grad-output", str(d / "DY.safetensors")] if grad else [])


def torch_f32_tool(d, train, grad):
    """Stand-in for the binary (--self-test): the reference in float32, reading and
    writing the same files. Exercises everything but the C code."""
    cfg = json.loads((d / "LAYER.json").read_text())
    model = (refg if cfg["type"] in refg.TYPES else ref).build(cfg)
    model.load_state_dict(stio.load(d / "W.safetensors"))
    x = stio.load(d / "X.safetensors")["x"]
    dyf = stio.load(d / "DY.safetensors") if grad else {}
    if cfg["type"] in refg.TYPES:
        out = refg.outputs(model, x, dyf.get("dy"), float(dyf.get("daux", 1.0)), train, torch.float32)
    else:
        out = reference_outputs(model, x, dyf.get("dy"), torch.float32, train)
    stio.save(d / "OUT.safetensors", out)
    return 0, ""


def run_tool(tally, tool, d, train, grad, what):
    """Run the tool on the case in d; OUT's tensors, or None after recording a failure."""
    rc, log = tool(d, train, grad)
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exited {rc}"
        tally.check(False, what, f"moe forward {how}")
        if log.strip():
            print("     " + log.strip().replace("\n", "\n     "))
        return None
    try:
        return stio.load(d / "OUT.safetensors")
    except (OSError, ValueError) as exc:
        tally.check(False, what, f"cannot read OUT.safetensors: {exc}")
        return None


def report(tally, what, problems):
    tally.check(not problems, what, "; ".join(problems[:1]))
    for p in problems[1:] if not tally.quiet else ():
        print(f"     {p}")


def parity_case(tally, tool, cfg, T, seed, train=True, grad=True):
    what = mode_label(train, grad) + describe(cfg, T)
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        d = Path(tmp)
        model, x, dy = make_case(cfg, T, seed, d)
        ours = run_tool(tally, tool, d, train, grad, what)
        if ours is not None:
            want = reference_outputs(model, x, dy if grad else None, train=train)
            problems = compare(ours, want, model, x)
            if not grad:  # forward only: nothing of a backward may be written
                problems += [f"forward-only OUT has '{k}'" for k in ours if k == "dx" or k.startswith("grad.")]
            report(tally, what, problems)


# ------------------------------------------------------------------ bf16 mixed precision
# `moe forward --bf16`, forward and backward, against reference_bf16's emulation of libmoe's
# autocast: the module with every expert GEMM input (activations, weights, output gradients
# in the backward) rounded to bf16, sums in float64, nothing else rounded (the gates route in
# float64, so the routing is the fp32 one: expert counts and drops are compared exactly and
# aux_loss as in fp32). PyTorch's own autocast is not the reference: its bf16 GEMMs sum in fp32
# only where it uses oneDNN (AVX512-BF16); elsewhere torch 1.13 sums `grad @ W` in bf16 and its
# dx drifts by 3-7% from libmoe's, which is within 8e-3 of float64. Every float tensor OUT has
# (y, aux_loss, dx, every gradient) must be, in relative L2 norm:
#   within BF16_EMU_TOL of the emulation, at every kernel level (MOE_MAX_CPU_ISA) and
#   within BF16_TOL of the float64 reference (bf16's precision; measured 2e-3 to 8e-3);
# and where reference_bf16.torch_bf16_sums_fp32() finds that this PyTorch's bf16 GEMMs sum in
# fp32, also as before against the module under torch.autocast('cpu', dtype=torch.bfloat16)
# with its gate in fp32: within BF16_TOL of autocast's, and no further from float64 than
# autocast's (x1.5 + 1e-3; autocast also rounds each GEMM's output and gshard's combine).
# The self-test checks, case by case, that the bound would catch libmoe leaving one kind of
# GEMM input unrounded (reference_bf16.SKIPS): the emulation without that rounding must be
# further than BF16_SENSE (twice the bound) from the emulation in some tensor (measured: at
# least 2.3e-3), and a float32 emulation without it, standing in for the binary, must fail.
BF16_EMU_TOL = 5e-4
BF16_SENSE = 2 * BF16_EMU_TOL
BF16_TOL = 2e-2
BF16_CASES = [
    topk(64, 128, 4, 2, 16),                          # the seed's defaults
    topk(32, 48, 8, 2, 40, "gelu"),
    topk(16, 32, 8, 2, 5, "silu"),                    # T < E
    topk(20, 36, 4, 4, 25, "gelu"),                   # k = E
    topk(40, 72, 6, 2, 1, "silu"),                    # one token
    topk(48, 96, 8, 2, 64, expert="swiglu"),
    topk(40, 80, 6, 3, 50, expert="geglu"),
    topk(256, 512, 8, 2, 128, expert="swiglu"),       # a larger inner dimension
]


def autocast_outputs(model, x, dy, train=True):
    """{'y', 'dx', 'grad.<name>'} of the module in float32 under bf16 autocast (gate fp32)."""
    m = copy.deepcopy(model).float().train(train)
    m.gate = ref.Fp32Gate(m.gate)
    xr = x.detach().clone().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(xr)
    y.float().backward(dy.float())
    out = {"y": y.detach().float(), "dx": xr.grad}
    for name, p in m.named_parameters():
        out["grad." + name.replace("gate.inner.", "gate.")] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def rel_l2(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    n = float(b.norm())
    return float((a - b).norm()) / n if n > 0 else float((a - b).norm())


class Bf16Stats:
    """Whether PyTorch's autocast is a trustworthy cross-check here (probed once), and the
    worst errors of the run, printed at its end."""

    def __init__(self, sensitivity=False):
        self.trust, self.why = bf16ref.torch_bf16_sums_fp32()
        self.worst = {}  # key -> (value, case, tensor)
        self.sensitivity = sensitivity  # check that the bound sees each skipped rounding (self-test)
        self.sense = None  # (the smallest such effect, case, skip)

    def note(self, key, value, what, name):
        if key not in self.worst or value > self.worst[key][0]:
            self.worst[key] = (value, what, name)

    def header(self):
        print(f"bf16: reference: autocast emulated (reference_bf16.py); bounds: relative L2 <= {BF16_EMU_TOL:g} "
              f"to the emulation, <= {BF16_TOL:g} to float64; libmoe kernel level capped by MOE_MAX_CPU_ISA="
              f"{os.environ.get('MOE_MAX_CPU_ISA') or '(unset)'}")
        if self.trust:
            print(f"bf16: PyTorch's autocast is an extra check: {self.why}")
        else:
            print(f"bf16: NOTE: the check against PyTorch's own autocast is skipped: {self.why} "
                  f"[{bf16ref.cpu_words()}]")

    def summary(self):
        for key, label in (("emu", "the emulation"), ("f64", "float64"), ("auto", "PyTorch autocast")):
            if key in self.worst:
                v, what, name = self.worst[key]
                print(f"bf16: worst relative L2 to {label}: {v:.3g} ({name}, {what})")
        if self.sense:
            print(f"bf16: smallest effect of one unrounded GEMM input: {self.sense[0]:.3g} ({self.sense[2]}, "
                  f"{self.sense[1]}), {self.sense[0] / BF16_EMU_TOL:.3g}x the bound")


def bf16_problems(stats, what, ours, emul, exact, auto=None, mutants=None):
    """The bf16 criteria for every float tensor of the emulation (stats aside): within
    BF16_EMU_TOL of the emulation and BF16_TOL of float64; with auto (PyTorch's autocast),
    within BF16_TOL of it and no further from float64 than it (x1.5 + 1e-3). mutants:
    {skip: the emulation without that rounding}, each of which must be further than
    BF16_SENSE from the emulation in some tensor."""
    problems = []
    far = {k: 0.0 for k in (mutants or {})}
    for name, em in emul.items():
        if name.startswith("stats."):
            continue
        o = ours.get(name)
        if o is None:
            problems.append(f"OUT lacks {name}")
            continue
        if tuple(o.shape) != tuple(em.shape):
            problems.append(f"{name} shape {list(o.shape)}, want {list(em.shape)}")
            continue
        if float(exact[name].abs().max()) == 0.0:  # an expert no token chose
            if float(o.abs().max()) != 0.0:
                problems.append(f"{name} should be 0")
            continue
        e_emu, e_ours = rel_l2(o, em), rel_l2(o, exact[name])
        stats.note("emu", e_emu, what, name)
        stats.note("f64", e_ours, what, name)
        for k, mu in (mutants or {}).items():
            far[k] = max(far[k], rel_l2(mu[name], em))
        line = (f"     {name:28s} vs emulation {e_emu:.2e}  vs fp64: ours {e_ours:.2e} "
                f"emulation {rel_l2(em, exact[name]):.2e}")
        if not e_emu <= BF16_EMU_TOL:
            problems.append(f"{name}: relative L2 difference to the bf16 emulation {e_emu:.3g} > {BF16_EMU_TOL}")
        if not e_ours <= BF16_TOL:
            problems.append(f"{name}: relative L2 difference to float64 {e_ours:.3g} > {BF16_TOL}")
        if auto is not None and name in auto:
            e_auto, e_torch = rel_l2(o, auto[name]), rel_l2(auto[name], exact[name])
            stats.note("auto", e_auto, what, name)
            line += f" autocast {e_torch:.2e}  vs autocast {e_auto:.2e}"
            if not e_auto <= BF16_TOL:
                problems.append(f"{name}: relative L2 difference to autocast {e_auto:.3g} > {BF16_TOL}")
            if not e_ours <= 1.5 * e_torch + 1e-3:
                problems.append(f"{name}: error vs float64 {e_ours:.3g}, autocast's {e_torch:.3g}")
        if VERBOSE:
            print(line)
    for k, v in far.items():
        if VERBOSE:
            print(f"     the emulation without rounding the GEMMs' {k}s: up to {v:.2e} from the emulation")
        if stats.sense is None or v < stats.sense[0]:
            stats.sense = (v, what, k)
        if not v > BF16_SENSE:
            problems.append(f"the bound cannot see unrounded GEMM {k}s: the emulation without that rounding "
                            f"is within {v:.3g} of the emulation (want > {BF16_SENSE})")
    return problems


def bf16_moe(moe):
    """The bf16 tool: `moe forward --bf16` with the backward, in train (or eval) mode."""
    return lambda d, train: run_moe(moe, forward_args(d, train, True) + ["--bf16"])


def torch_bf16_tool(skip=()):
    """Stand-in for `moe forward --bf16` (--self-test): the emulation in float32 (what libmoe
    computes, up to fp32 summation order), without the roundings in skip."""
    def tool(d, train):
        cfg = json.loads((d / "LAYER.json").read_text())
        model = (refg if cfg["type"] in refg.TYPES else ref).build(cfg)
        model.load_state_dict(stio.load(d / "W.safetensors"))
        model = bf16ref.emulate(model, skip)
        x, dyf = stio.load(d / "X.safetensors")["x"], stio.load(d / "DY.safetensors")
        if cfg["type"] in refg.TYPES:
            out = refg.outputs(model, x, dyf["dy"], float(dyf.get("daux", 1.0)), train, torch.float32)
        else:
            out = reference_outputs(model, x, dyf["dy"], torch.float32, train)
        stio.save(d / "OUT.safetensors", out)
        return 0, ""
    return tool


def bf16_run(tally, tool, d, train, what):
    """OUT's tensors of the bf16 tool on the case in d, or None after recording a failure."""
    rc, log = tool(d, train)
    if rc != 0:
        tally.check(False, what, f"moe forward --bf16 exited {rc}: {log.strip()[:300]}")
        return None
    return stio.load(d / "OUT.safetensors")


def bf16_case(tally, stats, tool, cfg, T, seed):
    """One topk case; returns its problems (recorded)."""
    what = "bf16 " + describe(cfg, T)
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        d = Path(tmp)
        model, x, dy = make_case(cfg, T, seed, d)
        ours = bf16_run(tally, tool, d, True, what)
        if ours is None:
            return ["no output"]
        emul = reference_outputs(bf16ref.emulate(model), x, dy)
        mutants = ({k: reference_outputs(bf16ref.emulate(model, (k,)), x, dy) for k in bf16ref.SKIPS}
                   if stats.sensitivity else None)
        exact = reference_outputs(model, x, dy)
        auto = autocast_outputs(model, x, dy) if stats.trust else None
        problems = bf16_problems(stats, what, ours, emul, exact, auto, mutants)
        report(tally, what, problems)
        return problems


def fp32_routes(m):
    """The model's gates route in float32 under autocast (their einsums would run in bf16)."""
    for g in refg.gates(m):
        def route(x, *args, _orig=g.route, **kw):
            with torch.autocast("cpu", enabled=False):
                return _orig(x.float(), *args, **kw)
        g.route = route


def autocast_gs_outputs(model, x, dy, daux, train=True):
    """refg.outputs in float32 under bf16 autocast, the gates in fp32."""
    m = copy.deepcopy(model).float().train(train)
    fp32_routes(m)
    xr = x.detach().clone().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = m(xr)
    y, aux = y.float(), aux.float()
    ((y * dy.float()).sum() + float(daux) * aux).backward()
    out = {"y": y.detach(), "aux_loss": aux.detach().reshape(()), "dx": xr.grad}
    for name, p in m.named_parameters():
        out["grad." + name] = p.grad if p.grad is not None else torch.zeros_like(p)
    out["stats.expert_counts"] = m.stats["expert_counts"].to(torch.int64)
    out["stats.dropped"] = torch.tensor(m.stats["dropped"], dtype=torch.int64)
    return out


def bf16_gs_case(tally, stats, tool, c, seed):
    """One gshard/hierarchical case; returns its problems (recorded)."""
    what = "bf16 " + describe_gs(c)
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        d = Path(tmp)
        model, x, dy, daux = make_gs_case(c, seed, d)
        ours = bf16_run(tally, tool, d, c["train"], what)
        if ours is None:
            return ["no output"]
        emul = refg.outputs(bf16ref.emulate(model), x, dy, daux, c["train"])
        mutants = ({k: refg.outputs(bf16ref.emulate(model, (k,)), x, dy, daux, c["train"]) for k in bf16ref.SKIPS}
                   if stats.sensitivity else None)
        exact = refg.outputs(model, x, dy, daux, c["train"])
        auto = autocast_gs_outputs(model, x, dy, daux, c["train"]) if stats.trust else None
        problems = []
        for name in ("stats.expert_counts", "stats.dropped"):  # fp32 routing: the same decisions
            if name not in ours or not torch.equal(ours[name].to(torch.int64).flatten(), exact[name].flatten()):
                problems.append(f"{name} differs from the fp32 routing")
            elif not torch.equal(emul[name].flatten(), exact[name].flatten()):
                problems.append(f"{name}: the emulation routes differently from float64")
        if not torch.allclose(ours["aux_loss"].double(), exact["aux_loss"].double(), rtol=1e-4, atol=1e-6):
            problems.append(f"aux_loss {float(ours['aux_loss']):.6g}, fp32 routing gives {float(exact['aux_loss']):.6g}")
        problems += bf16_problems(stats, what, ours, emul, exact, auto, mutants)
        report(tally, what, problems)
        return problems


def bf16_cases(tally, stats, tool):
    """Every bf16 case with the tool; the number of failing cases."""
    bad = 0
    for i, (cfg, T) in enumerate(BF16_CASES):
        bad += bool(bf16_case(tally, stats, tool, cfg, T, 5000 + i))
    for i, c in enumerate(BF16_GS_CASES):
        bad += bool(bf16_gs_case(tally, stats, tool, c, 5100 + i))
    return bad


# ------------------------------------------------------------------ gshard / hierarchical
# x is (B, N, D); groups are the sequences. A case sets policy, threshold and capacity
# factor of the mode it tests and gives the other mode different ones (policy random, or
# all where the case tests random), so using the wrong mode's settings shows (the
# self-test checks that it would, case by case). Gates are scaled by gscale (default
# 1/sqrt(D): logits ~ N(0,1)); skew > 0 routes most tokens to one expert (refg.draw_input).
# grad False: forward only (no --grad-output). daux1: daux saved with shape (1).
# seed: the config's seed, which keys libmoe's random draws (and the reference's).

def gs(kind, D, E, B, N, H=None, act="relu", pol="all", t=0.2, cf=1.25, train=True,
       skew=0.0, gscale=None, daux=None, coef=None, grad=True, daux1=False, seed=None):
    mode, other = ("train", "eval") if train else ("eval", "train")
    cfg = dict(type=kind, dim=D, num_experts=E, activation=act)
    if H is not None:
        cfg["hidden_dim"] = H
    cfg.update({f"second_policy_{mode}": pol, f"second_threshold_{mode}": t, f"capacity_factor_{mode}": cf,
                f"second_policy_{other}": "all" if pol == "random" else "random",
                f"second_threshold_{other}": 0.8, f"capacity_factor_{other}": 1.5 if cf == 2.0 else 2.0})
    if coef is not None:
        cfg["loss_coef"] = coef
    if seed is not None:
        cfg["seed"] = seed
    return dict(cfg=cfg, B=B, N=N, train=train, grad=grad, skew=skew, gscale=gscale, daux=daux, daux1=daux1)


GS_CASES = [
    gs("gshard", 16, 4, 2, 16, 32),                                       # capacity 5
    gs("gshard", 32, 8, 3, 24, 64, "gelu", "none", cf=2.0),
    gs("gshard", 24, 6, 2, 37, 40, "leaky_relu", "threshold", 0.2, 1.5),
    gs("gshard", 16, 16, 2, 10, 24),                                      # N < E, capacity 4
    gs("gshard", 32, 4, 2, 64, 48, cf=1.0, skew=3.0, daux=0.7),           # overflow
    gs("gshard", 20, 5, 3, 45, 30, "gelu", "threshold", 0.1, 0.75, skew=2.5),
    gs("gshard", 12, 2, 2, 13, 20, "leaky_relu", cf=4.0),                 # capacity = N
    gs("gshard", 8, 4, 3, 3),                                             # capacity 4 > N; H = 4D
    gs("gshard", 24, 3, 1, 50, 16, "gelu", "threshold", 0.3, 2.0, gscale=1.0),  # seed's gate init
    gs("gshard", 40, 10, 2, 29, 24, "silu", "none", cf=3.0, skew=2.0, coef=0.05),
    gs("gshard", 12, 1, 2, 9, 16, "gelu", cf=0.5),                        # one expert, capacity 4
    gs("gshard", 16, 4, 2, 20, 24, pol="random", t=0.5, seed=7),          # libmoe's draws
    gs("gshard", 32, 4, 2, 48, 40, cf=1.0, skew=3.0, daux=2.5, daux1=True),  # daux shape (1)
    gs("gshard", 24, 6, 2, 30, 36, pol="threshold", t=0.25, cf=2.0, train=False),
    gs("gshard", 16, 4, 3, 40, 24, "gelu", cf=0.5, skew=3.0, train=False),
    gs("gshard", 32, 12, 2, 7, 16, pol="none", train=False),
    gs("gshard", 20, 5, 2, 25, 28, "silu", "all", cf=1.5, train=False, daux=0.7),
    gs("gshard", 16, 4, 2, 24, 32, pol="random", t=0.5, cf=2.0, train=False, seed=3),
    gs("gshard", 24, 6, 3, 30, 24, "gelu", "random", 0.6, 1.0, train=False, skew=2.5, daux=0.7),
    gs("gshard", 12, 1, 2, 9, 16, "leaky_relu", "random", 0.5, cf=0.5, train=False),  # E = 1: no second
    gs("gshard", 16, 4, 2, 24, 32, pol="random", t=0.5, cf=2.0, train=False, seed=3, grad=False),
    gs("hierarchical", 16, [2, 3], 2, 20, 24),
    gs("hierarchical", 24, [4, 4], 2, 48, 32, "gelu", "threshold", 0.2, 2.0),
    gs("hierarchical", 20, [2, 3], 3, 40, 28, pol="none", cf=1.0, skew=3.0, daux=0.7),
    gs("hierarchical", 20, [3, 2], 2, 7, 16, "leaky_relu"),
    gs("hierarchical", 32, [4, 4], 2, 64, 24, cf=0.75, skew=2.5),
    gs("hierarchical", 8, [2, 2], 1, 3),                                  # N < 4; H = 4D
    gs("hierarchical", 12, [2, 5], 3, 31, 20, "silu", "threshold", 0.3, 1.5, daux=0.7),
    gs("hierarchical", 48, [3, 3], 2, 33, 16, "gelu", cf=4.0, gscale=0.5, coef=0.05),
    gs("hierarchical", 16, [3, 1], 2, 21, 24, "leaky_relu", "threshold", 0.3),   # one inner expert
    gs("hierarchical", 16, [2, 3], 2, 24, 24, pol="random", t=0.5, seed=5),
    gs("hierarchical", 16, [2, 3], 2, 24, 24, pol="threshold", t=0.2, cf=2.0, train=False),
    gs("hierarchical", 24, [4, 4], 2, 40, 32, cf=1.0, skew=3.0, train=False),
    gs("hierarchical", 16, [3, 3], 3, 17, 20, "leaky_relu", "none", train=False),
    gs("hierarchical", 16, [2, 3], 2, 24, 24, pol="random", t=0.5, cf=1.5, train=False, seed=9),
    gs("hierarchical", 20, [3, 2], 2, 30, 24, "gelu", "random", 0.6, 1.0, train=False, skew=2.5,
       daux=2.5, daux1=True),                                             # daux shape (1), eval
    gs("hierarchical", 12, [2, 2], 2, 16, 20, "silu", "all", cf=1.25, train=False, coef=0.05),
]


BF16_GS_CASES = [
    gs("gshard", 32, 8, 3, 24, 64, "gelu", "none", cf=2.0),
    gs("gshard", 32, 4, 2, 64, 48, cf=1.0, skew=3.0, daux=0.7),            # overflow: drops
    gs("gshard", 16, 4, 2, 20, 24, pol="random", t=0.5, seed=7),           # libmoe's draws
    gs("hierarchical", 24, [4, 4], 2, 48, 32, "gelu", "threshold", 0.2, 2.0),
    gs("hierarchical", 20, [2, 3], 3, 40, 28, pol="none", cf=1.0, skew=3.0, daux=0.7),
]


def describe_gs(c):
    cfg, mode = c["cfg"], "train" if c["train"] else "eval"
    E, cf, pol = cfg["num_experts"], cfg[f"capacity_factor_{mode}"], cfg[f"second_policy_{mode}"]
    if cfg["type"] == "gshard":
        caps = f"C={refg.capacity(c['N'], cf, E)}"
    else:
        co = refg.capacity(c["N"], cf, E[0])
        caps = f"Co={co} Ci={refg.capacity(co, cf, E[1])}"
    s = (f"{cfg['type']} D={cfg['dim']} H={cfg.get('hidden_dim', 4 * cfg['dim'])} E={E} B={c['B']} N={c['N']} "
         f"act={cfg['activation']} {pol}"
         + (f"({cfg[f'second_threshold_{mode}']})" if pol in ("threshold", "random") else "")
         + f" cf={cf} {caps}")
    for k in ("skew", "gscale", "daux"):
        s += f" {k}={c[k]}" if c[k] else ""
    s += " daux(1)" if c["daux1"] else ""
    s += f" seed={cfg['seed']}" if "seed" in cfg else ""
    return mode_label(c["train"], c["grad"]) + s + (f" coef={cfg['loss_coef']}" if "loss_coef" in cfg else "")


def make_gs_case(c, seed, d):
    """Write LAYER.json, W/X/DY.safetensors into d; return (model, x, dy, daux)."""
    cfg, B, N, D = c["cfg"], c["B"], c["N"], c["cfg"]["dim"]
    torch.manual_seed(seed)
    model = refg.build(cfg)
    with torch.no_grad():
        for g in refg.gates(model):
            g.w_gating.mul_(c["gscale"] or D ** -0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    x = refg.draw_input(model, B, N, c["skew"], c["train"], gen)
    dy = torch.randn(B, N, D, generator=gen)
    return model, x, dy, write_case(d, cfg, model, x, dy, c["daux"], (1,) if c["daux1"] else ())


def check_exact_stats(ours, want):
    """Routing statistics (int64, exact): failure strings."""
    problems = []
    for k, w in want.items():
        o = ours.get(k)
        if o is None:
            problems.append(f"OUT lacks {k}")
        elif o.dtype != torch.int64 or tuple(o.shape) != tuple(w.shape) or not torch.equal(o, w):
            problems.append(f"{k} {o.dtype} {list(o.shape)} {o.tolist()}, want int64 {list(w.shape)} {w.tolist()}")
    return problems


def gs_problems(ours, want):
    """compare() of the float outputs plus the exact stats; want is not modified."""
    want = dict(want)
    stats = {k: want.pop(k) for k in ("stats.expert_counts", "stats.dropped")}
    problems = compare(ours, want)
    problems += check_exact_stats(ours, stats)
    return problems


def gs_parity_case(tally, tool, c, seed):
    train, grad = c["train"], c["grad"]
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        d = Path(tmp)
        model, x, dy, daux = make_gs_case(c, seed, d)
        want = refg.outputs(model, x, dy if grad else None, daux, train)
        dropped = int(want["stats.dropped"])
        what = describe_gs(c) + f" [dropped {dropped}]"
        ours = run_tool(tally, tool, d, train, grad, what)
        if ours is None:
            return
        problems = gs_problems(ours, want)
        if not grad:
            problems += [f"forward-only OUT has '{k}'" for k in ours if k == "dx" or k.startswith("grad.")]
        if c["skew"] and dropped == 0:
            problems.append("skewed case drops nothing: it does not test capacity overflow")
        cand, kept = refg.second_choices(model, x, train)
        pol = c["cfg"]["second_policy_" + ("train" if train else "eval")]
        if pol == "random" and c["cfg"]["num_experts"] != 1 and not 0 < kept < cand:
            problems.append(f"the random policy keeps {kept} of {cand} second choices: it decides nothing")
        report(tally, what, problems)


def gs_sensitivity(tally):
    """Self-test: each gshard/hierarchical case would catch a tool that used the other mode's
    settings, and each case with daux would catch one that read daux as 1."""
    for i, c in enumerate(GS_CASES):
        with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
            model, x, dy, daux = make_gs_case(c, 3000 + i, Path(tmp))
        dyg = dy if c["grad"] else None
        want = refg.outputs(model, x, dyg, daux, c["train"])
        wrong = refg.outputs(model, x, dyg, daux, not c["train"], torch.float32)
        tally.check(bool(gs_problems(wrong, want)), f"self-test: the other mode's settings are caught: "
                    f"{describe_gs(c)}", "train and eval give the same results")
        if c["daux"] and c["grad"]:
            wrong = refg.outputs(model, x, dy, 1.0, c["train"], torch.float32)
            tally.check(bool(gs_problems(wrong, want)), f"self-test: daux read as 1 is caught: {describe_gs(c)}",
                        "not caught")


# ------------------------------------------------------------------ CLI errors

def expect_error(tally, moe, what, d, needle, fold_case=False, train=False, grad=False, flags=(), code=None):
    """`moe forward` on the case in d (default: --eval, no --grad-output) must fail cleanly
    (no signal; exit status `code` when given), its output naming needle (None: any
    message; a list: every one of them; fold_case: compared in lower case)."""
    rc, log = run_moe(moe, forward_args(d, train, grad) + list(flags))
    needles = [] if needle is None else [needle] if isinstance(needle, str) else list(needle)
    text = log.lower() if fold_case else log
    lacks = [n for n in needles if n not in text]
    if rc == 0:
        tally.check(False, what, "moe forward succeeded")
    elif rc < 0:
        tally.check(False, what, f"moe forward killed by signal {-rc}: {log.strip()[:300]}")
    elif code is not None and rc != code:
        tally.check(False, what, f"moe forward exited {rc}, want {code}: {log.strip()[:300]}")
    else:
        tally.check(not lacks, what, f"output lacks {lacks}: {log.strip()[:300]}")


def error_cases(tally, moe):

    for cfg, T, drop in [(*topk(16, 32, 4, 2, 6), "experts.1.net.2.bias"),
                         (*dense(16, 8, 3, 6), "experts.2.weight")]:
        with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
            d = Path(tmp)
            model, _, _ = make_case(cfg, T, 7, d)
            sd = model.state_dict()
            del sd[drop]
            stio.save(d / "W.safetensors", sd)
            expect_error(tally, moe, f"error: {cfg['type']} weights without {drop} is rejected, naming it", d, drop)

    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        d = Path(tmp)
        make_case(topk(16, 32, 4, 2, 6)[0], 6, 8, d)
        cfg = json.loads((d / "LAYER.json").read_text())
        cfg["top_k"] = 5
        (d / "LAYER.json").write_text(json.dumps(cfg))
        expect_error(tally, moe, "error: top_k = 5 > num_experts = 4 is rejected, naming top_k", d, "top_k")


# ------------------------------------------------------------------ torch-only checks

def dense_quirk(tally):
    """Why libmoe's dense layer does not reproduce seed 002 literally."""
    torch.manual_seed(3)
    model = ref.DenseMoE(4, 16, 8).double()
    x = torch.randn(6, 16, dtype=torch.float64)
    intended, seed_out = model(x), ref.seed_broadcast_output(model, x)
    diff = float((intended - seed_out).abs().max())
    tally.check(diff > 1e-3, f"dense quirk: seed 002's broadcast output differs from the per-row "
                f"mixture for T=6 (max diff {diff:.3g})", "they agree; the quirk note is wrong")
    with torch.no_grad():  # its closed form: every row mixed by the batch-summed gates
        g = F.softmax(model.gate(x), dim=-1).sum(dim=0)
        closed = (g[None, :, None] * model.expert_outputs(x)).sum(dim=1)
    tally.check(torch.allclose(seed_out, closed, rtol=1e-12, atol=1e-12),
                "dense quirk: seed output == sum_e (sum_b' g[b',e]) * expert_e(x[b])")
    x1 = x[:1]
    tally.check(torch.allclose(model(x1), ref.seed_broadcast_output(model, x1), rtol=1e-12, atol=1e-12),
                "dense quirk: seed output == per-row mixture when T=1")


def stio_roundtrip(tally):
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        p = Path(tmp) / "t.safetensors"
        g = torch.Generator().manual_seed(0)
        tensors = {
            "f32": torch.randn(3, 5, generator=g),
            "f64": torch.randn(4, dtype=torch.float64, generator=g),
            "f16": torch.randn(2, 3, generator=g).half(),
            "bf16": torch.randn(7, generator=g).bfloat16(),
            "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
            "i32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
            "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "np_f32": np.arange(6, dtype=np.float32).reshape(3, 2),
        }
        stio.save(p, tensors, metadata={"format": "pt", "n": 3})
        back = stio.load(p)
        ok = list(back) == list(tensors)
        for k, t in tensors.items():
            t = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
            ok = ok and back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)
        tally.check(ok, "stio: save/load round trip of F32 F64 F16 BF16 I64 I32 U8 BOOL, scalar, empty")
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        ends = [hdr[k]["data_offsets"] for k in tensors]
        contiguous = all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[0][0] == 0
        tally.check((8 + n) % 8 == 0 and contiguous and ends[-1][1] == len(raw) - 8 - n
                    and stio.load_metadata(p) == {"format": "pt", "n": "3"},
                    "stio: header padded to 8, offsets contiguous in insertion order, metadata kept")
        # byte-exact against the format description
        stio.save(p, {"a": torch.tensor([1.0, 2.0])})
        h = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
        h += b" " * ((-(8 + len(h))) % 8)
        want = len(h).to_bytes(8, "little") + h + np.array([1, 2], "<f4").tobytes()
        tally.check(p.read_bytes() == want, "stio: byte-exact tiny file")


def act_formula(h, cfg):
    """Activations written out from their definitions (independent of nn modules)."""
    a = cfg.get("activation", "relu")
    if a == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if a == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if a == "silu":
        return h / (1 + torch.exp(-h))
    return torch.where(h > 0, h, cfg.get("leaky_slope", 0.01) * h)


def naive_topk(model, cfg, x):
    """Per-token loop from the definition: y[t] = sum_j w[t,j] * expert_{i_j}(x[t])."""
    E, k, H = cfg["num_experts"], cfg["top_k"], cfg["hidden_dim"]
    rows = []
    for t in range(x.shape[0]):
        logits = model.gate.weight @ x[t] + model.gate.bias
        chosen = sorted(range(E), key=lambda e: -float(logits[e]))[:k]
        sel = torch.stack([logits[e] for e in chosen])
        w = torch.exp(sel - sel.max())
        w = w / w.sum()
        y = 0
        for j, e in enumerate(chosen):
            net = model.experts[e].net
            h = net[0].weight @ x[t] + net[0].bias
            if cfg["expert"] == "mlp":
                h = act_formula(h, cfg)
            else:
                a, g = h[:H], h[H:]
                glu = "silu" if cfg["expert"] == "swiglu" else "gelu"
                h = a * act_formula(g, {"activation": glu})
            y = y + w[j] * (net[2].weight @ h + net[2].bias)
        rows.append(y)
    return torch.stack(rows)


def naive_dense(model, x):
    rows = []
    for b in range(x.shape[0]):
        logits = model.gate.weight @ x[b] + model.gate.bias
        g = torch.exp(logits - logits.max())
        g = g / g.sum()
        rows.append(sum(g[e] * (ex.weight @ x[b] + ex.bias) for e, ex in enumerate(model.experts)))
    return torch.stack(rows)


def modules_vs_naive(tally):
    """Reference modules (forward and every gradient) against the naive loops."""
    for i, (cfg, T) in enumerate(train_cases()):
        torch.manual_seed(100 + i)
        model = ref.build(cfg).double()
        x = torch.randn(T, cfg["input_dim"], dtype=torch.float64)
        dy = torch.randn(T, ref.output_dim(model), dtype=torch.float64)
        outs = []
        for fn in (lambda m, xx: m(xx),
                   lambda m, xx: naive_topk(m, cfg, xx) if cfg["type"] == "topk" else naive_dense(m, xx)):
            m = copy.deepcopy(model)
            xx = x.clone().requires_grad_()
            y = fn(m, xx)
            y.backward(dy)
            o = {"y": y.detach(), "dx": xx.grad}
            o.update({"grad." + n: (p.grad if p.grad is not None else torch.zeros_like(p))
                      for n, p in m.named_parameters()})
            outs.append(o)
        bad = [k for k in outs[1] if not torch.allclose(outs[0][k], outs[1][k], rtol=1e-10, atol=1e-12)]
        tally.check(not bad, f"reference == naive loop (y, dx, grads): {describe(cfg, T)}",
                    f"differs in {bad}")


def state_dict_layout(tally):
    def keys_of(cfg):
        return [(k, list(v.shape)) for k, v in ref.build(cfg).state_dict().items()]

    def expect(cfg, per_expert, gate_shapes):
        E = cfg["num_experts"]
        want = [(f"experts.{i}.{n}", s) for i in range(E) for n, s in per_expert]
        want += [("gate.weight", gate_shapes[0]), ("gate.bias", gate_shapes[1])]
        got = keys_of(cfg)
        print(f"     {cfg}:")
        for k, s in got:
            print(f"       {k:24s} {s}")
        tally.check(got == want, f"state_dict names/shapes/order: {cfg['type']} {cfg.get('expert', '')}",
                    f"got {got}")

    D, H, E, O = 6, 10, 3, 5
    mlp = [("net.0.weight", [H, D]), ("net.0.bias", [H]), ("net.2.weight", [D, H]), ("net.2.bias", [D])]
    glu = [("net.0.weight", [2 * H, D]), ("net.0.bias", [2 * H]), ("net.2.weight", [D, H]), ("net.2.bias", [D])]
    expect(topk(D, H, E, 2, 1)[0], mlp, ([E, D], [E]))
    expect(topk(D, H, E, 2, 1, expert="swiglu")[0], glu, ([E, D], [E]))
    expect(dense(D, O, E, 1)[0], [("weight", [O, D]), ("bias", [O])], ([E, D], [E]))
    m = ref.build({"type": "topk"})
    tally.check((m.num_experts, m.top_k, m.gate.in_features, m.experts[0].net[0].out_features) == (4, 2, 64, 128)
                and ref.output_dim(ref.build({"type": "dense"})) == 64,
                "build(): seed defaults (topk E=4 K=2 D=64 H=128, dense O=64)")
    msgs = []
    for bad in ({"type": "topk", "num_experts": 4, "top_k": 5}, {"type": "dense", "hidden": 3}, {"type": "x"}):
        try:
            ref.build(bad)
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    tally.check(None not in msgs and "top_k" in msgs[0], "build(): rejects k > E, unknown keys, unknown type",
                str(msgs))


# ------------------------------------------------------------------ main

def main():
    tally = Tally()
    self_test = "--self-test" in sys.argv
    torch.set_num_threads(min(4, torch.get_num_threads()))
    if self_test:
        print("parity self-test: torch-only checks (no moe binary)")
        stio_roundtrip(tally)
        state_dict_layout(tally)
        modules_vs_naive(tally)
        dense_quirk(tally)
        refg.self_checks(tally.check)
        gs_sensitivity(tally)
        print("-- parity cases with a float32 PyTorch stand-in for the binary:")
        tool = torch_f32_tool
    else:
        moe = locate_moe("parity")
        if moe is None:
            return 1

        def tool(d, train, grad):
            return run_moe(moe, forward_args(d, train, grad))

    for i, (cfg, T) in enumerate(train_cases()):
        parity_case(tally, tool, cfg, T, 1000 + i)
    for i, (cfg, T, grad) in enumerate(EVAL_CASES):
        parity_case(tally, tool, cfg, T, 2000 + i, train=False, grad=grad)
    for i, c in enumerate(GS_CASES):
        gs_parity_case(tally, tool, c, 3000 + i)
    stats = Bf16Stats(sensitivity=self_test)
    stats.header()
    if self_test:  # the bf16 harness: a float32 emulation passes; one that skips a rounding fails
        print("-- bf16 cases with a float32 emulation standing in for the binary:")
        bf16_cases(tally, stats, torch_bf16_tool())
        for skip in bf16ref.SKIPS:
            print(f"-- bf16 cases with a float32 emulation that does not round the GEMMs' {skip}s (must fail):")
            n = bf16_cases(Tally(quiet=True), Bf16Stats(), torch_bf16_tool((skip,)))
            tally.check(n == len(BF16_CASES) + len(BF16_GS_CASES), f"self-test: unrounded GEMM {skip}s fail "
                        f"every bf16 case ({n} of {len(BF16_CASES) + len(BF16_GS_CASES)})")
    else:
        bf16_cases(tally, stats, bf16_moe(moe))
    stats.summary()
    bf16ref.self_checks(tally.check)
    if not self_test:
        error_cases(tally, moe)
        dense_quirk(tally)
        refg.self_checks(tally.check)
    print(f"parity: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
