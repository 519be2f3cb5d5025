"""A small vision transformer on Fashion-MNIST, in FP32 and under the baseline policy.

Patches of 7x7 (16 tokens and a class token), 2 pre-norm encoder layers of width 64 with 4
heads, Adam (lr 1e-3), batch 64.  Attention, softmax, GELU and LayerNorm are traced op by op,
so every score, probability and normalised value is a fixed-point edge.  Both policies train
from the same initial weights and batches for each seed; the script prints the test accuracy
(full 10,000-image test set) of both side by side.  ``baseline`` trains with loss scale 16
(``fxc.compile(..., loss_scale=16)``: the loss's gradient times 16 before the backward casts
round it, the weights' gradients divided by 16 before each step; the formats unchanged);
``--loss-scales 1 16`` trains it once without and once with::

    python examples/vit_fashion_mnist.py --data ../shared/data/fashion-mnist --seeds 0 1 --epochs 3 --threads 1 \
        --loss-scales 1 16 --results benchmarks/results/vit_fashion_mnist.json
    python examples/vit_fashion_mnist.py --train-subset 10000     # quicker, FXCOMPILE_DATA for the data

Measured (``benchmarks/results/vit_fashion_mnist.json``, load average ~9 on 2 cores)::

    seed   fp32 %    baseline x1 %   diff   baseline x16 %   diff
       0    85.87            82.61  -3.26            85.54  -0.33
       1    85.44            81.96  -3.48            85.07  -0.37
    mean    85.66            82.28  -3.38            85.31  -0.35

Without scaling, the backward casts flush most of the small gradients of a batch-mean loss to
zero in 16.10 (``benchmarks/vit_gradients.py`` counts them per edge).

``--export --out DIR`` saves each trained state in ``DIR`` as soon as its training ends, then
exports each ``baseline`` model as the integer ONNX graph and verifies it on the whole test set
(ORT's, the integer reference's and the simulation's accuracy, differing output codes); records
on disk are skipped and saved states loaded, so a rerun resumes, and ``--recheck`` exports the
saved states again::

    python examples/vit_fashion_mnist.py --data ../shared/data/fashion-mnist --seeds 0 1 --epochs 3 --threads 1 \
        --loss-scales 16 --export --out runs/vit_fashion_mnist --results benchmarks/results/vit_fashion_mnist_integer.json

Both seeds: ORT's accuracy equals the simulation's (85.81 %, 84.39 %), 0 differing output codes
(``benchmarks/results/vit_fashion_mnist_integer.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.data import fashion_mnist


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, patch: int = 7, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128,
                 classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (28 // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.layers = nn.Sequential(*(Layer(dim, heads, hidden) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.layers(x))[:, 0])


def accuracy(model, x, y, batch: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return 100.0 * correct / len(x)


def build(policy: str, seed: int, example, patch: int, depth: int, loss_scale: int = 1):
    """The model of ``seed`` (its initial weights) and, under a policy, its compiled form."""
    torch.manual_seed(seed)
    model = ViT(patch=patch, depth=depth)
    if policy == "fp32":
        return model
    return fxc.compile(model, policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(example,), loss_scale=loss_scale)


def train(policy: str, seed: int, train, epochs: int, batch: int, patch: int, depth: int, loss_scale: int = 1):
    (tx, ty) = train
    q = build(policy, seed, tx[:2], patch, depth, loss_scale)
    if policy == "fp32":
        loss_fn, opt = F.cross_entropy, torch.optim.Adam(q.parameters(), 1e-3)
    else:
        loss_fn, opt = q.loss, fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    g = torch.Generator().manual_seed(seed)  # the same batches under both policies
    for _ in range(epochs):
        order = torch.randperm(len(tx), generator=g)
        for i in range(0, len(tx), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss_fn(q(tx[idx]), ty[idx]).backward()
            opt.step()
    return q


def run(policy: str, seed: int, train_data, test, epochs: int, batch: int, patch: int, depth: int,
        loss_scale: int = 1, out: Path | None = None, export: bool = False, recheck: bool = False) -> dict:
    """Train (or load the state saved under ``out``), measure the test accuracy and, with
    ``export``, export the integer ONNX graph and verify it on the whole test set.

    With ``out``, the trained state is written to ``<out>/<key>.pt`` as soon as training ends
    and the record to ``<out>/<key>.json``; a record on disk is returned as it is (a record
    without the export's figures is completed when ``export`` asks for them; ``recheck``
    exports and verifies a saved state again)."""
    key = f"seed{seed}_{policy}" + ("" if policy == "fp32" else f"_x{loss_scale}")
    record_path = state_path = None
    previous = {}
    if out is not None:
        record_path, state_path = out / f"{key}.json", out / f"{key}.pt"
        if record_path.exists():
            previous = json.loads(record_path.read_text())
            if not export or policy == "fp32" or ("ort_accuracy" in previous and not recheck):
                return previous
    vx, vy = test
    if state_path is not None and state_path.exists():
        q = build(policy, seed, train_data[0][:2], patch, depth, loss_scale)
        q.load_state_dict(torch.load(state_path, weights_only=True))
        seconds = None
    else:
        t0 = time.perf_counter()
        q = train(policy, seed, train_data, epochs, batch, patch, depth, loss_scale)
        seconds = round(time.perf_counter() - t0)
        if state_path is not None:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(q.state_dict(), state_path)
    rec = {"accuracy": round(accuracy(q, vx, vy), 2)}
    if seconds is not None or "train_seconds" in previous:
        rec["train_seconds"] = seconds if seconds is not None else previous["train_seconds"]
    if export and policy != "fp32":
        from fxcompile.deploy.export import export_onnx, verify
        onnx_path = (out or Path(".")) / f"{key}.onnx"
        export_onnx(q, onnx_path, (vx[:2],))
        r = verify(q, onnx_path, vx, vy)
        rec.update(ort_accuracy=round(100 * r["ort_accuracy"], 2),
                   integer_accuracy=round(100 * r["integer_accuracy"], 2),
                   simulation_accuracy=round(100 * r["simulation_accuracy"], 2),
                   ort_vs_integer=r["mismatches"], simulation_vs_integer=r["simulation_mismatches"],
                   output_codes=r["outputs"])
    if record_path is not None:
        out.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch", type=int, default=7, choices=[4, 7])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--loss-scales", nargs="+", type=int, default=[16], metavar="2**S",
                   help="train under baseline once per loss scale (1: none); default 16")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=None, help="also write the accuracies as JSON here (with command and date)")
    p.add_argument("--out", default=None,
                   help="save each trained state and record here (<out>/seed<S>_<policy>.pt/.json); a rerun "
                        "loads the states and skips the records on disk")
    p.add_argument("--export", action="store_true",
                   help="export each baseline model as the integer ONNX graph (into --out) and verify it on the "
                        "whole test set: ORT's and the simulation's accuracy, differing output codes")
    p.add_argument("--recheck", action="store_true", help="with --export: export and verify the saved states again")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = fashion_mnist(args.data, train_subset=args.train_subset)
    out = Path(args.out) if args.out else None
    rows, exports = [], []
    print(f"ViT patch {args.patch}, {args.depth} layers, {args.epochs} epochs, {len(train[0])} training images; "
          f"baseline x S: loss scale S")
    heads = [f"baseline x{s} %" for s in args.loss_scales]
    print(f"{'seed':>4} {'fp32 %':>8} " + " ".join(f"{h:>16} {'diff':>6}" for h in heads) + f" {'seconds':>8}")
    common = dict(epochs=args.epochs, batch=args.batch, patch=args.patch, depth=args.depth, out=out)
    for seed in args.seeds:
        t0 = time.perf_counter()
        fp32 = run("fp32", seed, train, test, **common)["accuracy"]
        recs = [run("baseline", seed, train, test, loss_scale=s, export=args.export, recheck=args.recheck, **common)
                for s in args.loss_scales]
        base = [r["accuracy"] for r in recs]
        rows.append({"seed": seed, "fp32": round(fp32, 2),
                     **{f"baseline_x{s}": round(b, 2) for s, b in zip(args.loss_scales, base)}})
        print(f"{seed:>4} {fp32:>8.2f} " + " ".join(f"{b:>16.2f} {b - fp32:>+6.2f}" for b in base)
              + f" {time.perf_counter() - t0:>8.0f}", flush=True)
        for s, r in zip(args.loss_scales, recs):
            if "ort_accuracy" in r:
                exports.append({"seed": seed, "loss_scale": s, **{k: r[k] for k in EXPORT_KEYS}})
                print(f"     baseline x{s} exported: ORT {r['ort_accuracy']:.2f} %, simulation "
                      f"{r['simulation_accuracy']:.2f} %, differing codes ORT vs integer {r['ort_vs_integer']}, "
                      f"simulation vs integer {r['simulation_vs_integer']} (of {r['output_codes']})", flush=True)
    mean = {k: round(statistics.fmean(r[k] for r in rows), 2) for k in rows[0] if k != "seed"}
    print(f"mean {mean['fp32']:>8.2f} " + " ".join(f"{mean[f'baseline_x{s}']:>16.2f} "
                                                 f"{mean[f'baseline_x{s}'] - mean['fp32']:>+6.2f}"
                                                 for s in args.loss_scales))
    if args.results:
        extra = {"exports": exports} if exports else {}
        write_results(args.results, argv, runs=rows, mean=mean,
                      diff={f"baseline_x{s}": round(mean[f"baseline_x{s}"] - mean["fp32"], 2)
                            for s in args.loss_scales}, **extra,
                      settings={"epochs": args.epochs, "batch": args.batch, "patch": args.patch, "depth": args.depth,
                                "train_size": len(train[0]), "test_size": len(test[0]), "threads": args.threads})


EXPORT_KEYS = ("ort_accuracy", "integer_accuracy", "simulation_accuracy", "ort_vs_integer", "simulation_vs_integer",
               "output_codes")


def write_results(path, argv, **results) -> None:
    """The measured figures as JSON beside the command that produced them and the date."""
    import datetime, json, os, sys
    from pathlib import Path
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv))
    Path(path).write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                      "load_average": [round(v, 1) for v in os.getloadavg()], **results},
                                     indent=2) + "\n")

if __name__ == "__main__":
    main()
