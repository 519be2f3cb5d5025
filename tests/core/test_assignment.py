"""Assignment: the per-edge formats as data (JSON round trip, diff, table)."""
import json

import fxcompile as fxc
from fxcompile import Assignment, Edge, fixed
from fxcompile.experiments.models import ResidualCNN
from tests.helpers import compiled_with_loss


def test_json_round_trip():
    a = fxc.assignment(compiled_with_loss())
    text = a.to_json()
    b = Assignment.from_json(text)
    assert b == a and isinstance(b, Assignment)
    assert all(isinstance(e, Edge) for e in b)
    data = json.loads(text)
    conv1 = next(d for d in data if d["producer"] == "conv1_weight" and d["consumer"] == "*")
    assert conv1["forward"] == "24.12,stochastic" and conv1["shape"] == [32, 1, 3, 3]
    assert conv1["role"] == "weight" and conv1["backward_role"] == "weight_gradient"


def test_round_trip_keeps_float_edges_and_unknown_shapes():
    e = Edge("a", "*", "activation_out", None, "gradient", fixed(8, 4, zero_point=-3), "add", None)
    assert Assignment.from_json(Assignment([e]).to_json()) == [e]


def test_diff_lists_edges_whose_formats_differ():
    base = fxc.assignment(compiled_with_loss())
    assert base.diff(Assignment.from_json(base.to_json())) == []
    policy = fxc.Policy(activation="16.8", gradient="16.10,stochastic", loss="16.10", weight="24.12,stochastic",
                        bias="16.8,stochastic", overrides=[{"pattern": "fc2*", "weight": "8.6"}])
    other = fxc.assignment(compiled_with_loss(policy=policy))
    diff = base.diff(other)
    assert [name for name, _, _ in diff] == ["fc2_weight->*", "fc2_weight->fc2"]
    name, mine, theirs = diff[0]
    assert mine.forward.bits == 24 and theirs.forward == fixed(8, 6)
    shorter = Assignment(e for e in base if e.producer != "fc1")
    missing = {name: (a, b) for name, a, b in base.diff(shorter)}
    assert set(missing) == {"fc1->*", "fc1->relu3"} and all(b is None for _, b in missing.values())


def test_formats_and_by_role():
    a = fxc.assignment(compiled_with_loss(policy=fxc.optimized()))
    assert a.formats() == {(16, 4), (16, 9), (16, 11), (10, 8)}
    assert {e.producer for e in a.by_role("bias")} == {"conv1_bias", "conv2_bias", "fc1_bias", "fc2_bias"}


def test_fan_out_has_one_edge_per_use_and_the_value_edge():
    a = fxc.assignment(compiled_with_loss(model=ResidualCNN))
    relu1 = [e for e in a if e.producer == "relu1"]
    assert sorted(e.consumer for e in relu1) == ["*", "add", "conv2"]


def test_table_lists_every_edge_with_its_columns():
    a = fxc.assignment(compiled_with_loss())
    lines = a.table().splitlines()
    assert lines[0].split() == ["edge", "op", "role", "forward", "backward", "shape"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == len(a) + 2
    row = next(line for line in lines if line.startswith("conv1_weight->* "))
    assert row.split() == ["conv1_weight->*", "get_attr", "weight", "24.12,stochastic", "16.10,stochastic",
                           "(weight_gradient)", "32x1x3x3"]
    assert str(a) == a.table()
