"""Pass: attention masks as a select of the score or the smallest code.

Text transformers mask attention scores additively: Hugging Face's models build a bool
condition (from the ``attention_mask`` input, from positions for a causal mask, or both), turn
it into ``where(keep, 0, finfo.min)`` and add that to the scores.  Under fixed point the
huge negative number is rounded by the casts after it, and the sum ``score + min`` saturates
only where the score is small enough: a masked position can keep a large score.  This pass
rewrites each such ``add`` whose output has a fixed-point cast into a call of
:func:`fxcompile.core.ops.fill_masked`, given that cast's forward format: the score where the
condition keeps it, the format's smallest value elsewhere, exact in float and on codes (the
integer graph's ``select``), so the integer softmax gives masked positions the least weight.

The condition itself is bookkeeping on integers:

* computed from sizes and positions only (a causal mask), it is left as it is; lowering
  evaluates it for the example inputs' sequence length, so the deployed graph runs that
  length only;
* computed from one integer graph input of shape (batch, length) (``attention_mask``), it is
  replaced by :func:`fxcompile.core.ops.key_padding_mask` of that input when the two agree on
  random masks of the example shape and of other batch sizes; otherwise it is left, and
  lowering names the node it cannot evaluate.

The ``where`` and the condition's old computation, left without users, are removed::

    >>> gm = attention_masks(insert_casts(...))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    [..., 'key_padding_mask', ..., 'fill_masked', ...]
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..core import ir, ops
from .casts import output_cast

__all__ = ["CONTRACT", "attention_masks", "mask_value"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))


def _through_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_module" and ir.EDGE.has(node):
        node = node.args[0]
    return node


def _is_zero(gm, value) -> bool:
    value = _through_casts(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, fx.Node) and value.op == "call_function":
        name = getattr(getattr(value.target, "overloadpacket", None), "__name__", None)
        if name == "zeros" or (name in ("full", "scalar_tensor") and value.args and
                               value.args[-1 if name == "full" else 0] == 0):
            return True
    return False


def mask_value(gm: fx.GraphModule, node) -> tuple[fx.Node, float] | None:
    """``(condition, value)`` when ``node`` (behind its casts) is ``where(condition, 0, value)``
    or ``zeros.masked_fill(~condition, value)``-like: 0 where kept, ``value`` elsewhere; else ``None``."""
    node = _through_casts(node)
    op = ops.op_of(gm, node) if isinstance(node, fx.Node) else None
    if op is None or op.name != "where" or len(node.args) != 3 or node.kwargs:
        return None
    cond, kept, other = node.args
    if not _is_zero(gm, kept) or isinstance(other, fx.Node) or not isinstance(other, (int, float)):
        return None
    return cond, float(other)


def _data_inputs(gm: fx.GraphModule, node: fx.Node) -> set:
    """The placeholders whose values (not only their sizes) ``node`` is computed from."""
    found, seen, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.add(n)
            continue
        op = ops.op_of(gm, n) if n.op != "get_attr" else None
        if op is not None and op.name == "size":
            continue  # x.shape, sym_size: sizes, evaluated for the example shape
        todo.extend(n.all_input_nodes)
    return found


def _ancestors(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return [n for n in gm.graph.nodes if n in seen]


def _condition_of(gm: fx.GraphModule, cond: fx.Node, mask: fx.Node) -> fx.GraphModule:
    """``cond`` as a module of ``mask`` alone (it depends on no other input's values)."""
    graph, env = fx.Graph(), {}
    for n in _ancestors(gm, cond):
        if n.op == "placeholder" and n is not mask:
            raise ValueError(f"node {cond.name!r} reads input {n.name!r} beyond its sizes")
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[cond])
    return fx.GraphModule(gm, graph)


def _matches_on_random_masks(gm: fx.GraphModule, cond: fx.Node, mask: fx.Node, seed: int, ones_first: bool,
                             expected) -> bool:
    """Whether ``cond``, run on random 0/1 masks of the example shape and of two larger batch
    sizes (with ``ones_first``, a mask of all ones first in each), is a 4-d boolean tensor equal
    to ``expected(m, run)``, where ``run`` runs ``cond``'s computation on a mask."""
    meta = mask.meta.get("tensor_meta") or mask.meta.get("val")
    shape = tuple(getattr(meta, "shape", ()))
    if len(shape) != 2 or getattr(meta, "dtype", torch.float32).is_floating_point:
        return False
    try:
        sub = _condition_of(gm, cond, mask)
        g = torch.Generator().manual_seed(seed)
        for batch in (shape[0], shape[0] + 1, shape[0] + 2):
            for trial in range(3):
                m = torch.ones(batch, shape[1], dtype=torch.int64) if ones_first and not trial else \
                    torch.randint(0, 2, (batch, shape[1]), generator=g)
                m[:, 0] = 1  # a sequence keeps at least one token
                with torch.no_grad():
                    got = sub(m)
                    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or got.dim() != 4 or \
                            not torch.equal(got, expected(m, sub).expand_as(got)):
                        return False
    except Exception:  # noqa: BLE001 - a condition this check cannot run is not of the form checked
        return False
    return True


