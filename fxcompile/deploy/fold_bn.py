"""Pass: fold batch norm into the convolution or linear layer that feeds it.

In a compiled graph a batch norm is ``conv → cast → batch_norm(x, bn, cast(γ), cast(β)) → cast``.
With the running statistics (inference semantics), ``bn(conv(x))`` is a convolution with

    W' = W · s,   b' = (b − μ) · s + β,   s = γ / sqrt(σ² + ε)   (per output channel),

computed in float64 from the *quantized* W, b, γ, β.  W' and b' are then re-quantized to the
convolution's weight and bias formats (its forward edge formats; a layer without bias takes
the format of the batch norm's β edge, and rounds with ``nearest`` if that format is
stochastic) and stored as the layer's parameters; the layer's output goes straight into the
batch norm's output cast.  So the folded graph drops one rounding (the cast between the
layer and the batch norm) and re-rounds W' and b': it is what a fixed-point accelerator
runs, and close to, but not bit-identical with, the training-time simulation.

A batch norm folds only when the layer's output feeds nothing else; others stay in the
graph (and :func:`fxcompile.deploy.lower.lower` reports them).  The input graph is left
untouched::

    >>> folded = fold_bn(fxc.compile(ResidualCNN(), fxc.baseline(), example_inputs=(x,)))
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core import ir
from ..errors import ExportError
from ..passes.accumulators import FLOAT_LAYERS
from ..passes.casts import Cast, output_cast
from ..core.ops import batch_norm

__all__ = ["CONTRACT", "fold_bn", "FOLDABLE"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

FOLDABLE = (F.conv1d, F.conv2d, F.conv3d, F.linear, *FLOAT_LAYERS)  # and their exact definitions


def _is_cast(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target), Cast)


def _casted_parameter(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value a ``cast(get_attr)`` parameter edge carries (the parameter in its format)."""
    if node is None:
        return None
    if not (_is_cast(gm, node) and node.args[0].op == "get_attr"):
        raise ExportError(f"cannot fold batch norm: parameter {node.name!r} is not a cast of a stored parameter")
    with torch.no_grad():
        return gm.get_submodule(node.target)(ir.fetch(gm, node.args[0].target).detach()).double()


def _quantized_parameter(value: torch.Tensor, fmt, like: torch.Tensor) -> nn.Parameter:
    value = value if fmt is None else ir.stored_format(fmt).quantize(value)
    return nn.Parameter(value.to(like.dtype), requires_grad=like.requires_grad)


def _fold_one(gm: fx.GraphModule, bn: fx.Node) -> bool:
    x, bn_attr, gamma_node, beta_node = bn.args
    if not (_is_cast(gm, x) and len(x.users) == 1):
        return False
    layer = x.args[0]
    if not (isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in FOLDABLE
            and len(layer.users) == 1):
        return False
    module: nn.modules.batchnorm._BatchNorm = ir.fetch(gm, bn_attr.target)
    if module.running_mean is None:
        raise ExportError(f"cannot fold batch norm {bn.name!r}: it tracks no running statistics "
                          "(track_running_stats=False); deploy needs fixed statistics")
    w_cast, b_cast = layer.args[1], layer.args[2] if len(layer.args) > 2 else None
    weight, bias = _casted_parameter(gm, w_cast), _casted_parameter(gm, b_cast)
    gamma, beta = _casted_parameter(gm, gamma_node), _casted_parameter(gm, beta_node)
    mean, var = module.running_mean.double(), module.running_var.double()
    scale = (gamma if gamma is not None else torch.ones_like(mean)) / torch.sqrt(var + module.eps)
    shift = beta if beta is not None else torch.zeros_like(mean)
    new_bias = ((bias if bias is not None else 0.0) - mean) * scale + shift
    new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))

    w_param = ir.fetch(gm, w_cast.args[0].target)
    owner, _, name = w_cast.args[0].target.rpartition(".")
    setattr(gm.get_submodule(owner), name, _quantized_parameter(new_weight, ir.EDGE.of(w_cast).forward, w_param))
    bias_template = b_cast if b_cast is not None else beta_node
    if bias_template is None:
        raise ExportError(f"cannot fold batch norm {bn.name!r} into {layer.name!r}: neither has a bias, so no "
                          "bias format is known; give the layer a bias or the batch norm affine=True")
    bias_edge = ir.EDGE.of(bias_template)
    if b_cast is not None:
        b_target = b_cast.args[0].target
        setattr(gm.get_submodule(b_target.rpartition(".")[0]), b_target.rpartition(".")[2],
                _quantized_parameter(new_bias, bias_edge.forward, w_param))
    else:
        # the layer gets a new bias parameter and a cast carrying the batch norm's bias edge
        gm.get_submodule(owner).register_parameter("bias", _quantized_parameter(new_bias, bias_edge.forward, w_param))
        with gm.graph.inserting_before(layer):
            attr = gm.graph.get_attr(f"{owner}.bias" if owner else "bias")
            cast_name = f"{layer.name}_folded_bias"
            gm.casts.add_module(cast_name, Cast(bias_edge, clip_gradient=False))
            b_cast = gm.graph.call_module(f"casts.{cast_name}", (attr,))
            ir.EDGE.set(b_cast, bias_edge)
            ir.ROLE.set(b_cast, None)
        args = list(layer.args) + [None] * (3 - len(layer.args))
        args[2] = b_cast
        layer.args = tuple(args)

    bn.replace_all_uses_with(layer)
    for node in (bn, x, gamma_node, beta_node, bn_attr):
        if node is not None and not node.users:
            source = node.args[0] if node.op == "call_module" else None
            gm.graph.erase_node(node)
            if isinstance(source, fx.Node) and source.op == "get_attr" and not source.users:
                gm.graph.erase_node(source)
    _round_to_output(gm, layer)
    return True


def _round_to_output(gm: fx.GraphModule, layer: fx.Node) -> None:
    """A folded layer with an exact definition (``passes.accumulators``) now feeds the batch
    norm's output cast: it rounds to that cast's format (or, without one, is the float op)."""
    if layer.target not in FLOAT_LAYERS:
        return
    cast = output_cast(gm, layer)
    if cast is None:
        layer.target, layer.args = FLOAT_LAYERS[layer.target], layer.args[:-1]
    else:
        layer.args = (*layer.args[:-1], cast.edge.forward.spec())


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with every foldable batch norm folded (see the module docstring)."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is batch_norm:
            _fold_one(gm, node)
    gm.graph.lint()
    gm.recompile()
    return gm
