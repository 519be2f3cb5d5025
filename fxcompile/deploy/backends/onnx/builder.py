"""The model under construction: its nodes, its pooled constants, and what is known about
each value (integer type, interval of codes, layout)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ...lower import IntegerGraph

OPSET = 18  # BitwiseAnd


_ONNX_TYPE = {np.int32: TensorProto.INT32, np.int64: TensorProto.INT64, np.uint8: TensorProto.UINT8,
              np.int8: TensorProto.INT8}
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
        self.uint8: dict[str, tuple[str, int]] = {}  # a value's codes + zero point as a uint8 tensor
        self.shifted: dict[str, tuple[str, int]] = {}  # value → (int32 tensor t, z): the value is t − z

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
