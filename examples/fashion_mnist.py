"""The study's experiment: the seed CNN on Fashion-MNIST in FP32 and under fixed-point policies.

Adam, lr 0.001, batch 32, 5 epochs, accuracy on the full 10,000-image test set, several seeds.
Each finished run is written to ``<out>/<policy>-seed<k>.json`` at once, and runs already on
disk are skipped, so an interrupted comparison resumes where it stopped::

    python examples/fashion_mnist.py --data ../shared/data/fashion-mnist --seeds 0 1 2 \
        --policies fp32 baseline optimized --out runs/study
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fxcompile.experiments.data import fashion_mnist
from fxcompile.training.train import TrainConfig, train, write_metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--policies", nargs="+", default=["fp32", "baseline", "optimized"],
                   help="fp32, shipped policy names, or policy files")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--results", help="also write the table (per-seed accuracies, mean, std, vs fp32) to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_data, test_data = fashion_mnist(args.data, train_subset=args.train_subset)
    results: dict[str, list[dict]] = {}
    for policy in args.policies:
        for seed in args.seeds:
            path = out / f"{Path(policy).stem}-seed{seed}.json"
            if path.exists():
                run = json.loads(path.read_text())
            else:
                cfg = TrainConfig(policy=None if policy == "fp32" else policy, epochs=args.epochs, seed=seed)
                run = train(cfg, train_data, test_data)
                write_metrics(run, path)
            history = ", ".join(f"{100 * h['accuracy']:.2f}" for h in run["history"])
            print(f"{policy} seed {seed}: {100 * run['accuracy']:.2f}%  (per epoch: {history})", flush=True)
            results.setdefault(policy, []).append(run)
    print(f"\n{'policy':<12}{'test accuracy (mean ± std)':>28}{'vs fp32':>10}  seeds")
    ref = statistics.fmean(r["accuracy"] for r in results["fp32"]) if "fp32" in results else None
    table = {}
    for policy, runs in results.items():
        accs = [100 * r["accuracy"] for r in runs]
        mean, std = statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = f"{mean - 100 * ref:+.2f}" if ref is not None else ""
        print(f"{policy:<12}{mean:>20.2f} ± {std:.2f}{delta:>10}  {len(accs)}")
        table[policy] = {"seeds": [r["seed"] for r in runs], "accuracy_percent": accs, "mean": mean, "std": std,
                         "vs_fp32": None if ref is None else mean - 100 * ref}
    if args.results:
        import datetime
        import sys
        Path(args.results).write_text(json.dumps({
            "command": "python examples/fashion_mnist.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "epochs": args.epochs, "policies": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
