"""Integer arithmetic on ONNX ops: rounding shifts, saturation, wrapping, and which values fit
int32."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ....core.formats import FixedPoint
from .builder import _Builder

INT32 = (-(2 ** 31), 2 ** 31 - 1)


def _saturation(op) -> tuple[int, int]:
    """The codes a saturating requantize ``op`` ends in: its format's range, from 0 up with a
    folded ReLU (``attrs["relu"]``), within a folded clip's bounds (``attrs["clamp"]``)."""
    lo, hi = _centred_range(op.attrs["fmt"])
    if op.attrs.get("relu"):
        lo, hi = max(lo, 0), max(hi, 0)
    if "clamp" in op.attrs:
        lo, hi = max(lo, op.attrs["clamp"][0]), min(hi, op.attrs["clamp"][1])
    return lo, hi


def _fits32(lo: int, hi: int) -> bool:
    return INT32[0] <= lo and hi <= INT32[1]


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


def _int_type(lo: int, hi: int) -> type:
    return np.int32 if _fits32(lo, hi) else np.int64


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


def _round_shift(b: _Builder, v: str, s: int, rounding: str, lo: int, hi: int, narrow: bool = False) -> str:
    """``v / 2**s`` rounded (``nearest``: ties to even) for ``v`` in [lo, hi]; ``narrow``: in
    int32 wherever the values fit, even when ``v`` is int64 (a clipped accumulator: ORT's
    int64 Div costs three times its int32 one), else in ``v``'s type or int64."""
    d = 1 << s
    if rounding == "toward_zero":  # integer Div truncates toward zero
        return b.value(b.node("Div", [v, b.const(d, b.dtype(v))]), _trunc(lo, d), _trunc(hi, d), like=v)
    m = (lo // (2 * d)) * 2 if lo < 0 else 0  # an even offset keeps ties to even where they were
    if not (_fits32(lo - d, hi + d) and _fits32(0, max(hi, 0) - m * d + d)):
        v = b.cast(v, np.int64)
    elif narrow:
        v = b.cast(v, np.int32)
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
        t = b.node("Add", [v, b.const(d // 2 - 1 - m * d, dt)])
        if dt == np.int32 and s <= 7 and _fits32(lo << (7 - s), hi << (7 - s)):
            t = b.node("Sub", [t, _minus_bit(b, v, s)])
        else:
            t = b.node("Add", [t, b.node("Min", [b.node("BitwiseAnd", [v, b.const(d, dt)]), b.const(1, dt)])])
    q = b.node("Div", [t, b.const(d, dt)])  # t >= 0: Div is the floor
    q = b.node("Add", [q, b.const(m, dt)]) if m else q
    return b.value(q, lo // d, -(-hi // d), like=v)


def _minus_bit(b: _Builder, v: str, s: int) -> str:
    """−(bit ``s`` of int32 ``v``) for ``s`` <= 7, as int32, without ``BitwiseAnd`` (ORT runs it
    element by element, five times slower than a Mul): ``v · 2**(7 − s)`` cast to int8 keeps its
    low eight bits (ONNX: an integer Cast out of range discards the high bits), whose sign bit is
    bit ``s`` of ``v``; clamped to [−1, 0] it is that bit, negated."""
    t = b.node("Mul", [v, b.const(1 << (7 - s), np.int32)]) if s < 7 else v
    low = b.node("Cast", [t], to=TensorProto.INT8)
    bit = b.node("Max", [b.node("Min", [low, b.const(0, np.int8)]), b.const(-1, np.int8)])
    return b.node("Cast", [bit], to=TensorProto.INT32)


def _trunc(v: int, d: int) -> int:
    return -(-v // d) if v < 0 else v // d
