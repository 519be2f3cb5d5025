"""Inspect a compiled model: its Assignment as data, a text table, a Graphviz DOT graph."""

from __future__ import annotations

import torch.fx as fx

from ..core import ir
from ..core.assignment import Assignment, Edge

__all__ = ["assignment", "inspect", "to_dot"]


def _prefixed(edge: Edge, prefix: str) -> Edge:
    if not prefix:
        return edge
    import dataclasses
    consumer = edge.consumer if edge.consumer == "*" else prefix + edge.consumer
    return dataclasses.replace(edge, producer=prefix + edge.producer, consumer=consumer)


def assignment(qmodel: fx.GraphModule) -> Assignment:
    """Every edge of ``qmodel`` with its role and forward/backward formats."""
    edges = []
    for prefix, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            value = ir.VALUE.get(node)
            if value is None:
                continue
            edges.append(_prefixed(value, prefix))
            edges.extend(_prefixed(e, prefix) for e in ir.USES.get(node, {}).values())
    return Assignment(edges)


def inspect(qmodel: fx.GraphModule) -> str:
    """A text report: front-end, policy, the edge table, the distinct formats used, and the
    overflow/underflow/NaN counters of edges where telemetry counted any."""
    a = assignment(qmodel)
    policy = ir.POLICY.get(qmodel)
    fmts = sorted(a.formats())
    lines = [f"graph captured by: {ir.FRONTEND.get(qmodel, '?')}",
             f"policy: {getattr(policy, 'name', None) or repr(policy)}",
             f"edges: {len(a)}  casts: {sum(len(list(gm.casts.children())) for _, gm in ir.graphs(qmodel) if hasattr(gm, 'casts'))}"
             f"  distinct formats: {len(fmts)} ({', '.join(f'{b}.{f}' for b, f in fmts)})",
             "", a.table()]
    if ir.SOLUTION.has(qmodel):  # chosen by the cost model: predicted noise, stats, hardware
        from .profile import assignment_report
        lines += ["", assignment_report(qmodel)]
    from ..runtime.telemetry import table  # counters, when telemetry is on (fxcompile.runtime.telemetry.enable)
    counts = table(qmodel)
    if counts:
        lines += ["", counts]
    return "\n".join(lines)


def _dot_label(node: fx.Node) -> str:
    edge = ir.EDGE.get(node)
    if edge is not None:
        return f"cast {edge.forward or 'float'} / {edge.backward or 'float'}\\n{edge.role}"
    return f"{node.name}\\n{ir.OP.get(node, node.op)}"


def to_dot(qmodel: fx.GraphModule) -> str:
    """Graphviz DOT source of the rewritten graph(s); casts drawn as small boxes."""
    lines = ["digraph fxcompile {", "  rankdir=TB; node [fontsize=10, fontname=Helvetica];"]
    for prefix, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            nid = f'"{prefix}{node.name}"'
            style = "shape=box, style=filled, fillcolor=lightyellow" if ir.EDGE.has(node) else "shape=ellipse"
            lines.append(f'  {nid} [label="{_dot_label(node)}", {style}];')
            for arg in node.all_input_nodes:
                lines.append(f'  "{prefix}{arg.name}" -> {nid};')
    lines.append("}")
    return "\n".join(lines)
