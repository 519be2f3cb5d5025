"""Lowering rules, one test each, against independent oracles.

The main oracle is the compiled model itself run in float64: with small codes every product
and sum is exact in float64, so the training-time simulation *is* exact arithmetic followed
by the cast's rounding, and the integer graph must equal it bit for bit.  Rounding shifts are
also checked against Python integers and fractions.
"""

import operator
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import quantize_input, run_integer
from fxcompile.runtime.cast import quantize_reference
from fxcompile.deploy.lower import RULES, UNSUPPORTED, lower, round_shift, saturate

POLICY = fxc.Policy(activation="16.8", weight="12.8", bias="16.10", gradient="16.10", loss="16.10")


def _exact_oracle(model, policy, x):
    """(integer graph output, float64 simulation output) for ``model`` under ``policy``."""
    torch.manual_seed(0)
    q = fxc.compile(model, policy, example_inputs=(x,))
    with torch.no_grad():
        for p in q.parameters():  # parameters on their grid, as fixed-point training leaves them
            p.copy_(fxc.fixed(12, 8).quantize(p) if p.dim() > 1 else fxc.fixed(16, 10).quantize(p))
    q.eval()
    graph = lower(q, (x,))
    (y,) = run_integer(graph, x)
    with torch.no_grad():
        expected = q.double()(x.double()).float()
    return graph, y, expected


def _ops(graph):
    return [op.op for op in graph.ops]


