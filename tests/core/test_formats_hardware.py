"""The default formats are two's complement over the full code range, as hardware is.

Oracles: QPyTorch's ``fixed_point_quantize`` (the ``qtorch`` package, a dev dependency) and
exact rounding in Python ints, both independent of fxcompile's quantizers.
"""
from fractions import Fraction

import pytest
import torch

from fxcompile import FixedPoint, fixed


def _inputs(bits: int, frac: int) -> torch.Tensor:
    """Every code, every tie, the floats either side of every tie, quarter steps, and beyond both bounds."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.arange(lo - 300, hi + 300, dtype=torch.float64)
    ties = ((codes + 0.5) * 2.0 ** -frac).float()
    return torch.cat([(codes * 2.0 ** -frac).float(), ties,
                      torch.nextafter(ties, torch.tensor(float("inf"))), torch.nextafter(ties, torch.tensor(float("-inf"))),
                      ((codes + 0.25) * 2.0 ** -frac).float(), ((codes + 0.75) * 2.0 ** -frac).float(),
                      torch.tensor([1e30, -1e30, 0.0, -0.0, lo * 2.0 ** -frac, hi * 2.0 ** -frac])])


def _exact(x: float, bits: int, frac: int, narrow: bool) -> float:
    """Round half to even in exact rationals, then saturate at the two's-complement bounds."""
    t = Fraction(x) * 2 ** frac
    q = round(t)  # Fraction.__round__ rounds half to even
    lo, hi = -(1 << (bits - 1)) + narrow, (1 << (bits - 1)) - 1
    return float(Fraction(min(max(q, lo), hi), 2 ** frac))


@pytest.mark.parametrize("narrow", [False, True])
def test_default_format_is_exact_twos_complement_rounding(narrow):
    fmt = fixed(16, 8, narrow=narrow)
    x = _inputs(16, 8)
    expected = torch.tensor([_exact(v, 16, 8, narrow) for v in x.tolist()])
    assert torch.equal(fmt.quantize(x), expected)
    assert fmt.quantize(x).min().item() == (-127.99609375 if narrow else -128.0)
    assert fmt.quantize(x).max().item() == 127.99609375


@pytest.mark.parametrize("bits, frac", [(16, 8), (8, 4), (12, 3), (16, 0)])
@pytest.mark.parametrize("narrow", [False, True])
def test_equals_qpytorch_fixed_point_quantize(bits, frac, narrow):
    """``fixed(16, 8)`` is QPyTorch's ``fixed_point_quantize(x, 16, 8, rounding="nearest")``
    (``"16.8,narrow"`` its ``symmetric=True``), bit for bit at every code, every tie and both bounds.

    QPyTorch rounds ``nearbyint((t + 0.5) - 0.5)`` in float32; where ``t + 0.5`` is inexact (only
    the floats just beside the ties next to zero) it can land on the other side of a tie.  Those
    inputs are the only ones allowed to differ, and there fxcompile gives the exact result.
    """
    qtorch = pytest.importorskip("qtorch.quant", reason="pip install -e '.[dev]' installs qtorch")
    x = _inputs(bits, frac)
    ours = fixed(bits, frac, narrow=narrow).quantize(x)
    theirs = qtorch.fixed_point_quantize(x, bits, frac, clamp=True, symmetric=narrow, rounding="nearest")
    t = x * 2.0 ** frac
    inexact = (t + 0.5) - 0.5 != t  # float32, as QPyTorch computes it
    differ = ours != theirs
    assert not (differ & ~inexact).any(), x[differ & ~inexact][:5]
    assert differ.sum() <= 4  # the near-ties around zero, nowhere else
    exact = torch.tensor([_exact(v, bits, frac, narrow) for v in x[differ].tolist()])
    assert torch.equal(ours[differ], exact)
    lo = -(1 << (bits - 1)) + narrow
    for bound in (lo * 2.0 ** -frac, ((1 << (bits - 1)) - 1) * 2.0 ** -frac):
        assert (ours == bound).sum() == (theirs == bound).sum() > 0


def test_narrow_reaches_minus_127_996():
    fmt = FixedPoint.parse("16.8,narrow")
    assert fmt.min_value == -127.99609375
    assert fmt.quantize(torch.tensor([-128.0, -1e9])).tolist() == [-127.99609375, -127.99609375]
    assert fixed(16, 8).quantize(torch.tensor([-128.0, -1e9])).tolist() == [-128.0, -128.0]
