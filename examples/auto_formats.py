"""Train the seed CNN on Fashion-MNIST with formats chosen by the cost model (``fxc.auto``).

    python examples/auto_formats.py --data /path/to/fashion-mnist --max-formats 3 --bits 16 --seeds 0 1 2
    python examples/auto_formats.py --max-formats 3 --bits activation=8,gradient=8,weight=16 \\
        --gradient-rounding stochastic
    python examples/auto_formats.py --max-formats 1 --reassign-every 200 --reassign-rechoose   # formats follow training

Prints the formats the solver chose, the predicted noise against the naive one-format
baseline, and the test accuracy per seed; ``--out`` appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fxcompile as fxc
from fxcompile.core.auto import OBJECTIVES
from fxcompile.experiments.data import fashion_mnist
from fxcompile.training.reassign import Reassign
from fxcompile.training.train import TrainConfig, train


def parse_bits(text: str):
    if "=" not in text:
        return int(text)
    return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--max-formats", type=int, default=3)
    p.add_argument("--bits", default="16", help="16, or per role: activation=8,gradient=8,weight=16")
    p.add_argument("--objective", default="nsr", choices=OBJECTIVES)
    p.add_argument("--gradient-rounding", default="nearest")
    p.add_argument("--update-rounding", default="stochastic", help="rounding of each weight/bias update")
    p.add_argument("--margin", type=int, default=None,
                   help="octaves of drift the formats allow for (default: 4 at >= 12 bits, else 1; see fxc.Auto)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fp32", action="store_true", help="also train in FP32 with the same seeds")
    p.add_argument("--reassign-every", type=int, default=0, metavar="N",
                   help="move the formats' binary points every N steps from each edge's range history")
    p.add_argument("--reassign-rechoose", action="store_true", help="re-run the solver at each re-assignment "
                   "(slots may change format) instead of moving the current formats")
    p.add_argument("--reassign-saturation", type=float, default=None, metavar="RATE",
                   help="also re-assign when an observed edge saturates more than this fraction")
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    train_data, test_data = fashion_mnist(args.data, train_subset=args.train_subset)
    policy = fxc.auto(max_formats=args.max_formats, bits=parse_bits(args.bits), objective=args.objective,
                      gradient_rounding=args.gradient_rounding, update_rounding=args.update_rounding, margin=args.margin, calibration_batches=args.calibration_batches)
    reassign = None
    if args.reassign_every or args.reassign_saturation is not None:
        reassign = Reassign(every=args.reassign_every, rechoose=args.reassign_rechoose,
                            saturation=args.reassign_saturation)
    runs = {}
    for name, pol in ([("fp32", None)] if args.fp32 else []) + [(str(policy), policy)]:
        accs = []
        for seed in args.seeds:
            t0 = time.time()
            m = train(TrainConfig(policy=pol, epochs=args.epochs, seed=seed, progress=False,
                                  reassign=reassign if pol is not None else None), train_data, test_data)
            q = m.pop("model_object")
            row = {"policy": name, "seed": seed, "accuracy": m["accuracy"], "history": m["history"],
                   "train_size": m["train_size"], "test_size": m["test_size"], "epochs": m["epochs"],
                   "seconds": round(time.time() - t0, 1), "step_time_ms": m["step_time_ms"]}
            if "reassignments" in m:
                row.update(reassign=reassign.to_dict(), reassignments=m["reassignments"],
                           reassign_moves=m["reassign_moves"], final_formats=m["final_formats"])
            sol = getattr(q, "meta", {}).get("fxc_solution")
            if sol is not None:
                row["formats"] = [f"{b}.{f}" for b, f in sol.formats]
                row["distinct_formats"] = len(fxc.assignment(q).formats())
                row.update(objective=sol.objective, baseline_objective=sol.baseline_objective, exact=sol.exact)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            accs.append(100 * m["accuracy"])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        runs[name] = accs
        print(f"{name}: {statistics.fmean(accs):.2f} ± {std:.2f} % over {len(accs)} seed(s)", flush=True)


if __name__ == "__main__":
    main()
