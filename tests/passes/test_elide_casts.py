"""Eliding forward-identity casts: same losses and gradients, every edge still fixed point."""

from __future__ import annotations

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import SeedCNN
from fxcompile.passes.elide_casts import backward_elided_casts, elide_identity_casts, elided_casts

# narrow formats so that activations and gradients saturate often
POLICY = dict(activation="8.4", gradient="8.12", loss="16.10", weight="16.8", bias="16.8")


def _step(qmodel, model, x, y):
    model.zero_grad()
    loss = qmodel.loss(qmodel(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_seed_cnn_casts_after_relu_pool_flatten_are_elided_and_training_is_unchanged():
    torch.manual_seed(0)
    model = SeedCNN()
    plain = fxc.compile(model, fxc.Policy(**POLICY), loss_fn=nn.CrossEntropyLoss(), elide_casts=False)
    assert not elided_casts(plain) and not backward_elided_casts(plain)
    elided = elide_identity_casts(fxc.compile(model, fxc.Policy(**POLICY), loss_fn=nn.CrossEntropyLoss(),
                                              elide_casts=False))
    assert [n.target for n in elided_casts(elided)] == [
        "casts.relu1", "casts.pool1", "casts.relu2", "casts.pool2", "casts.flatten", "casts.relu3"]
    # gradients reach these through relu / pool / flatten from a cast that already rounded them
    assert [n.target for n in backward_elided_casts(elided)] == [
        "casts.conv1", "casts.relu1", "casts.conv2", "casts.relu2", "casts.pool2", "casts.fc1"]
    x, y = torch.randn(6, 1, 28, 28) * 30, torch.randint(0, 10, (6,))
    saturated, gradient_rounded = [], []
    plain.casts.conv1.register_forward_hook(lambda m, a, out: saturated.append(bool((out.abs() >= 7.9375).any())))
    plain.casts.pool1.register_full_backward_hook(
        lambda m, g_in, g_out: gradient_rounded.append(bool((g_in[0] != g_out[0]).any())))
    loss_a, grads_a = _step(plain, model, x, y)
    assert saturated == [True]  # the clip matters in this step
    assert gradient_rounded == [True]  # the rounding the backward-elided casts inherit is not trivial
    loss_b, grads_b = _step(elided, model, x, y)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_elided_edges_still_carry_fixed_point_values_and_gradients():
    torch.manual_seed(1)
    model = SeedCNN()
    q = elide_identity_casts(fxc.compile(model, fxc.Policy(**POLICY), loss_fn=nn.CrossEntropyLoss()))
    seen = []

    def check(module, args, out):
        seen.append(bool(module.edge.forward.representable(out.detach()).all()))
        # the gradient leaving the cast towards its input
        args[0].register_hook(lambda g: seen.append(bool(module.edge.backward.representable(g).all())))
    nodes = {n.target: n for n in elided_casts(q) + backward_elided_casts(q)}
    for target in nodes:
        q.get_submodule(target).register_forward_hook(check)
    q.loss(q(torch.randn(4, 1, 28, 28) * 30), torch.randint(0, 10, (4,))).backward()
    assert len(seen) == 2 * len(nodes) and all(seen)


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
    # relu changes the forward format only; flatten keeps it: both pass gradients through on their grid
    assert [n.target for n in backward_elided_casts(q)] == ["casts.conv", "casts.pool"]
    q = elide_identity_casts(fxc.compile(Net(), fxc.Policy(**POLICY)))
    assert [n.target for n in elided_casts(q)] == ["casts.relu", "casts.flatten"]
    # conv's and relu's gradients pass through the overlapping pool, which sums them
    assert [n.target for n in backward_elided_casts(q)] == ["casts.conv", "casts.pool"]
    overrides = [{"pattern": "flatten", "gradient": "8.11"}]   # a different gradient format after pool
    q = elide_identity_casts(fxc.compile(Net(), fxc.Policy(**POLICY, overrides=overrides)))
    # pool's own cast now feeds a cast to 8.11 (no format-preserving op between): it keeps its rounding
    assert [n.target for n in backward_elided_casts(q)] == ["casts.conv", "casts.pool__flatten"]


def test_a_cast_whose_value_fans_out_keeps_its_backward_rounding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.relu = nn.ReLU()

        def forward(self, x):
            h = self.fc(x)
            return self.relu(h) + h   # h's gradient is the sum of two rounded gradients

    q = fxc.compile(Net(), fxc.Policy(**POLICY))
    assert "casts.fc" not in [n.target for n in backward_elided_casts(q)]


def test_a_gradient_format_change_across_relu_keeps_the_rounding_and_the_gradients():
    import dataclasses
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    graphs = [fxc.compile(model, fxc.Policy(**POLICY), elide_casts=False) for _ in range(2)]
    for q in graphs:
        # the relu's output takes gradients at 8.9, the linear before it at 8.12: 8.9 values are
        # on the 8.12 grid but may exceed its range, so the linear's cast must still saturate them
        q.casts._1.set_edge(dataclasses.replace(q.casts._1.edge, backward=fxc.fixed(8, 9)))
    plain, elided = graphs[0], elide_identity_casts(graphs[1])
    assert not backward_elided_casts(elided)   # casts._0 keeps its rounding and saturation
    x = torch.randn(16, 6) * 4
    grads = []
    for q in (plain, elided):
        model.zero_grad()
        (q(x) * 300).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert any((g.abs() >= 127 / 4096).any() for g in grads[0])  # saturation at 8.12 happens
    for a, b in zip(*grads):
        assert torch.equal(a, b)
