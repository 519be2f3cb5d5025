"""ONNX export: ONNX Runtime against the integer reference, bit for bit."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.experiments.data import synthetic
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN
from tests.helpers import on_grid

INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                 onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64}


def _ort(model, x):
    out, codes = onnx_session(model).run(None, {"x": x.numpy()})
    return out, codes


def _randomise_batch_norm(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    return model


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
@pytest.mark.parametrize("policy", [fxc.baseline, fxc.optimized])
def test_ort_equals_integer_reference(model, policy, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28) * 1.5
    q = on_grid(fxc.compile(_randomise_batch_norm(model()), policy(), example_inputs=(x[:2],)))
    path = tmp_path / "model.onnx"
    export_onnx(q, path, (x[:2],))
    out, codes = _ort(onnx.load(path), x)
    graph = integer_graph(q, (x[:2],))
    (ref_codes,), (ref,) = run_integer(graph, x, codes=True), run_integer(graph, x)
    assert np.array_equal(codes, ref_codes.numpy())
    assert np.array_equal(out, ref.numpy())


@pytest.mark.parametrize("activation", ["16.8,floor", "12.5,toward_zero", "10.4,wrap", "u12.4",
                                        "16.8,zp=-300", "14.6,floor,wrap,zp=1000", "16.8,narrow", "12.5,narrow,zp=-7"])
def test_ort_equals_integer_reference_for_every_rounding_and_overflow(activation):
    torch.manual_seed(0)
    policy = fxc.Policy(activation=activation, input="16.8", weight="16.11", bias="16.8")
    x = torch.randn(16, 1, 28, 28) * 3
    q = on_grid(fxc.compile(_randomise_batch_norm(ResidualCNN()), policy, example_inputs=(x[:2],)))
    graph = integer_graph(q, (x[:2],))
    out, codes = _ort(to_onnx(graph), x)
    assert np.array_equal(codes, run_integer(graph, x, codes=True)[0].numpy())


def test_every_value_between_quantizer_and_dequantizer_is_integer():
    x = torch.randn(2, 1, 28, 28)
    q = on_grid(fxc.compile(ResidualCNN(), fxc.baseline(), example_inputs=(x,)))
    model = onnx.shape_inference.infer_shapes(to_onnx(integer_graph(q, (x,))), check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    checked = 0
    for node in model.graph.node:
        if node.name.startswith(("quantize/", "dequantize/")):
            continue  # the boundary: float in, float out
        for name in [*node.input, *node.output]:
            if name:
                assert types[name] in INTEGER_TYPES, f"{node.name}: {name} is {types[name]}"
                checked += 1
    assert checked > 100
    quantizers = [n for n in model.graph.node if n.name.startswith("quantize/")]
    assert quantizers[-1].op_type == "Cast" and quantizers[-1].attribute[0].i in INTEGER_TYPES


def test_check_model_full_check():
    x = torch.randn(2, 1, 28, 28)
    q = on_grid(fxc.compile(SeedCNN(), fxc.optimized(), example_inputs=(x,)))
    onnx.checker.check_model(to_onnx(integer_graph(q, (x,))), full_check=True)


def test_unsupported_op_raises_and_writes_no_file(tmp_path):
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.GELU()

        def forward(self, x):
            return torch.exp(self.act(self.fc(x)))

    x = torch.randn(2, 8)
    # no lookup table for a 24-bit input; no rule for exp
    policy = fxc.Policy(overrides=[{"pattern": "act", "activation_in": "24.12"}], **fxc.baseline().formats)
    q = fxc.compile(Gated(), policy, example_inputs=(x,))
    with pytest.raises(fxc.ExportError, match=r"'act' \(GELU\): input format 24.12.*'exp' \(exp\)"):
        export_onnx(q, tmp_path / "gated.onnx", (x,))
    assert list(tmp_path.iterdir()) == []


def test_top1_agrees_with_the_fixed_point_simulation():
    torch.manual_seed(0)
    (tx, ty), (vx, vy) = synthetic(n_train=256, n_test=1000)
    model = MLP()
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(tx[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), lr=1e-3), q)
    for i in range(0, 256, 32):
        opt.zero_grad()
        q.loss(q(tx[i:i + 32]), ty[i:i + 32]).backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        sim = q(vx)
    out, _ = _ort(to_onnx(integer_graph(q, (vx[:1],))), vx)
    agree = (torch.from_numpy(out).argmax(1) == sim.argmax(1)).float().mean().item()
    assert agree >= 0.99
    assert np.abs(out - sim.numpy()).max() <= 4 * 2.0 ** -8


def test_weight_digits_reconstruct_the_codes():
    from fxcompile.deploy.backends.onnx.matmul import _digits
    w = np.concatenate([np.arange(-70000, 70000, 7), [2 ** 23 - 1, -(2 ** 23) + 1, 0, 127, 128, -128, -129]])
    digits = _digits(w)
    # below 64 in magnitude: a pair of uint8 × digit products stays inside int16
    assert all(d.min() >= -64 and d.max() <= 63 for d in digits)
    assert np.array_equal(sum(d * 128 ** j for j, d in enumerate(digits)), w)


@pytest.mark.parametrize("eight_bit", [True, False])
def test_both_matmul_lowerings_are_bit_exact(eight_bit):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28) * 2
    q = on_grid(fxc.compile(SeedCNN(), fxc.Policy(activation="16.8", weight="24.12", bias="16.8"),
                            example_inputs=(x[:1],)))
    with torch.no_grad():  # large weights: three digits, and int64 digit sums
        q.get_submodule("conv2").weight.mul_(300.0).clamp_(-2000, 2000)
    graph = integer_graph(on_grid(q), (x[:1],))
    model = to_onnx(graph, eight_bit=eight_bit)
    ops = {n.op_type for n in model.graph.node}
    assert ("MatMulInteger" in ops) == eight_bit and (eight_bit or "MatMul" in ops)
    _, codes = _ort(model, x)
    assert np.array_equal(codes, run_integer(graph, x, codes=True)[0].numpy())


@pytest.mark.parametrize("fmt", ["12.4", "8.0", "u10.2,floor", "12.3,toward_zero", "10.2,wrap", "9.1,floor,wrap",
                                 "12.4,zp=-301", "12.4,zp=77", "12.4,narrow", "8.0,narrow,zp=3"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shift", [-2, 0, 1, 3, 6])
def test_requantize_every_code_including_ties(fmt, relu, shift):
    """Every input code in a range wider than the output format, so each tie, each negative
    value and each saturation edge meets the rounding shift (and the ReLU folded into it)."""
    from fxcompile.core.formats import FixedPoint, as_format
    from fxcompile.deploy.lower import IntegerGraph, IntOp
    out_fmt = as_format(fmt)
    in_fmt = FixedPoint(20, out_fmt.frac + shift)
    codes = torch.arange(-(2 ** 14), 2 ** 14, dtype=torch.float64)
    x = (codes * 2.0 ** -in_fmt.frac).float().reshape(1, -1)
    ops = [IntOp("quantize", "q", ("x",), in_fmt.frac, in_fmt, {"fmt": in_fmt}),
           IntOp("requantize", "r", ("q",), out_fmt.frac, out_fmt, {"shift": shift, "fmt": out_fmt})]
    if relu:
        ops.append(IntOp("relu", "u", ("r",), out_fmt.frac, out_fmt))
    ops.append(IntOp("dequantize", "out", (ops[-1].out,), out_fmt.frac))
    shape = tuple(x.shape)
    graph = IntegerGraph(["x"], [shape], ops, ["out"], {op.out: shape for op in ops})
    _, ort_codes = _ort(to_onnx(graph), x)
    assert np.array_equal(ort_codes, run_integer(graph, x, codes=True)[0].numpy())


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
def test_baseline_convolutions_and_pools_work_in_int32(model):
    """The 16-bit baseline's conv/pool bounds fit int32: no (slow) int64 tensor there.  (A
    linear layer with a long fan-in may need int64: Σ|w| · 2**15 can exceed 2**31.)"""
    x = torch.randn(2, 1, 28, 28)
    q = on_grid(fxc.compile(model(), fxc.baseline(), example_inputs=(x,)))
    onnx_model = onnx.shape_inference.infer_shapes(to_onnx(integer_graph(q, (x,))), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx_model.graph.value_info}
    body = [n for n in onnx_model.graph.node if n.name.startswith(("conv2d/", "max_pool2d/", "sum_pool2d/", "add/"))]
    wide = [n.name for n in body if any(types.get(o) == onnx.TensorProto.INT64 for o in n.output)]
    assert wide == [] and (body or model is MLP)


@pytest.mark.parametrize("prefer", ["8-bit", "int32"])
@pytest.mark.parametrize("activation", ["16.8", "12.5,zp=-301", "u12.4"])
def test_signed_and_offset_inputs_to_padded_strided_convolutions(prefer, activation, monkeypatch):
    """Signed conv inputs (offset limbs, padding with the offset's digits) on both product
    paths: the 8-bit limbs and the direct int32 MatMul."""
    import fxcompile.deploy.backends.onnx.matmul as backend
    monkeypatch.setattr(backend, "_NS_MAC_INT32", 1e9 if prefer == "8-bit" else 0.0)
    torch.manual_seed(0)

    class Net(nn.Module):  # no ReLU: the second conv sees signed codes
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, stride=2),
                                      nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

        def forward(self, x):
            return self.body(x)

    model = Net()
    policy = fxc.Policy(activation=activation, input="16.8", weight="16.11", bias="16.8")
    x = torch.randn(8, 1, 28, 28) * 3
    graph = integer_graph(on_grid(fxc.compile(model, policy, example_inputs=(x[:2],))), (x[:2],))
    onnx_model = to_onnx(graph)
    assert ("MatMulInteger" in {n.op_type for n in onnx_model.graph.node}) == (prefer == "8-bit")
    session = onnx_session(onnx_model)
    _, codes = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(codes, run_integer(graph, x, codes=True)[0].numpy())


def _linear_graph(in_fmt, weight, relu):
    from fxcompile.deploy.lower import IntegerGraph, IntOp
    codes = torch.arange(in_fmt.code_min, in_fmt.code_max + 1, dtype=torch.float64) - in_fmt.zero_point
    x = (codes * 2.0 ** -in_fmt.frac).float().reshape(-1, 1)
    ops = [IntOp("quantize", "q", ("x",), in_fmt.frac, in_fmt, {"fmt": in_fmt})]
    if relu:
        ops.append(IntOp("relu", "r", ("q",), in_fmt.frac, in_fmt))
    ops += [IntOp("linear", "y", (ops[-1].out,), in_fmt.frac, None, {"weight": weight, "bias": None}),
            IntOp("dequantize", "out", ("y",), in_fmt.frac)]
    shapes = {op.out: (x.shape[0], 1 if op.op in ("quantize", "relu") else weight.shape[0]) for op in ops}
    return IntegerGraph(["x"], [tuple(x.shape)], ops, ["out"], shapes), x


@pytest.mark.parametrize("fmt", ["16.0", "u16.0", "12.3", "16.0,zp=-301"])
@pytest.mark.parametrize("relu", [False, True])
def test_limbs_and_digits_every_code(fmt, relu, monkeypatch):
    """Every input code of a 16-bit range through the 8-bit products (limbs by the wrapping
    uint8 Cast; a second limb below 128 on doubled digits), weights at the digits' edges."""
    import fxcompile.deploy.backends.onnx.matmul as backend
    from fxcompile.core.formats import as_format
    monkeypatch.setattr(backend, "_NS_MAC_INT32", 1e9)  # the 8-bit products, not one int32 MatMul
    weight = torch.tensor([[1], [-1], [63], [-64], [64], [8191], [-8192], [127 * 128 + 63], [-3]], dtype=torch.int64)
    graph, x = _linear_graph(as_format(fmt), weight, relu)
    model = to_onnx(graph)
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    _, codes = _ort(model, x)
    assert np.array_equal(codes, run_integer(graph, x, codes=True)[0].numpy())


@pytest.mark.parametrize("lo, hi", [(0, 255), (0, 32767), (0, 32768), (-32767, 32767), (0, 2 ** 20), (-5, 2 ** 23)])
def test_products_never_saturate_an_int16_pair(lo, hi):
    """x86 without VNNI sums pairs of uint8 × int8 products in int16: every term's digits keep
    2 · max limb · max |digit| inside it, and the terms rebuild u · w exactly."""
    from fxcompile.deploy.backends.onnx.builder import _Builder
    from fxcompile.deploy.backends.onnx.matmul import _plan
    rng = np.random.default_rng(0)
    flat = np.concatenate([rng.integers(-(2 ** 20), 2 ** 20, (16, 5)), [[64, -64, 8191, -8192, 2 ** 20]]])
    b = _Builder(None, {})
    b.ranges["x"] = (lo, hi)
    plan = _plan(b, flat, np.zeros(5, np.int64), "x")
    u_max = hi - plan.offset
    limb_max = [min(255, u_max >> (8 * i)) for i in range(plan.limbs)]
    for i, digits, _ in plan.terms:
        assert digits.min() >= -128 and digits.max() <= 127
        assert 2 * limb_max[i] * int(np.abs(digits).max()) <= 2 ** 15 - 1
    rebuilt = {i: sum(scale * digits.astype(object) for j, digits, scale in plan.terms if j == i) for i in range(plan.limbs)}
    assert all(np.array_equal(rebuilt[i], 256 ** i * flat.astype(object)) for i in range(plan.limbs))


@pytest.mark.parametrize("policy", [fxc.baseline, fxc.optimized])
def test_sum_pools_in_both_layouts(policy):
    """Average pools on an NCHW value (after a one-channel first conv) and on channels-last
    ones (after 8-bit products), tiling (two Splits) and overlapping (strided slices)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
                                      nn.ReLU(), nn.AvgPool2d(2), nn.AvgPool2d(2, stride=1), nn.AvgPool2d((2, 1)),
                                      nn.AvgPool2d((1, 2)), nn.Flatten(), nn.Linear(16 * 3 * 3, 10))

        def forward(self, x):
            return self.body(x)

    x = torch.randn(8, 1, 28, 28) * 2
    graph = integer_graph(on_grid(fxc.compile(Net(), policy(), example_inputs=(x[:2],))), (x[:2],))
    model = to_onnx(graph)
    ops = [n.op_type for n in model.graph.node]
    assert "Split" in ops and "MatMulInteger" in ops
    _, codes = _ort(model, x)
    assert np.array_equal(codes, run_integer(graph, x, codes=True)[0].numpy())


def test_a_batch_norm_between_convs_stays_channels_last():
    # 8-bit products make both convs channels-last; conv → batch norm (the unfolded affine map) → ReLU → conv → batch norm → flatten: the two
    # Transposes are the one into channels-last and the one back to NCHW before the flatten (besides
    # the pair around each QLinearConv, which ORT's layout optimizer turns into its NHWC kernel)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten())
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, 6, 5) * 2
    q = on_grid(fxc.compile(model, "8bit", example_inputs=(x[:1],))).eval()
    graph = integer_graph(q, (x[:1],))
    assert [op.op for op in graph.ops].count("affine") == 2
    onnx_model = to_onnx(graph)
    nodes = onnx_model.graph.node
    qlinear = {n.input[0] for n in nodes if n.op_type == "QLinearConv"} | {n.output[0] for n in nodes if n.op_type == "QLinearConv"}
    transposes = [n for n in nodes if n.op_type == "Transpose"]
    assert sum(n.output[0] not in qlinear and n.input[0] not in qlinear for n in transposes) == 2
    session = onnx_session(onnx_model)
    _, codes = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(codes, run_integer(graph, x, codes=True)[0].numpy())


def test_rounding_shifts_of_at_most_seven_bits_take_the_tie_bit_without_bitwise_and():
    # a linear layer (its rounding is not fused) of all 256 input codes with weights of every
    # parity: the sums' low six bits take every value, ties included; the tie bit comes from
    # the sign of an int8 cast, and ORT still equals the integer reference and the simulation
    lin = nn.Linear(1, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([1, 3, -5, 64, -127, 127]).view(6, 1) / 64)
        lin.bias.copy_(torch.tensor([0, 8, -8, 0.5, -3, 2.25]) / 16)
    x = (torch.arange(-128, 128, dtype=torch.float32) / 16).view(256, 1)
    q = on_grid(fxc.compile(lin, fxc.Policy(input="8.4", activation="8.4", weight="8.6", bias="16.8"),
                            example_inputs=(x[:1],))).eval()
    graph = integer_graph(q, (x[:1],))
    model = to_onnx(graph)
    assert "BitwiseAnd" not in [n.op_type for n in model.graph.node]
    session = onnx_session(model)
    _, codes = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    ref = run_integer(graph, x, codes=True)[0].numpy()
    assert np.array_equal(codes, ref)
    with torch.no_grad():
        assert torch.equal(q(x), run_integer(graph, x)[0])
    assert ref.min() == -128 and ref.max() == 127
