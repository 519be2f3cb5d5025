"""Report on sweep results: mean ± std and Student-t 95 % intervals per point, plots, a Markdown summary.

    fxcompile report results/study.csv --out results/study_report

writes ``summary.md`` (the study's table: FP32, baseline, optimized, and an ``auto*`` policy
when the results hold one; then every point) and PNG figures: accuracy against the
fractional-bit share, one line per role, and accuracy against epochs, one line per batch
size — each with 95 % confidence error bars and FP32 as a reference line.  A figure is drawn
wherever the results hold the points for it, whichever sweep file produced them.  Runs of
``policy = "auto"`` points (read from the ``.jsonl`` beside the CSV) add accuracy against the
cost model's objective (Spearman rank correlation) and against weight memory bits and BOPs
with the Pareto front.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence

from ..core.formats import FixedPoint
from .sweep import FORMAT_ROLES, SweepError, read_rows

__all__ = ["t_critical", "interval", "spearman", "ranked_runs", "auto_runs", "PointStats", "summarize", "load_results", "markdown_table", "report",
           "STUDY_ACCURACY"]

# Two-sided 95 % critical values of Student's t (upper 2.5 % point) by degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
         19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052,
         28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z975 = 1.959964

STUDY_ACCURACY = {"fp32": 93.75, "baseline": 87.5, "optimized": 84.4}   # the poster's numbers (%)


def t_critical(df: int) -> float:
    """Upper 2.5 % point of Student's t with ``df`` degrees of freedom (two-sided 95 %).

    Tabulated to three decimals up to 30, then interpolated linearly in 1/df (exact to
    about 1e-3, the table's own precision) towards the normal 1.960.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    lo = max(k for k in keys if k < df)
    hi = min((k for k in keys if k > df), default=None)
    t_hi, inv_hi = (_T975[hi], 1 / hi) if hi else (Z975, 0.0)
    w = (1 / lo - 1 / df) / (1 / lo - inv_hi)
    return _T975[lo] + w * (t_hi - _T975[lo])


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, sample std, 95 % CI half-width) of ``values``; std and half-width are NaN for n < 2."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    return mean, std, t_critical(n - 1) * std / math.sqrt(n)


@dataclasses.dataclass
class PointStats:
    point: str
    label: str
    config: dict
    formats: dict
    accuracies: list[float]        # per seed, in %
    histories: list[list[float]]   # per seed, accuracy (%) after each epoch

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def stats(self) -> tuple[float, float, float]:
        return interval(self.accuracies)

    @property
    def policy_name(self) -> str:
        return self.config["policy_name"]

    def rest(self, drop: Iterable[str] = ()) -> str:
        """The configuration without the policy (and without ``drop`` keys), as a hashable key."""
        return json.dumps({k: v for k, v in self.config.items() if k not in ("policy", "policy_name", *drop)},
                          sort_keys=True)

    def describe(self, batch: bool = True) -> str:
        c = self.config
        return (f"{c['dataset']}, {c['model']}, {c['epochs']} epoch(s), " + (f"batch {c['batch_size']}, " if batch
                else "") + f"lr {c['lr']}, train subset {c.get('train_subset') or 'all'}")


