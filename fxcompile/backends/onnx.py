"""ONNX backend: an :class:`IntegerGraph` as an ONNX model of int64 ops.

Between the input quantizer and the output dequantizers every tensor is int64 and every op
has an int64 kernel on ONNX Runtime's CPU provider, so ORT reproduces the integer reference
(:mod:`fxcompile.backends.integer`) bit for bit.  ORT's integer support shapes the lowering:

* Conv is float-only and ConvInteger 8-bit only, so a convolution is im2col (Pad, one
  strided Slice per kernel offset, Concat) followed by an int64 MatMul;
* integer Div truncates toward zero and BitShift is unsigned, so a rounding right shift by
  ``s`` bits is ``r = Mod(v, 2**s)`` (non-negative remainder), ``q = (v − r) / 2**s`` (exact
  floor), and for ties to even ``q + (r + (q mod 2) + 2**(s−1) − 1) / 2**s``, all int64;
* Relu has no int64 kernel: ``Max(v, 0)``; saturation is an int64 ``Clip``; wrap is ``Mod``;
  MaxPool is float-only: ``Max`` over the kernel-offset slices; a power-of-two average pool
  is a sum of slices.

Node names start with the op they lower (``quantize/…``, ``conv2d/…``, ``dequantize/…``).
Each graph output ``output`` (``output_<i>`` if several; float32) comes with ``output_codes``
(its int64 codes)::

    >>> model = to_onnx(lower(fold_bn(qmodel), (x,)))
    >>> onnx.checker.check_model(model, full_check=True)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..formats import FixedPoint
from ..passes.lower import IntegerGraph, IntOp

__all__ = ["to_onnx", "EMITTERS", "OPSET"]

OPSET = 17
INT64_MIN = np.iinfo(np.int64).min


class _Builder:
    def __init__(self):
        self.nodes, self.initializers, self._consts, self._count = [], [], {}, 0
        self.prefix = "graph"

    def node(self, op_type: str, inputs, **attrs) -> str:
        self._count += 1
        out = f"{self.prefix}/{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        array = np.asarray(value, dtype=dtype)
        key = None if name else (array.dtype.str, array.shape, array.tobytes())
        if key is not None and key in self._consts:
            return self._consts[key]
        name = name or f"const/{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._consts[key] = name
        return name


def _wide(fmt: FixedPoint) -> bool:
    # float32 holds every code exactly only below 2**24 (the simulation switches to float64 too)
    return fmt.code_max - fmt.code_min >= 1 << 24


def _saturate(b: _Builder, t: str, fmt: FixedPoint) -> str:
    zp, lo, hi = fmt.zero_point, fmt.code_min, fmt.code_max
    if fmt.overflow == "saturate":
        return b.node("Clip", [t, b.const(lo - zp), b.const(hi - zp)])
    wrapped = b.node("Mod", [b.node("Add", [t, b.const(zp - lo)]), b.const(hi - lo + 1)], fmod=0)
    return b.node("Add", [wrapped, b.const(lo - zp)])


def emit_quantize(b: _Builder, op: IntOp, x: str) -> str:
    fmt: FixedPoint = op.attrs["fmt"]
    ftype = np.float64 if _wide(fmt) else np.float32
    if _wide(fmt):
        x = b.node("Cast", [x], to=TensorProto.DOUBLE)
    t = b.node("Mul", [x, b.const(2.0 ** fmt.frac, ftype)])  # exact: a power of two
    if fmt.rounding == "nearest":
        t = b.node("Round", [t])  # ties to even
    elif fmt.rounding == "floor":
        t = b.node("Floor", [t])
    # toward_zero: the float → int Cast below truncates
    if fmt.overflow == "saturate":  # clamp in float: huge inputs must not overflow the int cast
        t = b.node("Clip", [t, b.const(fmt.code_min - fmt.zero_point, ftype),
                            b.const(fmt.code_max - fmt.zero_point, ftype)])
        return b.node("Cast", [t], to=TensorProto.INT64)
    return _saturate(b, b.node("Cast", [t], to=TensorProto.INT64), fmt)


def emit_requantize(b: _Builder, op: IntOp, v: str) -> str:
    fmt: FixedPoint = op.attrs["fmt"]
    shift = op.attrs["shift"]
    if shift < 0:
        t = b.node("Mul", [v, b.const(1 << -shift)])
    elif shift == 0:
        t = v
    elif fmt.rounding == "toward_zero":
        t = b.node("Div", [v, b.const(1 << shift)])  # int Div truncates toward zero
    else:
        d = b.const(1 << shift)
        r = b.node("Mod", [v, d], fmod=0)  # 0 <= r < d
        q = b.node("Div", [b.node("Sub", [v, r]), d])  # exact: floor(v / d)
        if fmt.rounding == "floor":
            t = q
        else:  # nearest, ties to even: round up when r > d/2, or r == d/2 and q is odd
            odd = b.node("Mod", [q, b.const(2)], fmod=0)
            bump = b.node("Add", [b.node("Add", [r, odd]), b.const((1 << (shift - 1)) - 1)])
            t = b.node("Add", [q, b.node("Div", [bump, d])])
    return _saturate(b, t, fmt)


def emit_dequantize(b: _Builder, op: IntOp, v: str) -> str:
    t = b.node("Mul", [b.node("Cast", [v], to=TensorProto.DOUBLE), b.const(2.0 ** -op.frac, np.float64)])
    return b.node("Cast", [t], to=TensorProto.FLOAT)


def _out_size(size, k, s, d=1):
    return (size - d * (k - 1) - 1) // s + 1


def _slices(b: _Builder, x: str, shape, kernel, stride, dilation=(1, 1)) -> list[str]:
    """One strided slice of ``x`` (N, C, H, W) per kernel offset."""
    ho, wo = (_out_size(shape[2], kernel[0], stride[0], dilation[0]),
              _out_size(shape[3], kernel[1], stride[1], dilation[1]))
    out = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            starts = [i * dilation[0], j * dilation[1]]
            ends = [starts[0] + stride[0] * (ho - 1) + 1, starts[1] + stride[1] * (wo - 1) + 1]
            out.append(b.node("Slice", [x, b.const(starts), b.const(ends), b.const([2, 3]), b.const(list(stride))]))
    return out


def _pad(b: _Builder, x: str, padding, value: int = 0) -> tuple[str, bool]:
    ph, pw = padding
    if not (ph or pw):
        return x, False
    return b.node("Pad", [x, b.const([0, 0, ph, pw, 0, 0, ph, pw]), b.const(value)]), True


def emit_conv2d(b: _Builder, op: IntOp, x: str, shapes) -> str:
    weight, bias = op.attrs["weight"].numpy(), op.attrs["bias"]
    o, c, kh, kw = weight.shape
    n, _, h, w = shapes[op.inputs[0]]
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    xp, _ = _pad(b, x, (ph, pw))
    cols = _slices(b, xp, (n, c, h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
    ho, wo = _out_size(h + 2 * ph, kh, stride[0], dil[0]), _out_size(w + 2 * pw, kw, stride[1], dil[1])
    if len(cols) > 1:  # (N, C, K, Ho, Wo): rows ordered (c, kh, kw) like the weight
        cols = [b.node("Concat", [b.node("Unsqueeze", [s, b.const([2])]) for s in cols], axis=2)]
    cols = b.node("Reshape", [cols[0], b.const([0, c * kh * kw, ho * wo])])
    acc = b.node("MatMul", [b.const(weight.reshape(o, c * kh * kw), name=f"{op.out}.weight"), cols])
    if bias is not None:
        acc = b.node("Add", [acc, b.const(bias.numpy().reshape(o, 1), name=f"{op.out}.bias")])
    return b.node("Reshape", [acc, b.const([0, o, ho, wo])])


def emit_linear(b: _Builder, op: IntOp, x: str) -> str:
    acc = b.node("MatMul", [x, b.const(op.attrs["weight"].numpy().T.copy(), name=f"{op.out}.weight")])
    if op.attrs["bias"] is not None:
        acc = b.node("Add", [acc, b.const(op.attrs["bias"].numpy(), name=f"{op.out}.bias")])
    return acc


def emit_max_pool2d(b: _Builder, op: IntOp, x: str, shapes) -> str:
    n, c, h, w = shapes[op.inputs[0]]
    ph, pw = op.attrs["padding"]
    xp, _ = _pad(b, x, (ph, pw), INT64_MIN)  # padding never wins a max
    wins = _slices(b, xp, (n, c, h + 2 * ph, w + 2 * pw), op.attrs["kernel"], op.attrs["stride"],
                   op.attrs["dilation"])
    return b.node("Max", wins) if len(wins) > 1 else wins[0]


def emit_sum_pool2d(b: _Builder, op: IntOp, x: str, shapes) -> str:
    wins = _slices(b, x, shapes[op.inputs[0]], op.attrs["kernel"], op.attrs["stride"])
    total = wins[0]
    for win in wins[1:]:  # Sum has no int64 kernel
        total = b.node("Add", [total, win])
    return total


def emit_add(b: _Builder, op: IntOp, x: str, y: str) -> str:
    sx, sy = op.attrs["shifts"]
    x = b.node("Mul", [x, b.const(1 << sx)]) if sx else x
    y = b.node("Mul", [y, b.const(1 << sy)]) if sy else y
    return b.node("Add", [x, y])


EMITTERS: dict[str, Callable] = {
    "quantize": emit_quantize,
    "requantize": emit_requantize,
    "dequantize": emit_dequantize,
    "conv2d": emit_conv2d,
    "linear": emit_linear,
    "relu": lambda b, op, x: b.node("Max", [x, b.const(0)]),
    "max_pool2d": emit_max_pool2d,
    "sum_pool2d": emit_sum_pool2d,
    "add": emit_add,
    "reshape": lambda b, op, x: b.node("Reshape", [x, b.const(list(op.attrs["shape"]))]),
}
_NEEDS_SHAPES = {"conv2d", "max_pool2d", "sum_pool2d"}


def to_onnx(graph: IntegerGraph, name: str = "fxcompile_integer") -> onnx.ModelProto:
    """The ONNX model of ``graph``: float inputs (batch dimension ``N``), float and int64 outputs."""
    b, env = _Builder(), {}
    inputs = []
    for i, (inp, shape) in enumerate(zip(graph.inputs, graph.input_shapes)):
        env[inp] = inp
        inputs.append(helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", *shape[1:]]))
    outputs, codes = [], []
    for op in graph.ops:
        b.prefix = f"{op.op}/{op.out}"
        args = [env[i] for i in op.inputs]
        if op.op in _NEEDS_SHAPES:
            env[op.out] = EMITTERS[op.op](b, op, *args, graph.shapes)
        else:
            env[op.out] = EMITTERS[op.op](b, op, *args)
        if op.op == "dequantize":
            shape = ["N", *graph.shapes[op.out][1:]]
            out = "output" if len(graph.outputs) == 1 else f"output_{len(outputs)}"
            b.nodes.append(helper.make_node("Identity", [env[op.out]], [out], name=f"dequantize/{out}/output"))
            b.nodes.append(helper.make_node("Identity", [args[0]], [f"{out}_codes"], name=f"{op.op}/{out}/codes"))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
            codes.append(helper.make_tensor_value_info(f"{out}_codes", TensorProto.INT64, shape))
    g = helper.make_graph(b.nodes, name, inputs, outputs + codes, initializer=b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fxcompile")
    model.ir_version = min(model.ir_version, 10)
    return model
