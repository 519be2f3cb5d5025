"""Reports of a calibrated model: the assignment with predicted noise, and profiling plots.

    >>> print(assignment_report(qmodel))           # per edge: formats, predicted noise, stats
    >>> plot_profile(qmodel, "profile.png")         # |values| and |gradients| vs chosen ranges
    >>> plot_noise_vs_k(qmodel, "noise_vs_k.png")   # objective for K = 1, 2, ...

The profile is drawn in the spirit of hls4ml's numerical profiling: one row per value, the
distribution of |x| (and of |gradient|) on a log2 axis as box plots from the calibration
histogram, with the chosen format's representable range (one step to the largest value)
drawn over it.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx

from ..core import ir, ops

__all__ = ["assignment_report", "plot_profile", "plot_noise_vs_k", "calibrated_values", "hardware_summary"]


def calibrated_values(qmodel: fx.GraphModule):
    """(name, value Edge, NodeStats, predicted noise) for every calibrated value."""
    out = []
    for prefix, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            stats, value = ir.STATS.get(node), ir.VALUE.get(node)
            if stats is not None and value is not None:
                out.append((prefix + node.name, value, stats, ir.NOISE.get(node, {})))
    return out


def _fmt(f) -> str:
    return str(f) if f is not None else "float"


def assignment_report(qmodel: fx.GraphModule) -> str:
    """Per value: chosen forward/backward formats, predicted NSR, calibrated max |x|,
    overflow and underflow rates; then the solution and the hardware summary."""
    rows = [("value", "role", "forward", "NSR fwd", "max|x|", "ovf", "unf", "backward", "NSR bwd", "max|g|",
             "ovf", "unf")]
    for name, value, stats, noise in calibrated_values(qmodel):
        fwd_nsr, bwd_nsr = noise.get("*", (float("nan"), float("nan")))
        g = stats.gradient
        rows.append((name, value.role, _fmt(value.forward), f"{fwd_nsr:.2e}", f"{stats.value.max_abs:.3g}",
                     f"{100 * stats.value.overflow_rate(value.forward):.2f}%" if value.forward else "-",
                     f"{100 * stats.value.underflow_rate(value.forward):.2f}%" if value.forward else "-",
                     _fmt(value.backward), f"{bwd_nsr:.2e}" if g else "-", f"{g.max_abs:.3g}" if g else "-",
                     f"{100 * g.overflow_rate(value.backward):.2f}%" if g and value.backward else "-",
                     f"{100 * g.underflow_rate(value.backward):.2f}%" if g and value.backward else "-"))
        if len(noise) <= 2:  # one use: its gradient is the value's
            continue
        uses = {e.consumer: e for e in _uses(qmodel, name)}
        for use, (_, use_nsr) in noise.items():
            edge = uses.get(use)
            if use == "*" or edge is None:
                continue
            ug = stats.uses.get(use)
            rows.append((f"  ->{use}", "gradient", "", "", "", "", "", _fmt(edge.backward), f"{use_nsr:.2e}",
                         f"{ug.max_abs:.3g}" if ug else "-",
                         f"{100 * ug.overflow_rate(edge.backward):.2f}%" if ug and edge.backward else "-",
                         f"{100 * ug.underflow_rate(edge.backward):.2f}%" if ug and edge.backward else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sol = ir.SOLUTION.get(qmodel)
    if sol is not None:
        lines += ["", f"objective (summed predicted NSR): {sol.objective:.4g}   one format from the global max: "
                      f"{sol.baseline_objective:.4g}   {'exact' if sol.exact else f'heuristic, gap {sol.gap:.1%}'}"
                      f"   solved in {sol.solve_seconds:.3f} s ({sol.decisions} decisions, {sol.components} after "
                      "shared binary points)",
                  "objective by K: " + ", ".join(f"K={k}: {v:.3g}" for k, v in sorted(sol.curve.items()))]
        if sol.usage:
            lines.append("hardware budgets used: " + ", ".join(f"{k} {v:.4g}" for k, v in sol.usage.items()))
    hw = hardware_summary(qmodel)
    macs = {}
    for _, w in hw["macs"]:
        macs[w] = macs.get(w, 0) + 1
    lines += [f"hardware: {len(hw['formats'])} distinct formats ({', '.join(f'{b}.{f}' for b, f in hw['formats'])}), "
              f"{hw['bits_moved'] / 8e6:.3f} MB moved per step (values + gradients), MAC operand widths: "
              + (", ".join(f"{w} ({n}x)" for w, n in sorted(macs.items())) or "none")]
    return "\n".join(lines)


def _uses(qmodel, name):
    prefix, _, node_name = name.rpartition(".") if name.startswith("loss.") else ("", "", name)
    for p, gm in ir.graphs(qmodel):
        if p.rstrip(".") == prefix:
            for node in gm.graph.nodes:
                if node.name == node_name:
                    return list(ir.USES.get(node, {}).values())
    return []


def _box(stats):
    """Box-plot statistics (log2 |x|) of a calibration histogram, zeros left out."""
    n = stats.hist
    if not n.sum():
        return None
    centres = stats.exponents - 0.5
    cum = np.cumsum(n) / n.sum()
    q = lambda p: float(centres[np.searchsorted(cum, p)])
    nz = np.nonzero(n)[0]
    return {"med": q(0.5), "q1": q(0.25), "q3": q(0.75), "whislo": float(centres[nz[0]]) - 0.5,
            "whishi": float(np.log2(stats.max_abs)), "fliers": []}


def plot_profile(qmodel: fx.GraphModule, path: str) -> None:
    """Write a PNG: per value, box plots of log2 |value| and log2 |gradient| with the chosen
    forward and backward formats' ranges (smallest step .. largest value) as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vals = calibrated_values(qmodel)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(vals) + 1.5), sharey=True)
    for ax, kind in zip(axes, ("value", "gradient")):
        boxes, ranges = [], []
        for i, (name, value, stats, _) in enumerate(vals):
            s = stats.value if kind == "value" else stats.gradient
            fmt = value.forward if kind == "value" else value.backward
            b = _box(s) if s is not None else None
            if b is not None:
                b["label"] = name
                boxes.append((i, b))
            if fmt is not None:
                ranges.append((i, -fmt.frac, float(np.log2(fmt.max_value)), str(fmt)))
        for i, lo, hi, label in ranges:
            ax.barh(i, hi - lo, left=lo, height=0.8, color="tab:orange", alpha=0.25)
            ax.text(hi + 0.3, i, label, va="center", fontsize=7, color="tab:orange")
        if boxes:
            # matplotlib 3.10 renamed vert=False to orientation="horizontal"
            side = ({"orientation": "horizontal"} if tuple(map(int, matplotlib.__version__.split(".")[:2])) >= (3, 10)
                    else {"vert": False})
            ax.bxp([b for _, b in boxes], positions=[i for i, _ in boxes], **side, widths=0.5,
                   showfliers=False, patch_artist=True, boxprops={"facecolor": "tab:blue", "alpha": 0.6})
        ax.set_yticks(range(len(vals)), [v[0] for v in vals], fontsize=7)
        ax.set_xlabel(f"log2 |{kind}|  (box: calibration quartiles, whiskers: smallest bin..max; "
                      "bar: format's step..max)" if kind == "value" else f"log2 |{kind}|")
        ax.set_title(f"{kind}s" + (" (forward)" if kind == "value" else " (backward)"))
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # shared: the first value at the top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_noise_vs_k(qmodel: fx.GraphModule, path: str) -> None:
    """Write a PNG of the cost model's objective against the number of formats K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sol = ir.SOLUTION.of(qmodel)
    ks = sorted(sol.curve)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(ks, [sol.curve[k] for k in ks], "o-", label="cost model (exact)" if sol.exact else "cost model")
    ax.axhline(sol.baseline_objective, color="gray", ls="--", label="one format from the global max")
    ax.set_xlabel("K (distinct formats)")
    ax.set_ylabel("summed predicted noise-to-signal")
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hardware_summary(qmodel: fx.GraphModule) -> dict:
    """Distinct formats, bits moved (forward values and gradients, at the calibration batch
    size when calibrated, else at the example input's) and the operand widths of every MAC."""
    formats, moved, macs = set(), 0, []
    for prefix, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            value = ir.VALUE.get(node)
            if value is None:
                continue
            for f in [value.forward, value.backward] + [f for e in ir.USES.get(node, {}).values()
                                                        for f in (e.forward, e.backward)]:
                if f is not None:
                    formats.add((f.bits, f.frac))
            stats = ir.STATS.get(node)
            batches = ir.CALIBRATION_BATCHES.get(gm, 1)
            if stats is not None:
                n_fwd = stats.value.count / batches
                n_bwd = stats.gradient.count / batches if stats.gradient else 0
            else:
                n_fwd = math.prod(value.shape) if value.shape else 0
                n_bwd = n_fwd
            moved += (value.forward.bits if value.forward else 32) * n_fwd
            moved += (value.backward.bits if value.backward else 32) * n_bwd
            op = ops.op_of(gm, node)
            if op is not None and op.group == "multiply_accumulate":
                # after insert_casts the operands are cast nodes carrying their edge
                operands = [ir.EDGE.of(a).forward for a in node.all_input_nodes[:2] if ir.EDGE.has(a)]
                widths = [f.bits if f else 32 for f in operands]
                macs.append((prefix + node.name, "x".join(map(str, widths))))
    return {"formats": sorted(formats), "bits_moved": int(moved), "macs": macs}
