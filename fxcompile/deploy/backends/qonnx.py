"""QONNX backend: the deployed model as float ONNX ops with a QONNX ``Quant`` at every edge.

The format FINN and hls4ml read: every fixed-point edge of the BN-folded graph
(:func:`fxcompile.deploy.fold_bn.fold_bn`) is one ``Quant`` node (domain
``qonnx.custom_op.general``) with inputs ``x``, ``scale = 2**-frac``, ``zeropt`` (the
format's zero point) and ``bitwidth`` (any width), attributes ``signed``, ``narrow`` and
``rounding_mode``; weights and biases are float initializers (their values, on their grid)
feeding their own ``Quant``.  Between the quantizers are the model's float ops (opset 11,
QONNX's preferred opset).  Node names are ``quant/<cast>``, after the cast node of the edge.
The input keeps the example input's shape (FINN and hls4ml expect a fixed batch size;
:func:`run_qonnx` sets another for execution); the float output is ``output``.  After qonnx's
clean-up (``cleanup_model``, ``ConvertToChannelsLastAndClean``, ``GemmToMatMul``) hls4ml's
ONNX front-end reads each layer's format from its ``Quant`` (16.8 → ``fixed<16,8,RND_CONV,SAT>``, 16.8,narrow → ``SAT_SYM``).

``Quant`` computes ``(clip(round(x / scale + zeropt), min, max) − zeropt) · scale`` with
numpy's ``round`` (half to even), so with an even zero point (the default is 0) each
quantizer *is* the fixed-point cast, bit for bit (tested on every tie and both bounds):

* ``nearest`` → ``ROUND``, ``floor`` → ``FLOOR``, ``toward_zero`` → ``DOWN``;
* a ``narrow`` format's range ``±(2**(b−1) − 1)`` is ``narrow=1``; every other format uses
  the full ``b``-bit range, ``narrow=0``; clipping before
  rounding to integer bounds is the same as after;
* ``x / scale`` (a power of two) and ``+ zeropt`` are exact in float32 for codes below
  ``2**24``.

An odd zero point differs at ties: ``Quant`` rounds ``x / scale + zeropt`` to even, the
formats (and ONNX QuantizeLinear) round ``x / scale`` and then add the zero point, so an
exact tie lands one code away.  Wrap-around overflow has no ``Quant`` equivalent; such an
edge raises :class:`~fxcompile.errors.ExportError` naming it.  As in the QDQ flavour, the
float ops between the quantizers are not exact: Conv and Gemm accumulate in float32, so a
sum within float32's rounding error of a rounding boundary can land one code away from the
integer graph.  Measured with ``examples/export_flavours.py`` (SeedCNN, qonnx's executor):
baseline policy, 1 of 100,000 Fashion-MNIST test output codes off by one, top-1 agreement
100 %; optimized policy, none; the tests hold it to the QDQ flavour's tolerance::

    >>> model = to_qonnx(fold_bn(qmodel), (x[:1],))
    >>> (y,) = run_qonnx(model, x)     # qonnx's own executor; needs the qonnx extra
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import helper

from ...core import ir
from ...core.formats import FixedPoint
from .qdq import FloatGraph, build, parameter_codes

__all__ = ["to_qonnx", "run_qonnx", "quant_attributes", "DOMAIN", "OPSET"]

DOMAIN = "qonnx.custom_op.general"
OPSET = 11  # qonnx.util.basic.get_preferred_onnx_opset()

ROUNDING_MODES = {"nearest": "ROUND", "floor": "FLOOR", "toward_zero": "DOWN"}


def quant_attributes(fmt: FixedPoint) -> dict:
    """``signed``, ``narrow``, ``rounding_mode`` of the ``Quant`` that rounds like ``fmt``."""
    fmt = ir.stored_format(fmt)  # a parameter on its grid: every rounding agrees
    narrow = fmt.signed and fmt.code_min == -(1 << (fmt.bits - 1)) + 1
    return {"signed": int(fmt.signed), "narrow": int(narrow), "rounding_mode": ROUNDING_MODES[fmt.rounding]}


class QONNXGraph(FloatGraph):
    opset_imports = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]

    def check(self, fmt, where, constant):
        if fmt.overflow != "saturate" and not constant:
            return f"{where} has format {fmt}, which wraps on overflow (Quant saturates)"
        return None

    def _quant(self, x: str, fmt: FixedPoint, cast: str) -> str:
        inputs = [x, self.const(2.0 ** -fmt.frac, np.float32), self.const(fmt.zero_point, np.float32),
                  self.const(fmt.bits, np.float32)]
        return self.node("Quant", inputs, name=f"quant/{cast}", domain=DOMAIN, **quant_attributes(fmt))

    def activation(self, x, fmt, cast):
        return self._quant(x, fmt, cast)

    def parameter(self, value, fmt, cast):
        values = fmt.from_codes(parameter_codes(value, fmt)).numpy()
        return self._quant(self.const(values, np.float32, name=f"{cast}/values"), fmt, cast)


def to_qonnx(gm: fx.GraphModule, example_inputs, name: str = "fxcompile") -> onnx.ModelProto:
    """The BN-folded compiled model ``gm`` as a QONNX model (see the module docstring)."""
    model = build(gm, example_inputs, QONNXGraph(), name)
    for value, example in zip(model.graph.input, example_inputs):
        value.type.tensor_type.shape.dim[0].dim_value = example.shape[0]
    for value in model.graph.output:
        value.type.tensor_type.shape.dim[0].dim_value = example_inputs[0].shape[0]
    return model


def run_qonnx(model: onnx.ModelProto, *inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Execute a QONNX model with qonnx's own executor (``execute_onnx``, node by node) on
    ``inputs`` of any batch size; the outputs in graph order.  Needs ``pip install qonnx``."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    arrays = [np.asarray(x, dtype=np.int64 if v.type.tensor_type.elem_type == onnx.TensorProto.INT64 else np.float32)
              for v, x in zip(model.graph.input, inputs)]  # token ids, attention masks: int64
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.value_info[:]
    for value, x in zip(model.graph.input, arrays):
        value.type.tensor_type.shape.dim[0].dim_value = x.shape[0]
    for value in model.graph.output:
        value.type.tensor_type.shape.dim[0].dim_value = arrays[0].shape[0]
    wrapper = ModelWrapper(model).transform(InferShapes())
    result = execute_onnx(wrapper, {v.name: x for v, x in zip(model.graph.input, arrays)})
    return [result[v.name] for v in model.graph.output]
