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
product with a constant, or without a single fixed-point cast after it, is left alone;
``lower`` deploys it only when the float32 product is exact (codes whose product stays within
2**24), and refuses it otherwise::

    >>> gm = fixed_point_products(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['fixed_point_mul', ...]
"""

from __future__ import annotations

import torch.fx as fx

from ..core import ir, ops
from .casts import output_cast

__all__ = ["CONTRACT", "fixed_point_products"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))


def fixed_point_products(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the products of two tensors in ``gm`` (after ``insert_casts``) in place; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        op = ops.op_of(gm, node)
        if op is None or op.name != "mul" or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(a, fx.Node) and ir.EDGE.has(a) for a in node.args):
            continue  # a product with a constant, or of sizes
        cast = output_cast(gm, node)
        if cast is None:
            continue
        # the node keeps its name and meta (roles, edges): only what it calls changes
        node.op, node.target = "call_function", ops.fixed_point_mul
        node.args = (*node.args, cast.edge.forward.spec())
        changed = True
    if changed:
        gm.recompile()
    return gm