class Single(nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def test_rule_table_has_one_entry_per_op():
    assert set(RULES) == {"cast", "conv2d", "linear", "relu", "max_pool2d", "avg_pool2d", "flatten", "add",
                          "identity", "dropout", "adaptive_avg_pool2d", "mean", "fixed_point_average",
                          "fixed_point_avg_pool2d",
                          "fixed_point_matmul", "fixed_point_softmax", "fixed_point_layer_norm", "unflatten",
                          # structural ops
                          "reshape", "squeeze", "contiguous", "drop_path", "permute", "transpose", "getitem",
                          "split", "size", "cat", "stack", "mul", "fixed_point_mul", "sub",
                          "fixed_point_batch_norm", "pad", "interpolate", "write_back", "roll", "expand",
                          "relu6", "hardtanh", "clamp", "lookup",
                          # divisions by constants, average pools and means: their fixed-point definitions
                          "truediv", "fixed_point_divide", "fixed_point_avg_pool2d", "fixed_point_mean",
                          # text transformers: embeddings, Conv1D, slices, positions and masks
                          "embedding", "addmm", "slice", "select", "to", "bookkeeping", "key_padding_mask",
                          "fill_masked", "all_kept"}


# ---- rounding shift and saturation: Python integers as the oracle ----------------------------

def _python_round(v: int, shift: int, rounding: str) -> int:
    x = Fraction(v) / Fraction(2) ** shift
    if rounding == "nearest":
        return round(x)  # Python rounds half to even
    if rounding == "floor":
        return x.numerator // x.denominator
    return int(x)  # truncates toward zero


@pytest.mark.parametrize("rounding", ["nearest", "floor", "toward_zero"])
@pytest.mark.parametrize("shift", [-3, 0, 1, 2, 5, 13])
def test_round_shift_matches_python_integers(rounding, shift):
    v = torch.arange(-4100, 4100, dtype=torch.int64)
    expected = [_python_round(int(a), shift, rounding) for a in v]
    assert round_shift(v, shift, rounding).tolist() == expected


@pytest.mark.parametrize("fmt", ["8.2", "8.2,wrap", "u6.1", "8.3,zp=-20", "8.3,wrap,zp=7", "8.2,narrow", "8.3,narrow,zp=-20"])
def test_saturate_matches_python_integers(fmt):
    fmt = fxc.FixedPoint.parse(fmt)
    v = torch.arange(-700, 700, dtype=torch.int64)
    lo, hi, zp, n = fmt.code_min, fmt.code_max, fmt.zero_point, fmt.code_max - fmt.code_min + 1
    if fmt.overflow == "saturate":
        expected = [min(max(int(a) + zp, lo), hi) - zp for a in v]
    else:
        expected = [(int(a) + zp - lo) % n + lo - zp for a in v]
    assert saturate(v, fmt).tolist() == expected


@pytest.mark.parametrize("fmt", ["16.8", "8.2,floor", "8.4,toward_zero", "6.1,wrap", "8.3,zp=-20",
                                 "12.3,floor,wrap,zp=100", "16.8,narrow", "8.3,floor,narrow,zp=-20"])
def test_rule_cast_requantize_uses_the_training_tie_rule(fmt):
    """requantize(v at frac 12) == the training cast of v · 2**-12, including ties."""
    fmt = fxc.FixedPoint.parse(fmt)
    v = torch.arange(-300000, 300000, 37, dtype=torch.int64)
    v = torch.cat([v, torch.tensor([2048, -2048, 6144, -6144, 2 ** 11 * 5, -(2 ** 11) * 5])])  # exact ties
    got = saturate(round_shift(v, 12 - fmt.frac, fmt.rounding), fmt)
    expected = quantize_reference(v.double() * 2.0 ** -12, fmt.spec()) * 2.0 ** fmt.frac
    assert torch.equal(got.double(), expected)


@pytest.mark.parametrize("fmt", ["16.8", "8.2,floor", "8.4,toward_zero", "6.1,wrap", "8.3,zp=-20"])
def test_rule_cast_quantize_input_matches_the_cast(fmt):
    fmt = fxc.FixedPoint.parse(fmt)
    x = torch.cat([torch.randn(5000) * 40, torch.tensor([0.5, 1.5, -2.5, 1e9, -1e9]) * 2.0 ** -fmt.frac])
    expected = quantize_reference(x, fmt.spec()).double() * 2.0 ** fmt.frac
    assert torch.equal(quantize_input(x, fmt).double(), expected)


def test_rule_cast_refuses_stochastic_activations():
    policy = fxc.Policy(activation="16.8,stochastic", weight="16.8", bias="16.8")
    q = fxc.compile(nn.Sequential(nn.Linear(4, 3)), policy, example_inputs=(torch.randn(2, 4),))
    with pytest.raises(fxc.ExportError, match="stochastic"):
        lower(q, (torch.randn(2, 4),))


def test_rule_cast_refuses_float_edges():
    q = fxc.compile(nn.Sequential(nn.Linear(4, 3)), fxc.Policy(activation="16.8", weight=None, bias="16.8"),
                    example_inputs=(torch.randn(2, 4),))
    with pytest.raises(fxc.ExportError, match="float"):
        lower(q, (torch.randn(2, 4),))


# ---- op rules: the float64 simulation as the oracle -----------------------------------------

@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_rule_conv2d(stride, padding, dilation):
    x = torch.randn(3, 2, 9, 9) * 3
    graph, y, expected = _exact_oracle(nn.Conv2d(2, 4, 3, stride, padding, dilation), POLICY, x)
    assert "conv2d" in _ops(graph)
    assert torch.equal(y, expected)


def test_rule_linear_aligns_a_finer_bias():
    # bias 16.14 has more fractional bits than the accumulator (8 + 4): the weights scale up
    policy = fxc.Policy(activation="16.8", weight="12.4", bias="16.14", gradient="16.10", loss="16.10")
    x = torch.randn(5, 7) * 2
    graph, y, expected = _exact_oracle(nn.Linear(7, 3), policy, x)
    op = next(op for op in graph.ops if op.op == "linear")
    assert op.frac == 14
    assert torch.equal(y, expected)


def test_rule_linear():
    x = torch.randn(5, 7) * 2
    graph, y, expected = _exact_oracle(nn.Linear(7, 3), POLICY, x)
    assert torch.equal(y, expected)


def test_rule_relu():
    x = torch.randn(4, 6) * 5
    graph, y, expected = _exact_oracle(Single(lambda s, x: F.relu(x) + torch.relu(x).relu()), POLICY, x)
    assert _ops(graph).count("relu") == 3
    assert torch.equal(y, expected) and (y >= 0).all()


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 0)])
def test_rule_max_pool2d(kernel, stride, padding):
    x = torch.randn(2, 3, 8, 8) * 4
    graph, y, expected = _exact_oracle(Single(lambda s, x: s.mods[0](x), nn.MaxPool2d(kernel, stride, padding)),
                                       POLICY, x)
    assert "max_pool2d" in _ops(graph)
    assert torch.equal(y, expected)


