"""Where a small ViT under ``baseline`` loses its gradients, without and with loss scaling.

Trains the ViT of ``examples/vit_fashion_mnist.py`` under ``baseline`` on a Fashion-MNIST
subset once per loss scale, from the same weights and batches, with telemetry on every
``--every``-th step.  Prints, per group of edges, the share of nonzero gradients the backward
casts flushed to zero and the share that saturated, and, per group of parameters, the mean
cosine between the gradient the optimizer receives and the FP32 gradient of the same weights
on the same batch (1: same direction)::

    python benchmarks/vit_gradients.py --data ../shared/data/fashion-mnist --loss-scales 1 16
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from vit_fashion_mnist import ViT, accuracy  # noqa: E402

import fxcompile as fxc  # noqa: E402
from fxcompile.experiments.data import fashion_mnist  # noqa: E402
from fxcompile.runtime import telemetry  # noqa: E402

# group -> edge-name patterns (edges as telemetry names them)
EDGES = {
    "logits": ["loss.prediction->*"],
    "attention scores": ["mul->*", "mul_1->*"],
    "softmax outputs": ["softmax->*", "softmax_1->*"],
    "LayerNorm outputs": ["layers_*_norm?->*", "norm->*"],
    "all activations": ["*"],
}
PARAMETERS = {"patch embedding": "embed.*", "layer 0": "layers.0.*", "layer 1": "layers.1.*", "head": "head.*"}


def run(scale: int, seed: int, train, test, steps: int, every: int, batch: int = 64) -> dict:
    torch.manual_seed(seed)
    model = ViT()
    (tx, ty), (vx, vy) = train, test
    q = fxc.compile(model, "baseline", loss_fn=nn.CrossEntropyLoss(), example_inputs=(tx[:2],), loss_scale=scale)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    telemetry.enable(q, every=every)
    g = torch.Generator().manual_seed(seed)
    cosines = {k: [] for k in PARAMETERS}
    for step in range(steps):
        if step % (len(tx) // batch) == 0:
            order = torch.randperm(len(tx), generator=g)
        idx = order[(step % (len(tx) // batch)) * batch:][:batch]
        if step % every == 0:  # the FP32 gradient of the same weights on the same batch
            reference = torch.autograd.grad(F.cross_entropy(model(tx[idx]), ty[idx]), list(model.parameters()))
        opt.zero_grad()
        q.loss(q(tx[idx]), ty[idx]).backward()
        if step % every == 0:
            for (name, p), r in zip(model.named_parameters(), reference):
                for group, pattern in PARAMETERS.items():
                    if fnmatch.fnmatchcase(name, pattern):
                        cosines[group].append(float(F.cosine_similarity(p.grad.flatten(), r.flatten(), dim=0)))
        opt.step()
    rows = [r for r in telemetry.summary(q) if r["role"] not in ("weight", "bias", "input", "loss")]
    edges = {}
    for group, patterns in EDGES.items():
        chosen = [r for r in rows if any(fnmatch.fnmatchcase(r["edge"], p) for p in patterns)]
        n = sum(r["backward_elements"] for r in chosen) or 1
        edges[group] = {"flushed": round(sum(r["backward_underflow"] for r in chosen) / n, 4),
                        "saturated": round(sum(r["backward_overflow"] for r in chosen) / n, 6)}
    weights = [r for r in telemetry.summary(q) if r["role"] in ("weight", "bias")]
    n = sum(r["backward_elements"] for r in weights) or 1
    edges["weight and bias gradients"] = {"flushed": round(sum(r["backward_underflow"] for r in weights) / n, 4),
                                          "saturated": round(sum(r["backward_overflow"] for r in weights) / n, 6)}
    return {"loss_scale": scale, "accuracy": round(accuracy(q, vx, vy), 2), "edges": edges,
            "cosine": {k: round(statistics.fmean(v), 3) for k, v in cosines.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--loss-scales", nargs="+", type=int, default=[1, 16])
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=5, help="count (and compare with FP32) one step in N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=None, help="also write the figures as JSON here (with command and date)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = fashion_mnist(args.data, train_subset=args.train_subset)
    runs = [run(s, args.seed, train, test, args.steps, args.every) for s in args.loss_scales]
    heads = [f"x{r['loss_scale']}" for r in runs]
    print(f"ViT under baseline, {args.steps} steps of 64 on {len(train[0])} images, seed {args.seed}; "
          "loss scale xS")
    print(f"{'gradients flushed to zero (saturated)':<40}" + "".join(f"{h:>18}" for h in heads))
    for group in runs[0]["edges"]:
        print(f"{group:<40}" + "".join(f"{100 * r['edges'][group]['flushed']:>9.1f} % ({100 * r['edges'][group]['saturated']:.2f} %)"
                                       for r in runs))
    print(f"{'cosine with the FP32 gradient':<40}" + "".join(f"{h:>18}" for h in heads))
    for group in PARAMETERS:
        print(f"{group:<40}" + "".join(f"{r['cosine'][group]:>18.3f}" for r in runs))
    print(f"{'test accuracy %':<40}" + "".join(f"{r['accuracy']:>18.2f}" for r in runs))
    if args.results:
        command = " ".join(["python", os.path.relpath(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv))
        Path(args.results).write_text(json.dumps({
            "command": command, "date": datetime.date.today().isoformat(),
            "load_average": [round(v, 1) for v in os.getloadavg()], "seed": args.seed, "steps": args.steps,
            "train_size": len(train[0]), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
