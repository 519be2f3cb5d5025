"""How long the cost model takes to choose formats, and how much noise it saves.

    python benchmarks/assign_time.py                 # torchvision resnet50 and the seed CNN
    python benchmarks/assign_time.py --models seed_cnn
    python benchmarks/assign_time.py --results benchmarks/results/assign_time.json

For each model: calibrate on random batches (not timed), then time ``choose_formats`` for
K = 1..4 at 16 bits and for 8-bit activations/gradients with 16-bit weights, and print the
objective (summed expected noise-to-signal) next to the naive baseline — one format per
width, its frac chosen from the global max of everything — as a ratio.  Then the same with
the sensitivity objective, K = 1..4, and with a choice of 8 or 16 bits under a weight-memory
budget (half the 16-bit weights' bits) and a BOPs budget (half the 16x16-bit BOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.compiler import LossGraph, _front
from fxcompile.passes.calibrate import calibrate
from fxcompile.passes.choose_formats import choose_formats
from fxcompile.runtime import kernels


def build(name: str):
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50(num_classes=10), (2, 3, 96, 96)
    from fxcompile.experiments.models import build as build_model
    return build_model(name), (8, 1, 28, 28)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "seed_cnn"])
    p.add_argument("--repeats", type=int, default=3, help="solve this many times, report the best")
    p.add_argument("--results", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    kernels.load()  # a first build (about a minute) must not land inside a timed region
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policies = [fxc.auto(max_formats=k, bits=16, objective="nsr") for k in (1, 2, 3, 4)]
    policies += [fxc.auto(max_formats=k, bits={"activation": 8, "gradient": 8, "weight": 16, "loss": 16},
                          gradient_rounding="stochastic", objective="reach", margin=0) for k in (3, 4)]
    policies += [fxc.auto(max_formats=k, bits=16, objective="sensitivity") for k in (1, 2, 3, 4)]
    for name in args.models:
        model, shape = build(name)
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        gm = _front(model, example_inputs=(x,))
        lg = _front(LossGraph(nn.CrossEntropyLoss()), loss_graph=True)
        t0 = time.perf_counter()
        calibrate(gm, [(x, y)], loss_graph=lg)
        print(f"{name}: {sum(1 for n in gm.graph.nodes if n.meta.get('fxc_role'))} values, "
              f"calibration of one batch {shape} took {time.perf_counter() - t0:.2f} s")
        print(f"  {'policy':<70}{'solve s':>9}{'decisions':>10}{'objective':>12}{'naive':>12}{'naive/ours':>11}  exact  formats")
        full = None
        for policy in policies + ["budgets"]:
            if policy == "budgets":  # half the 16-bit weight memory, half the 16x16-bit BOPs
                full = gm.meta["fxc_solution"].usage
                policy = fxc.auto(max_formats=4, bits=(8, 16), objective="sensitivity",
                                  weight_memory_bits=full["weight_memory_bits"] / 2, bops=full["bops"] / 2)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                choose_formats(gm, policy, loss_graph=lg)
                best = min(best, time.perf_counter() - t0)
            s = gm.meta["fxc_solution"]
            ratio = s.baseline_objective / s.objective if s.objective > 0 else float("inf")
            print(f"  {str(policy):<70}{best:>9.3f}{s.decisions:>10}{s.objective:>12.4g}{s.baseline_objective:>12.4g}"
                  f"{ratio:>11.3g}  {str(s.exact):<5}  {' '.join(f'{b}.{f}' for b, f in s.formats)}")
            rows.append({"model": name, "policy": str(policy), "solve_seconds": best, "decisions": s.decisions,
                         "objective": s.objective, "baseline_objective": s.baseline_objective, "exact": s.exact,
                         "formats": [f"{b}.{f}" for b, f in s.formats], "usage": s.usage})
    if args.results:
        Path(args.results).write_text(json.dumps({"command": "python benchmarks/assign_time.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                                  "date": time.strftime("%Y-%m-%d", time.gmtime()),
                                                  "load_average": os.getloadavg(), "repeats": args.repeats, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
