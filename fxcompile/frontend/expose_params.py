"""Pass: make every parameter an explicit ``get_attr`` edge of the graph.

fx keeps ``nn.Linear``, ``nn.Conv2d`` … as opaque ``call_module`` nodes, which hides their
weights and biases.  This pass rewrites each leaf module that owns parameters into a
function call whose parameters are ``get_attr`` nodes, so the weight and bias become edges
that get formats and casts like any other value.  Rewrites are a table from module type to
rule; modules not in the table go through :func:`call_with_parameters`.  The original
module path and class are kept in ``node.meta["fxc_module"]`` and ``node.meta["fxc_op"]``.
A batch norm called as a function with a module's running statistics (timm's
``BatchNormAct2d`` calls ``F.batch_norm`` with its buffers; ``torch.export`` graphs hold
``aten.batch_norm``) becomes the same call as ``nn.BatchNorm2d``'s (:func:`batch_norm_calls`)::

    >>> gm = expose_params(trace(torch.nn.Linear(4, 2)))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'get_attr', 'get_attr', 'call_function', 'output']
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core import ir
from ..core.ops import batch_norm, call_with_parameters

__all__ = ["CONTRACT", "expose_params", "batch_norm_calls"]

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
    nn.Embedding: lambda graph, target, mod, x, p: graph.call_function(
        F.embedding, (x, p["weight"], mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq,
                      mod.sparse)),
}


def _rule_for(mod: nn.Module):
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode != "zeros":
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return lambda graph, target, m, x, p: graph.call_function(
            batch_norm, (x, graph.get_attr(target), p.get("weight"), p.get("bias")))
    return _RULES.get(type(mod))


# F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) and
# aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
_BATCH_NORM_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.ops.aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training",
                                        "momentum", "eps", "cudnn_enabled"),
}
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_BATCH_NORM_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batch_norm_module(gm: fx.GraphModule, node: fx.Node, path: str, eps: float, momentum) -> nn.Module | None:
    """The batch norm module at ``path`` that owns the running statistics ``node`` reads: the
    module itself, or the plain container the capture left there (fx and torch.export copy
    only the tensors a graph reads) replaced by an ``nn.BatchNormNd`` holding the same tensors."""
    container = gm.get_submodule(path)
    if isinstance(container, nn.modules.batchnorm._BatchNorm):
        return container
    if type(container) is not nn.Module and type(container).__name__ != "InterpreterModule":
        return None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    cls = _BATCH_NORM_CLASSES.get(val.dim() if isinstance(val, torch.Tensor) else 4, nn.BatchNorm2d)
    mean = container.running_mean
    bn = cls(mean.numel(), eps=eps, momentum=momentum, affine=False, device=mean.device, dtype=mean.dtype)
    bn.affine = "weight" in container._parameters
    counter = container._buffers.get("num_batches_tracked")
    bn._buffers.update(container._buffers)
    if counter is None:  # fx copies only what the graph reads: a fresh counter
        bn._buffers["num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=mean.device)
    bn._parameters.update(container._parameters)
    bn._modules.update(container._modules)
    bn.train(container.training)
    parent, _, field = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, field, bn)
    return bn


def batch_norm_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite each functional batch norm (``F.batch_norm``, ``aten.batch_norm``) whose running
    statistics are buffers of one module into ``batch_norm(x, module, weight, bias)``, the call
    :func:`expose_params` writes for an ``nn.BatchNorm2d``; returns ``gm`` (modified in place).

    The call then follows the module's training flag at run time (the captured call holds the
    flag of the capture) and gets the module form's fixed-point definition
    (``passes.batch_norms``) and lowering.  The capture's own update of the batch counter
    (torch.export's ``add_`` on ``num_batches_tracked``) is dropped: the call makes it, in
    training mode only.  Calls without running statistics, or with statistics of different
    modules, stay as they are."""
    changed = False
    for node in list(gm.graph.nodes):
        names = _BATCH_NORM_ARGS.get(node.target) if node.op == "call_function" else None
        if names is None:
            continue
        args = {**_BATCH_NORM_DEFAULTS, **dict(zip(names, node.args)), **node.kwargs}
        mean, var = args.get("running_mean"), args.get("running_var")
        if not all(isinstance(v, fx.Node) and v.op == "get_attr" for v in (mean, var)):
            continue
        path, _, field = mean.target.rpartition(".")
        if (field, var.target) != ("running_mean", f"{path}.running_var") or not path:
            continue
        params = [args[k] for k in ("weight", "bias")]
        if any(p is not None and not (isinstance(p, fx.Node) and p.op == "get_attr") for p in params):
            continue
        module = _batch_norm_module(gm, node, path, float(args["eps"]), args["momentum"])
        if module is None or module.eps != float(args["eps"]):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(batch_norm, (args["input"], gm.graph.get_attr(path), *params))
        new.meta.update(node.meta)
        ir.MODULE.set(new, path)
        ir.OP.set(new, type(module).__name__)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        new.name = node.name
        for user in list(gm.graph.nodes):  # torch.export's counter update: the call makes it now
            if (user.op == "call_function" and user.target is torch.ops.aten.add_.Tensor and not user.users
                    and isinstance(user.args[0], fx.Node) and user.args[0].op == "get_attr"
                    and user.args[0].target == f"{path}.num_batches_tracked"):
                counter = user.args[0]
                gm.graph.erase_node(user)
                if not counter.users:
                    gm.graph.erase_node(counter)
        for old in (mean, var):
            if not old.users:
                gm.graph.erase_node(old)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def expose_params(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite parameter-owning ``call_module`` nodes; returns ``gm`` (modified in place).

    A module called several times gets one ``get_attr`` node per parameter, used by every
    call, so a shared weight is one value with fan-out and its summed gradient is quantized.
    Functional batch norms become module calls first (:func:`batch_norm_calls`).
    """
    batch_norm_calls(gm)
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
