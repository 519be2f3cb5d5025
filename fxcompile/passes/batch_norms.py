"""Pass: run batch norms as their fixed-point definition.

In the deployed graph a batch norm is a per-channel affine map ``y = x · s + t``, and in
eval mode its float form (a division by ``sqrt(σ² + ε)``) is not exact on any grid.  Folding
it into the conv/linear before it (``deploy.fold_bn``) rounds the folded weights again, so a
folded graph differs from the simulation; by default every batch norm therefore keeps its
own affine map, after a conv too (``fold=True`` keeps the old folding for the ones that fold).
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
from .casts import output_cast

__all__ = ["CONTRACT", "fixed_point_batch_norms", "folds"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

_FOLDABLE = (F.conv1d, F.conv2d, F.conv3d, F.linear,
             ops.fixed_point_conv1d, ops.fixed_point_conv2d, ops.fixed_point_conv3d, ops.fixed_point_linear)


def folds(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the batch norm ``node`` folds into the layer before it at export: that layer's
    output reaches it through one cast and feeds nothing else (``deploy.fold_bn``'s rule)."""
    x = node.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_module" and ir.EDGE.has(x) and len(x.users) == 1):
        return False
    layer = x.args[0]
    return isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in _FOLDABLE \
        and len(layer.users) == 1


def fixed_point_batch_norms(gm: fx.GraphModule, fold: bool = False) -> fx.GraphModule:
    """Rewrite the batch norms of ``gm`` (after ``insert_casts``) in place; returns ``gm``.

    By default every batch norm with a fixed-point output cast is rewritten, those right
    after a conv/linear too: the deployed graph then runs the conv, its cast, and this affine
    map, exactly what training's eval forward runs.  ``fold=True`` (``compile(...,
    fold_batch_norm=True)``) leaves the ones that fold to ``deploy.fold_bn``: one layer fewer
    at inference, but the folded weights are rounded again, so the deployed outputs can
    differ from the simulation's by a few codes."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ops.batch_norm or (fold and folds(gm, node)):
            continue
        module = ir.fetch(gm, node.args[1].target)
        cast = output_cast(gm, node)
        if cast is None or module.running_mean is None:
            continue
        node.target = ops.fixed_point_batch_norm
        node.args = (*node.args, cast.edge.forward.spec())
        changed = True
    if changed:
        gm.recompile()
    return gm
