"""The integer algorithms of the fixed-point definitions, against Python integers and float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxcompile.core import intmath

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64_MAX = 2 ** 63 - 1


def _check_isqrt(values):
    n = torch.tensor(values, dtype=torch.int64)
    assert intmath.isqrt(n).tolist() == [math.isqrt(v) for v in values]
    assert intmath.bit_length(n).tolist() == [v.bit_length() for v in values]


@SETTINGS
@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=64))
def test_isqrt_of_32_bit_inputs(values):
    _check_isqrt(values)


@SETTINGS
@given(st.lists(st.integers(0, INT64_MAX), min_size=1, max_size=64))
def test_isqrt_of_64_bit_inputs(values):
    _check_isqrt(values)


@SETTINGS
@given(st.lists(st.integers(0, math.isqrt(INT64_MAX)), min_size=1, max_size=64))
def test_isqrt_of_perfect_squares_and_their_neighbours(roots):
    _check_isqrt([v for k in roots for v in (k * k - 1, k * k, k * k + 1) if 0 <= v <= INT64_MAX])


def test_isqrt_worst_cases():
    # every bit length at its ends, where the power-of-two start is farthest from √n, and the
    # squares minus one on which Newton's iteration oscillates
    edges = [v for b in range(64) for v in (2 ** b - 1, 2 ** b, 2 ** b + 1) if v <= INT64_MAX]
    squares = [k * k - 1 for k in (2, 3, 2 ** 16 + 1, 2 ** 31 - 1, math.isqrt(INT64_MAX))]
    _check_isqrt(edges + squares + [INT64_MAX] + list(range(10000)))
    with pytest.raises(ValueError, match="negative"):
        intmath.isqrt(torch.tensor([-1]))
