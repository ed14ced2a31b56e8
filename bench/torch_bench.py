"""libmoe against PyTorch at its very best, in one run, on this machine.

Times a layer's forward+backward (train mode) in PyTorch, then runs
`build/moe bench --json` (fp32, and --bf16 where libmoe has it) on the same
shape and prints both and the ratios. PyTorch runs in every setting that can
make it faster, each in its own process, and the best time of all is the
yardstick: fp32 and bf16 autocast (torch.autocast('cpu', dtype=torch.bfloat16)),
1 and all threads, and OPENBLAS_CORETYPE as this process has it and unset
(OpenBLAS reads it at load time; it picks PyTorch's fp32 GEMM kernels), in
that worker process alone.
  topk:   the parity reference module (tests/parity/reference.py: per-expert
          gather with index, expert MLP, index_add - the usual eager sparse MoE)
  gshard: the seeds' formulation (tests/parity/reference_gshard.py: dense (B,N,E,C)
          dispatch and combine tensors, experts on every capacity slot), with
          the seed's defaults (policy random, capacity factor 1.25)
  soft_dynamic, soft: tests/parity/reference_soft.py (seed 003's einsum formulation;
          soft with S = N/E learned slots), E=4 experts of hidden H, GELU

  /usr/bin/python3 bench/torch_bench.py [--layer topk|gshard] [--tokens 4096] [--batch 4]
                                        [--dim 512] [--hidden 2048] [--experts 16]
                                        [--top-k 2] [--expert mlp] [--iters 5] [--threads 2]
  /usr/bin/python3 bench/torch_bench.py --table   # every shape of the README table
`make bench` runs --table; the figures go in the README.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "parity"))

try:
    import torch
    import reference as ref
    import reference_gshard as gshard_ref
    import reference_soft as soft_ref
except ImportError as e:
    sys.exit(f"torch_bench: {e}; install Debian's PyTorch: apt-get install python3-torch python3-numpy")


def torch_time(a):
    """Median seconds of the module's forward+backward in this process (a worker)."""
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    if a.layer == "gshard":
        m = gshard_ref.build(dict(type="gshard", dim=a.dim, num_experts=a.experts, hidden_dim=a.hidden))
        shape = (a.batch, a.tokens // a.batch, a.dim)
    elif a.layer.startswith("soft"):
        cfg = dict(type=a.layer, dim=a.dim, num_experts=a.experts, expert_mult=a.hidden / a.dim)
        if a.layer == "soft":
            cfg["seq_len"] = a.tokens // a.batch
        m = soft_ref.build(cfg)
        shape = (a.batch, a.tokens // a.batch, a.dim)
    else:
        m = ref.TopKMoE(a.experts, a.dim, a.hidden, a.top_k, "relu", a.expert)
        shape = (a.tokens, a.dim)
    if a.precision == "bf16" and isinstance(getattr(m, "gate", None), torch.nn.Linear):
        m.gate = ref.Fp32Gate(m.gate)  # the router in fp32, as MoE code runs it (and libmoe does)
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape)
    times = []
    for it in range(a.iters + 1):  # the first is a warm-up
        m.zero_grad(set_to_none=False)
        x.grad = None
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            y = m(x)
        if isinstance(y, tuple):
            y, aux = y
            (y * dy).sum().add(aux).backward()
        else:
            y.backward(dy)
        t1 = time.perf_counter()
        if it:
            times.append(t1 - t0)
    return statistics.median(times)


BF16_LAYERS = ("topk", "gshard")  # the layers libmoe runs in bf16 (and hierarchical)


def libmoe_json(a, bf16):
    moe = os.environ.get("MOE_BIN", str(ROOT / "build" / "moe"))
    cmd = [moe, "bench", "--json", "--layer", a.layer, "--batch", str(a.batch if a.layer != "topk" else 1),
           "--tokens", str(a.tokens), "--dim", str(a.dim), "--hidden", str(a.hidden),
           "--experts", str(a.experts), "--expert", a.expert] + (["--top-k", str(a.top_k)] if a.layer == "topk" else []) + [
           "--iters", str(a.iters), "--threads", str(a.threads)] + (["--bf16"] if bf16 else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"torch_bench: {' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def torch_settings(a):
    """(precision, threads, OPENBLAS_CORETYPE or None for unset): every setting PyTorch is tried in."""
    cores = sorted({None, os.environ.get("OPENBLAS_CORETYPE")}, key=lambda v: v or "")
    return [(p, nt, ct) for p in ("fp32", "bf16") for nt in sorted({1, a.threads}) for ct in cores]


def torch_worker_time(a, precision, nt, coretype):
    """Run this script as a worker in a fresh process with that setting; its median seconds."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    cmd = [sys.executable, __file__, "--worker", "--layer", a.layer, "--tokens", str(a.tokens), "--batch",
           str(a.batch), "--dim", str(a.dim), "--hidden", str(a.hidden), "--experts", str(a.experts), "--top-k",
           str(a.top_k), "--expert", a.expert, "--iters", str(a.iters), "--threads", str(nt), "--precision", precision]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:  # a setting PyTorch cannot run (the module under autocast): left out, said
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  torch {a.layer} ({precision}, {nt}, {coretype}) failed, left out: {last}", flush=True)
        return float("inf")
    return float(r.stdout.strip().splitlines()[-1])


def run_one(a):
    """libmoe (moe bench --json, fp32 and bf16) and PyTorch (every setting) on one shape."""
    c = libmoe_json(a, False)
    c16 = libmoe_json(a, True) if a.layer in BF16_LAYERS else None
    times = {}
    for setting in torch_settings(a):
        times[setting] = torch_worker_time(a, *setting)
        if a.verbose:
            print(f"  torch {a.layer} {setting}: {times[setting] * 1e3:.1f} ms", flush=True)
    best = min(times.items(), key=lambda kv: kv[1])
    best32 = min((v, k) for k, v in times.items() if k[0] == "fp32")
    glu = 2 if a.expert != "mlp" else 1
    # useful FLOPs: the rows the experts run (T*K for topk; libmoe's kept rows for gshard,
    # the same routing rule) through (D -> glu*H) and (H -> D), forward 1x + backward 2x
    flops = 3 * 2.0 * c["rows"] * a.dim * a.hidden * (glu + 1)  # soft: rows are FLOP-equivalent rows
    if a.layer != "topk":
        shape = f"B={a.batch} N={a.tokens // a.batch} D={a.dim} H={a.hidden} E={a.experts}"
    else:
        shape = f"T={a.tokens} D={a.dim} H={a.hidden} E={a.experts} K={a.top_k}"
    return c, c16, best, best32, flops, shape


# The table `make bench` prints: the shapes of the README.
TABLE = [
    dict(layer="topk", expert="mlp"),
    dict(layer="topk", expert="swiglu"),
    dict(layer="topk", expert="mlp", tokens=8192, dim=1024, hidden=4096, experts=8, iters=3),
    dict(layer="gshard", expert="mlp"),
    dict(layer="soft_dynamic", expert="mlp", experts=4),
    dict(layer="soft", expert="mlp", experts=4),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default="topk", choices=["topk", "gshard", "soft_dynamic", "soft"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="gshard: sequences (N = tokens / batch)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=None, help="default 16 (soft: 4)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert", default="mlp", choices=["mlp", "swiglu", "geglu"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--table", action="store_true", help="every shape of the README table, one line each")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="print every PyTorch setting's time")
    a = p.parse_args()
    if a.worker:  # one PyTorch setting, in this process: print the median seconds
        if a.experts is None:
            a.experts = 4 if a.layer.startswith("soft") else 16
        print(torch_time(a))
        return
    runs = []
    for over in (TABLE if a.table else [{}]):
        b = argparse.Namespace(**{**vars(a), **over})
        if b.experts is None:
            b.experts = 4 if b.layer.startswith("soft") else 16
        runs.append((b,) + run_one(b))
    cores = os.environ.get("OPENBLAS_CORETYPE")
    print(f"forward+backward, {a.threads} threads, medians. PyTorch {torch.__version__} at its very best: the fastest "
          f"of fp32 and bf16 autocast, 1 and {a.threads} threads, OPENBLAS_CORETYPE "
          f"{'=' + cores + ' and ' if cores else ''}unset.")
    print("libmoe: fp32, and bf16 mixed precision (autocast) for topk and gshard; each as a ratio to the peak of "
          "its precision measured in the same run, and as a speed-up over PyTorch's best (any setting).")
    print(f"{'layer':14} {'shape':34} {'fp32 GF/s':>9} {'/peak':>5} {'bf16 GF/s':>9} {'/peak':>5} "
          f"{'torch best':>16} {'fp32 x':>6} {'bf16 x':>6}")
    for b, c, c16, (bset, bt), (b32t, b32set), flops, shape in runs:
        name = f"{b.layer} {b.expert}" if b.layer == "topk" else b.layer
        p32 = c["gflops"] / c["fp32_peak_gflops"] if c.get("fp32_peak_gflops") else 0.0
        # the peak the bf16 share is taken against: bf16 dot where the level has it, else fp32 (widened GEMMs)
        p16 = (c16.get('peak_thread_sum_gflops') or c16.get('bf16_peak_gflops') or 0.0) if c16 else 0.0
        g16 = (f"{c16['gflops']:9.1f} {c16['gflops'] / p16 if p16 else 0.0:5.2f}" if c16 else f"{'-':>9} {'-':>5}")
        tb = f"{bset[0]} {bset[1]}t{' ' + bset[2] if bset[2] else ''}"
        x16 = f"{bt / c16['seconds']:5.2f}x" if c16 else f"{'-':>6}"
        print(f"{name:14} {shape:34} {c['gflops']:9.1f} {p32:5.2f} {g16} {bt * 1e3:7.0f} ms {tb:>7} "
              f"{bt / c['seconds']:5.2f}x {x16}")
        print(f"{'':14} PyTorch fp32 at its best: {b32t * 1e3:.0f} ms ({b32set[1]} threads"
              f"{', OPENBLAS_CORETYPE=' + b32set[2] if b32set[2] else ', OPENBLAS_CORETYPE unset'})")


if __name__ == "__main__":
    main()
