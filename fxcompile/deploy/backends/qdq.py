"""QDQ backend: the deployed model as float ONNX ops with QuantizeLinear/DequantizeLinear pairs.

Every fixed-point edge of the BN-folded graph (:func:`fxcompile.deploy.fold_bn.fold_bn`)
becomes the pattern toolchains such as ONNX Runtime's quantized-op fusion and TensorRT read:

* an activation edge: ``QuantizeLinear → DequantizeLinear`` with scale ``2**-frac`` and the
  format's zero point, in the smallest container type holding its codes (int8/uint8 up to
  8 bits, int16/uint16 up to 16: opset 21);
* a weight edge: the parameter's integer codes as an initializer (int8, int16 or int32:
  weights such as 24.12 fit int32, which DequantizeLinear reads) followed by
  ``DequantizeLinear``;
* a bias edge: the same, except that a Conv/Gemm bias is written by default as int32 codes
  at scale ``x_scale · w_scale`` — the bias format's values shifted exactly to the
  accumulator's binary point, as the integer graph adds them — because that is the form
  ONNX Runtime fuses (DequantizeLinear → Conv → QuantizeLinear into QLinearConv, Gemm into
  QGemm, for 8-bit activations and weights) and TensorRT expects.  ``bias_scale="format"``
  keeps the bias format's own scale and type instead (ORT then fuses nothing);

and the ops between them (Conv, Gemm, Relu, MaxPool, AveragePool, Reshape, Add, Clip, and
for the lookup tables the float functions: Sigmoid, Tanh, Erf, HardSigmoid, Softplus...) are
the float ops of the model.  Node names are ``quantize/<cast>`` and ``dequantize/<cast>``, after
the cast node of the edge.  The float output is ``output`` (``output_<i>`` if several).

This flavour is **not bit-exact** with the integer graph (:mod:`fxcompile.deploy.backends.integer`):

* QuantizeLinear rounds half to even, like ``nearest``, but the float ops between the pairs
  round: Conv and Gemm accumulate in float32, whose 24-bit significand cannot hold every
  exact sum of products (16-bit activation codes times 24-bit weight codes need ~40 bits),
  so a sum that lies within float32's rounding error of a rounding boundary of the next
  activation format can land one code away; the difference then travels on;
* QuantizeLinear saturates at its container type's range: a ``narrow`` format's bound
  ``-(2**(b-1) - 1)`` becomes ``-2**(b-1)`` on an activation edge, and a format narrower than
  its container (say 12 bits in int16) does not saturate at all until the container does.
  Weight and bias codes are written as initializers, so a ``narrow`` weight format gives the
  narrow-range int8 weights (``-127..127``) that TensorRT's int8 kernels want; the default
  full range (8.x, 16.x) is exactly QuantizeLinear's int8/int16 range.

Measured with ``examples/export_flavours.py`` (SeedCNN, one epoch of fixed-point training,
ONNX Runtime with or without its graph optimizations alike): baseline policy, 1 of 100,000
Fashion-MNIST test output codes off by one (8 of 20,000 on the synthetic default), top-1
agreement 100 %; optimized policy (16.4 activations) and an 8-bit policy (8.3 activations,
8.6 weights, fused by ORT into QLinearConv/QGemm), none.  The tests hold the flavour to
at most one differing output code per image, none off by more than 4, and top-1 agreement
of at least 95 %.  Rounding and zero point are exact: QuantizeLinear rounds ``x / scale``
half to even and then adds the zero point, as the formats do.  What cannot be expressed
raises :class:`~fxcompile.errors.ExportError` naming the edge and format: an activation edge that is wider than 16 bits, that rounds other than to nearest (``floor``,
``toward_zero``), or that wraps on overflow::

    >>> model = to_qdq(fold_bn(qmodel), (x[:1],))
    >>> onnx.checker.check_model(model, full_check=True)
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from ...core import ir, nonlinear, ops
from ...errors import ExportError
from ...core.formats import FixedPoint
from ...passes.averages import average_arguments, avg_pool_arguments
from ...passes.casts import Cast
from ..lower import UNSUPPORTED as UNSUPPORTED_LOWERING
from ..lower import (evaluate, index_slices, lower, op_arguments, op_key, pair, permutation, reshape_target,
                     split_sizes, whole_slice, whole_view)
from .onnx import add_constant

__all__ = ["to_qdq", "FloatGraph", "FLOAT_OPS", "UNSUPPORTED", "STRUCTURAL", "OPSET", "container"]

OPSET = 21  # 16-bit QuantizeLinear/DequantizeLinear

# (signed, bits it holds) → ONNX type, numpy type; smallest first
_CONTAINERS = [(True, 8, TensorProto.INT8, np.int8), (False, 8, TensorProto.UINT8, np.uint8),
               (True, 16, TensorProto.INT16, np.int16), (False, 16, TensorProto.UINT16, np.uint16),
               (True, 32, TensorProto.INT32, np.int32)]


def container(fmt: FixedPoint, widest: int = 16) -> tuple[int, type] | None:
    """The smallest ONNX integer type (and numpy type) holding every code of ``fmt`` and its
    zero point, up to ``widest`` bits; ``None`` if there is none."""
    lo, hi = min(fmt.code_min, fmt.zero_point), max(fmt.code_max, fmt.zero_point)
    for signed, bits, onnx_type, np_type in _CONTAINERS:
        info = np.iinfo(np_type)
        if bits <= widest and info.min <= lo and hi <= info.max:
            return onnx_type, np_type
    return None


class FloatGraph:
    """Builds a float ONNX graph; subclasses say how a fixed-point edge is written.

    :meth:`activation` quantizes a graph tensor to an edge's format, :meth:`parameter`
    writes a constant (a weight or bias) in its format; both return the name of the float
    tensor that the consumers read.
    """

    opset_imports = [helper.make_opsetid("", OPSET)]

    def __init__(self):
        self.nodes, self.initializers, self._consts, self._count = [], [], {}, 0
        self.gm: fx.GraphModule | None = None

    def node(self, op_type: str, inputs, name: str | None = None, domain: str = "", **attrs) -> str:
        self._count += 1
        name = name or f"{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, domain=domain or None,
                                           **attrs))
        return name

    def const(self, value, dtype, name: str | None = None) -> str:
        return add_constant(self.initializers, self._consts, value, dtype, name)

    def check(self, fmt: FixedPoint, where: str, constant: bool) -> str | None:
        """Why ``fmt`` cannot be written at this edge (``None``: it can)."""
        return None

    def activation(self, x: str, fmt: FixedPoint, cast: str) -> str:
        raise NotImplementedError

    def parameter(self, value: torch.Tensor, fmt: FixedPoint, cast: str) -> str:
        raise NotImplementedError

    def bias(self, x: str, w: str, b: str) -> str:
        """The bias operand of a Conv/Gemm reading ``x`` and ``w`` (by default ``b`` itself)."""
        return b

    def fold_batch_norm(self, bn: fx.Node, x: str, s: np.ndarray, t: np.ndarray) -> str | None:
        """The batch norm ``bn`` (``x · s + t``) folded into the op before it, or ``None`` (by
        default: it stays a float ``Mul`` and ``Add``)."""
        return None


class QDQGraph(FloatGraph):
    """``bias_scale="accumulator"`` (the default) writes a Conv/Gemm bias as int32 codes at
    scale ``x_scale · w_scale`` (the accumulator's binary point), the form ONNX Runtime fuses
    into QLinearConv/QGemm and TensorRT reads; the values are the bias format's, shifted
    exactly.  A bias with more fractional bits than the accumulator, or whose shifted codes
    overflow int32, keeps its own format, as every bias does with ``bias_scale="format"``."""

    def __init__(self, bias_scale: str = "accumulator", uint8_activations: bool = False,
                 fold_batch_norms: bool = False):
        super().__init__()
        if bias_scale not in ("accumulator", "format"):
            raise ValueError(f"bias_scale must be 'accumulator' or 'format', got {bias_scale!r}")
        self.bias_scale, self.uint8_activations = bias_scale, uint8_activations
        self.fold_batch_norms = fold_batch_norms
        self.formats: dict[str, FixedPoint] = {}   # dequantized tensor → its format
        self._parameters: dict[str, tuple] = {}    # dequantized parameter → (its node, centred codes)

    def check(self, fmt, where, constant):
        if constant:
            # a constant has no QuantizeLinear: its codes only need an integer type DequantizeLinear
            # reads; above 16 bits that is int32, centred (an int32 DequantizeLinear has no zero point)
            if container(fmt) is None and not -2 ** 31 <= fmt.code_min - fmt.zero_point <= fmt.code_max - fmt.zero_point < 2 ** 31:
                return f"{where} has format {fmt}, whose centred codes do not fit int32"
            return None
        problems = []
        if container(fmt) is None:
            problems.append("is wider than 16 bits (QuantizeLinear writes at most int16/uint16)")
        if fmt.rounding != "nearest":
            problems.append(f"rounds {fmt.rounding} (QuantizeLinear rounds to nearest, ties to even)")
        if fmt.overflow != "saturate":
            problems.append("wraps on overflow (QuantizeLinear saturates)")
        return f"{where} has format {fmt}, which {' and '.join(problems)}" if problems else None

    def activation(self, x, fmt, cast):
        onnx_type, np_type = container(fmt)
        zero_point = fmt.zero_point
        if self.uint8_activations and np_type is np.int8 and 0 <= zero_point + 128 <= 255 and x not in self.formats:
            # the same values and the same saturation: int8 code c is uint8 code c + 128.  Not
            # right after another pair (an input cast, then the conv's): ORT would merge two
            # uint8 pairs into one, rounding once where the model rounds twice
            np_type, zero_point = np.uint8, zero_point + 128
        scale = self.const(2.0 ** -fmt.frac, np.float32)
        zero = self.const(zero_point, np_type)
        q = self.node("QuantizeLinear", [x, scale, zero], name=f"quantize/{cast}")
        out = self.node("DequantizeLinear", [q, scale, zero], name=f"dequantize/{cast}")
        self.formats[out] = fmt
        return out

    def parameter(self, value, fmt, cast):
        codes = parameter_codes(value, fmt)
        found = container(fmt)
        inputs = [None, self.const(2.0 ** -fmt.frac, np.float32)]
        if found is None:  # wider than 16 bits: centred int32 codes, no zero point (it is 0)
            inputs[0] = self.const((codes - fmt.zero_point).numpy(), np.int32, name=f"{cast}/codes")
        else:
            inputs[0] = self.const(codes.numpy(), found[1], name=f"{cast}/codes")
            inputs.append(self.const(fmt.zero_point, found[1]))
        out = self.node("DequantizeLinear", inputs, name=f"dequantize/{cast}")
        self.formats[out] = fmt
        self._parameters[out] = (self.nodes[-1], codes - fmt.zero_point)
        return out

    def bias(self, x, w, b):
        if self.bias_scale != "accumulator" or b not in self._parameters or x not in self.formats \
                or w not in self.formats:
            return b
        node, centred = self._parameters[b]
        shift = self.formats[x].frac + self.formats[w].frac - self.formats[b].frac
        codes = centred.to(torch.int64) << max(shift, 0)
        if shift < 0 or codes.abs().max() >= 2 ** 31:
            return b  # not exact at the accumulator's binary point: the bias keeps its own format
        old = node.input[0]
        self.initializers = [t for t in self.initializers if t.name != old]
        scale = self.const(2.0 ** -(self.formats[x].frac + self.formats[w].frac), np.float32)
        node.input[:] = [self.const(codes.numpy(), np.int32, name=old), scale]
        del self._parameters[b]  # rewritten once: a bias shared by layers keeps the first one's scale
        return b


    def fold_batch_norm(self, bn: fx.Node, x: str, s: np.ndarray, t: np.ndarray) -> str | None:
        """With ``fold_batch_norms``: the batch norm ``bn`` (``x · s + t`` per channel) folded
        into the conv before it, whose output pair is dropped — its weight codes kept, their
        scale made per channel (``2**-frac · s``), its bias ``b · s + t`` written as int32 codes
        at the per-channel accumulator scale.  The conv's output is then rounded once, by the
        batch norm's output pair, where the simulation rounds twice: close to, not on, the
        integer graph.  ``None`` (nothing changed) unless the conv feeds only its cast, the cast
        only ``bn``, the weight only this conv, and every ``s`` is positive."""
        cast = bn.args[0]
        layer = cast.args[0] if isinstance(cast, fx.Node) and cast.op == "call_module" else None
        if not (self.fold_batch_norms and isinstance(layer, fx.Node) and len(cast.users) == 1
                and len(layer.users) == 1 and (s > 0).all()):
            return None
        producers = {n.output[0]: n for n in self.nodes}
        dq = producers.get(x)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        conv = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] not in self.formats:
            return None
        users = [i for n in self.nodes for i in n.input]
        w_dq = producers.get(conv.input[1])
        if w_dq is None or users.count(conv.input[1]) != 1 or conv.input[1] not in self.formats:
            return None
        init = {i.name: i for i in self.initializers}
        x_scale = np.float32(2.0 ** -self.formats[conv.input[0]].frac)
        w_scale = (2.0 ** -self.formats[conv.input[1]].frac * s.reshape(-1)).astype(np.float32)
        bias, b_dq = t.reshape(-1).astype(np.float64), None
        if len(conv.input) > 2:
            b_dq = producers[conv.input[2]]
            codes = numpy_helper.to_array(init[b_dq.input[0]]).astype(np.float64)
            zero = numpy_helper.to_array(init[b_dq.input[2]]) if len(b_dq.input) > 2 else 0
            bias = bias + (codes - zero) * float(numpy_helper.to_array(init[b_dq.input[1]])) * s.reshape(-1)
        acc_scale = x_scale * w_scale  # float32, as ORT forms it
        b_codes = np.round(bias / acc_scale.astype(np.float64))
        if np.abs(b_codes).max(initial=0) >= 2 ** 31:
            return None
        w_dq.input[1] = self.const(w_scale, np.float32, name=f"{w_dq.name}/scale_per_channel")
        w_dq.attribute.append(helper.make_attribute("axis", 0))
        if len(w_dq.input) > 2:  # a zero point per channel too (DequantizeLinear: the scale's shape)
            zero = numpy_helper.to_array(init[w_dq.input[2]])
            w_dq.input[2] = self.const(np.full(s.size, zero, zero.dtype), zero.dtype)
        b = self.node("DequantizeLinear", [self.const(b_codes.astype(np.int32), np.int32, name=f"{bn.name}/folded_bias"),
                                           self.const(acc_scale, np.float32)], name=f"dequantize/{bn.name}/folded_bias", axis=0)
        self.nodes.insert(next(i for i, n in enumerate(self.nodes) if n is conv), self.nodes.pop())  # before the conv
        conv.input[:] = [conv.input[0], conv.input[1], b]
        dropped = [q, dq] + ([b_dq] if b_dq is not None and users.count(b_dq.output[0]) == 1 else [])
        self.nodes = [n for n in self.nodes if all(n is not d for d in dropped)]
        return conv.output[0]


def parameter_codes(value: torch.Tensor, fmt: FixedPoint) -> torch.Tensor:
    """Integer codes of a stored parameter (on its grid after fixed-point training; ``nearest``
    stands in for ``stochastic``, as in :func:`fxcompile.deploy.lower.lower`)."""
    return ir.stored_format(fmt).to_codes(value.detach())


# ---- the float ops: fx node → ONNX, one rule per op (the ops that lower) -------------------

def _conv2d(g: FloatGraph, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1, spec=None):
    (ph, pw), inputs = pair(padding), [x, w] + ([g.bias(x, w, b)] if b is not None else [])
    kernel = list(node.args[1].meta["tensor_meta"].shape[2:])  # optional in ONNX; FINN/hls4ml read it
    return g.node("Conv", inputs, kernel_shape=kernel, strides=list(pair(stride)), pads=[ph, pw, ph, pw],
                  dilations=list(pair(dilation)), group=groups)


def _linear(g: FloatGraph, node, x, w, b=None, spec=None):  # spec: ops.fixed_point_linear's output format
    b = None if b is None else g.bias(x, w, b)
    if len(node.meta["tensor_meta"].shape) == 2:
        return g.node("Gemm", [x, w] + ([b] if b is not None else []), transB=1)
    y = g.node("MatMul", [x, g.node("Transpose", [w], perm=[1, 0])])
    return y if b is None else g.node("Add", [y, b])


def _relu(g, node, x, *args, **kwargs):
    return g.node("Relu", [x])


def _max_pool2d(g, node, x, *args, **kwargs):
    p = op_arguments(g.gm, node, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
    k, (ph, pw) = pair(p["kernel_size"]), pair(p["padding"])
    ceil = {"ceil_mode": 1} if p["ceil_mode"] else {}
    return g.node("MaxPool", [x], kernel_shape=list(k), strides=list(pair(p["stride"] or k)),
                  pads=[ph, pw, ph, pw], dilations=list(pair(p["dilation"])), **ceil)


def _avg_pool2d(g, node, x, *args, **kwargs):
    if ops.op_of(g.gm, node).name == "fixed_point_avg_pool2d":
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = node.args[1:7]
    else:
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = avg_pool_arguments(g.gm, node)
    k, (ph, pw) = pair(kernel), pair(padding)
    y = g.node("AveragePool", [x], kernel_shape=list(k), strides=list(pair(stride or k)), pads=[ph, pw, ph, pw],
               ceil_mode=int(bool(ceil_mode)), count_include_pad=int(bool(count_include_pad)))
    if divisor_override:  # ONNX has no divisor override: the full window's average rescaled
        y = g.node("Mul", [y, g.const(k[0] * k[1] / divisor_override, np.float32)])
    return y


def _fixed_point_mean(g, node, x, dims, keepdim, spec):
    # the float mean as an average pool over the reduced axes moved last (opset-agnostic ops)
    shape = tuple(node.args[0].meta["tensor_meta"].shape)
    rank = len(shape)
    dims = sorted(d % rank for d in dims)
    kept = [d for d in range(1, rank) if d not in dims]
    n, k = math.prod(shape[d] for d in dims), math.prod(shape[d] for d in kept)
    t = g.node("Transpose", [x], perm=[0, *kept, *dims])
    t = g.node("Reshape", [t, g.const([0, k, 1, n], np.int64)])
    t = g.node("AveragePool", [t], kernel_shape=[1, n], strides=[1, n])
    return g.node("Reshape", [t, g.const([0, *_shape(node)[1:]], np.int64)])


def _truediv(g, node, a, b, *args, **kwargs):
    # the float quotient between quantizers; the integer graph's moved binary point or reciprocal
    if not isinstance(a, str):
        return _size(g, node, a, b)
    return g.node("Div", [a, g.const(np.array(b, np.float32), np.float32)])


def _fixed_point_divide(g, node, x, divisor, spec):
    c, r = ops.divisor_reciprocal(divisor)
    return g.node("Mul", [x, g.const(np.array(c * 2.0 ** -r, np.float32), np.float32)])


def _average(g, node, x, *args, **kwargs):
    # the float average between the input's DequantizeLinear and the output's QuantizeLinear: the
    # nearest this flavour has to the integer graph's window sum times a fixed-point reciprocal
    shape = tuple(node.args[0].meta["tensor_meta"].shape)
    if ops.op_of(g.gm, node).name == "fixed_point_average":
        output_size, squeeze = node.args[1:3]
    else:
        output_size, squeeze = average_arguments(g.gm, node)
    windows = ops.average_windows(shape, output_size)
    if windows is None:  # uneven windows: sums by 0/1 matrices, then each position's 1/n
        oh, ow = ops._output_size(shape, output_size)
        rows, cols = ops.adaptive_windows(shape[2], oh), ops.adaptive_windows(shape[3], ow)
        a, c = np.zeros((oh, shape[2]), np.float32), np.zeros((shape[3], ow), np.float32)
        for i, (s, e) in enumerate(rows):
            a[i, s:e] = 1
        for j, (s, e) in enumerate(cols):
            c[s:e, j] = 1
        y = g.node("MatMul", [g.node("MatMul", [g.const(a, np.float32), x]), g.const(c, np.float32)])
        y = g.node("Mul", [y, g.const(1 / (a.sum(1)[:, None] * c.sum(0)[None, :]), np.float32)])
    else:
        y = g.node("AveragePool", [x], kernel_shape=list(windows[0]), strides=list(windows[0]))
    return g.node("Reshape", [y, g.const([0, -1], np.int64)]) if squeeze else y


def _flatten(g, node, x, *args, **kwargs):
    shape = tuple(node.meta["tensor_meta"].shape)
    return g.node("Reshape", [x, g.const([0, *shape[1:]], np.int64)])


def _add(g, node, a, b, *args, **kwargs):
    # an uncast buffer operand (swin's attention mask) is a float constant
    a, b = (g.const(v.value.detach().numpy(), np.float32) if isinstance(v, _Parameter) else v for v in (a, b))
    return g.node("Add", [a, b])


def _identity(g, node, x, *args, **kwargs):
    return x


def _matmul(g, node, a, b, perms, *specs):
    # the float product between the pairs: float32 sums, so not always the exact one (see above)
    pa, pb, po = perms or (None, None, None)
    a = g.node("Transpose", [a], perm=list(pa)) if pa else a
    b = g.node("Transpose", [b], perm=list(pb)) if pb else b
    y = g.node("MatMul", [a, b])
    return g.node("Transpose", [y], perm=list(po)) if po else y


def _softmax(g, node, x, *specs):
    # the float softmax between the pairs: within about one output code of the integer one
    return g.node("Softmax", [x], axis=-1)


def _opset(g) -> int:
    return next(o.version for o in g.opset_imports if o.domain == "")


def _squeeze(g, op_type: str, x: str, dim: int) -> str:
    # axes: an input from opset 13, an attribute before (QONNX writes opset 11)
    if _opset(g) >= 13:
        return g.node(op_type, [x, g.const([dim], np.int64)])
    return g.node(op_type, [x], axes=[dim])


def _layer_norm(g, node, x, normalized_shape, w, b, eps, *specs):
    # the float LayerNormalization between the pairs (see the module docstring for the distance);
    # before opset 17 (QONNX) written out: (x - mean) / sqrt(var + eps) · w + b
    n = normalized_shape[0]
    w = w if w is not None else g.const(np.ones(n, np.float32), np.float32)
    b = b if b is not None else g.const(np.zeros(n, np.float32), np.float32)
    if _opset(g) >= 17:
        return g.node("LayerNormalization", [x, w, b], axis=-1, epsilon=eps)
    d = g.node("Sub", [x, g.node("ReduceMean", [x], axes=[-1], keepdims=1)])
    var = g.node("ReduceMean", [g.node("Mul", [d, d])], axes=[-1], keepdims=1)
    z = g.node("Div", [d, g.node("Sqrt", [g.node("Add", [var, g.const(eps, np.float32)])])])
    return g.node("Add", [g.node("Mul", [z, w]), b])


# ---- structural ops: shapes come from the example inputs' shape propagation ----------------

def _shape(node) -> list:
    return list(node.meta["tensor_meta"].shape)


def _size(g, node, *args, **kwargs):
    # sizes, their arithmetic and asserts: constants for the example shape (the batch stays free)
    def concrete(arg, value):
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return torch.empty(tuple(meta.shape), device="meta") if hasattr(meta, "shape") else value
    args = tuple(concrete(a, v) for a, v in zip(node.args, args))
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _parameter_only(node: fx.Node) -> bool:
    """Whether ``node`` is computed from parameters only (no graph input upstream)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return False
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return True


def _reshape(g, node, x, *args, **kwargs):
    if _parameter_only(node):  # a parameter reshaped (layer scale's (C,) to (1, C, 1, 1)) has no batch axis
        return g.node("Reshape", [x, g.const(list(_shape(node)), np.int64)])
    before = tuple(node.args[0].meta["tensor_meta"].shape)
    target = reshape_target(node, before, tuple(_shape(node)), ops.op_of(g.gm, node).name)
    return g.node("Reshape", [x, g.const(list(target), np.int64)])


def _permute(g, node, x, *dims, **kwargs):
    return g.node("Transpose", [x], perm=permutation(g.gm, node, len(_shape(node)), dims, kwargs))


def _getitem(g, node, x, index):
    if isinstance(x, (tuple, list)):
        return x[index]
    if isinstance(x, str) and isinstance(index, _Parameter):  # a table gathered by a constant index
        return g.node("Gather", [x, g.const(index.value.numpy(), np.int64)], axis=0)
    if not isinstance(x, str):
        return _size(g, node, x, index)
    # lower() has checked the index (axis 0 only of a permutation that moved the batch axis)
    starts, ends, axes, steps = index_slices(node, tuple(node.args[0].meta["tensor_meta"].shape), index, True)
    if starts:
        x = g.node("Slice", [x, g.const(starts, np.int64), g.const(ends, np.int64), g.const(axes, np.int64),
                             g.const(steps, np.int64)])
    if isinstance(index, int):  # qkv[i] of a permutation that moved the batch axis: a Reshape's 0 is not the batch
        return _squeeze(g, "Squeeze", x, 0)
    return g.node("Reshape", [x, g.const([0, *_shape(node)[1:]], np.int64)])


def _roll(g, node, x, shifts, dims=None):
    # per axis, the last s values sliced off and put first, as the integer graph does
    shifts, dims = (shifts, dims) if isinstance(dims, (tuple, list)) else ((shifts,), (dims,))
    shape = _shape(node)
    for s, d in zip(shifts, dims):
        n, d = shape[d], d % len(shape)
        s %= n
        if s:
            head = g.node("Slice", [x, g.const([n - s], np.int64), g.const([n], np.int64), g.const([d], np.int64)])
            tail = g.node("Slice", [x, g.const([0], np.int64), g.const([n - s], np.int64), g.const([d], np.int64)])
            x = g.node("Concat", [head, tail], axis=d)
    return x


def _split(g, node, x, *args, **kwargs):
    dim, sizes, squeeze = split_sizes(node, tuple(node.args[0].meta["tensor_meta"].shape), args, kwargs, True)
    out, start = [], 0
    for size in sizes:
        part = g.node("Slice", [x, g.const([start], np.int64), g.const([start + size], np.int64),
                                g.const([dim], np.int64)])
        out.append(_squeeze(g, "Squeeze", part, dim) if squeeze else part)
        start += size
    return out


def _cat(g, node, tensors, dim=0, **kwargs):
    dim = kwargs.get("axis", dim)
    if ops.op_of(g.gm, node).name == "stack":
        tensors = [_squeeze(g, "Unsqueeze", t, dim) for t in tensors]
    return g.node("Concat", list(tensors), axis=dim % len(_shape(node)))


def _mul(g, node, a, b, *args):
    if not any(isinstance(v, str) for v in (a, b)):
        return _size(g, node, a, b)
    a, b = (a if isinstance(a, str) else g.const(a, np.float32)), (b if isinstance(b, str) else g.const(b, np.float32))
    return g.node("Mul", [a, b])


def _sub(g, node, a, b, *args, **kwargs):
    return g.node("Sub", [a, b]) if isinstance(a, str) else _size(g, node, a, b)


def _add_or_size(g, node, a, b, *args, **kwargs):
    if isinstance(a, str) != isinstance(b, str) and (b if isinstance(a, str) else a) == 0:
        return a if isinstance(a, str) else b  # a sum started at 0
    return _add(g, node, a, b) if isinstance(a, (str, _Parameter)) else _size(g, node, a, b)


def _batch_norm(g, node, x, module, weight, bias, spec):
    # the fixed-point affine map's constants, applied in float
    def casted(arg):  # the parameter's value as the simulation reads it
        with torch.no_grad():
            return None if arg is None else g.gm.get_submodule(arg.target)(ir.fetch(g.gm, arg.args[0].target))
    s_codes, s_frac, t_codes = ops.batch_norm_affine(ir.fetch(g.gm, node.args[1].target),
                                                     casted(node.args[2]), casted(node.args[3]), int(spec[0]))
    shape = [-1] + [1] * (len(_shape(node)) - 2)
    s = (s_codes.double() * 2.0 ** -s_frac).numpy().reshape(shape)
    t = (t_codes.double() * 2.0 ** -int(spec[0])).numpy().reshape(shape)
    folded = g.fold_batch_norm(node, x, s, t)
    if folded is not None:
        return folded
    return g.node("Add", [g.node("Mul", [x, g.const(s, np.float32)]), g.const(t, np.float32)])


def _pad(g, node, x, *args, **kwargs):
    shape, before = _shape(node), list(node.args[0].meta["tensor_meta"].shape)
    pads = list(g.gm.get_submodule(node.target).padding) if node.op == "call_module" else list(
        kwargs.get("pad", args[0] if args else None))
    rank = len(shape)
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    return g.node("Pad", [x, g.const(begin + end, np.int64)])


def _write_back(g, node, base, value, steps):
    if not whole_view(steps):
        raise ExportError(f"node {node.name!r} (write_back): an in-place op on a part of a tensor does not export")
    return g.node("Reshape", [value, g.const([0, *_shape(node)[1:]], np.int64)])


def _interpolate(g, node, x, *args, **kwargs):
    shape, before = _shape(node), list(node.args[0].meta["tensor_meta"].shape)
    scales = [1.0, 1.0] + [o / i for o, i in zip(shape[2:], before[2:])]
    # an empty roi, not a missing one: QONNX's opset 11 requires the input
    return g.node("Resize", [x, g.const(np.zeros(0, np.float32), np.float32), g.const(scales, np.float32)],
                  mode="nearest")


def _clip(g, node, x, *args, **kwargs):
    # the float clamp: the next QuantizeLinear rounds an off-grid bound as the integer graph does
    bounds = nonlinear.clip_bounds(g.gm, node, ops.op_of(g.gm, node).name)  # constant: lower() checked
    return g.node("Clip", [x] + ["" if b is None else g.const(b, np.float32) for b in bounds])


def _lookup_float(g, node, x, name, params, *specs):
    # the float function between the quantizers, not the table: so the flavour is close to the
    # integer graph's table, not equal to it.  Written with ops of opset 9 (QONNX reads opset 11)
    half, one = g.const(0.5, np.float32), g.const(1.0, np.float32)
    if name == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x])])
    if name == "gelu" and params[0] == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))
        cube = g.node("Mul", [g.node("Mul", [x, x]), x])
        inner = g.node("Add", [x, g.node("Mul", [cube, g.const(0.044715, np.float32)])])
        t = g.node("Tanh", [g.node("Mul", [inner, g.const(np.sqrt(2 / np.pi), np.float32)])])
        return g.node("Mul", [g.node("Mul", [x, half]), g.node("Add", [t, one])])
    if name == "gelu":  # 0.5 x (1 + erf(x / sqrt(2)))
        e = g.node("Erf", [g.node("Mul", [x, g.const(1 / np.sqrt(2), np.float32)])])
        return g.node("Mul", [g.node("Mul", [x, half]), g.node("Add", [e, one])])
    if name in ("hardsigmoid", "hardswish"):
        h = g.node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
        return h if name == "hardsigmoid" else g.node("Mul", [x, h])
    if name == "mish":
        return g.node("Mul", [x, g.node("Tanh", [g.node("Softplus", [x])])])
    if name in ("leaky_relu", "elu"):
        return g.node({"leaky_relu": "LeakyRelu", "elu": "Elu"}[name], [x], alpha=float(params[0]))
    return g.node({"sigmoid": "Sigmoid", "tanh": "Tanh"}[name], [x])


