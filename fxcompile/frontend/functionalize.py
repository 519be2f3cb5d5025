"""Pass: rewrite in-place operations as out-of-place ones (functionalise the captured graph).

Every op that writes into a value computed by the graph (``nn.ReLU(inplace=True)``,
``F.silu(x, inplace=True)``, ``x.add_(y)``, ``x[i] = v``, ATen ``relu_`` / ``add_`` from
``torch.export``) becomes its out-of-place twin, and every later reader of the written value
(or of a view of it) reads the twin's result instead.  A write through a view
(``x[:, :2].mul_(3)``) becomes the out-of-place op on the view plus one :func:`write_back`
node, ``x`` with that region replaced; later views of ``x`` are taken again from it.  An
in-place op without an out-of-place twin (``fill_``, ``bernoulli_``, ``copy_``...) runs on a
copy (:func:`on_copy`).  Writes into buffers and parameters (``get_attr`` values: running
statistics, counters) are state updates and stay as they are; writes into model inputs are
not seen by the caller.

Why rewrite the graph rather than make casts copy their input: a cast sits on every edge,
and a value with several consumers gets one cast per consumer.  A graph that says
``relu_(x)`` and then ``add(x, y)`` relies on both consumers holding the *same* tensor; once
each edge holds its own cast, the second consumer would read ``x`` before the ReLU.  The
rewritten graph says ``add(relu(x), y)``, which is the graph of the same model written
out-of-place, so it gets the same edges, formats and casts, hence gradients equal bit for bit,
and no cast ever returns a tensor that a later op writes into (autograd forbids writing into
a custom function's view output).  Rewriting right after capture, before any pass has
annotated the graph, keeps it one small pass for both front-ends (fx's ``x += y`` is
recorded as ``operator.iadd`` by the tracer for this pass; torch.export's own
functionalisation would also lower every op to ATen, losing fx's module-level graph)::

    >>> gm = functionalize(trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))))
    >>> gm.get_submodule("1").inplace
    False
"""

from __future__ import annotations

import copy
import importlib
import inspect
import operator

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

__all__ = ["functionalize", "write_back", "on_copy", "setitem"]

# in-place methods whose un-suffixed name is a different op (x.bernoulli() draws with
# probabilities x) or none: they run on a copy instead
_NO_TWIN = {"bernoulli_", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
            "log_normal_", "copy_", "fill_", "zero_", "fill_diagonal_"}
# in-place in name only (metadata, autograd flags, storage): left alone
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad", "detach_", "set_", "resize_", "resize_as_",
               "record_stream", "pin_memory_", "rename_", "refine_names_"}

_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "squeeze", "unsqueeze",
                 "flatten", "unflatten", "narrow", "select", "expand", "expand_as", "t", "contiguous", "chunk",
                 "split", "tensor_split", "unbind", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims",
                 "unfold", "as_strided", "__getitem__"}
_VIEW_FUNCTIONS = {operator.getitem, torch.narrow, torch.select, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.flatten, torch.unflatten, torch.reshape, torch.t, torch.chunk, torch.split,
                   torch.tensor_split, torch.unbind, torch.diagonal, torch.movedim, torch.swapaxes}

