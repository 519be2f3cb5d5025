"""Inspect a compiled model: its Assignment as data, a text table, a Graphviz DOT graph, an SVG."""

from __future__ import annotations

import dataclasses
import html

import torch
import torch.fx as fx

from ..core import ir, ops
from ..core.assignment import Assignment, Edge

__all__ = ["assignment", "inspect", "compact_table", "to_dot", "to_svg", "format_colours", "boundary_ops",
           "fixed_point_definitions"]


def _prefixed(edge: Edge, prefix: str) -> Edge:
    if not prefix:
        return edge
    consumer = edge.consumer if edge.consumer == "*" else prefix + edge.consumer
    return dataclasses.replace(edge, producer=prefix + edge.producer, consumer=consumer)


def _loss_shapes(qmodel: fx.GraphModule) -> dict[str, tuple]:
    """Shapes of the loss graph's values, which is traced without example inputs: run it on a
    zero prediction of the model's output shape and a class-index target (or, when the loss
    rejects that, a target shaped like the prediction).  ``{}`` when the shape is unknown."""
    out = next(n for n in qmodel.graph.nodes if n.op == "output").args[0]
    while isinstance(out, fx.Node) and "tensor_meta" not in out.meta and out.all_input_nodes:
        out = out.all_input_nodes[0]   # the casts after the last op keep its shape
    meta = out.meta.get("tensor_meta") if isinstance(out, fx.Node) else None
    if not hasattr(meta, "shape"):
        return {}
    prediction = torch.zeros(tuple(meta.shape), dtype=meta.dtype)
    shapes: dict[str, tuple] = {}

    class Record(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                shapes[node.name] = tuple(result.shape)
            return result

    for target in (torch.zeros(prediction.shape[:1], dtype=torch.long), torch.zeros_like(prediction)):
        shapes.clear()
        try:
            with torch.no_grad():
                Record(qmodel.loss).run(prediction, target)
            return dict(shapes)
        except Exception:  # noqa: BLE001 - a loss that wants another target: try the next kind
            continue
    return {}


def assignment(qmodel: fx.GraphModule) -> Assignment:
    """Every edge of ``qmodel`` with its role and forward/backward formats."""
    edges = []
    for prefix, gm in ir.graphs(qmodel):
        shapes = _loss_shapes(qmodel) if prefix == "loss." else {}
        for node in gm.graph.nodes:
            value = ir.VALUE.get(node)
            if value is None:
                continue
            found = [value, *ir.USES.get(node, {}).values()]
            if shapes:
                found = [dataclasses.replace(e, shape=e.shape or shapes.get(e.producer)) for e in found]
            edges.extend(_prefixed(e, prefix) for e in found)
    return Assignment(edges)


def compact_table(a: Assignment) -> str:
    """One row per value: its producer, op, role, formats and shape, with the consumers whose
    edge has the value's formats listed under ``uses``; a use with formats of its own gets a
    row of its own (``  ->consumer``) under its value.  The full table is ``a.table()``::

        value  op      role            forward  backward            shape      uses
        conv1  Conv2d  activation_out  16.8     16.10 (gradient)    2x32x28x28 relu1
    """
    values = [e for e in a if e.consumer == "*"]
    uses: dict[str, list[Edge]] = {}
    for e in a:
        if e.consumer != "*":
            uses.setdefault(e.producer, []).append(e)
    shape = lambda e: ("x".join(map(str, e.shape)) or "scalar") if e.shape is not None else "?"  # noqa: E731
    rows = [("value", "op", "role", "forward", "backward", "shape", "uses")]
    for v in values:
        same = [u for u in uses.get(v.producer, []) if (u.forward, u.backward) == (v.forward, v.backward)]
        other = [u for u in uses.get(v.producer, []) if u not in same]
        rows.append((v.producer, v.op, v.role, str(v.forward or "float"), f"{v.backward or 'float'} ({v.backward_role})",
                     shape(v), ", ".join(u.consumer for u in same)))
        for u in other:
            rows.append((f"  ->{u.consumer}", u.op, u.role, str(u.forward or "float"),
                         f"{u.backward or 'float'} ({u.backward_role})", shape(u), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def inspect(qmodel: fx.GraphModule, edges: bool = False) -> str:
    """A text report: front-end, policy, the value table (``edges=True``: one row per edge),
    the distinct formats used, and the overflow/underflow/NaN counters of edges where
    telemetry counted any."""
    a = assignment(qmodel)
    policy = ir.POLICY.get(qmodel)
    fmts = sorted(a.formats())
    reason = ir.FRONTEND_REASON.get(qmodel)
    lines = [f"graph captured by: {ir.FRONTEND.get(qmodel, '?')}" + (f" ({reason})" if reason else ""),
             *boundary_ops(qmodel),
             *fixed_point_definitions(qmodel),
             f"policy: {getattr(policy, 'name', None) or repr(policy)}"
             + (f"  loss scale: {ir.LOSS_SCALE.of(qmodel):g}" if ir.LOSS_SCALE.get(qmodel, 1) != 1 else ""),
             f"edges: {len(a)}  casts: {sum(len(list(gm.casts.children())) for _, gm in ir.graphs(qmodel) if hasattr(gm, 'casts'))}"
             f"  distinct formats: {len(fmts)} ({', '.join(f'{b}.{f}' for b, f in fmts)})",
             "", a.table() if edges else compact_table(a)]
    if ir.SOLUTION.has(qmodel):  # chosen by the cost model: predicted noise, stats, hardware
        from .profile import assignment_report
        lines += ["", assignment_report(qmodel)]
    from ..runtime.telemetry import table  # counters, when telemetry is on (fxcompile.runtime.telemetry.enable)
    counts = table(qmodel)
    if counts:
        lines += ["", counts]
    return "\n".join(lines)


# one light colour per (bits, frac); float edges stay white
PALETTE = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
           "#e7ba52", "#bcbd22", "#17becf")


def format_colours(qmodel: fx.GraphModule) -> dict[str, str]:
    """``{"16.8": "#aec7e8", ...}``: the colour of each forward (bits.frac) format's casts."""
    keys = sorted({_format_key(ir.EDGE.of(n).forward) for _, gm in ir.graphs(qmodel) for n in gm.graph.nodes
                   if ir.EDGE.has(n)} - {None}, key=lambda k: tuple(int(v) for v in k.split(".")))
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


def _format_key(fmt) -> str | None:
    return None if fmt is None else f"{fmt.bits}.{fmt.frac}"
# ops computed in floating point inside, their inputs and outputs cast: attention (a softmax
# between two products), recurrent cells; a product-sum alone (einsum, matmul, linear) is exact
# up to its output cast, like any multiply-accumulate
_FLOAT_INSIDE = ("scaled_dot_product_attention", "multi_head_attention", "MultiheadAttention", "lstm", "gru", "rnn")


def boundary_ops(qmodel: fx.GraphModule) -> list[str]:
    """One line naming the leaf modules and ops quantized only at their boundary, if any."""
    names = []
    for node in qmodel.graph.nodes:
        op = str(ir.OP.get(node, ""))
        known = ops.op_of(qmodel, node)
        # a smooth function left as it is (no lookup table) runs in float between its casts
        leaf = node.op == "call_module" and not str(node.target).startswith("casts.") and known is None
        if leaf or (known is not None and known.name in ops.LOOKUP_OPS) \
                or any(k.lower() in op.lower() for k in _FLOAT_INSIDE):
            names.append(f"{ir.MODULE.get(node, node.target if leaf else node.name)} ({op})")
    return [f"quantized at their boundary only (float inside): {', '.join(dict.fromkeys(names))}"] if names else []


def fixed_point_definitions(qmodel: fx.GraphModule) -> list[str]:
    """Lines naming the nonlinearities that run as a lookup table (with its input and output
    formats) or as a clip on codes, if any."""
    tables, clips = [], []
    for node in qmodel.graph.nodes:
        known = ops.op_of(qmodel, node)
        if known is not None and known.name == "lookup":
            name, _, in_spec, out_spec = node.args[1:5]
            fmt_in, fmt_out = _spec_format(qmodel, node.args[0]), _spec_format(qmodel, next(iter(node.users)))
            tables.append(f"{ir.MODULE.get(node, node.name)} ({name} {fmt_in} -> {fmt_out})")
        elif known is not None and known.name in ops.CLIP_OPS:
            clips.append(f"{ir.MODULE.get(node, node.name)} ({ir.OP.get(node, known.name)})")
    return [f"{title}: {_some(names)}" for title, names in (("lookup tables", tables), ("clips on codes", clips))
            if names]


def _some(names: list[str], shown: int = 6) -> str:
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown])}, ... ({len(names)} in all)"


