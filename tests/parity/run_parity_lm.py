#!/usr/bin/python3
"""PyTorch parity tests of the whole `moe train` transformer (reference_lm.py).

For each case: train a small model with the C tool in a temporary directory,
    moe train --corpus tasks --steps 30 --eval-every 30 --batch 4 --context 32 --dim 16
              --heads 2 --blocks 2 --hidden 16 --experts 4 --warmup 5 --lr 0.01
              --threads 2 --quiet --out DIR [case flags]
then run
    moe eval DIR/checkpoint.safetensors --dump DUMP --threads 2
and compare DUMP (the first batch of validation sequences through an eval-mode forward:
tokens, targets (B, S), logits (B, S, 256), ce (B, S), ce_mean, aux) with the float64
reference loaded from the same checkpoint (reference_lm.load_checkpoint):
    logits, ce per token, ce_mean: max abs difference <= 1e-4
    aux (the sum over blocks of the layers' auxiliary losses): |d| <= 1e-5 + 1e-4 |aux|
The reference runs in float64 on the checkpoint's float32 weights, so the tolerances
measure only libmoe's float32 error. Each case also checks that the checkpoint's tensor
table (less optim.*) is exactly the module's state_dict (names and shapes, buffers
included) and that optim.m.* / optim.v.* cover exactly the parameters.
gshard/hierarchical layers draw their random second choices from a stream keyed by the
layer's forward count: `moe eval` runs its validation forwards before the dump, so the
reference's count is the checkpoint's "rng" position plus those forwards, counted from
eval's per-task table (bytes / context sequences in batches of the training batch).
Routing decisions that float32 could take differently (reference_lm knife_edges, margin
1e-4 relative) make a case retrain with the next --seed (up to 3 seeds; said in the output).
Mutation checks show the comparison can fail: the reference without RoPE, with another
rope_theta, with interleaved RoPE pairs, without the causal mask, (deepseek_v3) with the
selection-bias buffers left at 0, and (gshard) with the random stream at the checkpoint's
position must all miss the tolerance.
`moe train --layer dense` runs at D = 16 like the others: a checkpoint's dense layer has
output_dim D (lm_create sets it; loading once built Linear(D, 64) experts and failed).

Usage (from anywhere; needs Debian's python3-torch, run as /usr/bin/python3):
    /usr/bin/python3 tests/parity/run_parity_lm.py              # needs build/moe (make)
    MOE_BIN=path/to/moe /usr/bin/python3 tests/parity/run_parity_lm.py
    /usr/bin/python3 tests/parity/run_parity_lm.py --self-test  # torch only, no binary
    add -v to print each case's commands and reference details
Ends with "parity-lm: N passed, N failed"; exits 1 if anything failed.
"""
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # repository root

try:
    import torch
    import numpy  # stio needs it
    del numpy
except ImportError as exc:  # the test must fail, not skip, without torch
    print(f"python3-torch is required: apt-get install python3-torch python3-numpy ({exc})")
    print("parity-lm: 0 passed, 1 failed")
    sys.exit(1)

sys.path.insert(0, str(HERE))
import reference_lm as rl  # noqa: E402
from run_parity import Tally  # noqa: E402  (the suite's pass/fail counter)
import stio  # noqa: E402

TOL = 1e-4                    # logits, ce, ce_mean: max abs difference
AUX_ATOL, AUX_RTOL = 1e-5, 1e-4
VERBOSE = "-v" in sys.argv
SEEDS = (1, 2, 3)             # a case retrains with the next seed while routing is fragile

BASE = ["--corpus", "tasks", "--steps", "30", "--eval-every", "30", "--batch", "4", "--context", "32",
        "--dim", "16", "--heads", "2", "--blocks", "2", "--hidden", "16", "--experts", "4",
        "--warmup", "5", "--lr", "0.01", "--threads", "2", "--quiet"]

