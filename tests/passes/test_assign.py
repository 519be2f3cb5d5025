"""Pass assign_formats: every value and every use gets forward and backward formats."""
import warnings

import pytest
import torch

from fxcompile import Policy, fixed
from fxcompile.experiments.models import ResidualCNN
from fxcompile.frontend import annotate_roles, expose_params, propagate_shapes, trace
from fxcompile.passes import assign_formats

POLICY = Policy(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8",
                weight_gradient="20.14", overrides=[{"op": "add", "activation_in": "12.6", "gradient": "12.8"},
                                                    {"pattern": "fc*", "bias": "8.8"}])


def _assigned(policy=POLICY):
    x = torch.randn(2, 1, 28, 28)
    return assign_formats(annotate_roles(propagate_shapes(expose_params(trace(ResidualCNN())), (x,))), policy)


def test_values_get_their_role_formats():
    gm = _assigned()
    nodes = {n.name: n for n in gm.graph.nodes}
    v = nodes["conv1"].meta["fxc_value"]
    assert (v.producer, v.consumer, v.role, v.forward, v.backward_role, v.backward) == \
        ("conv1", "*", "activation_out", fixed(16, 8), "gradient", fixed(16, 10))
    assert v.shape == (2, 16, 28, 28) and v.op == "Conv2d"
    w = nodes["conv1_weight"].meta["fxc_value"]
    assert (w.role, w.forward, w.backward_role, w.backward) == ("weight", fixed(24, 12), "weight_gradient", fixed(20, 14))
    b = nodes["fc_bias"].meta["fxc_value"]
    assert (b.role, b.forward, b.backward_role, b.backward) == ("bias", fixed(8, 8), "bias_gradient", fixed(16, 10))
    assert nodes["x"].meta["fxc_value"].role == "input"
    assert "fxc_value" not in nodes["output"].meta


def test_uses_take_the_consumer_formats():
    nodes = {n.name: n for n in _assigned().graph.nodes}
    uses = nodes["relu1"].meta["fxc_uses"]
    assert set(uses) == {"conv2", "add"}
    assert (uses["add"].role, uses["add"].forward, uses["add"].backward) == ("activation_in", fixed(12, 6), fixed(12, 8))
    assert (uses["conv2"].forward, uses["conv2"].backward) == (fixed(16, 8), fixed(16, 10))
    assert uses["add"].op == "add" and uses["conv2"].op == "Conv2d"
    # a parameter's use carries the parameter's own formats
    w_use = nodes["fc_weight"].meta["fxc_uses"]["fc"]
    assert (w_use.role, w_use.forward, w_use.backward) == ("weight", fixed(24, 12), fixed(20, 14))
    assert nodes["fc"].meta["fxc_uses"] == {}  # its only user is the output


def test_float_roles_and_clip_gradient_flag():
    gm = _assigned(Policy(activation="16.8", gradient=None, clip_gradient=False))
    v = next(n for n in gm.graph.nodes if n.name == "conv1").meta["fxc_value"]
    assert v.forward == fixed(16, 8) and v.backward is None
    w = next(n for n in gm.graph.nodes if n.name == "conv1_weight").meta["fxc_value"]
    assert w.forward is None
    assert gm.meta["fxc_clip_gradient"] is False


def test_unused_override_warning_can_be_deferred():
    policy = Policy(activation="16.8", overrides=[{"pattern": "nothing*", "activation": "8.4"}])
    with pytest.warns(UserWarning, match="nothing"):
        _assigned(policy)
    x = torch.randn(1, 1, 28, 28)
    gm = annotate_roles(propagate_shapes(expose_params(trace(ResidualCNN())), (x,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = assign_formats(gm, policy, warn_unused_overrides=False)
    assert any("conv1" in names for names, _ in gm.meta["fxc_override_matches"])
