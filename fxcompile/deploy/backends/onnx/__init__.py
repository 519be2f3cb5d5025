"""ONNX backend: an :class:`IntegerGraph` as an ONNX model of integer ops.

Between the input quantizer and the output dequantizers every tensor that flows is an integer
tensor and every op is integer arithmetic on ONNX Runtime's CPU provider (``QLinearConv``'s
scales, its only float inputs, are power-of-two constants), so ORT reproduces the integer
reference (:mod:`fxcompile.deploy.backends.integer`) bit for bit.  The export knows every
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
* **8-bit convs: one QLinearConv with its rounding.**  A conv of codes that fit uint8 (with
  a zero point) and int8 weights, whose accumulator feeds only a requantize to at most 256
  codes (nearest, saturating), is one ``QLinearConv`` with scales 1, 1 and ``2**s``: ONNX
  defines it as the int32 sum rounded half to even and saturated, which is the requantize,
  and ORT computes that exactly while the sum is exact in float32 (per channel
  ``Σ|w| · max|x| + |b| < 2**24``, checked).  Weights go in as int8 where every pair of
  products stays below 2**15 (else uint8 with zero point 128: see below).  ORT's layout
  optimizer runs it as its NHWC kernel between the channels-last neighbours, with its
  depthwise kernel for depthwise convs: mobilenet_v2 under ``8bit`` takes half the time of
  the slices, limb products and int32 rounding passes it replaces
  (:func:`~.matmul.emit_qlinear_conv`).
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
  values (the rewrite is :func:`fxcompile.deploy.optimize.optimize`, which also folds a
  ReLU into the requantize before it).  MaxPool itself is float-only: ``Max`` over the kernel-offset slices, or, for
  tiling windows, two ``ReduceMax`` over reshapes (rows, then columns channels-last).
* **Rounding shifts.**  Integer ``Div`` truncates toward zero and ``BitShift`` is unsigned, so
  a rounding right shift by ``s`` is done on a non-negative value: saturate first
  (``Clip(v, lo · 2**s, hi · 2**s)``: rounding is monotone and these bounds round to
  themselves; a following ReLU raises ``lo`` to 0), add ``−m · 2**s`` with ``m`` even when
  the clipped value may be negative (ties to even are unchanged by an even offset), then
  ``q = t / 2**s`` is the floor and ties to even is
  ``(t + 2**(s−1) − 1 + (q AND 1)) / 2**s`` (for ``s <= 7`` the bit without ``BitwiseAnd``:
  the sign of ``t · 2**(7−s)`` cast to int8); a clipped int64 accumulator is cast to int32
  first when it fits.  A wrapping format works in int64 and wraps
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

import collections

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...lower import IntegerGraph
from ...optimize import optimize
from .builder import OPSET, _Builder, add_constant
from .emitters import _WEIGHTED, EMITTERS
from .matmul import emit_qlinear_conv

__all__ = ["to_onnx", "EMITTERS", "OPSET", "add_constant"]


def _live(nodes: list, outputs: set) -> list:
    """``nodes`` without those no graph output depends on (a value an emitter wrote and a
    consumer then read in another form, e.g. a QLinearConv's codes without their zero point)."""
    needed, kept = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    return kept[::-1]


def to_onnx(graph: IntegerGraph, name: str = "fxcompile_integer", eight_bit: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``graph``: float inputs (batch dimension ``N``), float and int64 outputs.

    ``eight_bit`` lowers conv/linear to 8-bit ``MatMulInteger`` on limbs where that is exact
    (fast on ORT); ``False`` keeps every product in an int64 ``MatMul``.  ``graph`` is
    emitted as :func:`~fxcompile.deploy.optimize.optimize` rewrites it.
    """
    graph = optimize(graph)
    b, env = _Builder(graph, graph.shapes), {}
    inputs = []
    for inp, shape in zip(graph.inputs, graph.input_shapes):
        env[inp] = inp
        integer = inp in graph.integer_inputs  # token ids, attention masks: int64 as they are
        inputs.append(helper.make_tensor_value_info(inp, TensorProto.INT64 if integer else TensorProto.FLOAT,
                                                    ["N", *shape[1:]]))
        if integer:
            b.types[inp] = np.int64
            b.value(inp, -(1 << 63), (1 << 63) - 1)
    outputs, codes = [], []
    uses = collections.Counter(i for op in graph.ops for i in op.inputs)
    requantizes = {op.inputs[0]: op for op in graph.ops if op.op == "requantize"}
    for op in graph.ops:
        if op.out in env:  # a requantize emitted with its conv
            continue
        b.prefix = f"{op.op}/{op.out}"
        args = [env[i] for i in op.inputs]
        if op.op == "dequantize":
            args = [b.nchw(args[0])]
        if eight_bit and op.op == "conv2d" and uses[op.out] == 1 and op.out in requantizes:
            fused = emit_qlinear_conv(b, op, requantizes[op.out], args[0])
            if fused is not None:
                env[requantizes[op.out].out] = env[op.out] = fused
                continue
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
    g = helper.make_graph(_live(b.nodes, {v.name for v in outputs + codes}), name, inputs, outputs + codes,
                          initializer=b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fxcompile")
    model.ir_version = min(model.ir_version, 10)
    return model
