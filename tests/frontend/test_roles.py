"""Pass annotate_roles: input / weight / bias / activation / loss, and no role for non-float values."""
import torch
from torch import nn

from fxcompile.compiler import LossGraph
from fxcompile.frontend import annotate_roles, expose_params, propagate_shapes, trace


class WithSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        n = x.size(0)
        y = self.fc(x).reshape(n, -1)
        return y, y.argmax(1)


def _roles(gm):
    return {n.name: n.meta["fxc_role"] for n in gm.graph.nodes}


def test_model_roles_with_shapes():
    x = torch.randn(2, 4)
    gm = annotate_roles(propagate_shapes(expose_params(trace(WithSizes())), (x,)))
    roles = _roles(gm)
    assert roles["x"] == "input"
    assert roles["fc_weight"] == "weight" and roles["fc_bias"] == "bias"
    assert roles["fc"] == "activation" and roles["reshape"] == "activation"
    assert roles["size"] is None  # an int
    assert roles["argmax"] is None  # an integer tensor
    assert roles["output"] is None
    ops = {n.name: n.meta["fxc_op"] for n in gm.graph.nodes}
    assert ops["fc"] == "Linear" and ops["reshape"] == "reshape" and ops["x"] == "placeholder"


def test_without_shapes_every_computed_value_is_an_activation():
    gm = annotate_roles(expose_params(trace(WithSizes())))
    assert _roles(gm)["argmax"] == "activation"  # unknown dtype: the cast decides at run time


def test_loss_graph_roles():
    gm = annotate_roles(trace(LossGraph(nn.CrossEntropyLoss())), loss_graph=True)
    roles = _roles(gm)
    assert roles["prediction"] == "activation" and roles["target"] == "input"
    assert roles["loss_fn"] == "loss"


def test_bias_named_parameters_and_buffers():
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.shift_bias = nn.Parameter(torch.zeros(3))
            self.register_buffer("offset", torch.ones(3))

        def forward(self, x):
            return x * self.scale + self.shift_bias + self.offset

    roles = _roles(annotate_roles(trace(P())))
    assert roles["scale"] == "weight" and roles["shift_bias"] == "bias"
    assert roles["offset"] is None  # a buffer is state, not a trained parameter
