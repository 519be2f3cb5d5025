"""FPGA handoff: a compiled fixed-point model as an hls4ml project, bit-exact with the integer graph.

:func:`to_hls4ml` folds batch norm and lowers ``qmodel`` (as :func:`fxcompile.deploy.export.integer_graph`
does), rebuilds the integer graph as a plain PyTorch model whose parameters are the exact
parameter values, converts it with hls4ml's PyTorch front-end and gives every hls4ml layer
the ``ap_fixed`` types that make its C++ compute exactly what the integer reference
(:mod:`fxcompile.deploy.backends.integer`) computes:

* the input layer's type is the input edge's format (the float → fixed conversion rounds
  and saturates like ``quantize``),
* a conv/dense layer's ``weight``/``bias`` types are its parameter edges' formats and its
  ``accum`` type has the accumulator's binary point (``max(frac_x + frac_w, frac_b)``) and
  enough integer bits for the largest possible sum of the layer's actual weights, so
  accumulation is exact; its ``result`` type is the format of the cast that follows it,
  so the one rounding and saturation of ``requantize`` happen in the conversion
  ``accum → result``,
* ReLU, max pooling and flatten keep their input's type (or take the format of a cast
  that follows them),
* a residual ``add`` is a ``Merge`` add layer and a product of two activations of one shape
  a ``Merge`` multiply layer; both compute exactly in ``ap_fixed`` arithmetic and the cast
  after them is their result type (the one rounding),
* a ``concat`` along channels is a ``Concatenate`` layer whose result type holds every
  operand exactly at the largest binary point (the operands' type when they share one) or
  is the format of the cast that follows it.

An image input read by several layers is read through a copy (``ZeroPadding2D`` with no
padding): hls4ml's channels-last conversion transposes the input for its first reader only.

Formats map one to one onto ``ap_[u]fixed<W, W - frac, Q, O>``: rounding ``nearest`` (ties
to even) → ``AP_RND_CONV``, ``floor`` → ``AP_TRN``, ``toward_zero`` → ``AP_TRN_ZERO``;
overflow ``saturate`` → ``AP_SAT`` (the full two's-complement range, the default),
``AP_SAT_SYM`` for a ``narrow`` format; ``wrap`` → ``AP_WRAP``.  Stochastic rounding on a forward value and
nonzero zero points have no ``ap_fixed`` equivalent: :class:`~fxcompile.errors.ExportError`
names the edge and the format.  (Parameters stored under a stochastic *update* rounding
already lie on their grid and map like ``nearest``, as in the lowering.)

hls4ml is an optional dependency (``pip install -e ".[hls]"``); C simulation needs only
``g++``::

    >>> hls_model = fxc.to_hls4ml(qmodel, "build/hls", example_inputs=(x[:1],))
    >>> hls_model.compile()                       # builds the C++ model with g++
    >>> y = hls_model.predict(x.numpy())          # equals run_integer(graph, x) bit for bit
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import os
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from ...core import ir
from ...errors import ExportError
from ...core.formats import FixedPoint
from ..fold_bn import fold_bn
from ..lower import IntegerGraph, IntOp, lower

__all__ = ["to_hls4ml", "hls_precision", "hls_plan", "HlsLayer", "ROUNDING", "require_hls4ml", "predict_codes"]

ROUNDING = {"nearest": "AP_RND_CONV", "floor": "AP_TRN", "toward_zero": "AP_TRN_ZERO"}
_PASSTHROUGH = ("relu", "max_pool2d", "reshape")

# How each integer op reaches hls4ml (see hls_plan), and the ones it cannot.
HLS_LAYERS: dict[str, str] = {
    "quantize": "the input layer's type",
    "requantize": "the result type of the layer it follows",
    "conv2d": "Conv2D (a torch Conv2d converted by hls4ml)",
    "linear": "Dense (a torch Linear converted by hls4ml)",
    "relu": "Activation relu",
    "max_pool2d": "MaxPooling2D",
    "reshape": "Flatten (to batch, features only)",
    "add": "Merge add (exact in ap_fixed arithmetic; the cast after it is the Merge layer's result type)",
    "concat": "Concatenate along channels (two operands; its result type holds both at the largest binary point)",
    "mul": "Merge multiply (the exact product of two activations of one shape; the cast after it is its result type)",
    "dequantize": "the output (no layer)",
}
UNSUPPORTED: dict[str, str] = {
    "gather": "hls4ml's Embedding layer reads its own weight types; this handoff does not yet map a table of "
              "codes indexed by token ids onto it",
    "padding_mask": "an attention mask is a second, integer, model input; the handoff writes models of one input",
    "select": "a masked score select has no hls4ml layer",
    "scale": "hls4ml's AveragePooling2D divides in its own fixed-point types; this handoff does not yet map "
             "the window sum times a fixed-point reciprocal onto a layer that rounds the same way",
    "adaptive_sum_pool2d": "hls4ml's pooling layers have one window size and stride; an adaptive pool's uneven "
                           "or overlapping windows have no hls4ml layer",
    "sum_pool2d": "hls4ml has AveragePooling2D, but this handoff does not yet map a window sum with a moved "
                  "binary point onto it",
    "matmul": "this handoff does not yet map a product of two activations' codes (two layer inputs, an int64 "
              "sum of products) onto an hls4ml layer",
    "softmax": "hls4ml's Softmax uses its own exp and inverse tables, which round differently from the integer "
               "definition; this handoff does not map one onto the other",
    "layer_norm": "hls4ml's LayerNormalization computes its statistics in its own fixed-point types and table; "
                  "this handoff does not map the integer definition onto it",
    # structural ops
    "transpose": "hls4ml has Permute/Transpose, but this sequential handoff does not yet map one between its "
                 "channels-last layers",
    "slice": "a slice of a value feeds a branch; the handoff writes sequential models",
    "affine": "hls4ml's BatchNormalization scales in its own types; this handoff does not yet map the "
              "fixed-point scale and offset onto it",
    "pad": "hls4ml has ZeroPadding2D, but this handoff does not yet map it",
    "upsample": "hls4ml has UpSampling2D (nearest), but this handoff does not yet map it",
    "clip": "this handoff does not yet map a clamp to constant bounds (ReLU6, Hardtanh, clamp) onto an hls4ml "
            "layer whose output type rounds the bounds as the integer graph does",
    "constant": "the handoff writes sequential models of layers; a constant operand (a class token, a position "
                "embedding) needs a layer of its own",
    "expand": "the handoff writes sequential models of layers; a constant repeated over the batch (a class "
              "token) has no hls4ml layer",
    "lookup": "hls4ml's own Activation tables (sigmoid, tanh, ...) have 1024 entries over [-8, 8) (tanh: "
              "[-4, 4)) computed in float, not one entry per input code rounded to the output format, so they "
              "differ from this table (benchmarks/hls4ml_tables.py counts by how much); the handoff does not yet "
              "write the table as a layer of its own",
}


def require_hls4ml():
    """Import hls4ml, or raise :class:`ImportError` saying how to install it."""
    try:
        import hls4ml
    except ImportError as e:
        raise ImportError("the hls4ml handoff needs hls4ml: pip install 'fxcompile[hls]' "
                          "(or pip install -e '.[hls]' in a checkout)") from e
    return hls4ml


def hls_precision(fmt: FixedPoint, where: str = "format", parameter: bool = False) -> str:
    """The ``ap_[u]fixed<W, I, Q, O>`` string that holds exactly the values of ``fmt``.

    ``parameter=True`` maps stochastic rounding like ``nearest`` (stored parameters are on
    their grid already); otherwise it raises :class:`ExportError`, as does a nonzero zero point.

        >>> hls_precision(fixed(16, 8)), hls_precision(fixed(16, 8, narrow=True))
        ('ap_fixed<16,8,AP_RND_CONV,AP_SAT>', 'ap_fixed<16,8,AP_RND_CONV,AP_SAT_SYM>')
    """
    if fmt.zero_point:
        raise ExportError(f"{where} has format {fmt} with zero point {fmt.zero_point}; ap_fixed types have no "
                          "zero point: give this edge zero_point=0 before the hls4ml handoff")
    if fmt.rounding == "stochastic" and not parameter:
        raise ExportError(f"{where} has format {fmt}: stochastic rounding has no ap_fixed equivalent; give this "
                          "edge (or its role in the policy) rounding 'nearest', 'floor' or 'toward_zero'")
    rounding = ir.stored_format(fmt).rounding
    if fmt.overflow == "wrap":
        overflow = "AP_WRAP"
    elif fmt.signed and fmt.code_min == -fmt.code_max:
        overflow = "AP_SAT_SYM"
    else:
        overflow = "AP_SAT"
    kind = "ap_fixed" if fmt.signed else "ap_ufixed"
    return f"{kind}<{fmt.bits},{fmt.bits - fmt.frac},{ROUNDING[rounding]},{overflow}>"


def _accumulator(width: int, frac: int) -> str:
    # The accumulator never rounds or overflows (its width covers every possible sum), so
    # its modes are irrelevant; truncation/wrap are the cheapest in hardware.
    return f"ap_fixed<{width},{width - frac},AP_TRN,AP_WRAP>"


@dataclasses.dataclass
class HlsLayer:
    """One hls4ml layer: its name (a PyTorch module name), kind and precisions (``ap_fixed`` strings)."""

    name: str
    kind: str
    module: nn.Module | None
    precision: dict[str, str]
    edges: dict[str, str] = dataclasses.field(default_factory=dict)  # precision key → fxcompile edge name
    shape: tuple | None = None  # the input layer's shape without the batch dimension
    inputs: list[str] = dataclasses.field(default_factory=list)  # the layers it reads


def _cast_edges(gm: fx.GraphModule) -> dict[str, object]:
    return {n.name: ir.EDGE.of(n) for n in gm.graph.nodes if ir.EDGE.has(n)}


def _parameter_format(edges, node: fx.Node, index: int):
    arg = node.args[index] if len(node.args) > index else None
    if arg is None:
        return None, None
    edge = edges.get(arg.name)
    if edge is None or edge.forward is None:
        raise ExportError(f"node {node.name!r}: its parameter {arg.name!r} has no fixed-point format")
    return edge, edge.forward


def _accumulator_width(op: IntOp, x_fmt: FixedPoint, where: str) -> int:
    """Bits (with sign) that hold every partial sum of ``op`` for any input in ``x_fmt``."""
    if x_fmt is None:
        raise ExportError(f"{where}: its input has no fixed-point format of its own (an unrounded sum); "
                          "put a cast before it")
    x_max = max(abs(x_fmt.code_min - x_fmt.zero_point), abs(x_fmt.code_max - x_fmt.zero_point))
    w = op.attrs["weight"].abs().flatten(1).sum(1)
    bound = w * x_max
    if op.attrs["bias"] is not None:
        bound = bound + op.attrs["bias"].abs()
    return max(int(bound.max()).bit_length() + 1, 2)


def _torch_layer(op: IntOp, x_frac: int, in_channels: int) -> nn.Module:
    weight = op.attrs["weight"].double() * 2.0 ** -(op.frac - x_frac)
    groups = op.attrs.get("groups", 1)
    if groups != 1:  # hls4ml gets the dense conv whose weight is zero off each group's block
        o, cg = weight.shape[:2]
        dense = weight.new_zeros(o, cg * groups, *weight.shape[2:])
        for g in range(groups):
            dense[g * (o // groups):(g + 1) * (o // groups), g * cg:(g + 1) * cg] = \
                weight[g * (o // groups):(g + 1) * (o // groups)]
        weight = dense
    bias = None if op.attrs["bias"] is None else op.attrs["bias"].double() * 2.0 ** -op.frac
    if op.op == "linear":
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        layer = nn.Conv2d(in_channels, weight.shape[0], tuple(weight.shape[2:]), stride=op.attrs["stride"],
                          padding=op.attrs["padding"], dilation=op.attrs["dilation"], bias=bias is not None)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def hls_plan(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> tuple[IntegerGraph, list[HlsLayer]]:
    """The integer graph of ``qmodel`` and the hls4ml layers (with precisions) that compute it.

    The layers form a graph: each names the layers it reads (``inputs``), so residual adds
    and products become hls4ml ``Merge`` layers and concatenations ``Concatenate`` layers.
    Raises :class:`ExportError` for what hls4ml's layers cannot express (more than one input
    or output, average pooling, a cast not right after a layer, a concatenation along another
    axis, a broadcasting product) and for formats without an ``ap_fixed`` equivalent (naming
    the edge and the format).
    """
    if not isinstance(qmodel, fx.GraphModule):
        raise ExportError(f"expected a model compiled with fxc.compile, got {type(qmodel).__name__}")
    folded = fold_bn(qmodel)
    graph = lower(folded, tuple(example_inputs))
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ExportError(f"the hls4ml handoff takes one input and one output, got inputs {graph.inputs} "
                          f"and outputs {graph.outputs}")
    edges = _cast_edges(folded)
    nodes = {n.name: n for n in folded.graph.nodes}
    layers: list[HlsLayer] = []
    fmts: dict[str, FixedPoint | None] = {}     # value name → format of its hls4ml type (None: accumulator)
    types: dict[str, str] = {}                  # value name → hls4ml type string
    channels: dict[str, int] = {}
    produced_by: dict[str, HlsLayer] = {}
    users = collections.Counter(i for op in graph.ops for i in op.inputs)

    for op in graph.ops:
        edge = edges.get(op.source)
        where = f"edge {edge.name!r}" if edge is not None else f"node {op.source!r}"
        if op.op == "quantize":
            shape = graph.input_shapes[0]
            layer = HlsLayer("input", "input", None, {"result": hls_precision(op.fmt, where)}, {"result": edge.name},
                             shape=tuple(shape[1:]))
            fmts[op.out], types[op.out], channels[op.out] = op.fmt, layer.precision["result"], shape[1]
        elif op.op == "requantize":
            src = op.inputs[0]
            layer = produced_by.get(src)
            if layer is None or users[src] != 1 or layer.kind == "input":
                raise ExportError(f"{where}: a cast that does not directly follow a conv, linear, ReLU or pooling "
                                  "layer has no hls4ml layer to carry it; hls4ml rounds only at layer outputs")
            layer.precision["result"] = hls_precision(op.fmt, where)
            layer.edges["result"] = edge.name
            fmts[op.out], types[op.out], channels[op.out] = op.fmt, layer.precision["result"], channels[src]
            produced_by[op.out] = layer
            continue
        elif op.op in ("linear", "conv2d"):
            x = op.inputs[0]
            node = nodes[op.source]
            w_edge, w_fmt = _parameter_format(edges, node, 1)
            b_edge, b_fmt = _parameter_format(edges, node, 2)
            x_frac = graph.op_of(x).frac
            width = _accumulator_width(op, fmts[x], f"node {op.source!r} ({op.op})")
            accum = _accumulator(width, op.frac)
            precision = {"weight": hls_precision(w_fmt, f"edge {w_edge.name!r}", parameter=True),
                         "accum": accum, "result": accum}
            names = {"weight": w_edge.name}
            if b_fmt is not None:
                precision["bias"] = hls_precision(b_fmt, f"edge {b_edge.name!r}", parameter=True)
                names["bias"] = b_edge.name
            module = _torch_layer(op, x_frac, channels[x])
            layer = HlsLayer(op.source, op.op, module, precision, names, inputs=[produced_by[x].name])
            fmts[op.out], types[op.out] = None, accum
            channels[op.out] = op.attrs["weight"].shape[0]
        elif op.op in _PASSTHROUGH:
            x = op.inputs[0]
            if op.op == "relu":
                module = nn.ReLU()
            elif op.op == "max_pool2d":
                module = nn.MaxPool2d(op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"],
                                      op.attrs["dilation"])
            else:
                if list(op.attrs["shape"][2:]):
                    raise ExportError(f"node {op.source!r}: only a flatten to (batch, features) converts to hls4ml")
                if produced_by[x].kind == "input":
                    # flattening the input is the caller's reshape: hls4ml takes a flat input
                    # (its channels-last conversion of a leading flatten permutes weights wrongly)
                    produced_by[x].shape = tuple(op.attrs["shape"][1:])
                    fmts[op.out], types[op.out], channels[op.out] = fmts[x], types[x], channels[x]
                    produced_by[op.out] = produced_by[x]
                    continue
                module = nn.Flatten()
            layer = HlsLayer(op.source, op.op, module, {"result": types[x]}, inputs=[produced_by[x].name])
            if op.op == "max_pool2d":
                layer.precision["accum"] = types[x]
            fmts[op.out], types[op.out], channels[op.out] = fmts[x], types[x], channels[x]
        elif op.op == "add":
            a, b = op.inputs
            width = _sum_width(op, (fmts[a], fmts[b]), f"node {op.source!r} (add)")
            layer = HlsLayer(op.source, "add", None, {"result": _accumulator(width, op.frac)},
                             inputs=[produced_by[a].name, produced_by[b].name])
            fmts[op.out], types[op.out], channels[op.out] = None, layer.precision["result"], channels[a]
        elif op.op == "concat":
            layer = _concat_layer(op, graph, fmts, types, produced_by, where)
            fmts[op.out], types[op.out] = _concat_codes(op, [fmts[i] for i in op.inputs]), layer.precision["result"]
            channels[op.out] = sum(channels[i] for i in op.inputs)
        elif op.op == "mul":
            a, b = op.inputs
            if graph.shapes[a] != graph.shapes[b]:
                raise ExportError(f"node {op.source!r} (mul): hls4ml's Multiply (Merge) layer multiplies operands of "
                                  f"one shape, got {tuple(graph.shapes[a])} and {tuple(graph.shapes[b])} (broadcasting)")
            width = _product_width((fmts[a], fmts[b]), f"node {op.source!r} (mul)")
            layer = HlsLayer(op.source, "mul", None, {"result": _accumulator(width, op.frac)},
                             inputs=[produced_by[a].name, produced_by[b].name])
            fmts[op.out], types[op.out], channels[op.out] = None, layer.precision["result"], channels[a]
        elif op.op == "dequantize":
            continue
        else:
            why = f" ({UNSUPPORTED[op.op]})" if op.op in UNSUPPORTED else ""
            raise ExportError(f"node {op.source!r} ({op.op}) has no hls4ml layer in this handoff{why}; it converts "
                              f"graphs of {', '.join(('conv2d', 'linear', 'add', 'mul', 'concat') + _PASSTHROUGH)}")
        layers.append(layer)
        produced_by[op.out] = layer
    return graph, _copy_shared_input(layers)


def _copy_shared_input(layers: list[HlsLayer]) -> list[HlsLayer]:
    """hls4ml's channels-last conversion transposes an image input for its first reader only;
    when several layers read it, they read a copy (a ZeroPadding2D with no padding) instead."""
    source = layers[0]
    readers = [layer for layer in layers if source.name in layer.inputs]
    if len(readers) < 2 or len(source.shape) != 3:
        return layers
    copy = HlsLayer(f"{source.name}_copy", "copy", nn.ConstantPad2d(0, 0.0), {"result": source.precision["result"]},
                    inputs=[source.name])
    for layer in readers:
        layer.inputs = [copy.name if i == source.name else i for i in layer.inputs]
    return [source, copy] + layers[1:]


def _sum_width(op: IntOp, operands, where: str) -> int:
    """Bits (with sign) of the exact sum of ``operands`` (formats) at the binary point ``op.frac``."""
    if any(f is None for f in operands):
        raise ExportError(f"{where}: an operand has no fixed-point format of its own (an unrounded sum); "
                          "put a cast before it")
    largest = sum(max(abs(f.code_min - f.zero_point), abs(f.code_max - f.zero_point)) << (op.frac - f.frac)
                  for f in operands)
    return largest.bit_length() + 1


def _product_width(operands, where: str) -> int:
    """Bits (with sign) of the exact product of two codes of the formats ``operands``."""
    if any(f is None for f in operands):
        raise ExportError(f"{where}: an operand has no fixed-point format of its own (an unrounded sum); "
                          "put a cast before it")
    a, b = ([f.code_min - f.zero_point, f.code_max - f.zero_point] for f in operands)
    return max(_signed_bits(x * y) for x in a for y in b)


def _signed_bits(v: int) -> int:
    """Bits of the smallest two's-complement integer that holds ``v``."""
    return (v if v >= 0 else -v - 1).bit_length() + 1


