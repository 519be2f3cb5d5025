"""Pass: capture a model as a ``torch.fx.GraphModule``.

Two front-ends: ``"fx"`` (``torch.fx`` symbolic tracing: readable, module-level graphs) and
``"export"`` (``torch.export``: ATen-level graphs, handles more Python, needs example
inputs).  ``"auto"`` tries fx and falls back to export.  The graph records which front-end
produced it in ``gm.meta["fxc_frontend"]``::

    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    >>> gm.meta["fxc_frontend"]
    'fx'
"""

from __future__ import annotations

import fnmatch
import operator
import traceback
import warnings
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from ..errors import TraceError

__all__ = ["trace", "FRONTENDS"]

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

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or any(fnmatch.fnmatchcase(qualname, p) for p in self.leaf_names):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.path.append((qualname, type(m).__name__))
        try:
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


def _trace_fx(model: torch.nn.Module, leaf_modules: Sequence, concrete_args=None) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; all become TraceError
        path, cls = tracer.failed or ("", type(model).__name__)
        where = f"module '{path}' ({cls})" if path else f"the top-level module ({cls})"
        hint = _LEAF_HINT.format(path=path) if path else (
            "make that code traceable, or use frontend='export' with example_inputs")
        raise TraceError(f"torch.fx cannot trace {where}: {_explain(exc)} at {_failing_operation(exc)}. "
                         f"To fix it, {hint}.") from exc
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["fxc_frontend"] = "fx"
    return gm


def _trace_export(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    if example_inputs is None:
        raise TraceError("frontend='export' needs example_inputs, e.g. compile(..., example_inputs=(x,))")
    try:
        # the batch dimension stays symbolic: training batches differ from the example's
        dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None
                        for x in example_inputs)
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic, strict=False)
        exported = ep.module()
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"torch.export cannot capture {type(model).__name__}: "
                         f"{str(exc).splitlines()[0]}") from exc
    # A plain GraphModule over the exported graph: ep.module() refuses train()/eval(), which
    # training loops and shape propagation call; the ATen graph itself is kept as is.
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            # the export-time input checks: not a value of the model, and a cast's fan-out otherwise
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta["fxc_frontend"] = "export"
    return gm


def trace(model: torch.nn.Module, leaf_modules: Iterable = (), frontend: str = "fx",
          example_inputs: Sequence | None = None) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule; raise :class:`TraceError` naming what failed.

    ``leaf_modules`` holds module classes or qualified-name patterns (``"layer1.*"``) that
    stay opaque ``call_module`` nodes.
    """
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}")
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module to compile, got {type(model).__name__}")
    leaf_modules = list(leaf_modules)
    if frontend == "export":
        return _trace_export(model, example_inputs)
    try:
        return _trace_fx(model, leaf_modules)
    except TraceError as err:
        if frontend == "fx" or example_inputs is None:
            raise
        warnings.warn(f"{err} Falling back to frontend='export'.", stacklevel=2)
        try:
            return _trace_export(model, example_inputs)
        except TraceError as export_err:
            raise TraceError(f"{err} The fallback front-end failed too: {export_err}") from export_err
