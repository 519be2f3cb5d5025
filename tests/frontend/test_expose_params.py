"""Pass expose_params: parameters become get_attr edges; the graph computes what the model did.

Oracle: the original PyTorch modules, forward and backward (a deep copy runs side by side).
"""
import copy

import pytest
import torch
from torch import nn

from fxcompile.frontend import expose_params, trace
from fxcompile.frontend.expose_params import batch_norm, call_with_parameters


def _check_same(model, x, train=True, gm=None):
    """``gm`` (the exposed graph of ``model``, built unless given) computes what ``model`` does."""
    torch.manual_seed(0)
    gm = gm if gm is not None else expose_params(trace(copy.deepcopy(model)))
    ref = model
    gm.train(train)
    ref.train(train)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = gm(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    for (name, pa), (_, pb) in zip(gm.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0, msg=name)
    for (name, ba), (_, bb) in zip(gm.named_buffers(), ref.named_buffers()):
        assert torch.equal(ba, bb), name
    return gm


@pytest.mark.parametrize("module, shape", [
    (nn.Linear(6, 3), (4, 6)),
    (nn.Linear(6, 3, bias=False), (4, 6)),
    (nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 2, 9)),
    (nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2), (2, 2, 7, 7)),
    (nn.Conv3d(1, 2, 2), (1, 1, 4, 4, 4)),
    (nn.LayerNorm(5), (3, 5)),
])
def test_table_rules_become_functions_with_parameter_edges(module, shape):
    gm = _check_same(nn.Sequential(module), torch.randn(*shape))
    ops = [n.op for n in gm.graph.nodes]
    assert "call_module" not in ops
    fn = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert fn.meta["fxc_module"] == "0" and fn.meta["fxc_op"] == type(module).__name__
    assert fn.name == "_0"  # keeps the name the module's node had
    getattrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert getattrs == [f"0.{name}" for name, _ in module.named_parameters()]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_follows_the_module_mode_and_statistics(train, momentum):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=momentum))
    x = torch.randn(4, 1, 6, 6)
    gm = None
    for i in range(3):  # running statistics and num_batches_tracked evolve identically
        gm = _check_same(model, x * (1.5 + i) + 0.3, train, gm)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert batch_norm in calls


def test_other_parametrised_leaves_go_through_call_with_parameters():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.PReLU(2))
    gm = _check_same(model, torch.randn(2, 1, 5, 5))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [call_with_parameters, call_with_parameters]
    assert [n.meta["fxc_op"] for n in calls] == ["Conv2d", "PReLU"]


def test_parameterless_modules_stay():
    gm = expose_params(trace(nn.Sequential(nn.ReLU(), nn.Flatten())))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_a_module_called_twice_exposes_each_parameter_once():
    gm = _check_same(Tied(), torch.randn(3, 4))
    getattrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert [n.target for n in getattrs] == ["fc.weight", "fc.bias"]
    assert all(len(n.users) == 2 for n in getattrs)
