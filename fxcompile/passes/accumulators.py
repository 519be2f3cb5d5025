"""Pass: run convolutions and linear layers with their exact accumulator at inference.

A conv or linear layer sums products of input and weight codes over its fan-in, then the cast
after it rounds the sum once.  The deployed graph sums in int64 (the integer reference:
``F.conv2d``/``F.linear`` on int64 codes; ONNX: uint8 × int8 ``MatMulInteger`` partial sums
or one int32/int64 ``MatMul``, combined in int32/int64), so the sum is exact.  The
simulation's float32 ``F.conv2d`` holds it exactly only while it fits float32's 24-bit
significand: under ``baseline`` a 16-bit activation code times a 24-bit weight code already
has up to 39 bits, so the float32 accumulator is rounded before the cast rounds it, and
deep CNNs (resnet101, dla34) end a few output codes away from the integer graph.

So that inference runs what deployment runs, this pass rewrites each ``conv1d``/``conv2d``/
``conv3d`` (grouped and depthwise too) and ``linear`` call whose output has a fixed-point
cast of its own (:func:`fxcompile.passes.casts.output_cast`) and whose exact sum needs more
than 24 bits into :func:`fxcompile.core.ops.fixed_point_conv2d` (``…conv1d``, ``…conv3d``,
:func:`~fxcompile.core.ops.fixed_point_linear`), given that cast's forward format.  The bound
(:func:`accumulator_bits`) is the largest magnitude the sum can reach, in units of the
accumulator's binary point: the largest input code times the largest weight code times the
fan-in (input channels per group times the kernel's size, or input features), plus the
largest bias code aligned to that point; its bits are about those of the input and weight
codes plus ``log2(fan-in)``.

The choice of precision follows the gradient, not the module's mode:

* **without a gradient** (``torch.no_grad()``/``inference_mode``, or no input requiring one:
  evaluation, ``fxc.deploy.export.verify``) the layer is computed in float64, exact while the
  bound is at most 53 bits, and rounded once with the output cast's format; the cast after it
  is then the identity on its forward, and the simulation agrees with the integer graph code
  for code;
* **with a gradient** (training's forward) it is exactly the float32 op it was: float64 convs
  on CPU are many times slower, so training accumulates in float32 and its steps are
  bit-identical to those before this pass.  Its outputs may therefore sit a code away from the
  deployed ones where float32 rounded the sum.

A layer whose bound exceeds 53 bits (formats wider than the baseline's, or very large
fan-ins) is left as the float32 op: float64 could not hold its sum either, and its deployed
outputs may differ from the simulation's by a code.  Layers of a graph whose formats keep the
sum within 24 bits are left as they are (float32 is exact there).  ``lower`` and the QDQ
backend deploy the rewritten calls as the ``conv2d``/``linear`` they are (the op registry
maps them to those ops), and ``deploy.fold_bn`` folds batch norms into them.  The output
format is a node argument, as in :mod:`fxcompile.passes.lookup_tables`: when a cast's format
changes after compile, running this pass again makes the layers follow, and ``lower``
refuses a layer whose format no longer matches its cast::

    >>> gm = exact_accumulators(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['fixed_point_conv2d', ..., 'fixed_point_linear']
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..core import ir, ops
from .casts import call_instead, output_cast
from .definitions import input_format

__all__ = ["CONTRACT", "exact_accumulators", "accumulator_bits", "FIXED_POINT_LAYERS", "FLOAT_LAYERS",
           "FLOAT32_BITS", "FLOAT64_BITS"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

FLOAT32_BITS = 24  # significand bits: integers up to 2**24 are exact in float32
FLOAT64_BITS = 53

# the float op's name -> its fixed-point definition, and the argument names after the input
FIXED_POINT_LAYERS = {
    "conv1d": ops.fixed_point_conv1d, "conv2d": ops.fixed_point_conv2d, "conv3d": ops.fixed_point_conv3d,
    "linear": ops.fixed_point_linear, "addmm": ops.fixed_point_addmm,
}
_CONV_ARGS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
              ("groups", 1))
_LINEAR_ARGS = (("input", None), ("weight", None), ("bias", None))
_ADDMM_ARGS = (("input", None), ("mat1", None), ("mat2", None))  # bias, x, weight (in, out): transformers' Conv1D
# each definition -> the float op it computes
FLOAT_LAYERS = {ops.fixed_point_conv1d: F.conv1d, ops.fixed_point_conv2d: F.conv2d,
                ops.fixed_point_conv3d: F.conv3d, ops.fixed_point_linear: F.linear, ops.fixed_point_addmm: torch.addmm}


def _arguments(node: fx.Node, names: tuple) -> list | None:
    """The call's arguments by position (defaults filled in), or ``None`` for unknown ones."""
    if len(node.args) > len(names) or set(node.kwargs) - {n for n, _ in names}:
        return None
    values = [node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
              for i, (name, default) in enumerate(names)]
    return None if values[0] is None or values[1] is None else values


