"""Pass: capture a model as a ``torch.fx.GraphModule``.

Two front-ends: ``"fx"`` (``torch.fx`` symbolic tracing: readable, module-level graphs) and
``"export"`` (``torch.export``: ATen-level graphs, handles more Python, needs example inputs;
the batch size stays symbolic, other sizes where the model allows).  ``"auto"``, the
default, tries fx, then export, then fx with the modules fx cannot trace kept as leaves.  The
graph records which one produced it in ``gm.meta["fxc_frontend"]`` and why in
``gm.meta["fxc_frontend_reason"]``::

    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    >>> gm.meta["fxc_frontend"]
    'fx'
"""

from __future__ import annotations

import fnmatch
import inspect
import operator
import re
import traceback
import warnings
from typing import Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..core import ir, ops
from ..errors import TraceError
from . import attention, windows

__all__ = ["CONTRACT", "trace", "FRONTENDS"]

CONTRACT = ir.Contract(graph_provides=(ir.FRONTEND,))

FRONTENDS = ("fx", "export", "auto")

_LEAF_HINT = ("mark it as a leaf so fxcompile quantizes it at its boundary: "
              "fxc.compile(model, policy, leaf_modules=[{path!r}])")


class _Proxy(fx.Proxy):
    """A proxy that records ``x += y`` as ``operator.iadd``: fx's own proxy records ``add``,
    which loses the write that views of ``x`` see (functionalize rewrites it faithfully)."""


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"):
    setattr(_Proxy, f"__{_name}__", (lambda op: lambda self, other: self.tracer.create_proxy(
        "call_function", op, (self, other), {}))(getattr(operator, _name)))


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence):
        super().__init__()
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self.leaf_names = [x for x in leaf_modules if isinstance(x, str)]
        self.path: list[tuple[str, str]] = []  # (qualified name, class) of modules being traced
        self.failed: tuple[str, str] | None = None  # the innermost module an exception came out of
        self.shapes: dict[str, tuple] = {}  # input shapes of the modules windows.decompose writes out

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def user_leaf(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or any(fnmatch.fnmatchcase(qualname, p) for p in self.leaf_names)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if self.user_leaf(m, qualname):
            return True
        op = ops.module_op(m)
        if op is not None and op.module_names:  # e.g. timm's DropPath: random in training, traced whole
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.path.append((qualname, type(m).__name__))
        try:
            if (isinstance(m, torch.nn.MultiheadAttention) and not self.user_leaf(m, qualname)
                    and attention.decomposable(m, *args, **kwargs)):
                return attention.multi_head_attention(m, *args, **kwargs)  # written out in registry ops
            if qualname in self.shapes and not self.user_leaf(m, qualname) and len(args) == 1 and not kwargs:
                return windows.decompose(m, args[0], self.shapes[qualname])  # torchvision's Swin, for its shape
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path[-1]
            raise
        finally:
            self.path.pop()


def _failing_operation(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if frames:
        f = frames[-1]
        return f"`{(f.line or '').strip()}` ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
    return "an operation fx cannot trace"


# (what fx says, the class of failure): the first match names the failure
_FAILURES = (
    ("cannot be iterated", "Python iteration over a traced tensor (a for loop, unpacking or *args)"),
    ("'len' is not supported", "the Python builtin len() on a traced tensor"),
    ("cannot be interpreted as an integer", "a traced size used as a Python int (range(), indexing)"),
    ("argument must be a string, a bytes-like object or a real number",
     "a traced size or value converted with int()/float() (a dynamic shape used as a Python number)"),
    ("expected np.ndarray", "a traced tensor passed to NumPy"),
    ("control flow", "data-dependent control flow (if/while/assert on a traced value)"),
    ("bool", "data-dependent control flow (if/while/assert on a traced value)"),
    ("a leaf Variable that requires grad is being used in an in-place operation",
     "an in-place operation on an input or parameter"),
)


def _explain(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for pattern, failure in _FAILURES:
        if pattern in msg:
            return f"{failure} ({msg})"
    return msg


def _trace_fx(model: torch.nn.Module, leaf_modules: Sequence, concrete_args=None,
              example_inputs=None) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    tracer.shapes = windows.input_shapes(model, example_inputs)
    try:
        with attention.decomposed_attention():
            graph = tracer.trace(model, concrete_args=concrete_args)
        if concrete_args:
            _drop_fixed(graph, set(concrete_args))
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; all become TraceError
        path, cls = tracer.failed or ("", type(model).__name__)
        where = f"module '{path}' ({cls})" if path else f"the top-level module ({cls})"
        hint = _LEAF_HINT.format(path=path) if path else (
            "make that code traceable, or use frontend='export' with example_inputs")
        err = TraceError(f"torch.fx cannot trace {where}: {_explain(exc)} at {_failing_operation(exc)}. "
                         f"To fix it, {hint}.")
        err.module_path = path
        raise err from exc
    name = model.__class__.__name__
    gm = _follow_mode(fx.GraphModule(tracer.root, graph, name))
    ir.FRONTEND.set(gm, "fx")
    return gm


def fixed_defaults(model: torch.nn.Module, example_inputs) -> dict | None:
    """The parameters of ``model.forward`` after the positional example inputs that default to
    ``None`` or a bool (timm's ``attn_mask=None, is_causal=False``): traced as those constants,
    so that ``if attn_mask is not None`` takes the branch the model takes when called with the
    inputs alone, and the graph's inputs are the example's."""
    if not isinstance(example_inputs, (tuple, list)):
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    fixed = {p.name: p.default for p in params[len(example_inputs):]
             if p.kind in kinds and (p.default is None or isinstance(p.default, bool))}
    return fixed or None


_SPECIALISED = (torch.fx._symbolic_trace._assert_is_none, operator.eq, torch._assert)


def _drop_fixed(graph: fx.Graph, names: set) -> None:
    """Remove the inputs fx keeps for constant arguments, with the checks it adds on them."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for p in [n for n in graph.nodes if n.op == "placeholder" and re.sub(r"_\d+$", "", n.target) in names]:
        doomed, stack = set(), [p]
        while stack:
            n = stack.pop()
            if n not in doomed:
                doomed.add(n)
                stack.extend(n.users)
        if any(n is not p and n.target not in _SPECIALISED for n in doomed):
            continue  # the value is used: keep the input
        for n in sorted(doomed, key=order.get, reverse=True):
            graph.erase_node(n)


def split_inputs(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of example inputs given as a tuple (positional) or a dict (keywords,
    put in the order of ``model.forward``'s parameters, the order the graph's inputs take)."""
    if isinstance(example_inputs, dict):
        try:
            names = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            names = []
        order = {n: i for i, n in enumerate(names)}
        return (), dict(sorted(example_inputs.items(), key=lambda kv: order.get(kv[0], len(order))))
    return tuple(example_inputs), {}


def _batch_size(args, kwargs) -> int | None:
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim()]
    return leaves[0].shape[0] if leaves else None


def _dynamic_shapes(forward, args, kwargs, batch: int, batch_dim):
    """Dimension 0 of every input holding the batch is ``batch_dim``; other sizes Dim.AUTO."""
    def spec(x):
        if not isinstance(x, torch.Tensor) or not x.dim():
            return None
        return {d: batch_dim if d == 0 and x.shape[0] == batch else torch.export.Dim.AUTO
                for d in range(x.dim()) if (d == 0 and x.shape[0] == batch) or x.shape[d] > 1}
    if not kwargs:
        return pytree.tree_map(spec, args)
    return {name: pytree.tree_map(spec, value) for name, value in kwargs.items()} if not args else \
        pytree.tree_map(spec, inspect.signature(forward).bind(*args, **kwargs).arguments)


def _batched_names(forward, args, kwargs, batch: int) -> list[str]:
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {**{f"args[{i}]": a for i, a in enumerate(args)}, **kwargs}
    return [name for name, value in bound.items()
            if any(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch for x in pytree.tree_leaves(value))]


def _as_graph_module(exported: torch.nn.Module, name: str) -> fx.GraphModule:
    # A plain GraphModule over the exported graph: ep.module() refuses train()/eval(), which
    # training loops and shape propagation call; the ATen graph itself is kept as is.
    gm = fx.GraphModule(exported, exported.graph, name)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            # the export-time input checks: not a value of the model, and a cast's fan-out otherwise
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _mode_args() -> dict:
    aten, F = torch.ops.aten, torch.nn.functional
    # op -> position and keyword of its "training" argument
    return {aten.dropout.default: (2, None), aten.feature_dropout.default: (2, None),
            aten.alpha_dropout.default: (2, None), aten.feature_alpha_dropout.default: (2, None),
            aten.batch_norm.default: (5, None),
            # fx graphs: F.dropout(x, p, training=self.training) traced in training mode (timm's heads)
            **{fn: (2, "training") for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                              F.feature_alpha_dropout)},
            torch.dropout: (2, "train")}


def _follow_mode(gm: fx.GraphModule) -> fx.GraphModule:
    """Dropout and batch norm captured in training mode read ``gm.training`` at run time, so
    that ``qmodel.eval()`` turns dropout off and batch norm to its running statistics, as the
    model's own modules would (torch.export bakes the mode in as a constant, and so does fx
    for ``F.dropout(x, p, training=self.training)``; fx records a flag left at its default,
    True, as given, so every functional dropout of an fx graph follows the mode)."""
    mode, table = None, _mode_args()
    for node in list(gm.graph.nodes):
        try:
            pos, keyword = table.get(node.target, (None, None))
        except TypeError:  # an unhashable target
            continue
        if pos is None:
            continue
        by_keyword = keyword is not None and keyword in node.kwargs
        if (node.kwargs[keyword] if by_keyword else node.args[pos] if len(node.args) > pos else None) is not True:
            continue
        if node.target is torch.ops.aten.batch_norm.default and node.args[3] is None:
            continue  # no running statistics: batch statistics in both modes
        if mode is None:
            with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
                mode = gm.graph.create_node("get_attr", "training")
        if by_keyword:
            node.update_kwarg(keyword, mode)
        else:
            node.update_arg(pos, mode)
    gm.recompile()
    return gm


def _fixing_node(model, args, kwargs, batch: int) -> str:
    """Which node of the graph fixes the batch size: export with the size left free to
    specialise, run that graph at another batch size, name the first node that fails."""
    node = None
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
        gm = _as_graph_module(ep.module(), type(model).__name__)
        grow = lambda x: torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x
        inputs = iter(pytree.tree_leaves(pytree.tree_map(grow, (args, kwargs))))
        interp = fx.Interpreter(gm)
        for node in gm.graph.nodes:  # node by node, to know which one fails
            if node.op == "placeholder":
                interp.env[node] = next(inputs)
            elif node.op != "output":
                interp.env[node] = interp.run_node(node)
    except Exception as exc:  # noqa: BLE001 - the failing node is what we are after
        if node is None:
            return ""
        where = (node.meta.get("stack_trace") or "").strip().splitlines()
        line = f" (`{where[-1].strip()}`)" if where else ""
        target = getattr(node.target, "__name__", None) or str(node.target)
        return f"; node '{node.name}' ({target}){line} fixes it: {str(exc).splitlines()[0]}"
    return ""


def _trace_export(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    if example_inputs is None:
        raise TraceError("frontend='export' needs example_inputs, e.g. compile(..., example_inputs=(x,))")
    args, kwargs = split_inputs(model, example_inputs)
    batch = _batch_size(args, kwargs)
    if batch == 1:  # a size-1 dimension is specialised by torch.export: trace at batch 2
        args, kwargs = pytree.tree_map(
            lambda x: torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x,
            (args, kwargs))
        batch = 2
    # the batch dimension must stay symbolic (training batches differ from the example's);
    # other sizes stay symbolic where the model allows it
    dynamic = _dynamic_shapes(model.forward, args, kwargs, batch, torch.export.Dim("batch")) if batch else None
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        exported = ep.module()
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        if "Constraints violated" in msg and "batch" in msg:
            raise TraceError(
                f"{type(model).__name__} needs a fixed batch size: dimension 0 (the batch) of input "
                f"{', '.join(repr(n) for n in _batched_names(model.forward, args, kwargs, batch))} was "
                f"specialised to a constant by torch.export{_fixing_node(model, args, kwargs, batch)}. "
                "Make that code use the input's size (x.shape[0], -1 in view/reshape) instead of a constant.") from exc
        raise TraceError(f"torch.export cannot capture {type(model).__name__}: "
                         f"{msg.splitlines()[0] if msg else type(exc).__name__}") from exc
    gm = _follow_mode(_as_graph_module(exported, type(model).__name__))
    ir.FRONTEND.set(gm, "export")
    return gm


def _short(err: BaseException, limit: int = 300) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _trace_with_leaves(model, leaf_modules: list, first: TraceError, limit: int = 64) -> fx.GraphModule:
    """fx again, each module fx cannot trace (and every module of its class) kept as a leaf."""
    err, added = first, []
    while getattr(err, "module_path", "") and len(added) < limit:
        cls = type(model.get_submodule(err.module_path))
        if cls in leaf_modules:
            break
        leaf_modules.append(cls)
        added.append(f"{err.module_path} ({cls.__name__})")
        try:
            gm = _trace_fx(model, leaf_modules)
        except TraceError as again:
            err = again
            continue
        ir.LEAVES.set(gm, added)
        return gm
    raise err


def trace(model: torch.nn.Module, leaf_modules: Iterable = (), frontend: str = "auto",
          example_inputs: Sequence | dict | None = None) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule; raise :class:`TraceError` naming what failed.

    ``leaf_modules`` holds module classes or qualified-name patterns (``"layer1.*"``) that
    stay opaque ``call_module`` nodes.  ``example_inputs`` is a tuple of positional inputs or
    a dict of keyword inputs.  ``"auto"`` tries fx; where fx fails, torch.export with a
    symbolic batch size (given example inputs); where that fails too, fx again with each
    module fx could not trace kept as a leaf.  ``gm.meta["fxc_frontend"]`` says which
    captured the graph (``"fx"``, ``"export"`` or ``"leaf"``), ``gm.meta["fxc_frontend_reason"]``
    why.
    """
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}")
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module to compile, got {type(model).__name__}")
    leaf_modules = list(leaf_modules)
    if frontend == "export":
        gm = _trace_export(model, example_inputs)
        ir.FRONTEND_REASON.set(gm, "frontend='export' was asked for")
        return gm
    try:
        gm = _trace_fx(model, leaf_modules, fixed_defaults(model, example_inputs), example_inputs)
        ir.FRONTEND_REASON.set(gm, "torch.fx traced it" if frontend == "auto" else "frontend='fx' was asked for")
        return gm
    except TraceError as err:
        if frontend == "fx":
            raise
        fx_err = err
    export_err = None
    if example_inputs is not None:
        warnings.warn(f"{fx_err} Falling back to frontend='export'.", stacklevel=2)
        try:
            gm = _trace_export(model, example_inputs)
            ir.FRONTEND_REASON.set(gm, f"torch.fx failed: {_short(fx_err)}")
            return gm
        except TraceError as exc:
            export_err = exc
    try:
        gm = _trace_with_leaves(model, leaf_modules, fx_err)
    except TraceError as leaf_err:
        tried = f" torch.export failed too: {export_err}" if export_err else (
            " Pass example_inputs so that torch.export can be tried." if example_inputs is None else "")
        raise TraceError(f"{leaf_err}{tried}") from (export_err or leaf_err)
    warnings.warn(f"{fx_err} Keeping {', '.join(ir.LEAVES.of(gm))} as leaf modules, quantized at their "
                  "boundary.", stacklevel=2)
    ir.FRONTEND.set(gm, "leaf")
    why = f"torch.fx failed ({_short(fx_err)})" + (f" and torch.export failed ({_short(export_err)})" if export_err else "")
    ir.FRONTEND_REASON.set(gm, f"{why}; traced by fx with {', '.join(ir.LEAVES.of(gm))} as leaves")
    return gm
