"""Step-time cost of numerical telemetry on the seed CNN (baseline policy, batch 32).

Two compiled copies of the same model, one with counters, trained side by side in one
process, steps interleaved; prints the median step times and their ratio::

    python benchmarks/telemetry_overhead.py --steps 200 --threads 1 --every 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.runtime import kernels, telemetry
from fxcompile.experiments.data import synthetic
from fxcompile.experiments.models import SeedCNN


def write_results(path, argv, **results) -> None:
    """The measured figures as JSON beside the command that produced them and the date."""
    import datetime, json, os, sys
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv))
    Path(path).write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                      "load_average": [round(v, 1) for v in os.getloadavg()], **results},
                                     indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--every", type=int, default=1, help="count one step in N (telemetry.enable(every=N))")
    p.add_argument("--results", default=None, help="also write the figures as JSON here (with command and date)")
    args = p.parse_args(argv)
    kernels.load()  # a first build (about a minute) must not land inside a timed region
    torch.set_num_threads(args.threads)
    (tx, ty), _ = synthetic(n_train=args.batch_size * 8, n_test=8)
    runs = {}
    for name in ("off", "on"):
        torch.manual_seed(0)
        q = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(tx[:2],))
        if name == "on":
            telemetry.enable(q, every=args.every)
        opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), lr=1e-3), q)
        runs[name] = (q, opt, [])
    for step in range(args.steps + 10):
        i = step % 8
        x, y = tx[i * args.batch_size:(i + 1) * args.batch_size], ty[i * args.batch_size:(i + 1) * args.batch_size]
        for name in (("off", "on") if step % 2 else ("on", "off")):
            q, opt, times = runs[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            q.loss(q(x), y).backward()
            opt.step()
            if step >= 10:  # warm-up
                times.append(time.perf_counter() - t0)
    off, on = (statistics.median(runs[n][2]) for n in ("off", "on"))
    mean_off, mean_on = (statistics.fmean(runs[n][2]) for n in ("off", "on"))
    counts = telemetry.summary(runs["on"][0])
    print(f"seed CNN, batch {args.batch_size}, {args.steps} steps, {args.threads} thread(s), every {args.every}, "
          f"kernel backend {kernels.backend()}")
    print(f"median step: telemetry off {1e3 * off:.2f} ms, on {1e3 * on:.2f} ms, ratio on/off {on / off:.3f}")
    print(f"mean step:   telemetry off {1e3 * mean_off:.2f} ms, on {1e3 * mean_on:.2f} ms, "
          f"ratio on/off {mean_on / mean_off:.3f}")
    print(f"edges counted: {len(counts)}; forward values counted: {sum(c['forward_elements'] for c in counts)}")
    if args.results:
        write_results(args.results, argv, steps=args.steps, threads=args.threads, every=args.every,
                      median_ms_off=round(1e3 * off, 2), median_ms_on=round(1e3 * on, 2),
                      median_ratio=round(on / off, 2), mean_ratio=round(mean_on / mean_off, 2))


if __name__ == "__main__":
    main()
