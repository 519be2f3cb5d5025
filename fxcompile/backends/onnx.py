"""ONNX backend: an :class:`IntegerGraph` as an ONNX model of int64 ops.

Between the input quantizer and the output dequantizers every tensor is int64 and every op
has an int64 kernel on ONNX Runtime's CPU provider, so ORT reproduces the integer reference
(:mod:`fxcompile.backends.integer`) bit for bit.  ORT's integer support shapes the lowering:

* Conv is float-only, ConvInteger 8-bit only and ORT's int64 MatMul is slow, so a
  convolution is im2col (Pad, one strided Slice per kernel offset, Concat) followed by
  ``MatMulInteger`` on 8-bit pieces: the input codes, offset to be non-negative, split into
  uint8 limbs, times the weight codes split into balanced base-256 digits (int8), each
  partial sum exact in int32 (checked from K), recombined in int64.  When the bound cannot
  be guaranteed (unknown input range, very long sums) an int64 ``MatMul`` does it directly;
* integer Div truncates toward zero and BitShift is unsigned, so a rounding right shift by
  ``s`` bits is ``r = v AND (2**s − 1)`` (two's complement: the non-negative remainder),
  ``q = (v − r) / 2**s`` (exact floor), and for ties to even
  ``q + (r + (q AND 1) + 2**(s−1) − 1) / 2**s``, all int64 (``BitwiseAnd``, opset 18: ORT's
  int64 ``Mod`` is several times slower);
* Relu has no int64 kernel: ``Max(v, 0)``; saturation is an int64 ``Clip``; wrap is a mask;
  MaxPool is float-only: ``Max`` over the kernel-offset slices; a power-of-two average pool
  is a sum of slices.

Node names start with the op they lower (``quantize/…``, ``conv2d/…``, ``dequantize/…``).
Each graph output ``output`` (``output_<i>`` if several; float32) comes with ``output_codes``
(its int64 codes)::

    >>> model = to_onnx(lower(fold_bn(qmodel), (x,)))
    >>> onnx.checker.check_model(model, full_check=True)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..formats import FixedPoint
from ..passes.lower import IntegerGraph, IntOp

__all__ = ["to_onnx", "EMITTERS", "OPSET"]

OPSET = 18  # BitwiseAnd


class _Builder:
    def __init__(self):
        self.nodes, self.initializers, self._consts, self._count = [], [], {}, 0
        self.prefix = "graph"
        self.types: dict[str, type] = {}  # integer values held in int32; all others are int64

    def dtype(self, name: str) -> type:
        return self.types.get(name, np.int64)

    def int64(self, name: str) -> str:
        """``name`` as int64 (ops whose results may outgrow int32 work in int64)."""
        return name if self.dtype(name) == np.int64 else self.node("Cast", [name], to=TensorProto.INT64)

    def int32(self, name: str) -> str:
        self.types[name] = np.int32
        return name

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


def _int32_codes(fmt: FixedPoint) -> bool:
    """Codes of ``fmt`` travel as int32 (ORT's int64 elementwise kernels are many times slower)."""
    return fmt.overflow == "saturate" and fmt.bits <= 30 and abs(fmt.zero_point) < 2 ** 29


def _saturate(b: _Builder, t: str, fmt: FixedPoint, dt=np.int64) -> str:
    zp, lo, hi = fmt.zero_point, fmt.code_min, fmt.code_max
    if fmt.overflow == "saturate":
        return b.node("Clip", [t, b.const(lo - zp, dt), b.const(hi - zp, dt)])
    # a wrapping format spans all 2**bits codes: the modulo is a mask
    wrapped = b.node("BitwiseAnd", [b.node("Add", [t, b.const(zp - lo, dt)]), b.const(hi - lo, dt)])
    return b.node("Add", [wrapped, b.const(lo - zp, dt)])


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
        if _int32_codes(fmt):
            return b.int32(b.node("Cast", [t], to=TensorProto.INT32))
        return b.node("Cast", [t], to=TensorProto.INT64)
    return _saturate(b, b.node("Cast", [t], to=TensorProto.INT64), fmt)


def emit_requantize(b: _Builder, op: IntOp, v: str) -> str:
    fmt: FixedPoint = op.attrs["fmt"]
    shift = op.attrs["shift"]
    # right shifts only shrink values: int32 codes stay int32; anything else works in int64
    dt = np.int32 if b.dtype(v) == np.int32 and 0 <= shift <= 29 else np.int64
    v = v if dt == np.int32 else b.int64(v)
    if shift < 0:
        t = b.node("Mul", [v, b.const(1 << -shift)])
    elif shift == 0:
        t = v
    elif fmt.rounding == "toward_zero":
        t = b.node("Div", [v, b.const(1 << shift, dt)])  # int Div truncates toward zero
    else:
        t = _round_shift(b, v, shift, fmt.rounding, dt)
    t = _saturate(b, t, fmt, dt)
    if dt == np.int32:
        return b.int32(t)
    return b.int32(b.node("Cast", [t], to=TensorProto.INT32)) if _int32_codes(fmt) else t


def _round_shift(b: _Builder, v: str, shift: int, rounding: str, dt, remainder: str | None = None) -> str:
    """floor or ties-to-even of ``v / 2**shift``; given ``remainder`` (in [0, 2**shift)), of
    ``(v · 2**shift + remainder) / 2**shift`` instead."""
    d = b.const(1 << shift, dt)
    if remainder is None:
        r = b.node("BitwiseAnd", [v, b.const((1 << shift) - 1, dt)])  # two's complement: 0 <= r < d
        q = b.node("Div", [b.node("Sub", [v, r]), d])  # exact: floor(v / d)
    else:
        q, r = v, remainder
    if rounding == "floor":
        return q
    # nearest, ties to even: round up when r > d/2, or r == d/2 and q is odd
    odd = b.node("BitwiseAnd", [q, b.const(1, dt)])
    bump = b.node("Add", [b.node("Add", [r, odd]), b.const((1 << (shift - 1)) - 1, dt)])
    return b.node("Add", [q, b.node("Div", [bump, d])])


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
    out = b.node("Pad", [x, b.const([0, 0, ph, pw, 0, 0, ph, pw]), b.const(value, b.dtype(x))])
    b.types[out] = b.dtype(x)
    return out, True


def _digits(w: np.ndarray) -> list[np.ndarray]:
    """Balanced base-256 digits of int64 ``w``: ``w = Σ d_j · 256**j`` with ``d_j`` in [-128, 127]."""
    digits, rest = [], w.astype(np.int64)
    while True:
        d = (rest + 128) % 256 - 128
        digits.append(d)
        rest = (rest - d) // 256
        if not rest.any():
            return digits


@dataclasses.dataclass
class _Plan:
    """How a conv/linear splits into 8-bit products, and the bounds that make it exact."""

    flat: np.ndarray           # weight codes (O, K)
    lo: int                    # the input offset: u = x − lo >= 0
    count: int                 # uint8 limbs of u
    digits: list[np.ndarray]   # balanced base-256 digits of the weight
    bias: np.ndarray           # int64 bias, with the offset's contribution lo · Σ w folded in
    digit_sum_bound: int       # |Σ_j 256**j · (limb · digit_j sums)| for one limb


def _plan(b: _Builder, op: IntOp) -> _Plan | None:
    """None when 8-bit products cannot be exact: unknown input range, or so many terms that
    an int32 sum of uint8 × int8 products could overflow."""
    fmt = _input_format(b, op.inputs[0])
    weight = op.attrs["weight"].numpy()
    flat = weight.reshape(weight.shape[0], -1)
    k = flat.shape[1]
    if fmt is None or k * 255 * 128 >= 2 ** 31:
        return None
    lo, hi = fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point
    digits = _digits(flat)
    bias = lo * flat.sum(axis=1) + (op.attrs["bias"].numpy() if op.attrs["bias"] is not None else 0)
    bound = k * 255 * sum(256 ** j * int(np.abs(d).max()) for j, d in enumerate(digits))
    return _Plan(flat, lo, max(1, ((hi - lo).bit_length() + 7) // 8), digits, np.asarray(bias, np.int64), bound)


def _limbs(b: _Builder, x: str, plan: _Plan) -> str:
    """``x − lo`` split into uint8 limbs, stacked along axis 0."""
    dt = b.dtype(x) if plan.lo > -(2 ** 30) else np.int64
    x = x if dt == b.dtype(x) else b.int64(x)
    u = b.node("Sub", [x, b.const(plan.lo, dt)]) if plan.lo else x
    limbs = []
    for i in range(plan.count):
        t = b.node("Div", [u, b.const(256 ** i, dt)]) if i else u  # u >= 0: Div is floor
        t = b.node("BitwiseAnd", [t, b.const(255, dt)]) if i < plan.count - 1 else t
        limbs.append(b.node("Cast", [t], to=TensorProto.UINT8))
    return b.node("Concat", limbs, axis=0) if plan.count > 1 else limbs[0]


def _digit_sums(b: _Builder, y: str, plan: _Plan, out_shape: list[int]) -> str:
    """int32 (limbs, N, *out_shape): Σ_j 256**j · Y[:, j] (exact when digit_sum_bound fits)."""
    nd = len(plan.digits)
    y = b.node("Reshape", [y, b.const([plan.count, -1, nd, *out_shape])])
    if nd == 1:
        return b.node("Reshape", [y, b.const([plan.count, -1, *out_shape])])
    scale = np.array([256 ** j for j in range(nd)], dtype=np.int32).reshape(1, 1, nd, *[1] * len(out_shape))
    return b.node("ReduceSum", [b.node("Mul", [y, b.const(scale, np.int32)]), b.const([2])], keepdims=0)


def _combine(b: _Builder, y: str, plan: _Plan, out_shape: list[int]) -> str:
    """int64 Σ_i Σ_j 256**(i+j) · Y[i, :, j] of the int32 limb × digit products, exactly
    (digits of one limb are summed in int32 when their bound allows: ORT's int64 ops are slow)."""
    if plan.digit_sum_bound < 2 ** 31:
        y, steps = b.node("Cast", [_digit_sums(b, y, plan, out_shape)], to=TensorProto.INT64), [1]
    else:
        y, steps = b.node("Cast", [y], to=TensorProto.INT64), [256 ** j for j in range(len(plan.digits))]
    if plan.count == 1 and len(steps) == 1:
        return b.node("Reshape", [y, b.const([-1, *out_shape])])
    y = b.node("Reshape", [y, b.const([plan.count, -1, len(steps), *out_shape])])
    scale = np.array([[256 ** i * step for step in steps] for i in range(plan.count)], dtype=np.int64)
    y = b.node("Mul", [y, b.const(scale.reshape(plan.count, 1, len(steps), *[1] * len(out_shape)))])
    return b.node("ReduceSum", [y, b.const([0, 2])], keepdims=0)


def _fused_requantize(b: _Builder, y: str, plan: _Plan, out_shape: list[int], req: IntOp) -> str | None:
    """The requantize that follows a conv/linear, done on the int32 limb sums Z_i without ever
    forming the int64 accumulator Σ_i 256**i · Z_i + bias: with s the shift, each Z_i splits
    into an integer part and a remainder below 2**s, the remainders are summed and carried,
    and the tie rule reads the final remainder.  None unless every step provably fits int32."""
    fmt, s = req.attrs["fmt"], req.attrs["shift"]
    if not (plan.digit_sum_bound < 2 ** 31 and 0 < s <= 26 and fmt.rounding in ("nearest", "floor")
            and _int32_codes(fmt)):
        return None
    bq, br = plan.bias >> s, plan.bias & ((1 << s) - 1)  # bias = bq · 2**s + br, 0 <= br < 2**s
    bound = int(np.abs(bq).max(initial=0)) + plan.count + 2
    for i in range(plan.count):
        bound += plan.digit_sum_bound << (8 * i - s) if 8 * i >= s else (plan.digit_sum_bound >> (s - 8 * i)) + 1
    if bound >= 2 ** 31 or (plan.count + 1) << s >= 2 ** 31:
        return None
    dt, bshape = np.int32, (-1, *[1] * (len(out_shape) - 1))
    z = _digit_sums(b, y, plan, out_shape)
    whole, rest = [], []
    for i in range(plan.count):
        zi = b.node("Slice", [z, b.const([i]), b.const([i + 1]), b.const([0])]) if plan.count > 1 else z
        if 8 * i >= s:
            whole.append(b.node("Mul", [zi, b.const(1 << (8 * i - s), dt)]) if 8 * i > s else zi)
            continue
        t = s - 8 * i
        r = b.node("BitwiseAnd", [zi, b.const((1 << t) - 1, dt)])
        whole.append(b.node("Div", [b.node("Sub", [zi, r]), b.const(1 << t, dt)]))  # exact floor
        rest.append(b.node("Mul", [r, b.const(256 ** i, dt)]) if i else r)
    total = b.node("Add", [whole[0], b.const(bq.reshape(bshape), dt)])
    for w in whole[1:]:
        total = b.node("Add", [total, w])
    rsum = b.node("Add", [rest[0], b.const(br.reshape(bshape), dt)])
    for r in rest[1:]:
        rsum = b.node("Add", [rsum, r])
    carry = b.node("Div", [rsum, b.const(1 << s, dt)])  # rsum >= 0: Div is floor
    total = b.node("Add", [total, carry])
    remainder = b.node("BitwiseAnd", [rsum, b.const((1 << s) - 1, dt)])
    out = _saturate(b, _round_shift(b, total, s, fmt.rounding, dt, remainder), fmt, dt)
    return b.int32(b.node("Reshape", [out, b.const([-1, *out_shape])]))


def _input_format(b: _Builder, name: str) -> FixedPoint | None:
    return next((op.fmt for op in b.graph.ops if op.out == name), None)


def emit_conv2d(b: _Builder, op: IntOp, x: str, shapes) -> str:
    weight, bias = op.attrs["weight"].numpy(), op.attrs["bias"]
    o, c, kh, kw = weight.shape
    n, _, h, w = shapes[op.inputs[0]]
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    xp, _ = _pad(b, b.int64(x), (ph, pw))
    cols = _slices(b, xp, (n, c, h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
    ho, wo = _out_size(h + 2 * ph, kh, stride[0], dil[0]), _out_size(w + 2 * pw, kw, stride[1], dil[1])
    if len(cols) > 1:  # (N, C, K, Ho, Wo): rows ordered (c, kh, kw) like the weight
        cols = [b.node("Concat", [b.node("Unsqueeze", [s, b.const([2])]) for s in cols], axis=2)]
    cols = b.node("Reshape", [cols[0], b.const([0, c * kh * kw, ho * wo])])
    acc = b.node("MatMul", [b.const(weight.reshape(o, c * kh * kw), name=f"{op.out}.weight"), cols])
    if bias is not None:
        acc = b.node("Add", [acc, b.const(bias.numpy().reshape(o, 1), name=f"{op.out}.bias")])
    return b.node("Reshape", [acc, b.const([0, o, ho, wo])])


def emit_conv2d_8bit(b: _Builder, op: IntOp, x: str, req: IntOp | None = None) -> str | None:
    """The convolution as one 8-bit MatMulInteger of weight digits × im2col of the input limbs
    (ORT's int64 MatMul is slow; its 8-bit one is fast).  Exact: int32 holds each limb sum.
    With ``req``, also the requantize that follows (see :func:`_fused_requantize`)."""
    plan = _plan(b, op)
    if plan is None:
        return None
    o, c, kh, kw = op.attrs["weight"].shape
    n, _, h, w = b.graph.shapes[op.inputs[0]]
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    xp, _ = _pad(b, x, (ph, pw))  # pad before the offset: padding is a code 0 like any other
    stacked = _limbs(b, xp, plan)
    cols = _slices(b, stacked, (n, c, h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
    ho, wo = _out_size(h + 2 * ph, kh, stride[0], dil[0]), _out_size(w + 2 * pw, kw, stride[1], dil[1])
    if len(cols) > 1:
        cols = [b.node("Concat", [b.node("Unsqueeze", [s, b.const([2])]) for s in cols], axis=2)]
    cols = b.node("Reshape", [cols[0], b.const([0, c * kh * kw, ho * wo])])
    a = (np.concatenate(plan.digits, axis=0) + 128).astype(np.uint8)  # uint8 with zero point 128
    y = b.node("MatMulInteger", [b.const(a, np.uint8, name=f"{op.out}.weight_digits"), cols,
                                 b.const(128, np.uint8)])
    if req is not None:
        fused = _fused_requantize(b, y, plan, [o, ho, wo], req)
        if fused is not None:
            return fused
    acc = _combine(b, y, plan, [o, ho * wo])
    # sum((u + lo) · w) = sum(u · w) + lo · sum(w): the offset is a constant per channel
    if np.any(plan.bias):
        acc = b.node("Add", [acc, b.const(plan.bias.reshape(o, 1), name=f"{op.out}.bias")])
    return b.node("Reshape", [acc, b.const([0, o, ho, wo])])


def emit_linear_8bit(b: _Builder, op: IntOp, x: str, req: IntOp | None = None) -> str | None:
    """``linear`` as one 8-bit MatMulInteger on limbs × weight digits (see emit_conv2d_8bit)."""
    plan = _plan(b, op)
    if plan is None:
        return None
    o = plan.flat.shape[0]
    bmat = np.concatenate([d.T for d in plan.digits], axis=1).astype(np.int8)  # (K, digits · O)
    y = b.node("MatMulInteger", [_limbs(b, x, plan), b.const(bmat, np.int8, name=f"{op.out}.weight_digits")])
    if req is not None:
        fused = _fused_requantize(b, y, plan, [o], req)
        if fused is not None:
            return fused
    acc = _combine(b, y, plan, [o])
    return b.node("Add", [acc, b.const(plan.bias, name=f"{op.out}.bias")]) if np.any(plan.bias) else acc


def emit_linear(b: _Builder, op: IntOp, x: str) -> str:
    acc = b.node("MatMul", [b.int64(x), b.const(op.attrs["weight"].numpy().T.copy(), name=f"{op.out}.weight")])
    if op.attrs["bias"] is not None:
        acc = b.node("Add", [acc, b.const(op.attrs["bias"].numpy(), name=f"{op.out}.bias")])
    return acc


def emit_max_pool2d(b: _Builder, op: IntOp, x: str, shapes) -> str:
    n, c, h, w = shapes[op.inputs[0]]
    ph, pw = op.attrs["padding"]
    dt = b.dtype(x)
    xp, _ = _pad(b, x, (ph, pw), np.iinfo(dt).min)  # padding never wins a max
    wins = _slices(b, xp, (n, c, h + 2 * ph, w + 2 * pw), op.attrs["kernel"], op.attrs["stride"],
                   op.attrs["dilation"])
    return _same_type(b, x, b.node("Max", wins) if len(wins) > 1 else wins[0])


def emit_sum_pool2d(b: _Builder, op: IntOp, x: str, shapes) -> str:
    wins = _slices(b, b.int64(x), shapes[op.inputs[0]], op.attrs["kernel"], op.attrs["stride"])
    total = wins[0]
    for win in wins[1:]:  # Sum has no int64 kernel
        total = b.node("Add", [total, win])
    return total


def emit_add(b: _Builder, op: IntOp, x: str, y: str) -> str:
    sx, sy = op.attrs["shifts"]
    x, y = b.int64(x), b.int64(y)
    x = b.node("Mul", [x, b.const(1 << sx)]) if sx else x
    y = b.node("Mul", [y, b.const(1 << sy)]) if sy else y
    return b.node("Add", [x, y])


def _same_type(b: _Builder, x: str, out: str) -> str:
    b.types[out] = b.dtype(x)
    return out


EMITTERS: dict[str, Callable] = {
    "quantize": emit_quantize,
    "requantize": emit_requantize,
    "dequantize": emit_dequantize,
    "conv2d": emit_conv2d,
    "linear": emit_linear,
    "relu": lambda b, op, x: _same_type(b, x, b.node("Max", [x, b.const(0, b.dtype(x))])),
    "max_pool2d": emit_max_pool2d,
    "sum_pool2d": emit_sum_pool2d,
    "add": emit_add,
    "reshape": lambda b, op, x: _same_type(b, x, b.node("Reshape", [x, b.const(list(op.attrs["shape"]))])),
}
_NEEDS_SHAPES = {"conv2d", "max_pool2d", "sum_pool2d"}
# conv/linear through 8-bit MatMulInteger when the sums fit int32 (else the int64 MatMul above)
FAST_EMITTERS: dict[str, Callable] = {"conv2d": emit_conv2d_8bit, "linear": emit_linear_8bit}


def _only_requantize(graph: IntegerGraph, op: IntOp) -> IntOp | None:
    """The requantize op that is the only consumer of ``op``'s output, if any."""
    users = [u for u in graph.ops if op.out in u.inputs]
    return users[0] if len(users) == 1 and users[0].op == "requantize" else None


def to_onnx(graph: IntegerGraph, name: str = "fxcompile_integer", eight_bit: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``graph``: float inputs (batch dimension ``N``), float and int64 outputs.

    ``eight_bit`` lowers conv/linear to 8-bit ``MatMulInteger`` on limbs where that is exact
    (fast on ORT); ``False`` keeps every product in an int64 ``MatMul``.
    """
    b, env, fused = _Builder(), {}, set()
    b.graph = graph
    inputs = []
    for i, (inp, shape) in enumerate(zip(graph.inputs, graph.input_shapes)):
        env[inp] = inp
        inputs.append(helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", *shape[1:]]))
    outputs, codes = [], []
    for op in graph.ops:
        b.prefix = f"{op.op}/{op.out}"
        if op.out in fused:
            continue
        args = [env[i] for i in op.inputs]
        fast, out = FAST_EMITTERS.get(op.op) if eight_bit else None, None
        if fast:
            req = _only_requantize(graph, op)
            out = fast(b, op, *args, req=req)
            if out is not None and req is not None and b.dtype(out) == np.int32:  # requantized too
                env[req.out] = out
                fused.add(req.out)
                continue
        if out is None and op.op in _NEEDS_SHAPES:
            out = EMITTERS[op.op](b, op, *args, graph.shapes)
        elif out is None:
            out = EMITTERS[op.op](b, op, *args)
        env[op.out] = out
        if op.op == "dequantize":
            shape = ["N", *graph.shapes[op.out][1:]]
            out = "output" if len(graph.outputs) == 1 else f"output_{len(outputs)}"
            b.nodes.append(helper.make_node("Identity", [env[op.out]], [out], name=f"dequantize/{out}/output"))
            b.nodes.append(helper.make_node("Cast", [args[0]], [f"{out}_codes"], to=TensorProto.INT64,
                                            name=f"{op.op}/{out}/codes"))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
            codes.append(helper.make_tensor_value_info(f"{out}_codes", TensorProto.INT64, shape))
    g = helper.make_graph(b.nodes, name, inputs, outputs + codes, initializer=b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fxcompile")
    model.ir_version = min(model.ir_version, 10)
    return model