# (name, flags added to BASE (a later flag overrides BASE's), flags removed from BASE)
CASES = [
    ("topk, mixtral router, swiglu experts (the default)", [], []),
    ("topk, deepseek_v3 router, 1 shared expert (selection-bias buffer)", ["--router", "deepseek_v3", "--shared", "1"],
     []),
    ("topk, deepseek_v3, E=8 in 4 groups, top-3 of the 2 best, gated shared expert",
     ["--router", "deepseek_v3", "--experts", "8", "--top-k", "3", "--groups", "4", "--topk-groups", "2",
      "--shared", "1", "--shared-gate"], []),
    ("topk, switch router, mlp experts (eval capacity factor 2)", ["--expert", "mlp", "--router", "switch"], []),
    ("topk, switch router, mlp experts, capacity 0.5 (drops)",
     ["--expert", "mlp", "--router", "switch", "--capacity", "0.5"], []),
    ("topk, st_moe router (z-loss), geglu experts", ["--expert", "geglu", "--router", "st_moe"], []),
    ("topk, expert_choice router", ["--router", "expert_choice"], []),
    ("topk, seed-004 router, 1 head", ["--router", "topk", "--heads", "1"], []),
    ("topk, 4 heads, 3 blocks, rope_theta 100", ["--heads", "4", "--blocks", "3", "--rope-theta", "100"], []),
    ("--dense (one swiglu FFN of the active size)", ["--dense"], []),
    ("layer dense (Linear experts, softmax gate)", ["--layer", "dense"], []),
    ("gshard, group 16", ["--layer", "gshard", "--group", "16"], []),
    ("hierarchical 4x2, group 16", ["--layer", "hierarchical", "--group", "16", "--inner", "2"], []),
    ("soft_dynamic, group 16 (derived hidden width)", ["--layer", "soft_dynamic", "--group", "16"], ["--hidden"]),
    ("soft, group 16, geglu experts, hidden 16", ["--layer", "soft", "--group", "16", "--expert", "geglu"], []),
]


def note(msg):
    print(f"     {msg}")
    sys.stdout.flush()


# ------------------------------------------------------------------ the tool

def locate_moe():
    moe = os.path.abspath(os.environ["MOE_BIN"]) if os.environ.get("MOE_BIN") else str(ROOT / "build" / "moe")
    if not os.access(moe, os.X_OK):
        print(f"moe binary not found at {moe}, run make first")
        print("parity-lm: 0 passed, 1 failed")
        return None
    print(f"parity-lm: {moe} against PyTorch {torch.__version__} (logits/ce within {TOL}, "
          f"aux within {AUX_ATOL} + {AUX_RTOL} relative)")
    return moe


