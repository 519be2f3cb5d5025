"""The IR module: typed node.meta keys, pass contracts, and the shared graph helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.compiler import _checked
from fxcompile.core import ir
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN
from fxcompile.frontend import annotate_roles, trace
from fxcompile.passes import assign, casts


def test_keys_read_write_and_name_the_pass_that_provides_them():
    gm = trace(nn.Sequential(nn.Linear(4, 2)))
    node = next(iter(gm.graph.nodes))
    assert not ir.ROLE.has(node) and ir.ROLE.get(node, "none") == "none"
    ir.ROLE.set(node, "input")
    assert ir.ROLE.has(node) and ir.ROLE.of(node) == "input" and node.meta["fxc_role"] == "input"
    with pytest.raises(KeyError, match="assign_formats"):
        ir.VALUE.of(node)
    with pytest.raises(KeyError, match="the graph has no 'fxc_solution'"):
        ir.SOLUTION.of(gm)
    names = [k.name for k in ir.NODE_KEYS + ir.GRAPH_KEYS]
    assert len(names) == len(set(names)) and all(n.startswith("fxc_") for n in names)


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
def test_compile_meets_every_pass_contract(model):
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    q = fxc.compile(model(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), check_contracts=True)
    assert ir.FRONTEND.of(q) == "fx" and ir.POLICY.has(q)
    q = fxc.compile(model(), fxc.auto(max_formats=2), loss_fn=nn.CrossEntropyLoss(), calibration_data=[(x, y)],
                    check_contracts=True)
    assert ir.SOLUTION.has(q)


def test_a_pass_run_too_early_is_named():
    gm = trace(SeedCNN())
    with pytest.raises(RuntimeError, match="pass insert_casts requires fxc_value, fxc_uses"):
        _checked(casts.insert_casts, casts.CONTRACT, True)(gm)
    # a pass that does not write what it promises is caught after it
    gm = annotate_roles(trace(SeedCNN()))
    with pytest.raises(RuntimeError, match="promises .*fxc_value"):
        _checked(lambda g, *a, **k: g, assign.CONTRACT, True)(gm, fxc.baseline())


def test_graphs_fetch_and_the_stored_parameter_read_rule():
    q = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss())
    assert [p for p, _ in ir.graphs(q)] == ["", "loss."] and ir.graphs(q)[1][1] is q.loss
    assert ir.fetch(q, "conv1.weight") is q.conv1.weight
    stochastic = fxc.fixed(16, 8, rounding="stochastic")
    assert ir.stored_format(stochastic) == fxc.fixed(16, 8)
    assert ir.stored_format(fxc.fixed(16, 8, rounding="floor")).rounding == "floor"
    assert ir.stored_format(None) is None
    # the rule is what every reader of a stored parameter applies: the cast of a weight edge
    weight_cast = next(m for m in q.casts.children() if m.edge.role == "weight")
    weight_cast.set_edge(weight_cast.edge.__class__(**{**weight_cast.edge.__dict__, "forward": stochastic}))
    assert weight_cast._fwd == fxc.fixed(16, 8).spec()
