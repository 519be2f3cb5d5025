"""ONNX backend: an :class:`IntegerGraph` as an ONNX model of integer ops.

Between the input quantizer and the output dequantizers every tensor is an integer tensor
and every op has an integer kernel on ONNX Runtime's CPU provider, so ORT reproduces the
integer reference (:mod:`fxcompile.deploy.backends.integer`) bit for bit.  The export knows every
constant and the range of every value (from the input format, the weights and each op), and
spends that knowledge on speed:

* **int32 where it provably fits.**  Each value carries an interval ``[lo, hi]`` of its codes
  (a format's range; a conv/linear's exact per-channel bound from its weights; ReLU, pooling
  and add propagate it); a value lives in int32 when its interval fits, else int64.  ORT's
  int32 elementwise kernels are several times faster than its int64 ones.
* **Conv/linear on 8-bit limbs.**  ORT has no integer Conv above 8 bits, its int64 MatMul is
  slow and ``ConvInteger`` with int8 weights is slower than float.  The fast kernel is
  ``MatMulInteger`` with a uint8 left operand and an int8 right one, so: the input codes,
  offset by ``lo`` to be non-negative only when ``lo < 0`` (the offset's contribution
  ``lo · Σ w`` folds into the bias), are split into as many uint8 limbs as ``hi − lo`` needs
  (two for a 16-bit ReLU output; the low limbs by the uint8 ``Cast``, which keeps the low
  8 bits); the constant weight codes
  are split into as many balanced base-128 digits in [-64, 63] as their largest code needs
  (two for a 24.12 weight with |w| < 2).  Digits below 64 keep every pair of uint8 × int8
  products below 2**15, so the result is exact even on kernels that add pairs in int16
  (x86 without VNNI); a second limb of at most 127 (a 15-bit ReLU output) takes the doubled
  digits ``2 · d_j``, still below 2**15 a pair, so that its products ``256 · 128**j`` share
  the scales ``128**(j+1)`` of the first limb's.  One ``MatMulInteger`` per limb and digit,
  a limb's back to back; the partial sums of equal scale are added and the sums combined by
  Horner's rule (``Σ 128**k · Y_k + bias``) in int32 when the per-channel bound proves it
  fits, else in int64.  When even one partial sum could overflow int32, an int64 ``MatMul``
  does the product directly (also with ``eight_bit=False``).
* **Small K: one int32 MatMul.**  When K is small (a first conv on one channel) the 8-bit
  form costs little arithmetic but writes limbs × digits large partial sums, and those
  passes over memory dominate; if the per-channel bound Σ|w| · max|x| + |b| fits int32, one
  int32 ``MatMul`` writes the accumulator once.  A rough cost model picks per layer.  On an
  NCHW input (the first conv) that MatMul is ``(O, K) · (N, K, Ho · Wo)``: the columns are
  concatenated one kernel offset (a whole channel plane) at a time, and the product is NCHW.
* **Channels last.**  Convolution on limbs is im2col in NHWC (``Pad``; strided ``Slice`` per
  kernel column concatenated on the channel axis, then per kernel row concatenated again:
  ORT's ``Concat`` copies one block per innermost run, and runs of C bytes are slow), so the
  columns are the uint8 left operand as they stand and the product comes out NHWC again:
  4-D values stay NHWC from there to the next flatten or output, where one ``Transpose``
  restores NCHW.  A per-channel constant on an NHWC value is tiled to (W, C): ORT
  broadcasts a C-element operand one run of C at a time, six times the cost of a scalar.
* **Monotone ops commute with max-pooling.**  A saturating requantize and ReLU are
  non-decreasing, so ``maxpool(relu(requantize(acc))) = relu(requantize(maxpool(acc)))``
  exactly: the pool runs first on the accumulator and the rounding on a quarter of the
  values.  MaxPool itself is float-only: ``Max`` over the kernel-offset slices, or, for
  tiling windows, two ``ReduceMax`` over reshapes (rows, then columns channels-last).
* **Rounding shifts.**  Integer ``Div`` truncates toward zero and ``BitShift`` is unsigned, so
  a rounding right shift by ``s`` is done on a non-negative value: saturate first
  (``Clip(v, lo · 2**s, hi · 2**s)``: rounding is monotone and these bounds round to
  themselves; a following ReLU raises ``lo`` to 0), add ``−m · 2**s`` with ``m`` even when
  the clipped value may be negative (ties to even are unchanged by an even offset), then
  ``q = t / 2**s`` is the floor and ties to even is
  ``(t + 2**(s−1) − 1 + (q AND 1)) / 2**s``.  A wrapping format works in int64 and wraps
  with a mask.  A power-of-two average pool is a sum of slices (of the parts of two
  ``Split`` for tiling windows of a channels-last value).  (ORT's int32 ``Div`` and
  ``BitwiseAnd`` cost several Adds each; ``Mod`` more.)

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

from ...core.formats import FixedPoint
from ..lower import IntegerGraph, IntOp

__all__ = ["to_onnx", "EMITTERS", "OPSET"]

OPSET = 18  # BitwiseAnd
INT32 = (-(2 ** 31), 2 ** 31 - 1)
_ONNX_TYPE = {np.int32: TensorProto.INT32, np.int64: TensorProto.INT64, np.uint8: TensorProto.UINT8}
_NUMPY_TYPE = {v: k for k, v in _ONNX_TYPE.items()}


def add_constant(initializers: list, pool: dict, value, dtype, name: str | None = None) -> str:
    """Append ``value`` as an initializer and return its name.  Unnamed constants are pooled
    by value (``pool``), so an equal constant is stored once; a ``name`` always adds one."""
    array = np.asarray(value, dtype=dtype)
    key = None if name else (array.dtype.str, array.shape, array.tobytes())
    if key is not None and key in pool:
        return pool[key]
    name = name or f"const/{len(pool)}"   # pool only grows: unique even if initializers are removed
    initializers.append(numpy_helper.from_array(array, name))
    if key is not None:
        pool[key] = name
    return name


def _fits32(lo: int, hi: int) -> bool:
    return INT32[0] <= lo and hi <= INT32[1]


def _per_channel(values: np.ndarray, width: int | None) -> np.ndarray:
    """A per-channel constant for a channels-last value of ``width`` columns, tiled to
    (width, C): ORT broadcasts a C-element operand one C-element run at a time (an Add over
    16 channels costs about six scalar Adds), a (W, C) one in runs of W · C."""
    return np.tile(values, (width, 1)) if width else values


class _Builder:
    """Nodes and constants of the model being built, and what is known about each value:
    its integer type, its interval of codes and whether a 4-D value is channels-last."""

    def __init__(self, graph: IntegerGraph, shapes: dict):
        self.graph, self.shapes = graph, shapes
        self.nodes, self.initializers, self._consts, self._count = [], [], {}, 0
        self.prefix = "graph"
        self.types: dict[str, type] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.channels_last: set[str] = set()
        self._transposed: dict[str, str] = {}  # one Transpose a value, however many users need it

    def dtype(self, name: str) -> type:
        return self.types.get(name, np.int64)

    def node(self, op_type: str, inputs, **attrs) -> str:
        """Append a node; its integer output type follows ``to`` (Cast), int32 (MatMulInteger)
        or its first input."""
        self._count += 1
        out = f"{self.prefix}/{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        if op_type == "Cast":
            dtype = _NUMPY_TYPE.get(attrs["to"])
        else:
            dtype = np.int32 if op_type == "MatMulInteger" else self.types.get(inputs[0])
        if dtype is not None:
            self.types[out] = dtype
        return out

    def split(self, x: str, parts: int, axis: int) -> list[str]:
        """``x`` split into ``parts`` equal parts along ``axis`` (one node, several outputs)."""
        self._count += 1
        name = f"{self.prefix}/Split_{self._count}"
        outs = [f"{name}_{i}" for i in range(parts)]
        self.nodes.append(helper.make_node("Split", [x], outs, name=name, axis=axis, num_outputs=parts))
        self.types.update({out: self.dtype(x) for out in outs})
        return outs

    def value(self, name: str, lo: int, hi: int, like: str | None = None) -> str:
        """Record ``name``'s interval of codes, and that it is channels-last if ``like`` is."""
        self.ranges[name] = (int(lo), int(hi))
        if like in self.channels_last:
            self.channels_last.add(name)
        return name

    def cast(self, name: str, dtype) -> str:
        if self.dtype(name) == dtype:
            return name
        return self.value(self.node("Cast", [name], to=_ONNX_TYPE[dtype]), *self.ranges[name], like=name)

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        return add_constant(self.initializers, self._consts, value, dtype, name)

    def nhwc(self, x: str) -> str:
        if x in self.channels_last:
            return x
        if x not in self._transposed:
            out = self._transposed[x] = self.node("Transpose", [x], perm=[0, 2, 3, 1])
            self.channels_last.add(out)
            self.value(out, *self.ranges[x])
        return self._transposed[x]

    def nchw(self, x: str) -> str:
        if x not in self.channels_last:
            return x
        if x not in self._transposed:
            self._transposed[x] = self.value(self.node("Transpose", [x], perm=[0, 3, 1, 2]), *self.ranges[x])
        return self._transposed[x]

    def spatial_axes(self, x: str) -> list[int]:
        return [1, 2] if x in self.channels_last else [2, 3]