# x += y as recorded by the fx front-end
_AUGMENTED = {getattr(operator, f"i{name.rstrip('_')}"): getattr(operator, name) for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and_", "or_", "xor")}


def _resolve(qualname: str):
    """The object named ``qualname`` (``torch.narrow``, ``torch.ops.aten.slice.Tensor``)."""
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ValueError(f"cannot resolve {qualname!r}")


def _call(kind: str, name: str, x, args, kwargs):
    return getattr(x, name)(*args, **kwargs) if kind == "method" else _resolve(name)(x, *args, **kwargs)


def _replay(x, steps):
    for kind, name, args, kwargs in steps:
        x = _call(kind, name, x, args, kwargs)
    return x


def write_back(base, value, steps):
    """``base`` with its view ``steps`` replaced by ``value`` (``base`` itself is not touched).

    ``steps`` are ``(kind, name, args, kwargs)``: a method name or a function's qualified name.
    Where the "view" is a copy at run time (advanced indexing, a reshape that copies), eager
    PyTorch would have written into that copy, so ``base`` comes back unchanged.
    """
    view = _replay(base, steps)
    if not (isinstance(view, torch.Tensor) and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()):
        return base
    out = base.clone()
    _replay(out, steps).copy_(value)
    return out


def on_copy(kind, name, x, /, *args, **kwargs):
    """Apply the in-place op ``name`` to a copy of ``x`` and return the copy."""
    y = x.clone()
    _call(kind, name, y, args, kwargs)
    return y


def setitem(x, index, value):
    """``x[index] = value`` on a copy of ``x``; returns the copy."""
    y = x.clone()
    y[index] = value
    return y


def _is_view(node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        ret = schema.returns[0].alias_info if len(schema.returns) == 1 else None
        return ret is not None and not ret.is_write
    return node.target in _VIEW_FUNCTIONS


def _step(node: fx.Node):
    if node.op == "call_method":
        return ("method", node.target, tuple(node.args[1:]), dict(node.kwargs))
    return ("function", _get_qualified_name(node.target), tuple(node.args[1:]), dict(node.kwargs))


def _inplace_kwarg(fn, args, kwargs):
    """``(args, kwargs)`` with ``inplace=False`` if ``fn`` takes an ``inplace`` flag set true, else None."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    if "inplace" not in bound.arguments or bound.arguments["inplace"] is not True:
        return None
    bound.arguments["inplace"] = False
    return bound.args, bound.kwargs


def _twin(gm: fx.GraphModule, node: fx.Node):
    """``(op, target, args, kwargs)`` of the out-of-place twin of an in-place ``node``, else None.

    The first argument is always the value written into.
    """
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if not args or not isinstance(args[0], fx.Node):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if getattr(mod, "inplace", None) is not True:
            return None
        functional = copy.copy(mod)  # an activation module: no parameters, a flag
        functional.inplace = False
        parent, _, field = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, field, functional)
        return "call_module", node.target, args, kwargs
    if node.op == "call_method":
        name = node.target
        if not name.endswith("_") or name.startswith("_") or name in _NOT_WRITES:
            return None
        if name in _NO_TWIN or not hasattr(torch.Tensor, name[:-1]):
            return "call_function", on_copy, ("method", name, *args), kwargs
        return "call_method", name[:-1], args, kwargs
    if node.op != "call_function":
        return None
    target = node.target
    if target in _AUGMENTED:
        return "call_function", _AUGMENTED[target], args, kwargs
    if target is operator.setitem:
        return "call_function", setitem, args, kwargs
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if not (schema.arguments and schema.arguments[0].alias_info is not None
                and schema.arguments[0].alias_info.is_write):
            return None
        packet = getattr(torch.ops.aten, target.overloadpacket.__name__.rstrip("_"), None)
        twin = getattr(packet, target._overloadname, None) if target.namespace == "aten" else None
        # aten.copy has no derivative: copy_ runs on a copy instead
        if twin is not None and not twin._schema.is_mutable and twin.overloadpacket is not torch.ops.aten.copy:
            return "call_function", twin, args, kwargs
        return "call_function", on_copy, ("function", _get_qualified_name(target), *args), kwargs
    flags = _inplace_kwarg(target, args, kwargs) if callable(target) else None
    if flags is not None:
        return "call_function", target, flags[0], flags[1]
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and getattr(target, "__module__", "") in (
            "torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions"):
        twin = getattr(torch, name[:-1], None) or getattr(torch.nn.functional, name[:-1], None)
        if twin is not None and name not in _NO_TWIN:
            return "call_function", twin, args, kwargs
        return "call_function", on_copy, ("function", _get_qualified_name(target), *args), kwargs
    return None


def _chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The value ``node`` is a view of, and the view nodes from it down to ``node``."""
    chain = []
    while _is_view(node):
        chain.insert(0, node)
        node = node.args[0]
    return node, chain


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite in-place ops into out-of-place ones; returns ``gm`` (modified in place)."""
    graph, changed, inserted = gm.graph, False, []
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_method", "call_function"):
            continue
        root, chain = _chain(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else (None, [])
        if root is None or root.op == "get_attr":
            continue  # a buffer update is state, not a value
        twin = _twin(gm, node)
        if twin is None:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        here = order[node]
        # the views of root that exist before this write: later readers must see it
        aliases, frontier = [], [root]
        while frontier:
            for user in frontier.pop().users:
                if order.get(user, -1) < here and _is_view(user) and user not in aliases:
                    aliases.append(user)
                    frontier.append(user)
        op, target, args, kwargs = twin
        with graph.inserting_before(node):
            new = graph.create_node(op, target, args, kwargs)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
            updated = new
            if chain:
                updated = graph.call_function(write_back, (root, new, tuple(_step(v) for v in chain)))
                inserted.append(updated)
            # views read after the write are taken again from the updated value, with the
            # views they were taken from (the chain, since the op returns the written view)
            needed = set(chain)
            for alias in aliases:
                if any(order.get(u, -1) > here for u in alias.users):
                    needed.update(_chain(alias)[1])
            replayed = {root: updated}
            for alias in sorted(needed, key=order.get):
                replayed[alias] = graph.node_copy(alias, lambda n: replayed.get(n, n))
                inserted.append(replayed[alias])
            if chain:  # the written view, read again, holds what was written (also where it was a copy)
                replayed[chain[-1]] = new
        # what the op returns is the written view, which holds the op's result
        node.replace_all_uses_with(new)
        for old, fresh in replayed.items():
            for user in list(old.users):
                if order.get(user, -1) > here:
                    user.replace_input_with(old, fresh)
        graph.erase_node(node)
        new.name = node.name
        changed = True
    for node in reversed(inserted):  # views taken again, and bases written into, but never read
        if not node.users:
            graph.erase_node(node)
    if changed:
        graph.lint()
        gm.recompile()
    return gm
