"""Integer algorithms on int64 tensors of codes: the fixed-point definitions of softmax and
LayerNorm, and the integer square root they rest on.

Each function here is *the* definition of its op: the simulation's forward
(:mod:`fxcompile.core.ops`) and the integer reference executor
(:mod:`fxcompile.deploy.backends.integer`) both call it, and the ONNX emitters write the same
steps as integer ONNX ops, so the three agree bit for bit.  Every intermediate is an exact
int64 value; the widths are documented with each function::

    >>> isqrt(torch.tensor([0, 15, 16, 2**62]))
    tensor([         0,          3,          4, 2147483648])
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["isqrt", "bit_length", "ISQRT_STEPS", "round_divide", "SOFTMAX_BITS", "exp_table", "softmax_codes",
           "LAYER_NORM_BITS", "layer_norm_plan", "layer_norm_codes"]

# Newton steps of isqrt.  The start 2**ceil(b/2) (b = bit length of n) lies in [√n, 2√n], so the
# relative error ε of the real-valued iterate obeys ε' = ε²/(2(1+ε)) from ε <= 1: 1/4, 1/40,
# 3.1e-4, 4.6e-8, 1.1e-15 after five steps, which for n < 2**63 (√n < 2**31.5) puts the iterate
# below ⌊√n⌋ + 1 + ... < ⌊√n⌋ + 2, i.e. at most ⌊√n⌋ + 1; the integer step never goes below ⌊√n⌋
# (AM-GM) nor above the real one, and from ⌊√n⌋ + 1 one step reaches ⌊√n⌋: six in all.
ISQRT_STEPS = 6


def bit_length(n: torch.Tensor) -> torch.Tensor:
    """The bit length of each non-negative int64 ``n`` (0 for 0), by a six-step binary search."""
    b = torch.zeros_like(n)
    for step in (32, 16, 8, 4, 2, 1):
        b = torch.where((n >> (b + step - 1)) > 0, b + step, b)
    return b


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """``⌊√n⌋`` of each non-negative int64 ``n``, exactly: Newton's iteration
    ``k ← min(k, ⌊(k + ⌊n/k⌋)/2⌋)`` from ``k = 2**ceil(b/2)``, :data:`ISQRT_STEPS` times.
    Intermediates stay below ``2**33``.  Negative inputs raise ``ValueError``."""
    if not n.dtype == torch.int64:
        raise ValueError(f"isqrt: expected an int64 tensor, got {n.dtype}")
    if (n < 0).any():
        raise ValueError("isqrt: negative input")
    k = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    for _ in range(ISQRT_STEPS):
        k = torch.minimum(k, (k + n // k.clamp_min(1)) >> 1)
    return k


def round_divide(num: torch.Tensor, den: torch.Tensor, rounding: str, generator=None) -> torch.Tensor:
    """``num / den`` rounded to an integer, for ``num >= 0`` and ``den > 0`` (int64): ``nearest``
    is ties to even, ``floor`` and ``toward_zero`` the floor; ``stochastic`` (training only)
    rounds up with probability remainder / den."""
    q = num // den
    r = num - q * den
    if rounding == "nearest":
        # 2r > den, or 2r = den with q odd: (2r + (q & 1)) // (den + 1) is exactly that bump
        return q + (2 * r + (q & 1)) // (den + 1)
    if rounding == "stochastic":
        u = torch.rand(num.shape, dtype=torch.float64, generator=generator, device=num.device)
        return q + (u * den.double() < r.double()).to(q.dtype)
    return q


# Fractional bits of the exp table: entries are at most 2**30, so an entry times 2**frac_out
# (frac_out <= 32) stays inside int64, and the table's rounding (half a unit in 2**-30) adds at
# most n · 2**-31 to a probability of a row of n.
SOFTMAX_BITS = 30


@functools.lru_cache(maxsize=64)
def exp_table(frac: int, span: int) -> torch.Tensor:
    """``E[d] = round(2**30 · exp(-d · 2**-frac))`` for the code differences ``d = 0 … span``
    that give a non-zero entry, then one 0 (float64 ``exp``, rounded half to even)."""
    d = torch.arange(span + 1, dtype=torch.float64)
    table = torch.round(torch.exp(-d * 2.0 ** -frac) * 2.0 ** SOFTMAX_BITS).to(torch.int64)
    nonzero = int((table > 0).sum())
    return torch.cat([table[:nonzero], torch.zeros(1, dtype=torch.int64)]) if nonzero <= span else table


def softmax_codes(x: torch.Tensor, table: torch.Tensor, frac_out: int, rounding: str, generator=None) -> torch.Tensor:
    """The integer softmax over the last dim of int64 codes ``x``: output codes at ``frac_out``.

    ``d = max(x) − x`` per row (``0 … 2**bits − 1``); ``e = E[min(d, len(E) − 1)]`` from
    :func:`exp_table` (at most ``2**30``: the row maximum's entry is exactly ``2**30``);
    ``s = Σ e`` (at most ``n · 2**30``); the output is ``e · 2**frac_out / s`` rounded by
    :func:`round_divide` (numerator below ``2**62``).  Not saturated: the cast after it clips.
    """
    d = x.amax(dim=-1, keepdim=True) - x
    e = table[d.clamp_max(len(table) - 1)]
    s = e.sum(dim=-1, keepdim=True)
    return round_divide(e << frac_out, s.expand_as(e), rounding, generator)


# Fractional bits of the normalised value z = (x − μ)/σ before the affine map
LAYER_NORM_BITS = 16


def layer_norm_plan(n: int, bits: int, frac: int, eps: float, weight_frac: int = 0, bias_frac: int = 0) -> dict:
    """The internal widths of :func:`layer_norm_codes` for rows of ``n`` codes of at most
    ``bits`` magnitude bits at binary point ``frac``: ``p`` extra bits of the mean the variance
    is taken about, ``g`` extra bits of σ, ``k`` bits of z, ``q = k + g + p`` extra bits of the
    mean z is centred on, and ``e = max(1, round(eps · 4**(frac + p)))`` (``eps`` in the
    variance's units).  Chosen so that every intermediate stays below ``2**63``:
    ``Σ c² <= n · 4**(bits + 1 + p)``, ``V · 4**g <= 2**61``, ``Σx · 2**(q+1) < 2**62``,
    ``2 · x · 2**q < 2**62``.  Raises ``ValueError`` when no such widths exist."""
    p = min(8, (62 - n.bit_length() - 2 * (bits + 1)) // 2)
    g = (61 - 2 * (bits + 1 + max(p, 0))) // 2
    k = max(LAYER_NORM_BITS, bias_frac - weight_frac)
    q = k + g + p
    e = max(1, round(eps * 4.0 ** (frac + p)))
    if p < 0 or g < 0 or n.bit_length() + bits + q + 2 > 62 or e > 4 ** (bits + 1 + p):
        raise ValueError(f"layer norm: rows of {n} codes of {bits} bits (eps {eps}) leave no int64 width for "
                         "the mean and σ; give its input a narrower format")
    return {"n": n, "p": p, "g": g, "k": k, "e": e}


def _floor_divide(num: torch.Tensor, den) -> torch.Tensor:
    return torch.div(num, den, rounding_mode="floor")


def _mean(x: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The row mean of ``x`` with ``bits`` extra fractional bits, rounded half up."""
    return _floor_divide(x.sum(-1, keepdim=True) * (1 << (bits + 1)) + n, 2 * n)


def layer_norm_codes(x: torch.Tensor, plan: dict, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The integer LayerNorm over the last dim of int64 codes ``x``, with :func:`layer_norm_plan`
    ``plan``; ``weight`` codes (at ``w`` fractional bits) and ``bias`` codes already aligned to
    ``k + w``.  Returns the accumulator ``z · weight + bias`` at ``k + w`` fractional bits:

    * ``c = x · 2**p − m_p`` about the mean ``m_p`` with ``p`` extra bits (rounded half up:
      ``⌊(Σx · 2**(p+1) + n) / 2n⌋``), and ``V = ⌊Σc² / n⌋ + e``: the variance plus eps, in
      units of ``2**-2(frac+p)``,
    * ``R = isqrt(V · 4**g)``: σ at ``frac + p + g`` fractional bits (:func:`isqrt`),
    * ``z = ⌊(2 c' + R) / 2R⌋`` with ``c' = x · 2**q − m_q`` (the mean with ``q = k + g + p``
      extra bits): (x − μ)/σ at ``k`` bits, rounded half up,
    * the affine map, exact.  The cast after it rounds once more, to its format.
    """
    p, g, k, e, n = plan["p"], plan["g"], plan["k"], plan["e"], plan["n"]
    q = k + g + p
    c = x * (1 << p) - _mean(x, n, p)
    r = isqrt((((c * c).sum(-1, keepdim=True) // n) + e) << (2 * g))
    z = _floor_divide(2 * (x * (1 << q) - _mean(x, n, q)) + r, 2 * r)
    z = z if weight is None else z * weight
    return z if bias is None else z + bias