def _expand(g, node, x, *sizes, **kwargs):
    # to (N, *rest): N read from the first input, as the integer graph does
    first = next(n.name for n in g.gm.graph.nodes if n.op == "placeholder")
    batch = g.node("Slice", [g.node("Shape", [first]), g.const([0], np.int64), g.const([1], np.int64)])
    shape = g.node("Concat", [batch, g.const(_shape(node)[1:], np.int64)], axis=0)
    return g.node("Expand", [x, shape])


# ---- text transformers: embeddings, Conv1D, masks (see fxcompile.deploy.lower) ----------------

def _embedding(g, node, w, indices, *args, **kwargs):
    if node.target is torch.nn.functional.embedding:  # F.embedding(input, weight, ...); aten's is (weight, input)
        w, indices = indices, w
    indices = g.const(indices.value.numpy(), np.int64) if isinstance(indices, _Parameter) else indices
    return g.node("Gather", [w, indices], axis=0)


def _addmm(g, node, b, x, w, spec=None, **kwargs):  # transformers' Conv1D: weight stored (in, out)
    return g.node("Gemm", [x, w, g.bias(x, w, b)])


def _slice(g, node, x, dim=0, start=None, end=None, step=1):
    if whole_slice(start, end, step):
        return x
    rank = len(node.args[0].meta["tensor_meta"].shape)
    dim = dim % rank
    begin, stop, step = slice(start, end, step).indices(node.args[0].meta["tensor_meta"].shape[dim])
    return g.node("Slice", [x, g.const([begin], np.int64), g.const([stop], np.int64), g.const([dim], np.int64),
                            g.const([step], np.int64)])