def load_results(files: Iterable[str | Path]) -> list[dict]:
    """Rows of one or more results CSVs; a (point, seed) seen twice counts once."""
    rows, seen = [], set()
    for f in files:
        if not Path(f).exists():
            raise SweepError(f"{f}: no such results file")
        for r in read_rows(f):
            key = (r["point"], r["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def summarize(rows: list[dict]) -> list[PointStats]:
    """One :class:`PointStats` per point, in first-seen order."""
    out: dict[str, PointStats] = {}
    for r in rows:
        if r["point"] not in out:
            out[r["point"]] = PointStats(r["point"], r["label"], json.loads(r["config"]),
                                         {k: r[k] for k in FORMAT_ROLES}, [], [])
        out[r["point"]].accuracies.append(100 * float(r["accuracy"]))
        out[r["point"]].histories.append([100 * a for a in json.loads(r["history"])])
    return list(out.values())


def _pm(p: PointStats) -> str:
    mean, std, half = p.stats
    return f"{mean:.2f} ± {std:.2f}" if p.n > 1 else f"{mean:.2f}"


def _ci(p: PointStats) -> str:
    mean, _, half = p.stats
    return f"[{mean - half:.2f}, {mean + half:.2f}]" if p.n > 1 else "n/a (one seed)"


def _shipped(name: str) -> dict | None:
    from ..core.policy import SHIPPED
    return SHIPPED[name]().to_dict() if name in SHIPPED and name != "fp32" else None


def _is_reference(p: PointStats) -> bool:
    """FP32, a shipped policy unchanged, or a cost-model (auto*) choice: the rows of the study's table."""
    if p.config["policy"] is None:
        return True
    if p.policy_name.startswith("auto"):
        return True
    return p.config["policy"] == _shipped(p.policy_name)


def markdown_table(points: list[PointStats]) -> str:
    """The study's comparison for each configuration with two or more reference rows (FP32, baseline, ...)."""
    groups: dict[str, list[PointStats]] = {}
    for p in points:
        if _is_reference(p):
            groups.setdefault(p.rest(), []).append(p)
    order = {"fp32": 0, "baseline": 1, "optimized": 2}
    lines = []
    for members in groups.values():
        if len(members) < 2:   # a lone baseline row of some other sweep compares with nothing
            continue
        members.sort(key=lambda p: (order.get(p.policy_name, 3), p.policy_name))
        fp32 = next((p for p in members if p.config["policy"] is None), None)
        lines += [f"**{members[0].describe()}**", "",
                  "| policy | activation | gradient | loss | weight | bias | runs | accuracy % (mean ± std) "
                  "| 95 % CI | Δ vs FP32 (points) | study % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in members:
            delta = f"{p.stats[0] - fp32.stats[0]:+.2f}" if fp32 is not None and p is not fp32 else "—"
            study = STUDY_ACCURACY.get(p.policy_name if p.config["policy"] is not None else "fp32") \
                if (p.config["dataset"], p.config["model"]) == ("fashion_mnist", "seed_cnn") else None
            lines.append(f"| {p.policy_name} | " + " | ".join(p.formats[r] for r in FORMAT_ROLES) +
                         f" | {p.n} | {_pm(p)} | {_ci(p)} | {delta} | {study if study is not None else '—'} |")
        lines.append("")
    return "\n".join(lines)


def points_table(points: list[PointStats]) -> str:
    lines = ["| point | policy | label | activation | gradient | loss | weight | bias | epochs | batch | runs "
             "| accuracy % (mean ± std) | 95 % CI |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.point} | {p.policy_name} | {p.label} | " + " | ".join(p.formats[r] for r in FORMAT_ROLES)
                     + f" | {p.config['epochs']} | {p.config['batch_size']} | {p.n} | {_pm(p)} | {_ci(p)} |")
    return "\n".join(lines) + "\n"


# ---- figures ------------------------------------------------------------------------------

def _without(policy: dict, role: str) -> str:
    formats = {k: v for k, v in policy["formats"].items() if k != role}
    return json.dumps(dict(policy, formats=formats), sort_keys=True)


def role_lines(points: list[PointStats]) -> list[tuple[PointStats, dict[str, list[PointStats]]]]:
    """For each unchanged shipped-policy point: per role, the points that differ from it only in that role."""
    figures = []
    for ref in points:
        if ref.config["policy"] is None or ref.config["policy"] != _shipped(ref.policy_name):
            continue
        lines = {}
        for role in FORMAT_ROLES:
            line = [p for p in points if p.config["policy"] is not None and p.rest() == ref.rest()
                    and p.policy_name == ref.policy_name
                    and _without(p.config["policy"], role) == _without(ref.config["policy"], role)]
            if len({p.formats[role] for p in line}) > 1:
                lines[role] = sorted(line, key=lambda p: _share(p.formats[role]))
        if lines:
            figures.append((ref, lines))
    return figures


def _share(fmt: str) -> float:
    f = FixedPoint.parse(fmt)
    return f.frac / f.bits


def batch_lines(points: list[PointStats]) -> list[list[PointStats]]:
    """Groups of points equal in everything but the batch size (at least two batch sizes)."""
    groups: dict[tuple, list[PointStats]] = {}
    for p in points:
        groups.setdefault((p.rest(("batch_size",)), json.dumps(p.config["policy"], sort_keys=True)), []).append(p)
    return [sorted(g, key=lambda p: p.config["batch_size"]) for g in groups.values()
            if len({p.config["batch_size"] for p in g}) > 1]


def _fp32_for(points: list[PointStats], p: PointStats, drop=()) -> PointStats | None:
    matches = [q for q in points if q.config["policy"] is None and q.rest(drop) == p.rest(drop)]
    return next((q for q in matches if q.config["batch_size"] == p.config["batch_size"]), matches[0] if matches
                else None)


def _reference_line(ax, fp32: PointStats | None):
    if fp32 is None:
        return
    mean, _, half = fp32.stats
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"FP32 ({mean:.2f} %)")
    if fp32.n > 1:
        ax.axhspan(mean - half, mean + half, color="black", alpha=0.08)


def _plots(points: list[PointStats], out: Path) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for i, (ref, lines) in enumerate(role_lines(points)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for role, line in lines.items():
            xs = [_share(p.formats[role]) for p in line]
            ys = [p.stats[0] for p in line]
            err = [0.0 if p.n < 2 else p.stats[2] for p in line]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=role)
        _reference_line(ax, _fp32_for(points, ref))
        ax.set_xlabel("fractional-bit share of the role's format (frac / bits)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"one role at a time, others {ref.policy_name}\n{ref.describe()}", fontsize=9)
        name = _save(fig, ax, out, "frac_share", i)
        made.append((name, f"accuracy vs fractional-bit share, one line per role ({ref.policy_name}); "
                           "error bars: 95 % CI"))
    for i, group in enumerate(batch_lines(points)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for p in group:
            epochs = min(len(h) for h in p.histories)
            per_epoch = [interval([h[e] for h in p.histories]) for e in range(epochs)]
            ax.errorbar(range(1, epochs + 1), [m for m, _, _ in per_epoch],
                        yerr=[0.0 if p.n < 2 else h for _, _, h in per_epoch], marker="o", capsize=3,
                        label=f"batch {p.config['batch_size']}")
        _reference_line(ax, _fp32_for(points, group[0], drop=("batch_size",)))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(range(1, max(len(h) for p in group for h in p.histories) + 1))
        ax.set_title(f"{group[0].policy_name}: one line per batch size\n{group[0].describe(batch=False)}", fontsize=9)
        name = _save(fig, ax, out, "epochs", i)
        made.append((name, f"accuracy vs epochs, one line per batch size ({group[0].policy_name}); "
                           "error bars: 95 % CI"))
    return made


def _save(fig, ax, out: Path, stem: str, i: int) -> str:
    """Grid, legend, write ``<stem>[_i].png`` into ``out`` and close the figure; returns the name."""
    import matplotlib.pyplot as plt
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    name = f"{stem}{'' if i == 0 else f'_{i}'}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats in both (lower cost, higher accuracy)."""
    front, best = [], -math.inf
    for c, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((c, a))
            best = a
    return front


# the hardware budgets of the cost model (fxc.auto) whose usage a run records
BUDGETS = ("weight_memory_bits", "bops", "hls4ml_dsps")


def _objective_plots(runs: list[dict], out: Path, fp32: PointStats | None = None) -> list[tuple[str, str]]:
    """Runs of ``examples/auto_formats.py --results`` (or a sweep's ``policy = "auto"`` points):
    measured accuracy against the cost model's objective (log scale), and against each hardware
    budget's usage with the Pareto front; ``fp32`` adds its accuracy as a reference line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    runs = [r for r in runs if r.get("objective") is not None and r.get("accuracy") is not None]
    if not runs:
        return made
    number = {id(r): i for i, r in enumerate(runs, 1)}  # as in summary.md's table
    ranked = ranked_runs(runs)
    # the objective at the common drift (Solution.predicted) ranks assignments of different widths
    # on one scale; the solver's own objective where a run lacks it
    key = "predicted" if ranked and all(r.get("predicted") is not None for r in ranked) else "objective"
    if ranked:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        xs, ys = [max(r[key], 1e-300) for r in ranked], [100 * r["accuracy"] for r in ranked]
        ax.scatter(xs, ys, s=18, label="runs (numbered as in summary.md)")
        for r, x, y in zip(ranked, xs, ys):
            ax.annotate(str(number[id(r)]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xscale("log")
        what = "objective at the common drift" if key == "predicted" else "objective"
        ax.set_xlabel(f"cost model {what} (predicted, lower is better)")
        ax.set_ylabel("test accuracy (%)")
        rho = spearman([-r[key] for r in ranked], [r["accuracy"] for r in ranked])
        _reference_line(ax, fp32)
        ax.set_title(f"predicted vs measured: Spearman {rho:.2f} over {len(ranked)} runs", fontsize=9)
        also = ""
        if key == "predicted":  # the solver's own objective, for comparison
            own = spearman([-r["objective"] for r in ranked], [r["accuracy"] for r in ranked])
            also = f" (with the solver's objective instead: {own:.2f})"
        made.append((_save(fig, ax, out, "objective_vs_accuracy", 0),
                     f"accuracy vs the cost model's {what}, {len(ranked)} runs with fixed formats; Spearman rank "
                     f"correlation (minus {what}, accuracy) {rho:.2f}{also}"))
    for budget in BUDGETS:
        pts = [(r["usage"][budget], 100 * r["accuracy"]) for r in runs if budget in (r.get("usage") or {})]
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.scatter(*zip(*pts), s=18, label="runs")
        front = _pareto(pts)
        ax.step(*zip(*front), where="post", color="black", linewidth=1, label="Pareto front")
        _reference_line(ax, fp32)
        ax.set_xlabel(budget.replace("_", " "))
        ax.set_ylabel("test accuracy (%)")
        made.append((_save(fig, ax, out, f"pareto_{budget}", 0), f"accuracy vs {budget} with the Pareto front"))
    return made


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties share their average rank); NaN under 3 pairs or without spread."""
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _objective_rows(runs: list[dict]) -> list[str]:
    """The Markdown table of cost-model runs, numbered as in the objective figure."""
    rows = ["| # | policy | seed | objective | at the common drift | weight memory bits | BOPs | hls4ml DSPs | accuracy (%) | formats |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(runs, 1):
        usage = r.get("usage") or {}
        policy = r["policy"] + (f", reassign every {r['reassign'].get('every')}" if "reassign" in r else "")
        predicted = f"{r['predicted']:.4g}" if r.get("predicted") is not None else "—"
        rows.append(f"| {i} | {policy} | {r.get('seed', '')} | {r['objective']:.4g} | {predicted} | "
                    + " | ".join(f"{usage[b]:.4g}" if b in usage else "—" for b in BUDGETS)
                    + f" | {100 * r['accuracy']:.2f} | {' '.join(r.get('formats', []))} |")
    return rows


def ranked_runs(runs: list[dict]) -> list[dict]:
    """The runs the cost model's objective ranks: it scores the formats a run keeps under the
    casts' default gradient rule, so runs whose formats moved during training (re-assignment)
    and runs trained with another rule at the prediction (``prediction_gradient``: the same
    formats and score, another training) are left out."""
    return [r for r in runs if "reassign" not in r and "prediction_gradient=" not in r.get("policy", "")]


def auto_runs(files: Iterable[str | Path], rows: list[dict]) -> list[dict]:
    """The sweep runs of ``policy = "auto"`` points among ``rows``, from the metadata (``.jsonl``)
    beside each results CSV: policy, seed, accuracy, objective, formats, budget usage and budgets."""
    keys = {(r["point"], int(r["seed"])) for r in rows}
    runs, seen = [], set()
    for f in files:
        meta = Path(f).with_suffix(".jsonl")
        if not meta.exists():
            continue
        for line in meta.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            key, result = (rec.get("point"), rec.get("seed")), rec.get("result") or {}
            if key in keys and key not in seen and result.get("objective") is not None:
                seen.add(key)
                runs.append({"policy": rec["config"]["policy_name"], "point": key[0], "seed": key[1],
                             "label": rec.get("label"), "accuracy": result["accuracy"],
                             **{k: result[k] for k in ("objective", "predicted", "formats", "usage", "budgets")
                                if k in result}})
    return runs


def _objective_report(files: list[Path], out: str | Path | None) -> str:
    runs = []
    for f in files:
        data = json.loads(Path(f).read_text())
        if "runs" not in data:
            raise SweepError(f"{f}: not a results file of examples/auto_formats.py --results (no 'runs')")
        runs += data["runs"]
    if not runs:
        raise SweepError(f"{', '.join(map(str, files))}: no runs")
    out = Path(out) if out else Path(files[0]).with_name(Path(files[0]).stem + "_report")
    out.mkdir(parents=True, exist_ok=True)
    figures = _objective_plots(runs, out)
    runs = [r for r in runs if r.get("objective") is not None and r.get("accuracy") is not None]
    rows = _objective_rows(runs)
    md = ["# Cost model report", "", f"Results: {', '.join(map(str, files))}; {len(runs)} runs.", ""] + rows
    if figures:
        md += ["", "## Figures", ""] + [f"![{desc}]({name})\n\n{desc}\n" for name, desc in figures]
    (out / "summary.md").write_text("\n".join(md))
    return "\n".join(rows[2:] + [desc for _, desc in figures[:1]] + [f"wrote {out / 'summary.md'}"])


def report(files: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Write ``summary.md`` and the figures into ``out``; return the text printed to the terminal.

    JSON files written by ``examples/auto_formats.py --results`` get the cost model's report
    instead: accuracy against the objective (with the Spearman rank correlation) and against
    weight memory and BOPs with the Pareto front."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if files and all(str(f).endswith(".json") for f in files):
        return _objective_report([Path(f) for f in files], out)
    rows = load_results(files)
    points = summarize(rows)
    if not points:
        raise SweepError(f"{', '.join(map(str, files))}: no finished runs yet")
    out = Path(out) if out else Path(files[0]).with_name(Path(files[0]).stem + "_report")
    out.mkdir(parents=True, exist_ok=True)
    figures = _plots(points, out)
    chosen = auto_runs(files, rows)
    if chosen:
        auto_point = next(p for p in points if p.point == chosen[0]["point"])
        figures += _objective_plots(chosen, out, _fp32_for(points, auto_point))
    table = markdown_table(points)
    md = ["# Sweep report", "", f"Results: {', '.join(str(f) for f in files)}; {len(points)} points, "
          f"{sum(p.n for p in points)} runs. Accuracy on the test set in %; the 95 % confidence interval of "
          "the mean uses Student's t with n - 1 degrees of freedom.", ""]
    if table:
        md += ["## FP32 and the study's policies", "", table]
    md += ["## Every point", "", points_table(points)]
    if chosen:
        md += ["## Formats chosen by the cost model (policy = \"auto\")", "", "Each run's objective (predicted, "
               "lower is better) and what its chosen widths use of each hardware budget.", "",
               *_objective_rows(chosen), ""]
    if figures:
        md += ["## Figures", ""] + [f"![{desc}]({name})\n\n{desc}\n" for name, desc in figures]
    (out / "summary.md").write_text("\n".join(md))
    text = [f"{'point':<13}{'runs':>5}  {'mean':>7} {'std':>6}  {'95 % CI':<17} label"]
    for p in points:
        mean, std, half = p.stats
        ci = f"[{mean - half:6.2f}, {mean + half:6.2f}]" if p.n > 1 else "n/a"
        text.append(f"{p.point:<13}{p.n:>5}  {mean:7.2f} {std:6.2f}  {ci:<17} {p.policy_name}: {p.label}")
    text += ["", table, f"wrote {out / 'summary.md'}" + "".join(f", {out / n}" for n, _ in figures)]
    return "\n".join(text)
