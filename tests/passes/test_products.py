"""Products of two activations are rewritten into their fixed-point definition (the exact
product rounded once by the output cast's format); products with constants are not."""

from __future__ import annotations

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops


class Products(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        y = x * x.mean((2, 3), keepdim=True)   # two activations: rewritten
        return (y * 0.5).view(n, c * h * w // 2, 2)  # a constant, and sizes: left alone


def test_only_products_of_two_activations_are_rewritten():
    x = torch.randn(2, 3, 4, 4)
    q = fxc.compile(Products(), fxc.baseline(), example_inputs=(x,))
    muls = {n.name: n.target for n in q.graph.nodes if n.name.startswith("mul")}
    assert muls["mul"] is ops.fixed_point_mul
    assert all(t is not ops.fixed_point_mul for name, t in muls.items() if name != "mul")
    (node,) = [n for n in q.graph.nodes if n.name == "mul"]
    assert node.args[2] == q.casts.mul.edge.forward.spec()
    with torch.no_grad():
        y = q.eval()(x * 3)
    assert y.shape == (2, 24, 2)
