"""Pass: run smooth elementwise nonlinearities as lookup tables over their input's codes.

Sigmoid, tanh, SiLU, GELU, Hardswish, Hardsigmoid, LeakyReLU, ELU and Mish are not exact in
float: the deployed graph cannot evaluate them, but it can look them up.  When a node's input
has a fixed-point cast of at most :data:`MAX_LOOKUP_BITS` bits and its output has a
fixed-point cast of its own, this pass rewrites it into a call of
:func:`fxcompile.core.ops.lookup` given the function's name and parameters, the input cast's
format and the output cast's format.  Its forward indexes the table
:func:`fxcompile.core.nonlinear.table` (every input code → the output cast's rounding and
overflow of the float64 function there), so the output cast is the identity on its forward
and still rounds (and clips) the gradient; its backward is the float function's derivative.
``lower`` turns the same node into the integer op ``lookup`` with the same table, so training
and deployment agree bit for bit.

The formats are node arguments, as :mod:`fxcompile.passes.averages` keeps them.  When a cast's
format changes after compile (``Cast.set_edge``), running this pass again makes every table
follow (a rewritten node is rewritten with the casts' current formats); ``lower`` refuses a
table whose formats no longer match its casts.  A node that does not qualify is left as it is
(it trains in float between its casts) and ``lower`` refuses it with :func:`lookup_refusal`'s
reason::

    >>> gm = lookup_tables(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.args[1] for n in gm.graph.nodes if n.target is ops.lookup]
    ['sigmoid', ...]
"""

from __future__ import annotations

import torch.fx as fx

from ..core import ir, nonlinear, ops
from ..core.formats import FixedPoint
from .casts import Cast, call_instead, output_cast

__all__ = ["CONTRACT", "MAX_LOOKUP_BITS", "lookup_tables", "lookup_arguments", "lookup_refusal", "input_format",
           "output_cast"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))

MAX_LOOKUP_BITS = 16  # 65,536 entries: a table any accelerator's memory holds


def _cast(gm: fx.GraphModule, node) -> Cast | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and ir.EDGE.has(node):
        mod = gm.get_submodule(node.target)
        return mod if isinstance(mod, Cast) else None
    return None


def input_format(gm: fx.GraphModule, node: fx.Node) -> FixedPoint | None:
    """The forward format of the cast ``node``'s input comes through, or ``None``."""
    source = node.args[0] if node.args else None
    cast = _cast(gm, source)
    # a use without a format of its own sees the value as its producer's cast made it
    while cast is not None and cast.edge.forward is None and cast.edge.consumer != "*":
        source = source.args[0]
        cast = _cast(gm, source)
    return None if cast is None else cast.edge.forward


def lookup_arguments(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple, list, list] | str:
    """``(name, params, in_spec, out_spec)`` of the table ``node`` runs as, or why it has none.

    ``node`` is a smooth function (:data:`fxcompile.core.ops.LOOKUP_OPS`) or a lookup already."""
    op = ops.op_of(gm, node)
    if op is not None and op.name == "lookup":
        name, params = node.args[1], node.args[2]
    else:
        found = nonlinear.function_of(gm, node, op.name)
        if isinstance(found, str):
            return found
        name, params = found
    fmt = input_format(gm, node)
    if fmt is None:
        return "its input has no fixed-point cast (a float format in the policy?)"
    if fmt.bits > MAX_LOOKUP_BITS:
        return f"input format {fmt} has {fmt.bits} bits; lookup tables need <= {MAX_LOOKUP_BITS}"
    cast = output_cast(gm, node)
    if cast is None:
        return "its output needs a fixed-point cast of its own (one consumer, a fixed-point format)"
    if cast.edge.forward.rounding == "stochastic":
        return f"output format {cast.edge.forward} rounds stochastically; a table needs 'nearest', 'floor' or " \
               "'toward_zero'"
    return name, tuple(params), fmt.spec(), cast.edge.forward.spec()


def lookup_refusal(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why the smooth-function ``node`` was not made a lookup table (``None`` if it can be)."""
    found = lookup_arguments(gm, node)
    return found if isinstance(found, str) else None


def lookup_tables(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the smooth nonlinearities of ``gm`` (after ``insert_casts``) into table lookups,
    and bring existing lookups' formats up to date with their casts; in place, returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        op = ops.op_of(gm, node)
        if op is None or op.name not in (*ops.LOOKUP_OPS, "lookup"):
            continue
        found = lookup_arguments(gm, node)
        if isinstance(found, str):
            continue  # lower() refuses it with this reason
        args = (node.args[0], *found)
        if (node.op, node.target, node.args) == ("call_function", ops.lookup, args):
            continue
        call_instead(gm, node, ops.lookup, args)
        changed = True
    if changed:
        gm.recompile()
    return gm