def _centred_range(fmt: FixedPoint) -> tuple[int, int]:
    return fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point


def _wide(fmt: FixedPoint) -> bool:
    # float32 holds every code exactly only below 2**24 (the simulation switches to float64 too)
    return fmt.code_max - fmt.code_min >= 1 << 24


def _wrap(b: _Builder, t: str, fmt: FixedPoint) -> str:
    """int64 ``t`` wrapped into ``fmt``'s 2**bits codes (a mask: the codes span a power of two)."""
    zp, lo, hi = fmt.zero_point, fmt.code_min, fmt.code_max
    wrapped = b.node("BitwiseAnd", [b.node("Add", [t, b.const(zp - lo)]), b.const(hi - lo)])
    return b.node("Add", [wrapped, b.const(lo - zp)])


def emit_quantize(b: _Builder, op: IntOp, x: str) -> str:
    fmt: FixedPoint = op.attrs["fmt"]
    lo, hi = _centred_range(fmt)
    ftype = np.float64 if _wide(fmt) else np.float32
    if _wide(fmt):
        x = b.node("Cast", [x], to=TensorProto.DOUBLE)
    t = b.node("Mul", [x, b.const(2.0 ** fmt.frac, ftype)])  # exact: a power of two
    if fmt.rounding == "nearest":
        t = b.node("Round", [t])  # ties to even
    elif fmt.rounding == "floor":
        t = b.node("Floor", [t])
    # toward_zero: the float → int Cast below truncates
    # non-finite inputs (see fxcompile.core.formats): NaN → 0, ±Inf → the bounds, never a wrap
    t = b.node("Where", [b.node("IsNaN", [t]), b.const(0.0, ftype), t])
    if fmt.overflow == "wrap":
        t = b.node("Where", [b.node("IsInf", [t]), b.node("Clip", [t, b.const(lo, ftype), b.const(hi, ftype)]), t])
    if fmt.overflow == "saturate":  # clamp in float: huge inputs must not overflow the int cast
        t = b.node("Clip", [t, b.const(lo, ftype), b.const(hi, ftype)])
        return b.value(b.node("Cast", [t], to=_ONNX_TYPE[_int_type(lo, hi)]), lo, hi)
    t = _wrap(b, b.node("Cast", [t], to=TensorProto.INT64), fmt)
    return b.cast(b.value(t, lo, hi), _int_type(lo, hi))


