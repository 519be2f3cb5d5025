"""Pass: give every edge a forward and a backward format from a :class:`Policy`.

Writes ``node.meta["fxc_value"]`` (an :class:`Edge` with ``consumer="*"``: the value as its
producer emits it, whose backward format quantizes the summed gradient) and
``node.meta["fxc_uses"]`` (consumer name → :class:`Edge`) on every node that has a role::

    >>> gm = assign_formats(annotate_roles(trace(torch.nn.Linear(4, 2))), baseline())
"""

from __future__ import annotations

import torch.fx as fx

from ..core import ir
from ..core.assignment import Edge
from ..core.policy import Policy, warn_unused

__all__ = ["CONTRACT", "assign_formats", "VALUE_ROLE", "GRADIENT_ROLE", "edge_roles", "names_of"]

CONTRACT = ir.Contract(requires=(ir.ROLE, ir.OP), provides=(ir.VALUE, ir.USES),
                       graph_provides=(ir.CLIP_GRADIENT, ir.PREDICTION_GRADIENT, ir.OVERRIDE_MATCHES))

VALUE_ROLE = {"input": "input", "activation": "activation_out", "weight": "weight", "bias": "bias", "loss": "loss"}
GRADIENT_ROLE = {"weight": "weight_gradient", "bias": "bias_gradient", "loss": "loss"}


def edge_roles(role: str) -> tuple[str, str]:
    """The policy roles of a value with role ``role``: (forward, backward)."""
    return VALUE_ROLE[role], GRADIENT_ROLE.get(role, "gradient")


def names_of(node: fx.Node) -> list[str]:
    """Names a policy pattern can match: node name, target path, owning module path."""
    names = [node.name]
    if isinstance(node.target, str):
        names.append(node.target)
    if ir.MODULE.get(node):
        names.append(ir.MODULE.of(node))
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        names.append(last[0] if isinstance(last, tuple) else str(last))
    return names


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def assign_formats(gm: fx.GraphModule, policy: Policy, warn_unused_overrides: bool = True) -> fx.GraphModule:
    """Assign formats; ``gm.meta["fxc_override_matches"]`` keeps the (names, op) an override could
    match, so a caller compiling several graphs under one policy can warn once for all of them."""
    seen = []
    for node in gm.graph.nodes:
        role = ir.ROLE.get(node)
        if role is None:
            continue
        names, op = names_of(node), ir.OP.get(node)
        seen.append((names, op))
        value_role, grad_role = edge_roles(role)
        ir.VALUE.set(node, Edge(node.name, "*", value_role, policy.format_for(value_role, names, op),
                                grad_role, policy.format_for(grad_role, names, op), op, _shape(node)))
        uses = {}
        for user in node.users:
            if user.op == "output":
                continue
            if role in ir.PARAMETER_ROLES:
                uses[user.name] = Edge(node.name, user.name, value_role, ir.VALUE.of(node).forward,
                                       grad_role, ir.VALUE.of(node).backward, ir.OP.get(user, ""),
                                       _shape(node))
                continue
            u_names, u_op = names_of(user), ir.OP.get(user)
            seen.append((u_names, u_op))
            uses[user.name] = Edge(node.name, user.name, "activation_in",
                                   policy.format_for("activation_in", u_names, u_op), "gradient",
                                   policy.format_for("gradient", u_names, u_op), u_op or "", _shape(node))
        ir.USES.set(node, uses)
    ir.CLIP_GRADIENT.set(gm, getattr(policy, "clip_gradient", True))
    ir.PREDICTION_GRADIENT.set(gm, getattr(policy, "prediction_gradient", None))
    ir.OVERRIDE_MATCHES.set(gm, seen)
    if isinstance(policy, Policy) and warn_unused_overrides:
        warn_unused(policy, seen)
    return gm
