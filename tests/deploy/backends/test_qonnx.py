"""QONNX export: loads and runs in qonnx, one Quant per fixed-point edge, close to the integer graph."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.transformation.infer_shapes import InferShapes
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.qonnx import DOMAIN, run_qonnx, to_qonnx
from fxcompile.cli import main
from fxcompile.deploy.export import export_onnx
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN
from fxcompile.deploy.fold_bn import fold_bn

from tests import helpers
from tests.helpers import assert_corruption_is_caught, compiled, fixed_point_edges


def differences(model, q, x):
    """(output codes that differ, largest |difference|, top-1 agreement): qonnx's executor vs the reference."""
    return helpers.differences(model, q, x, run=run_qonnx)


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
def test_qonnx_executes_the_model_close_to_the_integer_reference(model, tmp_path):
    x = torch.randn(32, 1, 28, 28) * 1.5
    q = compiled(model, fxc.baseline(), x)
    export_onnx(q, tmp_path / "m.onnx", (x[:1],), flavour="qonnx")
    wrapper = ModelWrapper(str(tmp_path / "m.onnx")).transform(InferShapes()).transform(InferDataTypes())
    assert wrapper.check_all_tensor_shapes_specified()
    assert wrapper.get_tensor_shape("x") == [1, 1, 28, 28]
    differ, largest, agree = differences(wrapper.model, q, x)
    # the documented tolerance (as for QDQ): float32 accumulation moves a few codes by one or two
    assert differ <= x.shape[0] and largest <= 4 and agree >= 0.95


@pytest.mark.parametrize("policy", [fxc.baseline(), fxc.optimized(),
                                    fxc.Policy(activation="7.3", input="u9.7", weight="5.3", bias="12.6,floor"),
                                    fxc.Policy(activation="12.5,zp=-300", weight="24.12", bias="16.8")])
def test_one_quant_per_fixed_point_edge_with_its_format(policy):
    x = torch.randn(2, 1, 28, 28)
    q = compiled(ResidualCNN, policy, x)
    folded = fold_bn(q)
    wrapper = ModelWrapper(to_qonnx(folded, (x[:1],)))
    quants = {n.name: n for n in wrapper.graph.node if n.op_type == "Quant"}
    edges = fixed_point_edges(folded)
    assert len(quants) == len(edges) > 10
    for cast, fmt, parameter in edges:
        node = quants[f"quant/{cast}"]
        assert node.domain == DOMAIN
        op = getCustomOp(node)
        assert wrapper.get_initializer(node.input[3]) == fmt.bits, cast
        assert wrapper.get_initializer(node.input[1]) == np.float32(2.0 ** -fmt.frac), cast
        assert wrapper.get_initializer(node.input[2]) == fmt.zero_point, cast
        assert op.get_nodeattr("signed") == fmt.signed, cast
        assert op.get_nodeattr("narrow") == fmt.narrow, cast
        rounding = "nearest" if fmt.rounding == "stochastic" else fmt.rounding
        assert op.get_nodeattr("rounding_mode") == {"nearest": "ROUND", "floor": "FLOOR", "toward_zero": "DOWN"}[rounding]
        if parameter is not None:
            values = wrapper.get_initializer(node.input[0])
            expected = fmt.replace(rounding="nearest").quantize(parameter.double()).numpy()
            assert np.array_equal(values.astype(np.float64), expected), cast


def _exec_quant(x, fmt):
    """qonnx's executor on one Quant node written for ``fmt``."""
    from fxcompile.deploy.backends.qonnx import QONNXGraph
    g = QONNXGraph()
    out = g.activation("x", fmt, "cast")
    value = helper.make_tensor_value_info
    graph = helper.make_graph(g.nodes, "one", [value("x", onnx.TensorProto.FLOAT, list(x.shape))],
                              [value(out, onnx.TensorProto.FLOAT, list(x.shape))], g.initializers)
    (y,) = run_qonnx(helper.make_model(graph, opset_imports=g.opset_imports), x)
    return y


def _both(fmt):
    """Inputs over the whole range, every tie and beyond both bounds; (Quant's values, ours)."""
    from fxcompile.deploy.backends.integer import quantize_input
    lo, hi = (fmt.code_min - fmt.zero_point - 3) * fmt.scale, (fmt.code_max - fmt.zero_point + 3) * fmt.scale
    x = torch.linspace(lo, hi, 40001, dtype=torch.float64).float()
    x = torch.cat([x, (torch.arange(-2000, 2000) + 0.5).float() * fmt.scale]).reshape(1, -1)
    return x, _exec_quant(x, fmt).astype(np.float64), quantize_input(x, fmt).double().numpy() * fmt.scale


