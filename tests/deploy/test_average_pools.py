"""Average pools whose divisor differs by position or is no power of two: ``avg_pool2d`` with
padding (``count_include_pad`` either way) and ``ceil_mode``, adaptive pools with uneven or
overlapping windows.  Every 8-bit input code goes through the simulation, the integer reference
and ONNX Runtime, which agree bit for bit with each other and with an oracle in Python integers."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.backends.qonnx import run_qonnx, to_qonnx
from fxcompile.deploy.export import integer_graph, onnx_session


class Pool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x)


class FunctionalPool(nn.Module):  # as inception_v3 writes it
    def forward(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


POOLS = {  # name: (model, input (C, H, W))
    "3x3_pad_include": (lambda: Pool(nn.AvgPool2d(3, 1, 1)), (2, 5, 5)),
    "3x3_pad_exclude": (lambda: Pool(nn.AvgPool2d(3, 1, 1, count_include_pad=False)), (2, 5, 5)),
    "functional": (FunctionalPool, (2, 4, 6)),
    "ceil_include": (lambda: Pool(nn.AvgPool2d(3, 2, 1, ceil_mode=True)), (2, 6, 6)),
    "ceil_exclude": (lambda: Pool(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)), (2, 5, 7)),
    "divisor_override": (lambda: Pool(nn.AvgPool2d(2, 1, 1, divisor_override=3)), (1, 4, 4)),
    "3x3_no_pad": (lambda: Pool(nn.AvgPool2d(3)), (2, 6, 6)),  # one divisor, 9: a scalar reciprocal
    "adaptive_1_to_6": (lambda: Pool(nn.AdaptiveAvgPool2d(6)), (2, 1, 1)),  # alexnet at small sizes
    "adaptive_uneven": (lambda: Pool(nn.AdaptiveAvgPool2d((3, 4))), (2, 7, 5)),
    "adaptive_13_to_6": (lambda: Pool(nn.AdaptiveAvgPool2d(6)), (1, 13, 13)),
    "adaptive_up": (lambda: Pool(nn.AdaptiveAvgPool2d((5, 3))), (2, 3, 2)),
}


def _every_code(shape, fmt, seed=0):
    """Inputs on ``fmt``'s grid in which every code appears: one constant input per code, then
    random ones."""
    codes = torch.arange(fmt.code_min, fmt.code_max + 1, dtype=torch.float64)
    constant = codes.reshape(-1, 1, 1, 1).expand(-1, *shape)
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randint(fmt.code_min, fmt.code_max + 1, (256, *shape), generator=g).double()
    return ((torch.cat([constant, mixed]) - fmt.zero_point) * fmt.scale).float()


def _windows(size, out):  # PyTorch's adaptive rule, written out again for the oracle
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _oracle(pool: nn.Module, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(window sums, divisors) of the codes, from PyTorch's own float64 pools."""
    codes = codes.double()
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        out = F.adaptive_avg_pool2d(codes[:1], pool.output_size).shape[-2:]
        rows, cols = _windows(codes.shape[-2], out[0]), _windows(codes.shape[-1], out[1])
        n = torch.tensor([[(re - rs) * (ce - cs) for cs, ce in cols] for rs, re in rows], dtype=torch.float64)
        return torch.round(F.adaptive_avg_pool2d(codes, pool.output_size) * n).long(), n.long()
    pool = pool if isinstance(pool, nn.AvgPool2d) else nn.AvgPool2d(3, 1, 1)
    sums = torch.round(F.avg_pool2d(codes, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, True, 1))
    ones = torch.ones_like(codes[:1])
    # PyTorch's divisor: (the valid elements of the window) / (its average of ones)
    valid = F.avg_pool2d(ones, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, True, 1)
    n = torch.round(valid / pool(ones))
    return sums.long(), n.long()[0, 0]