@dataclasses.dataclass(frozen=True)
class _Codes:
    """The codes a value can take (at binary point ``frac``), where no format names them."""

    code_min: int
    code_max: int
    frac: int
    zero_point: int = 0


def _concat_codes(op: IntOp, operands) -> FixedPoint | _Codes:
    """The codes of ``concat``'s result: its operands' codes shifted to the largest binary point."""
    if op.fmt is not None:
        return op.fmt
    shifted = [(f.code_min - f.zero_point) << s for f, s in zip(operands, op.attrs["shifts"])] + \
              [(f.code_max - f.zero_point) << s for f, s in zip(operands, op.attrs["shifts"])]
    return _Codes(min(shifted), max(shifted), op.frac)


def _concat_layer(op: IntOp, graph: IntegerGraph, fmts, types, produced_by, where: str) -> HlsLayer:
    """hls4ml's Concatenate along channels; its result type holds every operand's values exactly
    at the largest binary point (the operands' own type when they share one)."""
    shape = graph.shapes[op.out]
    axis = op.attrs["axis"] % len(shape) if shape is not None else op.attrs["axis"]
    if len(op.inputs) != 2 or axis != 1 or shape is None or len(shape) not in (2, 4):
        raise ExportError(f"{where} (concat): hls4ml's Concatenate layer joins two values along the channels "
                          f"(axis 1 of a (batch, channels, height, width) or (batch, features) value); got "
                          f"{len(op.inputs)} operands along axis {op.attrs['axis']} of shape {shape}")
    operands = [fmts[i] for i in op.inputs]
    if any(f is None for f in operands):
        raise ExportError(f"{where} (concat): an operand has no fixed-point format of its own (an unrounded "
                          "sum); put a cast before it")
    if len({types[i] for i in op.inputs}) == 1 and not any(op.attrs["shifts"]):
        result = types[op.inputs[0]]
    else:
        codes = _concat_codes(op, operands)
        result = _accumulator(max(_signed_bits(codes.code_min), _signed_bits(codes.code_max)), op.frac)
    return HlsLayer(op.source, "concat", None, {"result": result}, inputs=[produced_by[i].name for i in op.inputs])