def run(cmd):
    """(returncode, stdout + stderr) of a command."""
    if VERBOSE:
        note("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return 124, "timed out after 300 s"
    return p.returncode, p.stdout + p.stderr


def train_flags(flags, drop, seed):
    base = []
    i = 0
    while i < len(BASE):  # BASE less the dropped flags (with their values)
        if BASE[i] in drop:
            i += 1 if BASE[i] == "--quiet" else 2
            continue
        base.append(BASE[i])
        i += 1
    return base + list(flags) + ["--seed", str(seed)]


def eval_forwards(log, S, batch):
    """Forwards `moe eval` ran before its dump: per class of its table, ceil(bytes/S / batch)."""
    n, rows, inside = 0, 0, False
    for line in log.splitlines():
        if re.match(r"\s*(task|language)\s+bits/byte", line):
            inside = True
            continue
        if inside:
            m = re.match(r"\s*\S+\s+[\d.]+\s+\S+\s+\S+\s+(\d+)\s*$", line) or \
                re.match(r"\s*\S+\s+[\d.]+\s+(\d+)\s*$", line)
            if not m:
                break
            n += math.ceil(int(m.group(1)) // S / batch)
            rows += 1
    return n if rows else None


def make_case(moe, d, flags, drop, seed):
    """Train and dump in d. Returns (ckpt, dump, eval log) or raises RuntimeError."""
    d.mkdir(parents=True, exist_ok=True)
    rc, log = run([moe, "train"] + train_flags(flags, drop, seed) + ["--out", str(d)])
    if rc != 0:
        raise RuntimeError(f"moe train exited {rc}: {log.strip()[-600:]}")
    ckpt, dump = d / "checkpoint.safetensors", d / "dump.safetensors"
    rc, log = run([moe, "eval", str(ckpt), "--dump", str(dump), "--threads", "2"])
    if rc != 0:
        raise RuntimeError(f"moe eval --dump exited {rc}: {log.strip()[-600:]}")
    return ckpt, dump, log


# ------------------------------------------------------------------ comparison

def reference_run(model, dump):
    with torch.no_grad():
        logits, aux = model(dump["tokens"].long())
    return logits, rl.cross_entropy(logits, dump["targets"]), aux


def errors(model, dump):
    """Max abs errors of logits, ce, ce_mean, aux and the reference's aux."""
    logits, ce, aux = reference_run(model, dump)
    d = dump
    return dict(logits=float((d["logits"].double() - logits).abs().max()),
                ce=float((d["ce"].double() - ce).abs().max()),
                ce_mean=abs(float(d["ce_mean"].double().reshape(())) - float(ce.mean())),
                aux=abs(float(d["aux"].double().reshape(())) - float(aux)), aux_ref=float(aux))


def problems_of(model, dump):
    """Failure strings of the comparison (empty: within the tolerances), and the errors."""
    e = errors(model, dump)
    out = []
    for k in ("logits", "ce", "ce_mean"):
        if not e[k] <= TOL:
            out.append(f"{k} max abs err {e[k]:.3g} > {TOL}")
    if not e["aux"] <= AUX_ATOL + AUX_RTOL * abs(e["aux_ref"]):
        out.append(f"aux {float(dump['aux'].reshape(())):.8g}, reference {e['aux_ref']:.8g} "
                   f"(err {e['aux']:.3g})")
    if out:
        out += localise(model, dump)
    return out, e


def localise(model, dump):
    """Where the logits differ: the first and worst (sequence, position) over tolerance."""
    logits, _, _ = reference_run(model, dump)
    err = (dump["logits"].double() - logits).abs().amax(dim=-1)  # (B, S)
    bad = (err > TOL).nonzero().tolist()
    if not bad:
        return []
    b, s = bad[0]
    wb, ws = divmod(int(err.argmax()), err.shape[1])
    tok = dump["tokens"].long()
    per_seq = [int((err[i] > TOL).sum()) for i in range(err.shape[0])]
    return [f"logits off at {len(bad)} of {err.numel()} positions (per sequence {per_seq}); first: sequence {b} "
            f"position {s} (byte {int(tok[b, s])}), worst: sequence {wb} position {ws} err {float(err.max()):.3g}"]


def sanity(dump):
    """The dump's own consistency: targets are the next bytes, ce_mean the mean of ce."""
    tok, tgt = dump["tokens"], dump["targets"]
    out = []
    if not torch.equal(tok[:, 1:], tgt[:, :-1]):
        out.append("targets are not the tokens shifted by one")
    if abs(float(dump["ce"].double().mean()) - float(dump["ce_mean"].double().reshape(()))) > 1e-6:
        out.append("ce_mean is not the mean of ce")
    return out


def table_check(tally, name, ckpt, model):
    """The checkpoint's tensor table against the module's state_dict, and the optimizer's."""
    allt = stio.load(ckpt)
    tensors = {k: v for k, v in allt.items() if not k.startswith("optim.")}
    fresh = rl.MoETransformer(model.config)
    bad = rl.table_problems(tensors, fresh)
    params = {n: tuple(p.shape) for n, p in fresh.named_parameters()}
    for pre in ("optim.m.", "optim.v."):
        have = {k[len(pre):]: tuple(v.shape) for k, v in allt.items() if k.startswith(pre)}
        if have != params:
            bad.append(f"{pre}* differ from the parameters: {sorted(set(have) ^ set(params))[:4]}")
    nb = len(fresh.state_dict()) - len(params)
    tally.check(not bad, f"table: {name}: {len(tensors)} tensors ({len(params)} parameters, {nb} buffers) = "
                f"the module's state_dict (names, shapes); optim.m/v cover the parameters", "; ".join(bad[:3]))


def routing_notes(model):
    """What the case exercised: capacity drops, random draws that decided second choices."""
    notes = []
    drops = sum(int(b.moe.stats.get("dropped", 0)) for b in model.blocks
                if getattr(b.moe, "stats", None) and b.kind in ("topk", "gshard", "hierarchical"))
    if any(b.kind in ("topk", "gshard", "hierarchical") for b in model.blocks):
        notes.append(f"dropped {drops}")
    draws = 0
    for b in model.blocks:
        for g in rl.layer_gates(b.moe, b.kind):
            r = g.last
            if r is not None and r.policy == "random":
                has2 = r.cand2.sum(-1) > 0
                draws += int((has2 & (r.g2 < r.threshold)).sum())
    if any(rl.layer_gates(b.moe, b.kind) for b in model.blocks):
        notes.append(f"{draws} second choices decided by random draws")
    return notes


def parity_case(tally, moe, root, i, name, flags, drop):
    """Train, dump, compare; returns (model, dump) of the compared run or None."""
    last = None
    for seed in SEEDS:
        d = root / f"case{i}-seed{seed}"
        t0 = time.time()
        try:
            ckpt, dump_path, log = make_case(moe, d, flags, drop, seed)
            model, config = rl.load_checkpoint(ckpt)
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            tally.check(False, f"{name}", str(exc))
            return None
        dump = stio.load(dump_path)
        S, batch = int(config["context"]), int(json.loads(stio.load_metadata(ckpt)["train"])["batch"])
        n = eval_forwards(log, S, batch)
        if n is None:
            tally.check(False, name, "cannot count moe eval's forwards from its per-task table: "
                        + log.strip()[:300])
            return None
        model.advance_rng(n)
        reference_run(model, dump)
        edges = model.knife_edges()
        last = (model, dump, ckpt, seed, time.time() - t0, n)
        if not edges:
            break
        note(f"{name}: seed {seed} has float32-fragile routing ({len(edges)}: {edges[0]}); "
             + ("retraining with the next seed" if seed != SEEDS[-1] else "comparing anyway"))
    model, dump, ckpt, seed, secs, n = last
    edges = model.knife_edges()
    table_check(tally, name, ckpt, model)
    problems, e = problems_of(model, dump)
    problems = sanity(dump) + problems
    if problems and edges:
        problems.append(f"(the reference's routing is float32-fragile here: {'; '.join(edges[:3])})")
    extra = ", ".join([f"seed {seed}"] + routing_notes(model))
    what = (f"{name} [{extra}]: logits {e['logits']:.2g}, ce {e['ce']:.2g}, ce_mean {e['ce_mean']:.2g}, "
            f"aux {e['aux']:.2g} (aux {e['aux_ref']:.4g})")
    tally.check(not problems, what, "; ".join(problems))
    if VERBOSE:
        note(f"{secs:.1f} s; eval ran {n} forwards before the dump; rng at the dump {model.rng_calls()}")
    return model, dump, n


# ------------------------------------------------------------------ mutations

def mutation(tally, model, dump, what, edit, label=""):
    m = copy.deepcopy(model)
    edit(m)
    e = errors(m, dump)
    tally.check(e["logits"] > TOL, f"{label}mutation caught: the reference {what} misses the tolerance "
                f"(logits err {e['logits']:.3g} > {TOL})", f"logits err only {e['logits']:.3g}")


def mutations(tally, model, dump, theta_to=500.0, label=""):
    mutation(tally, model, dump, "without RoPE", lambda m: setattr(m, "rope", False), label)
    mutation(tally, model, dump, f"with rope_theta {theta_to:g} instead of {model.rope_theta:g}",
             lambda m: setattr(m, "rope_theta", theta_to), label)
    mutation(tally, model, dump, "with interleaved RoPE pairs (2i, 2i+1)",
             lambda m: setattr(m, "rope_pairs", "interleaved"), label)
    mutation(tally, model, dump, "without the causal mask", lambda m: setattr(m, "causal", False), label)


def zero_bias(m):
    with torch.no_grad():
        for b in m.blocks:
            b.moe.gate.e_score_correction_bias.zero_()


def gshard_rng_mutation(tally, model, dump, n):
    """The random policy's draws matter: at the checkpoint's position (without eval's n
    forwards) the reference misses the tolerance."""
    m = copy.deepcopy(model)
    m.advance_rng(-n)
    e = errors(m, dump)
    tally.check(e["logits"] > TOL, f"mutation caught: gshard drawing at the checkpoint's rng position (without "
                f"eval's {n} forwards) misses the tolerance (logits err {e['logits']:.3g})",
                f"logits err only {e['logits']:.3g}")


# ------------------------------------------------------------------ self-test (torch only)

def synthetic_config(layer, **kw):
    """A checkpoint config as ckpt_config_json writes it."""
    y = {"type": "topk", "num_experts": 4, "num_experts_inner": 0, "top_k": 2, "hidden_dim": 8, "expert": "swiglu",
         "activation": "relu", "leaky_slope": 0.01, "second_policy_train": "random",
         "second_policy_eval": "random", "second_threshold_train": 0.2, "second_threshold_eval": 0.2,
         "capacity_factor_train": 0, "capacity_factor_eval": 0, "loss_coef": 0.01, "expert_mult": 4,
         "dropout": 0, "slots_per_expert": 0,
         "router": {"kind": "token_choice", "score": "softmax", "normalize": True, "route_scale": 1,
                    "jitter": 0, "balance_coef": 0.01, "z_loss_coef": 0, "num_shared": 0, "shared_gate": False,
                    "expert_bias": False, "bias_update_rate": 0, "num_groups": 0, "topk_groups": 0},
         "bf16": False, "seed": "7"}
    y.update(layer)
    c = {"model": "transformer", "context": 16, "dim": 8, "heads": 2, "rope_theta": 10000, "blocks": 2,
         "group": 8, "dense": False, "layer": y}
    c.update(kw)
    return c


def router(**kw):
    r = synthetic_config({})["layer"]["router"]
    r.update(kw)
    return r


SYNTH = [
    ("topk mixtral swiglu", synthetic_config({})),
    ("topk deepseek_v3 + shared (bias buffer)",
     synthetic_config({"hidden_dim": 6, "router": router(score="sigmoid", balance_coef=0, expert_bias=True,
                                                         bias_update_rate=1e-3, num_shared=1)})),
    ("topk switch mlp, capacity 0.5", synthetic_config({"expert": "mlp", "top_k": 1, "capacity_factor_train": 0.5,
                                                         "capacity_factor_eval": 0.5,
                                                         "router": router(normalize=False)})),
    ("dense FFN", synthetic_config({"num_experts": 1, "top_k": 1, "router": router(score="topk_softmax",
                                                                                    normalize=False,
                                                                                    balance_coef=0)},
                                   dense=True)),
    ("layer dense", synthetic_config({"type": "dense"})),
    ("gshard", synthetic_config({"type": "gshard", "expert": "mlp", "capacity_factor_train": 1.25,
                                 "capacity_factor_eval": 2.0})),
    ("hierarchical", synthetic_config({"type": "hierarchical", "num_experts_inner": 2, "expert": "mlp",
                                       "capacity_factor_train": 1.25, "capacity_factor_eval": 2.0})),
    ("soft_dynamic", synthetic_config({"type": "soft_dynamic", "expert": "mlp", "hidden_dim": 0, "expert_mult": 1,
                                       "activation": "gelu"})),
    ("soft geglu hidden 8", synthetic_config({"type": "soft", "expert": "geglu", "expert_mult": 1,
                                              "slots_per_expert": 2, "activation": "gelu"})),
]


def seeded_model(cfg, seed):
    torch.manual_seed(seed)
    m = rl.MoETransformer(cfg)
    with torch.no_grad():  # norms away from 1, a nonzero bias buffer: every tensor matters
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n == "norm_f.weight":
                p.add_(0.2 * torch.randn_like(p))
        for n, b in m.named_buffers():
            b.copy_(0.1 * torch.randn_like(b))
    return m


def naive_forward(model, tokens):
    """The definition once more, with loops: per-head, per-position attention, RoPE as a
    complex rotation, RMSNorm by hand; the MoE layers are the block modules."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    D, NH, L = int(cfg["dim"]), int(cfg["heads"]), int(cfg["blocks"])
    hd, half = D // NH, D // NH // 2
    B, S = tokens.shape

    def rms(x, g):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) / D + 1e-5) * g

    theta = float(cfg["rope_theta"])
    ang = [[p * math.pow(theta, -2.0 * i / hd) for i in range(half)] for p in range(S)]
    rot = torch.tensor([[complex(float(torch.tensor(math.cos(a)).float()), float(torch.tensor(math.sin(a)).float()))
                         for a in row] for row in ang], dtype=torch.complex128)  # (S, half)

    def rope(v):  # (S, hd) of one head
        z = torch.complex(v[:, :half], v[:, half:]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    x = sd["emb.weight"][tokens]
    aux = torch.zeros((), dtype=torch.float64)
    for l in range(L):
        p = f"blocks.{l}."
        a = rms(x, sd[p + "attn_norm.weight"])
        qkv = a @ sd[p + "attn.qkv.weight"].T
        o = torch.zeros(B, S, D, dtype=torch.float64)
        for b in range(B):
            for h in range(NH):
                q = rope(qkv[b, :, h * hd:(h + 1) * hd])
                k = rope(qkv[b, :, D + h * hd:D + (h + 1) * hd])
                v = qkv[b, :, 2 * D + h * hd:2 * D + (h + 1) * hd]
                for i in range(S):
                    w = torch.softmax(torch.stack([q[i] @ k[j] for j in range(i + 1)]) / math.sqrt(hd), 0)
                    o[b, i, h * hd:(h + 1) * hd] = sum(w[j] * v[j] for j in range(i + 1))
        x = x + o @ sd[p + "attn.out.weight"].T
        y, al = model.blocks[l].run_moe(rms(x, sd[p + "moe_norm.weight"]))
        x, aux = x + y, aux + al
    return rms(x, sd["norm_f.weight"]) @ sd["head.weight"].T, aux


def self_test(tally, tmp):
    gen = torch.Generator().manual_seed(5)
    for i, (name, cfg) in enumerate(SYNTH):
        m = seeded_model(cfg, 100 + i)
        path = tmp / f"synth{i}.safetensors"
        rl.save_checkpoint(path, m, rng=[3 + l for l in range(len(m.blocks))])
        try:
            loaded, _ = rl.load_checkpoint(path)
        except ValueError as exc:
            tally.check(False, f"self-test: {name}: checkpoint round trip", str(exc))
            continue
        want = {k: v.double() for k, v in m.state_dict().items()}
        same = all(torch.equal(loaded.state_dict()[k], want[k].float().double()) for k in want)
        rng_ok = all(c in (None, 3 + l) for l, c in enumerate(loaded.rng_calls()))
        tally.check(same and rng_ok, f"self-test: {name}: save/load_checkpoint round trip (parameters, buffers, "
                    f"rng positions; optim.* ignored)")
        # strict loading: a missing, an extra and a reshaped tensor are refused
        t = stio.load(path)
        meta = stio.load_metadata(path)
        victim = next(k for k in t if k.startswith("blocks.1.moe."))
        refused = []
        for label, edit in (("missing", lambda d: d.pop(victim)),
                            ("extra", lambda d: d.__setitem__("blocks.0.moe.bogus", torch.zeros(2))),
                            ("reshaped", lambda d: d.__setitem__(victim, d[victim].reshape(-1)[:-1]))):
            bad = dict(t)
            edit(bad)
            stio.save(tmp / "bad.safetensors", bad, meta)
            try:
                rl.load_checkpoint(tmp / "bad.safetensors")
            except ValueError:
                refused.append(label)
        tally.check(len(refused) == 3, f"self-test: {name}: load_checkpoint refuses a missing, an extra and a "
                    f"reshaped tensor ({victim})", f"refused only {refused}")
        # the definition with loops == the module; a float32 stand-in is within tolerance
        tok = torch.randint(0, 256, (2, 16), generator=gen)
        with torch.no_grad():
            lg, aux = loaded(tok)
            nl, naux = naive_forward(loaded, tok)
            l32, a32 = rl.copy_model(loaded, torch.float32)(tok)
        err = float((lg - nl).abs().max())
        tally.check(err < 1e-6 and abs(float(aux - naux)) < 1e-12,
                    f"self-test: {name}: module == loop definition (err {err:.2g})", f"{err:.3g}")
        e32 = float((l32.double() - lg).abs().max())
        tally.check(e32 <= TOL and abs(float(a32) - float(aux)) <= AUX_ATOL + AUX_RTOL * abs(float(aux)),
                    f"self-test: {name}: a float32 run of the reference is within tolerance (logits err {e32:.2g})",
                    f"{e32:.3g}")
        if i == 0:
            fake = {"tokens": tok.float(), "targets": torch.roll(tok, -1, 1).float(), "logits": l32.float()}
            fake["ce"] = rl.cross_entropy(l32.double(), fake["targets"]).float()
            fake["ce_mean"] = fake["ce"].double().mean().float().reshape(1)
            fake["aux"] = a32.float().reshape(1)
            mutations(tally, loaded, fake, label="self-test: float32 stand-in: ")
        if cfg["layer"]["type"] == "gshard":
            with torch.no_grad():
                m2 = copy.deepcopy(loaded)
                m2.advance_rng(1)
                d = float((m2(tok)[0] - lg).abs().max())
            tally.check(d > TOL, f"self-test: {name}: the random policy's draws depend on the forward count "
                        f"(next count: logits move {d:.2g})", f"{d:.3g}")
    # RoPE pieces
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=gen)
    cos, sin = rl.rope_tables(5, 8, 10000.0)
    r = rl.apply_rope(x, cos, sin)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.complex(cos, sin)[None, :, None, :]
    tally.check(torch.allclose(r, torch.cat([z.real, z.imag], -1), atol=1e-14) and torch.equal(r[:, 0], x[:, 0]),
                "self-test: RoPE rotate-half == complex rotation of (x_i, x_{i+hd/2}); position 0 unchanged")
    a = torch.tensor([[3 * math.pow(10000.0, -2 * i / 8) for i in range(4)]], dtype=torch.float64)
    tally.check(torch.allclose(cos[3:4], torch.cos(a).float().double(), rtol=0, atol=1e-7)
                and torch.equal(cos, cos.float().double()) and cos.dtype == torch.float64,
                "self-test: RoPE tables: float64 angles, cos/sin rounded to float32")
    q, k = torch.randn(1, 12, 1, 8, dtype=torch.float64, generator=gen), torch.randn(1, 1, 1, 8, dtype=torch.float64,
                                                                                        generator=gen)
    cos, sin = rl.rope_tables(12, 8, 10000.0)
    qq = rl.apply_rope(q[:, :1].expand(1, 12, 1, 8), cos, sin)
    kk = rl.apply_rope(k.expand(1, 12, 1, 8), cos, sin)
    dots = [float(qq[0, i + 2, 0] @ kk[0, i, 0]) for i in range(10)]
    tally.check(max(dots) - min(dots) < 1e-5, "self-test: RoPE: q.k depends on the relative position only "
                f"(spread {max(dots) - min(dots):.2g}, float32 tables)")
    # causality: later bytes do not change earlier logits (a layer without groups or capacity)
    m = seeded_model(SYNTH[0][1], 7)
    tok = torch.randint(0, 256, (2, 16), generator=gen)
    tok2 = tok.clone()
    tok2[:, 9] = (tok2[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = m.double()(tok)[0], m(tok2)[0]
    tally.check(torch.equal(a[:, :9], b[:, :9]) and not torch.equal(a[:, 9], b[:, 9]),
                "self-test: causal: changing byte 9 leaves positions 0..8 exactly and changes 9")


# ------------------------------------------------------------------ main

def main():
    tally = Tally()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="moe-parity-lm-") as tmp:
        root = Path(tmp)
        if "--self-test" in sys.argv:
            print("parity-lm self-test: torch-only checks (no moe binary)")
            self_test(tally, root)
        else:
            moe = locate_moe()
            if moe is None:
                return 1
            kept = {}
            for i, (name, flags, drop) in enumerate(CASES):
                kept[i] = parity_case(tally, moe, root, i, name, flags, drop)
            if kept.get(0):
                print("-- mutations on the default case's checkpoint and dump:")
                mutations(tally, *kept[0][:2])
            di = next((i for i, c in enumerate(CASES) if c[1][:2] == ["--router", "deepseek_v3"]), None)
            if kept.get(di):
                mutation(tally, *kept[di][:2], "of the deepseek_v3 case with its selection-bias buffers left at 0 "
                         "(not loaded)", zero_bias)
            gi = next((i for i, c in enumerate(CASES) if "gshard" in c[1]), None)
            if kept.get(gi):
                gshard_rng_mutation(tally, *kept[gi])
    print(f"parity-lm: {time.time() - t0:.1f} s")
    print(f"parity-lm: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
