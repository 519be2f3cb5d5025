"""Elementwise nonlinearities in fixed point: clips on codes, and lookup tables for the rest.

Two kinds of elementwise function are registered in :mod:`fxcompile.core.ops`:

* **clips** (``relu6``, ``hardtanh``, ``clamp``/``clip`` with constant bounds) are exact in
  fixed point: on codes they are a clamp to the bounds.  :func:`clip_bounds` reads the bounds
  of such a node; the float clamp followed by the output cast equals, bit for bit, the integer
  clamp of the input codes to the bounds *rounded by the output cast* (rounding and saturation
  are non-decreasing, so they commute with a clamp).  No rewrite is needed.
* **smooth functions** (:data:`FUNCTIONS`: sigmoid, tanh, SiLU, GELU, Hardswish, Hardsigmoid,
  LeakyReLU, ELU, Mish) are not exact in float.  Their fixed-point definition is a table over
  the input format's codes: ``table[code]`` is the output format's rounding (and saturation
  or wrap) of the float64 function at that code's value (:func:`table`).  :func:`lookup` runs
  that table in training (``passes.lookup_tables`` rewrites the nodes into it) and the integer
  graph runs the same table; its backward is the float function's derivative at the input::

    >>> y = lookup(x, "sigmoid", (), fixed(16, 8).spec(), fixed(16, 8).spec())
    >>> table("sigmoid", (), tuple(fixed(8, 4).spec()), tuple(fixed(8, 7).spec()))[:3]
    tensor([0, 0, 0])
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .quantizer import STOCHASTIC, quantize_reference

__all__ = ["FUNCTIONS", "CLIPS", "function_of", "clip_bounds", "table", "lookup", "float_function"]

# name -> (the float function f(x, *params), the argument names after x with their defaults)
FUNCTIONS: dict[str, tuple[Callable, tuple]] = {
    "sigmoid": (torch.sigmoid, ()),
    "tanh": (torch.tanh, ()),
    "silu": (F.silu, ()),
    "gelu": (lambda x, approximate: F.gelu(x, approximate=approximate), (("approximate", "none"),)),
    "hardswish": (F.hardswish, ()),
    "hardsigmoid": (F.hardsigmoid, ()),
    "leaky_relu": (F.leaky_relu, (("negative_slope", 0.01),)),
    "elu": (lambda x, alpha: F.elu(x, alpha), (("alpha", 1.0), ("scale", 1.0), ("input_scale", 1.0))),
    "mish": (F.mish, ()),
}

# clip op -> its bound arguments after x, with defaults (relu6 has fixed bounds)
CLIPS: dict[str, tuple] = {
    "relu6": (),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "clamp": (("min", None), ("max", None)),
}


def _arguments(gm: fx.GraphModule, node: fx.Node, names: tuple) -> dict:
    """Arguments after the input, by name: a module's attributes, or a call's args and kwargs."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return {n: getattr(module, n, default) for n, default in names}
    out = {n: default for n, default in names}
    out.update({n: v for (n, _), v in zip(names, node.args[1:])})
    out.update({k: v for k, v in node.kwargs.items() if k in out})
    return out


def function_of(gm: fx.GraphModule, node: fx.Node, op: str) -> tuple[str, tuple] | str:
    """``(name, params)`` of the smooth function ``op`` that ``node`` computes, or the reason
    it has no table (a parameter that is a tensor, or an ELU with ``scale``/``input_scale``)."""
    fn, names = FUNCTIONS[op]
    args = _arguments(gm, node, names)
    if any(isinstance(v, fx.Node) for v in args.values()):
        return f"its parameters {sorted(args)} must be constants, not tensors"
    if op == "elu":
        if (args["scale"], args["input_scale"]) != (1.0, 1.0):
            return "ELU with scale or input_scale (SELU/CELU forms) has no table yet"
        return op, (float(args["alpha"]),)
    return op, tuple(float(v) if isinstance(v, (int, float)) else v for v in args.values())


