"""Backends that run a lowered :class:`~fxcompile.deploy.lower.IntegerGraph`.

``integer``: the bit-true reference executor in PyTorch int64; ``onnx``: the same graph as
an ONNX model of integer ops that ONNX Runtime's CPU provider runs bit for bit.  ``qdq`` and
``qonnx`` write the BN-folded model as float ops between QuantizeLinear/DequantizeLinear
pairs or QONNX ``Quant`` nodes (close to, not bit-exact with, the integer graph).
"""
from .integer import run_integer
from .onnx import to_onnx
from .qdq import to_qdq
from .qonnx import run_qonnx, to_qonnx

__all__ = ["run_integer", "to_onnx", "to_qdq", "to_qonnx", "run_qonnx"]
