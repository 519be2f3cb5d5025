"""Pass insert_casts: where casts go, and that the graph computes the hand-written fixed-point model."""
import torch
from torch import nn
import torch.nn.functional as F

import fxcompile as fxc
from fxcompile import Policy, cast, fixed
from fxcompile.experiments.models import MLP, ResidualCNN
from fxcompile.passes import Cast
from fxcompile.passes.casts import cast_nodes

POLICY = Policy(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8",
                overrides=[{"pattern": "fc2", "activation_in": "12.4", "gradient": "12.6"}])


def test_one_cast_per_value_and_one_per_differing_or_shared_use():
    q = fxc.compile(ResidualCNN(), fxc.baseline(), example_inputs=(torch.randn(2, 1, 28, 28),))
    casts = {n.target.split(".", 1)[1]: n for n in cast_nodes(q)}
    values = [n for n in q.graph.nodes if "fxc_value" in n.meta]
    assert {n.name for n in values} <= set(casts)
    uses = sorted(k for k in casts if "__" in k)
    assert uses == ["relu1__add", "relu1__conv2"]  # only the fan-out
    for n in q.graph.nodes:
        if n.op in ("call_function", "call_module") and "fxc_edge" not in n.meta:
            assert all("fxc_edge" in a.meta for a in n.all_input_nodes if a.op != "get_attr"), n.name
    assert isinstance(q.casts.relu1__add, Cast) and q.casts.relu1__add.forward_identity


def _hand_written_mlp(m, x):
    """The MLP under POLICY, with a cast written at each point the pass should put one.

    The override ``pattern="fc2"`` reaches every edge that names fc2: the use relu1 -> fc2, the
    gradient of fc2's output, and (through the role fallback) the gradients of fc2's parameters.
    """
    a16, g, g12 = fixed(16, 8), fixed(16, 10), fixed(12, 6)
    w, b = fixed(24, 12), fixed(16, 8)
    p = {k: cast(v, w if k.endswith("weight") else b, g12 if k.startswith("fc2") else g, False)
         for k, v in m.named_parameters()}
    h = cast(torch.flatten(cast(x, a16, g), 1), a16, g)
    h = cast(F.linear(h, p["fc1.weight"], p["fc1.bias"]), a16, g)
    h = cast(torch.relu(h), a16, g)
    h = cast(h, fixed(12, 4), g12)  # relu1 -> fc2 has its own formats
    h = cast(F.linear(h, p["fc2.weight"], p["fc2.bias"]), a16, g12)
    h = cast(h, None, g)  # fc2 -> relu2: same forward, relu2's gradient format
    h = cast(torch.relu(h), a16, g)
    return cast(F.linear(h, p["fc3.weight"], p["fc3.bias"]), a16, g)


def test_compiled_graph_equals_the_hand_written_fixed_point_model():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 1, 28, 28) * 3
    q = fxc.compile(model, POLICY, example_inputs=(x,))
    ya = q(x)
    yb = _hand_written_mlp(model, x)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    grads = []
    for y in (ya, yb):
        model.zero_grad()
        y.backward(g)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert q.casts.relu1__fc2.edge.forward == fixed(12, 4)
    assert not q.casts.relu1__fc2.forward_identity


def test_parameter_casts_do_not_clip_and_policy_can_turn_clipping_off():
    q = fxc.compile(MLP(), fxc.baseline(), example_inputs=(torch.randn(1, 1, 28, 28),))
    assert not q.casts.fc1_weight.clip_gradient and q.casts.fc1.clip_gradient
    off = Policy(activation="16.8", gradient="16.10", clip_gradient=False)
    q = fxc.compile(MLP(), off, example_inputs=(torch.randn(1, 1, 28, 28),))
    assert not q.casts.fc1.clip_gradient
    # fc1's gradient arrives through ReLU from the 16.10 cast after it: its own rounding is elided
    assert "fc1->*: activation_out 16.8, gradient identity" in repr(q.casts.fc1)
    assert "fc3->*: activation_out 16.8, gradient 16.10" in repr(q.casts.fc3)


def test_fp32_policy_is_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 5)
    q = fxc.compile(model, fxc.fp32(), example_inputs=(x,))
    assert torch.equal(q(x), model(x))
