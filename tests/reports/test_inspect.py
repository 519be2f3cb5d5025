"""inspect (text report) and to_dot (Graphviz DOT) of a compiled model."""
import re

import pytest

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN
from fxcompile.passes.casts import cast_nodes
from tests.helpers import compiled_with_loss


def test_inspect_lists_every_edge_with_node_op_role_formats_and_shape():
    q = compiled_with_loss()
    text = fxc.inspect(q)
    assert "graph captured by: fx" in text
    assert "policy: baseline" in text
    a = fxc.assignment(q)
    header = next(line for line in text.splitlines() if line.startswith("edge "))
    assert header.split() == ["edge", "op", "role", "forward", "backward", "shape"]
    for edge in a:
        assert re.search(rf"^{re.escape(edge.name)}\s", text, re.M), edge.name
    rows = {line.split()[0]: line.split() for line in text.splitlines() if "->" in line}
    assert rows["conv1->*"][1:4] == ["Conv2d", "activation_out", "16.8"]
    assert rows["conv1->*"][-1] == "2x32x28x28"
    assert rows["fc2->*"][-1] == "2x10"
    assert rows["loss.loss_fn->*"][1:4] == ["CrossEntropyLoss", "loss", "16.10"]
    casts = sum(len(cast_nodes(g)) for g in (q, q.loss))
    m = re.search(r"edges: (\d+)\s+casts: (\d+)\s+distinct formats: (\d+)", text)
    assert (int(m[1]), int(m[2]), int(m[3])) == (len(a), casts, len(a.formats()))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot on new pyparsing
def test_to_dot_is_parsable_and_draws_every_cast():
    q = compiled_with_loss(ResidualCNN)
    dot = fxc.to_dot(q)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    casts = [n for g, prefix in ((q, ""), (q.loss, "loss.")) for n in cast_nodes(g)]
    boxes = re.findall(r'^\s*"([^"]+)" \[label="cast [^"]*", shape=box', dot, re.M)
    assert len(boxes) == len(casts)
    # every edge of the graphs is drawn, and ends on declared nodes
    declared = set(re.findall(r'^\s*"([^"]+)" \[', dot, re.M))
    arrows = re.findall(r'^\s*"([^"]+)" -> "([^"]+)";$', dot, re.M)
    assert len(arrows) == sum(len(n.all_input_nodes) for g in (q, q.loss) for n in g.graph.nodes)
    assert {a for pair in arrows for a in pair} <= declared
    import pydot
    (graph,) = pydot.graph_from_dot_data(dot)
    names = {n.get_name().strip('"') for n in graph.get_nodes()}
    assert {"casts_relu1__add", "loss.casts_loss_fn"} <= names
    assert len(graph.get_edges()) == len(arrows)
    label = graph.get_node('"casts_relu1__add"')[0].get("label")
    assert "16.8" in label and "activation_in" in label
