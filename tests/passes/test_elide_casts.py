"""Eliding forward-identity casts: same losses and gradients, every edge still fixed point."""

from __future__ import annotations

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.models import SeedCNN
from fxcompile.passes.elide_casts import elide_identity_casts, elided_casts

# narrow formats so that activations and gradients saturate often
POLICY = dict(activation="8.4", gradient="8.6", loss="16.10", weight="16.8", bias="16.8")


def _step(qmodel, model, x, y):
    model.zero_grad()
    loss = qmodel.loss(qmodel(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_seed_cnn_casts_after_relu_pool_flatten_are_elided_and_training_is_unchanged():
    torch.manual_seed(0)
    model = SeedCNN()
    plain = fxc.compile(model, fxc.Policy(**POLICY), loss_fn=nn.CrossEntropyLoss())
    elided = elide_identity_casts(fxc.compile(model, fxc.Policy(**POLICY), loss_fn=nn.CrossEntropyLoss()))
    assert [n.target for n in elided_casts(elided)] == [
        "casts.relu1", "casts.pool1", "casts.relu2", "casts.pool2", "casts.flatten", "casts.relu3"]
    x, y = torch.randn(6, 1, 28, 28) * 30, torch.randint(0, 10, (6,))
    saturated = []
    plain.casts.conv1.register_forward_hook(lambda m, a, out: saturated.append(bool((out.abs() >= 7.9375).any())))
    loss_a, grads_a = _step(plain, model, x, y)
    assert saturated == [True]  # the clip matters in this step
    loss_b, grads_b = _step(elided, model, x, y)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_elided_edges_still_carry_fixed_point_values_and_gradients():
    torch.manual_seed(1)
    model = SeedCNN()
    q = elide_identity_casts(fxc.compile(model, fxc.Policy(**POLICY), loss_fn=nn.CrossEntropyLoss()))
    seen = []

    def check(module, args):
        x = args[0]
        seen.append(bool(module.edge.forward.representable(x.detach()).all()))
        x.register_hook(lambda g: seen.append(bool(module.edge.backward.representable(g).all())))
    for node in elided_casts(q):
        q.get_submodule(node.target).register_forward_pre_hook(check)
    q.loss(q(torch.randn(4, 1, 28, 28) * 30), torch.randint(0, 10, (4,))).backward()
    assert len(seen) == 2 * len(elided_casts(q)) and all(seen)


def test_overlapping_pools_and_format_changes_are_not_elided():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(3, stride=1)  # overlapping windows: gradients are summed
            self.flatten = nn.Flatten()

        def forward(self, x):
            return self.flatten(self.pool(self.relu(self.conv(x))))
    overrides = [{"pattern": "relu", "activation_out": "8.3"}]  # relu's input stays 8.4
    q = elide_identity_casts(fxc.compile(Net(), fxc.Policy(**POLICY, overrides=overrides)))
    assert [n.target for n in elided_casts(q)] == ["casts.flatten"]  # relu changes format, pool overlaps
    q = elide_identity_casts(fxc.compile(Net(), fxc.Policy(**POLICY)))
    assert [n.target for n in elided_casts(q)] == ["casts.relu", "casts.flatten"]
