"""Pass: run adaptive/global average pools and spatial means as their fixed-point definition.

An average over ``n`` values is exact in float only when ``n`` is a power of two.  For any
other ``n`` the deployed graph cannot divide: it multiplies each window's integer sum by the
fixed-point reciprocal ``c · 2**-r`` of :func:`fxcompile.core.ops.reciprocal` (16 significant
bits) and rounds the product once, with the rounding and overflow of the cast that follows
the average.  So that training sees what deployment runs, this pass rewrites each
``AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` node, and each ``mean`` over the last two
dims of an (N, C, H, W) tensor (``dim=(2, 3)`` or ``(-2, -1)``, ``keepdim`` either way), into
a call of :func:`fxcompile.core.ops.fixed_point_average`, and each ``AvgPool2d`` /
``F.avg_pool2d`` node into one of :func:`fxcompile.core.ops.fixed_point_avg_pool2d` (padding,
``count_include_pad`` either way, ``ceil_mode``: each output position's own divisor; a mean over
dims 1 and 2 of an (N, H, W, C) tensor is a ``fixed_point_mean`` below), given
the forward format of its output cast.  That function computes the same exact product in float64 and rounds it to the
cast's format, so the cast after it is the identity on its forward and still rounds (and
clips) the gradient; its backward is the float average's derivative.

Why a rewrite of the node and not a new rounding rule in the cast: the product needs up to
~40 significant bits, more than the float32 tensors between ops hold, so the one rounding
must happen inside the op that forms it, and the op must know the format it rounds to.
The integer graph (``lower``) runs the same definition as ``sum_pool2d`` → ``scale`` (× c) →
the cast's ``requantize``.  Power-of-two divisors give ``c = 1``: the result equals the float
average followed by the cast, as before.  A node is left as it is when its output has no
fixed-point cast of its own (several consumers, or a float format); ``lower`` then refuses
it when its divisor is not a power of two.

The same holds for a division by a constant that is not a power of two (``x / 3``:
:func:`fxcompile.core.ops.fixed_point_divide`, ``x`` times the constant's 16-bit reciprocal
:func:`fxcompile.core.ops.divisor_reciprocal`, rounded once by the cast after it; a power of
two moves the binary point and needs no rewrite), and for a mean over other non-batch dims
(mambaout's ``mean((1, 2))`` of an NHWC tensor: :func:`fxcompile.core.ops.fixed_point_mean`)::

    >>> gm = fixed_point_averages(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['fixed_point_average', ...]
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..core import ir, ops
from .casts import call_instead, output_cast

__all__ = ["CONTRACT", "fixed_point_averages", "average_arguments", "avg_pool_arguments", "mean_arguments",
           "constant_divisor"]

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


_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_POOL_DEFAULTS = (None, None, 0, False, True, None)


def avg_pool_arguments(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """``(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)`` of an
    ``avg_pool2d`` node (``nn.AvgPool2d``, ``F.avg_pool2d``, ATen's), or ``None`` if it is none."""
    op = ops.op_of(gm, node)
    if op is None or op.name != "avg_pool2d":
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        values = [getattr(mod, name, default) for name, default in zip(_AVG_POOL, _AVG_POOL_DEFAULTS)]
    else:
        values = list(_AVG_POOL_DEFAULTS)
        for i, v in enumerate(node.args[1:len(_AVG_POOL) + 1]):
            values[i] = v
        for i, name in enumerate(_AVG_POOL):
            values[i] = node.kwargs.get(name, values[i])
    if any(isinstance(v, fx.Node) for v in values) or values[0] is None:
        return None
    values[1] = values[1] or values[0]  # ATen's stride [] is the kernel
    return tuple(values)


def mean_arguments(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple, bool] | None:
    """``(dims, keepdim)`` of a ``mean`` node over non-batch dims other than the spatial mean of
    :func:`average_arguments` (no ``dtype``), else ``None``."""
    op = ops.op_of(gm, node)
    if op is None or op.name != "mean" or average_arguments(gm, node) is not None or node.kwargs.get("dtype"):
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    if rank is None or any(d % rank == 0 for d in dims) or not isinstance(keepdim, bool):
        return None
    return tuple(d % rank for d in dims), keepdim


def constant_divisor(gm: fx.GraphModule, node: fx.Node):
    """The constant ``d`` of a ``truediv`` node ``x / d`` (``x`` a tensor, ``d`` an int or float,
    no ``rounding_mode``), else ``None``."""
    op = ops.op_of(gm, node)
    if op is None or op.name != "truediv" or len(node.args) != 2 or node.kwargs.get("rounding_mode") is not None:
        return None
    x, d = node.args
    if not isinstance(x, fx.Node) or isinstance(d, bool) or not isinstance(d, (int, float)):
        return None
    return d if math.isfinite(d) and d != 0 else None


def fixed_point_averages(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the averages of ``gm`` (after ``insert_casts``) in place; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        arguments = average_arguments(gm, node)
        pool = None if arguments is not None else avg_pool_arguments(gm, node)
        divisor = None if arguments is not None or pool is not None else constant_divisor(gm, node)
        if divisor is not None and abs(ops.divisor_reciprocal(divisor)[0]) == 1:
            divisor = None  # a power of two: the float quotient is exact
        mean = None if arguments is not None or pool is not None or divisor is not None else mean_arguments(gm, node)
        cast = None if arguments is None and pool is None and divisor is None and mean is None \
            else output_cast(gm, node)
        if cast is None:
            continue
        spec = cast.edge.forward.spec()
        if mean is not None:
            call_instead(gm, node, ops.fixed_point_mean, (node.args[0], *mean, spec))
        elif arguments is not None:
            call_instead(gm, node, ops.fixed_point_average, (node.args[0], *arguments, spec))
        elif pool is not None:
            call_instead(gm, node, ops.fixed_point_avg_pool2d, (node.args[0], *pool, spec))
        else:
            call_instead(gm, node, ops.fixed_point_divide, (node.args[0], divisor, spec))
        changed = True
    if changed:
        gm.recompile()
    return gm
