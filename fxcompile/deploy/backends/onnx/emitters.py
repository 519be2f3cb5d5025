"""The emitters of the other integer ops (quantize, requantize, dequantize, pools, add, ReLU,
reshape, products of two activations, softmax, LayerNorm, clip,
lookup) and :data:`EMITTERS`, the table from integer op to emitter."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from onnx import TensorProto

from ....core import intmath
from ....core.formats import FixedPoint
from ...lower import IntOp
from .arithmetic import _centred_range, _clip, _fits32, _int_type, _relu, _round_shift, _saturation, _wide, _wrap
from .builder import _ONNX_TYPE, _Builder, _per_channel
from .matmul import _pad, _slices, emit_conv2d, emit_linear

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


def emit_requantize(b: _Builder, op: IntOp, v: str) -> str:
    """Rounding shift, then saturation (with ``attrs["relu"]``, clamped at 0 too; with
    ``attrs["clamp"]``, to its bounds) or wrap."""
    fmt: FixedPoint = op.attrs["fmt"]
    s, rounding = op.attrs["shift"], fmt.rounding
    vlo, vhi = b.ranges[v]
    olo, ohi = _saturation(op) if fmt.overflow == "saturate" else _centred_range(fmt)
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
    return b.cast(_round_shift(b, t, s, rounding, lo, hi, narrow=True), out_type)


def emit_dequantize(b: _Builder, op: IntOp, v: str) -> str:
    t = b.node("Mul", [b.node("Cast", [v], to=TensorProto.DOUBLE), b.const(2.0 ** -op.frac, np.float64)])
    return b.node("Cast", [t], to=TensorProto.FLOAT)


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


def emit_scale(b: _Builder, op: IntOp, x: str) -> str:
    """Codes times the integer ``attrs["factor"]``, in the narrowest integer type that holds the
    product; a per-position factor (oh, ow) multiplies the NCHW value."""
    if isinstance(op.attrs["factor"], torch.Tensor):
        factors, (lo, hi) = op.attrs["factor"].numpy(), b.ranges[x]
        cmin, cmax = int(factors.min()), int(factors.max())  # positive
        lo, hi = min(lo * cmax, lo * cmin), max(hi * cmax, hi * cmin)
        x = b.cast(b.nchw(x), _int_type(lo, hi))
        return b.value(b.node("Mul", [x, b.const(factors, b.dtype(x), name=f"{op.out}.factors")]), lo, hi)
    c, (lo, hi) = op.attrs["factor"], b.ranges[x]
    lo, hi = min(lo * c, hi * c), max(lo * c, hi * c)
    layout, x = x, b.cast(x, _int_type(lo, hi))
    return b.value(b.node("Mul", [x, b.const(c, b.dtype(x))]), lo, hi, like=layout)


def emit_adaptive_sum_pool2d(b: _Builder, op: IntOp, x: str) -> str:
    """Window sums over uneven or overlapping windows: ``MatMul`` by constant 0/1 matrices
    marking each window, rows then columns (int32 when the largest window's sums fit)."""
    rows, cols = op.attrs["rows"], op.attrs["cols"]
    _, _, h, w = b.shapes[op.inputs[0]]
    a, c = np.zeros((len(rows), h), np.int64), np.zeros((w, len(cols)), np.int64)
    for i, (s, e) in enumerate(rows):
        a[i, s:e] = 1
    for j, (s, e) in enumerate(cols):
        c[s:e, j] = 1
    k = max(e - s for s, e in rows) * max(e - s for s, e in cols)
    lo, hi = b.ranges[x]
    lo, hi = min(lo, k * lo), max(hi, k * hi)
    x = b.cast(b.nchw(x), _int_type(lo, hi))
    dt = b.dtype(x)
    t = b.node("MatMul", [b.const(a, dt), x])
    b.types[t] = dt  # the first operand is a constant: the type does not follow it
    return b.value(b.node("MatMul", [t, b.const(c, dt)]), lo, hi)


def emit_add(b: _Builder, op: IntOp, x: str, y: str) -> str:
    sx, sy = op.attrs["shifts"]
    if (x in b.channels_last) != (y in b.channels_last):
        x, y = b.nhwc(x), b.nhwc(y)
    (xl, xh), (yl, yh) = b.ranges[x], b.ranges[y]
    subtract = op.attrs.get("subtract", False)
    if subtract:  # x − y: y's interval turned around
        yl, yh = -yh, -yl
    lo, hi = (xl << sx) + (yl << sy), (xh << sx) + (yh << sy)
    dt = np.int32 if all(_fits32(*r) for r in ((lo, hi), (xl << sx, xh << sx), (yl << sy, yh << sy))) else np.int64
    layout, x, y = x, b.cast(x, dt), b.cast(y, dt)
    x = b.node("Mul", [x, b.const(1 << sx, dt)]) if sx else x
    y = b.node("Mul", [y, b.const(1 << sy, dt)]) if sy else y
    return b.value(b.node("Sub" if subtract else "Add", [x, y]), lo, hi, like=layout)


def emit_relu(b: _Builder, op: IntOp, x: str) -> str:
    return _relu(b, x)


def emit_reshape(b: _Builder, op: IntOp, x: str) -> str:
    x = b.nchw(x)  # the shape is in NCHW order
    out = b.node("Reshape", [x, b.const(list(op.attrs["shape"]))])
    return b.value(out, *b.ranges[x])


# ---- products of two activations and softmax (fxcompile.core.intmath) ----------------------

def emit_matmul(b: _Builder, op: IntOp, x: str, y: str) -> str:
    """One ``MatMul`` of the two operands' codes, in int32 when ``K · max|x| · max|y|`` fits it
    (else int64), between the ``Transpose`` of ``attrs["perms"]`` (an einsum's layouts)."""
    pa, pb, po = op.attrs["perms"] or (None, None, None)
    x, y = b.nchw(x), b.nchw(y)
    k = b.shapes[op.inputs[0]][pa[-1] if pa else -1]
    bound = k * max(map(abs, b.ranges[x])) * max(map(abs, b.ranges[y]))
    dt = np.int32 if _fits32(-bound, bound) else np.int64
    x, y = b.cast(x, dt), b.cast(y, dt)
    x = b.node("Transpose", [x], perm=list(pa)) if pa else x
    y = b.node("Transpose", [y], perm=list(pb)) if pb else y
    out = b.node("MatMul", [x, y])
    return b.value(b.node("Transpose", [out], perm=list(po)) if po else out, -bound, bound)


# The widest numerator the one-division forms of softmax and LayerNorm may build (else they
# take the longer forms that stay inside int64)
_ONE_DIVISION_LIMIT = 2 ** 62


def _row_sum(b: _Builder, x: str, n: int) -> str:
    """The sum over the last axis (of size ``n``) of ``x``, kept as an axis of 1: a ``MatMul`` by
    a column of ones (ORT's ``ReduceSum`` costs several times as much, ``int64`` most)."""
    return b.node("MatMul", [x, b.const(np.ones((n, 1)), b.dtype(x))])


def _table_lookup(b: _Builder, table: str, index: str, dtype) -> str:
    """``table[index]`` (a 1-D table, int32 indices inside it): ``GatherElements`` on the
    flattened indices, reshaped back (ORT's ``Gather`` copies one element at a time, about ten
    times slower)."""
    flat = b.node("Reshape", [index, b.const([-1])])
    out = b.node("GatherElements", [table, flat], axis=0)
    out = b.node("Reshape", [out, b.node("Shape", [index])])
    b.types[out] = dtype
    return out


def emit_softmax(b: _Builder, op: IntOp, x: str) -> str:
    """:func:`fxcompile.core.intmath.softmax_codes`: ``ReduceMax``, the differences (capped at
    the table's last, zero, entry) and the exp table's entries in int32, their row sum (a
    ``MatMul`` by ones) in int64, and one int64 ``Div`` (the floor: all non-negative) rounding
    ``e · 2**frac / s``: ``nearest`` is ``q = ⌊(2n + s) / 2s⌋`` (half up), less one on a tie
    (``q · 2s = 2n + s``) with ``q`` odd."""
    table = op.attrs["table"].numpy()
    lo, hi = b.ranges[x]
    rows = b.shapes[op.inputs[0]][-1]
    x = b.cast(b.nchw(x), _int_type(lo - hi, hi - lo))
    d = b.node("Sub", [b.node("ReduceMax", [x, b.const([-1])], keepdims=1), x])
    d = b.cast(b.value(b.node("Min", [d, b.const(len(table) - 1, b.dtype(x))]), 0, len(table) - 1), np.int32)
    tdt = _int_type(int(table.min()), int(table.max()))
    e = _table_lookup(b, b.const(table, tdt, name=f"{op.out}.exp_table"), d, tdt)
    e = b.cast(b.value(e, int(table.min()), int(table.max())), np.int64)
    s = _row_sum(b, e, rows)
    if (2 << op.frac) * int(table.max()) + rows * int(table.max()) >= _ONE_DIVISION_LIMIT:  # no room for 2n + s
        q = b.node("Div", [b.node("Mul", [e, b.const(1 << op.frac)]), s])
        if op.attrs["rounding"] == "nearest":  # the bump (2r + (q AND 1)) / (s + 1)
            r = b.node("Sub", [b.node("Mul", [e, b.const(1 << op.frac)]), b.node("Mul", [q, s])])
            bump = b.node("Add", [b.node("Add", [r, r]), b.node("BitwiseAnd", [q, b.const(1)])])
            q = b.node("Add", [q, b.node("Div", [bump, b.node("Add", [s, b.const(1)])])])
        return b.value(q, 0, 1 << op.frac)
    if op.attrs["rounding"] != "nearest":
        q = b.node("Div", [b.node("Mul", [e, b.const(1 << op.frac)]), s])
        return b.value(q, 0, 1 << op.frac)
    s2 = b.node("Add", [s, s])
    num = b.node("Add", [b.node("Mul", [e, b.const(1 << (op.frac + 1))]), s])
    q = b.node("Div", [num, s2])
    tie = b.node("Cast", [b.node("Equal", [b.node("Mul", [q, s2]), num])], to=TensorProto.INT64)
    q = b.node("Sub", [q, b.node("Mul", [tie, b.node("BitwiseAnd", [q, b.const(1)])])])
    return b.value(q, 0, 1 << op.frac)


def _floor_divide(b: _Builder, num: str, den: str) -> str:
    """``⌊num / den⌋`` for ``den > 0`` (int64): ``Div`` truncates, so the remainder ``Mod`` (the
    divisor's sign) is taken off first and the division is exact."""
    return b.node("Div", [b.node("Sub", [num, b.node("Mod", [num, den], fmod=0)]), den])


def emit_isqrt(b: _Builder, n: str, lo: int = 0) -> str:
    """:func:`fxcompile.core.intmath.isqrt` of non-negative int64 ``n`` (>= ``lo``): the bit
    length ``b`` as the count of powers of two at most ``n`` (one broadcast comparison and its
    row sum), the start ``2**ceil(b/2)`` from a table, six Newton steps (``max(k, 1)`` only
    when ``n`` may be 0)."""
    powers = b.const((1 << np.arange(63, dtype=np.uint64)).astype(np.int64))
    count = b.node("Cast", [b.node("GreaterOrEqual", [b.node("Unsqueeze", [n, b.const([-1])]), powers])],
                   to=TensorProto.INT32)
    length = b.node("ReduceSum", [count, b.const([-1])], keepdims=0)
    starts = b.const([1 << ((k + 1) >> 1) for k in range(64)])
    k = b.node("Gather", [starts, length], axis=0)
    for _ in range(intmath.ISQRT_STEPS):
        den = k if lo >= 1 else b.node("Max", [k, b.const(1)])
        step = b.node("Div", [b.node("Add", [k, b.node("Div", [n, den])]), b.const(2)])
        k = b.node("Min", [k, step])
    return k


def emit_layer_norm(b: _Builder, op: IntOp, x: str) -> str:
    """:func:`fxcompile.core.intmath.layer_norm_codes` with the same integers, computed with
    fewer passes over the elements:

    * the row sums ``S = Σx`` and ``Q = Σx²`` (``MatMul`` by ones), from which, per row,
      ``m_p`` and ``Σc² = 4**p · Q − 2**(p+1) · m_p · S + n · m_p²`` (the same integer as
      summing ``c = x · 2**p − m_p`` squared), ``V`` and ``R = isqrt(V · 4**g)``; for rows of
      ``n = 2**L`` (``p >= L``) the means are exact, ``m_p = S · 2**(p − L)``, and
      ``V = 2**(2p − 2L) · (n · Q − S²)``;
    * ``z = ⌊(2**(q+1) · x − 2 m_q + R) / 2R⌋`` by one int64 ``Div`` of a numerator made
      non-negative by a per-row multiple ``K · 2R`` of the divisor, taken off after
      (``K = ⌈(2**(q+1) · (−lo) + 2 m_q − R) / 2R⌉``, ``lo`` the smallest code);
    * the affine map.  When the offset numerator could leave int64, ``Mod`` gives the floor."""
    plan, w, bias = op.attrs["plan"], op.attrs["weight"], op.attrs["bias"]
    p, g, k, e, n = plan["p"], plan["g"], plan["k"], plan["e"], plan["n"]
    q = k + g + p
    x = b.nchw(x)
    lo, hi = b.ranges[x]
    big = max(-lo, hi)
    xs = b.cast(x, _int_type(-n * big, n * big))
    total = _row_sum(b, xs, n)
    total = total if b.dtype(xs) == np.int64 else b.node("Cast", [total], to=TensorProto.INT64)
    x = b.cast(x, np.int64)
    squares = _row_sum(b, b.node("Mul", [x, x]), n)

    def mean(bits):  # the row mean with as many extra bits, rounded half up
        if shift is not None:  # n = 2**L, bits >= L: ⌊S · 2**(bits − L) + 1/2⌋ is exact
            return b.node("Mul", [total, b.const(1 << (bits - shift))])
        return _floor_divide(b, b.node("Add", [b.node("Mul", [total, b.const(1 << (bits + 1))]), b.const(n)]),
                             b.const(2 * n))
    shift = n.bit_length() - 1 if n & (n - 1) == 0 and p >= n.bit_length() - 1 else None
    if shift is not None:  # Σc² = 2**(2p − L) · (n · Q − S²) and V = Σc² / n exactly: (V + e) · 4**g at once
        scale = b.const(1 << (2 * (p - shift + g)))
        spread = b.node("Sub", [b.node("Mul", [squares, b.const(n)]), b.node("Mul", [total, total])])
        radicand = b.node("Add", [b.node("Mul", [spread, scale]), b.const(e << (2 * g))])
    else:
        m = mean(p)
        cc = b.node("Sub", [b.node("Mul", [squares, b.const(1 << (2 * p))]),
                            b.node("Mul", [b.node("Mul", [m, total]), b.const(1 << (p + 1))])])
        cc = b.node("Add", [cc, b.node("Mul", [b.node("Mul", [m, m]), b.const(n)])])
        v = b.node("Div", [cc, b.const(n)])
        radicand = b.node("Mul", [b.node("Add", [v, b.const(e)]), b.const(1 << (2 * g))])
    r = emit_isqrt(b, radicand, lo=e << (2 * g))
    r2 = b.node("Add", [r, r])
    m2 = mean(q + 1) if shift is not None else b.node("Mul", [mean(q), b.const(2)])
    r_max = math.isqrt((((hi - lo << p) + 1) ** 2 + e) << (2 * g)) + 1  # |c| <= 2**p · (hi − lo) + 1
    if (hi - lo) * 2 ** (q + 1) + 2 * r_max < _ONE_DIVISION_LIMIT:
        # K · 2R >= 2**(q+1) · (−lo) + 2 m_q − R >= −R, so K >= 0 and the numerator >= 0
        times = b.node("Div", [b.node("Add", [b.node("Add", [m2, r]), b.const(-lo * 2 ** (q + 1) - 1)]), r2])
        offset = b.node("Add", [b.node("Sub", [b.node("Mul", [times, r2]), m2]), r])
        num = b.node("Add", [b.node("Mul", [x, b.const(2 ** (q + 1))]), offset])
        z = b.node("Sub", [b.node("Div", [num, r2]), times])
    else:
        num = b.node("Add", [b.node("Sub", [b.node("Mul", [x, b.const(2 ** (q + 1))]), m2]), r])
        z = _floor_divide(b, num, r2)
    top = (math.isqrt(n) + 1) << k
    if w is not None:
        z = b.node("Mul", [z, b.const(w.numpy(), name=f"{op.out}.weight")])
        top *= int(w.abs().max())
    if bias is not None:
        z = b.node("Add", [z, b.const(bias.numpy(), name=f"{op.out}.bias")])
        top += int(bias.abs().max())
    return b.value(z, -top, top)


# ---- structural ops: each works on the NCHW value (its attributes are in NCHW order) ------

def emit_transpose(b: _Builder, op: IntOp, x: str) -> str:
    x = b.nchw(x)
    return b.value(b.node("Transpose", [x], perm=list(op.attrs["perm"])), *b.ranges[x])


def emit_slice(b: _Builder, op: IntOp, x: str) -> str:
    x = b.nchw(x)
    a = op.attrs
    out = b.node("Slice", [x, b.const(list(a["starts"])), b.const(list(a["ends"])), b.const(list(a["axes"])),
                           b.const(list(a["steps"]))])
    return b.value(out, *b.ranges[x])


def emit_concat(b: _Builder, op: IntOp, *xs: str) -> str:
    """The operands shifted to one binary point (in int32 when every shifted interval fits), then ``Concat``."""
    xs = [b.nchw(x) for x in xs]
    ranges = [(b.ranges[x][0] << s, b.ranges[x][1] << s) for x, s in zip(xs, op.attrs["shifts"])]
    dt = np.int32 if all(_fits32(*r) for r in ranges) else np.int64
    parts = []
    for x, s in zip(xs, op.attrs["shifts"]):
        x = b.cast(x, dt)
        parts.append(b.node("Mul", [x, b.const(1 << s, dt)]) if s else x)
    out = b.node("Concat", parts, axis=op.attrs["axis"]) if len(parts) > 1 else parts[0]
    return b.value(out, min(r[0] for r in ranges), max(r[1] for r in ranges))


def emit_mul(b: _Builder, op: IntOp, x: str, y: str) -> str:
    """The product of codes, in int32 when the product of the intervals fits, else int64."""
    x, y = b.nchw(x), b.nchw(y)
    corners = [u * v for u in b.ranges[x] for v in b.ranges[y]]
    lo, hi = min(corners), max(corners)
    dt = np.int32 if _fits32(lo, hi) else np.int64
    return b.value(b.node("Mul", [b.cast(x, dt), b.cast(y, dt)]), lo, hi)


def emit_affine(b: _Builder, op: IntOp, x: str) -> str:
    """Per-channel ``x · scale + offset`` (a stand-alone batch norm), in int32 when every
    channel's interval fits, else int64.  A channels-last 4-D value stays so, with the
    constants tiled to (W, C) (no Transpose there and back around every batch norm)."""
    nhwc = x in b.channels_last and len(b.shapes[op.inputs[0]]) == 4
    x = x if nhwc else b.nchw(x)
    scale, offset = op.attrs["scale"].numpy(), op.attrs["offset"].numpy()
    if x in b.shifted:  # x = t − z (a QLinearConv's uint8 output): (t − z) · s + o = t · s + (o − z · s)
        x, z = b.shifted[x]
        offset = offset - z * scale
    lo, hi = b.ranges[x]
    prods = [scale.astype(object) * lo, scale.astype(object) * hi]
    low = np.minimum(*prods) + offset.astype(object)
    high = np.maximum(*prods) + offset.astype(object)
    out_lo, out_hi = int(low.min()), int(high.max())
    dt = np.int32 if _fits32(out_lo, out_hi) and _fits32(int(np.minimum(*prods).min()), int(np.maximum(*prods).max())) \
        else np.int64
    if nhwc:
        width = b.shapes[op.inputs[0]][3]
        scale, offset = _per_channel(scale, width), _per_channel(offset, width)
    else:
        shape = (-1,) + (1,) * (len(b.shapes[op.inputs[0]]) - 2)
        scale, offset = scale.reshape(shape), offset.reshape(shape)
    t = b.node("Mul", [b.cast(x, dt), b.const(scale, dt, name=f"{op.out}.scale")])
    t = b.node("Add", [t, b.const(offset, dt, name=f"{op.out}.offset")])
    return b.value(t, out_lo, out_hi, like=x)


def emit_pad(b: _Builder, op: IntOp, x: str) -> str:
    x = b.nchw(x)
    rank, pads = len(b.shapes[op.inputs[0]]), op.attrs["pads"]
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):  # torch: (last axis begin, end, the axis before ...)
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    lo, hi = b.ranges[x]
    value = op.attrs.get("value", 0)  # zeros, or a max pool's smallest code (ceil_mode)
    out = b.node("Pad", [x, b.const(begin + end), b.const(value, b.dtype(x))])
    return b.value(out, min(lo, value), max(hi, value))


