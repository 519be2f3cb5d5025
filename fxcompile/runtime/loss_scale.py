"""Loss scaling: the gradient of the loss multiplied by ``2**s`` on the way in, divided on the way out.

Fixed-point gradients have a floor: with the baseline's 16.10, a gradient below 2**-11 rounds
to 0 (or, rounded stochastically, to ±2**-10 or 0 at random, mostly noise).  Backpropagation
is linear in the loss's gradient, so multiplying that gradient by a power of two moves every
gradient up by the same number of binary places, onto more of the format's codes, as
mixed-precision training does with float16.  :func:`scale_gradient` does the multiplication
(its forward is the identity); :func:`unscale_gradients` divides the parameters' gradients
before the optimizer reads them.  Both are exact in float for a power of two, so without
rounding the optimizer sees exactly the gradients of the unscaled loss::

    >>> loss = scale_gradient(loss, 16.0)       # forward: the same loss value
    >>> loss.backward()                         # gradients are 16x the unscaled ones
    >>> unscale_gradients(optimizer, 16.0)      # now they are the unscaled ones again
"""

from __future__ import annotations

import torch

__all__ = ["scale_gradient", "unscale_gradients"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def scale_gradient(x, scale: float):
    """``x`` unchanged in the forward; its gradient multiplied by ``scale`` in the backward."""
    if scale == 1 or not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return x
    return _ScaleGradient.apply(x, float(scale))


@torch.no_grad()
def unscale_gradients(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Divide the gradient of every parameter ``optimizer`` updates by ``scale`` (in place)."""
    if scale == 1:
        return
    inverse = 1.0 / scale
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(inverse)

