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
  rounds the exact product once — the definition training ran (``passes.averages``),
* ``add``: both operands shifted left to the larger binary point, then added,
* ``clip``: ReLU6, Hardtanh and clamp/clip with constant bounds: the codes shifted left
  (exactly) to the output cast's binary point if that is finer, then clamped to the bounds
  rounded by the output cast's rounding onto its grid (see :func:`rule_clip`),
* ``lookup``: sigmoid, tanh, SiLU, GELU, Hardswish, Hardsigmoid, LeakyReLU, ELU, Mish: a table
  of output codes indexed by input code (``passes.lookup_tables`` made training run it),
* ``dequantize`` codes → float32 at the outputs.

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

from ..core import ir, nonlinear, ops
from ..errors import ExportError
from ..core.formats import FixedPoint
from ..passes.averages import average_arguments
from ..passes.casts import Cast
from ..passes.lookup_tables import lookup_arguments, lookup_refusal

__all__ = ["CONTRACT", "IntOp", "IntegerGraph", "Value", "lower", "RULES", "UNSUPPORTED", "op_key", "op_arguments", "pair",
           "MAX_SHIFT"]

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

    def emit(self, node: fx.Node, op: str, inputs, frac: int, bounds=None, suffix: str = "", **attrs) -> Value:
        out = node.name + suffix
        shape = tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
        for v in inputs:
            if v.name is None:
                raise ExportError(f"node {node.name!r} ({op}): operand is a constant; only parameters of "
                                  "conv/linear may be constants in the integer graph")
        self.ops.append(IntOp(op, out, tuple(v.name for v in inputs), frac, bounds, attrs, node.name))
        self.shapes[out] = shape
        return Value(out, frac, bounds, shape)


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
    if x.const is not None:
        return Value(None, fmt.frac, fmt, tuple(x.const.shape), _const_codes(x.const, fmt))
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


def rule_conv2d(lw, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    if groups != 1 or isinstance(padding, str):
        raise ExportError(f"node {node.name!r} (conv2d): only groups=1 and numeric padding lower to integer "
                          f"MatMul (got groups={groups}, padding={padding!r})")
    return _weighted(lw, node, x, w, b, "conv2d", stride=pair(stride), padding=pair(padding),
                     dilation=pair(dilation))


def rule_linear(lw, node, x, w, b=None):
    return _weighted(lw, node, x, w, b, "linear")


def rule_relu(lw, node, x, *args, **kwargs):
    x = _operand(node, x)
    fmt = x.fmt if x.fmt is not None and x.fmt.min_value <= 0 <= x.fmt.max_value else None
    return lw.emit(node, "relu", [x], x.frac, fmt)


def rule_max_pool2d(lw, node, x, *args, **kwargs):
    p = op_arguments(lw.gm, node, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    if p["ceil_mode"] or p["return_indices"]:
        raise ExportError(f"node {node.name!r} (max_pool2d): ceil_mode and return_indices do not lower")
    x = _operand(node, x)
    k = pair(p["kernel_size"])
    return lw.emit(node, "max_pool2d", [x], x.frac, x.fmt, kernel=k, stride=pair(p["stride"] or k),
                   padding=pair(p["padding"]), dilation=pair(p["dilation"]))


def rule_avg_pool2d(lw, node, x, *args, **kwargs):
    p = op_arguments(lw.gm, node, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"),
                   {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                    "divisor_override": None})
    x = _operand(node, x)
    k = pair(p["kernel_size"])
    divisor = p["divisor_override"] or k[0] * k[1]
    if pair(p["padding"]) != (0, 0) or p["ceil_mode"] or divisor & (divisor - 1):
        raise ExportError(f"node {node.name!r} (avg_pool2d): lowers only without padding or ceil_mode and with a "
                          f"power-of-two divisor (got kernel {k}, divisor {divisor}, padding {p['padding']})")
    return lw.emit(node, "sum_pool2d", [x], x.frac + int(math.log2(divisor)), kernel=k,
                   stride=pair(p["stride"] or k))


def _average(lw: _Lowering, node: fx.Node, x: Value, output_size, squeeze: bool, spec=None) -> Value:
    x = _operand(node, x)
    name = ops.op_of(lw.gm, node).name
    windows = ops.average_windows(x.shape, output_size)
    if windows is None:
        raise ExportError(f"node {node.name!r} ({name}): averaging {tuple(x.shape[-2:])} to {output_size} has "
                          "uneven windows, which have no single fixed-point divisor; use an output size that "
                          "divides the input size")
    kernel, n = windows
    c, r = ops.reciprocal(n)
    if c != 1:
        casts = [u for u in node.users if u.op == "call_module" and ir.EDGE.has(u)]
        fmt = lw.gm.get_submodule(casts[0].target).edge.forward if len(node.users) == 1 == len(casts) else None
        if spec is None or fmt is None or fmt.spec() != list(spec):
            raise ExportError(f"node {node.name!r} ({name}): an average over {n} values (not a power of two) "
                              "deploys only as the fixed-point average compile() makes of it, rounded by the "
                              "format of the one cast after it; give its output a single consumer and a "
                              "fixed-point format, and recompile after changing that format")
    shape = x.shape[:2] + (x.shape[2] // kernel[0], x.shape[3] // kernel[1])
    v = lw.emit(node, "sum_pool2d", [x], x.frac + (r if c == 1 else 0), suffix="_sum", kernel=kernel, stride=kernel)
    if c != 1:
        v = lw.emit(node, "scale", [v], x.frac + r, suffix="_scaled", factor=c)
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
    if args or kwargs.get("alpha", 1) != 1:
        raise ExportError(f"node {node.name!r} (add): only a + b lowers (no alpha)")
    a, b = _operand(node, a), _operand(node, b)
    frac = max(a.frac, b.frac)
    return lw.emit(node, "add", [a, b], frac, shifts=(frac - a.frac, frac - b.frac))


def rule_identity(lw, node, x, *args, **kwargs):
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
    "flatten": rule_flatten,
    "add": rule_add,
    "identity": rule_identity,
    "dropout": rule_identity,  # deployment is inference: dropout is the identity
    "relu6": rule_clip, "hardtanh": rule_clip, "clamp": rule_clip,
    "lookup": rule_lookup,
}

# Registered ops without a rule, and what lowering them would take.
UNSUPPORTED: dict[str, str] = {
    "conv1d": "a 1-d convolution rule (im2col over one axis) and its integer kernel",
    "conv3d": "a 3-d convolution rule and its integer kernel",
    "matmul": "a rule for products of two activations (wide accumulation, then requantize)",
    "mm": "a rule for products of two activations (wide accumulation, then requantize)",
    "bmm": "a rule for batched products of two activations (wide accumulation, then requantize)",
    "max_pool1d": "a 1-d window maximum rule",
    "max_pool3d": "a 3-d window maximum rule",
    "reshape": "a rule that checks the batch dimension stays first and free",
    "sub": "a rule like add's with the second operand negated",
    "cat": "a rule aligning the operands' binary points before the concatenation",
    "stack": "a rule aligning the operands' binary points before stacking",
    "batch_norm": "folding into the conv/linear before it (fold_bn); a stand-alone per-channel affine rule",
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
            hint = " (batch norm folds only into a conv/linear whose output feeds nothing else)" \
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
            env[node] = Value(node.name, None, None, shape)
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
            env[node] = RULES[op_key(gm, node)](lw, node, *args, **kwargs)
    return IntegerGraph(inputs, input_shapes, lw.ops, outputs, lw.shapes)
