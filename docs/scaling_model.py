#!/usr/bin/python3
"""Analytic MODEL (not a measurement) of expert-parallel MoE step time.

Computes the tables of docs/scaling.md. Standard library only.

  /usr/bin/python3 docs/scaling_model.py doc            # the tables printed in scaling.md
  /usr/bin/python3 docs/scaling_model.py --crossover    # full per-P tables, both layers
  /usr/bin/python3 docs/scaling_model.py doc --alpha-us 5 --eta 0.6 --tflops 400
  /usr/bin/python3 docs/scaling_model.py --model local --P 2 --T 4096 --gemms 2 \
      --beff-gbs 3.4 --alpha-us 1 --tflops 0.05     # the bench case, measured values
  /usr/bin/python3 docs/scaling_model.py calibrate --P 2 \
      --point BYTES:SECONDS:CALLS --point ...       # fit alpha and B_eff

Model, per rank and per layer step (one forward + one backward of one MoE
layer over the rank's T tokens):

  rows      = T * k                 rows each rank's experts process (uniform routing)
  flops     = 3 * 2 * G * D * H * rows
                                    G GEMMs of D x H per expert (3 SwiGLU, 2 plain);
                                    forward 1x, backward 2x (dX and dW)
  t_compute = flops / F             F = achieved FLOP/s of one rank
  V         = T * k * D * b * (1 - 1/Pe)
                                    bytes one rank sends in one row all-to-all
  t_comm    = 4 * V / (eta * B) + 5 * lat(Pe)
                                    4 row exchanges; latency counted 5 times
                                    (+1 count exchange in the forward; the
                                    backward reuses the forward's plan)
  lat(Pe)   = alpha * (Pe - 1)      pairwise / linear MPI_Alltoallv (default)
            = alpha * ceil(log2 Pe) Bruck-style (option --latency log)
  Pe        = min(P, E)             experts are not split; for P > E the ranks
                                    form P/E data-parallel replicas of an E-rank
                                    expert-parallel group
"""
import argparse
import math
import sys

MODELS = {
    # name: D, H, E, k, GEMMs per expert, shared experts (same H, replicated)
    "deepseek-v3": dict(D=7168, H=2048, E=256, k=8, G=3, shared=1, label="DeepSeek-V3-like"),
    "mixtral": dict(D=4096, H=14336, E=8, k=2, G=3, shared=0, label="Mixtral-like"),
    # the bench configuration of "Measured on this machine" (FFN kind: pass --gemms)
    "local": dict(D=512, H=2048, E=16, k=2, G=2, shared=0, label="moe bench --ep (local)"),
}
P_LIST = [8, 16, 32, 64, 128, 256, 512, 1024]
NETS_GBPS = [100, 200, 400]


def layout(P, E):
    """(expert-parallel group size, data-parallel replicas, experts per rank)."""
    if P <= E:
        if E % P:
            raise ValueError("P=%d does not divide E=%d (libmoe gives each rank E/P experts)" % (P, E))
        return P, 1, E // P
    if P % E:
        raise ValueError("P=%d is not a multiple of E=%d" % (P, E))
    return E, P // E, 1


def step(m, T, P, gbps, a):
    """Times in seconds for one layer step on one rank. a: parsed arguments."""
    D, H, E, k, G = m["D"], m["H"], m["E"], m["k"], m["G"]
    Pe, dp, el = layout(P, E)
    rows = T * k
    flops = 3 * (2 * G) * D * H * rows  # forward + backward of the routed experts
    flops_shared = 3 * (2 * G) * D * H * T * (m["shared"] if a.shared else 0)
    t_comp = (flops + flops_shared) / (a.tflops * 1e12)
    V = T * k * D * a.bytes * (1.0 - 1.0 / Pe)
    B = a.beff_gbs * 1e9 if a.beff_gbs else gbps * 1e9 / 8.0 * a.eta  # effective bytes/s per rank
    lat = a.alpha_us * 1e-6 * ((Pe - 1) if a.latency == "pairwise" else math.ceil(math.log2(Pe)))
    t_bw = 4 * V / B
    t_lat = 5 * lat
    return dict(Pe=Pe, dp=dp, el=el, comp=t_comp, bw=t_bw, lat=t_lat, comm=t_bw + t_lat,
                bytes=4 * V + (Pe - 1) * el * 8, flops=flops + flops_shared)


