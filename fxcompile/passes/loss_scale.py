"""Pass: multiply the gradient entering the loss's backward by a power of two (loss scaling).

A fixed-point gradient format has a floor (16.10: 2**-10), and the gradients of a model
trained with a mean loss over a batch sit near it: in a small ViT under ``baseline``, casts
flushed 56 % of the logits' gradients and 29 % of the LayerNorm outputs' gradients to zero
(``benchmarks/vit_gradients.py``).  Scaling the loss's gradient by ``2**s`` moves every
gradient up ``s`` binary places onto more of the format's codes, the formats unchanged;
:func:`fxcompile.runtime.optim.fixed_point_optimizer` divides the parameters' gradients by
the same factor before each step (:mod:`fxcompile.runtime.loss_scale`), so in exact arithmetic
training is unchanged, and with rounding a gradient format ``b.f`` acts as ``b.(f+s)`` over a
range ``2**s`` times smaller.

The rewrite puts :func:`~fxcompile.runtime.loss_scale.scale_gradient` after the loss graph's
output cast, so the scaled gradient ``2**s`` is what the loss edge's backward format holds;
a scale that does not fit that format (more than 16 for 16.10) is refused.  ``scale=1`` (the
default) changes nothing but records the scale::

    >>> loss_gm = scale_loss_gradient(qmodel, 16, loss_graph=insert_casts(...))
    >>> ir.LOSS_SCALE.of(qmodel)
    16.0
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..core import ir
from ..errors import PolicyError
from ..runtime.loss_scale import scale_gradient

__all__ = ["CONTRACT", "scale_loss_gradient", "check_loss_scale"]

CONTRACT = ir.Contract(requires=(ir.EDGE,), graph_provides=(ir.LOSS_SCALE,))


def check_loss_scale(scale) -> float:
    """``scale`` as a float if it is a power of two >= 1, else :class:`PolicyError`.

    Only a power of two shifts the gradients along the same grid and makes unscaling exact."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1 \
            or math.frexp(scale)[0] != 0.5:
        raise PolicyError(f"loss_scale must be a power of two >= 1 (1, 2, 4, ..., 2**s), got {scale!r}")
    return float(scale)


def _loss_casts(gm: fx.GraphModule) -> list:
    return [ir.EDGE.of(n) for n in gm.graph.nodes if ir.EDGE.has(n) and ir.EDGE.of(n).role == "loss"]


def scale_loss_gradient(gm: fx.GraphModule, scale: float = 1, loss_graph: fx.GraphModule | None = None
                        ) -> fx.GraphModule:
    """Scale the loss's gradient by ``scale`` (a power of two); returns ``gm``.

    ``loss_graph``, the compiled loss ``(prediction, target) -> loss``, gets the rewrite; without
    it the loss is an output of ``gm`` (``loss_fn="loss"``) and the caller scales it
    (``compile``'s ``NamedLoss``).  The scale is recorded on ``gm`` (and the loss graph), where
    ``fixed_point_optimizer`` reads it."""
    scale = check_loss_scale(scale)
    holder = loss_graph if loss_graph is not None else gm
    if scale != 1:
        for edge in _loss_casts(holder):
            if edge.backward is not None and scale > edge.backward.max_value:
                largest = 2 ** math.floor(math.log2(edge.backward.max_value))
                raise PolicyError(f"loss_scale {scale:g} does not fit the backward format {edge.backward} of the loss "
                                  f"edge {edge.name!r} (largest value {edge.backward.max_value:g}): the scaled gradient "
                                  f"of the loss would saturate; use loss_scale <= {largest:g} or a loss format with "
                                  "fewer fractional bits")
    if loss_graph is not None and scale != 1:
        output = next(n for n in loss_graph.graph.nodes if n.op == "output")
        loss = output.args[0]
        if not isinstance(loss, fx.Node):
            raise PolicyError(f"loss_scale: the loss graph returns {type(loss).__name__}, not one loss value to scale")
        with loss_graph.graph.inserting_before(output):
            scaled = loss_graph.graph.call_function(scale_gradient, (loss, scale))
        output.replace_input_with(loss, scaled)
        loss_graph.recompile()
    for g in (gm, loss_graph):
        if g is not None:
            ir.LOSS_SCALE.set(g, scale)
    return gm
