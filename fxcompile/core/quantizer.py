"""The spec layout and the reference quantizer: what a fixed-point format does to a tensor.

A format travels to the kernels as an int list, its *spec*
(:meth:`fxcompile.core.formats.FixedPoint.spec`)::

    [frac, code_min, code_max, zero_point, rounding, overflow]

with ``rounding`` an index into :data:`ROUNDINGS` and ``overflow`` one into :data:`OVERFLOWS`
(the C++ kernel's ``enum Rounding`` and ``enum Overflow`` use the same numbers; a test
checks they agree).  :func:`quantize_reference` is the pure-PyTorch oracle every fused kernel
is checked against, and :func:`counter_uniform` the stochastic-rounding draws they share::

    >>> quantize_reference(torch.tensor([0.3]), [4, -127, 127, 0, 0, 0])
    tensor([0.3125])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ROUNDINGS", "OVERFLOWS", "SPEC_FIELDS", "NEAREST", "STOCHASTIC", "FLOOR", "TOWARD_ZERO", "SATURATE",
           "WRAP", "quantize_reference", "counter_uniform", "draw_seed", "inside"]

ROUNDINGS = ("nearest", "stochastic", "floor", "toward_zero")
OVERFLOWS = ("saturate", "wrap")
SPEC_FIELDS = ("frac", "code_min", "code_max", "zero_point", "rounding", "overflow")
NEAREST, STOCHASTIC, FLOOR, TOWARD_ZERO = range(len(ROUNDINGS))
SATURATE, WRAP = range(len(OVERFLOWS))


def _work_dtype(x: torch.Tensor, spec: Sequence[int]) -> torch.dtype:
    # float32 holds every integer exactly up to 2**24; wrapping adds offsets up to twice the
    # code range to a code, so wrapping formats wider than 22 bits work in float64.
    if x.dtype == torch.float64 or spec[2] - spec[1] >= 1 << (22 if spec[5] == WRAP else 24):
        return torch.float64
    return torch.float32


def counter_uniform(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The stochastic-rounding draws of the fused kernel: ``u[i] = hash(seed, i)`` in [0, 1).

    ``i`` is the row-major element index; the hash is two rounds of the 32-bit ``lowbias32``
    mixer, ``h = mix(mix(lo32(i) ^ lo32(seed)) + (hi32(i) ^ hi32(seed)))`` (mod 2**32).
    float32 takes the top 24 bits of ``h``, float64 all 32, so every ``u`` is exact::

        >>> u = counter_uniform((2, 3), seed=7)   # the same numbers on every call
    """
    mask = 0xFFFFFFFF
    seed &= (1 << 64) - 1

    def mix(v):  # int64 products wrap; the low 32 bits are the uint32 product
        v = v ^ (v >> 16)
        v = (v * 0x7FEB352D) & mask
        v = v ^ (v >> 15)
        v = (v * 0x846CA68B) & mask
        return v ^ (v >> 16)

    i = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    h = mix((mix((i & mask) ^ (seed & mask)) + ((i >> 32) ^ (seed >> 32))) & mask)
    u = (h >> 8).to(torch.float32) * 2.0 ** -24 if dtype != torch.float64 else h.to(torch.float64) * 2.0 ** -32
    return u.to(dtype).view(tuple(shape))


def quantize_reference(x: torch.Tensor, spec: Sequence[int], generator: torch.Generator | None = None,
                       *, seed: int | None = None) -> torch.Tensor:
    """Round ``x`` to the format ``spec``; same dtype as ``x``.

    Pure PyTorch, one output buffer and in-place steps after it (large temporaries cost
    page faults on CPU).  The oracle any fused kernel is checked against.
    NaN stays NaN; ±Inf becomes NaN (a register cannot hold it and it must stay visible).
    Stochastic rounding draws from ``generator`` (the global RNG by default), or, given
    ``seed``, from :func:`counter_uniform` exactly as the fused kernel does.
    """
    frac, qmin, qmax, zp, rounding, overflow = spec
    t = torch.mul(x.to(_work_dtype(x, spec)), 2.0 ** frac)
    if rounding == NEAREST:
        t.round_()  # ties to even
    elif rounding == FLOOR:
        t.floor_()
    elif rounding == TOWARD_ZERO:
        t.trunc_()
    else:  # stochastic: floor plus a Bernoulli(remainder) step; exact and unbiased
        if seed is None:
            u = torch.rand(t.shape, dtype=t.dtype, device=t.device, generator=generator)
        else:
            u = counter_uniform(t.shape, seed, t.dtype, t.device)
        floor = torch.floor(t)
        t = floor.add_(u.lt_(t.sub_(floor)))
    if overflow == WRAP:
        t.remainder_(qmax - qmin + 1)  # exact for any float; keeps the integer steps below exact
    if zp:
        t.add_(zp)
    if overflow == SATURATE:
        t.clamp_(qmin, qmax)
    else:
        t.sub_(qmin).remainder_(qmax - qmin + 1).add_(qmin)
    if zp:
        t.sub_(zp)
    t.mul_(2.0 ** -frac).add_(x, alpha=0.0)  # 0 * ±Inf = NaN: non-finite stays non-finite
    return t.to(x.dtype)


def inside(y: torch.Tensor, spec: Sequence[int]) -> torch.Tensor:
    """Where the forward value did not saturate: strictly inside the format's range."""
    frac, qmin, qmax, zp = spec[:4]
    scale = 2.0 ** -frac
    return (y > (qmin - zp) * scale) & (y < (qmax - zp) * scale)


def draw_seed() -> int:
    """A stochastic-rounding seed from the default generator (the C++ kernel draws the same)."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