def _is_key_padding(gm: fx.GraphModule, cond: fx.Node, mask: fx.Node) -> bool:
    """Whether ``cond`` computes ``key_padding_mask(mask)`` (broadcast to its shape): checked on
    random 0/1 masks of the example shape and of other batch sizes, and masks of all ones."""
    return _matches_on_random_masks(gm, cond, mask, 0, True, lambda m, run: ops.key_padding_mask(m))


def _is_key_padding_and_constant(gm: fx.GraphModule, cond: fx.Node, mask: fx.Node) -> bool:
    """Whether ``cond`` is ``key_padding_mask(mask)`` and the condition for a mask keeping every
    position (a padding mask beside a causal one), on random masks as in :func:`_is_key_padding`."""
    return _matches_on_random_masks(gm, cond, mask, 1, False,
                                    lambda m, run: ops.key_padding_mask(m) & run(ops.all_kept(m)))


def _constant_part(gm: fx.GraphModule, cond: fx.Node, mask: fx.Node) -> fx.Node:
    """A copy of ``cond``'s computation reading ``all_kept(mask)`` instead of ``mask``: its constant
    part, which lowering evaluates for the example shape."""
    env = {}
    with gm.graph.inserting_before(cond):
        env[mask] = gm.graph.call_function(ops.all_kept, (mask,))
        for n in _ancestors(gm, cond):
            if n.op in ("placeholder", "get_attr") or n not in _depends_on(gm, cond, mask):
                env.setdefault(n, n)
                continue
            env[n] = gm.graph.node_copy(n, lambda a: env[a])
    return env[cond]


def _depends_on(gm: fx.GraphModule, cond: fx.Node, mask: fx.Node) -> set:
    """The ancestors of ``cond`` that read ``mask``'s values (not only its sizes)."""
    out = set()
    for n in _ancestors(gm, cond):
        op = ops.op_of(gm, n) if n.op not in ("get_attr", "placeholder") else None
        if op is not None and op.name == "size":
            continue
        if mask in n.all_input_nodes or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _remove_unused(gm: fx.GraphModule, nodes) -> None:
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n.graph is not gm.graph or n.op in ("placeholder", "output", "get_attr"):
            continue
        for user in list(n.users):  # torch.export's dtype asserts on the value: dropped with it
            if not user.users and "assert" in getattr(getattr(user.target, "overloadpacket", None), "__name__", ""):
                gm.graph.erase_node(user)
        if n.users:
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        todo.extend(inputs)


def attention_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the additive attention masks of ``gm`` (after ``insert_casts``) in place; returns ``gm``."""
    changed, padding = False, {}
    for node in list(gm.graph.nodes):
        op = ops.op_of(gm, node)
        if op is None or op.name != "add" or len(node.args) != 2 or node.kwargs:
            continue
        found = [(i, mask_value(gm, a)) for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
        found = [(i, m) for i, m in found if m is not None]
        cast = output_cast(gm, node)
        if len(found) != 1 or cast is None or cast.edge.forward is None:
            continue
        i, (cond, value) = found[0]
        fmt = cast.edge.forward
        if value > fmt.min_value:
            continue  # not a mask: the sum does not reach the format's smallest value
        scores = node.args[1 - i]
        inputs, also = _data_inputs(gm, cond), ()
        if len(inputs) == 1:
            (mask,) = inputs
            if (cond, mask) not in padding:
                if _is_key_padding(gm, cond, mask):
                    constant = None
                elif _is_key_padding_and_constant(gm, cond, mask):
                    constant = _constant_part(gm, cond, mask)
                else:
                    continue  # left as it is: lowering names the node it cannot evaluate
                with gm.graph.inserting_before(cond):
                    padding[cond, mask] = gm.graph.call_function(ops.key_padding_mask, (mask,)), constant
            cond, constant = padding[cond, mask]
            also = () if constant is None else (constant,)
        elif inputs:
            continue
        old = node.args
        node.op, node.target = "call_function", ops.fill_masked
        node.args = (scores, cond, fmt.spec(), *also)
        _remove_unused(gm, [a for a in old if isinstance(a, fx.Node)])
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
