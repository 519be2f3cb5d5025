"""The op registry: fx nodes map to the declared ops, and every backend covers every op
(with a rule/kernel/emitter, or listed as unsupported with its reason)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from fxcompile.core import ops
from fxcompile.deploy import lower
from fxcompile.deploy.backends import hls4ml, integer, onnx, qdq, qonnx

FX_OPS = sorted(ops.OPS)


def _covered(op: str, implemented: dict, unsupported: dict, extra: dict | None = None) -> None:
    tables = [name for name, table in (("implemented", implemented), ("unsupported", unsupported),
                                       ("structural", extra or {})) if op in table]
    assert len(tables) == 1, f"op {op!r} is in {tables or 'no table'}: exactly one is right"
    if op in unsupported:
        assert isinstance(unsupported[op], str) and len(unsupported[op]) > 10, f"op {op!r} needs a reason"


@pytest.mark.parametrize("op", FX_OPS)
def test_lowering_covers_the_op(op):
    _covered(op, lower.RULES, lower.UNSUPPORTED)


@pytest.mark.parametrize("op", FX_OPS)
def test_qdq_and_qonnx_cover_the_op(op):
    # QONNX writes through the QDQ builder, with its own quantizer nodes
    assert issubclass(qonnx.QONNXGraph, qdq.FloatGraph)
    _covered(op, qdq.FLOAT_OPS, qdq.UNSUPPORTED, qdq.STRUCTURAL)


@pytest.mark.parametrize("op", sorted(ops.INTEGER_OPS))
def test_integer_backends_cover_the_op(op):
    assert op in integer.KERNELS, f"the integer reference has no kernel for {op!r}"
    assert op in onnx.EMITTERS, f"the ONNX backend has no emitter for {op!r}"
    _covered(op, hls4ml.HLS_LAYERS, hls4ml.UNSUPPORTED)


def test_no_table_names_an_unregistered_op():
    for name, table in (("lower.RULES", lower.RULES), ("lower.UNSUPPORTED", lower.UNSUPPORTED),
                        ("qdq.FLOAT_OPS", qdq.FLOAT_OPS), ("qdq.UNSUPPORTED", qdq.UNSUPPORTED)):
        assert set(table) <= set(ops.OPS), f"{name} names ops the registry does not declare"
    for name, table in (("integer.KERNELS", integer.KERNELS), ("onnx.EMITTERS", onnx.EMITTERS),
                        ("hls4ml.HLS_LAYERS", hls4ml.HLS_LAYERS), ("hls4ml.UNSUPPORTED", hls4ml.UNSUPPORTED)):
        assert set(table) <= set(ops.INTEGER_OPS), f"{name} names integer ops the registry does not declare"


def _single_node_graph(kind: str, target):
    root = torch.nn.Module()
    graph = fx.Graph()
    x = graph.placeholder("x")
    if kind == "module":
        root.add_module("m", target())
        node = graph.call_module("m", (x,))
    elif kind == "function":
        node = graph.call_function(target, (x, x))  # binary operators need two operands to print
    else:
        node = graph.call_method(target, (x,))
    graph.output(node)
    return fx.GraphModule(root, graph), node


_MODULE_ARGS = {torch.nn.Conv1d: (1, 1, 1), torch.nn.Conv2d: (1, 1, 1), torch.nn.Conv3d: (1, 1, 1),
                torch.nn.Linear: (1, 1), torch.nn.MaxPool1d: (2,), torch.nn.MaxPool2d: (2,), torch.nn.MaxPool3d: (2,),
                torch.nn.AvgPool2d: (2,), torch.nn.AdaptiveAvgPool2d: (1,), torch.nn.ZeroPad2d: (1,),
                torch.nn.ConstantPad2d: (1, 0.0), torch.nn.Embedding: (4, 2)}
_MODULE_ARGS[torch.nn.LayerNorm], _MODULE_ARGS[torch.nn.Unflatten] = (4,), (1, (2, 2))
_TARGETS = [(op.name, "module", m) for op in ops.OPS.values() for m in op.modules] + \
           [(op.name, "function", f) for op in ops.OPS.values() for f in op.functions] + \
           [(op.name, "method", m) for op in ops.OPS.values() for m in op.methods]


@pytest.mark.parametrize("name, kind, target", _TARGETS, ids=[f"{n}-{k}-{getattr(t, '__name__', t)}"
                                                               for n, k, t in _TARGETS])
def test_fx_nodes_map_to_their_op(name, kind, target):
    if kind == "module":
        args = _MODULE_ARGS.get(target, ())
        gm, node = _single_node_graph(kind, lambda: target(*args))
    else:
        gm, node = _single_node_graph(kind, target)
    assert ops.op_of(gm, node).name == name


class DropPath(torch.nn.Module):  # timm's stochastic depth, as its qualified class name tells it
    __module__ = "timm.layers.drop"


def test_optional_package_modules_map_by_class_name():
    gm, node = _single_node_graph("module", DropPath)
    assert ops.op_of(gm, node).name == "drop_path"
    DropPath.__module__ = __name__  # another package's class of that name is not it
    try:
        assert ops.op_of(gm, node) is None
    finally:
        DropPath.__module__ = "timm.layers.drop"


def test_unknown_nodes_and_aten_ops():
    gm, node = _single_node_graph("function", torch.exp)
    assert ops.op_of(gm, node) is None
    gm, node = _single_node_graph("function", torch.ops.aten.conv2d.default)
    assert ops.op_of(gm, node).name == "conv2d"
    gm, node = _single_node_graph("method", "exp")
    assert ops.op_of(gm, node) is None
    gm, node = _single_node_graph("function", torch.ops.aten.sigmoid.default)
    assert ops.op_of(gm, node).name == "sigmoid"


def test_groups_are_what_the_passes_reason_with():
    assert ops.ops_in("adder") == {"add", "sub", "cat", "stack"}
    assert {"conv2d", "linear", "matmul"} <= ops.ops_in("multiply_accumulate")
    with pytest.raises(ValueError, match="unknown op group"):
        ops.ops_in("adders")
    with pytest.raises(ValueError, match="unknown group"):
        ops.Op("x", "no_such_group")
