"""The cast against exact arithmetic (Python ints and Fractions) and PyTorch float autograd."""
import math
from fractions import Fraction

import pytest
import torch

from fxcompile import FixedPoint, fixed
from fxcompile.runtime.cast import cast, quantize, quantize_reference

ROUNDINGS = ["nearest", "floor", "toward_zero"]


def code_range(fmt):
    """From the definition: full two's complement / unsigned range, narrow when symmetric saturating."""
    lo, hi = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.signed else (0, 2 ** fmt.bits - 1)
    if fmt.narrow:
        lo += 1
    return lo, hi


def oracle(x: float, fmt) -> float:
    """The format's value for ``x``, exactly, in Fractions; NaN for NaN and ±Inf."""
    if math.isnan(x) or math.isinf(x):
        return math.nan
    t = Fraction(x) * Fraction(2) ** fmt.frac
    if fmt.rounding == "nearest":
        code = round(t)  # Fraction.__round__ rounds half to even
    elif fmt.rounding == "floor":
        code = math.floor(t)
    else:
        code = math.trunc(t)
    code += fmt.zero_point
    lo, hi = code_range(fmt)
    if fmt.overflow == "saturate":
        code = min(max(code, lo), hi)
    else:
        code = (code - lo) % (hi - lo + 1) + lo
    value = (code - fmt.zero_point) * Fraction(2) ** -fmt.frac
    return float(value)  # exact: at most 33 significant bits


def probe_values(fmt, wide=True):
    """Exact ties (positive and negative), quarter steps, the saturation edges and beyond."""
    step = Fraction(2) ** -fmt.frac
    lo, hi = code_range(fmt)
    zp = fmt.zero_point
    codes = [Fraction(k, 4) for k in range(-40, 41)]  # ..., -2.5, -2.25, ..., 2.5, ... codes around zero
    for edge in (lo - zp, hi - zp):
        codes += [edge + Fraction(k, 4) for k in range(-12, 13)]
    if wide:
        span = hi - lo + 1
        codes += [s * (span * m + Fraction(k, 2)) for s in (1, -1) for m in (1, 2, 3) for k in (0, 1, 3, 7)]
        # far beyond the range, where a float32 holds few low bits of the code
        codes += [s * (2 ** e + k) for s in (1, -1) for e in (23, 24, 25, 31, 40, 60) for k in (1, 3, 2 ** 20 + 5)]
    return [float(c * step) for c in codes]


FORMATS = [
    fixed(16, 8), fixed(8, 4), fixed(8, 0), fixed(2, 0), fixed(4, 1, signed=False),
    fixed(8, 8, signed=False), fixed(8, -2), fixed(6, -5, signed=False), fixed(8, 12), fixed(4, 10),
    fixed(8, 3, zero_point=-37), fixed(8, 2, signed=False, zero_point=100),
    fixed(16, 10, zero_point=1234), fixed(24, 12), fixed(28, 10), fixed(32, 16),
    fixed(32, 40, signed=False, zero_point=5),
]