def _spec_format(qmodel: fx.GraphModule, cast: fx.Node) -> str:
    # the format of the cast a lookup reads from or writes to (its spec is the node's argument)
    while ir.EDGE.has(cast) and ir.EDGE.of(cast).forward is None and isinstance(cast.args[0], fx.Node):
        cast = cast.args[0]
    edge = ir.EDGE.get(cast)
    return str(edge.forward) if edge is not None and edge.forward is not None else "?"


def _dot_label(node: fx.Node) -> str:
    edge = ir.EDGE.get(node)
    if edge is not None:
        return f"cast {edge.forward or 'float'} / {edge.backward or 'float'}\\n{edge.role}"
    return f"{node.name}\\n{ir.OP.get(node, node.op)}"


def to_dot(qmodel: fx.GraphModule) -> str:
    """Graphviz DOT source of the rewritten graph(s); casts drawn as small boxes, coloured by
    their forward format (:func:`format_colours`)."""
    colours = format_colours(qmodel)
    lines = ["digraph fxcompile {", "  rankdir=TB; node [fontsize=10, fontname=Helvetica];"]
    for prefix, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            nid = f'"{prefix}{node.name}"'
            edge = ir.EDGE.get(node)
            style = (f"shape=box, style=filled, fillcolor=\"{colours.get(_format_key(edge.forward), 'white')}\""
                     if edge is not None else "shape=ellipse")
            lines.append(f'  {nid} [label="{_dot_label(node)}", {style}];')
            for arg in node.all_input_nodes:
                lines.append(f'  "{prefix}{arg.name}" -> {nid};')
    lines.append("}")
    return "\n".join(lines)


