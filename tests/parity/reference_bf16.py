"""The reference for libmoe's bf16 mixed precision: an emulation of autocast written here,
not PyTorch's own autocast (whose bf16 GEMMs differ between CPUs, see below).

libmoe's bf16 (README "bf16 mixed precision"; src/bank/bank.c and bf16.c, the expert bank of
topk, gshard and hierarchical) rounds every expert GEMM input to bf16 and accumulates and writes fp32:

  forward   h = act(bf(x) bf(W1)^T + b1)          (topk: nn.Linear; gshard: x @ w1, no biases)
            y = bf(h) bf(W2)^T + b2
  backward  g = the expert output's gradient (the combine weight times dy), fp32
            dW2 = bf(g)^T bf(h),  dh = bf(g) bf(W2),  db2 = colsum(g)
            dhp = act'(dh) (fp32),  dW1 = bf(dhp)^T bf(x),  dx_e = bf(dhp) bf(W1),  db1 = colsum(dhp)

so Bf16MatMul below rounds both operands of every expert GEMM, forward and backward (the
activations, the weights and the output gradients as the backward GEMMs see them), and
nothing else: products and sums in the tensors' dtype (float64 in the harness), outputs
not rounded (libmoe writes fp32), biases, activations, softmax, routing, combine and the
losses as in the float64 reference. bf(t) is t.float().to(torch.bfloat16): round to
nearest even from fp32, as libmoe's moe_to_bf16 rounds its fp32 values (no flush of
denormals). `skip` leaves one kind of operand unrounded ("input": x and h, "weight",
"grad": g and dhp) for the harness's check that its bound would see such a mistake.

torch_bf16_sums_fp32() probes whether this PyTorch's own bf16 GEMMs (the ones autocast runs:
linear, matmul, bmm through einsum, forward and backward) accumulate in fp32. With oneDNN
(a CPU with AVX512-BF16) they do; without it, torch 1.13's fallback GEMM sums
`grad @ W` in bf16, and autocast's dx drifts from libmoe's by 3-7% (AMD Zen 3).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import reference as ref
import reference_gshard as refg

SKIPS = ("input", "weight", "grad")


def bf(t):
    """t rounded to bf16 from fp32 (nearest even, as .to(torch.bfloat16)), in t's dtype."""
    return t.float().to(torch.bfloat16).to(t.dtype)


class Bf16MatMul(torch.autograd.Function):
    """a @ b (same batch dims) on bf16-rounded operands, forward and backward."""

    @staticmethod
    def forward(ctx, a, b, skip):
        ra = a if "input" in skip else bf(a)
        rb = b if "weight" in skip else bf(b)
        ctx.save_for_backward(ra, rb)
        ctx.skip = skip
        return ra @ rb

    @staticmethod
    def backward(ctx, g):
        ra, rb = ctx.saved_tensors
        rg = g if "grad" in ctx.skip else bf(g)
        return rg @ rb.transpose(-1, -2), ra.transpose(-1, -2) @ rg, None


class Bf16Linear(nn.Linear):
    """nn.Linear (an expert's) as libmoe's bf16 runs it: bf(x) bf(W)^T + b."""
    bf16_skip = frozenset()

    def forward(self, x):
        return Bf16MatMul.apply(x, self.weight.t(), self.bf16_skip) + self.bias


class Bf16Experts(refg.Experts):
    """gshard/hierarchical experts: act(bf(x) bf(w1)) then bf(h) bf(w2)."""
    bf16_skip = frozenset()

    def forward(self, x):
        h = self.act(Bf16MatMul.apply(x, self.w1, self.bf16_skip))
        return Bf16MatMul.apply(h, self.w2, self.bf16_skip)


def emulate(model, skip=()):
    """A copy of a topk, gshard or hierarchical reference module whose expert GEMMs are
    libmoe's bf16 ones (same parameter names; gates untouched, so routing stays fp32/64)."""
    skip = frozenset(skip)
    if not skip <= set(SKIPS):
        raise ValueError(f"unknown skip {sorted(skip - set(SKIPS))}")
    m = copy.deepcopy(model)
    if isinstance(m, ref.TopKMoE):
        mods, cls = [lin for ex in m.experts for lin in (ex.net[0], ex.net[2])], Bf16Linear
    elif isinstance(m, (refg.GShardMoE, refg.HierarchicalMoE)):
        mods, cls = [m.experts], Bf16Experts
    else:
        raise ValueError(f"libmoe has no bf16 mode for {type(m).__name__}")
    for mod in mods:
        mod.__class__ = cls
        mod.bf16_skip = skip
    return m