def emit_upsample(b: _Builder, op: IntOp, x: str) -> str:
    """Nearest upsampling by integer factors: a view (N, C, H, 1, W, 1) expanded to
    (N, C, H, fh, W, fw) and reshaped (``Expand`` has integer kernels; ``Resize`` has no int64 one)."""
    x = b.nchw(x)
    _, c, h, w = b.shapes[op.inputs[0]]
    fh, fw = op.attrs["factors"]
    t = b.node("Reshape", [x, b.const([-1, c, h, 1, w, 1])])
    t = b.node("Expand", [t, b.const([1, 1, 1, fh, 1, fw])])
    return b.value(b.node("Reshape", [t, b.const([-1, c, h * fh, w * fw])]), *b.ranges[x])


def emit_clip(b: _Builder, op: IntOp, x: str) -> str:
    """An exact left shift (``Mul`` by ``2**shift``), then ``Clip`` to the constant bounds."""
    s, (lo, hi) = op.attrs["shift"], b.ranges[x]
    lo, hi = lo << s, hi << s
    if s:
        layout, x = x, b.cast(x, _int_type(lo, hi))
        x = b.value(b.node("Mul", [x, b.const(1 << s, b.dtype(x))]), lo, hi, like=layout)
    clo = lo if op.attrs["lo"] is None else op.attrs["lo"]
    chi = hi if op.attrs["hi"] is None else op.attrs["hi"]
    return _clip(b, x, clo, chi)


