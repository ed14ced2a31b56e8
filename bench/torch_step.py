"""libmoe.torch inside a PyTorch training step, against `moe bench` and the seed's module.

In one run, at the `moe bench` shape (topk T=4096 D=512 H=2048 E=16 K=2, relu
MLP experts, fp32, 2 threads): the forward+backward of libmoe.torch.SimpleMoE
called as any nn.Module (x requires grad, y.backward(dy), gradients landing in
.grad), the same through `build/moe bench --json` (the C layer alone), and the
seed module's formulation (tests/parity/reference.py TopKMoE, PyTorch eager)
with the same weights. Prints the medians and the ratios:
  wrapper cost = libmoe.torch / moe bench   (the issue asks for within 5%)
  speedup      = seed module / libmoe.torch

  /usr/bin/python3 bench/torch_step.py [--tokens 4096] [--iters 5] [--threads 2]
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "parity"))
sys.path.insert(0, str(ROOT / "python"))
try:
    import torch
    import libmoe.torch as lt
    import reference as ref
except ImportError as e:
    sys.exit(f"torch_step: {e}: run make, and install python3-torch")


def timed(step, iters):
    step()  # warm-up
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    T, D, H, E, K = a.tokens, 512, 2048, 16, 2
    torch.set_num_threads(a.threads)
    ours = lt.SimpleMoE(E, D, H, K, seed=7)
    seed = ref.build(dict(type="topk", num_experts=E, input_dim=D, hidden_dim=H, top_k=K))
    seed.load_state_dict(ours.state_dict())
    x = torch.randn(T, D)
    dy = torch.randn(T, D) * 0.01

    def step(m):
        def run():
            xr = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            m(xr).backward(dy)
        return run

    t_ours = timed(step(ours), a.iters)
    t_seed = timed(step(seed), a.iters)
    out = subprocess.run([str(ROOT / "build" / "moe"), "bench", "--tokens", str(T), "--iters", str(a.iters),
                          "--threads", str(a.threads), "--json"], capture_output=True, text=True, check=True)
    t_bench = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    print(f"topk T={T} D={D} H={H} E={E} K={K}, fp32, {a.threads} threads, medians of {a.iters}, forward+backward:")
    print(f"  moe bench (the C layer alone)       {t_bench * 1e3:8.1f} ms")
    print(f"  libmoe.torch.SimpleMoE in PyTorch   {t_ours * 1e3:8.1f} ms   wrapper cost x{t_ours / t_bench:.3f}")
    print(f"  seed module (PyTorch eager)         {t_seed * 1e3:8.1f} ms   libmoe.torch is x{t_seed / t_ours:.2f} faster")


if __name__ == "__main__":
    main()
