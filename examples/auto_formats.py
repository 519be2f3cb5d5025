"""Train the seed CNN on Fashion-MNIST with formats chosen by the cost model (``fxc.auto``).

    python examples/auto_formats.py --data ../shared/data/fashion-mnist --max-formats 3 --bits 16 --seeds 0 1 2
    python examples/auto_formats.py --max-formats 3 --bits activation=8,gradient=8,weight=16 \\
        --gradient-rounding stochastic
    python examples/auto_formats.py --max-formats 1 --reassign-every 200 --reassign-rechoose   # formats follow training

Prints the formats the solver chose, the predicted noise against the naive one-format
baseline, and the test accuracy per seed; ``--out`` appends one JSON line per run.
``--runs DIR`` keeps one JSON file per run and skips runs already there (an interrupted
series resumes); ``--results FILE`` then writes every run in DIR (objective, formats,
budget usage, accuracy) and the Spearman rank correlation between the objective and the
measured accuracy over them::

    python examples/auto_formats.py --data ../shared/data/fashion-mnist --objective sensitivity \
        --max-formats 3 --bits 16 --seeds 0 --runs runs/auto --results benchmarks/results/auto_formats.json

``--table FILE`` prints such a results file as a markdown table, one row per assignment
(benchmarks/auto_formats_results.md holds it)::

    python examples/auto_formats.py --table benchmarks/results/auto_formats.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

import fxcompile as fxc
from fxcompile.core.auto import OBJECTIVES, parse_bits
from fxcompile.experiments.data import fashion_mnist
from fxcompile.experiments.report import ranked_runs, spearman
from fxcompile.training.reassign import Reassign
from fxcompile.training.train import TrainConfig, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--max-formats", type=int, default=3)
    p.add_argument("--bits", default="16", help="16, 8/16 (a choice of widths), or per role: activation=8,gradient=8,weight=16")
    p.add_argument("--objective", default="sensitivity", choices=OBJECTIVES)
    p.add_argument("--gradient-rounding", default="nearest")
    p.add_argument("--update-rounding", default="stochastic", help="rounding of each weight/bias update")
    p.add_argument("--margin", type=int, default=None,
                   help="octaves of drift the formats allow for (default: 4 at >= 12 bits, else 1; see fxc.Auto)")
    p.add_argument("--output-margin", type=int, default=None,
                   help="octaves the model's output may grow beyond --margin (default: --margin's value)")
    p.add_argument("--prediction-gradient", default=None, choices=["inward"],
                   help="inward: a saturated logit keeps the gradient that moves it back into range "
                        "(default: the clamp's derivative, zero, as on every other edge)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fp32", action="store_true", help="also train in FP32 with the same seeds")
    p.add_argument("--weight-memory-bits", type=float, default=None, help="budget: total bits of weights and biases")
    p.add_argument("--bops", type=float, default=None, help="budget: bit-operations per sample (MACs x bits x bits)")
    p.add_argument("--hls4ml-dsps", type=int, default=None, metavar="N",
                   help="budget: DSPs by hls4ml's estimate (weights of 9+ bits: one per multiplier / reuse factor)")
    p.add_argument("--hls4ml-reuse-factor", type=int, default=1, metavar="R",
                   help="the reuse factor the hls4ml_dsps estimate assumes")
    p.add_argument("--reassign-every", type=int, default=0, metavar="N",
                   help="move the formats' binary points every N steps from each edge's range history")
    p.add_argument("--reassign-rechoose", action="store_true", help="re-run the solver at each re-assignment "
                   "(slots may change format) instead of moving the current formats")
    p.add_argument("--reassign-saturation", type=float, default=None, metavar="RATE",
                   help="also re-assign when an observed edge saturates more than this fraction")
    p.add_argument("--reassign-underflow", type=float, default=None, metavar="RATE",
                   help="also re-assign when an observed edge flushes more than this fraction of its nonzero values")
    p.add_argument("--reassign-headroom", type=int, default=1, metavar="OCTAVES",
                   help="octaves of growth beyond the predicted one a moved format is also scored for (default 1)")
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    p.add_argument("--runs", default=None, help="one JSON file per run in this directory; runs already there are skipped")
    p.add_argument("--results", default=None, help="write all runs in --runs and their Spearman correlation here")
    p.add_argument("--checkpoints", default=None,
                   help="checkpoint each run under this directory and resume an interrupted one from there")
    p.add_argument("--table", metavar="RESULTS", default=None,
                   help="instead of training: print a results file (--results) as a markdown table, one "
                        "row per assignment")
    p.add_argument("--fp32-results", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                                                  / "study.json"),
                   help="the FP32 runs --table compares with (examples/fashion_mnist.py --results)")
    p.add_argument("--rescore", action="store_true",
                   help="instead of training: add the prediction (Solution.predicted) to each run in --runs made "
                        "before it was recorded, from the run's own command (calibration only), then --results")
    return p


def _policy(args):
    return fxc.auto(max_formats=args.max_formats, bits=parse_bits(args.bits), objective=args.objective,
                    gradient_rounding=args.gradient_rounding, update_rounding=args.update_rounding, margin=args.margin,
                    output_margin=args.output_margin, prediction_gradient=args.prediction_gradient,
                    calibration_batches=args.calibration_batches, weight_memory_bits=args.weight_memory_bits,
                    bops=args.bops, hls4ml_dsps=args.hls4ml_dsps, hls4ml_reuse_factor=args.hls4ml_reuse_factor)


def _data(args):
    key = (args.data, args.train_subset)
    if key not in _DATA:  # several configurations run in one process load the data once
        _DATA.clear()
        _DATA[key] = fashion_mnist(args.data, train_subset=args.train_subset)
    return _DATA[key]


def rescore(runs: Path, data: str | None) -> int:
    """Add ``predicted`` to every fixed-format run file in ``runs`` that lacks it: its own
    command's policy calibrated again for its seed (deterministic: the same formats, checked)
    and scored at the common drift.  Returns how many runs it scored."""
    done = 0
    for f in sorted(runs.glob("*.json")):
        row = json.loads(f.read_text())
        if "predicted" in row or "reassign" in row or row.get("objective") is None:
            continue
        args = _parser().parse_args(row["command"].split()[2:])
        args.data = data
        train_data, test_data = _data(args)
        m = train(TrainConfig(policy=_policy(args), epochs=0, seed=row["seed"], progress=False), train_data,
                  test_data)
        sol = m["model_object"].meta["fxc_solution"]
        formats = [f"{b}.{fr}" for b, fr in sol.formats]
        if formats != row["formats"]:
            raise SystemExit(f"{f}: calibrating again chose {formats}, the run chose {row['formats']}; not scored")
        row["predicted"] = sol.predicted
        f.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{f.name}: predicted {sol.predicted:.4g} (objective {row['objective']:.4g})", flush=True)
        done += 1
    return done


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text()), json.loads(Path(args.fp32_results).read_text())))
        return
    if args.results and not args.runs:
        p.error("--results collects the runs of a --runs directory")
    torch.set_num_threads(1)
    if args.rescore:
        if not args.runs:
            p.error("--rescore scores the runs of a --runs directory")
        rescore(Path(args.runs), args.data)
        if args.results:
            write_results(Path(args.runs), Path(args.results))
        return
    train_data, test_data = _data(args)
    policy = _policy(args)
    reassign = None
    if args.reassign_every or args.reassign_saturation is not None or args.reassign_underflow is not None:
        reassign = Reassign(every=args.reassign_every, rechoose=args.reassign_rechoose,
                            saturation=args.reassign_saturation, underflow=args.reassign_underflow,
                            headroom=args.reassign_headroom)
    runs = {}
    for name, pol in ([("fp32", None)] if args.fp32 else []) + [(str(policy), policy)]:
        accs = []
        # runs that move their formats are other runs than those that keep them
        stem = _slug(name) + (_reassign_stem(reassign) if reassign is not None and pol is not None else "")
        for seed in args.seeds:
            done = Path(args.runs) / f"{stem}-e{args.epochs}-seed{seed}.json" if args.runs else None
            if done is not None and done.exists():
                row = json.loads(done.read_text())
                print(f"already run: {done}", flush=True)
                accs.append(100 * row["accuracy"])
                continue
            t0 = time.time()
            ckpt = Path(args.checkpoints) / f"{stem}-e{args.epochs}-seed{seed}" if args.checkpoints else None
            m = train(TrainConfig(policy=pol, epochs=args.epochs, seed=seed, progress=False,
                                  reassign=reassign if pol is not None else None), train_data, test_data,
                      checkpoint_dir=ckpt, resume=ckpt is not None)
            q = m.pop("model_object")
            row = {"policy": name, "seed": seed, "accuracy": m["accuracy"], "history": m["history"],
                   "train_size": m["train_size"], "test_size": m["test_size"], "epochs": m["epochs"],
                   "seconds": round(time.time() - t0, 1), "step_time_ms": m["step_time_ms"],
                   "argmax_ties": argmax_ties(q, test_data)}
            if "reassignments" in m:
                row.update(reassign=reassign.to_dict(), reassignments=m["reassignments"],
                           reassign_moves=m["reassign_moves"], final_formats=m["final_formats"])
            sol = getattr(q, "meta", {}).get("fxc_solution")
            if sol is not None:
                row["formats"] = [f"{b}.{f}" for b, f in sol.formats]
                row["distinct_formats"] = len(fxc.assignment(q).formats())
                row.update(objective=sol.objective, baseline_objective=sol.baseline_objective, exact=sol.exact,
                           objective_by_k={str(k): v for k, v in sol.curve.items()}, usage=sol.usage,
                           solve_seconds=sol.solve_seconds, predicted=sol.predicted)
            row["command"] = _command(argv)
            print(json.dumps(row), flush=True)
            if done is not None:
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(row, indent=1) + "\n")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            accs.append(100 * m["accuracy"])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        runs[name] = accs
        print(f"{name}: {statistics.fmean(accs):.2f} ± {std:.2f} % over {len(accs)} seed(s)", flush=True)
    if args.results:
        write_results(Path(args.runs), Path(args.results))


_DATA: dict = {}


def argmax_ties(model, data, batch_size: int = 1000) -> int:
    """How many test images have their largest output shared by two or more classes (argmax
    then takes the first: a saturated logit format makes such ties)."""
    x, _ = data
    was_training = model.training
    model.eval()
    ties = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size])
            ties += int(((out == out.max(1, keepdim=True).values).sum(1) > 1).sum())
    model.train(was_training)
    return ties


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "_" for c in name).strip("_")


def _command(argv) -> str:
    import sys
    words = list(sys.argv[1:] if argv is None else argv)
    if "--data" in words:  # the data directory as the project names it
        words[words.index("--data") + 1] = "../shared/data/fashion-mnist"
    return " ".join(["python", "examples/auto_formats.py", *words])


def write_results(runs: Path, results: Path) -> dict:
    """Every run in ``runs`` with an objective, and the rank correlation between the predicted
    goodness (minus the objective; minus ``predicted``, the objective at the common drift, over
    the runs that have it) and the measured accuracy over them."""
    rows = [json.loads(f.read_text()) for f in sorted(runs.glob("*.json"))]
    rows = [r for r in rows if r.get("objective") is not None]
    by_policy: dict[str, list[float]] = {}
    for r in rows:
        by_policy.setdefault(_label(r), []).append(100 * r["accuracy"])
    # the objective scores the formats a run keeps, under the casts' default gradient rule: runs that
    # move them or train with another rule at the prediction are listed, not ranked (then pooled below)
    ranked = ranked_runs(rows)
    commands = sorted({r.get("command", "") for r in rows})
    out = {"command": " ; ".join(commands), "date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": [{k: r[k] for k in ("policy", "seed", "epochs", "train_size", "test_size", "accuracy", "objective",
                                       "objective_by_k", "formats", "distinct_formats", "usage", "solve_seconds",
                                       "seconds", "command", "reassign", "final_formats", "measured_at", "predicted") if k in r}
                    for r in rows],
           "policies": {p: {"accuracy_percent": a, "mean": statistics.fmean(a),
                            "std": statistics.stdev(a) if len(a) > 1 else 0.0} for p, a in by_policy.items()},
           "spearman_objective_accuracy": rho if (rho := spearman([-r["objective"] for r in ranked],
                                                                  [r["accuracy"] for r in ranked])) == rho else None,
           "spearman_runs": len(ranked), "spearman_assignments": len({_label(r) for r in ranked})}
    scored = [r for r in ranked if r.get("predicted") is not None]
    rho = spearman([-r["predicted"] for r in scored], [r["accuracy"] for r in scored])
    out.update(spearman_predicted_accuracy=rho if rho == rho else None, spearman_predicted_runs=len(scored),
               spearman_predicted_assignments=len({_label(r) for r in scored}))
    # for comparison: the runs with fixed formats whatever their gradient rule at the prediction
    pooled = [r for r in rows if "reassign" not in r and r.get("predicted") is not None]
    if len(pooled) > len(scored):
        rho = spearman([-r["predicted"] for r in pooled], [r["accuracy"] for r in pooled])
        out.update(spearman_predicted_accuracy_pooled=rho if rho == rho else None, spearman_pooled_runs=len(pooled))
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(results)
    print(f"{results}: {len(rows)} runs, Spearman(-objective, accuracy) = {out['spearman_objective_accuracy']} "
          f"over {len(ranked)} runs with fixed formats; Spearman(-predicted, accuracy) = "
          f"{out['spearman_predicted_accuracy']} over {len(scored)} runs"
          + (f"; with the runs of another prediction gradient rule: {out['spearman_predicted_accuracy_pooled']} "
             f"over {len(pooled)} runs" if "spearman_pooled_runs" in out else ""))
    return out


def table(results: dict, fp32: dict) -> str:
    """``results`` (a ``--results`` file) as a markdown table: one row per assignment, with the
    first seed's formats (→ its final ones when they moved), objective and prediction, each
    seed's accuracy, their mean ± sd and its distance from the FP32 mean in ``fp32`` (an
    ``examples/fashion_mnist.py --results`` file)."""
    ref = fp32["policies"]["fp32"]["mean"]
    groups: dict[str, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault(_label(r), []).append(r)
    lines = ["| assignment | formats (first seed) | objective | predicted | accuracy by seed | mean ± sd | vs FP32 |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for label in sorted(groups, key=lambda k: (_bits_key(groups[k][0]["policy"]), k)):
        rows = sorted(groups[label], key=lambda r: r["seed"])
        first = rows[0]
        formats = " ".join(first["formats"]) + (" → " + " ".join(first["final_formats"])
                                                if first.get("final_formats") else "")
        accs = [100 * r["accuracy"] for r in rows]
        mean = statistics.fmean(accs)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        predicted = f"{first['predicted']:.2e}" if first.get("predicted") is not None else "—"
        by_seed = ", ".join(f"{a:.2f} ({r['seed']})" for a, r in zip(accs, rows))
        lines.append(f"| {_short(first)} | {formats} | {first['objective']:.2e} | {predicted} | "
                     f"{by_seed} | {mean:.2f}{spread} % | {mean - ref:+.2f} |")
    return "\n".join(lines)


def _short(row: dict) -> str:
    """``K=3, bits=16, objective=sensitivity; reassign every 200``: the row's policy without
    ``auto(...)`` and its schedule."""
    policy = row["policy"].removeprefix("auto(").removesuffix(")")
    schedule = _schedule(row)
    return policy + (f"; {schedule}" if schedule else "")


def _bits_key(policy: str) -> tuple:
    """Sorts policies by width description, then K: ``auto(K=3, bits=16, ...)`` → ("16", 3)."""
    k = int(policy.split("K=", 1)[1].split(",", 1)[0])
    bits = policy.split("bits=", 1)[1].split(", objective", 1)[0]
    return bits, k


# a schedule's settings that name it when they are not Reassign's defaults: (file-name part, label part)
_SCHEDULE_OPTIONS = {"saturation": ("-saturation{:g}", ", on saturation > {:g}"),
                     "underflow": ("-underflow{:g}", ", on underflow > {:g}"),
                     "headroom": ("-headroom{}", ", headroom {}")}


def _options(r: dict, part: int) -> str:
    """``r``'s (a ``Reassign.to_dict()``) settings beyond the defaults, each as ``part`` (0: file
    name, 1: label) of ``_SCHEDULE_OPTIONS`` writes it."""
    fields = {f.name: f.default for f in dataclasses.fields(Reassign)}
    return "".join(_SCHEDULE_OPTIONS[k][part].format(r[k]) for k in _SCHEDULE_OPTIONS
                   if r.get(k, fields[k]) != fields[k])


def _reassign_stem(reassign: Reassign) -> str:
    """The part of a run's file name that tells its re-assignment (the defaults leave no mark)."""
    r = reassign.to_dict()
    return f"-reassign{r['every']}" + ("-rechoose" if r["rechoose"] else "") + _options(r, 0)


def _label(row: dict) -> str:
    """The run's policy, and its re-assignment schedule when its formats move."""
    schedule = _schedule(row)
    return row["policy"] + (f", {schedule}" if schedule else "")


def _schedule(row: dict) -> str:
    """``reassign every 200, re-choosing`` (with a trigger and headroom when not the defaults), or ""."""
    if "reassign" not in row:
        return ""
    r = row["reassign"]
    return f"reassign every {r.get('every')}" + (", re-choosing" if r.get("rechoose") else "") + _options(r, 1)


if __name__ == "__main__":
    main()