@pytest.mark.parametrize("base", FORMATS, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantize_equals_exact_arithmetic(base, rounding, overflow, dtype):
    fmt = base.replace(rounding=rounding, overflow=overflow)
    x = torch.tensor(probe_values(fmt), dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(fmt.bits * 100 + fmt.frac)
    span = (fmt.code_max - fmt.code_min) * fmt.scale
    x = torch.cat([x, ((torch.rand(600, generator=g, dtype=torch.float64) - 0.5) * 3 * span).to(dtype)])
    expected = torch.tensor([oracle(v, fmt) for v in x.tolist()], dtype=torch.float64).to(dtype)
    for impl in (quantize, quantize_reference):  # the fused kernel and the pure-PyTorch reference
        y = impl(x, fmt.spec())
        assert y.dtype == dtype and y.shape == x.shape
        mismatch = (y != expected).nonzero().flatten()[:5].tolist()
        assert not mismatch, (impl.__name__, [(x[i].item(), y[i].item(), expected[i].item()) for i in mismatch])
    assert torch.equal(fmt.quantize(x), quantize(x, fmt.spec()))


def test_ties_go_to_even_both_signs():
    fmt = fixed(8, 0)
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    assert quantize(x, fmt.spec()).tolist() == [0, 2, 2, 4, -0, -2, -2, -4]
    assert quantize(x, fmt.replace(rounding="floor").spec()).tolist() == [0, 1, 2, 3, -1, -2, -3, -4]
    assert quantize(x, fmt.replace(rounding="toward_zero").spec()).tolist() == [0, 1, 2, 3, 0, -1, -2, -3]


def test_saturation_and_wrap_by_hand():
    sat, narrow, wrap = fixed(8, 0), fixed(8, 0, narrow=True), fixed(8, 0, overflow="wrap")
    x = torch.tensor([127.0, 128.0, 129.0, -127.0, -128.0, -129.0, 300.0])
    assert quantize(x, sat.spec()).tolist() == [127, 127, 127, -127, -128, -128, 127]
    assert quantize(x, narrow.spec()).tolist() == [127, 127, 127, -127, -127, -127, 127]
    assert quantize(x, wrap.spec()).tolist() == [127, -128, -127, -127, -128, 127, 44]
    assert quantize(torch.tensor([256.0, 257.0, -1.0]), fixed(8, 0, signed=False, overflow="wrap").spec()).tolist() == [0, 1, 255]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [fixed(16, 8), fixed(8, 4), fixed(8, 2, signed=False, zero_point=9),
                                 fixed(8, 4, overflow="wrap", rounding="floor")], ids=str)
def test_half_precision_inputs(dtype, fmt):
    x = torch.tensor(probe_values(fmt, wide=False), dtype=torch.float64).to(dtype)
    x = torch.cat([x, (torch.randn(500, generator=torch.Generator().manual_seed(0)) * 40).to(dtype)])
    expected = torch.tensor([oracle(v, fmt) for v in x.tolist()], dtype=torch.float64).to(dtype)
    for impl in (quantize, quantize_reference):
        y = impl(x, fmt.spec())
        assert y.dtype == dtype
        assert torch.equal(y, expected)


@pytest.mark.parametrize("fmt", [fixed(16, 8), fixed(8, 0, overflow="wrap"), fixed(8, 4, rounding="stochastic"),
                                 fixed(32, 16), fixed(8, 2, signed=False, zero_point=3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nan_stays_nan_and_inf_becomes_nan(fmt, dtype):
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0, -1.0], dtype=dtype)
    for impl in (quantize, quantize_reference):
        y = impl(x, fmt.spec())
        assert torch.isnan(y[:3]).all()
        assert torch.isfinite(y[3:]).all()


def test_empty_spec_is_identity_and_output_is_a_new_tensor():
    x = torch.randn(10)
    assert quantize(x, []) is x
    y = quantize(x, fixed(16, 8).spec())
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(torch.ops.fxcompile.quantize(x, fixed(16, 8).spec()), y)


# ---- stochastic rounding -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.3, -0.3, 1.7, -2.05, 0.125, 3.0, -1.0])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(value):
    fmt = fixed(8, 2, rounding="stochastic")
    n = 200_000
    torch.manual_seed(1)
    y = quantize(torch.full((n,), value, dtype=torch.float64), fmt.spec())
    t = Fraction(value) * 4
    lo, hi = math.floor(t) / 4, math.ceil(t) / 4
    assert set(y.unique().tolist()) <= {lo, hi}
    p = float(t - math.floor(t))
    se = 0.25 * math.sqrt(p * (1 - p) / n)
    if p == 0:
        assert (y == value).all()
    else:
        assert abs(y.mean().item() - value) < 5 * se
        assert len(y.unique()) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stochastic_rounding_unbiased_in_low_precision(dtype):
    fmt = fixed(8, 4, rounding="stochastic")
    x = torch.full((100_000,), -1.4, dtype=dtype)
    torch.manual_seed(3)
    y = quantize(x, fmt.spec()).double()
    xv = x[0].double().item()
    p = (xv * 16) - math.floor(xv * 16)
    assert set(y.unique().tolist()) <= {math.floor(xv * 16) / 16, math.ceil(xv * 16) / 16}
    assert abs(y.mean().item() - xv) < 5 * math.sqrt(p * (1 - p) / len(x)) / 16


def test_stochastic_rounding_saturates_and_is_reproducible():
    fmt = fixed(8, 2, rounding="stochastic")
    x = torch.randn(1000) * 40
    torch.manual_seed(7)
    a = quantize(x, fmt.spec())
    torch.manual_seed(7)
    b = quantize(x, fmt.spec())
    torch.manual_seed(8)
    c = quantize(x, fmt.spec())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.max() <= fmt.max_value and a.min() >= fmt.min_value
    assert fmt.representable(a).all()
    assert ((a - x).abs() < 0.25).logical_or(x.abs() > fmt.max_value).all()
    gen = torch.Generator().manual_seed(5)
    d = quantize_reference(x, fmt.spec(), generator=gen)
    assert torch.equal(d, quantize_reference(x, fmt.spec(), generator=torch.Generator().manual_seed(5)))


# ---- backward ------------------------------------------------------------------------------------

def _grad(x, fwd, bwd, g, clip=True):
    x = x.clone().requires_grad_()
    y = cast(x, fwd, bwd, clip)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("bwd", [fixed(16, 10), fixed(8, 3, rounding="floor"), fixed(6, 2, overflow="wrap"),
                                 fixed(8, 4, signed=False, zero_point=100)], ids=str)
def test_gradient_is_rounded_to_the_backward_format(bwd):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=gen, dtype=torch.float64)  # well inside 16.8: nothing saturates
    g = torch.tensor(probe_values(bwd), dtype=torch.float64)
    g = torch.cat([g, torch.randn(3000 - len(g), generator=gen, dtype=torch.float64) * 10])
    y, grad = _grad(x, fixed(16, 8), bwd, g)
    assert y.tolist() == [oracle(v, fixed(16, 8)) for v in x.tolist()]
    assert grad.tolist() == [oracle(v, bwd) for v in g.tolist()]


@pytest.mark.parametrize("fwd", [fixed(8, 4), fixed(8, 2, signed=False), fixed(8, 3, zero_point=50),
                                 fixed(16, 8, rounding="floor")], ids=str)
def test_gradient_is_zero_where_saturated_like_float_clamp(fwd):
    # Away from the half step around each bound the forward value saturates exactly where a
    # float clamp to [min_value, max_value] is inactive: compare with PyTorch autograd of clamp.
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.linspace(fwd.min_value - 4, fwd.max_value + 4, 4001, dtype=torch.float64),
                   torch.randn(1000, generator=gen, dtype=torch.float64) * fwd.max_value])
    near = ((x - fwd.min_value).abs() <= fwd.scale) | ((x - fwd.max_value).abs() <= fwd.scale)
    x = x[~near]
    g = torch.randn(len(x), generator=gen, dtype=torch.float64)
    bwd = fixed(16, 10)
    _, grad = _grad(x, fwd, bwd, g)
    xf = x.clone().requires_grad_()
    torch.clamp(xf, fwd.min_value, fwd.max_value).backward(g)
    expected = torch.tensor([oracle(v, bwd) for v in xf.grad.tolist()], dtype=torch.float64)
    assert torch.equal(grad, expected)
    assert (grad == 0).any() and (grad != 0).any()


