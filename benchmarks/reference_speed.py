"""How long the integer reference and the simulation's eval forward take on torchvision CNNs.

Each model (torchvision's, 10 classes, first convolution for one channel, random weights) is
compiled under ``baseline`` and run on ``--images`` random 28 × 28 inputs on one thread:

* the integer reference (``run_integer``) as it runs, convs and linear layers summed in float64
  when the bound of their sum fits 53 bits, against the same graph with every sum in int64
  (PyTorch's int64 ``F.conv2d``/``F.linear``); both give the same output codes, which it checks;
* the simulation's eval forward (``passes.accumulators``: float64 convs as one im2col product
  over the batch, ``ops.conv2d_float64``) against ``F.conv2d`` in float64 (one product per sample)::

    python benchmarks/reference_speed.py --images 50 --results benchmarks/results/reference_speed.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.deploy.backends import integer
from fxcompile.deploy.export import integer_graph
from fxcompile.experiments.models import build
from fxcompile.training.train import write_metrics


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(name: str, images: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(images, 1, 28, 28)
    q = fxc.compile(build(name, num_classes=10, in_channels=1), fxc.baseline(), example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:1],))
    (codes,), reference = _timed(lambda: integer.run_integer(graph, x, codes=True))
    with mock.patch.object(integer, "FLOAT64_BITS", -1):  # no bound fits: every sum in int64
        (int64_codes,), int64_reference = _timed(lambda: integer.run_integer(graph, x, codes=True))
    with torch.no_grad():
        sim, simulation = _timed(lambda: q(x))
        with mock.patch.object(ops, "conv2d_float64", lambda x, w, *a: F.conv2d(x.double(), w.double(), *a)):
            per_sample, per_sample_simulation = _timed(lambda: q(x))
    return {"model": name, "images": images, "integer_reference_s": round(reference, 2),
            "integer_reference_int64_s": round(int64_reference, 2),
            "simulation_eval_s": round(simulation, 2), "simulation_eval_per_sample_conv_s": round(per_sample_simulation, 2),
            "same_codes": bool(torch.equal(codes, int64_codes)), "same_simulation": bool(torch.equal(sim, per_sample))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--results", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    records = []
    print(f"{'model':<22}{'reference':>11}{'int64 sums':>12}{'simulation':>12}{'per-sample conv':>17}  same codes")
    for name in args.models:
        r = measure(name, args.images)
        records.append(r)
        print(f"{name:<22}{r['integer_reference_s']:>10.2f}s{r['integer_reference_int64_s']:>11.2f}s"
              f"{r['simulation_eval_s']:>11.2f}s{r['simulation_eval_per_sample_conv_s']:>16.2f}s  "
              f"{r['same_codes'] and r['same_simulation']}", flush=True)
    if args.results:
        write_metrics({"command": "python benchmarks/reference_speed.py " + " ".join(argv or sys.argv[1:]),
                       "date": time.strftime("%Y-%m-%d"), "threads": 1, "records": records}, Path(args.results))


if __name__ == "__main__":
    main()