def _int_type(lo: int, hi: int) -> type:
    return np.int32 if _fits32(lo, hi) else np.int64


def emit_requantize(b: _Builder, op: IntOp, v: str) -> str:
    """Rounding shift, then saturation (with ``attrs["relu"]``, clamped at 0 too) or wrap."""
    fmt: FixedPoint = op.attrs["fmt"]
    s, rounding = op.attrs["shift"], fmt.rounding
    vlo, vhi = b.ranges[v]
    olo, ohi = _centred_range(fmt)
    if op.attrs.get("relu"):
        olo, ohi = max(olo, 0), max(ohi, 0)
    out_type = _int_type(olo, ohi)
    if fmt.overflow == "wrap":  # int64 wraps like the reference's int64 arithmetic
        t = b.cast(v, np.int64)
        if s < 0:
            t = b.node("Mul", [t, b.const(1 << -s)])
        elif s > 0:
            t = _round_shift(b, t, s, rounding, vlo, vhi)
        return b.cast(b.value(_wrap(b, t, fmt), olo, ohi, like=v), out_type)
    if s <= 0:  # an exact left shift: saturate after it
        lo, hi = vlo << -s, vhi << -s
        t = b.cast(v, _int_type(lo, hi))
        t = b.value(b.node("Mul", [t, b.const(1 << -s, b.dtype(t))]), lo, hi, like=t) if s else t
        return b.cast(_clip(b, t, olo, ohi), out_type)
    # saturate before rounding: rounding is monotone and lo · 2**s, hi · 2**s round to lo, hi
    t = _clip(b, v, olo << s, ohi << s)
    lo, hi = b.ranges[t]
    return b.cast(_round_shift(b, t, s, rounding, lo, hi), out_type)


def _clip(b: _Builder, v: str, lo: int, hi: int) -> str:
    """``v`` clamped to [lo, hi] (nothing when its interval already lies inside)."""
    vlo, vhi = b.ranges[v]
    lo, hi = max(lo, vlo), min(hi, vhi)
    if lo > hi:  # the whole interval lies beyond one bound: every value becomes that bound
        lo = hi = hi if vlo > hi else lo
    if (lo, hi) == (vlo, vhi):
        return v
    dt = b.dtype(v)
    return b.value(b.node("Clip", [v, b.const(lo, dt), b.const(hi, dt)]), lo, hi, like=v)


def _relu(b: _Builder, v: str) -> str:
    lo, hi = b.ranges[v]
    if lo >= 0:
        return v
    return b.value(b.node("Max", [v, b.const(0, b.dtype(v))]), 0, max(hi, 0), like=v)


