"""Pass: turn casts whose forward provably changes nothing into forward identities.

A cast right after a *format-preserving* op — ReLU, a clip whose bounds lie on the grid
(ReLU6, Hardtanh, clamp), a max-pool whose windows do not overlap, flatten/view/reshape —
whose only input is a cast with the same forward and backward formats receives values that
are already in its forward format (the op only selects, reorders, zeroes or clamps values
of that format, to values of that format), and its saturation clip is implied
by the input cast's (the op maps a bound only to itself).  Such a cast keeps its backward
rounding, so the gradient on its edge is still fixed point, but its forward becomes the
identity: no rounded copy, no saturation mask saved.  Gradients are unchanged bit for bit
under deterministic rounding (stochastic rounding draws differently, with the same law)::

    >>> qmodel = elide_identity_casts(fxc.compile(model, policy))
    >>> [n.target for n in elided_casts(qmodel)]
    ['casts.relu1', 'casts.pool1', ...]

Elided casts are marked ``node.meta["fxc_elided"] = True`` and their :class:`Cast` has
``forward_identity`` set; the graph and its assignment are otherwise untouched.

The mirror image holds for gradients.  When a cast's only consumer is a format-preserving
op whose only consumer is a cast with the same backward format, the gradient reaching the
first cast is the second cast's rounded, saturated gradient routed through the op's
backward (ReLU zeroes, a non-overlapping pool scatters, flatten reshapes): it is already
on the grid and in range, so rounding it again changes nothing.  That cast's backward
becomes the identity (``backward_identity``, ``node.meta["fxc_backward_elided"]``); a
saturation clip it applies in backward is kept.  A cast with both identities costs one
Python call.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..core import ir, nonlinear, ops
from .casts import Cast

__all__ = ["CONTRACT", "elide_identity_casts", "elided_casts", "backward_elided_casts", "format_preserving"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))  # marks ir.ELIDED / ir.BACKWARD_ELIDED where it elides

_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _non_overlapping_pool(pool: nn.Module, n: int) -> bool:
    # Overlapping windows sum gradients in backward; the sum of two rounded gradients is not
    # the rounded sum, so only pools that route each gradient to one input qualify.
    kernel, stride = _tuple(pool.kernel_size, n), _tuple(pool.stride or pool.kernel_size, n)
    return (all(s >= k for k, s in zip(kernel, stride)) and all(d == 1 for d in _tuple(pool.dilation, n))
            and not pool.return_indices)


def _within(bounds, fmt) -> bool:
    """Whether a clamp to ``bounds`` keeps the values of ``fmt`` values of ``fmt``: each bound a
    value of it, or beyond its range on the bound's own side (a clamp that changes nothing)."""
    lo, hi = bounds
    on_grid = lambda b: bool(fmt.representable(torch.tensor([b], dtype=torch.float64))[0])  # noqa: E731
    return (lo is None or lo <= fmt.min_value or on_grid(lo)) and (hi is None or hi >= fmt.max_value or on_grid(hi))


def format_preserving(gm: fx.GraphModule, node: fx.Node, fmt=None) -> bool:
    """Does ``node`` map values of any fixed-point format to values of that format, bounds to bounds?

    A clip (relu6, hardtanh, clamp) does so for its input format ``fmt`` only when its bounds
    are values of ``fmt`` (a clamp to 0.3 yields 0.3, off a 2**-8 grid); without ``fmt`` the
    question is whether it routes gradients, which a clip with constant bounds does."""
    op = ops.op_of(gm, node)
    if op is None or op.group not in ("format_preserving", "shape"):
        return False
    if op.name in ops.CLIP_OPS:
        bounds = nonlinear.clip_bounds(gm, node, op.name)
        return bounds is not None and (fmt is None or _within(bounds, fmt))
    if op.name in _POOLS:  # the module form says whether the windows overlap
        return node.op == "call_module" and _non_overlapping_pool(gm.get_submodule(node.target), _POOLS[op.name])
    return True


def _cast_module(gm: fx.GraphModule, node) -> Cast | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and ir.EDGE.has(node):
        mod = gm.get_submodule(node.target)
        return mod if isinstance(mod, Cast) else None
    return None


def _elide(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        cast = _cast_module(gm, node)
        if cast is None or cast.forward_identity or cast.edge.forward is None or not node.args:
            continue
        op = node.args[0]
        if not isinstance(op, fx.Node) or len(op.users) != 1 or not op.args:
            continue
        source = _cast_module(gm, op.args[0])
        if not format_preserving(gm, op, cast.edge.forward):
            continue
        extra_tensors = [a for a in list(op.args[1:]) + list(op.kwargs.values()) if isinstance(a, fx.Node)
                         and ir.EDGE.has(a)]
        if source is None or extra_tensors:
            continue
        if (source.edge.forward, source.edge.backward) != (cast.edge.forward, cast.edge.backward):
            continue
        # an elided source still clips, through its own source (transitively)
        source_clips = source.clip_gradient or ir.ELIDED.get(op.args[0], False)
        if cast.clip_gradient and not source_clips:
            continue  # the source would not clip what this cast clips
        cast.forward_identity = True
        cast.clip_gradient = False  # implied by the source's clip, see the module docstring
        cast.set_edge(cast.edge)
        ir.ELIDED.set(node, True)
        count += 1
    return count


def _elide_backward(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        cast = _cast_module(gm, node)
        if cast is None or cast.backward_identity or cast.edge.backward is None or len(node.users) != 1:
            continue
        (op,) = node.users
        if not format_preserving(gm, op) or not op.args or op.args[0] is not node or len(op.users) != 1:
            continue
        if any(isinstance(a, fx.Node) for a in list(op.args[1:]) + list(op.kwargs.values())):
            continue
        (consumer,) = op.users
        downstream = _cast_module(gm, consumer)
        # the consumer's gradient leaves it rounded and saturated to this format (or, if its own
        # backward is an identity, arrives that way: the property is inherited along the chain)
        if downstream is None or consumer.args[0] is not op or downstream.edge.backward != cast.edge.backward:
            continue
        cast.backward_identity = True
        cast.set_edge(cast.edge)
        ir.BACKWARD_ELIDED.set(node, True)
        count += 1
    return count


def elide_identity_casts(gm: fx.GraphModule) -> fx.GraphModule:
    """Apply to ``gm`` and, if present, its compiled loss graph ``gm.loss``; returns ``gm``."""
    for g in (gm, getattr(gm, "loss", None)):
        if isinstance(g, fx.GraphModule):
            _elide(g)
            _elide_backward(g)
    return gm


def elided_casts(gm: fx.GraphModule) -> list[fx.Node]:
    """Casts whose forward is the identity."""
    return [n for n in gm.graph.nodes if ir.ELIDED.get(n)]


def backward_elided_casts(gm: fx.GraphModule) -> list[fx.Node]:
    """Casts whose backward rounding is the identity."""
    return [n for n in gm.graph.nodes if ir.BACKWARD_ELIDED.get(n)]