def emit_lookup(b: _Builder, op: IntOp, x: str) -> str:
    """The table (an initializer of the narrowest type holding its codes) at ``code − offset``
    (:func:`_table_lookup`): int32 indices, clipped into the table as the reference clamps them."""
    table, offset = op.attrs["table"], op.attrs["offset"]
    lo, hi = b.ranges[x]
    layout = x
    x = b.cast(x, _int_type(lo - offset, hi - offset))
    index = b.value(b.node("Sub", [x, b.const(offset, b.dtype(x))]), lo - offset, hi - offset, like=layout)
    index = b.cast(_clip(b, index, 0, len(table) - 1), np.int32)
    tlo, thi = int(table.min()), int(table.max())
    data = b.const(table.numpy(), _int_type(tlo, thi), name=f"{op.out}.table")
    return b.value(_table_lookup(b, data, index, _int_type(tlo, thi)), tlo, thi, like=layout)


def emit_constant(b: _Builder, op: IntOp) -> str:
    """The codes as an initializer, int32 when they fit."""
    codes = op.attrs["value"]
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    dt = np.int32 if _fits32(lo, hi) else np.int64
    name = b.const(codes.numpy(), dt)
    b.types[name] = dt
    return b.value(name, lo, hi)


def emit_expand(b: _Builder, op: IntOp, x: str, like: str) -> str:
    """``Expand`` to ``(N, *shape[1:])``, ``N`` read from ``like``'s ``Shape``."""
    x = b.nchw(x)
    batch = b.node("Slice", [b.node("Shape", [like]), b.const([0]), b.const([1])])
    shape = b.node("Concat", [batch, b.const(list(op.attrs["shape"][1:]))], axis=0)
    return b.value(b.node("Expand", [x, shape]), *b.ranges[x])


