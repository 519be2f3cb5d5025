"""Capture: the tanh form of GELU written out in arithmetic becomes one ``F.gelu`` call.

GPT-2 (``gelu_new``, transformers' ``NewGELUActivation``) and other models write
``0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`` as seven ops; captured as they stand,
each gets casts of its own and the cube's product is not a lookup table.  This pass finds
that pattern (fx or ATen nodes, operands in either order) and replaces it with
``F.gelu(x, approximate="tanh")``, the same function, which ``compile`` makes a lookup table
(:mod:`fxcompile.passes.lookup_tables`)::

    >>> gm = tanh_gelu(functionalize(trace(model)))
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["tanh_gelu"]

_NAMES = {operator.mul: "mul", operator.add: "add", operator.pow: "pow", torch.mul: "mul", torch.add: "add",
          torch.pow: "pow", torch.tanh: "tanh"}


def _name(node) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    return _NAMES.get(node.target)


def _binary(node, name: str):
    """``(tensor operand, number)`` of ``node`` if it is ``name`` of a node and a number, else ``None``."""
    if _name(node) != name or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b)
    if name != "pow" and isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return b, float(a)
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * abs(b)


def _match(tanh: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(x, result node, nodes of the pattern)`` for a ``tanh`` at the heart of a tanh GELU."""
    scaled = _binary(tanh.args[0], "mul") if tanh.args else None
    if scaled is None or not _close(scaled[1], math.sqrt(2 / math.pi)):
        return None
    inner = scaled[0]
    if _name(inner) != "add" or len(inner.args) != 2 or inner.kwargs:
        return None
    for x, cubic in (inner.args, inner.args[::-1]):
        term = _binary(cubic, "mul")
        if term is None or not _close(term[1], 0.044715):
            continue
        power = _binary(term[0], "pow")
        if power is not None and power[0] is x and power[1] == 3:
            break
    else:
        return None
    if len(tanh.users) != 1:
        return None
    (one,) = tanh.users
    plus = _binary(one, "add")
    if plus is None or plus[0] is not tanh or plus[1] != 1 or len(one.users) != 1:
        return None
    (result,) = one.users
    if _name(result) != "mul" or len(result.args) != 2 or result.kwargs:
        return None
    half = result.args[0] if result.args[1] is one else result.args[1]
    h = _binary(half, "mul")
    if h is None or h[0] is not x or h[1] != 0.5:
        return None
    return x, result, [result, one, tanh, tanh.args[0], inner, cubic, term[0], half]


def tanh_gelu(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each written-out tanh GELU in ``gm`` with ``F.gelu(x, approximate="tanh")``; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or _name(node) != "tanh":
            continue
        found = _match(node)
        if found is None:
            continue
        x, result, pattern = found
        with gm.graph.inserting_before(result):
            gelu = gm.graph.call_function(F.gelu, (x,), {"approximate": "tanh"})
        result.replace_all_uses_with(gelu)
        for n in pattern:  # the pattern's nodes, outermost first: each is unused once its users are gone
            if n.graph is gm.graph and not n.users:
                gm.graph.erase_node(n)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