def _round_shift(b: _Builder, v: str, s: int, rounding: str, lo: int, hi: int) -> str:
    """``v / 2**s`` rounded (``nearest``: ties to even) for ``v`` in [lo, hi]."""
    d = 1 << s
    if rounding == "toward_zero":  # integer Div truncates toward zero
        return b.value(b.node("Div", [v, b.const(d, b.dtype(v))]), _trunc(lo, d), _trunc(hi, d), like=v)
    m = (lo // (2 * d)) * 2 if lo < 0 else 0  # an even offset keeps ties to even where they were
    if not (_fits32(lo - d, hi + d) and _fits32(0, max(hi, 0) - m * d + d)):
        v = b.cast(v, np.int64)
    dt = b.dtype(v)
    if hi - m * d + d >= 2 ** 63:  # no room for the offset: the two's complement remainder instead
        r = b.node("BitwiseAnd", [v, b.const(d - 1, dt)])
        t, m = b.node("Sub", [v, r]), 0
        q = b.node("Div", [t, b.const(d, dt)])  # exact
        if rounding != "floor":
            bump = b.node("Add", [b.node("Add", [r, b.node("BitwiseAnd", [q, b.const(1, dt)])]), b.const(d // 2 - 1, dt)])
            q = b.node("Add", [q, b.node("Div", [bump, b.const(d, dt)])])
        return b.value(q, lo // d, -(-hi // d), like=v)
    if rounding == "floor":
        t = b.node("Add", [v, b.const(-m * d, dt)]) if m else v
    else:  # ties to even: (t + d/2 − 1 + bit s of t) / d; m · d is a multiple of 2d, so v's bit s
        odd = b.node("Min", [b.node("BitwiseAnd", [v, b.const(d, dt)]), b.const(1, dt)])
        t = b.node("Add", [b.node("Add", [v, b.const(d // 2 - 1 - m * d, dt)]), odd])
    q = b.node("Div", [t, b.const(d, dt)])  # t >= 0: Div is the floor
    q = b.node("Add", [q, b.const(m, dt)]) if m else q
    return b.value(q, lo // d, -(-hi // d), like=v)


def _trunc(v: int, d: int) -> int:
    return -(-v // d) if v < 0 else v // d


def emit_dequantize(b: _Builder, op: IntOp, v: str) -> str:
    t = b.node("Mul", [b.node("Cast", [v], to=TensorProto.DOUBLE), b.const(2.0 ** -op.frac, np.float64)])
    return b.node("Cast", [t], to=TensorProto.FLOAT)


def _out_size(size, k, s, d=1):
    return (size - d * (k - 1) - 1) // s + 1


def _slices(b: _Builder, x: str, hw, kernel, stride, dilation=(1, 1)) -> list[str]:
    """One strided slice of ``x``'s spatial axes (size ``hw``) per kernel offset."""
    ho, wo = _out_size(hw[0], kernel[0], stride[0], dilation[0]), _out_size(hw[1], kernel[1], stride[1], dilation[1])
    axes, out = b.const(b.spatial_axes(x)), []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            starts = [i * dilation[0], j * dilation[1]]
            ends = [starts[0] + stride[0] * (ho - 1) + 1, starts[1] + stride[1] * (wo - 1) + 1]
            sl = b.node("Slice", [x, b.const(starts), b.const(ends), axes, b.const(list(stride))])
            if x in b.channels_last:
                b.channels_last.add(sl)
            out.append(sl)
    return out


def _im2col(b: _Builder, x: str, hw, kernel, stride, dilation) -> str:
    """Channels-last columns (N, Ho, Wo, kh · kw · C) of ``x`` (N, H, W, C), rows ordered
    (kh, kw, c): the kw offsets are concatenated first, then kh slices of that (ORT's Concat
    copies one block per innermost run, and C-byte runs are slow)."""
    ho, wo = _out_size(hw[0], kernel[0], stride[0], dilation[0]), _out_size(hw[1], kernel[1], stride[1], dilation[1])
    for axis, k, n, st, d in ((2, kernel[1], wo, stride[1], dilation[1]), (1, kernel[0], ho, stride[0], dilation[0])):
        parts = [b.node("Slice", [x, b.const([j * d]), b.const([j * d + st * (n - 1) + 1]), b.const([axis]),
                                  b.const([st])]) for j in range(k)]
        x = b.node("Concat", parts, axis=3) if k > 1 else parts[0]
    return x


def _pad(b: _Builder, x: str, padding, value: int = 0) -> str:
    ph, pw = padding
    if not (ph or pw):
        return x
    pads = [0, ph, pw, 0, 0, ph, pw, 0] if x in b.channels_last else [0, 0, ph, pw, 0, 0, ph, pw]
    lo, hi = b.ranges[x]
    out = b.node("Pad", [x, b.const(pads), b.const(value, b.dtype(x))])
    return b.value(out, min(lo, value), max(hi, value), like=x)


def _digits(w: np.ndarray, base: int = 128) -> list[np.ndarray]:
    """Balanced base-``base`` digits of int64 ``w``: ``w = Σ d_j · base**j``, ``d_j`` in [-base/2, base/2)."""
    digits, rest, half = [], w.astype(np.int64), base // 2
    while True:
        d = (rest + half) % base - half
        digits.append(d)
        rest = (rest - d) // base
        if not rest.any():
            return digits


def _interval(weight: np.ndarray, bias: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the exact interval of ``Σ_k w_k · x_k + b`` for x in [lo, hi]
    (``weight`` (K, O)); Python integers, so no bound overflows."""
    pos = np.clip(weight, 0, None).sum(axis=0).astype(object)
    neg = np.clip(weight, None, 0).sum(axis=0).astype(object)
    b = bias.astype(object)
    return pos * lo + neg * hi + b, pos * hi + neg * lo + b


@dataclasses.dataclass
class _Plan:
    """How a conv/linear splits into uint8 × int8 products, and whether int32 holds the sums."""

    offset: int                # u = x − offset >= 0
    limbs: int                 # uint8 limbs of u
    terms: list[tuple[int, np.ndarray, int]]  # (limb i, int8 (K, O) digits e, scale): Σ scale · limb_i · e
    bias: np.ndarray           # int64 bias, with the offset's contribution offset · Σ w folded in
    int32: bool                # every partial and combined sum fits int32


# x86 without VNNI adds pairs of uint8 × int8 products in int16, saturating: a limb of at most
# 127 may take int8 digits up to 128 in magnitude, one below 256 only up to 64
_PAIR_MAX = 2 ** 15 - 1


def _plan(b: _Builder, flat: np.ndarray, bias: np.ndarray, x: str) -> _Plan | None:
    """None when one uint8 × int8 partial sum could overflow int32's MatMulInteger output.

    ``u · w = Σ_i 256**i · limb_i · Σ_j 128**j · d_j`` with ``d_j`` the balanced base-128
    digits of ``w`` (|d| <= 64).  A second limb of at most 127 takes the doubled digits
    ``2 · d_j`` (its pairs stay below 2**15), so its products ``256 · 128**j = 128**(j + 1) · 2``
    share their scales with the first limb's: the recombination has one multiply fewer.
    """
    lo, hi = b.ranges[x]
    offset = min(lo, 0)
    count = max(1, ((hi - offset).bit_length() + 7) // 8)
    digits = _digits(flat)
    limb_max = [min(255, (hi - offset) >> (8 * i)) for i in range(count)]
    terms = []
    for i in range(count):
        double = i == 1 and 2 * limb_max[i] * 128 <= _PAIR_MAX
        for j, d in enumerate(digits):
            terms.append((i, 2 * d, 128 ** (j + 1)) if double else (i, d, 256 ** i * 128 ** j))
    sums = [np.abs(e).sum(axis=0).astype(object) for _, e, _ in terms]  # Σ_k |e_k| per channel
    if max(limb_max[i] * int(t.max(initial=0)) for (i, _, _), t in zip(terms, sums)) > INT32[1]:
        return None
    bias = np.asarray(bias + offset * flat.sum(axis=0), np.int64)
    # every intermediate of the recombination (see _products), per channel, bounded by the
    # running sums of the terms taken largest scale first, in units of the current scale: a
    # partial sum of one scale and each step of Horner's rule lie below one of them
    bounds, done = [], []
    for scale in sorted({s for _, _, s in terms}, reverse=True):
        for k in [k for k, (_, _, s) in enumerate(terms) if s == scale]:
            done.append(k)
            bounds.append(sum(limb_max[terms[m][0]] * (terms[m][2] // scale) * sums[m] for m in done))
    bounds.append(bounds[-1] + np.abs(bias).astype(object))
    bound = max(int(np.max(v, initial=0)) for v in bounds)
    return _Plan(offset, count, terms, bias, bound <= INT32[1])


# Rough costs on ORT's CPU provider (ns): an int32 MatMul multiply-add; a uint8 × int8
# MatMulInteger one; one elementwise pass over an int32 element too large for the cache.
_NS_MAC_INT32, _NS_MAC_8BIT, _NS_PASS = 0.13, 0.006, 1.0


def _direct_int32(b: _Builder, plan: _Plan | None, flat: np.ndarray, bias: np.ndarray, x: str, rows: int) -> bool:
    """Whether one int32 MatMul does this conv/linear (``rows`` output rows a sample): it needs
    every partial sum inside int32, and to be cheaper than the 8-bit products, which pay for
    their many large partial sums (about three passes each) when K is small."""
    lo, hi = b.ranges[x]
    bound = int(np.abs(flat).sum(axis=0).max(initial=0)) * max(-lo, hi) + int(np.abs(bias).max(initial=0))
    if bound > INT32[1]:
        return False
    if plan is None:
        return True
    k, o = flat.shape
    macs, outputs = rows * k * o, rows * o
    products = len(plan.terms)
    return macs * _NS_MAC_INT32 + outputs * _NS_PASS < products * (macs * _NS_MAC_8BIT + 3 * outputs * _NS_PASS)


def _limbs(b: _Builder, x: str, plan: _Plan) -> list[str]:
    """``x − offset`` split into uint8 limbs."""
    hi = b.ranges[x][1] - plan.offset
    if b.dtype(x) == np.int32 and not _fits32(0, hi):
        x = b.cast(x, np.int64)
    dt = b.dtype(x)
    u = b.node("Sub", [x, b.const(plan.offset, dt)]) if plan.offset else x
    limbs = []
    for i in range(plan.limbs):
        # u >= 0: Div is the floor; the uint8 Cast keeps the low 8 bits (ONNX: an integer
        # Cast out of range discards the high bits), which is the limb without a mask
        t = b.node("Div", [u, b.const(256 ** i, dt)]) if i else u
        limbs.append(b.value(b.node("Cast", [t], to=TensorProto.UINT8), 0, min(255, hi >> (8 * i)), like=x))
    return limbs


def _products(b: _Builder, cols: list[str], plan: _Plan, name: str, width: int | None = None) -> str:
    """``Σ scale · (limb · digits) + bias`` over the plan's terms: one MatMulInteger each, a
    limb's products one after the other (its columns are still in the cache; separate tensors:
    stacking them costs a copy of each), each added to the sum of its scale as it comes, then
    the sums combined by Horner's rule, largest scale first, in int32 when the plan's bound
    allows (else int64)."""
    dt = np.int32 if plan.int32 else np.int64
    sums = {}
    for k in sorted(range(len(plan.terms)), key=lambda k: plan.terms[k][0]):
        i, digits, scale = plan.terms[k]
        y = b.node("MatMulInteger", [cols[i], b.const(digits.astype(np.int8), np.int8, name=f"{name}.weight_digit{k}")])
        y = y if dt == np.int32 else b.node("Cast", [y], to=TensorProto.INT64)
        sums[scale] = b.node("Add", [sums[scale], y]) if scale in sums else y
    acc, previous = None, None
    for scale in sorted(sums, reverse=True):
        acc = sums[scale] if acc is None else b.node("Add", [b.node("Mul", [acc, b.const(previous // scale, dt)]), sums[scale]])
        previous = scale
    if np.any(plan.bias):
        acc = b.node("Add", [acc, b.const(_per_channel(plan.bias, width), dt, name=f"{name}.bias")])
    return acc


def emit_conv2d(b: _Builder, op: IntOp, x: str, eight_bit: bool = True) -> str:
    weight = op.attrs["weight"].numpy()
    bias = op.attrs["bias"].numpy() if op.attrs["bias"] is not None else np.zeros(weight.shape[0], np.int64)
    o, c, kh, kw = weight.shape
    n, _, h, w = b.shapes[op.inputs[0]]
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    ho, wo = _out_size(h + 2 * ph, kh, stride[0], dil[0]), _out_size(w + 2 * pw, kw, stride[1], dil[1])
    flat = weight.transpose(2, 3, 1, 0).reshape(kh * kw * c, o)  # rows (kh, kw, c): the NHWC columns
    lo, hi = _interval(flat, bias, *b.ranges[x])
    plan = _plan(b, flat, bias, x) if eight_bit else None
    dt = np.int64
    if eight_bit and _direct_int32(b, plan, flat, bias, x, ho * wo):
        plan, dt = None, np.int32
    if plan is None and x not in b.channels_last:
        return b.value(_conv_columns_first(b, op, b.cast(x, dt), flat, bias), min(lo), max(hi))
    x = b.nhwc(x)
    if plan is not None:  # padding is a code 0 like any other: each limb pads with its digit of −offset
        cols = [_im2col(b, _pad(b, limb, (ph, pw), (-plan.offset >> (8 * i)) & 255), (h + 2 * ph, w + 2 * pw),
                        (kh, kw), stride, dil) for i, limb in enumerate(_limbs(b, x, plan))]
        acc = _products(b, cols, plan, op.out, wo)
    else:
        cols = _im2col(b, _pad(b, b.cast(x, dt), (ph, pw)), (h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
        acc = b.node("MatMul", [cols, b.const(flat, dt, name=f"{op.out}.weight")])
        if np.any(bias):  # a zero bias (batch norm folded at its initial statistics) adds nothing
            acc = b.node("Add", [acc, b.const(_per_channel(bias, wo), dt, name=f"{op.out}.bias")])
    b.channels_last.add(acc)
    return b.value(acc, min(lo), max(hi))


def _conv_columns_first(b: _Builder, op: IntOp, x: str, flat: np.ndarray, bias: np.ndarray) -> str:
    """An NCHW conv as one MatMul ``(O, K) · (N, K, Ho · Wo)`` with the kernel offsets outermost
    in the columns: each offset's slice is one block of the concatenation (the channels-last
    columns copy C elements at a time, four bytes a run for a one-channel input); the product
    is NCHW as it stands."""
    n, c, h, w = b.shapes[op.inputs[0]]
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    kh, kw = op.attrs["weight"].shape[2:]
    ho, wo = _out_size(h + 2 * ph, kh, stride[0], dil[0]), _out_size(w + 2 * pw, kw, stride[1], dil[1])
    dt = b.dtype(x)
    taps = _slices(b, _pad(b, x, (ph, pw)), (h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
    cols = b.node("Concat", taps, axis=1) if len(taps) > 1 else taps[0]  # (N, kh · kw · C, Ho, Wo)
    cols = b.node("Reshape", [cols, b.const([0, flat.shape[0], ho * wo])])
    acc = b.node("MatMul", [b.const(flat.T, dt, name=f"{op.out}.weight"), cols])
    b.types[acc] = dt  # the first operand is a constant: the type does not follow it
    acc = b.node("Reshape", [acc, b.const([0, flat.shape[1], ho, wo])])
    if np.any(bias):
        acc = b.node("Add", [acc, b.const(bias.reshape(-1, 1, 1), dt, name=f"{op.out}.bias")])
    return acc


def emit_linear(b: _Builder, op: IntOp, x: str, eight_bit: bool = True) -> str:
    weight = op.attrs["weight"].numpy()
    bias = op.attrs["bias"].numpy() if op.attrs["bias"] is not None else np.zeros(weight.shape[0], np.int64)
    flat = weight.T.copy()
    x = b.nchw(x)
    lo, hi = _interval(flat, bias, *b.ranges[x])
    plan = _plan(b, flat, bias, x) if eight_bit else None
    dt = np.int64
    if eight_bit and _direct_int32(b, plan, flat, bias, x, 1):
        plan, dt = None, np.int32
    if plan is not None:
        acc = _products(b, _limbs(b, x, plan), plan, op.out)
    else:
        acc = b.node("MatMul", [b.cast(x, dt), b.const(flat, dt, name=f"{op.out}.weight")])
        if np.any(bias):
            acc = b.node("Add", [acc, b.const(bias, dt, name=f"{op.out}.bias")])
    return b.value(acc, min(lo), max(hi))


def emit_max_pool2d(b: _Builder, op: IntOp, x: str) -> str:
    """Max over the kernel-offset slices; tiling windows are two ``ReduceMax`` over reshapes
    instead (whole rows, then C-element runs of a channels-last value: fewer copies; an NCHW
    value is transposed between the two, when the rows have made it ``kh`` times smaller).
    ``attrs["bias"]`` (per channel) is added after the max."""
    n, c, h, w = b.shapes[op.inputs[0]]
    (ph, pw), (kh, kw), stride = op.attrs["padding"], op.attrs["kernel"], op.attrs["stride"]
    lo, hi = b.ranges[x]
    if _tiling(op, h, w) and not (ph or pw) and op.attrs["dilation"] == (1, 1):
        def reduce_max(t, k):
            return b.node("ReduceMax", [t, b.const([1])], keepdims=0)
        if x in b.channels_last:
            out = _reduce_tiles(b, x, op, reduce_max)
        else:
            rows = reduce_max(b.node("Reshape", [x, b.const([-1, kh, w])]), kh)
            rows = b.nhwc(b.value(b.node("Reshape", [rows, b.const([-1, c, h // kh, w])]), lo, hi))
            out = _reduce_columns(b, rows, op, reduce_max)
    else:
        xp = _pad(b, x, (ph, pw), np.iinfo(b.dtype(x)).min)  # padding never wins a max
        wins = _slices(b, xp, (h + 2 * ph, w + 2 * pw), (kh, kw), stride, op.attrs["dilation"])
        out = b.node("Max", wins) if len(wins) > 1 else wins[0]
    b.value(out, lo, hi, like=x)
    bias = op.attrs.get("bias")
    if bias is None:
        return out
    bias = bias.numpy()
    lo, hi = lo + int(bias.min()), hi + int(bias.max())
    out = b.cast(out, _int_type(lo, hi))
    bias = _per_channel(bias, b.shapes[op.out][3]) if out in b.channels_last else bias.reshape(-1, 1, 1)
    return b.value(b.node("Add", [out, b.const(bias, b.dtype(out), name=f"{op.out}.bias")]), lo, hi, like=out)


def emit_sum_pool2d(b: _Builder, op: IntOp, x: str) -> str:
    """The sum of the kernel-offset slices; tiling windows of a channels-last value sum the
    parts of two ``Split`` instead (whole rows, then C-element runs: two copies, not kh · kw
    strided ones)."""
    (kh, kw), stride = op.attrs["kernel"], op.attrs["stride"]
    n, c, h, w = b.shapes[op.inputs[0]]
    k = kh * kw
    lo, hi = b.ranges[x]
    x = b.cast(x, _int_type(k * lo, k * hi))
    if x in b.channels_last and _tiling(op, h, w):
        total = _reduce_tiles(b, x, op, lambda t, parts: _sum_of_parts(b, t, parts))
        return b.value(total, k * lo, k * hi)
    return b.value(_sum(b, _slices(b, x, (h, w), (kh, kw), stride)), k * lo, k * hi, like=x)


def _tiling(op: IntOp, h: int, w: int) -> bool:
    """Whether the pool's windows tile the (unpadded) h × w input: stride = kernel, dividing it."""
    (kh, kw), stride = op.attrs["kernel"], op.attrs["stride"]
    return (kh, kw) == tuple(stride) and h % kh == 0 and w % kw == 0


def _reduce_tiles(b: _Builder, x: str, op: IntOp, reduce: Callable) -> str:
    """A tiling pool of channels-last ``x`` by ``reduce(t, k)`` (over axis 1, of size ``k``):
    whole rows first, then C-element runs."""
    _, c, _, w = b.shapes[op.inputs[0]]
    kh = op.attrs["kernel"][0]
    return _reduce_columns(b, reduce(b.node("Reshape", [x, b.const([-1, kh, w * c])]), kh), op, reduce)


def _reduce_columns(b: _Builder, rows: str, op: IntOp, reduce: Callable) -> str:
    """The second stage of :func:`_reduce_tiles`: channels-last ``rows`` (already reduced over
    the kernel's rows) reduced over C-element runs of the kernel's columns."""
    _, c, h, w = b.shapes[op.inputs[0]]
    kh, kw = op.attrs["kernel"]
    out = reduce(b.node("Reshape", [rows, b.const([-1, kw, c])]), kw)
    out = b.node("Reshape", [out, b.const([-1, h // kh, w // kw, c])])
    b.channels_last.add(out)
    return out


def _sum(b: _Builder, parts: list[str]) -> str:
    total = parts[0]
    for part in parts[1:]:  # Sum has no integer kernel
        total = b.node("Add", [total, part])
    return total


def _sum_of_parts(b: _Builder, x: str, k: int) -> str:
    """The sum over axis 1 (of size ``k``) of ``x``."""
    return _sum(b, b.split(x, k, axis=1)) if k > 1 else x


def emit_add(b: _Builder, op: IntOp, x: str, y: str) -> str:
    sx, sy = op.attrs["shifts"]
    if (x in b.channels_last) != (y in b.channels_last):
        x, y = b.nhwc(x), b.nhwc(y)
    (xl, xh), (yl, yh) = b.ranges[x], b.ranges[y]
    lo, hi = (xl << sx) + (yl << sy), (xh << sx) + (yh << sy)
    dt = np.int32 if all(_fits32(*r) for r in ((lo, hi), (xl << sx, xh << sx), (yl << sy, yh << sy))) else np.int64
    layout, x, y = x, b.cast(x, dt), b.cast(y, dt)
    x = b.node("Mul", [x, b.const(1 << sx, dt)]) if sx else x
    y = b.node("Mul", [y, b.const(1 << sy, dt)]) if sy else y
    return b.value(b.node("Add", [x, y]), lo, hi, like=layout)


def emit_relu(b: _Builder, op: IntOp, x: str) -> str:
    return _relu(b, x)


def emit_reshape(b: _Builder, op: IntOp, x: str) -> str:
    x = b.nchw(x)  # the shape is in NCHW order
    out = b.node("Reshape", [x, b.const(list(op.attrs["shape"]))])
    return b.value(out, *b.ranges[x])


EMITTERS: dict[str, Callable] = {
    "quantize": emit_quantize,
    "requantize": emit_requantize,
    "dequantize": emit_dequantize,
    "conv2d": emit_conv2d,
    "linear": emit_linear,
    "relu": emit_relu,
    "max_pool2d": emit_max_pool2d,
    "sum_pool2d": emit_sum_pool2d,
    "add": emit_add,
    "reshape": emit_reshape,
}
_WEIGHTED = {"conv2d", "linear"}


def _rewrite(graph: IntegerGraph) -> tuple[list[IntOp], dict]:
    """The ops to emit and their shapes: a saturating requantize (and a ReLU after it) moved
    behind the max pool that follows them (both are non-decreasing, so they commute with
    max; the conv's bias moves behind the pool too), then a ReLU after a saturating
    requantize folded into its clamp."""
    ops, shapes = list(graph.ops), dict(graph.shapes)

    def producer(name):
        return next((o for o in ops if o.out == name), None)

    def only_user(op):
        users = [u for u in ops if op.out in u.inputs]
        return users[0] if len(users) == 1 and op.out not in graph.outputs else None

    def saturating(op):
        return op is not None and op.op == "requantize" and op.attrs["fmt"].overflow == "saturate"

    def index(op):
        return next(i for i, o in enumerate(ops) if o is op)

    for pool in [p for p in ops if p.op == "max_pool2d"]:
        chain, src = [], producer(pool.inputs[0])
        if src is not None and src.op == "relu" and only_user(src) is pool:
            chain, src = [src], producer(src.inputs[0])
        if not (saturating(src) and only_user(src) is (chain[0] if chain else pool)):
            continue
        chain.insert(0, src)
        acc = producer(src.inputs[0])
        if acc is None:
            continue
        pooled_attrs = dict(pool.attrs)
        if acc.op == "conv2d" and acc.attrs["bias"] is not None and only_user(acc) is src:
            # a per-channel constant commutes with a max over one channel's window too
            pooled_attrs["bias"] = acc.attrs["bias"]
            ops[index(acc)] = dataclasses.replace(acc, attrs={**acc.attrs, "bias": None})
        moved = [dataclasses.replace(pool, out=f"{pool.out}_acc", inputs=(acc.out,), frac=acc.frac, fmt=acc.fmt,
                                     attrs=pooled_attrs)]
        for k, op in enumerate(chain):
            out = pool.out if k == len(chain) - 1 else f"{op.out}_pooled"
            moved.append(dataclasses.replace(op, inputs=(moved[-1].out,), out=out))
        for op in moved:
            shapes[op.out] = graph.shapes[pool.out]
        at = index(src)
        ops = [o for o in ops if all(o is not c for c in (pool, *chain))]
        ops[at:at] = moved
    for relu in [r for r in ops if r.op == "relu"]:
        src = producer(relu.inputs[0])
        if saturating(src) and only_user(src) is relu:
            ops[index(src)] = dataclasses.replace(src, out=relu.out, attrs={**src.attrs, "relu": True})
            del ops[index(relu)]
    return ops, shapes


def to_onnx(graph: IntegerGraph, name: str = "fxcompile_integer", eight_bit: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``graph``: float inputs (batch dimension ``N``), float and int64 outputs.

    ``eight_bit`` lowers conv/linear to 8-bit ``MatMulInteger`` on limbs where that is exact
    (fast on ORT); ``False`` keeps every product in an int64 ``MatMul``.
    """
    ops, shapes = _rewrite(graph)
    b, env = _Builder(graph, shapes), {}
    inputs = []
    for inp, shape in zip(graph.inputs, graph.input_shapes):
        env[inp] = inp
        inputs.append(helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", *shape[1:]]))
    outputs, codes = [], []
    for op in ops:
        b.prefix = f"{op.op}/{op.out}"
        args = [env[i] for i in op.inputs]
        if op.op == "dequantize":
            args = [b.nchw(args[0])]
        kwargs = {"eight_bit": eight_bit} if op.op in _WEIGHTED else {}
        env[op.out] = EMITTERS[op.op](b, op, *args, **kwargs)
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
