"""Train briefly, hand off to hls4ml, and check its C simulation against the integer reference.

For each (model, policy) row: a short fixed-point training (``fxcompile.training.train.train``), then
``fxc.to_hls4ml`` (an hls4ml project with ``ap_fixed`` types from the assignment), then
hls4ml's C simulation (``hls_model.compile()`` builds it with g++; no FPGA tools) and the
integer reference (``fxcompile.deploy.backends.integer.run_integer``) on the first ``--images``
Fashion-MNIST test images:

* hls != ref  — output codes where the C simulation differs from the integer reference
                (0 = bit-exact),
* accuracies  — of the C simulation and of the integer reference on those images,
* the seconds spent converting/writing, building with g++, and simulating.

Models: the bundled ``mlp`` and ``seed_cnn``, and two small graphs defined here:
``residual`` (a residual add, hls4ml's Merge add layer) and ``concat`` (two convolution
branches concatenated along channels, hls4ml's Concatenate layer).  Policies: ``baseline``
(parameters stochastic-rounded on update, forward edges nearest with saturation) and
``floor_wrap`` (the same, but every forward activation and input edge rounds with
``floor`` and wraps on overflow).

    python examples/hls4ml_handoff.py --data /path/to/fashion-mnist [--epochs 1 --train-subset 6000]
    python examples/hls4ml_handoff.py --data ../shared/data/fashion-mnist --train-subset 60000 \
        --rows residual:baseline --results benchmarks/results/hls4ml_handoff.json   # then concat:baseline

``--results`` adds the rows to the JSON file (each with its command), so rows measured by
separate processes, at most two g++ builds at a time, end up in one file.

Needs ``pip install -e ".[hls]"`` and g++.  The SeedCNN build takes several minutes (g++ -O3
on hls4ml's unrolled convolution templates).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.experiments.data import fashion_mnist
from fxcompile.deploy.backends.hls4ml import hls_plan, predict_codes
from fxcompile.training.train import TrainConfig, train

ROWS = [("mlp", "baseline"), ("mlp", "floor_wrap"), ("seed_cnn", "baseline"), ("seed_cnn", "floor_wrap")]


class Residual(nn.Module):
    """conv → pool → a residual block (conv, ReLU, conv, added to its input) → pool → linear."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 7 * 7, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(x + self.conv3(torch.relu(self.conv2(x))))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


class Concat(nn.Module):
    """Two convolution branches (3x3 and 1x1) concatenated along channels → pool → conv → pool → linear."""

    def __init__(self, width: int = 4, num_classes: int = 10):
        super().__init__()
        self.branch3 = nn.Conv2d(1, width, 3, padding=1)
        self.branch1 = nn.Conv2d(1, width, 1)
        self.conv = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, num_classes)

    def forward(self, x):
        x = torch.cat([torch.relu(self.branch3(x)), torch.relu(self.branch1(x))], dim=1)
        x = nn.functional.max_pool2d(x, 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


MODELS = {"residual": Residual, "concat": Concat}


def floor_wrap() -> fxc.Policy:
    """The baseline with floor rounding and wrap overflow on every forward value."""
    return fxc.Policy(name="floor_wrap", input="16.8,floor,wrap", activation="16.8,floor,wrap",
                      gradient="16.10,stochastic", loss="16.10", weight="24.12,stochastic", bias="16.8,stochastic")


POLICIES = {"baseline": fxc.baseline, "floor_wrap": floor_wrap}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--images", type=int, default=1000, help="test images to simulate (default 1000)")
    p.add_argument("--out", default=None, help="keep the hls4ml projects in this folder")
    p.add_argument("--rows", nargs="*", default=None, help="model:policy pairs (default: the four above); "
                   f"models: mlp, seed_cnn, {', '.join(MODELS)}")
    p.add_argument("--results", type=Path, default=None, help="write the table to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    (tx, ty), (vx, vy) = fashion_mnist(args.data, train_subset=args.train_subset)
    x, y = vx[:args.images], vy[:args.images]
    rows = [tuple(r.split(":")) for r in args.rows] if args.rows else ROWS
    out = Path(args.out or tempfile.mkdtemp(prefix="fxcompile-hls4ml-"))
    print(f"training {args.epochs} epoch(s) on {len(tx)} images; simulating {len(x)} test images; projects in {out}")
    table = []
    for model, policy in rows:
        t0 = time.perf_counter()
        net = MODELS[model]() if model in MODELS else model
        m = train(TrainConfig(model=net, policy=POLICIES[policy](), epochs=args.epochs, progress=False),
                  (tx, ty), (vx, vy))
        qmodel = m["model_object"].eval()
        t1 = time.perf_counter()
        graph, layers = hls_plan(qmodel, (x[:1],))
        hls_model = fxc.to_hls4ml(qmodel, out / f"{model}_{policy}", example_inputs=(x[:1],))
        t2 = time.perf_counter()
        hls_model.compile()
        t3 = time.perf_counter()
        codes = predict_codes(hls_model, x, graph.op_of(graph.outputs[0]).frac)
        t4 = time.perf_counter()
        (ref,) = run_integer(graph, x, codes=True)
        r = dict(model=model, policy=policy, differ=int((codes != ref).sum()), outputs=ref.numel(),
                 hls_acc=round((codes.argmax(1) == y).double().mean().item(), 4),
                 ref_acc=round((ref.argmax(1) == y).double().mean().item(), 4),
                 train=t1 - t0, convert=t2 - t1, build=t3 - t2, simulate=t4 - t3)
        table.append(r)
        print(f"  {model} {policy}: {r['differ']} of {r['outputs']} output codes differ; "
              f"train {r['train']:.0f} s, convert+write {r['convert']:.0f} s, g++ build {r['build']:.0f} s, "
              f"simulate {r['simulate']:.0f} s", flush=True)
        for layer in layers:
            print(f"    {layer.name:<8} {layer.kind:<10} " + ", ".join(f"{k} {v}" for k, v in layer.precision.items()))
    print()
    head = f"{'model':<10}{'policy':<12}{'hls != ref':>11}{'of outputs':>11}{'hls acc':>9}{'ref acc':>9}" \
           f"{'build s':>9}{'sim s':>7}"
    print(head)
    print("-" * len(head))
    for r in table:
        print(f"{r['model']:<10}{r['policy']:<12}{r['differ']:>11}{r['outputs']:>11}{100 * r['hls_acc']:>8.2f}%"
              f"{100 * r['ref_acc']:>8.2f}%{r['build']:>9.0f}{r['simulate']:>7.0f}")
    if args.results:
        write_results(args.results, table, train_images=len(tx), epochs=args.epochs, test_images=len(x))


def write_results(path: Path, table: list[dict], **settings) -> None:
    """Add this run's rows (keyed "model policy", each with its command and settings) to the JSON
    file at ``path``; rows of other runs stay, so rows measured one process at a time add up."""
    command, date = "python " + " ".join(sys.argv), datetime.date.today().isoformat()
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = old.get("rows", {})
    for r in table:
        rows[f"{r['model']} {r['policy']}"] = dict(command=command, date=date, **settings,
                                                   **{k: v for k, v in r.items() if k not in ("model", "policy")})
    commands = list(dict.fromkeys(row["command"] for row in rows.values()))
    path.write_text(json.dumps({"command": " && ".join(commands), "date": date, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
