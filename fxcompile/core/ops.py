"""The op registry: every op fxcompile knows, declared once.

An :class:`Op` says how ``torch.fx`` nodes map to it (module classes, functions, tensor
methods, ATen overload packets of ``torch.export`` graphs) and its :data:`group`, which is
what the passes reason with (``elide_casts`` skips casts after format-preserving ops, the cost
model aligns the binary points of an adder's operands, the hardware summary counts
multiply-accumulates).  Each backend keeps its own table keyed by op name — the lowering
rules (:data:`fxcompile.deploy.lower.RULES`), the QDQ/QONNX float ops
(:data:`fxcompile.deploy.backends.qdq.FLOAT_OPS`) — with every op it does not handle listed,
with the reason, in its ``UNSUPPORTED`` table; ``tests/core/test_ops.py`` checks each table
covers the registry.  The integer graph's own ops (:data:`INTEGER_OPS`) are covered the same
way by the integer executor, the ONNX emitters and the hls4ml handoff.  Adding an op means
one entry here, its function in each backend, and their tests::

    >>> op_of(gm, node).name, op_of(gm, node).group
    ('conv2d', 'multiply_accumulate')

The module also holds the functions the IR's nodes call that are fxcompile's own:
:func:`batch_norm` and :func:`call_with_parameters` (written by ``expose_params``), and
:func:`fixed_point_average` (written by ``passes.averages``), whose reciprocal is
:func:`reciprocal`, and :func:`lookup` (written by ``passes.lookup_tables``; defined with the
clips' bounds in :mod:`fxcompile.core.nonlinear`).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ir
from .nonlinear import lookup
from .quantizer import quantize_reference

__all__ = ["Op", "OPS", "GROUPS", "INTEGER_OPS", "op_of", "ops_in", "batch_norm", "call_with_parameters",
           "fixed_point_average", "reciprocal", "average_windows", "RECIPROCAL_BITS", "lookup", "CLIP_OPS",
           "LOOKUP_OPS"]

GROUPS = {
    "cast": "the fixed-point cast on an edge",
    "format_preserving": "maps values of any fixed-point format to values of that format, bounds to bounds",
    "shape": "moves values without changing them (and so preserves formats)",
    "adder": "operands meet in one adder or one tensor and must share a binary point",
    "multiply_accumulate": "sums of products: the wide-accumulator ops",
    "elementwise": "an elementwise function of one value",
    "reduction": "sums (and averages) over some dimensions",
    "normalization": "a per-channel affine map from statistics",
}


def batch_norm(x, module: nn.modules.batchnorm._BatchNorm, weight, bias):
    """``module(x)`` with the given affine parameters; follows ``module.training`` at run time."""
    training = module.training or module.running_mean is None
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    return F.batch_norm(x, module.running_mean if not module.training or module.track_running_stats else None,
                        module.running_var if not module.training or module.track_running_stats else None,
                        weight, bias, training, momentum, module.eps)


def call_with_parameters(module: nn.Module, names: tuple, params: tuple, *args, **kwargs):
    """Call ``module`` with its parameters ``names`` replaced by ``params`` (the casted values)."""
    return torch.func.functional_call(module, dict(zip(names, params)), args, kwargs, strict=False)


RECIPROCAL_BITS = 16  # significant bits of 1/n for a divisor n that is not a power of two


def reciprocal(n: int) -> tuple[int, int]:
    """``1/n`` in fixed point: ``(c, r)`` with ``c · 2**-r`` the reciprocal.

    A power of two is exact (``c = 1``); otherwise ``c = round(2**r / n)`` has
    :data:`RECIPROCAL_BITS` significant bits (``r = 15 + n.bit_length()``, so
    ``2**15 < c < 2**16``; no ties occur, since ``2**(r+1) / n`` is never an odd integer)::

        >>> reciprocal(49)
        (42799, 21)
    """
    if n < 1:
        raise ValueError(f"an average needs a positive divisor, got {n}")
    if n & (n - 1) == 0:
        return 1, n.bit_length() - 1
    r = RECIPROCAL_BITS - 1 + n.bit_length()
    return ((1 << (r + 1)) + n) // (2 * n), r


def average_windows(shape, output_size) -> tuple[tuple[int, int], int] | None:
    """The uniform window (kernel = stride) of an adaptive average over the last two dims of
    ``shape`` to ``output_size``, and its divisor; ``None`` when the windows are uneven."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = shape[-2:]
    oh, ow = h if oh is None else oh, w if ow is None else ow
    if h % oh or w % ow:
        return None
    return (h // oh, w // ow), (h // oh) * (w // ow)


class _FixedPointAverage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, n, spec):
        c, r = reciprocal(n)
        # exact in float64: window sums of codes times c stay below 2**53 for inputs of up to
        # 24 bits and windows of up to 2**13 elements
        total = F.avg_pool2d(x.double(), kernel, kernel, divisor_override=1)
        y = quantize_reference(total * c * 2.0 ** -r, spec)  # the one rounding: the output format's
        ctx.kernel, ctx.n = kernel, n
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # the float derivative of the average; the output cast after this op has already
        # zeroed the gradient where it saturated, and the input cast rounds what this returns
        # (the windows tile the input: uniform windows are exactly what this op runs)
        up = grad.repeat_interleave(ctx.kernel[0], -2).repeat_interleave(ctx.kernel[1], -1) / ctx.n
        return up, None, None, None