def _select(g, node, x, dim, index):
    return g.node("Gather", [x, g.const(index, np.int64)], axis=dim % len(node.args[0].meta["tensor_meta"].shape))


def _bookkeeping(g, node, *args, **kwargs):
    return None  # an assert (anything else on a graph input is refused when lowering)


def _key_padding_mask(g, node, mask):
    keep = g.node("Not", [g.node("Equal", [mask, g.const(0, np.int64)])])
    return _squeeze(g, "Unsqueeze", _squeeze(g, "Unsqueeze", keep, 1), 2)


def _fill_masked(g, node, x, keep, spec, also=None):
    low = (int(spec[1]) - int(spec[3])) * 2.0 ** -int(spec[0])
    keep = g.const(keep.value.bool().numpy(), np.bool_) if isinstance(keep, _Parameter) else keep
    if also is not None:
        keep = g.node("And", [keep, g.const(also.value.bool().numpy(), np.bool_)])
    return g.node("Where", [keep, x, g.const(low, np.float32)])


def _leaves(args, kwargs) -> list:
    """The values ``args`` and ``kwargs`` hold, through lists, tuples and dicts."""
    leaves = []
    fx.node.map_aggregate((args, kwargs), lambda v: leaves.append(v) or v)
    return leaves


def _computed_now(node: fx.Node, args, kwargs) -> _Parameter | None:
    """``node``'s function or method run now on the parameters' values (a tensor result, else None)."""
    concrete = lambda v: v.value if isinstance(v, _Parameter) else v  # noqa: E731
    args, kwargs = fx.node.map_aggregate(args, concrete), fx.node.map_aggregate(kwargs, concrete)
    result = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" else \
        node.target(*args, **kwargs)
    return _Parameter(result) if isinstance(result, torch.Tensor) else None