_MERGES = {"add": operator.add, "mul": operator.mul}


def _torch_graph(layers: list[HlsLayer]) -> fx.GraphModule:
    """The layers as a PyTorch graph for hls4ml's front-end; a merge layer's name becomes its
    fx node's name (which is how hls4ml names it)."""
    root, graph, env = nn.Module(), fx.Graph(), {}
    for layer in layers:
        if layer.kind == "input":
            env[layer.name] = graph.placeholder("x")
        elif layer.module is not None:
            root.add_module(layer.name, layer.module)
            env[layer.name] = graph.call_module(layer.name, tuple(env[i] for i in layer.inputs))
        else:
            if layer.kind == "concat":  # named "cat", with the axis as a keyword, as hls4ml's front-end reads it
                node = graph.call_function(torch.cat, (tuple(env[i] for i in layer.inputs),), {"dim": 1})
            else:
                node = graph.call_function(_MERGES[layer.kind], tuple(env[i] for i in layer.inputs))
            old, layer.name = layer.name, node.name
            env[layer.name] = node
            for later in layers:  # the layers after it read it under its new name
                later.inputs = [layer.name if i == old else i for i in later.inputs]
    graph.output(env[layers[-1].name])
    return fx.GraphModule(root, graph)


def to_hls4ml(qmodel: fx.GraphModule, output_dir: str | os.PathLike, example_inputs: Sequence[torch.Tensor],
              backend: str = "Vivado", project_name: str = "myproject", part: str | None = None,
              clock_period: float = 5, write: bool = True, reuse_factor: int | None = None):
    """Convert ``qmodel`` to an hls4ml ``ModelGraph`` in ``output_dir`` and (``write``) write the project.

    The result's C simulation (``hls_model.compile()``, ``hls_model.predict(x)``) gives the
    integer reference's outputs bit for bit; ``x`` is in PyTorch's layout (channels first).
    The project is ``io_parallel`` with the ``Latency`` strategy; ``reuse_factor`` (each
    multiplier serves that many products) defaults to the ``hls4ml_reuse_factor`` the model's
    ``fxc.auto`` policy budgeted DSPs with, else 1, so that the project uses what the budget
    counted.  ``backend`` (checked: ``Vivado``), ``part`` and ``clock_period`` go to hls4ml
    unchanged.
    """
    hls4ml = require_hls4ml()
    reuse_factor = deployed_reuse_factor(qmodel, reuse_factor)
    graph, layers = hls_plan(qmodel, example_inputs)
    model = _torch_graph(layers)
    input_shape = layers[0].shape
    config = hls4ml.utils.config_from_pytorch_model(
        model, input_shape, granularity="name", backend=backend, default_precision=layers[0].precision["result"],
        # 'full': the design takes PyTorch's channels-first input and transposes it itself; it
        # also brings the weights (dense ones too) into hls4ml's layout
        default_reuse_factor=reuse_factor, channels_last_conversion="full")
    layer_config = config["LayerName"]
    input_name = next(iter(n for n in layer_config if n not in {l.name for l in layers}))
    for layer in layers:
        name = input_name if layer.kind == "input" else layer.name
        layer_config.setdefault(name, {}).setdefault("Precision", {}).update(layer.precision)
        for key, value in list(layer_config[name]["Precision"].items()):
            if value == "auto":
                raise ExportError(f"hls4ml layer {name!r} has a precision {key!r} this handoff does not set")
    kwargs = {"part": part} if part else {}
    hls_model = hls4ml.converters.convert_from_pytorch_model(
        model, hls_config=config, output_dir=str(output_dir), project_name=project_name, backend=backend,
        io_type="io_parallel", clock_period=clock_period, **kwargs)
    if write:
        hls_model.write()
    return hls_model


def deployed_reuse_factor(qmodel: fx.GraphModule, reuse_factor: int | None = None) -> int:
    """``reuse_factor``, checked, or by default the ``hls4ml_reuse_factor`` of the ``fxc.auto``
    policy ``qmodel`` was compiled under (1 for other policies)."""
    if reuse_factor is None:
        reuse_factor = getattr(ir.POLICY.get(qmodel), "hls4ml_reuse_factor", 1)
    if isinstance(reuse_factor, bool) or not isinstance(reuse_factor, int) or reuse_factor < 1:
        raise ExportError(f"to_hls4ml: reuse_factor must be a positive int, got {reuse_factor!r}")
    return reuse_factor


def predict_codes(hls_model, x: torch.Tensor, frac: int) -> torch.Tensor:
    """Run ``hls_model``'s C simulation on ``x`` (float, PyTorch layout) and return the output
    codes at binary point ``frac`` (int64, one row per input)."""
    import numpy as np
    data = np.ascontiguousarray(x.detach().double().reshape(len(x), -1).numpy())
    y = np.asarray(hls_model.predict(data), dtype=np.float64).reshape(len(x), -1)
    return torch.from_numpy(np.round(y * 2.0 ** frac).astype(np.int64))
