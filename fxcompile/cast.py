"""The cast: one autograd-aware op that puts a value into fixed point, both ways.

Forward rounds ``x`` to the forward format; backward masks the incoming gradient where the
forward value saturated (the derivative of a clamp: a *clipped* straight-through estimator)
and rounds it to the backward format.  Both live here side by side.

Formats travel as int lists (:meth:`FixedPoint.spec`):
``[frac, code_min, code_max, zero_point, rounding, overflow]``; an empty list means "leave the
value in floating point".  The cast is a ``torch.autograd.Function`` built from ATen ops,
so ``torch.compile`` traces and fuses it; the rounding alone is also registered as the op
``torch.ops.fxcompile.quantize`` for graph capture and export::

    >>> y = cast(torch.tensor([0.3], requires_grad=True), fixed(16, 8), fixed(16, 10))
"""

from __future__ import annotations

from typing import Sequence

import torch

from .formats import OVERFLOWS, ROUNDINGS, FixedPoint

__all__ = ["cast", "quantize", "quantize_reference", "spec_of"]

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


def quantize_reference(x: torch.Tensor, spec: Sequence[int], generator: torch.Generator | None = None,
                       ) -> torch.Tensor:
    """Round ``x`` to the format ``spec``; same dtype as ``x``.

    Pure PyTorch, one output buffer and in-place steps after it (large temporaries cost
    page faults on CPU).  The oracle any fused kernel is checked against.
    NaN stays NaN; ±Inf becomes NaN (a register cannot hold it and it must stay visible).
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
        u = torch.rand(t.shape, dtype=t.dtype, device=t.device, generator=generator)
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


def quantize(x: torch.Tensor, spec: Sequence[int]) -> torch.Tensor:
    """Round ``x`` to a format given as a spec list (no autograd); ``[]`` is the identity."""
    return quantize_reference(x, spec) if spec else x


def _inside(y: torch.Tensor, spec: Sequence[int]) -> torch.Tensor:
    """Where the forward value did not saturate: strictly inside the format's range."""
    frac, qmin, qmax, zp = spec[:4]
    scale = 2.0 ** -frac
    return (y > (qmin - zp) * scale) & (y < (qmax - zp) * scale)


torch.library.define("fxcompile::quantize", "(Tensor x, int[] spec) -> Tensor")


@torch.library.impl("fxcompile::quantize", "CompositeExplicitAutograd")
def _quantize_op(x, spec):
    return quantize(x, spec) if spec else x.clone()


@torch.library.register_fake("fxcompile::quantize")
def _(x, spec):
    return torch.empty_like(x)


class _Cast(torch.autograd.Function):
    """Forward: round to ``fwd``.  Backward: zero where saturated (if ``clip``), round to ``bwd``."""

    @staticmethod
    def forward(x, fwd, bwd, clip):
        return quantize(x, fwd) if fwd else x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, fwd, bwd, clip = inputs
        ctx.fwd, ctx.bwd = fwd, bwd
        ctx.clip = bool(clip and fwd and fwd[5] == SATURATE)
        if ctx.clip:
            ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip:
            (y,) = ctx.saved_tensors
            grad = torch.where(_inside(y, ctx.fwd), grad, 0.0)
        if ctx.bwd:
            grad = quantize(grad, ctx.bwd)
        return grad, None, None, None


def cast(x, forward: FixedPoint | Sequence[int] | None, backward: FixedPoint | Sequence[int] | None = None,
         clip_gradient: bool = True):
    """Cast ``x`` to ``forward`` and its gradient to ``backward``.

    ``clip_gradient`` zeroes the gradient where the forward value saturated (the derivative
    of a clamp); casts of stored parameters turn it off, since their forward is the identity.
    Values that are not floating-point tensors (sizes, ints, tuples) pass through untouched,
    so a cast can sit on any edge of a traced graph.
    """
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return x
    fwd = list(forward.spec() if isinstance(forward, FixedPoint) else (forward or []))
    bwd = list(backward.spec() if isinstance(backward, FixedPoint) else (backward or []))
    if not fwd and not bwd:
        return x
    if not x.requires_grad or not torch.is_grad_enabled():
        return quantize(x, fwd)
    return _Cast.apply(x, fwd, bwd, clip_gradient)