def crossover_T(m, P, gbps, a):
    """Smallest T with comm <= compute; None when comm > compute for every T."""
    c1 = step(m, 1, P, gbps, a)
    slope_comp, slope_bw, lat = c1["comp"], c1["bw"], c1["lat"]
    if slope_bw >= slope_comp:
        return None
    return lat / (slope_comp - slope_bw)


def fmt_ms(s):
    ms = s * 1e3
    return "%.0f" % ms if ms >= 100 else ("%.1f" % ms if ms >= 1 else "%.2f" % ms)


def fmt_r(r):
    if r >= 100:
        return "%.0f" % r
    return "%.1f" % r if r >= 1 else ("%.2f" % r if r >= 0.1 else "%.3f" % r)


def table(m, Ts, Ps, nets, a, out):
    """One markdown table: rows P, cells 'comm ms (comm/compute)'."""
    head = ["P", "EP x DP", "experts/rank"]
    for T in Ts:
        if a.beff_gbs:
            head += ["T=%d, B_eff %g GB/s" % (T, a.beff_gbs)]
        else:
            head += ["T=%d, %g Gb/s" % (T, g) for g in nets]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    if a.beff_gbs:
        nets = nets[:1]
    for P in Ps:
        s0 = step(m, Ts[0], P, nets[0], a)
        cells = [str(P), "%d x %d" % (s0["Pe"], s0["dp"]), str(s0["el"])]
        for T in Ts:
            for g in nets:
                s = step(m, T, P, g, a)
                r = s["comm"] / s["comp"]
                c = "%s (%s)" % (fmt_ms(s["comm"]), fmt_r(r))
                cells.append("**" + c + "**" if r > 1 else c)
        out.append("| " + " | ".join(cells) + " |")
    comp = ", ".join("T=%d: %s ms" % (T, fmt_ms(step(m, T, Ps[0], nets[0], a)["comp"])) for T in Ts)
    out.append("")
    out.append("Compute per layer step (same for every P): %s. Cells: communication ms "
               "(comm/compute); bold where comm/compute > 1." % comp)


def crossover_table(m, Ps, nets, a, out):
    head = ["P"] + ["%d Gb/s" % g for g in nets]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for P in Ps:
        cells = [str(P)]
        for g in nets:
            t = crossover_T(m, P, g, a)
            cells.append("comm > compute for all T" if t is None else "T >= %d" % math.ceil(t))
        out.append("| " + " | ".join(cells) + " |")


def describe(a):
    lat = "alpha*(P_e-1)" if a.latency == "pairwise" else "alpha*ceil(log2 P_e)"
    return ("F = %g TFLOP/s per rank, b = %g bytes/value, eta = %g, alpha = %g us, latency %s, "
            "shared expert %s" % (a.tflops, a.bytes, a.eta, a.alpha_us, lat, "on" if a.shared else "off"))


def run_tables(a):
    out = []
    names = [a.model] if a.model else ["deepseek-v3", "mixtral"]
    for name in names:
        m = dict(MODELS[name])
        if a.gemms:
            m["G"] = a.gemms
        out.append("#### %s (D=%d, H=%d, E=%d, k=%d, %d GEMMs): %s" %
                   (m["label"], m["D"], m["H"], m["E"], m["k"], m["G"], describe(a)))
        out.append("")
        table(m, a.T, a.P, a.gbps, a, out)
        out.append("")
        if a.crossover:
            out.append("Crossover (comm <= compute from this T on):")
            out.append("")
            crossover_table(m, a.P, a.gbps, a, out)
            out.append("")
    print("\n".join(out))


def with_(a, **kw):
    b = argparse.Namespace(**vars(a))
    for k, v in kw.items():
        setattr(b, k, v)
    return b


