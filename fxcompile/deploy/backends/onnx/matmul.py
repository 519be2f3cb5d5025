"""Conv and linear: uint8 limbs × int8 weight digits on ``MatMulInteger``, or one int32/int64
``MatMul``; im2col, padding and the kernel-offset slices pooling shares."""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto

from ...lower import IntOp
from .arithmetic import INT32, _fits32, _saturation
from .builder import _Builder, _per_channel

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
# a linear layer's int32 MatMul, (M, K) activations by the constant (K, O) weight, costs more a
# multiply-add: 0.25-0.8 ns measured for K 64-128, O 64-192 (a transformer's projections), where
# 8-bit MatMulInteger takes 0.005
_LINEAR_INT32_FACTOR = 3.5


def _direct_int32(b: _Builder, plan: _Plan | None, flat: np.ndarray, bias: np.ndarray, x: str, rows: int,
                  factor: float = 1.0) -> bool:
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
    # several products: each partial sum is written, added and recombined (about three passes);
    # a single one writes the accumulator once, as the int32 MatMul does
    passes = 3 if products > 1 else 1
    return macs * _NS_MAC_INT32 * factor + outputs * _NS_PASS < products * (macs * _NS_MAC_8BIT + passes * outputs * _NS_PASS)


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


def _products(b: _Builder, cols: list[str], plan: _Plan, name: str, width: int | None = None,
              arrange=None, bias: bool = True) -> str:
    """``Σ scale · (limb · digits) + bias`` over the plan's terms: one MatMulInteger each, a
    limb's products one after the other (its columns are still in the cache; separate tensors:
    stacking them costs a copy of each), each added to the sum of its scale as it comes, then
    the sums combined by Horner's rule, largest scale first, in int32 when the plan's bound
    allows (else int64).  ``arrange`` maps a (K, O) digit matrix to the right operand (a
    grouped conv's (G, K, O / G)); ``bias=False`` leaves the bias to the caller."""
    dt = np.int32 if plan.int32 else np.int64
    sums = {}
    for k in sorted(range(len(plan.terms)), key=lambda k: plan.terms[k][0]):
        i, digits, scale = plan.terms[k]
        digits = arrange(digits) if arrange else digits
        y = b.node("MatMulInteger", [cols[i], b.const(digits.astype(np.int8), np.int8, name=f"{name}.weight_digit{k}")])
        y = y if dt == np.int32 else b.node("Cast", [y], to=TensorProto.INT64)
        sums[scale] = b.node("Add", [sums[scale], y]) if scale in sums else y
    acc, previous = None, None
    for scale in sorted(sums, reverse=True):
        acc = sums[scale] if acc is None else b.node("Add", [b.node("Mul", [acc, b.const(previous // scale, dt)]), sums[scale]])
        previous = scale
    if bias and np.any(plan.bias):
        acc = b.node("Add", [acc, b.const(_per_channel(plan.bias, width), dt, name=f"{name}.bias")])
    return acc


def emit_conv2d(b: _Builder, op: IntOp, x: str, eight_bit: bool = True) -> str:
    if op.attrs.get("groups", 1) != 1:
        return emit_grouped_conv2d(b, op, x, eight_bit)
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
    if eight_bit and _direct_int32(b, plan, flat, bias, x, 1, _LINEAR_INT32_FACTOR):
        plan, dt = None, np.int32
    if plan is not None:
        acc = _products(b, _limbs(b, x, plan), plan, op.out)
    else:
        acc = b.node("MatMul", [b.cast(x, dt), b.const(flat, dt, name=f"{op.out}.weight")])
        if np.any(bias):
            acc = b.node("Add", [acc, b.const(bias, dt, name=f"{op.out}.bias")])
    return b.value(acc, min(lo), max(hi))


def emit_grouped_conv2d(b: _Builder, op: IntOp, x: str, eight_bit: bool = True) -> str:
    """A grouped conv (weight (O, C / G, kh, kw)), channels-last, with work and constants
    linear in the channels (never the dense conv with zeros off each group's block).

    Depthwise (one input channel per group, one output channel per input channel): the sum
    over kernel offsets of the offset's strided slice times a per-channel weight constant, in
    int32 when every channel's bound ``Σ|w| · max|x| + |b|`` fits it (each partial sum lies
    within it), else int64.  Otherwise each group is one batch of a batched product: the
    groups move from the channels into the batch axis, ``(N · G, H, W, C / G)``, whose im2col
    columns ``(N, G, Ho · Wo, K)`` multiply the weights ``(G, K, O / G)`` — uint8 limbs times
    int8 digits on ``MatMulInteger`` where exact (the plan of a dense conv whose columns are
    each output channel's own K taps), else one int32/int64 ``MatMul`` — and the product
    returns to ``(N, Ho, Wo, O)``."""
    weight = op.attrs["weight"].numpy()
    groups = op.attrs["groups"]
    bias = op.attrs["bias"].numpy() if op.attrs["bias"] is not None else np.zeros(weight.shape[0], np.int64)
    o, cg, kh, kw = weight.shape
    og = o // groups
    n, c, h, w = b.shapes[op.inputs[0]]
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    ho, wo = _out_size(h + 2 * ph, kh, stride[0], dil[0]), _out_size(w + 2 * pw, kw, stride[1], dil[1])
    flat = weight.transpose(2, 3, 1, 0).reshape(kh * kw * cg, o)  # column o: its own group's taps (kh, kw, j)
    lo, hi = _interval(flat, bias, *b.ranges[x])
    x = b.nhwc(x)
    if cg == 1 and og == 1:
        xlo, xhi = b.ranges[x]
        bound = int(np.abs(flat).sum(axis=0).max(initial=0)) * max(-xlo, xhi) + int(np.abs(bias).max(initial=0))
        dt = np.int32 if bound <= INT32[1] else np.int64
        taps = _slices(b, _pad(b, b.cast(x, dt), (ph, pw)), (h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
        acc = None
        for k, tap in enumerate(taps):
            if acc is not None and not flat[k].any():
                continue
            t = b.node("Mul", [tap, b.const(_per_channel(flat[k], wo), dt, name=f"{op.out}.weight{k}")])
            acc = t if acc is None else b.node("Add", [acc, t])
    else:
        def arrange(m):  # (K, O) → (G, K, O / G)
            return m.reshape(m.shape[0], groups, og).transpose(1, 0, 2)

        plan = _plan(b, flat, bias, x) if eight_bit else None
        dt = np.int64
        if eight_bit and _direct_int32(b, plan, flat, bias, x, ho * wo):
            plan, dt = None, np.int32

        def columns(v: str, pad_value: int = 0) -> str:  # (N, H, W, C) → (N, G, Ho · Wo, K)
            t = b.node("Reshape", [v, b.const([-1, h, w, groups, cg])])
            t = b.node("Transpose", [t], perm=[0, 3, 1, 2, 4])
            v = b.value(b.node("Reshape", [t, b.const([-1, h, w, cg])]), *b.ranges[v], like=v)
            v = _im2col(b, _pad(b, v, (ph, pw), pad_value), (h + 2 * ph, w + 2 * pw), (kh, kw), stride, dil)
            return b.node("Reshape", [v, b.const([-1, groups, ho * wo, kh * kw * cg])])
        if plan is not None:  # as for a dense conv: each limb pads with its digit of −offset
            cols = [columns(limb, (-plan.offset >> (8 * i)) & 255)
                    for i, limb in enumerate(_limbs(b, x, plan))]
            acc = _products(b, cols, plan, op.out, arrange=arrange, bias=False)
            bias = plan.bias
        else:
            acc = b.node("MatMul", [columns(b.cast(x, dt)), b.const(arrange(flat), dt, name=f"{op.out}.weight")])
        dt = b.dtype(acc)
        acc = b.node("Transpose", [acc], perm=[0, 2, 1, 3])  # (N, Ho · Wo, G, O / G)
        acc = b.node("Reshape", [acc, b.const([-1, ho, wo, o])])
    if np.any(bias):
        acc = b.node("Add", [acc, b.const(_per_channel(bias, wo), b.dtype(acc), name=f"{op.out}.bias")])
    b.channels_last.add(acc)
    return b.value(acc, min(lo), max(hi))


def _uint8(b: _Builder, x: str, zero_point: int) -> str:
    """``x``'s codes plus ``zero_point`` as a uint8 tensor (the caller checks they fit)."""
    if b.uint8.get(x, (None, None))[1] == zero_point:
        return b.uint8[x][0]
    t = b.node("Add", [x, b.const(zero_point, b.dtype(x))]) if zero_point else x
    u = b.node("Cast", [t], to=TensorProto.UINT8)
    if x in b.channels_last:
        b.channels_last.add(u)
    b.uint8[x] = (u, zero_point)
    return u


def emit_qlinear_conv(b: _Builder, op: IntOp, requantize: IntOp, x: str) -> str | None:
    """A conv whose accumulator only feeds ``requantize`` (a rounding right shift by ``s`` to
    nearest, ties to even, saturating to at most 256 codes), as one ``QLinearConv`` with
    power-of-two scales; ``None`` where that would not be exact.

    ``QLinearConv`` computes ``saturate(round(acc · x_scale · w_scale / y_scale) + y_zp)``
    with ``acc = Σ (x − x_zp)(w − w_zp) + bias`` in int32 and ties to even.  With scales
    1, 1, ``2**s`` and the zero points that put the codes in uint8, that is the requantize
    exactly while ``acc`` is exact in float32 (ORT multiplies it there): the per-channel bound
    ``Σ|w| · max|x| + |b|`` must stay below ``2**24``.  Weights go in as int8 when every pair
    of products stays below ``2**15`` (x86 kernels without VNNI add pairs of uint8 × int8
    products in int16, saturating), else as uint8 with zero point 128 (ORT's uint8 × uint8
    kernels widen first: exact on every CPU, about twice as slow).  The conv runs NCHW between
    two Transposes that ORT's layout optimizer removes (its NHWC ``QLinearConv``), and it
    replaces the conv's depthwise slices or limb products and the int32 rounding passes of
    the requantize (several times faster on ORT)."""
    fmt, s = requantize.attrs["fmt"], requantize.attrs["shift"]
    if fmt.overflow != "saturate" or fmt.rounding != "nearest" or s < 0:
        return None
    olo, ohi = _saturation(requantize)
    y_zp = max(-olo, 0)
    weight = op.attrs["weight"].numpy().astype(np.int64)
    o = weight.shape[0]
    bias = op.attrs["bias"].numpy().astype(np.int64) if op.attrs["bias"] is not None else np.zeros(o, np.int64)
    lo, hi = b.ranges[x]
    x_zp = max(-lo, 0)
    if ohi + y_zp > 255 or hi + x_zp > 255 or weight.min(initial=0) < -128 or weight.max(initial=0) > 127:
        return None
    bound = int(np.abs(weight).reshape(o, -1).sum(axis=1).max(initial=0)) * max(-lo, hi) + int(np.abs(bias).max(initial=0))
    if bound >= 1 << 24:
        return None
    signed = 2 * (hi + x_zp) * int(np.abs(weight).max(initial=0)) <= _PAIR_MAX
    w, w_zp = (weight.astype(np.int8), np.int8(0)) if signed else ((weight + 128).astype(np.uint8), np.uint8(128))
    u = b.node("Transpose", [_uint8(b, b.nhwc(x), x_zp)], perm=[0, 3, 1, 2])
    (ph, pw), stride, dil = op.attrs["padding"], op.attrs["stride"], op.attrs["dilation"]
    one = b.const(1.0, np.float32)
    y = b.node("QLinearConv", [u, one, b.const(x_zp, np.uint8), b.const(w, w.dtype, name=f"{op.out}.weight"), one,
                               b.const(w_zp, w.dtype), b.const(2.0 ** s, np.float32), b.const(y_zp, np.uint8),
                               b.const(bias, np.int32, name=f"{op.out}.bias")],
               group=op.attrs.get("groups", 1), pads=[ph, pw, ph, pw], strides=list(stride), dilations=list(dil),
               kernel_shape=list(weight.shape[2:]))
    y = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    b.channels_last.add(y)
    if olo + y_zp > 0 or ohi + y_zp < 255:  # a narrower format (or a ReLU) than uint8's saturation
        y = b.node("Clip", [y, b.const(olo + y_zp, np.uint8), b.const(ohi + y_zp, np.uint8)])
        b.channels_last.add(y)
    out = b.value(b.node("Cast", [y], to=TensorProto.INT32), olo + y_zp, ohi + y_zp, like=y)
    if y_zp:  # a consumer that can take the zero point into its constants reads ``b.shifted`` instead
        shifted = out
        out = b.node("Sub", [out, b.const(y_zp, np.int32)])
        b.shifted[out] = (shifted, y_zp)
    b.value(out, olo, ohi, like=y)
    b.uint8[out] = (y, y_zp)
    return out
