"""Pass: run stand-alone batch norms as their fixed-point definition.

A batch norm right after a conv/linear (whose output feeds nothing else) is folded into that
layer at export (``deploy.fold_bn``).  Any other one — after a concatenation as in DenseNet,
first in a block — stays a per-channel affine map ``y = x · s + t`` in the deployed graph,
and in eval mode its float form (a division by ``sqrt(σ² + ε)``) is not exact on any grid.
Its fixed-point definition (:func:`fxcompile.core.ops.batch_norm_affine`): ``s`` rounded to
16 significant bits at one binary point for the tensor, ``t`` rounded to the binary point of
the output's format, ``x · s + t`` computed exactly and rounded once by the output cast's
format.  This pass rewrites each such ``batch_norm`` node whose output has a fixed-point cast
of its own into :func:`fxcompile.core.ops.fixed_point_batch_norm`, given that format, so the
simulation's eval forward runs that definition; in training mode it keeps batch statistics.
``lower`` runs the same definition as the integer op ``affine``::

    >>> gm = fixed_point_batch_norms(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    [..., 'fixed_point_batch_norm', ...]
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from ..core import ir, ops
from .averages import _output_cast

__all__ = ["CONTRACT", "fixed_point_batch_norms", "folds"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

_FOLDABLE = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def folds(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the batch norm ``node`` folds into the layer before it at export: that layer's
    output reaches it through one cast and feeds nothing else (``deploy.fold_bn``'s rule)."""
    x = node.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_module" and ir.EDGE.has(x) and len(x.users) == 1):
        return False
    layer = x.args[0]
    return isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in _FOLDABLE \
        and len(layer.users) == 1


def fixed_point_batch_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the stand-alone batch norms of ``gm`` (after ``insert_casts``) in place; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ops.batch_norm or folds(gm, node):
            continue
        module = ir.fetch(gm, node.args[1].target)
        cast = _output_cast(gm, node)
        if cast is None or module.running_mean is None:
            continue
        node.target = ops.fixed_point_batch_norm
        node.args = (*node.args, cast.edge.forward.spec())
        changed = True
    if changed:
        gm.recompile()
    return gm