def clip_bounds(gm: fx.GraphModule, node: fx.Node, op: str) -> tuple[float | None, float | None] | None:
    """The constant bounds ``(lo, hi)`` (``None``: no bound) of the clip ``op`` at ``node``,
    as the float32 values a float32 clamp compares with; ``None`` if a bound is a tensor."""
    if op == "relu6":
        return 0.0, 6.0
    bounds = tuple(_arguments(gm, node, CLIPS[op]).values())
    if any(isinstance(b, fx.Node) for b in bounds):
        return None
    # a float32 clamp compares with (and returns) the bound rounded to float32
    return tuple(None if b is None or math.isinf(b) else float(torch.tensor(float(b), dtype=torch.float32))
                 for b in bounds)


def float_function(name: str, params: tuple) -> Callable:
    """``x -> f(x)``: the float function of a table."""
    fn, _ = FUNCTIONS[name]
    return lambda x: fn(x, *params)


@functools.lru_cache(maxsize=256)
def table(name: str, params: tuple, in_spec: tuple, out_spec: tuple) -> torch.Tensor:
    """The lookup table of ``name`` from format ``in_spec`` to ``out_spec`` (spec tuples): the
    int64 centred output codes of every centred input code, smallest first.

    Each entry is ``out_spec``'s rounding and overflow of the float64 function at that code's
    value.  Stochastic output rounding has no table (``ValueError``)."""
    if out_spec[4] == STOCHASTIC:
        raise ValueError(f"a lookup table needs a deterministic output rounding, got format spec {list(out_spec)}")
    frac, code_min, code_max, zp = in_spec[:4]
    codes = torch.arange(code_min - zp, code_max - zp + 1, dtype=torch.float64)
    values = float_function(name, params)(codes * 2.0 ** -frac)
    out = quantize_reference(values, list(out_spec))
    return torch.round(out * 2.0 ** out_spec[0]).to(torch.int64)


@functools.lru_cache(maxsize=256)
def _values(name: str, params: tuple, in_spec: tuple, out_spec: tuple, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """The table's output values (codes times ``2**-frac``) as a tensor of ``dtype`` on ``device``."""
    return (table(name, params, in_spec, out_spec).double() * 2.0 ** -out_spec[0]).to(dtype=dtype, device=device)


def _read(x: torch.Tensor, values: torch.Tensor, in_spec) -> torch.Tensor:
    """``values`` at ``x``'s codes in ``in_spec`` (values of the input cast lie on its grid;
    anything else is rounded to nearest), clamped into the table; NaN stays NaN."""
    frac, code_min, code_max, zp = in_spec[:4]
    # in place after one copy, exact in float32 (codes of at most 16 bits, a power-of-two scale)
    t = torch.mul(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, 2.0 ** frac)
    t = t.sub_(code_min - zp).round_().clamp_(0, code_max - code_min)
    nan = bool(torch.isnan(t.sum()))  # one reduction, not a mask, in the usual NaN-free case
    index = (t.nan_to_num(0.0) if nan else t).int().reshape(-1)
    y = values.index_select(0, index).reshape(x.shape)  # int32 indices: the fast gather
    return torch.where(torch.isnan(x), x, y) if nan else y


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name, params, in_spec, out_spec):
        values = _values(name, tuple(params), tuple(in_spec), tuple(out_spec), x.dtype, x.device)
        ctx.save_for_backward(x)
        ctx.fn = float_function(name, tuple(params))
        return _read(x, values, in_spec)

    @staticmethod
    def backward(ctx, grad):
        # the float function's derivative at the input; the input cast rounds what this returns
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            (dx,) = torch.autograd.grad(ctx.fn(xd), xd, grad)
        return dx, None, None, None, None


def lookup(x: torch.Tensor, name: str, params: tuple, in_spec: list, out_spec: list) -> torch.Tensor:
    """The smooth function ``name`` (:data:`FUNCTIONS`, with ``params``) as deployed: the
    :func:`table` from the input cast's format ``in_spec`` to the output cast's ``out_spec``,
    indexed by ``x``'s codes.  The backward is the float function's derivative at ``x``.

        >>> lookup(torch.tensor([0.5]), "tanh", (), [8, -32768, 32767, 0, 0, 0], [8, -32768, 32767, 0, 0, 0])
        tensor([0.4609])
    """
    return _Lookup.apply(x, name, tuple(params), list(in_spec), list(out_spec))
