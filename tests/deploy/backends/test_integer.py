"""The integer reference executor against the float64 simulation (exact for these sizes)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import integer_graph
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN
from fxcompile.deploy.fold_bn import fold_bn
from tests.helpers import on_grid


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
@pytest.mark.parametrize("policy", [fxc.baseline, fxc.optimized])
def test_integer_graph_equals_exact_simulation(model, policy):
    """16-bit codes times 24-bit codes summed over < 2**13 terms stay below 2**53: the
    float64 simulation of the (folded) graph is exact, so the integer graph must equal it."""
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28) * 2
    q = on_grid(fxc.compile(model(), policy(), example_inputs=(x[:2],)))
    (y,) = run_integer(integer_graph(q, (x[:2],)), x)
    with torch.no_grad():
        expected = fold_bn(q).double()(x.double()).float()
    assert torch.equal(y, expected)


def test_codes_are_the_output_format_codes():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    q = on_grid(fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(x[:2],)))
    graph = integer_graph(q, (x[:2],))
    (y,), (codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    assert codes.dtype == torch.int64
    assert torch.equal(codes, fxc.fixed(16, 8).to_codes(y))


# ---- convs and linear layers: float64 sums while their bound fits 53 bits, int64 beyond ----

from fxcompile.core.ops import conv2d_float64  # noqa: E402
from fxcompile.deploy.backends import integer  # noqa: E402


def _edge_operands(g, shape_x, shape_w, bits, bias=True):
    """Random int64 codes whose accumulator bound has exactly ``bits`` bits, with inputs at
    their largest magnitude in places, so sums reach near the bound."""
    fan_in = math.prod(shape_w[1:])
    x_max = 2 ** 15 - 1
    w_max = (2 ** bits - 1) // (x_max * (fan_in + 1))  # the bias adds at most x_max · w_max
    x = torch.randint(-x_max, x_max + 1, shape_x, generator=g)
    x.view(-1)[::3] = x_max
    w = torch.randint(-w_max, w_max + 1, shape_w, generator=g)
    w[0] = w_max  # one output whose fan-in sums to w_max · fan_in: the bound is reached by an input of x_max
    b = torch.randint(-x_max * w_max, x_max * w_max + 1, shape_w[:1], generator=g) if bias else None
    assert integer.accumulator_bound(x, w, b).bit_length() == bits
    return x, w, b


@pytest.mark.parametrize("bits", [52, 53])
def test_float64_sums_give_the_int64_codes_at_the_bound(bits, monkeypatch):
    g = torch.Generator().manual_seed(bits)
    calls = []
    monkeypatch.setattr(integer.ops, "conv2d_float64", lambda *a: calls.append(1) or conv2d_float64(*a))
    for groups, stride, padding, dilation in ((1, 1, 1, 1), (2, 2, 0, 1), (8, 1, 2, 2)):
        x, w, b = _edge_operands(g, (3, 8, 9, 9), (8, 8 // groups, 3, 3), bits)
        x[0] = 2 ** 15 - 1  # a sample at the largest code: output channel 0 sums to the bound there
        args = (stride, padding, dilation, groups)
        got = integer.multiply_accumulate(F.conv2d, x, w, b, *args)
        assert got.dtype == torch.int64 and torch.equal(got, F.conv2d(x, w, b, *args))
    assert len(calls) == 3  # all three took the float64 path
    x, w, b = _edge_operands(g, (16, 64), (10, 64), bits)
    x[0] = 2 ** 15 - 1
    assert torch.equal(integer.multiply_accumulate(F.linear, x, w, b), F.linear(x, w, b))


def test_sums_beyond_53_bits_stay_int64(monkeypatch):
    """2**53 + 1 is no float64: the float64 sum would round it to 2**53."""
    x, w = torch.tensor([[1, 1]]), torch.tensor([[2 ** 53, 1]])
    assert integer.accumulator_bound(x, w, None).bit_length() == 54
    assert F.linear(x.double(), w.double()).item() == 2 ** 53  # what the float64 path would give
    assert integer.multiply_accumulate(F.linear, x, w, None).item() == 2 ** 53 + 1
    monkeypatch.setattr(integer.ops, "conv2d_float64", lambda *a: pytest.fail("float64 beyond 53 bits"))
    xc, wc = x.view(1, 2, 1, 1), w.view(1, 2, 1, 1)
    assert integer.multiply_accumulate(F.conv2d, xc, wc, None).item() == 2 ** 53 + 1
    g = torch.Generator().manual_seed(0)
    x, w, b = _edge_operands(g, (2, 4, 5, 5), (4, 4, 3, 3), 54)
    x[0] = 2 ** 15 - 1
    assert torch.equal(integer.multiply_accumulate(F.conv2d, x, w, b, 1, 1), F.conv2d(x, w, b, 1, 1))


@pytest.mark.parametrize("case", [
    # (batch, channels, size, out channels, kernel, stride, padding, dilation, groups)
    (5, 8, 9, 6, 3, 2, 1, 1, 2), (4, 8, 7, 8, 3, 1, 1, 1, 8), (3, 4, 11, 8, 5, 2, 2, 2, 4),
    (2, 3, 6, 4, (1, 3), (2, 1), (0, 1), 1, 1), (3, 6, 1, 12, 3, 1, 1, 1, 1), (2, 4, 8, 4, 2, 2, 0, 1, 1),
])
def test_conv2d_float64_is_f_conv2d(case):
    """The batched im2col conv that the simulation and the integer reference run in float64
    gives F.conv2d's exact int64 sums (grouped, depthwise, strided, dilated, padded)."""
    n, c, size, o, k, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(0)
    kernel = (k, k) if isinstance(k, int) else k
    x = torch.randint(-2 ** 15, 2 ** 15, (n, c, size, size), generator=g)
    w = torch.randint(-2 ** 20, 2 ** 20, (o, c // groups, *kernel), generator=g)
    b = torch.randint(-2 ** 30, 2 ** 30, (o,), generator=g)
    y = conv2d_float64(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == torch.float64 and y.is_contiguous()
    assert torch.equal(y.to(torch.int64), F.conv2d(x, w, b, stride, padding, dilation, groups))
