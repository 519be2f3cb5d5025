"""Pass: make every parameter an explicit ``get_attr`` edge of the graph.

fx keeps ``nn.Linear``, ``nn.Conv2d`` … as opaque ``call_module`` nodes, which hides their
weights and biases.  This pass rewrites each leaf module that owns parameters into a
function call whose parameters are ``get_attr`` nodes, so the weight and bias become edges
that get formats and casts like any other value.  Rewrites are a table from module type to
rule; modules not in the table go through :func:`call_with_parameters`.  The original
module path and class are kept in ``node.meta["fxc_module"]`` and ``node.meta["fxc_op"]``::

    >>> gm = expose_params(trace(torch.nn.Linear(4, 2)))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'get_attr', 'get_attr', 'call_function', 'output']
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core import ir
from ..core.ops import batch_norm, call_with_parameters

__all__ = ["CONTRACT", "expose_params"]

# writes ir.MODULE (and ir.OP) on the nodes it rewrites; a model without parameters has none
CONTRACT = ir.Contract()


def _conv(fn):
    def rule(graph, target, mod, x, p):
        return graph.call_function(fn, (x, p["weight"], p.get("bias"), mod.stride, mod.padding, mod.dilation, mod.groups))
    return rule


_RULES = {
    nn.Linear: lambda graph, target, mod, x, p: graph.call_function(F.linear, (x, p["weight"], p.get("bias"))),
    nn.Conv1d: _conv(F.conv1d),
    nn.Conv2d: _conv(F.conv2d),
    nn.Conv3d: _conv(F.conv3d),
    nn.LayerNorm: lambda graph, target, mod, x, p: graph.call_function(
        F.layer_norm, (x, mod.normalized_shape, p.get("weight"), p.get("bias"), mod.eps)),
}


def _rule_for(mod: nn.Module):
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode != "zeros":
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return lambda graph, target, m, x, p: graph.call_function(
            batch_norm, (x, graph.get_attr(target), p.get("weight"), p.get("bias")))
    return _RULES.get(type(mod))


def expose_params(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite parameter-owning ``call_module`` nodes; returns ``gm`` (modified in place).

    A module called several times gets one ``get_attr`` node per parameter, used by every
    call, so a shared weight is one value with fan-out and its summed gradient is quantized.
    """
    exposed: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        params = dict(mod.named_parameters(recurse=False))
        if not params:
            continue
        with gm.graph.inserting_before(node):
            for name in params:
                target = f"{node.target}.{name}"
                if target not in exposed:
                    exposed[target] = gm.graph.get_attr(target)
                    ir.MODULE.set(exposed[target], node.target)
            p_nodes = {name: exposed[f"{node.target}.{name}"] for name in params}
            rule = _rule_for(mod)
            simple = rule is not None and len(node.args) == 1 and not node.kwargs
            if simple:
                new = rule(gm.graph, node.target, mod, node.args[0], p_nodes)
            else:
                new = gm.graph.call_function(
                    call_with_parameters,
                    (gm.graph.get_attr(node.target), tuple(p_nodes), tuple(p_nodes.values()), *node.args),
                    dict(node.kwargs))
        new.meta.update(node.meta)
        ir.MODULE.set(new, node.target)
        ir.OP.set(new, type(mod).__name__)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        new.name = node.name
    gm.graph.lint()
    gm.recompile()
    return gm
