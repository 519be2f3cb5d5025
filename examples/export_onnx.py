"""Train, export to integer ONNX, and check ORT against the integer reference and the simulation.

For each (model, policy) row: a short fixed-point training (``fxcompile.training.train.train``), then
``fxc.export_onnx``, then on the full Fashion-MNIST test set (10,000 images):

* ORT ≠ reference — output codes where ONNX Runtime differs from the integer reference (0 = bit-exact),
* top-1 agree     — images whose argmax agrees between the integer graph and the PyTorch
                    fixed-point simulation (the graph folds batch norm and sums exactly, the
                    simulation rounds every float32 op: a few codes may differ),
* max |Δcode|     — the largest output-code difference between those two,
* accuracies of ORT and of the simulation.

    python examples/export_onnx.py --data /path/to/fashion-mnist [--epochs 1 --train-subset 12000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fxcompile as fxc
from fxcompile.experiments.data import fashion_mnist
from fxcompile.deploy.export import verify
from fxcompile.experiments.models import build
from fxcompile.training.train import TrainConfig, train

ROWS = [("seed_cnn", "baseline"), ("seed_cnn", "optimized"), ("mlp", "baseline"), ("residual_cnn", "baseline")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default=None, help="keep the .onnx files and trained weights (.pt) in this folder")
    p.add_argument("--rows", nargs="*", default=None, help="model:policy pairs (default: the four above)")
    p.add_argument("--reuse", action="store_true", help="load <out>/<model>_<policy>.pt where it exists "
                   "instead of training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    (tx, ty), (vx, vy) = fashion_mnist(args.data, train_subset=args.train_subset)
    rows = [tuple(r.split(":")) for r in args.rows] if args.rows else ROWS
    out = Path(args.out or tempfile.mkdtemp(prefix="fxcompile-export-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"training {args.epochs} epoch(s) on {len(tx)} images, then exporting; "
          f"evaluating on all {len(vx)} test images")
    table = []
    for model, policy in rows:
        t0 = time.perf_counter()
        path = out / f"{model}_{policy}.onnx"
        if args.reuse and path.with_suffix(".pt").exists():
            qmodel = fxc.compile(build(model), policy, example_inputs=(vx[:1],))
            qmodel.load_state_dict(torch.load(path.with_suffix(".pt"), weights_only=True))
        else:
            m = train(TrainConfig(model=model, policy=policy, epochs=args.epochs, progress=False), (tx, ty), (vx, vy))
            qmodel = m["model_object"]
            torch.save(qmodel.state_dict(), path.with_suffix(".pt"))  # for `fxcompile export --state-dict`
        fxc.export_onnx(qmodel, path, example_inputs=(vx[:1],))
        r = verify(qmodel, path, vx, vy)
        r.update(model=model, policy=policy, seconds=time.perf_counter() - t0)
        table.append(r)
        print(f"  {model} {policy}: done in {r['seconds']:.0f} s -> {path}", flush=True)
    print()
    head = f"{'model':<14}{'policy':<11}{'ORT != ref':>11}{'of outputs':>11}{'top-1 agree':>13}{'max |dcode|':>12}" \
           f"{'ORT acc':>9}{'sim acc':>9}"
    print(head)
    print("-" * len(head))
    for r in table:
        print(f"{r['model']:<14}{r['policy']:<11}{r['mismatches']:>11}{r['outputs']:>11}"
              f"{100 * r['top1_agreement']:>12.2f}%{r['max_code_difference']:>12}"
              f"{100 * r['ort_accuracy']:>8.2f}%{100 * r['simulation_accuracy']:>8.2f}%")


if __name__ == "__main__":
    main()