def test_value_rounded_onto_the_bound_counts_as_saturated():
    # The contract: the backward sees only the output; a value at the saturation bound has
    # a zero gradient whether it came from x > max or from rounding onto max.
    fwd = fixed(8, 0)
    x = torch.tensor([126.4, 126.6, 127.0, 500.0, -127.6, -128.0, -500.0], dtype=torch.float64)
    _, grad = _grad(x, fwd, None, torch.ones(7, dtype=torch.float64))
    assert grad.tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_clip_gradient_false_and_wrap_pass_everywhere():
    x = torch.tensor([-500.0, -3.0, 0.0, 2.0, 500.0])
    g = torch.tensor([0.3, -0.3, 0.7, 1.1, -2.2])
    bwd = fixed(8, 2)
    _, grad = _grad(x, fixed(8, 0), bwd, g, clip=False)
    assert grad.tolist() == [oracle(v, bwd) for v in g.tolist()]
    _, grad = _grad(x, fixed(8, 0, overflow="wrap"), bwd, g, clip=True)
    assert grad.tolist() == [oracle(v, bwd) for v in g.tolist()]


def test_float_backward_format_leaves_gradient_unrounded():
    x = torch.tensor([0.1, 0.2, 1000.0])
    g = torch.tensor([0.123456, -7.654321, 1.0])
    _, grad = _grad(x, fixed(16, 8), None, g)
    assert torch.equal(grad, torch.tensor([0.123456, -7.654321, 0.0]))
    y, grad = _grad(x, None, fixed(8, 4), g)
    assert torch.equal(y, x) and torch.equal(grad, torch.tensor([0.125, -7.625, 1.0]))


def test_non_float_and_no_grad_inputs_pass_through():
    fwd, bwd = fixed(8, 2), fixed(8, 2)
    assert cast(3, fwd, bwd) == 3
    assert cast((1, 2), fwd, bwd) == (1, 2)
    i = torch.arange(5)
    assert cast(i, fwd, bwd) is i
    x = torch.tensor([0.3, 0.9])
    assert cast(x, None, None) is x
    y = cast(x, fwd, bwd)
    assert y.grad_fn is None and y.tolist() == [0.25, 1.0]
    xr = x.clone().requires_grad_()
    with torch.no_grad():
        z = cast(xr, fwd, bwd)
    assert z.grad_fn is None and z.tolist() == [0.25, 1.0]


def test_cast_keeps_the_input_unchanged():
    x = torch.tensor([0.3, 0.9], requires_grad=True)
    before = x.detach().clone()
    y = cast(x, fixed(8, 2), fixed(8, 2))
    y.sum().backward()
    assert torch.equal(x.detach(), before)


def _compiled_matches_eager(backend):
    fwd, bwd = fixed(16, 8), fixed(16, 10)

    def fn(x, w):
        h = cast(x * w, fwd, bwd)
        return cast((h * h).sum(), fixed(16, 4), fixed(16, 10))

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(257, generator=gen) * 20
    w = torch.randn(257, generator=gen)
    results = []
    for f in (fn, compiled):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(xi, wi)
        out.backward()
        results.append((out.detach(), xi.grad, wi.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert (results[0][1] == 0).any()  # some values saturated
    assert fixed(16, 10).representable(results[1][1]).all()


def test_torch_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_equals_eager():
    torch._dynamo.reset()
    _compiled_matches_eager("inductor")
