"""Why fixed-point training with the study's baseline formats can collapse, and what prevents it.

Trains the seed CNN (study hyperparameters) under the baseline formats with two gradient rules
for saturated values and prints, after every epoch, test accuracy, the share of test logits
pinned at the activation format's bound, and the largest |weight| of the last layer:

* ``straight-through``: the gradient passes a saturated cast unchanged (what QPyTorch's
  quantizers do).  Cross-entropy keeps pushing a saturated logit up, the weights behind it
  grow, more logits saturate, several classes tie at the bound and argmax degenerates.
* ``clipped`` (fxcompile's default): the gradient is zero where the forward value saturated,
  the derivative of a clamp, so nothing pushes a value further past the bound.

    python examples/divergence.py --data ../shared/data/fashion-mnist --epochs 3

Measured (seed 0, every role rounded to nearest): straight-through 78.82 → 85.48 → 13.68 %
with 0 → 1.88 → 91.99 % of test logits at the bound and max|fc2.weight| 0.20 → 1.03;
clipped 80.81 → 87.73 → 88.67 % with at most 0.05 % at the bound.  With stochastic
rounding (``--rounding stochastic``) no logit reached the bound in 3 epochs under either
rule (88.06 → 90.48 → 91.34 %): rounding gradients to nearest flushes small ones to zero
and lets the logits drift to the bound in the first place.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.data import fashion_mnist
from fxcompile.experiments.models import SeedCNN
from fxcompile.training.train import evaluate


def run(rule: str, train_data, test_data, epochs: int, seed: int, rounding: str) -> None:
    torch.manual_seed(seed)
    act = fxc.fixed(16, 8, rounding=rounding)
    policy = fxc.Policy(name=rule, clip_gradient=(rule == "clipped"), activation=act,
                        gradient=fxc.fixed(16, 10, rounding=rounding), loss="16.10",
                        weight=fxc.fixed(24, 12, rounding=rounding), bias=fxc.fixed(16, 8, rounding=rounding))
    (tx, ty), (vx, vy) = train_data, test_data
    q = fxc.compile(SeedCNN(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(tx[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), lr=1e-3), q)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(tx), generator=g)
        for i in range(0, len(tx), 32):
            idx = perm[i:i + 32]
            opt.zero_grad(set_to_none=True)
            q.loss(q(tx[idx]), ty[idx]).backward()
            opt.step()
        with torch.no_grad():
            q.eval()
            logits = torch.cat([q(vx[i:i + 1000]) for i in range(0, len(vx), 1000)])
            q.train()
        pinned = (logits.abs() >= act.max_value).float().mean().item()
        print(f"{rule:<17} epoch {epoch}: accuracy {100 * evaluate(q, vx, vy):6.2f}%  "
              f"logits at the bound {100 * pinned:6.2f}%  max|fc2.weight| {q.fc2.weight.abs().max().item():.3f}",
              flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounding", default="nearest", help="rounding of every role (nearest or stochastic)")
    p.add_argument("--rules", nargs="+", default=["straight-through", "clipped"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train_data, test_data = fashion_mnist(args.data)
    for rule in args.rules:
        run(rule, train_data, test_data, args.epochs, args.seed, args.rounding)


if __name__ == "__main__":
    main()
