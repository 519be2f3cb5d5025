"""The cast: one autograd-aware op that puts a value into fixed point, both ways.

Forward rounds ``x`` to the forward format; backward masks the incoming gradient where the
forward value saturated (the derivative of a clamp: a *clipped* straight-through estimator)
and rounds it to the backward format.  Both live here side by side.

Formats travel as int lists (:meth:`FixedPoint.spec`):
``[frac, code_min, code_max, zero_point, rounding, overflow]``; an empty list means "leave the
value in floating point".  The work is done by the fused operators of
:mod:`fxcompile.runtime.kernels` (``torch.ops.fxcompile.cast``, ``quantize``, ...), which graph capture,
``torch.compile`` and export see as single ops; :func:`~fxcompile.core.quantizer.quantize_reference`
is the pure-PyTorch oracle they are tested against::

    >>> y = cast(torch.tensor([0.3], requires_grad=True), fixed(16, 8), fixed(16, 10))
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import kernels
from ..core.formats import FixedPoint
from ..core.quantizer import counter_uniform, quantize_reference  # noqa: F401 - re-exported

__all__ = ["cast", "quantize", "quantize_reference", "counter_uniform", "spec_of", "spec_bounds", "keep_inward"]


def spec_of(fmt: FixedPoint | None) -> list[int]:
    return [] if fmt is None else fmt.spec()


def spec_bounds(spec: Sequence[int]) -> tuple[float, float]:
    """The smallest and largest value of the format given as a spec list."""
    frac, code_min, code_max, zero_point = spec[:4]
    return (code_min - zero_point) * 2.0 ** -frac, (code_max - zero_point) * 2.0 ** -frac


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


class _KeepInward(torch.autograd.Function):
    """Forward: the identity.  Backward: zero the gradient only where the value sits at a bound
    of its format and a descent step (``-grad``) would push it further out."""

    @staticmethod
    def forward(ctx, y, lo: float, hi: float):
        ctx.save_for_backward(y)
        ctx.lo, ctx.hi = lo, hi
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        outward = ((y >= ctx.hi) & (grad < 0)) | ((y <= ctx.lo) & (grad > 0)) | torch.isnan(y)
        return grad.masked_fill(outward, 0), None, None


def keep_inward(y: torch.Tensor, spec: Sequence[int]) -> torch.Tensor:
    """``y`` (already in the format ``spec``) whose gradient is masked only where it points out.

    The clipped cast zeroes every gradient at a saturated value (the derivative of a clamp).
    Placed after a cast made with ``clip_gradient=False``, this keeps the part that moves a
    saturated value back into range, and zeroes (as the clamp does) only what would push it
    further out (and a NaN's)::

        y = keep_inward(cast(x, fmt, grad_fmt, clip_gradient=False), fmt.spec())

    At the loss's input this matters: a wrong class whose logit sits at the format's ceiling
    is pushed down instead of staying there, tied by argmax with the true class.
    """
    if not (isinstance(y, torch.Tensor) and y.is_floating_point()) or not spec:
        return y
    return _KeepInward.apply(y, *spec_bounds(spec))


def _spec(fmt: FixedPoint | Sequence[int] | None) -> list[int]:
    if fmt is None:
        return []
    return fmt.spec() if isinstance(fmt, FixedPoint) else list(fmt)