def _round(v: Fraction, fmt) -> int:
    k = {"nearest": round, "floor": lambda v: v.numerator // v.denominator, "toward_zero": int}[fmt.rounding](v)
    lo, hi = fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point
    return min(max(k, lo), hi) if fmt.overflow == "saturate" else (k - lo) % (hi - lo + 1) + lo


PARAMS = [(name, "8.4") for name in POOLS] + \
         [(name, fmt) for name in ("3x3_pad_exclude", "adaptive_uneven") for fmt in ("8.6,floor", "8.2,toward_zero",
                                                                                     "8.5,wrap", "u8.4")]


@pytest.mark.parametrize("name, activation", PARAMS)
def test_every_8_bit_code_through_simulation_integer_reference_and_ort(name, activation):
    make, shape = POOLS[name]
    fmt = as_format(activation)
    x = _every_code(shape, fmt)
    q = fxc.compile(make(), fxc.Policy(input=activation, activation=activation), example_inputs=(x[:2],)).eval()
    assert sum(n.target in (ops.fixed_point_average, ops.fixed_point_avg_pool2d) for n in q.graph.nodes) == 1
    graph = integer_graph(q, (x[:2],))
    with torch.no_grad():
        sim = q(x)
    (ref,), (ref_codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    out, codes = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    sim_codes = torch.round(sim.double() * 2.0 ** fmt.frac).long()
    assert torch.equal(sim_codes, ref_codes), f"{int((sim_codes != ref_codes).sum())} codes differ"
    assert np.array_equal(codes, ref_codes.numpy()) and np.array_equal(out, ref.numpy())
    # the definition from Python integers: each window's sum times its divisor's 16-bit reciprocal, rounded once
    model = make()
    sums, divisors = _oracle(getattr(model, "pool", model), torch.round(x.double() * 2 ** fmt.frac))
    assert sums.shape == ref_codes.shape
    recips = divisors.flatten().tolist()
    expected = []
    reciprocals = [ops.reciprocal(n) for n in recips]
    for i, s in enumerate(sums.flatten().tolist()):
        c, r = reciprocals[i % len(recips)]
        expected.append(_round(Fraction(s * c, 2 ** r), fmt))
    assert ref_codes.flatten().tolist() == expected


def test_divisors_follow_pytorch():
    assert ops.avg_pool_divisors((3, 3), (3, 3), (3, 3), (1, 1), (1, 1), False, None) == \
        [[4, 6, 4], [6, 9, 6], [4, 6, 4]]
    assert ops.avg_pool_divisors((3, 3), (3, 3), (3, 3), (1, 1), (1, 1), True, None) == [[9] * 3] * 3
    assert ops.adaptive_windows(13, 6) == _windows(13, 6) and ops.adaptive_windows(1, 6) == [(0, 1)] * 6


@pytest.mark.parametrize("name", ["3x3_pad_exclude", "adaptive_uneven"])
def test_backward_is_the_float_pool_derivative(name):
    make, shape = POOLS[name]
    pool = make().pool
    x = torch.randn(2, *shape, requires_grad=True)
    q = fxc.compile(make(), fxc.baseline(), example_inputs=(x[:2].detach(),))
    node = next(n for n in q.graph.nodes if n.target in (ops.fixed_point_average, ops.fixed_point_avg_pool2d))
    y = node.target(x, *node.args[1:])
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(pool(x2), x2, g)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-7)


def test_a_pool_whose_output_format_changed_after_compile_refuses_to_export():
    x = torch.randn(4, 2, 5, 5)
    q = fxc.compile(POOLS["3x3_pad_exclude"][0](), fxc.baseline(), example_inputs=(x[:2],))
    cast_module = q.casts.pool
    cast_module.set_edge(dataclasses.replace(cast_module.edge, forward=as_format("8.3")))
    with pytest.raises(fxc.ExportError, match=r"node 'pool' \(fixed_point_avg_pool2d\): an average over 4, 6, 9 "
                                              r"values"):
        integer_graph(q, (x[:2],))


@pytest.mark.parametrize("name", ["3x3_pad_exclude", "ceil_include", "adaptive_1_to_6", "adaptive_uneven"])
def test_qdq_and_qonnx_write_the_float_pool_close_to_the_integer_graph(name):
    make, shape = POOLS[name]
    torch.manual_seed(0)
    x = torch.randn(32, *shape) * 2
    q = fxc.compile(make(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    (ref,) = run_integer(integer_graph(q, (x[:2],)), x)
    (qdq,) = onnx_session(to_qdq(q, (x[:2],))).run(None, {"x": x.numpy()})[:1]
    (qonnx,) = run_qonnx(to_qonnx(q, (x[:2],)), x)
    for out in (qdq, qonnx):
        # float between the quantizers: the average's own rounding, at most a code or so from the integer graph
        assert out.shape == tuple(ref.shape) and np.abs(out - ref.numpy()).max() <= 2 * 2.0 ** -8