def _shape(gm: fx.GraphModule, arg) -> tuple | None:
    """The shape of the value ``arg`` (its tensor_meta, or the stored parameter behind its casts)."""
    while isinstance(arg, fx.Node):
        meta = arg.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
        if arg.op == "get_attr":
            value = ir.fetch(gm, arg.target)
            return tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if not (arg.op == "call_module" and ir.EDGE.has(arg)):
            return None
        arg = arg.args[0]
    return None


def _largest_code(spec) -> int:
    frac, qmin, qmax, zp = spec[:4]
    return max(abs(qmin - zp), abs(qmax - zp))


def accumulator_bits(x_spec, w_spec, fan_in: int, b_spec=None) -> int:
    """Bits of the largest magnitude the exact sum of a conv/linear can reach, counted in units
    of its binary point (the finer of the products' and the bias's): the largest input code
    times the largest weight code times ``fan_in``, plus the largest bias code aligned to that
    point.  Every partial sum is bounded by it too, so a float with at least that many
    significand bits sums exactly in any order::

        >>> accumulator_bits(fixed(16, 8).spec(), fixed(24, 12).spec(), 3 * 3 * 64, fixed(16, 8).spec())
        48
    """
    point = x_spec[0] + w_spec[0] if b_spec is None else max(x_spec[0] + w_spec[0], b_spec[0])
    largest = _largest_code(x_spec) * _largest_code(w_spec) * fan_in << (point - x_spec[0] - w_spec[0])
    if b_spec is not None:
        largest += _largest_code(b_spec) << (point - b_spec[0])
    return largest.bit_length()


def _rewrite(gm: fx.GraphModule, node: fx.Node, name: str, arguments: list | None):
    cast = output_cast(gm, node) if arguments is not None else None
    if cast is None:
        return None
    x, w, b = arguments[:3] if name != "addmm" else (arguments[1], arguments[2], arguments[0])
    formats = [input_format(a) for a in (x, w)] + [input_format(b) if b is not None else None]
    shape = _shape(gm, w)
    if formats[0] is None or formats[1] is None or (b is not None and formats[2] is None) or shape is None:
        return None  # an operand without a fixed-point format: float32 cannot be exact either
    specs = [ir.stored_format(f).spec() if f is not None else None for f in formats]
    fan_in = shape[0] if name == "addmm" else math.prod(shape[1:])
    bits = accumulator_bits(specs[0], specs[1], fan_in, specs[2])
    if not FLOAT32_BITS < bits <= FLOAT64_BITS:
        return None
    return FIXED_POINT_LAYERS[name], (*arguments, cast.edge.forward.spec())


def exact_accumulators(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the convs and linear layers of ``gm`` (after ``insert_casts``) in place; returns ``gm``.

    A node rewritten before is rewritten again with its output cast's current format (or is
    the float op again if it no longer qualifies): after a cast's format changes after compile
    (``Cast.set_edge``), running this pass again makes every layer follow; ``lower`` refuses a
    layer whose format no longer matches its cast."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        op = ops.op_of(gm, node)
        if op is None or op.name not in FIXED_POINT_LAYERS:
            continue
        if node.target in FLOAT_LAYERS:  # rewritten before: its arguments are positional, then the format
            arguments = list(node.args[:-1])
            found = _rewrite(gm, node, op.name, arguments) or (FLOAT_LAYERS[node.target], arguments)
        else:
            names = {"linear": _LINEAR_ARGS, "addmm": _ADDMM_ARGS}.get(op.name, _CONV_ARGS)
            found = _rewrite(gm, node, op.name, _arguments(node, names))
        if found is None or (found[0] is node.target and list(found[1]) == list(node.args)):
            continue
        call_instead(gm, node, *found)
        changed = True
    if changed:
        gm.recompile()
    return gm