def test_rule_avg_pool2d_power_of_two():
    x = torch.randn(2, 3, 14, 14) * 4
    graph, y, expected = _exact_oracle(Single(lambda s, x: s.mods[0](x), nn.AvgPool2d(4)), POLICY, x)
    assert "sum_pool2d" in _ops(graph)
    assert torch.equal(y, expected)


def test_rule_avg_pool2d_with_ceil_mode():
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)  # timm's resnet-d downsampling
    graph, y, expected = _exact_oracle(Single(lambda s, x: s.mods[0](x), pool), POLICY, torch.randn(2, 3, 8, 8))
    assert _ops(graph) == ["quantize", "sum_pool2d", "requantize", "dequantize"] and torch.equal(y, expected)
    # partial windows at the bottom and right: zeros padded there, each position's own divisor (4, 2, 1)
    graph, y, expected = _exact_oracle(Single(lambda s, x: s.mods[0](x), pool), POLICY, torch.randn(2, 3, 7, 7))
    assert _ops(graph) == ["quantize", "pad", "sum_pool2d", "scale", "requantize", "dequantize"]
    assert torch.equal(y, expected)


def test_rule_avg_pool2d_refuses_an_unrewritten_average_by_other_divisors():
    q = fxc.compile(Single(lambda s, x: s.mods[0](x), nn.AvgPool2d(3)), POLICY,
                    example_inputs=(torch.randn(1, 1, 6, 6),))
    lower(q, (torch.randn(1, 1, 6, 6),))  # compile made it the fixed-point average
    node = next(n for n in q.graph.nodes if n.target is fxc.core.ops.fixed_point_avg_pool2d)
    q.add_submodule("float_pool", nn.AvgPool2d(3))  # the float pool again
    node.op, node.target, node.args = "call_module", "float_pool", node.args[:1]
    q.recompile()
    with pytest.raises(fxc.ExportError, match=r"\(avg_pool2d\): an average over 9 values"):
        lower(q, (torch.randn(1, 1, 6, 6),))


def test_rule_add_aligns_binary_points():
    # uses without a format of their own (activation_in=None) see each value as produced
    policy = fxc.Policy(activation="16.8", activation_in=None, weight="12.8", bias="16.10", gradient="16.10",
                        loss="16.10", overrides=[{"pattern": "relu", "activation_out": "16.3"}])
    x = torch.randn(3, 5) * 6
    graph, y, expected = _exact_oracle(Single(lambda s, x: operator.add(torch.relu(x), x)), policy, x)
    op = next(op for op in graph.ops if op.op == "add")
    assert sorted(op.attrs["shifts"]) == [0, 5]
    assert torch.equal(y, expected)


@pytest.mark.parametrize("fn", [lambda s, x: s.mods[0](x), lambda s, x: torch.flatten(x, 1),
                                lambda s, x: x.flatten(2)])
def test_rule_flatten(fn):
    x = torch.randn(2, 3, 4, 5)
    graph, y, expected = _exact_oracle(Single(fn, nn.Flatten()), POLICY, x)
    assert "reshape" in _ops(graph)
    assert y.shape == expected.shape and torch.equal(y, expected)


def test_rule_identity():
    x = torch.randn(4, 6)
    graph, y, expected = _exact_oracle(Single(lambda s, x: s.mods[0](x), nn.Dropout(0.5)), POLICY, x)
    assert torch.equal(y, expected)


def test_unsupported_ops_are_listed_at_once_with_what_each_would_take():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv1d(2, 2, 3, padding=1), nn.MaxPool1d(2)

        def forward(self, x):
            return torch.cumsum(self.pool(self.conv(x)), -1) + self.pool(x)

    x = torch.randn(2, 2, 10)
    q = fxc.compile(Model(), POLICY, example_inputs=(x,))
    with pytest.raises(fxc.ExportError) as err:
        lower(q, (x,))
    message = str(err.value)
    for text in ("4 node(s)", "'conv' (Conv1d)", "'pool' (MaxPool1d)", "'pool_1' (MaxPool1d)", "'cumsum' (cumsum)",
                 f"Conv1d: {UNSUPPORTED['conv1d']}", f"MaxPool1d: {UNSUPPORTED['max_pool1d']}",
                 "cumsum: an op registry entry"):
        assert text in message
    assert message.count("MaxPool1d:") == 1  # what an op needs is said once