def emit_gather(b: _Builder, op: IntOp, ids: str) -> str:
    """``Gather`` of the table's rows (an initializer of the narrowest type holding its codes) at
    the int64 token ids."""
    table = op.attrs["table"]
    lo, hi = (int(table.min()), int(table.max())) if table.numel() else (0, 0)
    data = b.const(table.numpy(), _int_type(lo, hi), name=f"{op.out}.table")
    out = b.node("Gather", [data, b.cast(ids, np.int64)], axis=0)
    b.types[out] = _int_type(lo, hi)
    return b.value(out, lo, hi)


def emit_padding_mask(b: _Builder, op: IntOp, mask: str) -> str:
    """1 where the (batch, length) mask is non-zero, as (batch, 1, 1, length) int32."""
    keep = b.node("Not", [b.node("Equal", [mask, b.const(0, b.dtype(mask))])])
    out = b.node("Unsqueeze", [b.node("Cast", [keep], to=TensorProto.INT32), b.const([1, 2])])
    b.types[out] = np.int32
    return b.value(out, 0, 1)


def emit_select(b: _Builder, op: IntOp, x: str, *keep: str) -> str:
    """``Where`` of a condition (an input's 0/1, or a bool initializer) between the codes
    (shifted to the output's binary point) and the fill code."""
    x = b.nchw(x)
    s, fill = op.attrs["shift"], op.attrs["fill"]
    lo, hi = b.ranges[x]
    lo, hi = min(lo << s, fill), max(hi << s, fill)
    dt = np.int32 if _fits32(lo, hi) else np.int64
    x = b.cast(x, dt)
    if s:
        x = b.node("Mul", [x, b.const(1 << s, dt)])
    constant = op.attrs.get("condition")
    constant = None if constant is None else b.const(constant.numpy(), np.bool_)
    cond = b.node("Cast", [keep[0]], to=TensorProto.BOOL) if keep else constant
    if keep and constant is not None:
        cond = b.node("And", [cond, constant])
    out = b.node("Where", [cond, x, b.const(fill, dt)])
    b.types[out] = dt
    return b.value(out, lo, hi)


EMITTERS: dict[str, Callable] = {
    "quantize": emit_quantize,
    "requantize": emit_requantize,
    "dequantize": emit_dequantize,
    "conv2d": emit_conv2d,
    "linear": emit_linear,
    "relu": emit_relu,
    "max_pool2d": emit_max_pool2d,
    "sum_pool2d": emit_sum_pool2d,
    "adaptive_sum_pool2d": emit_adaptive_sum_pool2d,
    "scale": emit_scale,
    "add": emit_add,
    "reshape": emit_reshape,
    "matmul": emit_matmul,
    "softmax": emit_softmax,
    "layer_norm": emit_layer_norm,
    # structural ops
    "transpose": emit_transpose, "slice": emit_slice, "concat": emit_concat, "mul": emit_mul,
    "affine": emit_affine, "pad": emit_pad, "upsample": emit_upsample,
    "clip": emit_clip,
    "lookup": emit_lookup,
    "constant": emit_constant,
    "expand": emit_expand,
    "gather": emit_gather, "padding_mask": emit_padding_mask, "select": emit_select,
}
_WEIGHTED = {"conv2d", "linear"}
