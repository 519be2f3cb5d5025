"""Optimise an :class:`IntegerGraph`: rewrites that make it cheaper to run and keep every
output code.

Two rewrites, in this order:

* **Max pooling first.**  A saturating ``requantize`` (and a ``relu`` after it) whose only
  user is a ``max_pool2d`` moves behind the pool: both are non-decreasing, so
  ``maxpool(relu(requantize(acc))) = relu(requantize(maxpool(acc)))`` exactly, and the
  rounding runs on a quarter of the values for a 2×2 pool.  The pool now reads the
  accumulator (``<pool>_acc``; a moved ReLU's output is ``<relu>_pooled``) and the last moved
  op keeps the pool's output name.  When the accumulator is a ``conv2d`` used by nothing
  else, its bias moves too, into the pool's ``attrs["bias"]`` (added per channel after the
  max: a per-channel constant commutes with a max over one channel's window) and the conv's
  ``attrs["bias"]`` becomes ``None``.
* **ReLU and clamps folded into requantize.**  A ``relu`` after a saturating ``requantize``
  that feeds nothing else becomes that requantize's ``attrs["relu"] = True`` (it then clamps
  at 0 too) and takes the ReLU's output name; a ``clip`` without shift (ReLU6, Hardtanh,
  ``clamp``) whose bounds meet the format's range becomes ``attrs["clamp"] = (lo, hi)`` (the
  saturation's range narrowed to them) the same way.

Graph inputs, outputs and their names are unchanged.  The integer reference
(:mod:`fxcompile.deploy.backends.integer`) runs both forms bit for bit alike, and
:func:`fxcompile.deploy.backends.onnx.to_onnx` optimises the graph it is given::

    >>> graph = lower(fold_bn(qmodel), (x,))
    >>> fast = optimize(graph)
    >>> torch.equal(run_integer(fast, x)[0], run_integer(graph, x)[0])
    True
"""

from __future__ import annotations

import dataclasses

from .lower import IntegerGraph, IntOp

__all__ = ["optimize"]


def optimize(graph: IntegerGraph) -> IntegerGraph:
    """``graph`` with its max pools moved before the saturating requantize (and ReLU) that
    feed them, then each ReLU after a saturating requantize folded into it (see the module);
    ``graph`` itself is not modified."""
    ops, shapes = list(graph.ops), dict(graph.shapes)
    ops = _pool_first(ops, shapes, graph)
    ops = _fold_relu(ops, graph.outputs)
    return dataclasses.replace(graph, ops=ops, shapes=shapes)


def _producer(ops: list[IntOp], name: str) -> IntOp | None:
    return next((o for o in ops if o.out == name), None)


def _only_user(ops: list[IntOp], op: IntOp, outputs: list[str]) -> IntOp | None:
    users = [u for u in ops if op.out in u.inputs]
    return users[0] if len(users) == 1 and op.out not in outputs else None


def _saturating(op: IntOp | None) -> bool:
    return op is not None and op.op == "requantize" and op.attrs["fmt"].overflow == "saturate"


def _index(ops: list[IntOp], op: IntOp) -> int:
    return next(i for i, o in enumerate(ops) if o is op)


def _pool_first(ops: list[IntOp], shapes: dict, graph: IntegerGraph) -> list[IntOp]:
    """Each max pool moved before the saturating requantize (and ReLU) that feed only it;
    ``shapes`` gains the moved values' shapes (the pool's output shape)."""
    for pool in [p for p in ops if p.op == "max_pool2d"]:
        chain, src = [], _producer(ops, pool.inputs[0])
        if src is not None and src.op == "relu" and _only_user(ops, src, graph.outputs) is pool:
            chain, src = [src], _producer(ops, src.inputs[0])
        if not (_saturating(src) and _only_user(ops, src, graph.outputs) is (chain[0] if chain else pool)):
            continue
        chain.insert(0, src)
        acc = _producer(ops, src.inputs[0])
        if acc is None:
            continue
        pooled_attrs = dict(pool.attrs)
        if acc.op == "conv2d" and acc.attrs["bias"] is not None and _only_user(ops, acc, graph.outputs) is src:
            # a per-channel constant commutes with a max over one channel's window too
            pooled_attrs["bias"] = acc.attrs["bias"]
            ops[_index(ops, acc)] = dataclasses.replace(acc, attrs={**acc.attrs, "bias": None})
        moved = [dataclasses.replace(pool, out=f"{pool.out}_acc", inputs=(acc.out,), frac=acc.frac, fmt=acc.fmt,
                                     attrs=pooled_attrs)]
        for k, op in enumerate(chain):
            out = pool.out if k == len(chain) - 1 else f"{op.out}_pooled"
            moved.append(dataclasses.replace(op, inputs=(moved[-1].out,), out=out))
        for op in moved:
            shapes[op.out] = graph.shapes[pool.out]
        at = _index(ops, src)
        ops = [o for o in ops if all(o is not c for c in (pool, *chain))]
        ops[at:at] = moved
    return ops


def _fold_relu(ops: list[IntOp], outputs: list[str]) -> list[IntOp]:
    """Each ReLU, and each clip without shift whose bounds meet the format's range, after a
    saturating requantize that feeds only it folded into the requantize."""
    for relu in [r for r in ops if r.op in ("relu", "clip")]:
        src = _producer(ops, relu.inputs[0])
        if not (_saturating(src) and _only_user(ops, src, outputs) is relu and "clamp" not in src.attrs):
            continue
        if relu.op == "relu":
            attrs = {**src.attrs, "relu": True}
        else:
            fmt = src.attrs["fmt"]
            lo = fmt.code_min - fmt.zero_point if relu.attrs["lo"] is None else relu.attrs["lo"]
            hi = fmt.code_max - fmt.zero_point if relu.attrs["hi"] is None else relu.attrs["hi"]
            lo, hi = max(lo, 0) if src.attrs.get("relu") else lo, hi
            if relu.attrs["shift"] or not (fmt.code_min - fmt.zero_point <= lo <= hi <= fmt.code_max - fmt.zero_point):
                continue
            attrs = {**src.attrs, "clamp": (lo, hi)}
        ops[_index(ops, src)] = dataclasses.replace(src, out=relu.out, attrs=attrs)
        del ops[_index(ops, relu)]
    return ops
