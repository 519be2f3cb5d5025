"""Pass: give every edge a forward and a backward format from a :class:`Policy`.

Writes ``node.meta["fxc_value"]`` (an :class:`Edge` with ``consumer="*"``: the value as its
producer emits it, whose backward format quantizes the summed gradient) and
``node.meta["fxc_uses"]`` (consumer name → :class:`Edge`) on every node that has a role::

    >>> gm = assign_formats(annotate_roles(trace(torch.nn.Linear(4, 2))), baseline())
"""

from __future__ import annotations

import torch.fx as fx

from ..core.assignment import Edge
from ..core.policy import Policy, warn_unused

__all__ = ["assign_formats", "VALUE_ROLE", "GRADIENT_ROLE", "edge_roles", "names_of"]

VALUE_ROLE = {"input": "input", "activation": "activation_out", "weight": "weight", "bias": "bias", "loss": "loss"}
GRADIENT_ROLE = {"weight": "weight_gradient", "bias": "bias_gradient", "loss": "loss"}


def edge_roles(role: str) -> tuple[str, str]:
    """The policy roles of a value with role ``role``: (forward, backward)."""
    return VALUE_ROLE[role], GRADIENT_ROLE.get(role, "gradient")
_PARAMETER = ("weight", "bias")


def names_of(node: fx.Node) -> list[str]:
    """Names a policy pattern can match: node name, target path, owning module path."""
    names = [node.name]
    if isinstance(node.target, str):
        names.append(node.target)
    if node.meta.get("fxc_module"):
        names.append(node.meta["fxc_module"])
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
        role = node.meta.get("fxc_role")
        if role is None:
            continue
        names, op = names_of(node), node.meta.get("fxc_op")
        seen.append((names, op))
        value_role, grad_role = edge_roles(role)
        node.meta["fxc_value"] = Edge(node.name, "*", value_role, policy.format_for(value_role, names, op),
                                      grad_role, policy.format_for(grad_role, names, op), op, _shape(node))
        uses = {}
        for user in node.users:
            if user.op == "output":
                continue
            if role in _PARAMETER:
                uses[user.name] = Edge(node.name, user.name, value_role, node.meta["fxc_value"].forward,
                                       grad_role, node.meta["fxc_value"].backward, user.meta.get("fxc_op", ""),
                                       _shape(node))
                continue
            u_names, u_op = names_of(user), user.meta.get("fxc_op")
            seen.append((u_names, u_op))
            uses[user.name] = Edge(node.name, user.name, "activation_in",
                                   policy.format_for("activation_in", u_names, u_op), "gradient",
                                   policy.format_for("gradient", u_names, u_op), u_op or "", _shape(node))
        node.meta["fxc_uses"] = uses
    gm.meta["fxc_clip_gradient"] = getattr(policy, "clip_gradient", True)
    gm.meta["fxc_override_matches"] = seen
    if isinstance(policy, Policy) and warn_unused_overrides:
        warn_unused(policy, seen)
    return gm
