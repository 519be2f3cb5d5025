"""The ``fxcompile`` command line: ``demo``, ``train``, ``inspect`` and friends.

Each command is a pair of functions here, ``add_<name>(subparsers)`` and ``run_<name>(args)``;
a new command is one more pair and one more name in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys

import torch

__all__ = ["main", "COMMANDS"]


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="Fashion-MNIST root: a folder with the four IDX files "
                   "(default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=None, help="train on this many images (default: all)")


def _load_data(args):
    from .data import DataError, fashion_mnist
    try:
        return fashion_mnist(args.data, train_subset=args.train_subset)
    except DataError as e:
        raise SystemExit(f"fxcompile: {e}") from None


# ---- demo -----------------------------------------------------------------------------------

def add_demo(sub):
    p = sub.add_parser("demo", help="train the seed CNN in FP32 and under the study's baseline, side by side")
    _data_flags(p)
    p.set_defaults(train_subset=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--policy", default="baseline", help="policy name or file (default: baseline)")
    p.add_argument("--seed", type=int, default=0)


def run_demo(args):
    from . import inspect
    from .train import TrainConfig, train
    train_data, test_data = _load_data(args)
    print(f"training the seed CNN on {len(train_data[0])} Fashion-MNIST images for {args.epochs} epoch(s), "
          f"evaluating on all {len(test_data[0])} test images")
    rows = []
    for policy in (None, args.policy):
        rows.append(train(TrainConfig(policy=policy, epochs=args.epochs, seed=args.seed), train_data, test_data))
    fp32, fx = rows
    print()
    print(f"{'':<12}{'test accuracy':>14}{'step time':>12}")
    for r in rows:
        print(f"{r['policy']:<12}{100 * r['accuracy']:>13.2f}%{r['step_time_ms']:>10.2f}ms")
    print(f"accuracy difference: {100 * (fx['accuracy'] - fp32['accuracy']):+.2f} points; "
          f"step-time ratio (fixed point / FP32): {fx['step_time_ms'] / fp32['step_time_ms']:.2f}")
    print()
    print(inspect(fx["model_object"]))


# ---- train ----------------------------------------------------------------------------------

def add_train(sub):
    p = sub.add_parser("train", help="train a model on Fashion-MNIST in FP32 or under a policy")
    _data_flags(p)
    p.add_argument("--model", default="seed_cnn", help="seed_cnn, mlp or residual_cnn")
    p.add_argument("--policy", default="fp32", help="fp32, baseline, optimized, or a .toml/.json policy file")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--weight-rounding", choices=["nearest", "stochastic", "floor", "toward_zero"], default=None)
    p.add_argument("--out", default=None, help="write metrics to this .json or .csv file")


def run_train(args):
    from .train import TrainConfig, train, write_metrics
    policy = None if args.policy == "fp32" else args.policy
    train_data, test_data = _load_data(args)
    runs = []
    for seed in args.seeds:
        cfg = TrainConfig(model=args.model, policy=policy, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, seed=seed, weight_rounding=args.weight_rounding)
        m = train(cfg, train_data, test_data)
        history = ", ".join(f"{100 * h['accuracy']:.2f}" for h in m["history"])
        print(f"{args.policy} seed {seed}: test accuracy {100 * m['accuracy']:.2f}% (per epoch: {history})", flush=True)
        runs.append(m)
    accs = [100 * r["accuracy"] for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{args.policy}: {statistics.fmean(accs):.2f} ± {std:.2f} % over {len(accs)} seed(s)")
    if args.out:
        write_metrics(runs, args.out)


# ---- inspect --------------------------------------------------------------------------------

def _load_callable(spec: str):
    if ":" not in spec:
        raise SystemExit(f"fxcompile: give the model as module:callable (e.g. fxcompile.models:SeedCNN), got {spec!r}")
    mod, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"fxcompile: cannot load {spec!r}: {e}") from None
    return obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj


def add_inspect(sub):
    p = sub.add_parser("inspect", help="compile a model given as module:callable and print its edge table")
    p.add_argument("model", help="module:callable returning an nn.Module, e.g. fxcompile.models:SeedCNN")
    p.add_argument("--policy", default="baseline")
    p.add_argument("--input-shape", default="1,1,28,28", help="example input shape (comma separated)")
    p.add_argument("--leaf", action="append", default=[], help="module path to keep as a leaf (repeatable)")
    p.add_argument("--frontend", default="fx", choices=["fx", "export", "auto"])
    p.add_argument("--dot", help="also write the rewritten graph as Graphviz DOT to this file")
    p.add_argument("--json", help="also write the Assignment as JSON to this file")


def run_inspect(args):
    from . import assignment, compile, inspect, to_dot
    from .errors import FormatError, PolicyError, TraceError
    model = _load_callable(args.model)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    try:
        q = compile(model, args.policy, example_inputs=(torch.randn(shape),), leaf_modules=args.leaf,
                    frontend=args.frontend)
    except (TraceError, PolicyError, FormatError) as e:
        raise SystemExit(f"fxcompile: {e}") from None
    print(inspect(q))
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(to_dot(q))
    if args.json:
        with open(args.json, "w") as f:
            f.write(assignment(q).to_json())


COMMANDS = ("demo", "train", "inspect")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fxcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        globals()[f"add_{name.replace('-', '_')}"](sub)
    args = parser.parse_args(argv)
    return globals()[f"run_{args.command.replace('-', '_')}"](args)


if __name__ == "__main__":
    sys.exit(main())
