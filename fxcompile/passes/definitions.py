"""Pass: run products of two activations, softmax and LayerNorm as their fixed-point definitions.

Neither is exact in float32.  A product of two activations (``matmul``/``@``/``mm``/``bmm``,
and an ``einsum`` that is a batched matmul up to permutations, such as ``'bhqd,bhkd->bhqk'``
or ``'bqhd,bkhd->bhqk'``) sums products of
two 16-bit codes over a reduction of length ``d``: up to ``30 + log2 d`` bits, more than
float32's 24, so a float32 sum can land one code away from the exact one after the cast.
Softmax and LayerNorm need ``exp``, square roots and divisions, which the integer graph
cannot run as such.  So that
training sees what deployment runs, this pass rewrites each such node whose operands come
through fixed-point casts and whose output has a fixed-point cast of its own into a call of
:func:`fxcompile.core.ops.fixed_point_matmul` (the exact product in float64, rounded once by
the output cast's format), :func:`fxcompile.core.ops.fixed_point_softmax` or
:func:`fxcompile.core.ops.fixed_point_layer_norm` (the integer algorithms of
:mod:`fxcompile.core.intmath` on the input's codes), given the input and output formats.  The cast after the node is then the identity on its forward and
still rounds the gradient; the backward is the float op's derivative.  ``lower`` emits the
same definitions as the integer ops ``matmul``, ``softmax`` and ``layer_norm``.  A node that does not
qualify (an operand or output without a fixed-point format, softmax over another dim than
the last or with a ``dtype``, an einsum that is not a matmul) is left as it is, and
``lower`` refuses it::

    >>> gm = fixed_point_definitions(insert_casts(assign_formats(annotate_roles(trace(model)), baseline())))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    [..., 'fixed_point_matmul', 'fixed_point_softmax', 'fixed_point_matmul', ...]
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from ..core import ir, ops
from ..core.formats import FixedPoint
from .casts import call_instead, output_cast

__all__ = ["CONTRACT", "fixed_point_definitions", "input_format", "output_format"]

CONTRACT = ir.Contract(requires=(ir.EDGE,))


def input_format(arg) -> FixedPoint | None:
    """The forward format of the value ``arg`` (a cast node; a use without a format of its own
    reads its value's cast), or ``None``."""
    while isinstance(arg, fx.Node) and arg.op == "call_module" and ir.EDGE.has(arg):
        if ir.EDGE.of(arg).forward is not None:
            return ir.EDGE.of(arg).forward
        arg = arg.args[0]
    return None


def output_format(gm: fx.GraphModule, node: fx.Node) -> FixedPoint | None:
    """The forward format of the one cast ``node`` feeds (its value's cast), or ``None``."""
    cast = output_cast(gm, node)
    return None if cast is None else cast.edge.forward


def _matmul(gm, node, name):
    if name == "einsum":
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if len(operands) != 2 or not isinstance(node.args[0], str):
            return None
        perms = ops.matmul_equation(node.args[0])
        if perms is None:
            return None
    else:
        operands, perms = node.args, None
    if node.kwargs or len(operands) != 2:
        return None
    formats = [input_format(a) for a in operands]
    if any(f is None for f in formats):
        return None
    a_meta = operands[0].meta.get("tensor_meta")
    if a_meta is not None:  # a reduction whose sums float64 cannot hold exactly stays as it is
        k = a_meta.shape[perms[0][-1] if perms and perms[0] else -1]
        if sum(ops.code_bits(f.spec()) for f in formats) + int(k).bit_length() > 53:
            return None
    return ops.fixed_point_matmul, (*operands, perms, *(f.spec() for f in formats))


def _softmax(gm, node, name):
    if node.op == "call_module":
        x, dim, extra = node.args[0], gm.get_submodule(node.target).dim, ()
    else:
        x, dim = node.args[0], node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        # F.softmax(x, dim, _stacklevel, dtype); torch.softmax(x, dim, dtype); aten._softmax(x, dim, half_to_float)
        extra = (*node.args[3 if node.target is F.softmax else 2:], node.kwargs.get("dtype"))
    rank = len(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
    fmt = input_format(x)
    if any(e not in (None, False) for e in extra) or fmt is None or fmt.code_max - fmt.code_min >= 1 << 16:
        return None
    if not (dim == -1 or (rank is not None and dim == rank - 1)):
        return None
    return ops.fixed_point_softmax, (x, fmt.spec())


def _layer_norm(gm, node, name):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    arguments = {"weight": None, "bias": None, "eps": 1e-5} | dict(zip(names, node.args)) | dict(node.kwargs)
    if node.op == "call_module":  # without affine parameters, expose_params leaves the module
        module = gm.get_submodule(node.target)
        if module.weight is not None or module.bias is not None:
            return None
        arguments |= {"normalized_shape": module.normalized_shape, "eps": module.eps}
    shape = arguments.get("normalized_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return None
    formats = [input_format(arguments[a]) for a in ("input", "weight", "bias")]
    if formats[0] is None or any(f is None for f, a in zip(formats[1:], ("weight", "bias")) if arguments[a] is not None):
        return None
    return ops.fixed_point_layer_norm, (arguments["input"], tuple(shape), arguments["weight"], arguments["bias"],
                                        float(arguments["eps"]), *(f.spec() if f else None for f in formats))


_REWRITES = {"matmul": _matmul, "mm": _matmul, "bmm": _matmul, "einsum": _matmul, "softmax": _softmax,
             "layer_norm": _layer_norm}


def fixed_point_definitions(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the products of two activations, softmaxes and LayerNorms of ``gm`` (after
    ``insert_casts``) in place; returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        op = ops.op_of(gm, node)
        rewrite = _REWRITES.get(op.name) if op is not None else None
        out = output_format(gm, node) if rewrite is not None else None
        found = rewrite(gm, node, op.name) if out is not None else None
        if found is None:
            continue
        call_instead(gm, node, found[0], (*found[1], out.spec()))
        changed = True
    if changed:
        gm.recompile()
    return gm
