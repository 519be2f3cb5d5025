"""Pass: give every value in the graph a role, in ``node.meta["fxc_role"]``.

Roles of values: ``input`` (placeholders), ``weight`` / ``bias`` (parameters, embedding tables
included), ``activation`` (anything an op computes), ``loss`` (what a loss graph returns, or
the model's output named by ``loss_output``).  Values that are not floating-point tensors
(sizes, token ids, attention masks of integers, labels) get no role and no cast.  Also records the
op name a policy override can match in ``node.meta["fxc_op"]``::

    >>> gm = annotate_roles(trace(torch.nn.Linear(4, 2)))
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import TensorMetadata

from ..core import ir

__all__ = ["CONTRACT", "annotate_roles", "op_name", "named_outputs"]

CONTRACT = ir.Contract(provides=(ir.ROLE, ir.OP))


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if ir.OP.has(node):
        return ir.OP.of(node)
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):  # export graphs: aten.linear.default -> linear
            return node.target.overloadpacket.__name__
        return getattr(node.target, "__name__", str(node.target)).split(".")[-1]
    if node.op == "call_method":
        return str(node.target)
    return node.op


def _is_float_tensor_value(node: fx.Node) -> bool | None:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        kind = node.meta.get("type")  # shape propagation records the type of every result
        if isinstance(kind, type) and not issubclass(kind, torch.Tensor):
            return False
        return None  # unknown: the cast checks at run time
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def named_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The graph's output values by name: ``"loss"``, ``"logits"`` for dict or ModelOutput
    outputs, ``"0"``, ``"1"``... for tuples (nested names joined with dots)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:  # export graphs: flat outputs plus their structure
        value = pytree.tree_unflatten(list(pytree.tree_leaves(value)), info.out_spec)
    names = {}
    for path, leaf in pytree.tree_flatten_with_path(value)[0]:
        if isinstance(leaf, fx.Node):
            keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
            names[".".join(str(k) for k in keys)] = leaf
    return names


def annotate_roles(gm: fx.GraphModule, loss_graph: bool = False, loss_output: str | None = None) -> fx.GraphModule:
    """Annotate roles; with ``loss_graph`` the first input is the model's prediction and the
    returned value is the loss; ``loss_output`` names the model's output that is the loss."""
    loss_node = None
    if loss_output is not None:
        outputs = named_outputs(gm)
        if loss_output not in outputs:
            raise ValueError(f"loss_fn={loss_output!r} names no output of {type(gm).__name__}; "
                             f"its outputs are {sorted(outputs)}")
        loss_node = outputs[loss_output]
    placeholders = 0
    for node in gm.graph.nodes:
        ir.OP.set(node, op_name(gm, node))
        role = None
        if node.op == "placeholder":
            role = "activation" if loss_graph and placeholders == 0 else "input"
            placeholders += 1
        elif node.op == "get_attr":
            attr = ir.fetch(gm, node.target)
            if isinstance(attr, torch.nn.Parameter) and attr.is_floating_point():
                role = "bias" if "bias" in node.target.rsplit(".", 1)[-1] else "weight"
        elif node.op in ("call_module", "call_function", "call_method"):
            role = "activation"
            if (loss_graph and any(u.op == "output" for u in node.users)) or node is loss_node:
                role = "loss"
        if role is not None and _is_float_tensor_value(node) is False:
            role = None
        ir.ROLE.set(node, role)
    return gm
