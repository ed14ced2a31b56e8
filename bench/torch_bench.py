"""libmoe against PyTorch, in one run, on this machine.

Times a layer's forward+backward (train mode, fp32) in PyTorch, then runs
`build/moe bench --json` on the same shape and prints both and the ratio.
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
PyTorch runs at its best of 1 and all threads (its eager sparse MoE often does better
with one thread of its own and the BLAS on all). `make bench` runs --table; the figures
go in the README.
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
    torch.manual_seed(0)
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
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape)
    times = []
    for it in range(a.iters + 1):  # the first is a warm-up
        m.zero_grad(set_to_none=False)
        x.grad = None
        t0 = time.perf_counter()
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


def run_one(a):
    """libmoe (moe bench --json) and PyTorch (at its best of 1 and all threads) on one shape."""
    moe = os.environ.get("MOE_BIN", str(ROOT / "build" / "moe"))
    cmd = [moe, "bench", "--json", "--layer", a.layer, "--batch", str(a.batch if a.layer != "topk" else 1),
           "--tokens", str(a.tokens), "--dim", str(a.dim), "--hidden", str(a.hidden),
           "--experts", str(a.experts), "--expert", a.expert] + (["--top-k", str(a.top_k)] if a.layer == "topk" else []) + [
           "--iters", str(a.iters), "--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"torch_bench: {' '.join(cmd)} failed:\n{r.stderr}")
    c = json.loads(r.stdout.strip().splitlines()[-1])
    best = None
    for nt in sorted({1, a.threads}):  # PyTorch at its best thread setting
        torch.set_num_threads(nt)
        ts = torch_time(a)
        if best is None or ts < best[0]:
            best = (ts, nt)
    torch.set_num_threads(a.threads)
    glu = 2 if a.expert != "mlp" else 1
    # useful FLOPs: the rows the experts run (T*K for topk; libmoe's kept rows for gshard,
    # the same routing rule) through (D -> glu*H) and (H -> D), forward 1x + backward 2x
    flops = 3 * 2.0 * c["rows"] * a.dim * a.hidden * (glu + 1)  # soft: rows are FLOP-equivalent rows
    if a.layer != "topk":
        shape = f"B={a.batch} N={a.tokens // a.batch} D={a.dim} H={a.hidden} E={a.experts}"
    else:
        shape = f"T={a.tokens} D={a.dim} H={a.hidden} E={a.experts} K={a.top_k}"
    return c, best, flops, shape


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
    a = p.parse_args()
    runs = []
    for over in (TABLE if a.table else [{}]):
        b = argparse.Namespace(**{**vars(a), **over})
        if b.experts is None:
            b.experts = 4 if b.layer.startswith("soft") else 16
        runs.append((b,) + run_one(b))
    print(f"forward+backward, fp32, {a.threads} threads, medians; PyTorch {torch.__version__} at its best of "
          f"1 and {a.threads} threads")
    print(f"{'layer':14} {'shape':34} {'libmoe tok/s':>12} {'GFLOP/s':>8} {'vs sgemm':>8} "
          f"{'torch tok/s':>11} {'(thr)':>5} {'libmoe/torch':>12}")
    for b, c, (ts, nt), flops, shape in runs:
        name = f"{b.layer} {b.expert}" if b.layer == "topk" else b.layer
        print(f"{name:14} {shape:34} {c['tokens_per_s']:12.0f} {c['gflops']:8.1f} {c['ratio']:8.3f} "
              f"{b.tokens / ts:11.0f} {nt:5d} {ts / c['seconds']:11.2f}x")


if __name__ == "__main__":
    main()
