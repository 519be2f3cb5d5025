"""Averages by divisors that are not powers of two: the simulation, the integer reference and
ONNX Runtime run one fixed-point definition, so they agree bit for bit."""

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
from fxcompile.passes import averages
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.runtime.cast import cast


class AdaptivePool(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(size)

    def forward(self, x):
        return self.pool(x)


class FunctionalPool(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.size)


class Mean(nn.Module):
    def __init__(self, dims, keepdim):
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        return x.mean(self.dims, keepdim=self.keepdim)


class TorchMean(nn.Module):
    def forward(self, x):
        return torch.mean(x, dim=(-2, -1))


def test_reciprocal_is_one_over_n_rounded_to_16_significant_bits():
    for n in range(1, 5000):
        c, r = ops.reciprocal(n)
        if n & (n - 1) == 0:
            assert (c, Fraction(1, 2 ** r)) == (1, Fraction(1, n))
            continue
        assert 2 ** 15 < c < 2 ** 16
        assert abs(Fraction(c, 2 ** r) - Fraction(1, n)) < Fraction(1, 2 ** (r + 1))  # nearest, never a tie


def _every_code(shape, fmt, seed=0):
    """Inputs on ``fmt``'s grid in which every code appears: one constant window per code (the
    extremes of each sum), then random windows (the residues of the sums)."""
    lo, hi = fmt.code_min, fmt.code_max
    codes = torch.arange(lo, hi + 1, dtype=torch.float64)
    constant = codes.reshape(-1, 1, 1, 1).expand(-1, shape[0], *shape[1:])
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randint(lo, hi + 1, (512, *shape), generator=g).double()
    return (torch.cat([constant, mixed]) * fmt.scale).float()


CASES = [  # model, input (C, H, W), window, divisor
    (lambda: AdaptivePool(1), (2, 7, 7), (7, 7), 49),
    (lambda: FunctionalPool((1, 1)), (2, 3, 3), (3, 3), 9),
    (lambda: AdaptivePool(2), (2, 6, 6), (3, 3), 9),
    (lambda: AdaptivePool((2, 2)), (1, 14, 14), (7, 7), 49),
    (lambda: Mean((2, 3), False), (3, 7, 7), (7, 7), 49),
    (lambda: Mean((-2, -1), True), (3, 5, 5), (5, 5), 25),
    (lambda: TorchMean(), (2, 3, 5), (3, 5), 15),
    (lambda: AdaptivePool(1), (2, 8, 8), (8, 8), 64),  # a power of two: the moved binary point, as before
]


# every case in one format; every rounding and overflow on the averages by 49 and by 15
PARAMS = [(case, "8.4") for case in range(len(CASES))] + \
         [(case, fmt) for case in (0, 6) for fmt in ("8.6,floor", "8.2,toward_zero", "8.5,wrap", "u8.4")]


@pytest.mark.parametrize("case, activation", PARAMS)
def test_every_8_bit_code_through_simulation_integer_reference_and_ort(case, activation):
    make, shape, kernel, divisor = CASES[case]
    fmt = out_fmt = as_format(activation)  # the input in the same format: the pool reads every code as is
    policy = fxc.Policy(input=activation, activation=activation)
    x = _every_code(shape, fmt)
    q = fxc.compile(make(), policy, example_inputs=(x[:2],)).eval()
    assert sum(n.target is ops.fixed_point_average for n in q.graph.nodes) == 1
    graph = integer_graph(q, (x[:2],))
    assert ("scale" in [op.op for op in graph.ops]) == bool(divisor & (divisor - 1))
    with torch.no_grad():
        sim = q(x)
    (ref,), (ref_codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    out, codes = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    sim_codes = torch.round(sim.double() * 2.0 ** out_fmt.frac).long()
    assert torch.equal(sim_codes, ref_codes), f"{(sim_codes != ref_codes).sum()} codes differ"
    assert np.array_equal(codes, ref_codes.numpy())
    assert np.array_equal(out, ref.numpy()) and torch.equal(sim, ref)
    # the definition itself, from Python integers: round(sum · c · 2**-r) in the output format
    c, r = ops.reciprocal(divisor)
    sums = F.avg_pool2d(torch.round(x.double() * 2 ** fmt.frac), kernel, kernel, divisor_override=1).long()
    shift = fmt.frac + r - out_fmt.frac
    exact = [Fraction(int(s) * c, 2 ** shift) for s in sums.flatten()[:2000]]
    expected = [_round(v, out_fmt) for v in exact]
    assert ref_codes.flatten()[:2000].tolist() == expected


def _round(v: Fraction, fmt) -> int:
    """``v`` rounded and fitted to ``fmt`` in Python integers (the oracle)."""
    if fmt.rounding == "nearest":
        k = round(v)  # ties to even
    elif fmt.rounding == "floor":
        k = v.numerator // v.denominator
    else:
        k = int(v)  # toward zero
    lo, hi = fmt.code_min - fmt.zero_point, fmt.code_max - fmt.zero_point
    if fmt.overflow == "saturate":
        return min(max(k, lo), hi)
    return (k - lo) % (hi - lo + 1) + lo


def test_backward_is_the_float_average_derivative():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = ops.fixed_point_average(x, 2, False, as_format("16.8").spec())
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.adaptive_avg_pool2d(x2, 2), x2, g)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-7)


