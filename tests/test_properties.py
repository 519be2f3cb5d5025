"""Property-based tests of the cast over random formats and tensors (hypothesis).

Oracles: exact rational arithmetic (``fractions.Fraction``) for nearest rounding, and the
definitions themselves (idempotence, order, range, representable values, neighbours).
"""

from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxcompile as fxc
from fxcompile.runtime.cast import quantize

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def formats(draw, roundings=("nearest", "floor", "toward_zero", "stochastic"), overflows=("saturate", "wrap")):
    signed = draw(st.booleans())
    bits = draw(st.integers(2 if signed else 1, 32))
    overflow = draw(st.sampled_from(overflows))
    narrow = signed and overflow == "saturate" and draw(st.booleans())
    fmt = fxc.FixedPoint(bits, draw(st.integers(-6, 30)), signed=signed, narrow=narrow,
                         rounding=draw(st.sampled_from(roundings)), overflow=overflow)
    if draw(st.booleans()):
        fmt = fmt.replace(zero_point=draw(st.integers(*fmt._full_range())))
    return fmt


def tensors(fmt, size=st.integers(1, 40)):
    # values around the format's range: inside, beyond, and below its resolution
    span = max(abs(fmt.min_value), abs(fmt.max_value), fmt.scale)
    floats = st.one_of(st.floats(-2 * span, 2 * span, allow_nan=False, allow_infinity=False),
                       st.floats(-4 * fmt.scale, 4 * fmt.scale, allow_nan=False, allow_infinity=False),
                       st.sampled_from([0.0, -0.0, fmt.min_value, fmt.max_value]))
    return size.flatmap(lambda n: st.lists(floats, min_size=n, max_size=n)).map(
        lambda v: torch.tensor(v, dtype=torch.float64))


@st.composite
def format_and_tensor(draw, **kw):
    fmt = draw(formats(**kw))
    return fmt, draw(tensors(fmt))


@SETTINGS
@given(format_and_tensor())
def test_idempotent(ft):
    fmt, x = ft
    y = fmt.quantize(x)
    assert torch.equal(fmt.quantize(y), y)


@SETTINGS
@given(format_and_tensor(overflows=("saturate",)))
def test_within_range_and_on_grid(ft):
    fmt, x = ft
    y = fmt.quantize(x)
    assert (y >= fmt.min_value).all() and (y <= fmt.max_value).all()
    assert fmt.representable(y).all()


@SETTINGS
@given(format_and_tensor(roundings=("nearest", "floor", "toward_zero"), overflows=("saturate",)))
def test_monotonic(ft):
    fmt, x = ft
    xs = torch.sort(x).values
    y = fmt.quantize(xs)
    assert (y[1:] >= y[:-1]).all()


@SETTINGS
@given(formats(), st.lists(st.integers(0, 2 ** 32), min_size=1, max_size=40))
def test_exact_on_representable_values(fmt, picks):
    codes = [fmt.code_min + p % (fmt.code_max - fmt.code_min + 1) for p in picks]
    x = torch.tensor([(c - fmt.zero_point) * fmt.scale for c in codes], dtype=torch.float64)
    assert torch.equal(fmt.quantize(x), x)
    if fmt.bits <= 24:
        assert torch.equal(fmt.quantize(x.float()), x.float())


@SETTINGS
@given(format_and_tensor(roundings=("nearest",), overflows=("saturate",)))
def test_nearest_equals_exact_rational_rounding(ft):
    fmt, x = ft
    y = fmt.quantize(x)
    for xi, yi in zip(x.tolist(), y.tolist()):
        code = round(Fraction(xi) / Fraction(2) ** -fmt.frac) + fmt.zero_point  # round() is ties-to-even
        code = min(max(code, fmt.code_min), fmt.code_max)
        assert Fraction(yi) == (code - fmt.zero_point) * Fraction(2) ** -fmt.frac


@SETTINGS
@given(format_and_tensor(roundings=("stochastic",), overflows=("saturate",)))
def test_stochastic_lands_on_a_neighbour(ft):
    fmt, x = ft
    lo = torch.floor(x / fmt.scale) * fmt.scale
    hi = torch.ceil(x / fmt.scale) * fmt.scale
    for _ in range(4):
        y = fmt.quantize(x)
        clamped = lambda t: t.clamp(fmt.min_value, fmt.max_value)  # noqa: E731
        assert ((y == clamped(lo)) | (y == clamped(hi))).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 24), st.integers(0, 16), st.floats(0.0, 1.0, exclude_max=True), st.booleans())
def test_stochastic_is_unbiased(bits, frac, fraction, negative):
    fmt = fxc.fixed(max(bits, 8), frac, rounding="stochastic")
    value = (3 + fraction) * fmt.scale * (-1 if negative else 1)
    assume(abs(value) < fmt.max_value)
    n = 20_000
    y = quantize(torch.full((n,), value, dtype=torch.float64), fmt.spec())
    # each draw is value ± less than one step, with variance p(1-p) steps**2: allow 6 sigma
    p = abs(value / fmt.scale) % 1
    sigma = (p * (1 - p) / n) ** 0.5 * fmt.scale
    assert abs(y.mean().item() - value) <= 6 * sigma + 1e-12 * fmt.scale


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "floor", "toward_zero"])
@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_nonfinite_become_nan_never_a_number(rounding, overflow):
    fmt = fxc.fixed(8, 4, rounding=rounding, overflow=overflow)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    y = fmt.quantize(x)
    assert torch.isnan(y[:3]).all() and y[3] == 1.0
