"""Backends that run a lowered :class:`~fxcompile.passes.lower.IntegerGraph`.

``integer``: the bit-true reference executor in PyTorch int64; ``onnx``: the same graph as
an ONNX model of integer ops that ONNX Runtime's CPU provider runs bit for bit.
"""
from .integer import run_integer
from .onnx import to_onnx

__all__ = ["run_integer", "to_onnx"]
