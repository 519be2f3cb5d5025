"""QDQ export: valid opset-21 ONNX, a Q/DQ pair on every fixed-point edge, close to the integer graph."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.qdq import container, to_qdq
from fxcompile.cli import main
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN
from fxcompile.deploy.fold_bn import fold_bn
from tests.helpers import assert_corruption_is_caught, compiled, differences, fixed_point_edges

ONNX_TYPES = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
              onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32}


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
def test_valid_onnx_that_ort_runs_close_to_the_integer_reference(model, tmp_path):
    x = torch.randn(32, 1, 28, 28) * 1.5
    q = compiled(model, fxc.baseline(), x)
    written = export_onnx(q, tmp_path / "m.onnx", (x[:1],), flavour="qdq")
    model = onnx.load(tmp_path / "m.onnx")
    assert model == written
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    differ, largest, agree = differences(model, q, x)
    # the documented tolerance: float32 accumulation moves a few codes by one or two
    assert differ <= x.shape[0] and largest <= 4 and agree >= 0.95


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("bias_scale", ["accumulator", "format"])
@pytest.mark.parametrize("policy", [fxc.baseline(), fxc.optimized(),
                                    fxc.Policy(activation="8.4", input="u8.7", weight="12.8", bias="16.8"),
                                    fxc.Policy(activation="16.8,zp=-300", weight="24.12,zp=5",
                                               bias="16.8")])
def test_every_fixed_point_edge_has_its_pair_with_scale_zero_point_and_type(policy, bias_scale):
    x = torch.randn(2, 1, 28, 28)
    q = compiled(ResidualCNN, policy, x, fold_batch_norm=True)  # the folded biases' pairs are checked too
    folded = fold_bn(q)
    model = to_qdq(folded, (x[:1],), bias_scale=bias_scale)
    nodes = {n.name: n for n in model.graph.node}
    produced_by = {n.output[0]: n for n in model.graph.node}
    consumer = {i: n for n in model.graph.node for i in n.input}
    initializers = {t.name: t for t in model.graph.initializer}
    edges = fixed_point_edges(folded)
    assert len(edges) > 10
    for cast, fmt, parameter in edges:
        dq = nodes[f"dequantize/{cast}"]
        assert dq.op_type == "DequantizeLinear"
        scale, zero_point, np_type = 2.0 ** -fmt.frac, fmt.zero_point, ONNX_TYPES[container(fmt, 32)[0]]
        layer = consumer[dq.output[0]]
        if bias_scale == "accumulator" and layer.op_type in ("Conv", "Gemm") and layer.input[2] == dq.output[0]:
            # the bias at the accumulator's binary point: int32, scale x_scale * w_scale
            scale = float(np.prod([_initializer(model, produced_by[i].input[1]) for i in layer.input[:2]]))
            zero_point, np_type = 0, np.int32
        assert _initializer(model, dq.input[1]) == np.float32(scale), cast
        if parameter is not None:
            codes = initializers[dq.input[0]]
            assert ONNX_TYPES[codes.data_type] == np_type, cast
            values = fmt.replace(rounding="nearest").quantize(parameter)
            decoded = (numpy_helper.to_array(codes).astype(np.float64) - (zero_point if len(dq.input) > 2 else 0)) * scale
            assert np.array_equal(decoded, values.double().numpy()), cast
        else:
            qn = produced_by[dq.input[0]]
            assert qn.op_type == "QuantizeLinear" and qn.name == f"quantize/{cast}"
            assert list(qn.input[1:]) == list(dq.input[1:])
            zero = initializers[dq.input[2]]
            assert zero.data_type == container(fmt)[0]
            assert ONNX_TYPES[zero.data_type] == {True: {8: np.int8, 16: np.int16}, False: {8: np.uint8, 16: np.uint16}}[
                fmt.signed][8 if fmt.bits <= 8 else 16]
            assert int(numpy_helper.to_array(zero)) == fmt.zero_point, cast
    # every float op reads only dequantized values (or a shape constant)
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "Relu", "MaxPool", "AveragePool", "Add", "Reshape"):
            sources = [produced_by[i].op_type if i in produced_by else "initializer" for i in node.input]
            assert sources[0] == "DequantizeLinear", node.name
            assert all(s == "DequantizeLinear" for s in sources[1:] if node.op_type != "Reshape"), node.name
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == sum(p is None for _, _, p in edges)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(edges)


def test_a_wrong_scale_is_caught_by_the_comparison():
    def wrong_scale(model):
        dq = next(n for n in model.graph.node if n.name == "dequantize/casts_conv1_weight")
        scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
        scale.CopyFrom(numpy_helper.from_array(np.array(2.0 ** -11, np.float32), scale.name))
    assert_corruption_is_caught(to_qdq, wrong_scale)


@pytest.mark.parametrize("activation, what", [("16.8,floor", "rounds floor"), ("16.8,wrap", "wraps on overflow"),
                                              ("20.8", "wider than 16 bits")])
def test_an_edge_qdq_cannot_express_raises_naming_it_and_writes_no_file(activation, what, tmp_path):
    x = torch.randn(2, 1, 28, 28)
    q = compiled(SeedCNN, fxc.Policy(activation=activation, input="16.8", weight="16.11", bias="16.8"), x)
    with pytest.raises(fxc.ExportError, match=rf"edge 'conv1->\*' \(activation_out.*format {activation}.*{what}"):
        export_onnx(q, tmp_path / "m.onnx", (x[:1],), flavour="qdq")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_raises_naming_the_node_and_writes_no_file(tmp_path):
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.GELU()

        def forward(self, x):
            return torch.exp(self.act(self.fc(x)))

    x = torch.randn(2, 8)
    q = fxc.compile(Gated(), fxc.baseline(), example_inputs=(x,))
    with pytest.raises(fxc.ExportError, match=r"'exp' \(exp\)"):
        export_onnx(q, tmp_path / "gated.onnx", (x,), flavour="qdq")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, differ", [("16.8", set()), ("16.8,narrow", {(-32767, -32768)})])
def test_narrow_range_is_the_one_saturation_difference(fmt, differ):
    # one cast, no arithmetic: QuantizeLinear's rounding equals ours; only a narrow format's
    # bound, which int16 QuantizeLinear cannot express, differs
    x = torch.cat([torch.arange(-40000, 40000, 7.25) / 256, torch.tensor([-128.0, -127.998, 0.5 / 256, 1.5 / 256])])
    x = x.reshape(-1, 1)
    q = fxc.compile(nn.Flatten(), fxc.Policy(activation=fmt, input=fmt), example_inputs=(x[:1],)).eval()
    session = onnx_session(to_qdq(fold_bn(q), (x[:1],)))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    (ref,) = run_integer(integer_graph(q, (x[:1],)), x, codes=True)
    codes = torch.from_numpy(np.round(out.astype(np.float64) * 256)).to(torch.int64)
    assert set(zip(ref[codes != ref].tolist(), codes[codes != ref].tolist())) == differ
    assert ref.min() == (-32767 if differ else -32768)


def test_export_command_writes_the_qdq_flavour(tmp_path, capsys):
    main(["export", str(tmp_path / "m.onnx"), "--model", "mlp", "--flavour", "qdq"])
    assert "qdq model" in capsys.readouterr().out
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}


@pytest.mark.parametrize("fmt", ["u8.4,zp=7", "16.8,zp=-301", "u16.9", "8.3"])
def test_quantize_linear_is_our_cast_where_the_container_is_the_format(fmt):
    # full-range formats of 8 or 16 bits, odd zero points included: every tie, both bounds, beyond
    fmt = fxc.FixedPoint.parse(fmt)
    lo, hi = (fmt.code_min - fmt.zero_point - 3) * fmt.scale, (fmt.code_max - fmt.zero_point + 3) * fmt.scale
    x = torch.cat([torch.linspace(lo, hi, 40001, dtype=torch.float64).float(),
                   (torch.arange(-2000, 2000) + 0.5).float() * fmt.scale]).reshape(-1, 1)
    q = fxc.compile(nn.Flatten(), fxc.Policy(activation=fmt, input=fmt), example_inputs=(x[:1],)).eval()
    session = onnx_session(to_qdq(fold_bn(q), (x[:1],)))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    (ref,) = run_integer(integer_graph(q, (x[:1],)), x)
    assert np.array_equal(out, ref.numpy())


def test_ort_fuses_an_eight_bit_model_into_quantized_ops(tmp_path):
    import onnxruntime as ort
    x = torch.randn(64, 1, 28, 28)
    policy = fxc.Policy(activation="8.3", input="u8.7", weight="8.6", bias="16.8")
    q = compiled(SeedCNN, policy, x)
    model = to_qdq(fold_bn(q), (x[:1],))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node}
    assert {"QLinearConv", "QGemm"} <= fused and not {"Conv", "Gemm"} & fused
    (out,) = session.run(None, {"x": x.numpy()})
    (ref,) = run_integer(integer_graph(q, (x[:1],)), x)
    assert np.array_equal(out, ref.numpy())  # integer accumulation, power-of-two requantization
    # with its own 16-bit scale the bias is not in the form ORT fuses
    opts.optimized_model_filepath = str(tmp_path / "unfused.onnx")
    ort.InferenceSession(to_qdq(fold_bn(q), (x[:1],), bias_scale="format").SerializeToString(), opts,
                         providers=["CPUExecutionProvider"])
    assert "QLinearConv" not in {n.op_type for n in onnx.load(tmp_path / "unfused.onnx").graph.node}


@pytest.mark.parametrize("weight, lowest", [("8.6", -128), ("8.6,narrow", -127)])
def test_a_narrow_weight_format_gives_narrow_range_int8_weights(weight, lowest):
    # the int8 weight range TensorRT wants is -127..127: a narrow format writes exactly that
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.fill_(-10.0)  # far below both formats: every code saturates
    x = torch.randn(1, 4)
    policy = fxc.Policy(input="8.4", activation="8.4", weight=weight, bias="16.8")
    q = fxc.compile(nn.Sequential(lin), policy, example_inputs=(x,)).eval()
    weights = [numpy_helper.to_array(t) for t in to_qdq(fold_bn(q), (x,)).graph.initializer
               if tuple(t.dims) == (3, 4)]
    assert len(weights) == 1 and weights[0].dtype == np.int8
    assert (weights[0] == lowest).all()


def test_uint8_activations_are_the_same_model_and_fuse_where_int8_pairs_do_not(tmp_path):
    import onnxruntime as ort
    x = torch.randn(16, 1, 28, 28)
    q = compiled(ResidualCNN, fxc.load_policy("8bit"), x)  # its residual add reads a value a conv reads too
    signed, unsigned = (to_qdq(fold_bn(q), (x[:1],), uint8_activations=u) for u in (False, True))
    def zero_types(model):
        produced_by = {n.output[0]: n for n in model.graph.node}
        types = {}
        for n in model.graph.node:
            if n.op_type == "QuantizeLinear" and n.name != "quantize/casts_x":
                after_pair = getattr(produced_by.get(n.input[0]), "op_type", None) == "DequantizeLinear"
                types[after_pair] = types.get(after_pair, set()) | {
                    next(t.data_type for t in model.graph.initializer if t.name == n.input[2])}
        return types
    assert zero_types(signed) == {False: {onnx.TensorProto.INT8}, True: {onnx.TensorProto.INT8}}
    # right after another pair (the input's) a pair stays int8: ORT would merge two uint8 pairs
    assert zero_types(unsigned) == {False: {onnx.TensorProto.UINT8}, True: {onnx.TensorProto.INT8}}

    def run(model, level, path=None):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        if path:
            opts.optimized_model_filepath = str(path)
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # unoptimized, both run the same Q/DQ arithmetic: the same values, bit for bit
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert np.array_equal(run(signed, plain), run(unsigned, plain))
    fused = {}
    for key, model in (("signed", signed), ("unsigned", unsigned)):
        run(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp_path / f"{key}.onnx")
        fused[key] = [n.op_type for n in onnx.load(tmp_path / f"{key}.onnx").graph.node]
    assert "Conv" in fused["signed"]  # the conv after the fan-out stays float with int8 pairs
    assert "Conv" not in fused["unsigned"] and "Gemm" not in fused["unsigned"]
    assert fused["unsigned"].count("QLinearConv") == sum(n.op_type == "Conv" for n in unsigned.graph.node)
    differ, largest, agree = differences(unsigned, q, x)
    assert differ <= x.shape[0] and largest <= 4 and agree >= 0.95


def test_export_onnx_passes_options_to_the_flavour(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    q = compiled(SeedCNN, fxc.load_policy("8bit"), x)
    model = export_onnx(q, tmp_path / "m.onnx", (x[:1],), flavour="qdq", uint8_activations=True)
    assert model == to_qdq(fold_bn(q), (x[:1],), name=type(q).__name__, uint8_activations=True)
    with pytest.raises(TypeError, match="uint8_activation"):
        export_onnx(q, tmp_path / "n.onnx", (x[:1],), flavour="qdq", uint8_activation=True)


class _Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def _bn_model(gamma=None):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten())  # the batch norm's codes themselves are the output
    g = torch.Generator().manual_seed(3)
    for bn in (model[1], model[4]):  # (compiled() draws the running statistics)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(8, generator=g) + 0.5 if gamma is None else gamma)
    return _Net(model).eval()


def test_folded_batch_norms_are_per_channel_weight_scales_and_stay_close():
    x = torch.randn(32, 1, 8, 8) * 2
    q = compiled(lambda: _bn_model(), fxc.load_policy("8bit"), x)
    plain, folded = (to_qdq(fold_bn(q), (x[:1],), uint8_activations=True, fold_batch_norms=f) for f in (False, True))
    ops = {key: [n.op_type for n in m.graph.node] for key, m in (("plain", plain), ("folded", folded))}
    assert ops["plain"].count("Mul") == 2 and "Mul" not in ops["folded"]
    assert ops["folded"].count("QuantizeLinear") == ops["plain"].count("QuantizeLinear") - 2  # the convs' own pairs
    scales = [_initializer(folded, n.input[1]) for n in folded.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0].endswith("/codes") and "weight" in n.input[0]]
    assert sorted(s.size for s in scales)[-2:] == [8, 8]  # both conv weights: one scale per output channel
    # one rounding fewer than the simulation per batch norm: near the integer graph, not on it
    # (the unfolded model is on it here)
    assert differences(plain, q, x)[:2] == (0, 0)
    differ, largest, _ = differences(folded, q, x)
    assert largest <= 1 and differ <= 0.1 * x.numel() * 8  # 1,185 of 16,384 here, each by one


def test_batch_norms_that_cannot_fold_stay_float_ops():
    x = torch.randn(8, 1, 8, 8)
    gamma = torch.tensor([1.0, -1.0, 1, 1, 1, 1, 1, 1])  # a negative scale: no positive per-channel scale
    q = compiled(lambda: _bn_model(gamma), fxc.load_policy("8bit"), x)
    folded = to_qdq(fold_bn(q), (x[:1],), uint8_activations=True, fold_batch_norms=True)
    assert [n.op_type for n in folded.graph.node].count("Mul") == 2


def test_export_command_passes_the_qdq_options_and_refuses_them_elsewhere(tmp_path, capsys):
    main(["export", str(tmp_path / "m.onnx"), "--model", "residual_cnn", "--policy", "8bit", "--flavour", "qdq",
          "--uint8-activations", "--fold-batch-norms"])
    nodes = onnx.load(tmp_path / "m.onnx").graph.node
    assert "Mul" not in {n.op_type for n in nodes}  # the batch norms folded into the convs
    zero_points = {t.name: t.data_type for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert onnx.TensorProto.UINT8 in {zero_points[n.input[2]] for n in nodes if n.op_type == "QuantizeLinear"}
    with pytest.raises(SystemExit, match="--fold-batch-norms applies to --flavour qdq only"):
        main(["export", str(tmp_path / "n.onnx"), "--model", "residual_cnn", "--fold-batch-norms"])
    assert not (tmp_path / "n.onnx").exists()