@pytest.mark.parametrize("fmt", ["16.8", "8.3", "u12.4", "10.2,floor", "12.5,toward_zero", "14.6,zp=-300",
                                 "u8.4,zp=8", "5.-2"])
def test_quant_is_our_cast_bit_for_bit(fmt):
    _, theirs, ours = _both(fxc.FixedPoint.parse(fmt))
    assert np.array_equal(theirs, ours)


def test_an_odd_zero_point_moves_ties_by_one_code():
    # Quant rounds x/scale + zeropt, we (and ONNX QuantizeLinear) round x/scale and then add it:
    # with an odd zero point, ties to even go the other way
    fmt = fxc.FixedPoint.parse("u8.4,zp=7")
    x, theirs, ours = _both(fmt)
    differ = theirs != ours
    t = x.double().numpy() * 2 ** fmt.frac  # centred codes before rounding
    tie = t - np.floor(t) == 0.5
    inside = (t > fmt.code_min - fmt.zero_point) & (t < fmt.code_max - fmt.zero_point)
    assert differ.any() and np.array_equal(differ, tie & inside)
    assert np.abs(theirs - ours)[differ].max() == fmt.scale


def test_a_wrong_bit_width_is_caught_by_the_comparison():
    def wrong_bit_width(model):
        quant = next(n for n in model.graph.node if n.name == "quant/casts_x")
        bits = next(t for t in model.graph.initializer if t.name == quant.input[3])
        bits.CopyFrom(numpy_helper.from_array(np.array(6.0, np.float32), bits.name))  # shared by every 16-bit edge
    assert_corruption_is_caught(to_qonnx, wrong_bit_width, run=run_qonnx)


def test_wrap_raises_naming_the_edge_and_writes_no_file(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    q = compiled(SeedCNN, fxc.Policy(activation="16.8,wrap", input="16.8", weight="16.11", bias="16.8"), x)
    with pytest.raises(fxc.ExportError, match=r"edge 'conv1->\*' \(activation_out.*16.8,wrap.*wraps on overflow"):
        export_onnx(q, tmp_path / "m.onnx", (x[:1],), flavour="qonnx")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_raises_naming_the_node_and_writes_no_file(tmp_path):
    x = torch.randn(2, 8)
    q = fxc.compile(nn.Sequential(nn.Linear(8, 8), nn.Softplus()), fxc.baseline(), example_inputs=(x,))
    with pytest.raises(fxc.ExportError, match=r"'_1' \(Softplus\)"):
        export_onnx(q, tmp_path / "m.onnx", (x,), flavour="qonnx")
    assert list(tmp_path.iterdir()) == []


def test_export_command_writes_the_qonnx_flavour(tmp_path, capsys):
    main(["export", str(tmp_path / "m.onnx"), "--model", "residual_cnn", "--flavour", "qonnx"])
    assert "qonnx model" in capsys.readouterr().out
    assert "Quant" in {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}


def test_hls4ml_reads_the_formats_from_the_quant_nodes(tmp_path):
    import hls4ml
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model
    x = torch.randn(2, 1, 28, 28)
    q = compiled(SeedCNN, fxc.Policy(activation="12.5,narrow", input="16.8", weight="16.11", bias="16.8"), x)
    export_onnx(q, tmp_path / "m.onnx", (x[:1],), flavour="qonnx")
    # the clean-up hls4ml's QONNX front-end asks for
    model = cleanup_model(ModelWrapper(str(tmp_path / "m.onnx")))
    model = cleanup_model(model.transform(ConvertToChannelsLastAndClean()).transform(GemmToMatMul()))
    config = hls4ml.utils.config.config_from_onnx_model(model, granularity="name", backend="Vitis")
    hls_model = hls4ml.converters.convert_from_onnx_model(model, output_dir=str(tmp_path / "hls"), backend="Vitis",
                                                          hls_config=config)
    layers = {layer.class_name: layer for layer in hls_model.get_layers()}
    assert {"Conv2D", "Dense", "Pooling2D"} <= set(layers)
    for kind in ("Conv2D", "Dense", "Pooling2D"):  # 12.5,narrow: round half to even, symmetric saturation
        assert str(layers[kind].get_output_variable().type.precision) == "fixed<12,7,RND_CONV,SAT_SYM,0>", kind
