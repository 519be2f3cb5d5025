"""hls4ml handoff: hls4ml's C simulation against the integer reference, bit for bit.

The type mapping and its errors need no hls4ml; the C simulation tests build two small
projects with g++ (about half a minute each) and skip only without g++.
"""

import shutil

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.errors import ExportError
from fxcompile.deploy.backends.hls4ml import hls_plan, hls_precision, predict_codes
from fxcompile.deploy.fold_bn import fold_bn
from tests.helpers import on_grid


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * 8 * 8, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


# ---- the type mapping (no hls4ml needed) -------------------------------------------------

@pytest.mark.parametrize("fmt, expected", [
    ("16.8", "ap_fixed<16,8,AP_RND_CONV,AP_SAT>"),
    ("16.8,narrow", "ap_fixed<16,8,AP_RND_CONV,AP_SAT_SYM>"),
    ("8.4,floor,wrap", "ap_fixed<8,4,AP_TRN,AP_WRAP>"),
    ("12.14,toward_zero,narrow", "ap_fixed<12,-2,AP_TRN_ZERO,AP_SAT_SYM>"),
    ("12.14,toward_zero", "ap_fixed<12,-2,AP_TRN_ZERO,AP_SAT>"),
    ("16.8,wrap", "ap_fixed<16,8,AP_RND_CONV,AP_WRAP>"),
    ("u8.8", "ap_ufixed<8,0,AP_RND_CONV,AP_SAT>"),
    ("u8.-2,floor,wrap", "ap_ufixed<8,10,AP_TRN,AP_WRAP>"),
])
def test_precision_strings(fmt, expected):
    assert hls_precision(fxc.FixedPoint.parse(fmt)) == expected


def test_stochastic_parameters_map_like_nearest_but_values_refuse():
    fmt = fxc.FixedPoint.parse("24.12,stochastic")
    assert hls_precision(fmt, parameter=True) == "ap_fixed<24,12,AP_RND_CONV,AP_SAT>"
    with pytest.raises(ExportError, match=r"edge 'a->b'.*24\.12,stochastic"):
        hls_precision(fmt, "edge 'a->b'")


@pytest.mark.parametrize("pattern, activation, message", [
    ("relu", "16.8,zp=5", r"edge 'fc1->relu' has format 16\.8,zp=5 with zero point 5"),
    ("fc1", "16.8,stochastic", r"edge 'flatten->fc1'.*16\.8,stochastic"),
], ids=["zero point", "stochastic activation"])
def test_formats_without_ap_fixed_are_refused_naming_the_edge_and_format(pattern, activation, message):
    x = torch.randn(2, 2, 8, 8)
    policy = fxc.Policy(activation="16.8", weight="16.12", bias="16.8",
                        overrides=[{"pattern": pattern, "activation": activation}])
    q = on_grid(fxc.compile(TinyMLP(), policy, example_inputs=(x,)))
    with pytest.raises(ExportError, match=message):
        hls_plan(q, (x[:1],))


def test_accumulator_covers_the_largest_sum_exactly():
    """accum width = bits of max_o(sum |w| * max|x| + |b|) + sign, at the aligned binary point."""
    x = torch.randn(2, 2, 8, 8)
    q = on_grid(fxc.compile(TinyMLP(), fxc.Policy(activation="8.4", weight="8.6", bias="8.8"), example_inputs=(x,)))
    graph, layers = hls_plan(q, (x[:1],))
    fc1 = next(l for l in layers if l.name == "fc1")
    op = graph.op_of("fc1")
    bound = max(sum(abs(int(w)) * 128 for w in row) + abs(int(b))  # 8.4 reaches code -128
                for row, b in zip(op.attrs["weight"].tolist(), op.attrs["bias"].tolist()))
    width = bound.bit_length() + 1
    assert op.frac == 10  # max(4 + 6, 8)
    assert fc1.precision["accum"] == f"ap_fixed<{width},{width - 10},AP_TRN,AP_WRAP>"
    assert fc1.precision["result"] == "ap_fixed<8,4,AP_RND_CONV,AP_SAT>"
    assert fc1.edges == {"weight": "fc1_weight->*", "bias": "fc1_bias->*", "result": "fc1->*"}


def test_batch_norm_is_folded_into_the_convolution():
    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, bias=False)
            self.bn = nn.BatchNorm2d(3)
            self.relu = nn.ReLU()
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(3 * 6 * 6, 4)

        def forward(self, x):
            return self.fc(self.flatten(self.relu(self.bn(self.conv(x)))))

    torch.manual_seed(0)
    net = ConvBN()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
    x = torch.randn(2, 2, 8, 8)
    q = on_grid(fxc.compile(net, fxc.baseline(), example_inputs=(x,), fold_batch_norm=True))
    graph, layers = hls_plan(q, (x[:1],))
    assert [l.kind for l in layers] == ["input", "conv2d", "relu", "reshape", "linear"]
    conv = layers[1].module
    folded = dict(fold_bn(q).named_parameters())  # W·s and (b − μ)·s + β, in their formats
    assert torch.equal(conv.weight.detach(), folded["conv.weight"].detach().double())
    assert torch.equal(conv.bias.detach(), folded["conv.bias"].detach().double())
    assert "bias" in layers[1].precision  # the folded bias takes the batch norm's bias format