def torch_bf16_sums_fp32(K=1024):
    """(True, what) if this PyTorch's bf16 GEMMs under autocast accumulate in fp32, else
    (False, why). Runs the GEMMs autocast runs (linear, matmul and einsum, forward and
    backward) on random data and checks every element against fp32 accumulation of the
    same bf16 inputs with the output rounded to bf16: within half a bf16 ulp (2^-8
    relative) plus K * 2^-24 of sum |a b|. Summing in bf16 misses that bound by far."""
    g = torch.Generator().manual_seed(0)
    rows, N = 6, 8
    bad = []

    def check(label, got, a, b):  # got ~ a @ b, a and b the bf16 values (as float64)
        exact = a @ b
        slack = 2.0 ** -8 * exact.abs() + K * 2.0 ** -24 * (a.abs() @ b.abs())
        n = int(((got.double() - exact).abs() > slack).sum())
        if n:
            bad.append(f"{label}: {n} of {exact.numel()}")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(rows, K, generator=g).requires_grad_()
        w = torch.randn(N, K, generator=g).requires_grad_()
        y = F.linear(x, w)
        dy = torch.randn(rows, N, generator=g).bfloat16()
        y.backward(dy)
        xb, wb, dyb = bf(x.detach()).double(), bf(w.detach()).double(), dy.double()
        check("linear y = x W^T", y, xb, wb.t())
        check("linear dx = dy W", x.grad, dyb, wb)
        check("linear dW = dy^T x", w.grad, dyb.t(), xb)
        for how in ("matmul", "einsum"):
            a = torch.randn(2, rows, K, generator=g).requires_grad_()
            b = torch.randn(2, K, N, generator=g).requires_grad_()
            c = a @ b if how == "matmul" else torch.einsum("eik,ekn->ein", a, b)
            dc = torch.randn(2, rows, N, generator=g).bfloat16()
            c.backward(dc)
            ab, bb, dcb = bf(a.detach()).double(), bf(b.detach()).double(), dc.double()
            check(f"{how} c = a b", c, ab, bb)
            check(f"{how} da = dc b^T", a.grad, dcb, bb.transpose(-1, -2))
            check(f"{how} db = a^T dc", b.grad, ab.transpose(-1, -2), dcb)
    if bad:
        return False, ("its bf16 GEMMs do not sum in fp32 (elements beyond fp32 accumulation's bound, K = "
                       f"{K}: " + "; ".join(bad) + ")")
    return True, f"its bf16 GEMMs sum in fp32 (probe: linear, matmul, einsum forward and backward, K = {K})"


def cpu_words():
    """What decides PyTorch's bf16 GEMMs here, in words: oneDNN built in, the CPU's avx512_bf16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
        cpu = "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16"
    except OSError:
        cpu = "no /proc/cpuinfo"
    return f"oneDNN {'available' if torch.backends.mkldnn.is_available() else 'not available'}, CPU: {cpu}"


def self_checks(check):
    """Torch-only checks of the emulation (the parity self-test runs them)."""
    t = torch.tensor([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, -(1 + 2 ** -8), 2 ** -130, 1 + 2 ** -30],
                     dtype=torch.float64)
    want = torch.tensor([1.0, 1.0, 1 + 2 ** -6, 1.0, -1.0, 2 ** -130, 1.0], dtype=torch.float64)
    got = bf(t)
    check(torch.equal(got, want), "bf16 emulation: bf() rounds to nearest even (ties 1+2^-8 -> 1, "
          "1+3*2^-8 -> 1+2^-6), keeps denormals", f"got {got.tolist()}")
    torch.manual_seed(0)
    cfg = dict(type="topk", num_experts=3, input_dim=12, hidden_dim=20, top_k=2, activation="gelu",
               expert="swiglu")
    model = ref.build(cfg).double()
    em = emulate(model)
    x = torch.randn(7, 12, dtype=torch.float64)
    names = [n for n, _ in em.named_parameters()] == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        ex = em.experts[0].net
        h = F.linear(bf(x), bf(ex[0].weight), ex[0].bias)
        a, gg = h.chunk(2, dim=-1)
        want = F.linear(bf(a * F.silu(gg)), bf(ex[2].weight), ex[2].bias)
        same = torch.allclose(em.experts[0](x), want, rtol=1e-14, atol=1e-14)
    check(names and same, "bf16 emulation: an expert is bf(x) bf(W1)^T + b1, GLU, bf(h) bf(W2)^T + b2; "
          "parameter names kept")
    # backward of one bf16 GEMM, written out: da = bf(g) bf(b)^T, db = bf(a)^T bf(g)
    a = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(2, 5, 4, dtype=torch.float64)
    Bf16MatMul.apply(a, b, frozenset()).backward(gout)
    ok = (torch.allclose(a.grad, bf(gout) @ bf(b.detach()).transpose(1, 2), rtol=1e-14, atol=1e-14)
          and torch.allclose(b.grad, bf(a.detach()).transpose(1, 2) @ bf(gout), rtol=1e-14, atol=1e-14))
    check(ok, "bf16 emulation: the backward GEMMs round the output gradient and the saved inputs")
