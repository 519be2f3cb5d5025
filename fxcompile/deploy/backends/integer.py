"""The integer reference executor: runs an :class:`IntegerGraph` on PyTorch int64 tensors.

Every op between ``quantize`` and ``dequantize`` is exact integer arithmetic (int64 sums of
int64 products, rounding shifts from :func:`fxcompile.deploy.lower.round_shift`), so the
result is bit-true by construction; it is the oracle the ONNX export is checked against.
Convs and linear layers sum in float64 instead when the bound of their sum fits float64's
53-bit significand (:func:`multiply_accumulate`: the same integers, many times faster on CPU
than PyTorch's int64 conv), and in int64 otherwise::

    >>> graph = lower(fold_bn(qmodel), (x,))
    >>> (y,) = run_integer(graph, x)                 # float32, like qmodel(x)
    >>> (codes,) = run_integer(graph, x, codes=True)  # int64 codes of the output format
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ...core import intmath, ops
from ...core.formats import FixedPoint
from ..lower import IntegerGraph, IntOp, round_shift, saturate

__all__ = ["run_integer", "KERNELS", "quantize_input", "count_non_finite", "non_finite_message",
           "multiply_accumulate", "accumulator_bound", "FLOAT64_BITS"]

FLOAT64_BITS = 53  # significand bits: every integer of magnitude below 2**53 is exact in float64


def quantize_input(x: torch.Tensor, fmt: FixedPoint) -> torch.Tensor:
    """Float → centred int64 codes of ``fmt``: scale by 2**frac, round, saturate or wrap.

    A register holds no NaN: NaN becomes code 0 and ±Inf the format's bounds (under ``wrap``
    too), as saturating float-to-fixed conversions in hardware do.
    """
    t = x.double() * 2.0 ** fmt.frac  # exact: a power-of-two scale of a float32
    t = {"nearest": torch.round, "floor": torch.floor, "toward_zero": torch.trunc}[fmt.rounding](t)
    t = torch.where(torch.isnan(t), 0.0, t)
    if fmt.overflow == "wrap":
        t = torch.where(torch.isinf(t), t.clamp(fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point), t)
    if fmt.overflow == "saturate":  # clamp in float first, so huge inputs cannot overflow int64
        return t.clamp(fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point).to(torch.int64)
    return saturate(t.to(torch.int64), fmt)


def _windows(x: torch.Tensor, kernel, stride, dilation=(1, 1)):
    """Strided views of ``x`` (N, C, H, W), one per kernel offset: the im2col of pooling."""
    n, c, h, w = x.shape
    ho = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield x[:, :, i * dilation[0]: i * dilation[0] + stride[0] * (ho - 1) + 1: stride[0],
                    j * dilation[1]: j * dilation[1] + stride[1] * (wo - 1) + 1: stride[1]]


def _max_pool2d(op: IntOp, x):
    ph, pw = op.attrs["padding"]
    if ph or pw:  # padding never wins a max: pad with the smallest int64
        x = F.pad(x, (pw, pw, ph, ph), value=torch.iinfo(torch.int64).min)
    out = None
    for win in _windows(x, op.attrs["kernel"], op.attrs["stride"], op.attrs["dilation"]):
        out = win.clone() if out is None else torch.maximum(out, win)
    bias = op.attrs.get("bias")  # a conv's bias moved behind the pool (fxcompile.deploy.optimize)
    return out if bias is None else out + bias.reshape(-1, 1, 1)


def _sum_pool2d(op: IntOp, x):
    return sum(_windows(x, op.attrs["kernel"], op.attrs["stride"]))


def _adaptive_sum_pool2d(op: IntOp, x):
    """``rows · x · colsᵀ`` with 0/1 matrices marking each window (int64: exact)."""
    rows = torch.zeros(len(op.attrs["rows"]), x.shape[-2], dtype=torch.int64)
    cols = torch.zeros(len(op.attrs["cols"]), x.shape[-1], dtype=torch.int64)
    for m, windows in ((rows, op.attrs["rows"]), (cols, op.attrs["cols"])):
        for i, (s, e) in enumerate(windows):
            m[i, s:e] = 1
    return rows @ x @ cols.T


def _requantize(op: IntOp, x):
    out = saturate(round_shift(x, op.attrs["shift"], op.attrs["fmt"].rounding), op.attrs["fmt"])
    out = out.clamp_min(0) if op.attrs.get("relu") else out  # a ReLU folded in (fxcompile.deploy.optimize)
    return out.clamp(*op.attrs["clamp"]) if "clamp" in op.attrs else out  # a clip folded in


def _add(op: IntOp, a, b):
    sa, sb = op.attrs["shifts"]
    return (a << sa) - (b << sb) if op.attrs.get("subtract") else (a << sa) + (b << sb)


def _reshape(op: IntOp, x):
    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(op.attrs["shape"])]
    return x.reshape(shape)


def _slice(op: IntOp, x):
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(op.attrs["starts"], op.attrs["ends"], op.attrs["axes"], op.attrs["steps"]):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _affine(op: IntOp, x):
    shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel: axis 1
    return x * op.attrs["scale"].view(shape) + op.attrs["offset"].view(shape)


def _upsample(op: IntOp, x):
    fh, fw = op.attrs["factors"]
    return x.repeat_interleave(fh, -2).repeat_interleave(fw, -1)


def _clip(op: IntOp, x):
    return (x << op.attrs["shift"]).clamp(op.attrs["lo"], op.attrs["hi"])


def _lookup(op: IntOp, x):
    # the simulation clamps indices into the table too (fxcompile.core.nonlinear): both index alike
    table = op.attrs["table"]
    return table[(x - op.attrs["offset"]).clamp(0, len(table) - 1)]


def _select(op: IntOp, x, *keep):
    """The codes where the input condition and the constant one (either may be absent) keep them."""
    cond = op.attrs.get("condition")
    if keep:
        cond = keep[0].bool() if cond is None else keep[0].bool() & cond
    return torch.where(cond, x << op.attrs["shift"], op.attrs["fill"])


def accumulator_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """An upper bound on every partial sum a conv/linear of the codes ``x`` with ``weight``
    (output channels or features first) and ``bias`` can form, in any order: the largest
    ``|x|`` times the largest sum of ``|w|`` over one output's fan-in, plus the largest
    ``|bias|``.  Each product is bounded by it too.  Python integers: no overflow."""
    if x.numel() == 0 or weight.numel() == 0:
        return 0
    largest = int(x.abs().max()) * int(weight.abs().reshape(len(weight), -1).sum(1).max())
    return largest + (int(bias.abs().max()) if bias is not None and bias.numel() else 0)


def multiply_accumulate(float_op: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        *args) -> torch.Tensor:
    """``float_op`` (``F.conv2d``, ``F.linear``) on int64 codes, exactly, as int64.

    When :func:`accumulator_bound` has at most 53 bits every product and partial sum is an
    integer float64 holds exactly, so float64 arithmetic (BLAS) gives the exact sum whatever
    its order; beyond that the sum is taken in int64 (``float_op`` on the int64 tensors)."""
    if accumulator_bound(x, weight, bias).bit_length() <= FLOAT64_BITS:
        float64_op = ops.conv2d_float64 if float_op is F.conv2d else float_op
        return float64_op(x.double(), weight.double(), None if bias is None else bias.double(), *args).to(torch.int64)
    return float_op(x, weight, bias, *args)


def _conv2d(op: IntOp, x):
    return multiply_accumulate(F.conv2d, x, op.attrs["weight"], op.attrs["bias"], op.attrs["stride"],
                               op.attrs["padding"], op.attrs["dilation"], op.attrs.get("groups", 1))


KERNELS: dict[str, Callable] = {
    "quantize": lambda op, x: quantize_input(x, op.attrs["fmt"]),
    "requantize": _requantize,
    "conv2d": _conv2d,
    "linear": lambda op, x: multiply_accumulate(F.linear, x, op.attrs["weight"], op.attrs["bias"]),
    "relu": lambda op, x: x.clamp_min(0),
    "max_pool2d": _max_pool2d,
    "sum_pool2d": _sum_pool2d,
    "adaptive_sum_pool2d": _adaptive_sum_pool2d,
    "scale": lambda op, x: x * op.attrs["factor"],
    "add": _add,
    "reshape": _reshape,
    "clip": _clip,
    "lookup": _lookup,
    "dequantize": lambda op, x: (x.double() * 2.0 ** -op.frac).float(),
    "matmul": lambda op, a, b: ops.matmul_product(a, b, op.attrs["perms"]),
    "softmax": lambda op, x: intmath.softmax_codes(x, op.attrs["table"], op.frac, op.attrs["rounding"]),
    "layer_norm": lambda op, x: intmath.layer_norm_codes(x, op.attrs["plan"], op.attrs["weight"], op.attrs["bias"]),
    "transpose": lambda op, x: x.permute(op.attrs["perm"]),
    "slice": _slice,
    "concat": lambda op, *xs: torch.cat([x << s for x, s in zip(xs, op.attrs["shifts"])], op.attrs["axis"]),
    "mul": lambda op, a, b: a * b,
    "affine": _affine,
    "pad": lambda op, x: F.pad(x, op.attrs["pads"], value=op.attrs.get("value", 0)),
    "upsample": _upsample,
    "constant": lambda op: op.attrs["value"],
    "expand": lambda op, x, like: x.expand(like.shape[0], *op.attrs["shape"][1:]),
    "gather": lambda op, ids: F.embedding(ids.long(), op.attrs["table"]),
    "padding_mask": lambda op, mask: (mask != 0).to(torch.int64)[:, None, None, :],
    "select": _select,
}


def count_non_finite(x: torch.Tensor) -> dict:
    """How many elements of ``x`` are NaN, +Inf and -Inf, and how many samples (rows of dim 0) hold any."""
    x = torch.as_tensor(x)
    bad = ~torch.isfinite(x)
    return {"nan": int(torch.isnan(x).sum()), "posinf": int((x == float("inf")).sum()),
            "neginf": int((x == float("-inf")).sum()),
            "samples": int(bad.reshape(len(x), -1).any(1).sum()) if x.dim() else int(bad)}


def non_finite_message(name: str, counts: dict) -> str:
    """One line saying what the deployed input quantizer does with the non-finite inputs counted."""
    return (f"input {name!r}: {counts['nan']} NaN, {counts['posinf']} +Inf, {counts['neginf']} -Inf values in "
            f"{counts['samples']} sample(s); the input quantizer maps NaN to 0 and ±Inf to its format's bounds")


def run_integer(graph: IntegerGraph, *inputs: torch.Tensor, codes: bool = False) -> list[torch.Tensor]:
    """Run ``graph`` on float inputs; float32 outputs, or their int64 codes with ``codes=True``.

    Non-finite inputs are counted and reported in one :class:`UserWarning` per input (see
    :func:`quantize_input` for what they become).
    """
    for name, x in zip(graph.inputs, inputs):
        counts = count_non_finite(x)
        if counts["samples"]:
            warnings.warn(non_finite_message(name, counts), stacklevel=2)
    env = dict(zip(graph.inputs, inputs))
    for op in graph.ops:
        if codes and op.op == "dequantize":
            env[op.out] = env[op.inputs[0]]
            continue
        env[op.out] = KERNELS[op.op](op, *(env[i] for i in op.inputs))
    return [env[o] for o in graph.outputs]