def test_unsupported_op_is_named():
    class Averaging(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(2, 2, 3), nn.AvgPool2d(2)

        def forward(self, x):
            return self.pool(self.conv(x))

    x = torch.randn(2, 2, 6, 6)
    q = on_grid(fxc.compile(Averaging(), fxc.baseline(), example_inputs=(x,)))
    with pytest.raises(ExportError, match=r"'pool' \(sum_pool2d\) has no hls4ml layer"):
        hls_plan(q, (x[:1],))


class Residual(nn.Module):
    """conv → relu → conv → relu → conv, added to the first relu's output, then a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(x + self.conv3(torch.relu(self.conv2(x))))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def test_residual_add_is_a_merge_layer_reading_both_branches():
    x = torch.randn(2, 2, 8, 8)
    q = on_grid(fxc.compile(Residual(), fxc.Policy(activation="10.5", weight="12.8", bias="10.6", name="p"),
                            example_inputs=(x,)))
    _, layers = hls_plan(q, (x[:1],))
    (add,) = [layer for layer in layers if layer.kind == "add"]
    assert add.inputs == ["relu", "conv3"]
    assert add.precision["result"] == "ap_fixed<10,5,AP_RND_CONV,AP_SAT>"  # the cast after the add


class Concat(nn.Module):
    """Two conv branches (3x3 and 1x1) of the input concatenated along channels, then conv/pool/linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.conv = nn.Conv2d(5, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_concat_is_a_concatenate_layer_reading_both_branches():
    x = torch.randn(2, 2, 8, 8)
    q = on_grid(fxc.compile(Concat(), fxc.baseline(), example_inputs=(x,)))
    _, layers = hls_plan(q, (x[:1],))
    (cat,) = [layer for layer in layers if layer.kind == "concat"]
    assert cat.inputs == ["relu", "b"]
    assert cat.precision["result"] == "ap_fixed<16,8,AP_RND_CONV,AP_SAT>"  # both operands' type
    # the input has two readers: they read a copy (hls4ml transposes the input for one reader only)
    assert [layer.kind for layer in layers[:2]] == ["input", "copy"]
    assert [layer.name for layer in layers if layer.name in ("a", "b")] == ["a", "b"]
    assert all(layer.inputs == ["input_copy"] for layer in layers if layer.name in ("a", "b"))
    conv = next(layer for layer in layers if layer.name == "conv")
    assert conv.module.in_channels == 5


def test_concat_of_two_binary_points_rounds_once_into_the_cast_after_it():
    """12.2 codes shifted left by 6 meet 16.8 codes; the cast after the concatenation (16.8,
    saturating) is the Concatenate layer's result type, so hls4ml saturates where it does."""
    x = torch.randn(2, 2, 8, 8)
    policy = fxc.Policy(activation="16.8", weight="16.12", bias="16.8",
                        overrides=[{"pattern": "relu", "activation_out": "12.2"}, {"pattern": "cat", "activation_in": None}])
    q = on_grid(fxc.compile(Concat(), policy, example_inputs=(x,)))
    graph, layers = hls_plan(q, (x[:1],))
    assert (graph.op_of("cat").frac, graph.op_of("cat").attrs["shifts"]) == (8, (6, 0))
    (cat,) = [layer for layer in layers if layer.kind == "concat"]
    assert cat.precision["result"] == "ap_fixed<16,8,AP_RND_CONV,AP_SAT>"
    assert next(layer for layer in layers if layer.name == "relu").precision["result"] == \
        "ap_fixed<12,10,AP_RND_CONV,AP_SAT>"


def test_concat_without_a_cast_holds_every_operand_exactly():
    """Without a cast after it, the result type is the narrowest that holds both operands'
    codes at the largest binary point: 12.2 codes << 6 reach -2**17, so 18 bits at frac 8."""
    from fxcompile.deploy.backends.hls4ml import HlsLayer, _concat_codes, _concat_layer
    from fxcompile.deploy.lower import IntegerGraph, IntOp
    fmts = {"p": fxc.FixedPoint.parse("12.2"), "q": fxc.FixedPoint.parse("u8.8")}
    op = IntOp("concat", "c", ("p", "q"), 8, None, {"axis": 1, "shifts": (6, 0)}, "c")
    graph = IntegerGraph(["x"], [(1, 2, 4, 4)], [op], ["c"], {"c": (1, 4, 4, 4)})
    producers = {n: HlsLayer(n, "conv2d", None, {}) for n in fmts}
    layer = _concat_layer(op, graph, fmts, {"p": "P", "q": "Q"}, producers, "node 'c'")
    assert layer.precision["result"] == "ap_fixed<18,10,AP_TRN,AP_WRAP>"
    codes = _concat_codes(op, [fmts["p"], fmts["q"]])
    assert (codes.code_min, codes.code_max, codes.frac) == (-2048 << 6, 2047 << 6, 8)


@pytest.mark.parametrize("forward, message", [
    (lambda m, x: torch.cat([m.a(x), m.a(x)], dim=2), r"node 'cat' \(concat\).*along axis 2"),
    (lambda m, x: torch.cat([m.a(x), m.a(x), m.a(x)], dim=1), r"node 'cat' \(concat\).*got 3 operands"),
], ids=["along height", "three operands"])
def test_concat_that_concatenate_cannot_express_is_refused(forward, message):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return forward(self, x)

    x = torch.randn(2, 2, 4, 4)
    q = on_grid(fxc.compile(Net(), fxc.baseline(), example_inputs=(x,)))
    with pytest.raises(ExportError, match=message):
        hls_plan(q, (x[:1],))


class Gate(nn.Module):
    """A product of two conv branches (a gate), then pool/linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.a(x)) * self.b(x)
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def test_product_is_a_multiply_layer_with_the_cast_as_result_type():
    x = torch.randn(2, 2, 8, 8)
    q = on_grid(fxc.compile(Gate(), fxc.Policy(activation="10.5", weight="12.8", bias="10.6"), example_inputs=(x,)))
    graph, layers = hls_plan(q, (x[:1],))
    (mul,) = [layer for layer in layers if layer.kind == "mul"]
    assert mul.inputs == ["relu", "b"]
    assert graph.op_of(mul.name).frac == 10
    assert mul.precision["result"] == "ap_fixed<10,5,AP_RND_CONV,AP_SAT>"  # the one rounding: the cast after it


def test_broadcasting_product_is_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 1, 1)

        def forward(self, x):
            return self.a(x) * self.b(x)

    x = torch.randn(2, 2, 4, 4)
    q = on_grid(fxc.compile(Scaled(), fxc.Policy(activation="10.5", weight="12.8", bias="10.6"), example_inputs=(x,)))
    with pytest.raises(ExportError, match=r"node 'mul' \(mul\).*one shape.*\(1, 3, 4, 4\) and \(1, 1, 4, 4\)"):
        hls_plan(q, (x[:1],))


# ---- C simulation against the integer reference ------------------------------------------

def _needs_hls4ml():
    import hls4ml  # noqa: F401 - in the dev extra: a missing hls4ml fails, it does not skip
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed; hls4ml's C simulation builds with it")


@pytest.mark.parametrize("model, policy, scale", [
    (TinyCNN, fxc.Policy(activation="8.4,floor,wrap", weight="8.6", bias="8.4", name="floor_wrap"), 4.0),
    (TinyMLP, fxc.Policy(activation="10.5", weight="12.8,stochastic", bias="10.6,stochastic", name="nearest_sat"), 3.0),
    (Residual, fxc.Policy(activation="10.5", weight="12.8", bias="10.6", name="residual"), 3.0),
    (Concat, fxc.baseline(), 8.0),
    (Concat, fxc.Policy(activation="16.8", weight="16.12", bias="16.8", name="concat_two_binary_points",
                        overrides=[{"pattern": "relu", "activation_out": "12.2"}, {"pattern": "cat", "activation_in": None}]),
     8.0),
    (Gate, fxc.Policy(activation="10.5", weight="12.8", bias="10.6", name="gate"), 3.0),
], ids=["conv_floor_wrap", "dense_nearest_saturate", "residual_add_saturate", "concat_baseline",
        "concat_two_binary_points", "multiply_saturate"])
def test_c_simulation_equals_integer_reference(tmp_path, model, policy, scale):
    """Narrow formats and large inputs so that saturation (dense) and wrap (conv) occur, and
    exact ties at the dense model's input binary point (5 bits)."""
    _needs_hls4ml()
    from fxcompile.deploy.backends.hls4ml import to_hls4ml
    torch.manual_seed(0)
    x = torch.randn(24, 2, 8, 8) * scale
    x[0] = torch.round(x[0] * 32) / 32 + 1 / 64  # exact ties at the input's binary point (5 bits)
    net = model()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4)  # outputs beyond the format's range
    q = on_grid(fxc.compile(net, policy, example_inputs=(x[:2],)))
    graph, _ = hls_plan(q, (x[:1],))
    (ref,) = run_integer(graph, x, codes=True)
    hls_model = to_hls4ml(q, tmp_path / "prj", example_inputs=(x[:1],))
    hls_model.compile()
    codes = predict_codes(hls_model, x, graph.op_of(graph.outputs[0]).frac)
    assert torch.equal(codes, ref)
    out_fmt = graph.op_of(graph.op_of(graph.outputs[0]).inputs[0]).fmt
    assert len(torch.unique(ref)) > 10  # the comparison is not vacuous
    if out_fmt.overflow == "saturate":
        assert ((ref == out_fmt.code_max) | (ref == out_fmt.code_min)).any()  # saturation happened
    else:
        assert _wrapped(graph, x)  # some cast wrapped


@pytest.mark.parametrize("model", [TinyCNN, TinyMLP], ids=["conv", "dense"])
def test_c_simulation_with_shared_multipliers_equals_integer_reference(tmp_path, model):
    """A reuse factor above 1 (each multiplier serves several products, what an
    ``hls4ml_dsps`` budget with ``hls4ml_reuse_factor`` assumes) keeps the arithmetic."""
    _needs_hls4ml()
    from fxcompile.deploy.backends.hls4ml import to_hls4ml
    torch.manual_seed(1)
    x = torch.randn(16, 2, 8, 8) * 3
    q = on_grid(fxc.compile(model(), fxc.Policy(activation="10.5", weight="12.8", bias="10.6", name="rf"),
                            example_inputs=(x[:2],)))
    graph, _ = hls_plan(q, (x[:1],))
    (ref,) = run_integer(graph, x, codes=True)
    hls_model = to_hls4ml(q, tmp_path / "prj", example_inputs=(x[:1],), reuse_factor=2)
    assert all(layer.get_attr("reuse_factor") == 2 for layer in hls_model.get_layers() if "weight" in layer.weights)
    hls_model.compile()
    assert torch.equal(predict_codes(hls_model, x, graph.op_of(graph.outputs[0]).frac), ref)
    assert len(torch.unique(ref)) > 10


def _wrapped(graph, x) -> bool:
    """Whether any requantize of the integer graph wrapped on ``x`` (its rounded value left the range)."""
    from fxcompile.deploy.backends.integer import KERNELS
    from fxcompile.deploy.lower import round_shift
    env, wrapped = dict(zip(graph.inputs, (x,))), False
    for op in graph.ops:
        args = [env[i] for i in op.inputs]
        if op.op == "requantize" and op.fmt.overflow == "wrap":
            t = round_shift(args[0], op.attrs["shift"], op.fmt.rounding)
            wrapped |= bool(((t < op.fmt.code_min) | (t > op.fmt.code_max)).any())
        env[op.out] = KERNELS[op.op](op, *args)
    return wrapped


def test_importing_fxcompile_does_not_import_hls4ml():
    import subprocess
    import sys
    code = "import sys, fxcompile; assert callable(fxcompile.to_hls4ml); assert 'hls4ml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- command line ------------------------------------------------------------------------

def test_cli_without_hls4ml_says_how_to_install(monkeypatch, tmp_path):
    from fxcompile.cli import main
    monkeypatch.setitem(__import__("sys").modules, "hls4ml", None)  # import hls4ml now fails
    with pytest.raises(SystemExit, match=r"pip install.*\[hls\]"):
        main(["hls4ml", str(tmp_path / "prj"), "--model", "mlp"])


def test_cli_writes_the_project_with_the_assignment_types(tmp_path, capsys):
    _needs_hls4ml()
    from fxcompile.cli import main
    main(["hls4ml", str(tmp_path / "prj"), "--model", "mlp", "--policy", "baseline"])
    assert "fc1" in capsys.readouterr().out
    defines = (tmp_path / "prj" / "firmware" / "defines.h").read_text()
    assert "typedef ap_fixed<16,8,AP_RND_CONV,AP_SAT,0> input_t;" in defines
    assert "typedef ap_fixed<24,12,AP_RND_CONV,AP_SAT,0> fc1_weight_t;" in defines


def test_cli_sets_the_reuse_factor_and_refuses_a_bad_one(tmp_path, capsys):
    _needs_hls4ml()
    from fxcompile.cli import main
    main(["hls4ml", str(tmp_path / "prj"), "--model", "mlp", "--policy", "baseline", "--reuse-factor", "2"])
    assert "reuse factor 2" in capsys.readouterr().out
    assert "reuse_factor=2" in (tmp_path / "prj" / "firmware" / "parameters.h").read_text().replace(" ", "")
    with pytest.raises(SystemExit, match="--reuse-factor.*positive int"):
        main(["hls4ml", str(tmp_path / "prj2"), "--model", "mlp", "--policy", "baseline", "--reuse-factor", "0"])
