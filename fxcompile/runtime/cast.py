"""The cast: one autograd-aware op that puts a value into fixed point, both ways.

Forward rounds ``x`` to the forward format; backward masks the incoming gradient where the
forward value saturated (the derivative of a clamp: a *clipped* straight-through estimator)
and rounds it to the backward format.  Both live here side by side.

Formats travel as int lists (:meth:`FixedPoint.spec`):
``[frac, code_min, code_max, zero_point, rounding, overflow]``; an empty list means "leave the
value in floating point".  The work is done by the fused operators of
:mod:`fxcompile.runtime.kernels` (``torch.ops.fxcompile.cast``, ``quantize``, ...), which graph capture,
``torch.compile`` and export see as single ops; :func:`quantize_reference` is the
pure-PyTorch oracle they are tested against::

    >>> y = cast(torch.tensor([0.3], requires_grad=True), fixed(16, 8), fixed(16, 10))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import kernels
from ..core.formats import OVERFLOWS, ROUNDINGS, FixedPoint

__all__ = ["cast", "quantize", "quantize_reference", "counter_uniform", "spec_of"]

NEAREST, STOCHASTIC, FLOOR, TOWARD_ZERO = range(len(ROUNDINGS))
SATURATE, WRAP = range(len(OVERFLOWS))


def spec_of(fmt: FixedPoint | None) -> list[int]:
    return [] if fmt is None else fmt.spec()


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


def quantize(x: torch.Tensor, spec: Sequence[int], seed: int | None = None) -> torch.Tensor:
    """Round ``x`` to a format given as a spec list (no autograd); ``[]`` is the identity.

    Runs the fused kernel (:mod:`fxcompile.runtime.kernels`); stochastic rounding uses ``seed``, or a
    seed drawn from the default generator.
    """
    if not spec:
        return x
    if kernels.backend() is None:
        kernels.load()
    return torch.ops.fxcompile.quantize.default(x, list(spec), seed)


def _inside(y: torch.Tensor, spec: Sequence[int]) -> torch.Tensor:
    """Where the forward value did not saturate: strictly inside the format's range."""
    frac, qmin, qmax, zp = spec[:4]
    scale = 2.0 ** -frac
    return (y > (qmin - zp) * scale) & (y < (qmax - zp) * scale)


def cast(x, forward: FixedPoint | Sequence[int] | None, backward: FixedPoint | Sequence[int] | None = None,
         clip_gradient: bool = True, parameter: bool = False):
    """Cast ``x`` to ``forward`` and its gradient to ``backward``.

    ``clip_gradient`` zeroes the gradient where the forward value saturated (the derivative
    of a clamp); casts of stored parameters turn it off, since their forward is the identity.
    Values that are not floating-point tensors (sizes, ints, tuples) pass through untouched,
    so a cast can sit on any edge of a traced graph.  The work is one call of the operator
    ``torch.ops.fxcompile.cast`` (forward and backward are fused kernels, the autograd node
    lives in C++ and saves only a one-bit-per-element saturation mask).  ``parameter`` marks
    a stored parameter, returned as is (a view) when it already holds values of ``forward``.
    """
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return x
    fwd = forward if type(forward) is list else _spec(forward)
    bwd = backward if type(backward) is list else _spec(backward)
    if not fwd and not bwd:
        return x
    if kernels.backend() is None:
        kernels.load()
    return torch.ops.fxcompile.cast.default(x, fwd, bwd, bool(clip_gradient), bool(parameter))



def _spec(fmt: FixedPoint | Sequence[int] | None) -> list[int]:
    if fmt is None:
        return []
    return fmt.spec() if isinstance(fmt, FixedPoint) else list(fmt)