def _evaluated(gm, node, args, kwargs) -> _Parameter | None:
    """Integers and bools computed from sizes and constants only (positions, a causal mask),
    computed now, as the integer lowering evaluates them (:func:`fxcompile.deploy.lower._evaluated`)."""
    op = ops.op_of(gm, node)
    leaves = _leaves(args, kwargs)
    if op is None or node.op == "call_module" or op.name == "cast" or any(isinstance(v, str) for v in leaves):
        return None
    if op.name != "bookkeeping" and not any(isinstance(v, _Parameter) for v in leaves):
        return None
    return _computed_now(node, args, kwargs)


FLOAT_OPS: dict[str, Callable] = {
    "conv2d": _conv2d, "linear": _linear, "relu": _relu, "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d, "fixed_point_avg_pool2d": _avg_pool2d, "adaptive_avg_pool2d": _average, "mean": _average, "fixed_point_average": _average,
    "truediv": _truediv, "fixed_point_divide": _fixed_point_divide, "fixed_point_mean": _fixed_point_mean,
    "flatten": _flatten, "add": _add_or_size, "identity": _identity, "dropout": _identity,
    # structural ops
    "reshape": _reshape, "squeeze": _reshape, "contiguous": _identity, "drop_path": _identity, "permute": _permute,
    "transpose": _permute, "getitem": _getitem, "split": _split, "size": _size, "cat": _cat, "stack": _cat,
    "mul": _mul, "fixed_point_mul": _mul, "sub": _sub, "fixed_point_batch_norm": _batch_norm, "pad": _pad,
    "interpolate": _interpolate, "write_back": _write_back, "roll": _roll,
    "fixed_point_matmul": _matmul, "fixed_point_softmax": _softmax, "fixed_point_layer_norm": _layer_norm,
    "unflatten": _flatten,  # a Reshape to the node's shape, as flatten
    "relu6": _clip, "hardtanh": _clip, "clamp": _clip, "lookup": _lookup_float,
    "expand": _expand,
    "embedding": _embedding, "addmm": _addmm, "slice": _slice, "select": _select, "to": _identity,
    "bookkeeping": _bookkeeping, "key_padding_mask": _key_padding_mask, "fill_masked": _fill_masked,
    "all_kept": lambda g, node, mask: _Parameter(torch.ones(_shape(node.args[0]), dtype=torch.int64)),
}

