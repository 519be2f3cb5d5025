"""Pass functionalize: in-place ops after casts train, with the out-of-place model's gradients bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.frontend import trace
from fxcompile.frontend.functionalize import functionalize


class Block(nn.Module):
    """The same arithmetic written in place (``inplace=True``) or out of place."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.fc1, self.fc2, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.inplace:
            h.mul_(0.75)
            h.add_(self.fc2(h))                 # in-place arithmetic on a cast value
            h = F.silu(h, inplace=True)
            h[:, :4].mul_(0.5)                  # through a view
            s = F.hardtanh(self.fc2(h), inplace=True)
            s += h                              # augmented assignment
        else:
            h = h * 0.75
            h = h + self.fc2(h)
            h = F.silu(h)
            h = torch.slice_scatter(h, h[:, :4] * 0.5, dim=1, start=0, end=4)
            s = F.hardtanh(self.fc2(h))
            s = s + h
        return self.out(s)


class Fanout(nn.Module):
    """A value read by a second consumer after an in-place op: the consumer sees the write."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.fc, self.out = nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc(x)
        r = torch.relu_(h) if self.inplace else torch.relu(h)
        return self.out(r) + (h if self.inplace else r).sum(1, keepdim=True)


def _grads(model_cls, frontend, seed=0):
    torch.manual_seed(seed)
    model = model_cls(inplace=True)
    twin = model_cls(inplace=False)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(4, model.fc1.in_features if hasattr(model, "fc1") else 5), torch.tensor([0, 1, 1, 0])
    out = []
    for m in (model, twin):
        q = fxc.compile(m, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), frontend=frontend, example_inputs=(x,))
        torch.manual_seed(1)  # stochastic gradient rounding draws the same numbers in both
        loss = q.loss(q(x), y)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        m.zero_grad()
    return out


@pytest.mark.parametrize("model_cls", [Block, Fanout])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_in_place_model_trains_with_the_out_of_place_gradients_bit_for_bit(model_cls, frontend):
    (loss, grads), (twin_loss, twin_grads) = _grads(model_cls, frontend)
    assert torch.equal(loss, twin_loss)
    assert grads.keys() == twin_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], twin_grads[name]), name
        assert grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functionalised_graph_computes_what_eager_computes_and_writes_nothing(frontend):
    torch.manual_seed(0)
    model, x = Block(inplace=True), torch.randn(3, 6)
    gm = functionalize(trace(model, frontend=frontend, example_inputs=(x,)))
    assert torch.equal(gm(x), model(x))
    for node in gm.graph.nodes:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        assert not (isinstance(name, str) and name.endswith("_") and not name.startswith("_")), node.format_node()
        assert node.kwargs.get("inplace") is not True
    assert not any(getattr(m, "inplace", False) for m in gm.modules())
    assert model.act.inplace  # the user's model keeps its modules


class Writes(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.shape[0])            # a state update: kept
        x[torch.tensor([0, 2])].add_(5.0)     # advanced indexing copies: nothing written
        v = x.view(-1)
        v[:2].fill_(2.0)                      # fill_ has no out-of-place twin: runs on a copy
        return x * 1.0


def test_buffer_updates_stay_and_writes_through_copies_change_nothing():
    gm = functionalize(trace(Writes()))
    x = torch.arange(6.0).view(3, 2)
    expected = Writes()(x.clone())
    out = gm(x.clone())
    assert torch.equal(out, expected) and out[0, 0] == 2.0 and out[2, 0] == 4.0
    assert gm.seen == 3
