"""Time of ``fxc.compile()`` (trace + every pass, no calibration, no example inputs).

Prints the median over repeats for each model, and the time per pass of the last repeat::

    python benchmarks/compile_time.py                       # resnet50, vit_b_16
    python benchmarks/compile_time.py --models resnet18 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import fxcompile as fxc
from fxcompile import compiler, passes
from fxcompile.runtime import kernels


def _timed_passes():
    """Wrap the pipeline's passes so each one's time is recorded (restored afterwards)."""
    times, saved = {}, {}
    for name in ("trace", "expose_params", "annotate_roles", "assign_formats", "insert_casts"):
        fn = getattr(compiler, name)
        saved[name] = fn

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            times[_name] = times.get(_name, 0.0) + time.perf_counter() - t0
            return out
        setattr(compiler, name, timed)
    return times, saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    kernels.load()  # a first build (about a minute) must not land inside a timed region
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name)
        runs = []
        for _ in range(args.repeats):
            times, saved = _timed_passes()
            try:
                t0 = time.perf_counter()
                q = fxc.compile(model, fxc.baseline())
                runs.append(time.perf_counter() - t0)
            finally:
                for k, fn in saved.items():
                    setattr(compiler, k, fn)
        casts = sum(1 for n in q.graph.nodes if "fxc_edge" in n.meta)
        detail = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in times.items())
        print(f"{name:<12} compile {statistics.median(runs):6.3f} s (median of {args.repeats}; "
              f"min {min(runs):.3f} s), {len(q.graph.nodes)} nodes, {casts} casts   [{detail}]")


if __name__ == "__main__":
    main()