# Ops that build() writes itself rather than through FLOAT_OPS.
STRUCTURAL: dict[str, str] = {"cast": "a QuantizeLinear/DequantizeLinear pair, or a parameter's codes and its DequantizeLinear"}

# Registered ops this flavour does not write: every one of them stops the integer lowering
# first (``build`` lowers before it writes), so each waits for its lowering rule.
UNSUPPORTED: dict[str, str] = {name: f"does not lower to integers yet ({why})" for name, why in UNSUPPORTED_LOWERING.items()}


class _Parameter:
    """A get_attr tensor on its way to its cast."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def _fold_buffer(gm, node, args, kwargs) -> _Parameter | None:
    """A shape op on uncast buffers only (swin's attention mask unsqueezed), computed now, as the
    integer lowering folds it (:func:`fxcompile.deploy.lower.fold_constant`)."""
    op = ops.op_of(gm, node)
    leaves = _leaves(args, kwargs)
    if op is None or op.group != "shape" or op.name == "expand" or node.op == "call_module" or \
            not any(isinstance(v, _Parameter) for v in leaves) or any(isinstance(v, str) for v in leaves):
        return None
    return _computed_now(node, args, kwargs)


def _parameter_casts(gm: fx.GraphModule, cast: fx.Node) -> list | None:
    """The casts between a parameter and the cast ``cast`` (``[]``: ``cast`` reads the parameter),
    or ``None`` when ``cast`` does not read a parameter through casts only."""
    chain, node = [], cast.args[0]
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), Cast):
        chain.append(node)
        node = node.args[0]
    return chain[::-1] if node.op == "get_attr" else None


def _parameter_as_read(gm: fx.GraphModule, cast: fx.Node) -> torch.Tensor:
    """The stored parameter behind the casts before ``cast`` (on its grid after fixed-point
    training, which those casts leave as it is; :meth:`FloatGraph.parameter` rounds it to
    ``cast``'s format)."""
    chain = _parameter_casts(gm, cast)
    return ir.fetch(gm, (chain[0] if chain else cast).args[0].target)


def build(gm: fx.GraphModule, example_inputs, g: FloatGraph, name: str, edges: list | None = None
          ) -> onnx.ModelProto:
    """Write the BN-folded ``gm`` as a float ONNX model through ``g``.

    ``gm`` is first lowered (:func:`fxcompile.deploy.lower.lower`), so an op that does not
    lower, or an edge the integer graph cannot deploy, raises the same :class:`ExportError`
    as the integer flavour; then every edge ``g`` cannot write is reported at once.
    ``edges``, if given, collects ``(cast node name, format, is_parameter)`` of every edge.
    """
    lower(gm, tuple(example_inputs))  # checks, and leaves tensor_meta on every node
    g.gm = gm
    casts = [(n, gm.get_submodule(n.target)) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Cast)]
    bad = [why for n, mod in casts if mod.edge.forward is not None
           for why in [g.check(mod.edge.forward, f"edge {mod.edge.name!r} ({mod.edge.role}, cast {n.name!r})",
                               _parameter_casts(gm, n) is not None)] if why]
    if bad:
        raise ExportError(f"cannot write {len(bad)} edge(s) in this flavour: {'; '.join(bad)}. "
                          "Use the integer flavour, or give these edges (or their roles) another format")
    env, inputs, outputs = {}, [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = ["batch", *node.meta["tensor_meta"].shape[1:]]
            integer = not node.meta["tensor_meta"].dtype.is_floating_point  # token ids, an attention mask
            inputs.append(helper.make_tensor_value_info(node.name, TensorProto.INT64 if integer else TensorProto.FLOAT,
                                                        shape))
            env[node] = node.name
        elif node.op == "get_attr":
            env[node] = _Parameter(ir.fetch(gm, node.target))
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for i, r in enumerate(results):
                out = "output" if len(results) == 1 else f"output_{i}"
                g.node("Identity", [env[r]], name=out)
                shape = ["batch", *r.meta["tensor_meta"].shape[1:]]
                outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
        elif op_key(gm, node) == "cast":
            mod, x = gm.get_submodule(node.target), env[node.args[0]]
            fmt = mod.edge.forward
            if fmt is None:  # a use without a format of its own sees the value as produced
                env[node] = x
            elif isinstance(x, _Parameter):
                env[node] = g.parameter(x.value, fmt, node.name)
            elif _parameter_casts(gm, node):  # one use of a shared parameter (a tied embedding and LM head)
                env[node] = g.parameter(_parameter_as_read(gm, node), fmt, node.name)
            else:
                # an elided (identity) cast still marks a fixed-point edge: its pair is exact
                env[node] = g.activation(x, fmt, node.name)
            if edges is not None:
                edges.append((node.name, fmt, isinstance(x, _Parameter)))
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            folded = _fold_buffer(gm, node, args, kwargs)
            if folded is None:
                folded = _evaluated(gm, node, args, kwargs)
            env[node] = folded if folded is not None else FLOAT_OPS[op_key(gm, node)](g, node, *args, **kwargs)
    used = {i for n in g.nodes for i in n.input}
    graph = helper.make_graph(g.nodes, name, inputs, outputs, [t for t in g.initializers if t.name in used])
    return helper.make_model(graph, opset_imports=g.opset_imports, producer_name="fxcompile")


def to_qdq(gm: fx.GraphModule, example_inputs, name: str = "fxcompile", bias_scale: str = "accumulator",
           uint8_activations: bool = False, fold_batch_norms: bool = False) -> onnx.ModelProto:
    """The BN-folded compiled model ``gm`` as a QDQ ONNX model (opset 21; see the module
    docstring; ``bias_scale`` see :class:`QDQGraph`).

    ``uint8_activations=True`` writes the activation edges of signed 8-bit formats as uint8
    codes with the zero point moved by 128 (ONNX Runtime quantization's default U8S8 form: the
    same values, the same saturation).  ORT's x86 kernels take uint8 activations: with int8
    pairs its graph optimizer converts a pair to uint8 itself only where the QuantizeLinear has
    one consumer, so a conv reading a value that also feeds a residual add stays a float Conv;
    with uint8 pairs every conv fuses into QLinearConv.

    ``fold_batch_norms=True`` also folds each stand-alone batch norm right after a conv into
    it (per-channel weight scales; :meth:`QDQGraph.fold_batch_norm`): one QLinearConv instead of
    a conv, a float Mul and Add and a pair, and one rounding fewer than the simulation."""
    return build(gm, example_inputs, QDQGraph(bias_scale, uint8_activations, fold_batch_norms), name)
