"""Inspect a compiled model: its Assignment as data, a text table, a Graphviz DOT graph."""

from __future__ import annotations

import torch.fx as fx

from ..core.assignment import Assignment, Edge

__all__ = ["assignment", "inspect", "to_dot", "graphs", "boundary_ops"]


def graphs(qmodel: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The compiled graphs: the model's, and the loss graph's when there is one."""
    out = [("", qmodel)]
    if isinstance(getattr(qmodel, "loss", None), fx.GraphModule):
        out.append(("loss.", qmodel.loss))
    return out


def _prefixed(edge: Edge, prefix: str) -> Edge:
    if not prefix:
        return edge
    import dataclasses
    consumer = edge.consumer if edge.consumer == "*" else prefix + edge.consumer
    return dataclasses.replace(edge, producer=prefix + edge.producer, consumer=consumer)


def assignment(qmodel: fx.GraphModule) -> Assignment:
    """Every edge of ``qmodel`` with its role and forward/backward formats."""
    edges = []
    for prefix, gm in graphs(qmodel):
        for node in gm.graph.nodes:
            value = node.meta.get("fxc_value")
            if value is None:
                continue
            edges.append(_prefixed(value, prefix))
            edges.extend(_prefixed(e, prefix) for e in node.meta.get("fxc_uses", {}).values())
    return Assignment(edges)


def inspect(qmodel: fx.GraphModule) -> str:
    """A text report: front-end, policy, the edge table, the distinct formats used, and the
    overflow/underflow/NaN counters of edges where telemetry counted any."""
    a = assignment(qmodel)
    policy = qmodel.meta.get("fxc_policy")
    fmts = sorted(a.formats())
    reason = qmodel.meta.get("fxc_frontend_reason")
    lines = [f"graph captured by: {qmodel.meta.get('fxc_frontend', '?')}" + (f" ({reason})" if reason else ""),
             *boundary_ops(qmodel),
             f"policy: {getattr(policy, 'name', None) or repr(policy)}",
             f"edges: {len(a)}  casts: {sum(len(list(gm.casts.children())) for _, gm in graphs(qmodel) if hasattr(gm, 'casts'))}"
             f"  distinct formats: {len(fmts)} ({', '.join(f'{b}.{f}' for b, f in fmts)})",
             "", a.table()]
    if "fxc_solution" in qmodel.meta:  # chosen by the cost model: predicted noise, stats, hardware
        from .profile import assignment_report
        lines += ["", assignment_report(qmodel)]
    from ..runtime.telemetry import table  # counters, when telemetry is on (fxcompile.runtime.telemetry.enable)
    counts = table(qmodel)
    if counts:
        lines += ["", counts]
    return "\n".join(lines)


# ops computed in floating point inside, their inputs and outputs cast: attention (a softmax
# between two products), recurrent cells; a product-sum alone (einsum, matmul, linear) is exact
# up to its output cast, like any multiply-accumulate
_FLOAT_INSIDE = ("scaled_dot_product_attention", "multi_head_attention", "MultiheadAttention", "lstm", "gru", "rnn")


def boundary_ops(qmodel: fx.GraphModule) -> list[str]:
    """One line naming the leaf modules and ops quantized only at their boundary, if any."""
    names = []
    for node in qmodel.graph.nodes:
        op = str(node.meta.get("fxc_op", ""))
        leaf = node.op == "call_module" and not str(node.target).startswith("casts.")
        if leaf or any(k.lower() in op.lower() for k in _FLOAT_INSIDE):
            names.append(f"{node.meta.get('fxc_module', node.target if leaf else node.name)} ({op})")
    return [f"quantized at their boundary only (float inside): {', '.join(dict.fromkeys(names))}"] if names else []


def _dot_label(node: fx.Node) -> str:
    edge = node.meta.get("fxc_edge")
    if edge is not None:
        return f"cast {edge.forward or 'float'} / {edge.backward or 'float'}\\n{edge.role}"
    return f"{node.name}\\n{node.meta.get('fxc_op', node.op)}"


def to_dot(qmodel: fx.GraphModule) -> str:
    """Graphviz DOT source of the rewritten graph(s); casts drawn as small boxes."""
    lines = ["digraph fxcompile {", "  rankdir=TB; node [fontsize=10, fontname=Helvetica];"]
    for prefix, gm in graphs(qmodel):
        for node in gm.graph.nodes:
            nid = f'"{prefix}{node.name}"'
            style = "shape=box, style=filled, fillcolor=lightyellow" if "fxc_edge" in node.meta else "shape=ellipse"
            lines.append(f'  {nid} [label="{_dot_label(node)}", {style}];')
            for arg in node.all_input_nodes:
                lines.append(f'  "{prefix}{arg.name}" -> {nid};')
    lines.append("}")
    return "\n".join(lines)
