"""inspect (text report) and to_dot (Graphviz DOT) of a compiled model."""
import re

import pytest

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN
from fxcompile.passes.casts import cast_nodes
from tests.helpers import compiled_with_loss


def test_inspect_lists_every_edge_with_node_op_role_formats_and_shape():
    q = compiled_with_loss()
    text = fxc.inspect(q, edges=True)
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
    # the loss graph is traced without inputs; its shapes come from the model's output
    assert rows["loss.prediction->*"][-1] == "2x10" and rows["loss.target->*"][-1] == "2"
    assert all(e.shape is not None for e in a)
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


def test_the_default_table_has_one_row_per_value_with_matching_uses_folded_in():
    policy = fxc.Policy(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8",
                        overrides=[fxc.Override({"activation_in": "12.6"}, pattern="add")])
    q = compiled_with_loss(ResidualCNN, policy)
    text = fxc.inspect(q)
    a = fxc.assignment(q)
    header = next(line for line in text.splitlines() if line.startswith("value "))
    assert header.split() == ["value", "op", "role", "forward", "backward", "shape", "uses"]
    rows = [line for line in text.splitlines()[text.splitlines().index(header) + 2:] if line.strip()]
    values = [e for e in a if e.consumer == "*"]
    separate = [e for e in a if e.consumer != "*" and (e.forward, e.backward) != next(
        (v.forward, v.backward) for v in values if v.producer == e.producer)]
    assert separate and all(e.consumer == "add" for e in separate)
    assert len(rows) == len(values) + len(separate) < len(a)
    by_name = {r.split()[0]: r.split() for r in rows}
    assert by_name["conv1"][-2:] == ["2x16x28x28", "bn1"]
    assert by_name["relu1"][-1] == "conv2"            # its use by add has a format of its own ...
    assert any(r.split()[:1] == ["->add"] and "12.6" in r for r in rows)   # ... and a row
    assert by_name["loss.loss_fn"][-1] == "scalar"


def test_svg_draws_every_node_and_colours_casts_by_format(tmp_path):
    import xml.etree.ElementTree as ET
    from fxcompile.cli import main
    from fxcompile.reports.inspect import format_colours, to_svg
    q = compiled_with_loss(ResidualCNN)
    root = ET.fromstring(to_svg(q))
    ns = {"s": "http://www.w3.org/2000/svg"}
    groups = root.findall("s:g", ns)
    casts = [g for g in groups if g.get("class") == "cast"]
    nodes = [g for g in groups if g.get("class") == "node"]
    assert len(casts) == sum(len(cast_nodes(g)) for g in (q, q.loss))
    assert len(casts) + len(nodes) == sum(len(g.graph.nodes) for g in (q, q.loss))
    colours = format_colours(q)
    assert set(colours) == {"16.8", "16.10", "24.12"} and len(set(colours.values())) == 3
    for g in casts:
        assert g.find("s:rect", ns).get("fill") == colours.get(g.get("data-format"), "white")
    weight = next(g for g in casts if g.get("data-node") == "casts_conv1_weight")
    assert weight.get("data-format") == "24.12"
    assert {g.get("data-format") for g in groups if g.get("class") == "legend"} == set(colours)
    assert len(root.findall("s:line", ns)) == sum(len(n.all_input_nodes) for g in (q, q.loss) for n in g.graph.nodes)
    main(["inspect", "fxcompile.experiments.models:SeedCNN", "--svg", str(tmp_path / "g.svg")])
    assert ET.parse(tmp_path / "g.svg").getroot().findall("s:g[@class='cast']", ns)