def fixed_point_average(x: torch.Tensor, output_size, squeeze: bool, spec: list) -> torch.Tensor:
    """The average over windows of the last two dims of ``x`` as deployed: an adaptive average
    pool to ``output_size`` (a global average is ``(1, 1)``; ``squeeze`` drops those dims, as
    ``mean(dim=(2, 3))`` does; only with ``(1, 1)``), rounded to the format ``spec`` of the
    cast after it.

    The fixed-point definition, shared with the integer graph: each window's sum of input
    values times the :func:`reciprocal` ``c · 2**-r`` of its size, computed exactly, then
    rounded once with ``spec``'s rounding and overflow.  Uneven windows (an output size
    not dividing the input) have no such definition: they average in float, and export
    refuses them.  The backward is the float average's derivative.
    """
    if x.dim() != 4:
        raise ValueError(f"fixed_point_average: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    windows = average_windows(x.shape, output_size)
    if windows is None:
        y = F.adaptive_avg_pool2d(x, output_size)
    else:
        y = _FixedPointAverage.apply(x, *windows, list(spec))
    return y[..., 0, 0] if squeeze else y


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: its name, group, and the fx node targets that are it."""

    name: str
    group: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()  # overload packet names in torch.export graphs

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"op {self.name!r}: unknown group {self.group!r}; groups are {sorted(GROUPS)}")


_DECLARED = [
    Op("cast", "cast"),  # a call of a Cast module: recognised by the edge it carries (ir.EDGE)
    Op("conv1d", "multiply_accumulate", (nn.Conv1d,), (F.conv1d, torch.conv1d), (), ("conv1d",)),
    Op("conv2d", "multiply_accumulate", (nn.Conv2d,), (F.conv2d, torch.conv2d), (), ("conv2d",)),
    Op("conv3d", "multiply_accumulate", (nn.Conv3d,), (F.conv3d, torch.conv3d), (), ("conv3d",)),
    Op("linear", "multiply_accumulate", (nn.Linear,), (F.linear,), (), ("linear",)),
    Op("matmul", "multiply_accumulate", (), (torch.matmul, operator.matmul), ("matmul",), ("matmul",)),
    Op("mm", "multiply_accumulate", (), (torch.mm,), ("mm",), ("mm",)),
    Op("bmm", "multiply_accumulate", (), (torch.bmm,), ("bmm",), ("bmm",)),
    Op("relu", "format_preserving", (nn.ReLU,), (F.relu, torch.relu), ("relu",), ("relu",)),
    Op("max_pool1d", "format_preserving", (nn.MaxPool1d,), (F.max_pool1d, torch.max_pool1d), (), ("max_pool1d",)),
    Op("max_pool2d", "format_preserving", (nn.MaxPool2d,), (F.max_pool2d, torch.max_pool2d), (), ("max_pool2d",)),
    Op("max_pool3d", "format_preserving", (nn.MaxPool3d,), (F.max_pool3d, torch.max_pool3d), (), ("max_pool3d",)),
    Op("identity", "format_preserving", (nn.Identity,)),
    Op("flatten", "shape", (nn.Flatten,), (torch.flatten,), ("flatten",), ("flatten",)),
    Op("reshape", "shape", (), (torch.reshape,), ("view", "reshape"), ("view", "reshape")),
    Op("add", "adder", (), (operator.add, operator.iadd, torch.add), ("add", "add_"), ("add", "add_")),
    Op("sub", "adder", (), (operator.sub, operator.isub, torch.sub), ("sub", "sub_"), ("sub", "sub_")),
    Op("cat", "adder", (), (torch.cat, torch.concat, torch.concatenate), (), ("cat", "concat")),
    Op("stack", "adder", (), (torch.stack,), (), ("stack",)),
    Op("avg_pool2d", "reduction", (nn.AvgPool2d,), (F.avg_pool2d,), (), ("avg_pool2d",)),
    Op("adaptive_avg_pool2d", "reduction", (nn.AdaptiveAvgPool2d,), (F.adaptive_avg_pool2d,), (),
       ("adaptive_avg_pool2d", "_adaptive_avg_pool2d")),
    Op("mean", "reduction", (), (torch.mean,), ("mean",), ("mean",)),
    Op("fixed_point_average", "reduction", (), (fixed_point_average,)),  # written by passes.averages
    Op("dropout", "elementwise", (nn.Dropout,), (F.dropout,), (), ("dropout",)),  # the identity at eval time
    Op("batch_norm", "normalization", (), (batch_norm,)),
    # elementwise nonlinearities (fxcompile.core.nonlinear): clips on codes, tables for the rest
    Op("relu6", "format_preserving", (nn.ReLU6,), (F.relu6,), (), ("relu6",)),
    Op("hardtanh", "format_preserving", (nn.Hardtanh,), (F.hardtanh,), (), ("hardtanh",)),
    Op("clamp", "format_preserving", (), (torch.clamp, torch.clip), ("clamp", "clip"), ("clamp", "clip")),
    Op("sigmoid", "elementwise", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",), ("sigmoid",)),
    Op("tanh", "elementwise", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",), ("tanh",)),
    Op("silu", "elementwise", (nn.SiLU,), (F.silu,), (), ("silu",)),
    Op("gelu", "elementwise", (nn.GELU,), (F.gelu,), (), ("gelu",)),
    Op("hardswish", "elementwise", (nn.Hardswish,), (F.hardswish,), (), ("hardswish",)),
    Op("hardsigmoid", "elementwise", (nn.Hardsigmoid,), (F.hardsigmoid,), (), ("hardsigmoid",)),
    Op("leaky_relu", "elementwise", (nn.LeakyReLU,), (F.leaky_relu,), (), ("leaky_relu",)),
    Op("elu", "elementwise", (nn.ELU,), (F.elu,), (), ("elu",)),
    Op("mish", "elementwise", (nn.Mish,), (F.mish,), (), ("mish",)),
    Op("lookup", "elementwise", (), (lookup,)),  # written by passes.lookup_tables
]

CLIP_OPS = ("relu6", "hardtanh", "clamp")  # exact on codes: a clamp to the bounds
LOOKUP_OPS = ("sigmoid", "tanh", "silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish")

OPS: dict[str, Op] = {op.name: op for op in _DECLARED}
_BY_MODULE = {m: op for op in _DECLARED for m in op.modules}
_BY_FUNCTION = {f: op for op in _DECLARED for f in op.functions}
_BY_METHOD = {m: op for op in _DECLARED for m in op.methods}
_BY_ATEN = {a: op for op in _DECLARED for a in op.aten}

INTEGER_OPS = {
    "quantize": "float input -> codes of the input edge's format",
    "requantize": "codes at one binary point -> codes of a format: rounding shift, then saturate or wrap",
    "conv2d": "int64 sums of products of input and weight codes, plus aligned bias codes",
    "linear": "int64 sums of products of input and weight codes, plus aligned bias codes",
    "relu": "max(codes, 0)",
    "clip": "codes shifted left (exactly) to a finer binary point, then clamped to constant bounds",
    "lookup": "a table of output codes indexed by input code minus the smallest input code",
    "max_pool2d": "window maxima of codes",
    "sum_pool2d": "window sums of codes (a power-of-two average with the binary point moved)",
    "scale": "codes times an integer constant (an average's fixed-point reciprocal), binary point moved",
    "add": "operands shifted to the larger binary point, then added",
    "reshape": "the same codes in another shape",
    "dequantize": "codes -> float32 at an output",
}


def op_of(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """The registered op ``node`` is, or ``None``."""
    if node.op == "call_module":
        if ir.EDGE.has(node):
            return OPS["cast"]
        return _BY_MODULE.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return _BY_ATEN.get(node.target.overloadpacket.__name__)
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def ops_in(*groups: str) -> set[str]:
    """Names of the ops in ``groups``."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown op group(s) {sorted(unknown)}; groups are {sorted(GROUPS)}")
    return {op.name for op in _DECLARED if op.group in groups}
