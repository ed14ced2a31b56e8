#!/usr/bin/python3
"""`mpirun -np P moe forward --ep` against one process `moe forward`.

For each case: PyTorch reference modules (tests/parity) give a state_dict, a
random x and dy are saved, then
    moe forward --config C --weights W --input X --out ONE --grad-output DY
    mpirun -np P moe forward --ep --config C --weights W --input X --out EP --grad-output DY
and every tensor of EP must equal ONE's (y, aux_loss, stats.*, dx, every grad.*)
within rtol 1e-5, atol 1e-6 (integers exactly). The expert-parallel batch is
split over the ranks by groups, each rank's groups being its own (capacity,
balance loss); so a 2-D x (T, D), which becomes P groups of T/P rows, is
compared with one process on x reshaped to (P, T/P, D). Also: the exit codes
and messages of bad input (E not divisible by P, NaN in x), with P = 2 and 4.
Ends with "forward --ep: N passed, N failed".
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parity"))
try:
    import torch
    import reference as ref
    import reference_gshard as refg
    import reference_router as rr
    import stio
except ImportError as exc:  # fail, not skip
    print(f"python3-torch is required: apt-get install python3-torch python3-numpy ({exc})")
    print("forward --ep: 0 passed, 1 failed")
    sys.exit(1)

MOE = os.environ.get("MOE_BIN", str(ROOT / "build" / "moe"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
passed = failed = 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {what}")
    else:
        failed += 1
        print(f"FAIL {what}" + (f": {detail}" if detail else ""))
    sys.stdout.flush()


def run(args, ranks=0):
    cmd = (["mpirun", "--oversubscribe", "-np", str(ranks)] if ranks else []) + [MOE] + args
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return p.returncode, p.stdout + p.stderr


def build(cfg):
    cfg = {k: v for k, v in cfg.items() if k != "bf16"}  # a precision, not a module argument
    t = cfg["type"]
    if t in refg.TYPES:
        return refg.build(cfg)
    if any(k in cfg for k in ("router", "score", "num_shared_experts", "expert_bias", "capacity_factor",
                              "balance_coef", "z_loss_coef")):
        return rr.build(cfg)
    return ref.build(cfg)


def case(label, cfg, shape, P, extra=(), eval_mode=False):
    with tempfile.TemporaryDirectory(prefix="moe-ep-") as tmp:
        d = Path(tmp)
        torch.manual_seed(len(label) * 31 + P)
        model = build(cfg)
        D = shape[-1]
        g = torch.Generator().manual_seed(P * 1000 + len(label))
        x = torch.randn(*shape, generator=g)
        O = cfg.get("output_dim", D) if cfg["type"] == "dense" else D
        dy = torch.randn(*shape[:-1], O, generator=g)
        (d / "C.json").write_text(json.dumps(cfg))
        stio.save(d / "W.safetensors", model.state_dict())
        stio.save(d / "X.safetensors", {"x": x})
        stio.save(d / "DY.safetensors", {"dy": dy, "daux": torch.tensor([0.7])})
        one_x = x if x.dim() == 3 else x.reshape(P, shape[0] // P, D)
        stio.save(d / "X1.safetensors", {"x": one_x})
        stio.save(d / "DY1.safetensors", {"dy": dy.reshape(*one_x.shape[:-1], O), "daux": torch.tensor([0.7])})
        common = ["--config", str(d / "C.json"), "--weights", str(d / "W.safetensors")] + list(extra)
        if eval_mode:
            common.append("--eval")
        rc1, log1 = run(["forward"] + common + ["--input", str(d / "X1.safetensors"), "--out", str(d / "ONE.st"),
                                                "--grad-output", str(d / "DY1.safetensors"), "--threads", "1"])
        rc2, log2 = run(["forward", "--ep"] + common + ["--input", str(d / "X.safetensors"), "--out",
                                                        str(d / "EP.st"), "--grad-output", str(d / "DY.safetensors")],
                        ranks=P)
        what = f"P={P} {label}"
        if rc1 != 0 or rc2 != 0:
            check(False, what, f"one process exited {rc1}, --ep exited {rc2}: {(log1 + log2).strip()[:400]}")
            return
        one, ep = stio.load(d / "ONE.st"), stio.load(d / "EP.st")
        problems = [] if list(one) == list(ep) else [f"tensors {list(one)} vs {list(ep)}"]
        for k, a in one.items():
            b = ep.get(k)
            if b is None:
                continue
            b = b.reshape(a.shape) if b.numel() == a.numel() else b
            if a.dtype in (torch.int64, torch.int32):
                if not torch.equal(a, b):
                    problems.append(f"{k}: {b.tolist()} vs one process {a.tolist()}")
            elif a.shape != b.shape or not torch.allclose(b.double(), a.double(), rtol=1e-5, atol=1e-6):
                err = (b.double() - a.double()).abs().max().item() if a.shape == b.shape else float("nan")
                problems.append(f"{k}: max error {err:.3g}")
        check(not problems, what + f" ({len(one)} tensors)", "; ".join(problems[:3]))


def errors(P):
    with tempfile.TemporaryDirectory(prefix="moe-ep-") as tmp:
        d = Path(tmp)
        cfg = dict(type="topk", num_experts=6, input_dim=8, hidden_dim=8, top_k=2)
        (d / "C.json").write_text(json.dumps(cfg))
        x = torch.randn(4, 3, 8)
        stio.save(d / "X.safetensors", {"x": x})
        rc, log = run(["forward", "--ep", "--config", str(d / "C.json"), "--input", str(d / "X.safetensors"),
                       "--out", str(d / "O.st")], ranks=P)
        want = "not divisible by the" if 6 % P else None
        check(rc == 1 and (want is None or want in log) if want else rc == 0,
              f"P={P} num_experts 6: {'a clear error' if want else 'runs'}", f"exit {rc}: {log.strip()[:300]}")
        cfg["num_experts"] = 8
        (d / "C.json").write_text(json.dumps(cfg))
        x[3, 1, 2] = float("nan")  # in the last rank's groups
        stio.save(d / "X.safetensors", {"x": x})
        rc, log = run(["forward", "--ep", "--config", str(d / "C.json"), "--input", str(d / "X.safetensors"),
                       "--out", str(d / "O.st")], ranks=P)
        check(rc == 1 and "is NaN" in log and "rank" in log, f"P={P} NaN in one rank's x: every rank exits 1",
              f"exit {rc}: {log.strip()[:300]}")


def main():
    if subprocess.run(["sh", "-c", "command -v mpirun"], capture_output=True).returncode != 0:
        print("mpirun not found: tools/deps.sh test installs openmpi-bin")
        print("forward --ep: 0 passed, 1 failed")
        return 1
    topk = dict(type="topk", num_experts=8, input_dim=16, hidden_dim=12, top_k=2)
    for P in (2, 4):
        case("topk 2-D x", topk, (24, 16), P)
        case("topk swiglu eval", dict(topk, expert="swiglu"), (4, 6, 16), P, eval_mode=True)
        case("mixtral + z-loss", dict(topk, router="mixtral", z_loss_coef=1e-3), (4, 7, 16), P)
        case("st_moe capacity 0.5", dict(topk, router="st_moe", capacity_factor=0.5), (8, 5, 16), P)
        case("switch (jitter) uneven groups", dict(topk, router="switch"), (5, 6, 16), P)
        case("deepseek_v3 shared gated, groups", dict(topk, router="deepseek_v3", num_shared_experts=1,
                                                      shared_gate=True, num_groups=4, topk_groups=2,
                                                      balance_coef=0.01), (4, 6, 16), P)
        case("expert_choice", dict(topk, router="expert_choice"), (4, 8, 16), P)
        case("mask 3, force 0", dict(topk, router="mixtral"), (4, 5, 16), P,
             extra=("--mask-experts", "3", "--force-experts", "0"))
        gs = dict(type="gshard", dim=16, num_experts=8, hidden_dim=12, second_policy_train="all",
                  capacity_factor_train=1.0)
        case("gshard all, drops", gs, (4, 16, 16), P)
        case("gshard threshold eval", dict(gs, second_policy_eval="threshold", capacity_factor_eval=1.5),
             (4, 12, 16), P, eval_mode=True)
        case("dense O != D", dict(type="dense", num_experts=8, input_dim=16, output_dim=12), (4, 5, 16), P)
        case("hierarchical threshold, drops", dict(type="hierarchical", dim=16, num_experts=[4, 2], hidden_dim=12,
                                                   second_policy_train="threshold", capacity_factor_train=1.0),
             (4, 12, 16), P)
        # bf16 mixed precision: each expert's GEMMs see the same rows on its owner as in one process
        case("topk swiglu bf16", dict(topk, expert="swiglu", bf16=True), (4, 6, 16), P)
        case("gshard bf16 (--bf16)", gs, (4, 16, 16), P, extra=("--bf16",))
        case("hierarchical bf16", dict(type="hierarchical", dim=16, num_experts=[4, 2], hidden_dim=12, bf16=True),
             (4, 12, 16), P)
        errors(P)
    print(f"forward --ep: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
