"""Pass: lower a compiled (BN-folded) fixed-point graph to an :class:`IntegerGraph`.

The integer graph is what a fixed-point accelerator runs: every value is an int64 tensor of
codes ``v`` with a binary point ``frac`` (value = ``v · 2**-frac``), and every op is integer
arithmetic:

* ``quantize``   float input → codes of the input edge's format (the only float-in op),
* ``requantize`` codes at one binary point → codes of a cast's forward format: a rounding
  right shift (or exact left shift) with the format's tie rule — ``nearest`` is ties to even,
  as in training; ``floor``; ``toward_zero`` — then saturation (or two's-complement wrap),
* ``conv2d`` / ``linear``: int64 sums of products of input and weight codes; the bias codes
  are aligned to the accumulator's binary point (if the bias has more fractional bits than
  the accumulator, the weight codes are scaled up instead, exactly),
* ``relu``, ``max_pool2d``, ``flatten``: on codes, binary point unchanged,
* ``sum_pool2d``: average pooling whose divisor is a power of two is a window sum with the
  binary point moved left (no rounding: the next cast rounds),
* ``scale``: an adaptive/global average or spatial mean over ``n`` values, ``n`` not a power
  of two, is ``sum_pool2d`` then codes × ``c`` with the binary point moved left by ``r``
  (``c · 2**-r`` the reciprocal of :func:`fxcompile.core.ops.reciprocal`); the next cast
  rounds the exact product once — the definition training ran (``passes.averages``).  Where
  the divisors differ by position (``avg_pool2d`` with padding or ``ceil_mode``, adaptive
  pools with uneven windows) ``c`` is a per-position constant at one binary point,
* ``adaptive_sum_pool2d``: window sums over an adaptive pool's uneven or overlapping windows,
* ``add``: both operands shifted left to the larger binary point, then added (``subtract``: b
  subtracted),
* ``reshape``, ``transpose``, ``slice``, ``pad`` (zeros), ``upsample`` (nearest, integer
  factors): the codes moved, binary point unchanged; the batch axis stays first and free (its
  size is the only one not fixed by the example inputs; sizes, their arithmetic and asserts
  are evaluated for the example shape and dropped),
* ``concat``: the operands shifted left to the largest binary point, then concatenated,
* ``mul``: the product of two operands' codes at the sum of their binary points; the next
  cast rounds it once (``passes.products`` makes training run that definition),
* ``affine``: a stand-alone batch norm, codes × per-channel ``s`` + per-channel ``t`` (see
  :func:`fxcompile.core.ops.batch_norm_affine`; ``passes.batch_norms``),
* ``clip``: ReLU6, Hardtanh and clamp/clip with constant bounds: the codes shifted left
  (exactly) to the output cast's binary point if that is finer, then clamped to the bounds
  rounded by the output cast's rounding onto its grid (see :func:`rule_clip`),
* ``lookup``: sigmoid, tanh, SiLU, GELU, Hardswish, Hardsigmoid, LeakyReLU, ELU, Mish: a table
  of output codes indexed by input code (``passes.lookup_tables`` made training run it),
* ``gather``: an embedding of token ids (an int64 graph input, used as it is): rows of the
  table's codes; ``padding_mask``: an integer attention mask as 0/1 (batch, 1, 1, length);
  ``select``: masked attention scores, the codes or the output format's smallest code
  (``passes.masks``); positions and causal masks are evaluated for the example shape,
* ``dequantize`` codes → float32 at the outputs.

Grouped and depthwise convs keep their grouped weight (``conv2d`` with ``groups``): each output
channel sums over its group's input channels.

Codes are stored *centred*: for an asymmetric format ``v = code − zero_point``, so zero
points only appear inside ``quantize``/``requantize``.  The rounding of casts is that of the
cast's forward format; a stochastic activation cast cannot be deployed and raises
:class:`ExportError`.  Parameters become constant codes, rounded once (``nearest`` standing in
for ``stochastic``: after fixed-point training they already lie on their format's grid).

Lowering is a table from op to rule (:data:`RULES`); every node whose op is not in it is
reported at once in one :class:`ExportError`::

    >>> graph = lower(fold_bn(qmodel), (torch.randn(1, 1, 28, 28),))
    >>> [op.op for op in graph.ops][:3]
    ['quantize', 'conv2d', 'requantize']
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..core import intmath, ir, nonlinear, ops
from ..core.quantizer import ROUNDINGS
from ..errors import ExportError
from ..core.formats import FixedPoint
from ..passes.averages import average_arguments, avg_pool_arguments
from ..passes.casts import Cast, output_cast
from ..passes.lookup_tables import lookup_arguments, lookup_refusal

__all__ = ["CONTRACT", "IntOp", "IntegerGraph", "Value", "lower", "RULES", "UNSUPPORTED", "op_key", "op_arguments", "pair",
           "MAX_SHIFT", "evaluate", "permutation", "whole_slice", "reshape_target", "fold_constant", "index_slices", "split_sizes",
           "FLOAT32_EXACT"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

MAX_SHIFT = 48  # larger shifts overflow the int64 accumulator long before they matter


@dataclasses.dataclass
class IntOp:
    """One integer op: ``out = op(*inputs, **attrs)``; ``out`` holds codes at ``frac``.

    ``fmt`` is the format the output codes are guaranteed to lie in (``None``: a wide
    accumulator); ``source`` is the fx node the op came from.
    """

    op: str
    out: str
    inputs: tuple[str, ...]
    frac: int
    fmt: FixedPoint | None = None
    attrs: dict = dataclasses.field(default_factory=dict)
    source: str = ""


@dataclasses.dataclass
class IntegerGraph:
    """Float ``inputs`` → ops → float ``outputs`` (each output also has its int codes)."""

    inputs: list[str]
    input_shapes: list[tuple]
    ops: list[IntOp]
    outputs: list[str]
    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    integer_inputs: tuple = ()  # inputs that are integers as they are (token ids, attention masks), not quantized

    def op_of(self, name: str) -> IntOp:
        return next(op for op in self.ops if op.out == name)

    def __str__(self) -> str:
        lines = [f"inputs: {', '.join(self.inputs)}"]
        for op in self.ops:
            fmt = f" in {op.fmt}" if op.fmt else ""
            attrs = ", ".join(f"{k}={v}" for k, v in op.attrs.items() if not isinstance(v, torch.Tensor))
            lines.append(f"{op.out} = {op.op}({', '.join(op.inputs)}{', ' + attrs if attrs else ''})"
                         f"  # frac {op.frac}{fmt}")
        lines.append(f"outputs: {', '.join(self.outputs)}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Value:
    """A lowered value: a graph tensor (``name``) or a constant (``const``), at ``frac``."""

    name: str | None = None
    frac: int | None = None            # None: a float tensor (only graph inputs)
    fmt: FixedPoint | None = None
    shape: tuple | None = None
    const: torch.Tensor | None = None  # float before its cast, int64 codes after it

    @property
    def is_float(self) -> bool:
        return self.frac is None


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.ops, self.shapes = gm, [], {}
        self.integer_inputs: list[str] = []

    def emit(self, node: fx.Node, op: str, inputs, frac: int, bounds=None, suffix: str = "", out_shape=None,
             **attrs) -> Value:
        out = node.name + suffix
        shape = out_shape if out_shape is not None else _shape(node)
        # a constant operand of an elementwise op gets the rank of the others (broadcasting)
        rank = max((len(v.shape) for v in inputs if v.shape is not None), default=0) if op in ("add", "mul") else 0
        inputs = [self.constant(node, v, i, rank) if v.name is None else v for i, v in enumerate(inputs)]
        self.ops.append(IntOp(op, out, tuple(v.name for v in inputs), frac, bounds, attrs, node.name))
        self.shapes[out] = shape
        return Value(out, frac, bounds, shape)

    def constant(self, node: fx.Node, v: Value, i: int = 0, rank: int = 0) -> Value:
        """A parameter's codes (behind its cast) as an operand of an integer op: a ``constant`` op,
        with leading axes of size 1 up to ``rank`` so that it broadcasts against the batch (and
        an NHWC operand's layout change applies to it too)."""
        if v.const is None or v.frac is None:
            raise ExportError(f"node {node.name!r}: operand {i} is a constant without a fixed-point format; a "
                              "parameter used as an operand needs its cast (a weight or bias role with a format)")
        codes = v.const.reshape((1,) * max(rank - v.const.dim(), 0) + tuple(v.const.shape))
        out = f"{node.name}_constant{i}"
        self.ops.append(IntOp("constant", out, (), v.frac, v.fmt, {"value": codes}, node.name))
        self.shapes[out] = tuple(codes.shape)
        return Value(out, v.frac, v.fmt, tuple(codes.shape))


def _shape(node: fx.Node) -> tuple | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


# ---- rounding: shared by the rules (constants) and the integer backend ---------------------

def check_deployable(fmt: FixedPoint, where: str) -> None:
    if fmt.rounding == "stochastic":
        raise ExportError(f"{where} rounds stochastically ({fmt}); a deployed graph must be deterministic: "
                          "give this edge (or its role in the policy) rounding 'nearest', 'floor' or 'toward_zero'")


def round_shift(v: torch.Tensor, shift: int, rounding: str) -> torch.Tensor:
    """``v · 2**-shift`` rounded to an integer with ``rounding`` (int64 in, int64 out)."""
    if shift <= 0:
        return v * (1 << -shift)
    d = 1 << shift
    q = torch.div(v, d, rounding_mode="floor")
    if rounding == "floor":
        return q
    r = v - q * d
    if rounding == "toward_zero":
        return q + ((r != 0) & (v < 0)).to(v.dtype)
    return q + torch.div(r + (q & 1) + (d // 2 - 1), d, rounding_mode="floor")  # ties to even


def saturate(t: torch.Tensor, fmt: FixedPoint) -> torch.Tensor:
    """Codes ``t`` (centred) into ``fmt``'s range: clamp, or wrap over all 2**bits codes."""
    zp = fmt.zero_point
    if fmt.overflow == "saturate":
        return t.clamp(fmt.code_min - zp, fmt.code_max - zp)
    return torch.remainder(t + (zp - fmt.code_min), fmt.code_max - fmt.code_min + 1) + (fmt.code_min - zp)


def _const_codes(x: torch.Tensor, fmt: FixedPoint) -> torch.Tensor:
    # A parameter is rounded once, here, read as a stored parameter (ir.stored_format).
    fmt = ir.stored_format(fmt)
    return fmt.to_codes(x.detach()) - fmt.zero_point


# ---- the rules ---------------------------------------------------------------------------

def op_arguments(gm, node: fx.Node, names: tuple, defaults: dict) -> dict:
    """Op arguments by name, from a module's attributes or a call's args/kwargs."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return {n: getattr(mod, n, defaults.get(n)) for n in names}
    out = dict(defaults)
    out.update(zip(names, node.args[1:]))
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def pair(v) -> tuple[int, int]:
    """An int or a 2-sequence (kernel size, stride, padding...) as a 2-tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _operand(node: fx.Node, v: Value) -> Value:
    if isinstance(v, Permuted):
        raise ExportError(f"node {node.name!r}: uses node {v.node!r}, which moves the batch dimension (permutation "
                          f"{list(v.perm)}); such a permutation lowers only where it is split or indexed along its "
                          "first axis (unbind(0), [i])")
    if not isinstance(v, Value) or v.is_float:
        raise ExportError(f"node {node.name!r}: operand is not a fixed-point value; every input of an integer "
                          "op must come through a cast (is its role's format 'float' in the policy?)")
    return v


def rule_cast(lw: _Lowering, node: fx.Node, x: Value) -> Value:
    mod: Cast = lw.gm.get_submodule(node.target)
    if mod.forward_identity or not isinstance(x, Value):
        return x
    fmt = mod.edge.forward
    if fmt is None and mod.edge.consumer != "*":
        return x  # a use without a format of its own sees the value as produced, as in training
    if fmt is None:
        raise ExportError(f"edge {mod.edge.name!r} ({mod.edge.role}) has no fixed-point format (float); "
                          "export needs every forward edge in fixed point: give the role a format in the policy")
    if x.const is not None and x.frac is None:
        return Value(None, fmt.frac, fmt, tuple(x.const.shape), _const_codes(x.const, fmt))
    if x.const is not None:  # a parameter's codes moved by shape ops (a gathered bias table)
        check_deployable(fmt, f"edge {mod.edge.name!r} ({mod.edge.role})")
        codes = saturate(round_shift(x.const, x.frac - fmt.frac, fmt.rounding), fmt)
        return Value(None, fmt.frac, fmt, tuple(codes.shape), codes)
    check_deployable(fmt, f"edge {mod.edge.name!r} ({mod.edge.role})")
    if x.is_float:
        return lw.emit(node, "quantize", [x], fmt.frac, fmt, fmt=fmt)
    if x.fmt == fmt:
        return x
    shift = x.frac - fmt.frac
    if abs(shift) > MAX_SHIFT:
        raise ExportError(f"edge {mod.edge.name!r}: shifting from binary point {x.frac} to {fmt.frac} "
                          f"({shift:+d} bits) overflows the int64 accumulator; use closer formats")
    return lw.emit(node, "requantize", [x], fmt.frac, fmt, shift=shift, fmt=fmt)


def _weighted(lw: _Lowering, node: fx.Node, x: Value, w: Value, b: Value | None, op: str, **attrs) -> Value:
    x = _operand(node, x)
    for name, p in (("weight", w), ("bias", b)):
        if p is not None and (not isinstance(p, Value) or p.const is None or p.frac is None):
            raise ExportError(f"node {node.name!r} ({op}): its {name} must be a stored parameter behind a cast")
    frac = max(x.frac + w.frac, b.frac if b is not None else -MAX_SHIFT)
    weight = w.const << (frac - x.frac - w.frac)          # exact: more fractional bits, same value
    bias = None if b is None else b.const << (frac - b.frac)
    return lw.emit(node, op, [x], frac, weight=weight, bias=bias, **attrs)


def _rounds_to_output(lw, node: fx.Node, op: str, spec) -> None:
    """A conv/linear given its exact definition (``spec``: passes.accumulators) rounds to the
    format of the one cast after it, which the ``requantize`` after it runs; refuse a stale one."""
    cast = output_cast(lw.gm, node) if spec is not None else None
    if spec is not None and (cast is None or cast.edge.forward.spec() != list(spec)):
        raise ExportError(f"node {node.name!r} ({op}): its exact sum rounds to the format of the one cast after "
                          "it, which changed after compile(); run fxcompile.passes.accumulators.exact_accumulators "
                          "on the model again, or recompile")


def rule_conv2d(lw, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1, spec=None):
    _rounds_to_output(lw, node, "conv2d", spec)
    if isinstance(padding, str):
        raise ExportError(f"node {node.name!r} (conv2d): only numeric padding lowers to integer MatMul "
                          f"(got padding={padding!r})")
    # a grouped (or depthwise) conv keeps its (O, C / groups, kh, kw) weight: each output channel
    # sums over its group's input channels only (not the dense conv with zeros off the blocks,
    # whose weight, and work, grow with the square of the channels)
    attrs = {"groups": groups} if groups != 1 else {}
    return _weighted(lw, node, x, w, b, "conv2d", stride=pair(stride), padding=pair(padding),
                     dilation=pair(dilation), **attrs)


def rule_linear(lw, node, x, w, b=None, spec=None):
    _rounds_to_output(lw, node, "linear", spec)
    return _weighted(lw, node, x, w, b, "linear")


def rule_relu(lw, node, x, *args, **kwargs):
    x = _operand(node, x)
    fmt = x.fmt if x.fmt is not None and x.fmt.min_value <= 0 <= x.fmt.max_value else None
    return lw.emit(node, "relu", [x], x.frac, fmt)


def rule_max_pool2d(lw, node, x, *args, **kwargs):
    p = op_arguments(lw.gm, node, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    if p["return_indices"]:
        raise ExportError(f"node {node.name!r} (max_pool2d): return_indices does not lower")
    x = _operand(node, x)
    k, stride, padding, dilation = pair(p["kernel_size"]), pair(p["stride"] or p["kernel_size"]), \
        pair(p["padding"]), pair(p["dilation"])
    if p["ceil_mode"]:
        # the last windows that ceil_mode adds run past the bottom/right edge: pad there with the
        # format's smallest code, which never exceeds a value in the window (each holds one)
        extra = [(o - 1) * s + d * (kk - 1) + 1 - (n + 2 * q) for o, s, d, kk, n, q in
                 zip(_shape(node)[2:], stride, dilation, k, x.shape[2:], padding)]
        if any(e > 0 for e in extra):
            if x.fmt is None:
                raise ExportError(f"node {node.name!r} (max_pool2d): ceil_mode needs its input in a fixed-point "
                                  "format (the padding is its smallest code)")
            shape = (*x.shape[:2], x.shape[2] + max(extra[0], 0), x.shape[3] + max(extra[1], 0))
            x = lw.emit(node, "pad", [x], x.frac, x.fmt, suffix="_ceil", out_shape=shape,
                        pads=(0, max(extra[1], 0), 0, max(extra[0], 0)), value=x.fmt.code_min - x.fmt.zero_point)
    return lw.emit(node, "max_pool2d", [x], x.frac, x.fmt, kernel=k, stride=stride, padding=padding,
                   dilation=dilation)


def _output_format(lw, node: fx.Node) -> FixedPoint | None:
    """The forward format of the one cast ``node`` feeds (its only user), or ``None``: the format a
    fixed-point definition written by a pass rounds to."""
    casts = [u for u in node.users if u.op == "call_module" and ir.EDGE.has(u)]
    return lw.gm.get_submodule(casts[0].target).edge.forward if len(node.users) == 1 == len(casts) else None


def _rounded_by_output_cast(lw, node: fx.Node, spec, name: str, what: str) -> None:
    """Refuse a fixed-point definition whose rounding ``spec`` is not its one output cast's format."""
    fmt = _output_format(lw, node)
    if spec is None or fmt is None or fmt.spec() != list(spec):
        raise ExportError(f"node {node.name!r} ({name}): {what} deploys only as the fixed-point definition "
                          "compile() makes of it, rounded by the format of the one cast after it; give its "
                          "output a single consumer and a fixed-point format, and recompile after changing that "
                          "format")


def rule_fixed_point_mean(lw, node, x, dims, keepdim, spec):
    """The kept axes first, the reduced ones last as one axis, a window sum over it, times the
    reciprocal of the count (``passes.averages``), reshaped to the mean's shape."""
    x = _operand(node, x)
    rank = len(x.shape)
    dims = sorted(d % rank for d in dims)
    n = math.prod(x.shape[d] for d in dims)
    c, r = ops.reciprocal(n)
    _rounded_by_output_cast(lw, node, spec, "mean", f"a mean over {n} values")
    kept = [d for d in range(1, rank) if d not in dims]
    perm = (0, *kept, *dims)
    k = math.prod(x.shape[d] for d in kept)
    if perm != tuple(range(rank)):
        x = lw.emit(node, "transpose", [x], x.frac, x.fmt, suffix="_moved", perm=perm,
                    out_shape=tuple(x.shape[d] for d in perm))
    x = lw.emit(node, "reshape", [x], x.frac, x.fmt, suffix="_rows", out_shape=(x.shape[0], k, 1, n),
                shape=(0, k, 1, n))
    v = lw.emit(node, "sum_pool2d", [x], x.frac + (r if c == 1 else 0), suffix="_sum", out_shape=(x.shape[0], k, 1, 1),
                kernel=(1, n), stride=(1, n))
    if c != 1:
        v = lw.emit(node, "scale", [v], x.frac + r, suffix="_scaled", out_shape=v.shape, factor=c)
    return lw.emit(node, "reshape", [v], v.frac, shape=(0, *_shape(node)[1:]))


def rule_truediv(lw, node, a, b, *args, **kwargs):
    """``x / d`` by a constant: a positive power of two moves the binary point (exact, as in
    float); another divisor lowers as its fixed-point definition (``fixed_point_divide``)."""
    if not _tensors(a, b):
        return rule_size(lw, node, a, b)  # arithmetic on sizes
    if args or kwargs.get("rounding_mode") is not None or isinstance(b, Value) or not isinstance(a, Value):
        raise ExportError(f"node {node.name!r} (truediv): only a tensor divided by a constant lowers "
                          "(no rounding_mode, no tensor divisor)")
    x = _operand(node, a)
    c, r = ops.divisor_reciprocal(b)
    if c != 1:
        _rounded_by_output_cast(lw, node, None, "truediv", f"a division by {b!r} (not a positive power of two)")
    return Value(x.name, x.frac + r, None, x.shape, x.const)  # the same codes, read at another binary point


def rule_fixed_point_divide(lw, node, x, divisor, spec):
    x = _operand(node, x)
    c, r = ops.divisor_reciprocal(divisor)
    _rounded_by_output_cast(lw, node, spec, "truediv", f"a division by {divisor!r}")
    if c == 1:
        return Value(x.name, x.frac + r, None, x.shape)
    return lw.emit(node, "scale", [x], x.frac + r, factor=c)


def rule_avg_pool2d(lw, node, x, *args, **kwargs):
    arguments = avg_pool_arguments(lw.gm, node)
    if arguments is None:
        raise ExportError(f"node {node.name!r} (avg_pool2d): its kernel size and options must be constants")
    return _pool_average(lw, node, x, *arguments)


def rule_fixed_point_avg_pool2d(lw, node, x, kernel, stride, padding, ceil_mode, count_include_pad,
                                divisor_override, spec):
    return _pool_average(lw, node, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override,
                         spec)


def _pool_average(lw: _Lowering, node: fx.Node, x: Value, kernel, stride, padding, ceil_mode, count_include_pad,
                  divisor_override, spec=None) -> Value:
    """``avg_pool2d``: zero padding (the padding, and the rows and columns ``ceil_mode``'s last
    windows reach past the input), ``sum_pool2d``, then :func:`_scale` by each position's reciprocal."""
    x = _operand(node, x)
    k, stride, padding = pair(kernel), pair(stride or kernel), pair(padding)
    out = _shape(node)
    divisors = ops.avg_pool_divisors(x.shape[2:], out[2:], k, stride, padding, count_include_pad, divisor_override)
    factors, r = _factors(lw, node, divisors, spec)
    extra = [max((o - 1) * st + kk - (n + 2 * p), 0)
             for o, st, kk, n, p in zip(out[2:], stride, k, x.shape[2:], padding)]
    if any(padding) or any(extra):
        shape = (*x.shape[:2], x.shape[2] + 2 * padding[0] + extra[0], x.shape[3] + 2 * padding[1] + extra[1])
        x = lw.emit(node, "pad", [x], x.frac, suffix="_pad", out_shape=shape,
                    pads=(padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]))
    uniform = factors is None
    v = lw.emit(node, "sum_pool2d", [x], x.frac + (r if uniform else 0), suffix="" if uniform else "_sum",
                kernel=k, stride=stride)
    return v if uniform else _scale(lw, node, v, factors, r)


def _factors(lw: _Lowering, node: fx.Node, divisors: list[list[int]], spec) -> tuple[object, int]:
    """``(factors, r)`` of :func:`fxcompile.core.ops.average_factors`: ``factors`` ``None`` when
    every divisor is the same power of two (a moved binary point), an int when all are equal,
    else the per-position int64 tensor.  Anything but a moved binary point needs the
    definition ``compile()`` made (``spec``: its rounding is the output cast's)."""
    factors, r = ops.average_factors(divisors)
    if bool((factors == 1).all()):
        return None, r
    name = ops.op_of(lw.gm, node).name
    fmt = _output_format(lw, node)
    if spec is None or fmt is None or fmt.spec() != list(spec):
        sizes = sorted({n for row in divisors for n in row})
        raise ExportError(f"node {node.name!r} ({name}): an average over {', '.join(map(str, sizes))} values (not one "
                          "power of two) deploys only as the fixed-point average compile() makes of it, rounded by "
                          "the format of the one cast after it; give its output a single consumer and a "
                          "fixed-point format, and recompile after changing that format")
    return (int(factors[0, 0]) if bool((factors == factors[0, 0]).all()) else factors), r


def _scale(lw: _Lowering, node: fx.Node, v: Value, factors, r: int) -> Value:
    return lw.emit(node, "scale", [v], v.frac + r, suffix="_scaled", factor=factors)


def _average(lw: _Lowering, node: fx.Node, x: Value, output_size, squeeze: bool, spec=None) -> Value:
    x = _operand(node, x)
    windows = ops.average_windows(x.shape, output_size)
    oh, ow = ops._output_size(x.shape, output_size)
    shape = x.shape[:2] + (oh, ow)
    if windows is None:  # uneven or overlapping windows: PyTorch's adaptive rule, each its own divisor
        rows, cols = ops.adaptive_windows(x.shape[2], oh), ops.adaptive_windows(x.shape[3], ow)
        divisors = [[(re - rs) * (ce - cs) for cs, ce in cols] for rs, re in rows]
        factors, r = _factors(lw, node, divisors, spec)
        v = lw.emit(node, "adaptive_sum_pool2d", [x], x.frac + (r if factors is None else 0), suffix="_sum",
                    out_shape=shape, rows=tuple(rows), cols=tuple(cols))
    else:
        kernel, n = windows
        factors, r = _factors(lw, node, [[n]], spec)
        v = lw.emit(node, "sum_pool2d", [x], x.frac + (r if factors is None else 0), suffix="_sum", out_shape=shape,
                    kernel=kernel, stride=kernel)
    if factors is not None:
        v = _scale(lw, node, v, factors, r)
    lw.shapes[v.name] = shape
    v = dataclasses.replace(v, shape=shape)
    if squeeze:
        v = lw.emit(node, "reshape", [v], v.frac, shape=(0, shape[1]))
    return v


def rule_fixed_point_average(lw, node, x, output_size, squeeze, spec):
    return _average(lw, node, x, output_size, squeeze, spec)


def rule_unrewritten_average(lw, node, x, *args, **kwargs):
    arguments = average_arguments(lw.gm, node)
    if arguments is None:
        raise ExportError(f"node {node.name!r} ({ops.op_of(lw.gm, node).name}): only averages over the last two "
                          "dims of an (N, C, H, W) tensor lower (mean with dim=(2, 3) or (-2, -1), no dtype)")
    return _average(lw, node, x, *arguments)


def rule_flatten(lw, node, x, *args, **kwargs):
    default_start = 1 if node.op == "call_module" else 0
    p = op_arguments(lw.gm, node, ("start_dim", "end_dim"), {"start_dim": default_start, "end_dim": -1})
    x = _operand(node, x)
    rank = len(x.shape)
    start, end = p["start_dim"] % rank, p["end_dim"] % rank
    if start == 0:
        raise ExportError(f"node {node.name!r} (flatten): flattening the batch dimension does not lower")
    shape = (0, *x.shape[1:start], math.prod(x.shape[start:end + 1]), *x.shape[end + 1:])
    return lw.emit(node, "reshape", [x], x.frac, x.fmt, shape=shape)


def rule_add(lw, node, a, b, *args, **kwargs):
    if not any(isinstance(v, Value) for v in (a, b)):
        return rule_size(lw, node, a, b)  # arithmetic on sizes
    if args or kwargs.get("alpha", 1) != 1:
        raise ExportError(f"node {node.name!r} (add): only a + b lowers (no alpha)")
    for x, zero in ((a, b), (b, a)):  # a sum started at 0 (focalnet's ctx_all = 0; ctx_all + ...)
        if isinstance(zero, (int, float)) and not isinstance(zero, bool) and zero == 0 and isinstance(x, Value):
            return _operand(node, x)
    if isinstance(a, Value) and isinstance(b, Value) and (a.is_float and a.const is not None) != \
            (b.is_float and b.const is not None):
        a, b = (_on_grid(node, a, _operand(node, b)), b) if a.is_float else (a, _on_grid(node, b, _operand(node, a)))
    a, b = _operand(node, a), _operand(node, b)
    frac = max(a.frac, b.frac)
    return lw.emit(node, "add", [a, b], frac, shifts=(frac - a.frac, frac - b.frac))


def rule_identity(lw, node, x, *args, **kwargs):
    return x


# ---- products of two activations, softmax, LayerNorm: the definitions passes.definitions wrote -------

def _definition_output(lw: _Lowering, node: fx.Node, spec, name: str) -> None:
    """Refuse a definition whose rounding (``spec``) is no longer its output cast's format."""
    fmt = _output_format(lw, node)
    if fmt is None or fmt.spec() != list(spec):
        raise ExportError(f"node {node.name!r} ({name}): its fixed-point definition rounds to a format that is no "
                          "longer its output cast's; recompile after changing formats")


def rule_fixed_point_matmul(lw, node, a, b, perms, a_spec, b_spec, spec):
    a, b = _operand(node, a), _operand(node, b)
    _definition_output(lw, node, spec, "matmul")
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise ExportError(f"node {node.name!r} (matmul): both operands need at least two dims, got shapes "
                          f"{a.shape} and {b.shape}")
    return lw.emit(node, "matmul", [a, b], a.frac + b.frac, perms=perms)


def rule_fixed_point_softmax(lw, node, x, in_spec, spec):
    x = _operand(node, x)
    _definition_output(lw, node, spec, "softmax")
    if x.frac != in_spec[0]:
        raise ExportError(f"node {node.name!r} (softmax): its exp table is for inputs with {in_spec[0]} fractional "
                          f"bits, its input has {x.frac}; recompile after changing formats")
    return lw.emit(node, "softmax", [x], spec[0], table=intmath.exp_table(in_spec[0], in_spec[2] - in_spec[1]),
                   rounding=ROUNDINGS[spec[4]])


def rule_fixed_point_layer_norm(lw, node, x, normalized_shape, w, b, eps, in_spec, w_spec, b_spec, spec):
    x = _operand(node, x)
    _definition_output(lw, node, spec, "layer_norm")
    for name, p in (("weight", w), ("bias", b)):
        if p is not None and (not isinstance(p, Value) or p.const is None or p.frac is None):
            raise ExportError(f"node {node.name!r} (layer_norm): its {name} must be a stored parameter behind a cast")
    if x.frac != in_spec[0]:
        raise ExportError(f"node {node.name!r} (layer_norm): defined for inputs with {in_spec[0]} fractional bits, "
                          f"its input has {x.frac}; recompile after changing formats")
    wf, bf = (w.frac if w is not None else 0), (b.frac if b is not None else 0)
    plan = intmath.layer_norm_plan(x.shape[-1], ops.code_bits(in_spec), x.frac, eps, wf, bf)
    bias = None if b is None else b.const << (plan["k"] + wf - bf)
    return lw.emit(node, "layer_norm", [x], plan["k"] + wf, plan=plan, weight=None if w is None else w.const,
                   bias=bias)


def rule_unflatten(lw, node, x, *args, **kwargs):
    x = _operand(node, x)
    p = op_arguments(lw.gm, node, ("dim", "sizes"), {}) if node.op != "call_module" else \
        {"dim": lw.gm.get_submodule(node.target).dim}
    if p["dim"] % len(x.shape) == 0:
        raise ExportError(f"node {node.name!r} (unflatten): unflattening the batch dimension does not lower")
    shape = tuple(node.meta["tensor_meta"].shape)
    return lw.emit(node, "reshape", [x], x.frac, x.fmt, shape=(0, *shape[1:]))


_UNREWRITTEN = ("deploys as the fixed-point definition compile() makes of it; this node was not rewritten: its "
                "operands and its output need fixed-point formats (softmax: over the last dim, input <= 16 bits)")


# ---- structural ops: shapes, slices, concatenation, products, resampling --------------------
# Shape ops take their output shape from the example inputs' shape propagation; only the
# batch dimension (axis 0, written 0 in a reshape: "as the input's") stays free.

def evaluate(node: fx.Node, args, kwargs):
    """Run ``node``'s Python target on concrete arguments, a lowered tensor standing in as an
    empty tensor of its example shape: sizes, their arithmetic and asserts become constants."""
    def concrete(v):
        return torch.empty(v.shape, device="meta") if isinstance(v, Value) else v
    args, kwargs = fx.node.map_aggregate(args, concrete), fx.node.map_aggregate(kwargs, concrete)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _tensors(*values) -> bool:
    return any(isinstance(v, Value) for v in values)


def rule_size(lw, node, *args, **kwargs):
    try:
        value = evaluate(node, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - the model's own assert or arithmetic failed
        raise ExportError(f"node {node.name!r} ({_label(lw.gm, node)}): evaluating it for the example shape "
                          f"failed: {exc}") from exc
    if isinstance(value, torch.Tensor):
        raise ExportError(f"node {node.name!r} ({_label(lw.gm, node)}): computes a tensor; only sizes, their "
                          "arithmetic and asserts are evaluated when lowering")
    return value


def _batch_kept(lw, node: fx.Node, x: Value, shape) -> None:
    if not shape or shape[0] != x.shape[0]:
        raise ExportError(f"node {node.name!r} ({_label(lw.gm, node)}): reshapes {tuple(x.shape)} to "
                          f"{tuple(shape or ())}; only shapes that keep the batch dimension first and whole lower")


def reshape_target(node: fx.Node, before: tuple, after: tuple, label: str = "reshape") -> tuple:
    """The target shape of a reshape from ``before`` to ``after`` with the batch left free: ``0``
    (the batch, as it is) first, or ``-1`` where the batch axis merges with whole axes after it or
    splits off them (``(B, nH, nW, ws, ws, C)`` to ``(B·nH·nW, ws, ws, C)``: swin's windows), the
    other axes keeping their sizes."""
    if after and before and after[0] == before[0] and math.prod(after[1:]) == math.prod(before[1:]):
        return (0, *after[1:])
    rest_before, rest_after = math.prod(before[1:]), math.prod(after[1:])
    if after and before and rest_before and rest_after and (rest_before % rest_after == 0 or rest_after % rest_before == 0):
        # the batch axis holds whole multiples of the example's elements per sample: -1 infers it
        return (-1, *after[1:])
    raise ExportError(f"node {node.name!r} ({label}): reshapes {tuple(before)} to {tuple(after or ())}; only shapes "
                      "that keep the batch dimension first (whole, or merged with whole axes after it) lower")


def rule_reshape(lw, node, x, *args, **kwargs):
    if isinstance(x, Value) and x.const is not None:  # a parameter reshaped (layer scale's (C,) to (1, C, 1, 1))
        shape = _shape(node)
        return dataclasses.replace(x, const=x.const.reshape(shape), shape=shape)
    x, shape = _operand(node, x), _shape(node)
    if shape == x.shape:
        return x
    target = reshape_target(node, tuple(x.shape), tuple(shape or ()), _label(lw.gm, node))
    return lw.emit(node, "reshape", [x], x.frac, x.fmt, shape=target)


def permutation(gm: fx.GraphModule, node: fx.Node, rank: int, dims: tuple, kwargs: dict) -> list[int]:
    """The axis permutation of a ``permute``/``transpose`` node of a rank-``rank`` tensor."""
    if ops.op_of(gm, node).name == "transpose":
        d0, d1 = (tuple(dims) + (kwargs.get("dim0", kwargs.get("axis0")), kwargs.get("dim1", kwargs.get("axis1"))))[:2]
        perm = list(range(rank))
        perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
        return perm
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims or kwargs["dims"]
    return [d % rank for d in dims]


@dataclasses.dataclass(frozen=True)
class Permuted:
    """A permutation that moves the batch axis (``qkv.permute(2, 0, 3, 1, 4)``), not emitted:
    it lowers only where it is split or indexed along its new first axis (``unbind(0)``,
    ``[i]``), each part then a slice of ``x`` along ``perm[0]`` and a permutation that keeps the
    batch first."""

    x: Value
    perm: tuple
    node: str

    def part(self, lw, node: fx.Node, start: int, size: int, squeeze: bool, suffix: str) -> Value:
        axis = self.perm[0]
        inner = tuple(size if a == axis else n for a, n in enumerate(self.x.shape))
        v = _slice(lw, node, self.x, [start], [start + size], [axis], [1], suffix=f"{suffix}_slice", out_shape=inner)
        rest = list(self.perm[1:]) if squeeze else list(self.perm)
        if squeeze:  # drop the sliced axis: the remaining axes renumbered
            shape = inner[:axis] + inner[axis + 1:]
            v = lw.emit(node, "reshape", [v], v.frac, v.fmt, suffix=f"{suffix}_squeezed", out_shape=shape,
                        shape=(0, *shape[1:]))
            rest = [a - (a > axis) for a in rest]
        if rest[0] != 0:
            raise ExportError(f"node {node.name!r}: a part of the permutation {list(self.perm)} of node {self.node!r} "
                              "still moves the batch dimension; only permutations of the other axes lower")
        out = tuple(v.shape[a] for a in rest)
        if rest == list(range(len(rest))):
            return v
        return lw.emit(node, "transpose", [v], v.frac, v.fmt, suffix=suffix, out_shape=out, perm=tuple(rest))


def _not_permuted(lw, node: fx.Node, x):
    if isinstance(x, Permuted):
        raise ExportError(f"node {node.name!r} ({_label(lw.gm, node)}): uses node {x.node!r}, which moves the batch "
                          f"dimension (permutation {list(x.perm)}); such a permutation lowers only where it is split "
                          "or indexed along its first axis (unbind(0), [i])")
    return x


def rule_permute(lw, node, x, *dims, **kwargs):
    x = _operand(node, _not_permuted(lw, node, x))
    perm = permutation(lw.gm, node, len(x.shape), dims, kwargs)
    if perm[0] != 0:
        return Permuted(x, tuple(perm), node.name)
    if perm == list(range(len(x.shape))):
        return x
    return lw.emit(node, "transpose", [x], x.frac, x.fmt, perm=tuple(perm))


def _axis(node: fx.Node, dim: int, rank: int, what: str) -> int:
    if dim % rank == 0:
        raise ExportError(f"node {node.name!r} ({what}): along the batch dimension does not lower; only "
                          "other axes may be sliced, split or concatenated")
    return dim % rank


def _slice(lw, node, x: Value, starts, ends, axes, steps, suffix="", out_shape=None) -> Value:
    return lw.emit(node, "slice", [x], x.frac, x.fmt, suffix=suffix, out_shape=out_shape, starts=tuple(starts),
                   ends=tuple(ends), axes=tuple(axes), steps=tuple(steps))


def index_slices(node: fx.Node, shape: tuple, index, first_axis: bool = False) -> tuple[list, list, list, list]:
    """``(starts, ends, axes, steps)`` of ``x[index]`` for ``x`` of ``shape`` (ints become
    one-element slices, dropped by a reshape after; ``None`` adds an axis there).  ``first_axis``
    admits indexing axis 0 (a tensor whose batch axis a permutation moved, see :class:`Permuted`)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (Value, torch.Tensor, list, fx.Node)) for i in index) or sum(i is Ellipsis for i in index) > 1:
        raise ExportError(f"node {node.name!r} (getitem): only indexing by ints, slices, None and one ... lowers")
    named = [i for i in index if i is not None and i is not Ellipsis]
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(named)) + index[at + 1:]
    starts, ends, axes, steps, axis = [], [], [], [], 0
    for i in index:
        if i is None:
            continue
        size = shape[axis]
        if isinstance(i, int):
            i = slice(i % size, i % size + 1)
        start, end, step = i.indices(size)
        if step < 1:
            raise ExportError(f"node {node.name!r} (getitem): negative steps do not lower")
        if (start, end, step) != (0, size, 1):
            if not first_axis:
                _axis(node, axis, len(shape), "getitem")
            starts.append(start), ends.append(end), axes.append(axis), steps.append(step)
        axis += 1
    return starts, ends, axes, steps


def rule_getitem(lw, node, x, index):
    if isinstance(x, (tuple, list)):
        return x[index]  # one output of a split
    if isinstance(x, Permuted) and isinstance(index, int):
        size = x.x.shape[x.perm[0]]
        return x.part(lw, node, index % size, 1, True, "")
    x = _not_permuted(lw, node, x)
    if not isinstance(x, Value):
        return rule_size(lw, node, x, index)  # an element of a shape
    x, shape = _operand(node, x), _shape(node)
    starts, ends, axes, steps = index_slices(node, x.shape, index)
    if starts:
        inner = list(x.shape)
        for s, e, a, t in zip(starts, ends, axes, steps):
            inner[a] = len(range(s, e, t))
        x = _slice(lw, node, x, starts, ends, axes, steps, suffix="_slice" if tuple(inner) != shape else "",
                   out_shape=tuple(inner))
    return x if x.shape == shape else lw.emit(node, "reshape", [x], x.frac, x.fmt, shape=(0, *shape[1:]))


def split_sizes(node: fx.Node, shape: tuple, args: tuple, kwargs: dict, first_axis: bool = False
                ) -> tuple[int, list[int], bool]:
    """``(axis, sizes, squeeze)`` of a ``split``/``chunk``/``unbind`` node of a tensor of ``shape``
    (``first_axis``: axis 0 admitted, as in :func:`index_slices`)."""
    target = node.target
    name = target if isinstance(target, str) else (
        target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else target.__name__)
    unbind = name == "unbind"
    dim = kwargs.get("dim", (args[0] if args else 0) if unbind else (args[1] if len(args) > 1 else 0))
    dim = dim % len(shape) if first_axis else _axis(node, dim, len(shape), name)
    if unbind:
        return dim, [1] * shape[dim], True
    parts = getattr(torch.empty(shape, device="meta"), name)(*args, **kwargs)
    return dim, [p.shape[dim] for p in parts], False


def rule_split(lw, node, x, *args, **kwargs):
    if isinstance(x, Permuted):
        dim, sizes, squeeze = split_sizes(node, tuple(x.x.shape[a] for a in x.perm), args, kwargs, first_axis=True)
        if dim == 0:
            out, start = [], 0
            for i, size in enumerate(sizes):
                out.append(x.part(lw, node, start, size, squeeze, f"_{i}"))
                start += size
            return tuple(out)
    x = _operand(node, _not_permuted(lw, node, x))
    dim, sizes, squeeze = split_sizes(node, x.shape, args, kwargs)
    out, start = [], 0
    for i, size in enumerate(sizes):
        inner = tuple(x.shape[:dim]) + (size,) + tuple(x.shape[dim + 1:])
        v = _slice(lw, node, x, [start], [start + size], [dim], [1], suffix=f"_{i}", out_shape=inner)
        if squeeze:
            squeezed = inner[:dim] + inner[dim + 1:]
            v = lw.emit(node, "reshape", [v], v.frac, v.fmt, suffix=f"_{i}_squeezed", out_shape=squeezed,
                        shape=(0, *squeezed[1:]))
        out.append(v)
        start += size
    return tuple(out)


def rule_cat(lw, node, tensors, dim=0, **kwargs):
    dim = kwargs.get("axis", dim)
    tensors = [_operand(node, t) for t in tensors]
    name = ops.op_of(lw.gm, node).name
    dim = _axis(node, dim, len(tensors[0].shape) + (name == "stack"), name)
    if name == "stack":  # each operand gets the new axis, then they are concatenated along it
        tensors = [lw.emit(node, "reshape", [t], t.frac, t.fmt, suffix=f"_{i}", out_shape=s,
                           shape=(0, *s[1:])) for i, t in enumerate(tensors)
                   for s in [tuple(t.shape[:dim]) + (1,) + tuple(t.shape[dim:])]]
    frac = max(t.frac for t in tensors)  # aligned exactly, as add's operands
    fmts = {t.fmt for t in tensors}
    fmt = fmts.pop() if len(fmts) == 1 and all(t.frac == frac for t in tensors) else None
    return lw.emit(node, "concat", tensors, frac, fmt, axis=dim, shifts=tuple(frac - t.frac for t in tensors))


# float32 holds a product of codes exactly up to 2**24: beyond it the simulation's float
# product rounds, so only the fixed-point product (passes.products) deploys
FLOAT32_EXACT = 1 << 24


def _largest_code(v: Value) -> int | None:
    return None if v.fmt is None else max(abs(v.fmt.code_min - v.fmt.zero_point), abs(v.fmt.code_max - v.fmt.zero_point))


def _channel_scale(node: fx.Node, x: Value, k: Value) -> torch.Tensor:
    """The per-channel (axis 1) codes of the constant ``k`` that ``x`` is multiplied by: ``k``
    is a scalar or has one value per channel of ``x`` (layer scale, ``gamma.reshape(1, -1, 1, 1)``)."""
    const, rank = k.const, len(x.shape)
    dims = (1,) * (rank - const.dim()) + tuple(const.shape)
    if const.dim() > rank or any(d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, x.shape[1]):
        raise ExportError(f"node {node.name!r} (mul): a product with a constant of shape {tuple(const.shape)} "
                          f"lowers only when it is a scalar or one value per channel (axis 1) of the "
                          f"{tuple(x.shape)} operand")
    return const.reshape(-1).expand(x.shape[1]).clone()


def _product(lw, node, a: Value, b: Value, spec=None) -> Value:
    a, b = _operand(node, a), _operand(node, b)
    name = ops.op_of(lw.gm, node).name
    if a.const is not None or b.const is not None:
        (x, k) = (b, a) if a.const is not None else (a, b)
        if x.const is not None:
            raise ExportError(f"node {node.name!r} ({name}): a product of two constants does not lower")
    if spec is None:
        la, lb = _largest_code(a), _largest_code(b)
        if la is None or lb is None or la * lb > FLOAT32_EXACT:
            raise ExportError(f"node {node.name!r} ({name}): a product of two activations whose codes reach "
                              f"{la} × {lb} > 2**24 is not exact in the simulation's float32; compile() makes "
                              "it exact (passes.products) when its output has one consumer through a "
                              "fixed-point cast: give it one, or narrower operand formats")
    else:
        fmt = _output_format(lw, node)
        if fmt is None or fmt.spec() != list(spec):
            raise ExportError(f"node {node.name!r} ({name}): the fixed-point product rounds to the format of the "
                              "one cast after it, which changed after compile(); recompile")
    if a.const is not None or b.const is not None:  # times a parameter's codes: the exact per-channel product
        scale = _channel_scale(node, x, k)
        return lw.emit(node, "affine", [x], x.frac + k.frac, scale=scale, offset=torch.zeros_like(scale))
    return lw.emit(node, "mul", [a, b], a.frac + b.frac)


def rule_mul(lw, node, a, b):
    if not _tensors(a, b):
        return rule_size(lw, node, a, b)
    if isinstance(a, Value) and isinstance(b, Value):
        return _product(lw, node, a, b)
    x, k = (a, b) if isinstance(a, Value) else (b, a)
    x = _operand(node, x)
    m, e = math.frexp(k) if isinstance(k, (int, float)) else (None, None)
    if m != 0.5:
        raise ExportError(f"node {node.name!r} (mul): a product with the constant {k!r} lowers only when it is a "
                          "positive power of two (a moved binary point)")
    return Value(x.name, x.frac - (e - 1), None, x.shape)  # the same codes, read at another binary point


def rule_expand(lw, node, x, *sizes, **kwargs):
    """``x.expand(...)`` to the node's shape: a constant (a class token ``(1, 1, d)``) repeated
    over the batch, whose size the graph's first input gives at run time; or an activation
    broadcast along its size-1 axes (its batch unchanged)."""
    x = _operand(node, x)
    shape = _shape(node)
    lead = len(shape) - len(x.shape)
    src = (1,) * lead + tuple(x.shape)
    if any(s != o and s != 1 for s, o in zip(src, shape)):
        raise ExportError(f"node {node.name!r} (expand): cannot expand {tuple(x.shape)} to {shape}")
    if x.const is None and lead:
        raise ExportError(f"node {node.name!r} (expand): adding leading axes to {tuple(x.shape)} moves the batch "
                          "dimension; only an expansion that keeps it first lowers")
    if x.const is not None and src[0] != 1:
        raise ExportError(f"node {node.name!r} (expand): a constant of shape {tuple(x.shape)} expanded to {shape}: "
                          "its first axis is not 1, so it cannot be repeated over the batch")
    if shape == tuple(x.shape) and x.const is None:
        return x
    like = lw.batch_source if x.const is not None else x
    return lw.emit(node, "expand", [x, like], x.frac, x.fmt, shape=(0, *shape[1:]))


def rule_fixed_point_mul(lw, node, a, b, spec):
    if not isinstance(b, Value):  # times a number: its float32 value m · 2**-e, exactly
        a = _operand(node, a)
        _definition_output(lw, node, spec, "mul")
        m, e = ops.scalar_codes(b)
        if _largest_code(a) is None or _largest_code(a).bit_length() + abs(m).bit_length() > 62:
            raise ExportError(f"node {node.name!r} (mul): the product of its codes and {b!r} overflows int64")
        return lw.emit(node, "scale", [a], a.frac + e, factor=m)
    return _product(lw, node, a, b, spec)


def rule_sub(lw, node, a, b, *args, **kwargs):
    if not _tensors(a, b):
        return rule_size(lw, node, a, b)  # arithmetic on sizes
    if args or kwargs.get("alpha", 1) != 1:
        raise ExportError(f"node {node.name!r} (sub): only a - b lowers (no alpha)")
    a, b = _operand(node, a), _operand(node, b)
    frac = max(a.frac, b.frac)
    return lw.emit(node, "add", [a, b], frac, shifts=(frac - a.frac, frac - b.frac), subtract=True)


def rule_fixed_point_batch_norm(lw, node, x, module, weight, bias, spec):
    x = _operand(node, x)
    frac = int(spec[0])
    params = [None if p is None else p.const.double() * 2.0 ** -p.frac for p in (weight, bias)]
    s, s_frac, t = ops.batch_norm_affine(module, *params, frac)
    out = max(x.frac + s_frac, frac)
    if out - frac > MAX_SHIFT:
        raise ExportError(f"node {node.name!r} (batch norm): its scale needs {s_frac} fractional bits, too many "
                          "for the int64 accumulator; check its running variance")
    return lw.emit(node, "affine", [x], out, scale=s << (out - x.frac - s_frac), offset=t << (out - frac))


_RESHAPES = {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "contiguous"}


def whole_view(steps) -> bool:
    """Whether ``steps`` (a ``write_back``'s view) only reshape all of its base, so writing a
    value back is reshaping it to the base's shape."""
    names = [name.rsplit(".", 1)[-1] for _, name, _, _ in steps]
    return all(n in _RESHAPES for n in names)


def rule_write_back(lw, node, base, value, steps):
    """An in-place op on a view of ``base`` (``frontend.functionalize``): the view's new value
    becomes the base's.  Lowers where the view is all of the base, reshaped (a flatten before an
    in-place dropout, as in efficientnet's classifier)."""
    base, value = _operand(node, base), _operand(node, value)
    if not whole_view(steps):
        raise ExportError(f"node {node.name!r} (write_back): an in-place op on a part of a tensor "
                          f"({', '.join(name for _, name, _, _ in steps)}) does not lower; write it out of place")
    return lw.emit(node, "reshape", [value], value.frac, value.fmt, shape=(0, *base.shape[1:]))


def rule_pad(lw, node, x, *args, **kwargs):
    if node.op == "call_module":
        mod = lw.gm.get_submodule(node.target)
        pads, mode, value = tuple(mod.padding), "constant", getattr(mod, "value", 0.0)
    else:
        p = {"mode": "constant", "value": None, **dict(zip(("pad", "mode", "value"), args)), **kwargs}
        pads, mode, value = tuple(p["pad"]), p["mode"], p["value"] or 0.0
    x = _operand(node, x)
    if mode != "constant" or value != 0 or len(pads) > 2 * (len(x.shape) - 1) or min(pads) < 0:
        raise ExportError(f"node {node.name!r} (pad): only constant zero padding of non-batch axes lowers "
                          f"(got pad={pads}, mode={mode!r}, value={value})")
    return lw.emit(node, "pad", [x], x.frac, x.fmt, pads=pads)


def rule_interpolate(lw, node, x, *args, **kwargs):
    if node.op == "call_module":
        mode = lw.gm.get_submodule(node.target).mode
    else:
        mode = op_arguments(lw.gm, node, ("size", "scale_factor", "mode"), {"mode": "nearest"})["mode"]
    x, shape = _operand(node, x), _shape(node)
    factors = tuple(o // i for o, i in zip(shape[2:], x.shape[2:]))
    if mode != "nearest" or len(x.shape) != 4 or any(o != i * f for o, i, f in zip(shape[2:], x.shape[2:], factors)):
        raise ExportError(f"node {node.name!r} (interpolate): only nearest upsampling of (N, C, H, W) by integer "
                          f"factors lowers (got mode {mode!r}, {tuple(x.shape)} to {shape})")
    return lw.emit(node, "upsample", [x], x.frac, x.fmt, factors=factors)


def fold_constant(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    """The value of a shape op (view, permute, getitem by an index tensor, ...) on constants
    only — a parameter's codes after its cast, or a buffer — computed now, as a constant of the
    first operand's binary point (swin's relative-position bias: a table gathered by a constant
    index); ``None`` for any other node."""
    op = ops.op_of(gm, node)
    values = [v for v in _values((args, kwargs)) if isinstance(v, Value)]
    if op is None or op.group != "shape" or op.name in ("expand", "to") or node.op == "call_module" or not values or \
            any(v.const is None for v in values):
        return None
    coded = next((v for v in values if v.frac is not None), values[0])
    concrete = lambda v: v.const if isinstance(v, Value) else v  # noqa: E731
    args, kwargs = fx.node.map_aggregate(args, concrete), fx.node.map_aggregate(kwargs, concrete)
    result = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" else \
        node.target(*args, **kwargs)
    wrap = lambda t: Value(None, coded.frac, coded.fmt, tuple(t.shape), t)  # noqa: E731
    return tuple(wrap(t) for t in result) if isinstance(result, (tuple, list)) else wrap(result)


def _values(tree) -> list:
    out = []
    fx.node.map_aggregate(tree, lambda v: out.append(v) or v)
    return out


def rule_roll(lw, node, x, shifts, dims=None):
    """``torch.roll`` along non-batch axes: per axis, the last ``s`` codes sliced off and put
    first (a slice and a concat; exact)."""
    x = _operand(node, x)
    if dims is None:
        raise ExportError(f"node {node.name!r} (roll): rolling the flattened tensor does not lower; give dims")
    shifts, dims = (shifts, dims) if isinstance(dims, (tuple, list)) else ((shifts,), (dims,))
    for i, (s, d) in enumerate(zip(shifts, dims)):
        d = _axis(node, d, len(x.shape), "roll")
        n = x.shape[d]
        s %= n
        if s == 0:
            continue
        head = tuple(x.shape[:d]) + (s,) + tuple(x.shape[d + 1:])
        tail = tuple(x.shape[:d]) + (n - s,) + tuple(x.shape[d + 1:])
        a = _slice(lw, node, x, [n - s], [n], [d], [1], suffix=f"_{i}_head", out_shape=head)
        b = _slice(lw, node, x, [0], [n - s], [d], [1], suffix=f"_{i}_tail", out_shape=tail)
        x = lw.emit(node, "concat", [a, b], x.frac, x.fmt, suffix=f"_{i}", out_shape=tuple(x.shape), axis=d,
                    shifts=(0, 0))
    return x


FLOAT32_SIGNIFICAND = 24


def _on_grid(node: fx.Node, c: Value, x: Value) -> Value:
    """A float constant (a buffer, e.g. swin's attention mask) added to ``x``: its codes at
    ``x``'s binary point, if it lies on that grid and the float32 sum the simulation forms is
    exact (``|x| + |c|`` within float32's 24-bit significand)."""
    codes = c.const.double() * 2.0 ** x.frac
    largest = _largest_code(x)
    if not torch.equal(codes, torch.round(codes)) or largest is None or \
            largest + int(codes.abs().max()) > 1 << FLOAT32_SIGNIFICAND:
        raise ExportError(f"node {node.name!r} (add): a constant operand lowers only on its other operand's grid "
                          f"(2**-{x.frac}) and small enough for the simulation's float32 sum to be exact; give it "
                          "a fixed-point cast of its own")
    return Value(None, x.frac, None, tuple(c.const.shape), codes.to(torch.int64))


def rule_dropout(lw, node, x, *args, **kwargs):
    if node.op == "call_function":  # the lowered arguments: a training flag read from the model is its value
        p = {"p": 0.5, "training": True, **dict(zip(("p", "training"), args)), **kwargs}
        if p["training"] and p["p"] > 0:
            raise ExportError(f"node {node.name!r} (dropout): F.dropout was traced with training=True, so the "
                              "graph drops in eval mode too; trace the model in eval mode, or use nn.Dropout")
    return x


def _round_bound(v: float, rounding: str) -> int:
    """``v`` (exact in float64) rounded to an integer by a format's rounding (ties to even)."""
    return {"floor": math.floor, "toward_zero": math.trunc}.get(rounding, round)(v)


def rule_clip(lw, node, x, *args, **kwargs):
    """ReLU6, Hardtanh, clamp/clip with constant bounds ``lo``, ``hi``, followed by their cast
    to ``out`` (binary point ``f``).

    The definition, bit for bit the float clamp followed by the cast (rounding and saturation
    are non-decreasing, so they commute with a clamp): the input codes shifted left to
    ``F = max(frac, f)``, clamped to ``round(lo · 2**f) · 2**(F - f)`` and
    ``round(hi · 2**f) · 2**(F - f)`` with ``out``'s rounding, then the cast's requantize.  A
    bound on the input's grid is that bound at the input's binary point; one off it (a clamp
    at 0.3 on a 2**-8 grid) is the value the cast would round it to."""
    name = ops.op_of(lw.gm, node).name
    bounds = nonlinear.clip_bounds(lw.gm, node, name)
    if bounds is None:
        raise ExportError(f"node {node.name!r} ({name}): only constant bounds lower; a tensor bound needs "
                          "a max/min of two activations, which does not lower yet")
    x = _operand(node, x)
    casts = [u for u in node.users if u.op == "call_module" and ir.EDGE.has(u) and ir.EDGE.of(u).consumer == "*"]
    out = lw.gm.get_submodule(casts[0].target).edge.forward if casts else None
    if out is None:
        raise ExportError(f"node {node.name!r} ({name}): its output needs a fixed-point cast, whose rounding "
                          "defines where an off-grid bound lands")
    frac = max(x.frac, out.frac)
    shift = frac - x.frac
    if x.fmt is not None:
        vlo, vhi = (x.fmt.code_min - x.fmt.zero_point) << shift, (x.fmt.code_max - x.fmt.zero_point) << shift
    else:
        vlo, vhi = -(1 << 62), (1 << 62)
    lo, hi = ((None if b is None else min(max(_round_bound(b * 2.0 ** out.frac, out.rounding) << (frac - out.frac),
                                                vlo), vhi)) for b in bounds)
    lo, hi = (None if lo is not None and lo <= vlo else lo), (None if hi is not None and hi >= vhi else hi)
    if shift == 0 and lo is None and hi is None:
        return x
    return lw.emit(node, "clip", [x], frac, x.fmt if shift == 0 else None, shift=shift, lo=lo, hi=hi)


def rule_lookup(lw, node, x, name, params, in_spec, out_spec):
    """The table of :func:`fxcompile.core.nonlinear.table` for ``name`` from ``in_spec`` to
    ``out_spec``; the casts around the node must still have those formats."""
    x = _operand(node, x)
    current = lookup_arguments(lw.gm, node)
    if isinstance(current, str) or list(current[2]) != list(in_spec) or list(current[3]) != list(out_spec):
        raise ExportError(f"node {node.name!r} (lookup {name}): its table was built for other formats than its "
                          "casts now have; run fxcompile.passes.lookup_tables.lookup_tables(qmodel) after changing "
                          "a cast's format" + (f" ({current})" if isinstance(current, str) else ""))
    if x.frac != in_spec[0]:
        raise ExportError(f"node {node.name!r} (lookup {name}): its input arrives at binary point {x.frac}, "
                          f"its table is indexed at {in_spec[0]}")
    (cast,) = node.users
    fmt = lw.gm.get_submodule(cast.target).edge.forward
    codes = nonlinear.table(name, tuple(params), tuple(in_spec), tuple(out_spec))
    return lw.emit(node, "lookup", [x], fmt.frac, fmt, table=codes, offset=in_spec[1] - in_spec[3], function=name)


# ---- text transformers: embeddings, positions, masks, Conv1D --------------------------------
# Integer graph inputs (token ids, attention masks) are codes at binary point 0, not quantized.
# Integer and bool tensors computed from sizes, buffers and constants (position ids, token type
# ids, a causal mask) are evaluated for the example inputs' shape (:func:`_evaluated`).

def _live(v) -> bool:
    """Whether ``v`` is a tensor of the integer graph (not a constant, not a size)."""
    return isinstance(v, Permuted) or (isinstance(v, Value) and (v.name is not None or v.frac is not None))


def _evaluated(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    """The value of ``node`` when it computes on constants only (integers and bools from sizes,
    ``arange``, buffers: positions, a causal mask), computed now; ``None`` otherwise.  A float
    result is a constant :class:`Value` (a buffer), any other a tensor."""
    op = ops.op_of(gm, node)
    leaves = _values((args, kwargs))
    if op is None or node.op == "call_module" or any(_live(v) for v in leaves):
        return None
    if op.name != "bookkeeping" and not any(isinstance(v, torch.Tensor) for v in leaves) and not (
            op.name in ("to", "expand", "embedding") and any(isinstance(v, Value) for v in leaves)):
        return None
    concrete = lambda v: v.const if isinstance(v, Value) else v  # noqa: E731
    args, kwargs = fx.node.map_aggregate(args, concrete), fx.node.map_aggregate(kwargs, concrete)
    try:
        result = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" else \
            node.target(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the model's own bookkeeping failed on the example shape
        raise ExportError(f"node {node.name!r} ({_label(gm, node)}): evaluating it for the example inputs' shape "
                          f"failed: {exc}") from exc
    if isinstance(result, torch.Tensor) and result.is_floating_point():
        return Value(const=result)
    return result


def rule_bookkeeping(lw, node, *args, **kwargs):
    """Integers and bools computed from a graph input's values: only the forms ``passes.masks``
    rewrites lower (an attention mask as ``key_padding_mask``); an assert is dropped."""
    if "assert" in _label(lw.gm, node):
        return None
    inputs = [v.name for v in _values((args, kwargs)) if isinstance(v, Value) and v.name is not None]
    raise ExportError(f"node {node.name!r} ({_label(lw.gm, node)}): computes integers or a mask from the graph "
                      f"tensor(s) {', '.join(map(repr, inputs))}; only constants for the example shape (positions, a "
                      "causal mask) and attention masks kept where a (batch, length) input is non-zero "
                      "(fxcompile.passes.masks) lower")


def rule_to(lw, node, x, *args, **kwargs):
    """A dtype or device change: the identity on a fixed-point value that stays floating point."""
    dtypes = [v for v in _values((args, kwargs)) if isinstance(v, torch.dtype)]
    if isinstance(x, Value) and all(d.is_floating_point for d in dtypes) and not (x.frac == 0 and x.fmt is None
                                                                                  and x.name in lw.integer_inputs):
        return x
    raise ExportError(f"node {node.name!r} (to): converting {'the integer input ' + repr(x.name) if isinstance(x, Value) else 'a value'} "
                      f"to {', '.join(map(str, dtypes)) or 'another dtype'} does not lower; only float-to-float "
                      "conversions of fixed-point values (the identity) do")


def rule_embedding(lw, node, w, indices, *args, **kwargs):
    """``F.embedding``/``nn.Embedding``: rows of the weight's codes.  Constant indices (position
    ids) give constant codes; an integer graph input (token ids) a ``gather`` from the table."""
    if node.target is torch.nn.functional.embedding:  # F.embedding(input, weight, ...); aten's is (weight, input)
        w, indices = indices, w
        if (args[1:2] or (kwargs.get("max_norm"),))[0] is not None:
            raise ExportError(f"node {node.name!r} (embedding): max_norm renormalises the table in place; it does "
                              "not lower")
    if node.op == "call_module" or not isinstance(w, Value) or w.const is None or w.frac is None:
        raise ExportError(f"node {node.name!r} (embedding): its weight must be a stored parameter behind a cast")
    if isinstance(indices, Value) and indices.name is None and indices.frac is None:
        indices = indices.const  # a buffer (position ids)
    if isinstance(indices, torch.Tensor):
        codes = _rows(indices, w.const)
        return Value(None, w.frac, w.fmt, tuple(codes.shape), codes)
    if not (isinstance(indices, Value) and indices.name in lw.integer_inputs) and not (
            isinstance(indices, Value) and indices.frac == 0 and indices.fmt is None and indices.const is None):
        raise ExportError(f"node {node.name!r} (embedding): its indices must be an integer graph input (token ids) "
                          "or constants for the example shape (position ids)")
    return lw.emit(node, "gather", [indices], w.frac, w.fmt, table=w.const)


def rule_addmm(lw, node, b, x, w, spec=None, **kwargs):
    """``torch.addmm(b, x, w)`` (transformers' ``Conv1D``, weight stored (in, out)): the linear
    layer of ``wᵀ``."""
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise ExportError(f"node {node.name!r} (addmm): only beta = alpha = 1 lowers")
    _rounds_to_output(lw, node, "addmm", spec)
    if not isinstance(w, Value) or w.const is None or w.const.dim() != 2:
        raise ExportError(f"node {node.name!r} (addmm): its weight must be a stored 2-d parameter behind a cast")
    return _weighted(lw, node, x, dataclasses.replace(w, const=w.const.t().contiguous()), b, "linear")


def whole_slice(start, end, step) -> bool:
    """Whether ``aten.slice``'s range is the whole axis whatever its size (``x[:, 0]`` slices the
    batch axis from 0 to 2**63 - 1 first)."""
    return start in (None, 0) and (end is None or end >= 1 << 62) and step in (None, 1)


def rule_slice(lw, node, x, dim=0, start=None, end=None, step=1):
    """``aten.slice``: a range along one non-batch axis."""
    x = _operand(node, _not_permuted(lw, node, x))
    dim = dim % len(x.shape)
    if whole_slice(start, end, step):
        return x
    begin, stop, step = slice(start, end, step).indices(x.shape[dim])
    if (begin, stop, step) == (0, x.shape[dim], 1):
        return x
    _axis(node, dim, len(x.shape), "slice")
    return _slice(lw, node, x, [begin], [stop], [dim], [step])


def rule_select(lw, node, x, dim, index):
    """``aten.select`` (``x[:, 0]``): a one-element slice along a non-batch axis, the axis dropped."""
    x = _operand(node, _not_permuted(lw, node, x))
    dim = _axis(node, dim, len(x.shape), "select")
    i = index % x.shape[dim]
    inner = tuple(1 if a == dim else n for a, n in enumerate(x.shape))
    v = _slice(lw, node, x, [i], [i + 1], [dim], [1], suffix="_slice", out_shape=inner)
    return lw.emit(node, "reshape", [v], v.frac, v.fmt, shape=(0, *_shape(node)[1:]))


def rule_key_padding_mask(lw, node, mask):
    if not (isinstance(mask, Value) and mask.name in lw.integer_inputs and len(mask.shape) == 2):
        raise ExportError(f"node {node.name!r} (key_padding_mask): its operand must be an integer (batch, length) "
                          "graph input")
    return lw.emit(node, "padding_mask", [mask], 0, out_shape=(mask.shape[0], 1, 1, mask.shape[1]))


def rule_all_kept(lw, node, mask):
    """:func:`fxcompile.core.ops.all_kept`: ones of the mask's example shape (a size computation)."""
    return torch.ones(mask.shape, dtype=torch.int64)


def rule_fill_masked(lw, node, x, keep, spec, also=None):
    """:func:`fxcompile.core.ops.fill_masked`: ``select`` of the codes (shifted to the output
    format's binary point if that is finer) or the output format's smallest code; the condition
    is an input (``padding_mask``) or a constant for the example sequence length (a causal
    mask), which then fixes that length."""
    x = _operand(node, x)
    fmt = _output_format(lw, node)
    if fmt is None or fmt.spec() != list(spec):
        raise ExportError(f"node {node.name!r} (fill_masked): the masked scores take the smallest value of the format "
                          "of the one cast after them, which changed after compile(); recompile")
    frac = max(x.frac, fmt.frac)
    fill = (fmt.code_min - fmt.zero_point) << (frac - fmt.frac)
    attrs = {"shift": frac - x.frac, "fill": fill}

    def constant(c):
        c = c.to(torch.bool)
        if c.dim() and c.shape[0] > 1:
            if not bool((c == c[:1]).all()):
                raise ExportError(f"node {node.name!r} (fill_masked): a constant mask that differs by sample does "
                                  "not lower; export with a single example input")
            c = c[:1]
        return c
    if also is not None and not isinstance(also, torch.Tensor):
        raise ExportError(f"node {node.name!r} (fill_masked): its second condition must be a constant")
    if isinstance(keep, torch.Tensor):
        keep = constant(keep) if also is None else constant(keep) & constant(also)
        return lw.emit(node, "select", [x], frac, None, condition=keep, **attrs)
    if not isinstance(keep, Value) or keep.name is None:
        raise ExportError(f"node {node.name!r} (fill_masked): its condition must be an input mask or a constant")
    if also is not None:
        attrs["condition"] = constant(also)
    return lw.emit(node, "select", [x, keep], frac, None, **attrs)


def _rows(indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The table's rows at constant indices (position ids): constant codes."""
    return torch.nn.functional.embedding(indices.long(), table)


RULES: dict[str, Callable] = {
    "cast": rule_cast,
    "conv2d": rule_conv2d,
    "linear": rule_linear,
    "relu": rule_relu,
    "max_pool2d": rule_max_pool2d,
    "avg_pool2d": rule_avg_pool2d,
    "adaptive_avg_pool2d": rule_unrewritten_average,
    "mean": rule_unrewritten_average,
    "fixed_point_average": rule_fixed_point_average,
    "fixed_point_avg_pool2d": rule_fixed_point_avg_pool2d,
    "truediv": rule_truediv, "fixed_point_divide": rule_fixed_point_divide,
    "fixed_point_mean": rule_fixed_point_mean,
    "flatten": rule_flatten,
    "add": rule_add,
    "identity": rule_identity,
    "dropout": rule_dropout,  # deployment is inference: dropout is the identity
    "fixed_point_matmul": rule_fixed_point_matmul,
    "fixed_point_softmax": rule_fixed_point_softmax,
    "fixed_point_layer_norm": rule_fixed_point_layer_norm,
    "unflatten": rule_unflatten,
    # structural ops
    "reshape": rule_reshape, "squeeze": rule_reshape, "contiguous": rule_identity, "drop_path": rule_identity,
    "permute": rule_permute, "transpose": rule_permute, "getitem": rule_getitem, "split": rule_split,
    "size": rule_size, "cat": rule_cat, "stack": rule_cat, "mul": rule_mul, "fixed_point_mul": rule_fixed_point_mul,
    "sub": rule_sub, "fixed_point_batch_norm": rule_fixed_point_batch_norm, "pad": rule_pad,
    "interpolate": rule_interpolate, "write_back": rule_write_back, "roll": rule_roll,
    "relu6": rule_clip, "hardtanh": rule_clip, "clamp": rule_clip,
    "lookup": rule_lookup,
    "expand": rule_expand,
    "embedding": rule_embedding, "addmm": rule_addmm, "slice": rule_slice, "select": rule_select, "to": rule_to,
    "bookkeeping": rule_bookkeeping, "key_padding_mask": rule_key_padding_mask, "fill_masked": rule_fill_masked,
    "all_kept": rule_all_kept,
}

# Registered ops without a rule, and what lowering them would take.
UNSUPPORTED: dict[str, str] = {
    "conv1d": "a 1-d convolution rule (im2col over one axis) and its integer kernel",
    "conv3d": "a 3-d convolution rule and its integer kernel",
    "matmul": _UNREWRITTEN, "mm": _UNREWRITTEN, "bmm": _UNREWRITTEN, "einsum": _UNREWRITTEN,
    "softmax": _UNREWRITTEN, "layer_norm": _UNREWRITTEN,
    "max_pool1d": "a 1-d window maximum rule",
    "max_pool3d": "a 3-d window maximum rule",
    "batch_norm": "folding into the conv/linear before it (fold_bn); a stand-alone per-channel affine rule",
    "where": "a select rule: an attention mask added to scores lowers as the select passes.masks makes of it "
             "(fill_masked) when its condition is a constant for the example shape (a causal mask) or keeps the "
             "keys where a (batch, length) integer input is non-zero (a padding mask); other conditions and "
             "selects do not lower yet",
    **{name: "the lookup table compile() makes of it (passes.lookup_tables): an input cast of <= 16 bits and an "
             "output cast of its own" for name in ops.LOOKUP_OPS},
}


def op_key(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The registered op a node is (a key of :data:`RULES` or :data:`UNSUPPORTED`), or ``None``."""
    op = ops.op_of(gm, node)
    return None if op is None else op.name


def _label(gm, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return ir.OP.get(node) or getattr(node.target, "__name__", str(node.target))


def _unsupported(gm: fx.GraphModule) -> tuple[list[str], dict[str, str]]:
    """The nodes without an integer rule (``'name' (Op)``), and what each of their ops would take."""
    bad, needs = [], {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method") and op_key(gm, node) not in RULES:
            key, label = op_key(gm, node), _label(gm, node)
            hint = " (a batch norm lowers folded into a conv/linear whose output feeds nothing else, or stand-alone " \
                "with running statistics (track_running_stats=True) and a fixed-point output format)" \
                if key == "batch_norm" else ""
            if key in ops.LOOKUP_OPS:
                hint = f": {lookup_refusal(gm, node) or 'not made a lookup table: recompile'}"
            bad.append(f"{node.name!r} ({label}){hint}")
            needs.setdefault(label, UNSUPPORTED.get(key) or "an op registry entry (fxcompile.core.ops) and a rule")
    return bad, needs


def lower(gm: fx.GraphModule, example_inputs) -> IntegerGraph:
    """Lower ``gm`` (run :func:`fold_bn` first) to an :class:`IntegerGraph`.

    ``example_inputs`` fix every shape except the batch size.  Raises :class:`ExportError`
    listing every node whose op has no integer rule.
    """
    bad, needs = _unsupported(gm)
    if bad:
        raise ExportError(f"cannot lower {len(bad)} node(s) to integer arithmetic: {', '.join(bad)}. "
                          f"What each op would take: {'; '.join(f'{op}: {need}' for op, need in needs.items())}. "
                          f"Ops that lower: {', '.join(sorted(RULES))}; replace the others in the model "
                          "before exporting")
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        gm.train(was_training)
    lw, env, inputs, input_shapes, outputs = _Lowering(gm), {}, [], [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = tuple(node.meta["tensor_meta"].shape)
            integer = not node.meta["tensor_meta"].dtype.is_floating_point
            env[node] = Value(node.name, 0 if integer else None, None, shape)
            if integer:  # token ids, an attention mask: integers as they are
                lw.integer_inputs.append(node.name)
            if not inputs:
                lw.batch_source = env[node]  # a constant expanded over the batch takes its size
            inputs.append(node.name)
            input_shapes.append(shape)
        elif node.op == "get_attr":
            attr = ir.fetch(gm, node.target)
            env[node] = Value(const=attr.detach()) if isinstance(attr, torch.Tensor) else attr
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for r in results:
                v = env[r]
                if not isinstance(v, Value) or v.name is None or v.is_float:
                    raise ExportError(f"output {r!r} is not a fixed-point tensor; export needs a cast on every output")
                outputs.append(lw.emit(r, "dequantize", [v], v.frac, suffix="_output").name)
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            folded = fold_constant(gm, node, args, kwargs)
            if folded is None:
                folded = _evaluated(gm, node, args, kwargs)
            env[node] = folded if folded is not None else RULES[op_key(gm, node)](lw, node, *args, **kwargs)
    return IntegerGraph(inputs, input_shapes, lw.ops, outputs, lw.shapes, tuple(lw.integer_inputs))
