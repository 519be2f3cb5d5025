"""The hls4ml_dsps budget on the seed CNN: hls4ml's DSP estimate and what the cost model does under it.

    python benchmarks/hls4ml_dsps.py
    python benchmarks/hls4ml_dsps.py --results benchmarks/results/hls4ml_dsps.json

Calibrate the seed CNN on one random batch (not timed), then with a choice of 8 or 16 bits
per edge and K = 3 formats: the DSPs hls4ml's estimator gives the model with every weight at
16 bits, the solution with no budget, and the solution under ``hls4ml_dsps`` = half the
16-bit figure (the objective, the DSPs it uses, each weight's width and the solve time, the
best of ``--repeats``).  No training.
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
from fxcompile.core import ir
from fxcompile.experiments.models import SeedCNN
from fxcompile.passes.calibrate import calibrate
from fxcompile.passes.choose_formats import choose_formats
from fxcompile.runtime import kernels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-formats", type=int, default=3)
    p.add_argument("--reuse-factor", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="solve this many times, report the best")
    p.add_argument("--results", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    kernels.load()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    gm = _front(SeedCNN(), example_inputs=(x,))
    lg = _front(LossGraph(nn.CrossEntropyLoss()), loss_graph=True)
    calibrate(gm, [(x, y)], loss_graph=lg)

    def solve(policy):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            choose_formats(gm, policy, loss_graph=lg)
            best = min(best, time.perf_counter() - t0)
        s = ir.SOLUTION.of(gm)
        widths = {n.name: ir.VALUE.of(n).forward.bits for n in gm.graph.nodes if ir.ROLE.get(n) == "weight"}
        row = {"policy": str(policy), "objective": s.objective, "usage": s.usage, "weight_bits": widths,
               "formats": [f"{b}.{f}" for b, f in s.formats], "solve_seconds": best}
        print(f"{str(policy):<78} objective {s.objective:.4g}  hls4ml_dsps {s.usage['hls4ml_dsps']:.0f}  "
              f"solve {best:.3f} s  weights {widths}")
        return row

    options = dict(max_formats=args.max_formats, hls4ml_reuse_factor=args.reuse_factor, objective="nsr")
    wide = solve(fxc.auto(bits=16, **options))
    full = wide["usage"]["hls4ml_dsps"]
    rows = [wide, solve(fxc.auto(bits=(8, 16), **options)), solve(fxc.auto(bits=(8, 16), hls4ml_dsps=full / 2, **options))]
    if args.results:
        command = "python benchmarks/hls4ml_dsps.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.results).write_text(json.dumps({
            "command": command.strip(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "load_average": os.getloadavg(), "repeats": args.repeats, "all_16_bit_dsps": full,
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