def to_svg(qmodel: fx.GraphModule) -> str:
    """SVG drawing of the rewritten graph(s), with no dependency: each node one layer above
    its first consumer (so a weight and its cast sit just above their layer), casts as boxes coloured by forward format with a legend on top
    (the loss graph is drawn right of the model's).  ``to_dot`` gives the same graph for
    Graphviz::

        Path("graph.svg").write_text(fxc.to_svg(qmodel))
    """
    colours = format_colours(qmodel)
    W, H, GAP_X, GAP_Y, TOP = 150, 34, 20, 26, 40 + 20 * ((len(colours) + 4) // 5)
    boxes, lines, x0, height = [], [], 20, TOP
    for prefix, gm in ir.graphs(qmodel):
        layer: dict[fx.Node, int] = {}
        for node in gm.graph.nodes:  # fx keeps nodes in topological order
            layer[node] = 1 + max((layer[a] for a in node.all_input_nodes), default=-1)
        depth = max(layer.values())
        for node in reversed(gm.graph.nodes):  # as late as possible: a weight sits just above its use
            layer[node] = min((layer[u] for u in node.users), default=depth + 1) - 1
        rows: dict[int, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            rows.setdefault(layer[node], []).append(node)
        pos = {n: (x0 + i * (W + GAP_X), TOP + k * (H + GAP_Y)) for k, row in rows.items() for i, n in enumerate(row)}
        for node, (x, y) in pos.items():
            edge = ir.EDGE.get(node)
            if edge is not None:
                fill = colours.get(_format_key(edge.forward), "white")
                text = (f"cast {edge.forward or 'float'} / {edge.backward or 'float'}", edge.role)
                boxes.append(f'<g class="cast" data-node="{html.escape(prefix + node.name)}" '
                             f'data-format="{_format_key(edge.forward) or "float"}"><rect x="{x}" y="{y}" width="{W}" '
                             f'height="{H}" fill="{fill}" stroke="#555"/>')
            else:
                text = (prefix + node.name, str(ir.OP.get(node, node.op)))
                boxes.append(f'<g class="node" data-node="{html.escape(prefix + node.name)}"><rect x="{x}" y="{y}" '
                             f'width="{W}" height="{H}" rx="14" fill="white" stroke="#555"/>')
            boxes.append(f'<text x="{x + W / 2}" y="{y + 14}">{html.escape(text[0][:28])}</text>'
                         f'<text x="{x + W / 2}" y="{y + 27}" class="small">{html.escape(text[1][:30])}</text></g>')
            for a in node.all_input_nodes:
                ax, ay = pos[a]
                lines.append(f'<line x1="{ax + W / 2}" y1="{ay + H}" x2="{x + W / 2}" y2="{y}" marker-end="url(#arrow)"/>')
        x0 = max(x for x, _ in pos.values()) + W + 3 * GAP_X
        height = max(height, max(y for _, y in pos.values()) + H + GAP_Y)
    legend = ['<text x="20" y="22" class="title">casts by forward format</text>']
    for i, (key, fill) in enumerate(colours.items()):
        lx, ly = 20 + (i % 5) * 110, 30 + 20 * (i // 5)
        legend.append(f'<g class="legend" data-format="{key}"><rect x="{lx}" y="{ly}" width="14" height="14" '
                      f'fill="{fill}" stroke="#555"/><text x="{lx + 20}" y="{ly + 11}" class="left">{key}</text></g>')
    width = max(x0, 600)
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>',
        '<style>text{text-anchor:middle} text.small{font-size:9px;fill:#444} text.left{text-anchor:start} '
        'text.title{text-anchor:start;font-weight:bold} line{stroke:#888}</style></defs>',
        *legend, *lines, *boxes, "</svg>"])
