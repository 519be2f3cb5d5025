"""The lookup tables and clip bounds of elementwise nonlinearities, against Python's math module
as the oracle (float64 functions rounded in Python integers) and PyTorch autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompile.core import nonlinear
from fxcompile.core.formats import as_format

# the functions in Python floats, written from their definitions (not from torch)
_SOFTPLUS = lambda v: max(v, 0.0) + math.log1p(math.exp(-abs(v)))  # noqa: E731
ORACLES = {
    ("sigmoid", ()): lambda v: 1 / (1 + math.exp(-v)),
    ("tanh", ()): math.tanh,
    ("silu", ()): lambda v: v / (1 + math.exp(-v)),
    ("gelu", ("none",)): lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
    ("gelu", ("tanh",)): lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
    ("hardswish", ()): lambda v: v * min(max(v + 3, 0), 6) / 6,
    ("hardsigmoid", ()): lambda v: min(max(v / 6 + 0.5, 0), 1),
    ("leaky_relu", (0.1,)): lambda v: v if v >= 0 else 0.1 * v,
    ("elu", (0.5,)): lambda v: v if v > 0 else 0.5 * math.expm1(v),
    ("mish", ()): lambda v: v * math.tanh(_SOFTPLUS(v)),
}


def _round(v: float, fmt) -> int:
    """``v · 2**frac`` rounded and fitted to ``fmt``'s centred codes, in Python integers."""
    t = v * 2.0 ** fmt.frac
    k = {"nearest": round, "floor": math.floor, "toward_zero": math.trunc}[fmt.rounding](t)
    lo, hi = fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point
    if fmt.overflow == "saturate":
        return min(max(k, lo), hi)
    return (k - lo) % (hi - lo + 1) + lo


@pytest.mark.parametrize("function", list(ORACLES), ids=[f"{n}{p}" for n, p in ORACLES])
@pytest.mark.parametrize("fmt_in, fmt_out", [("8.4", "8.6"), ("u8.5", "8.2,floor"), ("10.6,narrow", "8.7,wrap"),
                                             ("8.4,zp=3", "8.5,toward_zero")])
def test_every_entry_is_the_output_formats_rounding_of_the_function(function, fmt_in, fmt_out):
    fin, fout = as_format(fmt_in), as_format(fmt_out)
    codes = nonlinear.table(*function, tuple(fin.spec()), tuple(fout.spec()))
    assert len(codes) == fin.code_max - fin.code_min + 1
    f = ORACLES[function]
    expected = [_round(f(c * 2.0 ** -fin.frac), fout)
                for c in range(fin.code_min - fin.zero_point, fin.code_max - fin.zero_point + 1)]
    assert codes.tolist() == expected


def test_lookup_forward_indexes_the_table_and_backward_is_the_float_derivative():
    fin, fout = as_format("12.6"), as_format("16.12")
    x = (torch.randint(-2048, 2048, (3, 50)).double() / 64).float().requires_grad_()
    for name, params in [("sigmoid", ()), ("gelu", ("tanh",)), ("elu", (0.5,)), ("mish", ()), ("hardswish", ())]:
        y = nonlinear.lookup(x, name, params, fin.spec(), fout.spec())
        table = nonlinear.table(name, params, tuple(fin.spec()), tuple(fout.spec()))
        index = (x.detach() * 64).round().long() + 2048
        assert torch.equal(y.detach(), (table[index].double() / 4096).float())
        g = torch.randn_like(y)
        (grad,) = torch.autograd.grad(y, x, g)
        xd = x.detach().requires_grad_()
        (expected,) = torch.autograd.grad(nonlinear.float_function(name, params)(xd), xd, g)
        assert torch.equal(grad, expected), name


def test_nan_stays_nan_and_out_of_range_inputs_take_the_end_entries():
    spec = as_format("8.4").spec()
    y = nonlinear.lookup(torch.tensor([float("nan"), 100.0, -100.0]), "tanh", (), spec, spec)
    assert torch.isnan(y[0]) and y[1:].tolist() == [1.0, -1.0]  # tanh(±7.9375) rounds to ±1


def test_a_stochastic_output_format_has_no_table():
    with pytest.raises(ValueError, match="deterministic output rounding"):
        nonlinear.table("tanh", (), tuple(as_format("8.4").spec()), tuple(as_format("8.4,stochastic").spec()))


def test_clip_bounds_are_the_float32_bounds_of_each_form():
    def bounds(fn, op):
        gm = torch.fx.symbolic_trace(fn)
        (node,) = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        return nonlinear.clip_bounds(gm, node, op)

    class Clamp(nn.Module):
        def forward(self, x):
            return x.clamp(min=0.3)

    class Tensor(nn.Module):
        def forward(self, x):
            return torch.clamp(x, x.mean())

    assert bounds(nn.Sequential(nn.ReLU6()), "relu6") == (0.0, 6.0)
    assert bounds(nn.Sequential(nn.Hardtanh(-2, 3)), "hardtanh") == (-2.0, 3.0)
    assert bounds(lambda x: F.hardtanh(x), "hardtanh") == (-1.0, 1.0)
    assert bounds(Clamp(), "clamp") == (float(torch.tensor(0.3, dtype=torch.float32)), None)
    assert bounds(lambda x: torch.clip(x, -1, float("inf")), "clamp") == (-1.0, None)
    gm = torch.fx.symbolic_trace(Tensor())
    (node,) = [n for n in gm.graph.nodes if n.target is torch.clamp]
    assert nonlinear.clip_bounds(gm, node, "clamp") is None
