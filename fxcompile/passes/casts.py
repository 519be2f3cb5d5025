"""Pass: insert a :class:`Cast` module on every edge that the assignment says needs one.

For each value: one cast right after its producer (forward: the value's format; backward:
the format of the *summed* gradient).  For each use whose formats differ from the value's,
or any use of a value with several consumers (each branch's gradient is quantized before
the sum), one more cast on that edge.  Casts live under ``gm.casts`` and carry their
:class:`Edge` in ``node.meta["fxc_edge"]``::

    >>> gm = insert_casts(assign_formats(annotate_roles(trace(model)), baseline()))
    >>> print(gm.casts)
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..core import ir
from ..core.assignment import Edge
from ..runtime.cast import cast, keep_inward, spec_of

__all__ = ["CONTRACT", "Cast", "insert_casts", "cast_nodes", "output_cast", "call_instead"]

CONTRACT = ir.Contract(requires=(ir.VALUE, ir.USES), provides=(ir.EDGE,))


class Cast(nn.Module):
    """A fixed-point cast on one edge: forward format, backward format, and the edge it sits on."""

    def __init__(self, edge: Edge, clip_gradient: bool = True, forward_identity: bool = False):
        super().__init__()
        self.forward_identity = forward_identity
        self.backward_identity = False  # set by elide_casts when the gradient arrives on its grid
        self.clip_gradient = clip_gradient and edge.role not in ir.PARAMETER_ROLES
        # set by insert_casts on the prediction a loss consumes (a policy's prediction_gradient="inward"):
        # at a saturated value, zero only the gradient that would push it further out
        self.inward_gradient = False
        self.counters = None  # fxcompile.runtime.telemetry.EdgeCounters while telemetry is on
        self.set_edge(edge)

    def set_edge(self, edge: Edge) -> None:
        self.edge = edge
        parameter = edge.role in ir.PARAMETER_ROLES
        fwd = ir.stored_format(edge.forward) if parameter else edge.forward
        self._fwd = [] if self.forward_identity else spec_of(fwd)
        self._bwd = [] if self.backward_identity else spec_of(edge.backward)
        # a parameter already on its grid is passed through rather than copied (see cast())
        self._parameter = parameter

    def forward(self, x):
        inward = self.inward_gradient and bool(self._fwd)
        clip = self.clip_gradient and not inward
        if self.counters is not None:
            y = self.counters.cast(x, self._fwd, self._bwd, clip)
        else:
            y = cast(x, self._fwd, self._bwd, clip, self._parameter)
        return keep_inward(y, self._fwd) if inward else y

    def extra_repr(self) -> str:
        fwd = "identity" if self.forward_identity else (self.edge.forward or "float")
        bwd = "identity" if self.backward_identity else (self.edge.backward or "float")
        inward = ", inward gradient" if self.inward_gradient else ""
        return f"{self.edge.name}: {self.edge.role} {fwd}, {self.edge.backward_role} {bwd}{inward}"


def _add_cast(gm: fx.GraphModule, source: fx.Node, name: str, edge: Edge, clip: bool, identity=False) -> fx.Node:
    while hasattr(gm.casts, name):  # a node named like a Module attribute ("to", "float", "train")
        name += "_"
    gm.casts.add_module(name, Cast(edge, clip, identity))
    node = gm.graph.call_module(f"casts.{name}", (source,))
    ir.EDGE.set(node, edge)
    ir.ROLE.set(node, None)
    if "tensor_meta" in source.meta:
        node.meta["tensor_meta"] = source.meta["tensor_meta"]
    return node


def insert_casts(gm: fx.GraphModule) -> fx.GraphModule:
    if not hasattr(gm, "casts"):
        gm.add_module("casts", nn.Module())
    clip = ir.CLIP_GRADIENT.get(gm, True)
    inward = ir.PREDICTION_GRADIENT.get(gm) == "inward"
    for node in list(gm.graph.nodes):
        value = ir.VALUE.get(node)
        if value is None:
            continue
        users = [u for u in node.users]
        with gm.graph.inserting_after(node):
            out = _add_cast(gm, node, node.name, value, clip)
        if inward and _prediction(node, users):
            gm.get_submodule(out.target).inward_gradient = True
        for user in users:
            edge = ir.USES.of(node).get(user.name)
            target = out
            if edge is not None and (edge.forward != value.forward or len(users) > 1
                                     or edge.backward != value.backward):
                with gm.graph.inserting_before(user):
                    target = _add_cast(gm, out, f"{node.name}__{user.name}", edge, clip,
                                       identity=edge.forward == value.forward)
            user.replace_input_with(node, target)
    gm.graph.lint()
    gm.recompile()
    return gm


def _prediction(node: fx.Node, users) -> bool:
    """A value a loss consumes: a model's returned value that is not the loss itself, or a loss
    graph's prediction (its first input, the only input whose role is an activation)."""
    if node.op == "placeholder":
        return ir.ROLE.get(node) == "activation"
    return ir.ROLE.get(node) != "loss" and any(u.op == "output" for u in users)


def cast_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if ir.EDGE.has(n)]


def output_cast(gm: fx.GraphModule, node: fx.Node) -> Cast | None:
    """The cast right after ``node`` that rounds its value (``node``'s only user, a value cast
    with a forward format that is not an identity), or ``None``.  The rewrites that give an op
    its fixed-point definition round to this cast's format."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_module" or not ir.EDGE.has(user) or ir.EDGE.of(user).consumer != "*":
        return None
    cast = gm.get_submodule(user.target)
    return cast if isinstance(cast, Cast) and not cast.forward_identity and cast.edge.forward is not None else None


def call_instead(gm: fx.GraphModule, node: fx.Node, target, args: tuple) -> None:
    """Make ``node`` call ``target(*args)``; it keeps its name and meta (roles, edges), and a
    module it called that no other node calls is deleted.  (The caller recompiles ``gm``.)"""
    module = node.target if node.op == "call_module" else None
    node.op, node.target, node.args, node.kwargs = "call_function", target, tuple(args), {}
    if module is not None and not any(n.op == "call_module" and n.target == module for n in gm.graph.nodes):
        gm.delete_submodule(module)