def test_uneven_windows_run_their_fixed_point_definition_and_export():
    # every code through every backend: tests/deploy/test_average_pools.py
    x = torch.randn(4, 2, 7, 7)
    q = fxc.compile(AdaptivePool(2), fxc.baseline(), example_inputs=(x[:2],)).eval()
    with torch.no_grad():
        sim = q(x)
    graph = integer_graph(q, (x[:2],))
    assert "adaptive_sum_pool2d" in [op.op for op in graph.ops]
    assert torch.equal(sim, run_integer(graph, x)[0])


def test_an_average_whose_output_format_changed_after_compile_refuses_to_export():
    x = torch.randn(4, 2, 3, 3)
    q = fxc.compile(Mean((2, 3), False), fxc.baseline(), example_inputs=(x[:2],))
    cast_module = q.casts.mean
    cast_module.set_edge(dataclasses.replace(cast_module.edge, forward=as_format("8.3")))
    with pytest.raises(fxc.ExportError, match=r"node 'mean' \(fixed_point_average\): an average over 9 values"):
        integer_graph(q, (x[:2],))


def test_means_over_other_dims_are_left_alone():
    gm = torch.fx.symbolic_trace(Mean((1, 2), False))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert averages.average_arguments(gm, node) is None
    gm = torch.fx.symbolic_trace(Mean((2, 3), True))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert averages.average_arguments(gm, node) == ((1, 1), False)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_trained_cnn_with_global_average_pool_deploys_with_zero_differing_codes(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    q = fxc.compile(SmallCNN(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.1), q)
    before = [p.detach().clone() for p in q.parameters()]
    for _ in range(2):
        opt.zero_grad()
        q.loss(q(x), y).backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, q.parameters()))  # it trained
    q.eval()
    test = torch.randn(256, 1, 28, 28) * 2
    with torch.no_grad():
        sim = q(test)
    graph = integer_graph(q, (test[:2],))
    (ref,) = run_integer(graph, test)
    out, _ = onnx_session(to_onnx(graph)).run(None, {"x": test.numpy()})
    assert int((sim != ref).sum()) == 0 and int((torch.from_numpy(out) != ref).sum()) == 0
    (qdq,) = onnx_session(to_qdq(q, (test[:2],))).run(None, {"x": test.numpy()})[:1]
    assert qdq.shape == out.shape and (qdq.argmax(1) == out.argmax(1)).mean() > 0.9


class MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_qdq_writes_a_squeezing_mean_as_a_float_average():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 7, 7)
    q = fxc.compile(MeanHead(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    model = to_qdq(q, (x[:2],))
    assert "AveragePool" in [n.op_type for n in model.graph.node]
    (out,) = onnx_session(model).run(None, {"x": x.numpy()})[:1]
    with torch.no_grad():
        sim = q(x).numpy()
    # float between the quantizers: close to the fixed-point average, not bound to equal it
    assert out.shape == sim.shape and np.abs(out - sim).max() < 0.05
