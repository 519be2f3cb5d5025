"""Training-time cost of formats that follow training (fxcompile.training.reassign) on the seed CNN.

Two compiled copies of the same model under ``fxc.auto`` (batch 32), one with a
:class:`~fxcompile.training.reassign.FormatSchedule`, trained side by side in one process,
steps interleaved (the order alternates).  Observation steps and re-assignments are rare, so
the figure is the ratio of the *total* time of all steps (with / without), with the median
step ratio beside it; the time spent inside ``reassign`` is reported apart::

    python benchmarks/reassign_overhead.py --steps 400 --every 200 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.data import synthetic
from fxcompile.experiments.models import SeedCNN
from fxcompile.runtime import kernels
from fxcompile.training.reassign import FormatSchedule, Reassign
from telemetry_overhead import write_results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=200, help="re-assign every N steps")
    p.add_argument("--observe-every", type=int, default=None, help="observe one step in M (default every // 8)")
    p.add_argument("--max-formats", type=int, default=3)
    p.add_argument("--rechoose", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=None, help="also write the figures as JSON here (with command and date)")
    args = p.parse_args(argv)
    kernels.load()  # a first build must not land inside a timed region
    torch.set_num_threads(args.threads)
    b = args.batch_size
    (tx, ty), _ = synthetic(n_train=b * 16, n_test=8)
    batches = [(tx[i * b:(i + 1) * b], ty[i * b:(i + 1) * b]) for i in range(16)]
    cfg = Reassign(every=args.every, observe_every=args.observe_every, rechoose=args.rechoose)
    runs, schedule = {}, None
    for name in ("off", "on"):
        torch.manual_seed(0)
        q = fxc.compile(SeedCNN(), fxc.auto(max_formats=args.max_formats, bits=16, objective="nsr"), loss_fn=nn.CrossEntropyLoss(),
                        example_inputs=(tx[:2],), calibration_data=batches[:4])
        opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), lr=1e-3), q)
        if name == "on":
            schedule = FormatSchedule(q, cfg, opt)
        runs[name] = (q, opt, schedule if name == "on" else None, [])
    reassign_seconds = 0.0
    for step in range(1, args.steps + 1):
        x, y = batches[step % 16]
        for name in (("off", "on") if step % 2 else ("on", "off")):
            q, opt, sched, times = runs[name]
            t0 = time.perf_counter()
            if sched is not None:
                sched.before_step(step)
            opt.zero_grad(set_to_none=True)
            q.loss(q(x), y).backward()
            opt.step()
            if sched is not None:
                t1 = time.perf_counter()
                if sched.after_step(step):
                    reassign_seconds += time.perf_counter() - t1
            times.append(time.perf_counter() - t0)
    off, on = runs["off"][3], runs["on"][3]
    total_ratio = sum(on) / sum(off)
    median_ratio = statistics.median(on) / statistics.median(off)
    print(f"{args.steps} steps, re-assign every {args.every} (observe every {cfg.observe}): "
          f"{schedule.reassignments} re-assignments moving {schedule.moves} slot formats")
    print(f"total step time: without {sum(off):.2f} s, with {sum(on):.2f} s -> ratio {total_ratio:.3f}")
    print(f"median step: without {1e3 * statistics.median(off):.2f} ms, with {1e3 * statistics.median(on):.2f} ms "
          f"-> ratio {median_ratio:.3f}; inside reassign: {reassign_seconds:.3f} s")
    if args.results:
        write_results(args.results, argv, steps=args.steps, every=args.every, observe_every=cfg.observe,
                      rechoose=args.rechoose, max_formats=args.max_formats, threads=args.threads,
                      reassignments=schedule.reassignments, moves=schedule.moves,
                      total_seconds_without=round(sum(off), 3), total_seconds_with=round(sum(on), 3),
                      total_ratio=round(total_ratio, 4), overhead_percent=round(100 * (total_ratio - 1), 2),
                      median_ms_without=round(1e3 * statistics.median(off), 3),
                      median_ms_with=round(1e3 * statistics.median(on), 3), median_ratio=round(median_ratio, 4),
                      reassign_seconds=round(reassign_seconds, 3),
                      final_formats=schedule.log[-1]["formats"] if schedule.log else None)


if __name__ == "__main__":
    main()