def doc_tables(a):
    """The compact tables of docs/scaling.md (run with the defaults to reproduce them)."""
    out = []
    ds, mx = MODELS["deepseek-v3"], MODELS["mixtral"]
    rows = []  # (model, P, label): P > E rows are identical (P_e = E), so they are merged
    for m in (ds, mx):
        same = [P for P in a.P if P >= m["E"]]
        for P in a.P:
            if P < m["E"]:
                rows.append((m, P, "%d (%d x 1)" % (P, P)))
        if len(same) == 1:
            rows.append((m, same[0], "%d (%d x 1)" % (same[0], same[0])))
        elif 1 < len(same) <= 3:
            rows.append((m, same[0], "%s (%d x %s)" % (", ".join(map(str, same)), m["E"],
                                                         ", ".join(str(P // m["E"]) for P in same))))
        elif same:
            rows.append((m, same[0], "%d ... %d (%d x P/%d)" % (same[0], same[-1], m["E"], m["E"])))
    T0, T1 = a.T[0], a.T[-1]
    nets = a.gbps

    def r(x):
        c = fmt_r(x)
        return "**%s**" % c if x > 1 else c

    out.append("Table 1 (GPU ranks, F = %g TFLOP/s, eta = %g, alpha = %g us, %s latency)." %
               (a.tflops, a.eta, a.alpha_us, a.latency))
    out.append("")
    out.append("| layer | P (EP x DP) | compute ms, T=%d / %d | comm ms fp32, T=%d: %s Gb/s | "
               "comm/compute fp32 | comm/compute bf16 |" % (T0, T1, T0, " / ".join("%g" % g for g in nets)))
    out.append("|---|---|---|---|---|---|")
    worst = 0.0
    for m, P, label in rows:
        s0 = step(m, T0, P, nets[0], a)
        comm = " / ".join(fmt_ms(step(m, T0, P, g, a)["comm"]) for g in nets)
        rat = {}
        for bb in (4, 2):
            ab = with_(a, bytes=bb)
            rs = []
            for g in nets:
                x0 = step(m, T0, P, g, ab)
                x1 = step(m, T1, P, g, ab)
                worst = max(worst, abs(x0["comm"] / x0["comp"] - x1["comm"] / x1["comp"]))
                rs.append(r(x0["comm"] / x0["comp"]))
            rat[bb] = " / ".join(rs)
        comp = "%s / %s" % (fmt_ms(s0["comp"]), fmt_ms(step(m, T1, P, nets[0], a)["comp"]))
        out.append("| %s | %s | %s | %s | %s | %s |" % (m["label"], label, comp, comm, rat[4], rat[2]))
    out.append("")
    out.append("Largest difference between the T=%d and T=%d ratios in Table 1: %.3f." % (T0, T1, worst))
    out.append("")

    cpu = with_(a, tflops=a.cpu_tflops)
    out.append("Table 2 (CPU-node ranks, F = %g TFLOP/s fp32, fp32 on the wire, eta = %g, alpha = %g us)." %
               (cpu.tflops, cpu.eta, cpu.alpha_us))
    out.append("")
    out.append("| layer | P (EP x DP) | compute s | comm/compute: %s Gb/s |" % " / ".join("%g" % g for g in nets))
    out.append("|---|---|---|---|")
    for m, P in [(ds, 8), (ds, 256), (mx, 8)]:
        s0 = step(m, T0, P, nets[0], cpu)
        rs = " / ".join(r(step(m, T0, P, g, cpu)["comm"] / step(m, T0, P, g, cpu)["comp"]) for g in nets)
        out.append("| %s | %d (%d x %d) | %.2f | %s |" % (m["label"], P, s0["Pe"], s0["dp"], s0["comp"], rs))
    out.append("")

    out.append("Table 3 (link rate per rank at which bandwidth time = compute time, P_e large; "
               "eta = %g)." % a.eta)
    out.append("")
    out.append("| rank | F TFLOP/s | DeepSeek-V3-like fp32 / bf16 | Mixtral-like fp32 / bf16 |")
    out.append("|---|---|---|---|")
    for name, F in [("GPU", 400), ("GPU", 500), ("GPU", 600), ("CPU node", a.cpu_tflops)]:
        cells = []
        for m in (ds, mx):
            v = []
            for bb in (4, 2):
                # B_link = 4 b F / (6 G H eta), in Gb/s
                B = 4 * bb * F * 1e12 / (6 * m["G"] * m["H"] * a.eta) * 8 / 1e9
                v.append(("%.0f" if B >= 10 else "%.1f") % B)
            cells.append(" / ".join(v) + " Gb/s")
        out.append("| %s | %g | %s | %s |" % (name, F, cells[0], cells[1]))
    out.append("")

    out.append("Table 4 (crossover T: comm <= compute for T at or above this; 'never': comm > compute "
               "for every T).")
    out.append("")
    out.append("| case | P_e | %s |" % " | ".join("%g Gb/s" % g for g in nets))
    out.append("|---|---|" + "---|" * len(nets))
    cases = [("GPU, DeepSeek-V3-like, bf16", ds, a, 256),
             ("GPU, Mixtral-like, fp32", mx, a, 8),
             ("GPU, Mixtral-like, bf16", mx, with_(a, bytes=2), 8),
             ("GPU, Mixtral-like, bf16, alpha x10", mx, with_(a, bytes=2, alpha_us=10 * a.alpha_us), 8),
             ("CPU node, DeepSeek-V3-like, fp32", ds, cpu, 256),
             ("CPU node, DeepSeek-V3-like, fp32, alpha x10", ds, with_(cpu, alpha_us=10 * a.alpha_us), 256),
             ("CPU node, Mixtral-like, fp32", mx, cpu, 8)]
    for label, m, aa, P in cases:
        cells = []
        for g in nets:
            t = crossover_T(m, P, g, aa)
            cells.append("never" if t is None else "%d" % math.ceil(t))
        out.append("| %s | %d | %s |" % (label, P, " | ".join(cells)))
    print("\n".join(out))


def calibrate(a):
    """Fit t = calls*lat_unit*alpha + bytes/B_eff to (bytes, seconds, calls) points."""
    pts = []
    for p in a.point:
        b, s, c = p.split(":")
        pts.append((float(b), float(s), float(c)))
    P = a.P[0]
    unit = (P - 1) if a.latency == "pairwise" else math.ceil(math.log2(P))
    if len(pts) == 1:
        b, s, c = pts[0]
        rest = s - c * unit * a.alpha_us * 1e-6
        print("B_eff = %.3g GB/s (alpha fixed at %g us)" % (b / rest / 1e9, a.alpha_us))
        return
    # least squares in x1 = calls*unit, x2 = bytes; unknowns alpha, 1/B
    s11 = sum((c * unit) ** 2 for b, s, c in pts)
    s12 = sum((c * unit) * b for b, s, c in pts)
    s22 = sum(b * b for b, s, c in pts)
    y1 = sum((c * unit) * s for b, s, c in pts)
    y2 = sum(b * s for b, s, c in pts)
    det = s11 * s22 - s12 * s12
    if det == 0:
        sys.exit("points are collinear: vary T (bytes) against the number of calls")
    alpha = (y1 * s22 - y2 * s12) / det
    invB = (s11 * y2 - s12 * y1) / det
    print("alpha = %.3g us per peer message, B_eff = %.3g GB/s" % (alpha * 1e6, 1e-9 / invB))
    for b, s, c in pts:
        print("  point %.3g B in %d calls: measured %.4g s, fitted %.4g s" % (b, c, s, c * unit * alpha + b * invB))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="tables", choices=["tables", "doc", "calibrate"])
    ap.add_argument("--model", choices=sorted(MODELS), help="one model (default: deepseek-v3 and mixtral)")
    ap.add_argument("--P", type=int, nargs="+", default=P_LIST, help="ranks")
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384], help="tokens per rank")
    ap.add_argument("--gbps", type=float, nargs="+", default=NETS_GBPS, help="link Gb/s per rank")
    ap.add_argument("--eta", type=float, default=0.8, help="achieved fraction of the link rate")
    ap.add_argument("--beff-gbs", type=float, help="effective GB/s per rank (overrides --gbps and --eta)")
    ap.add_argument("--alpha-us", type=float, default=2.0, help="per-peer message latency, microseconds")
    ap.add_argument("--latency", choices=["pairwise", "log"], default="pairwise")
    ap.add_argument("--bytes", type=float, default=4, help="bytes per exchanged value (4 fp32, 2 bf16)")
    ap.add_argument("--tflops", type=float, default=500, help="achieved TFLOP/s per rank")
    ap.add_argument("--cpu-tflops", type=float, default=2.0, help="doc: achieved TFLOP/s of a CPU node")
    ap.add_argument("--gemms", type=int, choices=[2, 3], help="override GEMMs per expert")
    ap.add_argument("--shared", action="store_true", help="add the shared expert's compute")
    ap.add_argument("--crossover", action="store_true", help="also print the crossover T table")
    ap.add_argument("--point", action="append", default=[], help="calibrate: BYTES:SECONDS:CALLS")
    a = ap.parse_args()
    if a.mode == "calibrate":
        if not a.point:
            sys.exit("calibrate needs at least one --point BYTES:SECONDS:CALLS")
        calibrate(a)
    elif a.mode == "doc":
        doc_tables(a)
    else:
        run_tables(a)


if __name__ == "__main__":
    main()
