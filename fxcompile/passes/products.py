"""Pass: run products of two activations as their fixed-point definition.

``a * b`` of two fixed-point values (a squeeze-excitation scale, a gate) is exact in the
simulation's float32 only while the product of their codes fits its 24-bit significand: two
16-bit activations need 30 bits.  The deployed graph forms the wide integer product (at the
sum of the operands' binary points) and rounds it once, with the rounding and overflow of the
cast after the product, like a conv's accumulator.  So that training sees what deployment
runs, this pass rewrites each ``mul`` node of two tensors whose output has a fixed-point cast
of its own into a call of :func:`fxcompile.core.ops.fixed_point_mul`, given that cast's forward
format: it forms the same product in float64 (exact for codes of up to 24 bits) and rounds
it, so the cast after it is the identity on its forward and still rounds the gradient.  A
product with a constant tensor, or without a single fixed-point cast after it, is left alone;
a product with a Python number that is not a power of two becomes ``fixed_point_mul`` too (the
number read as float32, as the float product reads it: :func:`fxcompile.core.ops.scalar_codes`);
``lower`` deploys it only when the float32 product is exact (codes whose product stays within
2**24), and refuses it otherwise::

    >>> gm = fixed_point_products(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['fixed_point_mul', ...]
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..core import ir, ops
from .casts import output_cast

__all__ = ["CONTRACT", "fixed_point_products"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))


def _scaled(node: fx.Node) -> bool:
    """Whether ``node`` multiplies a fixed-point value by a Python number that is not a power of
    two (whose float32 product rounds: ``q * head_dim ** -0.5`` in attention)."""
    a, b = node.args
    x, k = (a, b) if isinstance(a, fx.Node) else (b, a)
    if not (isinstance(x, fx.Node) and ir.EDGE.has(x)) or isinstance(k, bool) or not isinstance(k, (int, float)):
        return False
    m, _ = math.frexp(k)
    return k != 0 and abs(m) != 0.5


def fixed_point_products(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the products of two tensors in ``gm`` (after ``insert_casts``) in place; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        op = ops.op_of(gm, node)
        if op is None or op.name != "mul" or len(node.args) != 2 or node.kwargs:
            continue
        scaled = _scaled(node)  # an activation times a number that is no power of two
        if not scaled and not all(isinstance(a, fx.Node) and ir.EDGE.has(a) for a in node.args):
            continue  # a product with a constant tensor, or of sizes
        cast = output_cast(gm, node)
        if cast is None:
            continue
        args = node.args if not scaled or isinstance(node.args[0], fx.Node) else node.args[::-1]
        # the node keeps its name and meta (roles, edges): only what it calls changes
        node.op, node.target = "call_function", ops.fixed_point_mul
        node.args = (*args, cast.edge.forward.spec())
        changed = True
    if changed:
        gm.recompile()
    return gm
