"""Pass: run adaptive/global average pools and spatial means as their fixed-point definition.

An average over ``n`` values is exact in float only when ``n`` is a power of two.  For any
other ``n`` the deployed graph cannot divide: it multiplies each window's integer sum by the
fixed-point reciprocal ``c · 2**-r`` of :func:`fxcompile.core.ops.reciprocal` (16 significant
bits) and rounds the product once, with the rounding and overflow of the cast that follows
the average.  So that training sees what deployment runs, this pass rewrites each
``AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` node, and each ``mean`` over the last two
dims of an (N, C, H, W) tensor (``dim=(2, 3)`` or ``(-2, -1)``, ``keepdim`` either way), into
a call of :func:`fxcompile.core.ops.fixed_point_average` (and each ``mean`` over dims 1 and 2
of an (N, H, W, C) tensor, squeezed, into one with ``channels_last``), given the forward format of its
output cast.  That function computes the same exact product in float64 and rounds it to the
cast's format, so the cast after it is the identity on its forward and still rounds (and
clips) the gradient; its backward is the float average's derivative.

Why a rewrite of the node and not a new rounding rule in the cast: the product needs up to
~40 significant bits, more than the float32 tensors between ops hold, so the one rounding
must happen inside the op that forms it, and the op must know the format it rounds to.
The integer graph (``lower``) runs the same definition as ``sum_pool2d`` → ``scale`` (× c) →
the cast's ``requantize``.  Power-of-two divisors give ``c = 1``: the result equals the float
average followed by the cast, as before.  A node is left as it is when its output has no
fixed-point cast of its own (several consumers, or a float format); ``lower`` then refuses
it when its divisor is not a power of two::

    >>> gm = fixed_point_averages(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['fixed_point_average', ...]
"""

from __future__ import annotations

import torch.fx as fx

from ..core import ir, ops
from .casts import call_instead, output_cast

__all__ = ["CONTRACT", "fixed_point_averages", "average_arguments", "channels_last_mean"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

_SPATIAL = ({2, 3}, {-2, -1})


def average_arguments(gm: fx.GraphModule, node: fx.Node) -> tuple[object, bool] | None:
    """``(output_size, squeeze)`` of an adaptive average pool or spatial mean node, or ``None``
    if ``node`` is neither (a mean over other dims, or with a ``dtype``)."""
    op = ops.op_of(gm, node)
    if op is None:
        return None
    if op.name == "adaptive_avg_pool2d":
        if node.op == "call_module":
            return gm.get_submodule(node.target).output_size, False
        size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        return (size, False) if size is not None else None
    if op.name == "mean":
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if isinstance(dims, int) or dims is None or node.kwargs.get("dtype") is not None:
            return None
        if set(dims) not in _SPATIAL or len(dims) != 2:
            return None
        return (1, 1), not keepdim
    return None


def channels_last_mean(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a ``mean`` over dims 1 and 2 of an (N, H, W, C) tensor without
    ``keepdim`` (the global average of timm's channels-last heads: swin, convnext-nhwc)."""
    op = ops.op_of(gm, node)
    if op is None or op.name != "mean" or node.kwargs.get("dtype") is not None:
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    rank = len(meta.shape) if hasattr(meta, "shape") else None
    return (not keepdim and isinstance(dims, (tuple, list)) and len(dims) == 2 and rank == 4
            and {d % 4 for d in dims} == {1, 2})


def fixed_point_averages(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the averages of ``gm`` (after ``insert_casts``) in place; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        arguments = average_arguments(gm, node)
        nhwc = arguments is None and channels_last_mean(gm, node)
        cast = None if arguments is None and not nhwc else output_cast(gm, node)
        if cast is None:
            continue
        if nhwc:
            call_instead(gm, node, ops.fixed_point_average, (node.args[0], (1, 1), True, cast.edge.forward.spec(), True))
        else:
            call_instead(gm, node, ops.fixed_point_average, (node.args[0], *arguments, cast.edge.forward.spec()))
        changed = True
    if changed:
        gm.recompile()
    return gm
