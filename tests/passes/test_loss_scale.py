"""Loss scaling: the loss's gradient times 2**s in, the weights' gradients divided by 2**s out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.core import ir
from fxcompile.runtime.loss_scale import scale_gradient


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def _data(n=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(policy, loss_scale, steps=3):
    """Parameters and gradients (as the optimizer read them) after ``steps`` Adam steps."""
    x, y = _data()
    q = fxc.compile(_model(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],), loss_scale=loss_scale)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-2), q)
    torch.manual_seed(2)  # the stochastic roundings' seeds
    for _ in range(steps):
        opt.zero_grad()
        q.loss(q(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in q.parameters()], [p.grad.clone() for p in q.parameters()]


def _policy(gradient):
    return fxc.Policy(activation="16.8", gradient=gradient, loss="16.10", weight="24.12,stochastic",
                      bias="16.8,stochastic")


def test_float_gradients_equal_the_unscaled_runs_exactly():
    # without rounding on the way back, scaling by a power of two and unscaling is exact
    ref, scaled = _train(_policy(None), 1), _train(_policy(None), 16)
    for a, b in zip(ref[0] + ref[1], scaled[0] + scaled[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_scale_2_to_the_s_makes_b_f_gradients_act_as_b_f_plus_s(rounding):
    # 16.10 gradients of the loss scaled by 16 hold the codes 16.14 gradients hold unscaled
    ref, scaled = _train(_policy(f"16.14,{rounding}"), 1), _train(_policy(f"16.10,{rounding}"), 16)
    for a, b in zip(ref[0] + ref[1], scaled[0] + scaled[1]):
        assert torch.equal(a, b)
    plain = _train(_policy(f"16.10,{rounding}"), 1)
    assert not all(torch.equal(a, b) for a, b in zip(plain[1], scaled[1]))


def test_the_loss_value_and_the_gradient_entering_the_backward():
    x, y = _data()
    q = fxc.compile(_model(), "baseline", loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],), loss_scale=8)
    ref = fxc.compile(_model(), "baseline", loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    out = q(x).detach().requires_grad_()
    loss = q.loss(out, y)
    assert torch.equal(loss, ref.loss(out, y)) and ir.LOSS_SCALE.of(q) == 8.0
    assert "policy: baseline  loss scale: 8\n" in fxc.inspect(q) and "loss scale" not in fxc.inspect(ref)
    loss.backward()
    expected = torch.autograd.grad(F.cross_entropy(out, y) * 8, out)[0]
    assert (out.grad - expected).abs().max() <= 2 ** -10  # one 16.10 step: the cast's rounding
    assert out.grad.abs().max() > 4 * 2 ** -10


def test_default_scale_leaves_the_graphs_as_they_were():
    x, _ = _data()
    q = fxc.compile(_model(), "baseline", loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],), check_contracts=True)
    assert ir.LOSS_SCALE.of(q) == 1.0
    assert not any(n.target is scale_gradient for n in q.loss.graph.nodes)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters()), q)
    assert not opt._optimizer_step_pre_hooks


class OwnLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x, y):
        logits = self.fc(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def test_a_model_computing_its_own_loss_is_scaled_too():
    x, y = _data()
    grads = []
    for scale in (1, 4):
        torch.manual_seed(0)
        q = fxc.compile(OwnLoss(), _policy(None), example_inputs=(x[:2], y[:2]), loss_fn="loss", loss_scale=scale)
        q.loss(q(x, y)).backward()
        grads.append([p.grad.clone() for p in q.parameters()])
    assert all(torch.equal(b, 4 * a) for a, b in zip(*grads))


@pytest.mark.parametrize("scale, match", [(3, "power of two"), (0.5, "power of two"), (True, "power of two"),
                                          (float("inf"), "power of two"),
                                          (32, r"loss_scale 32 does not fit the backward format 16.10 of the loss "
                                               r"edge 'loss_fn->\*'.*loss_scale <= 16")])
def test_bad_scales_are_refused_naming_why(scale, match):
    x, _ = _data()
    with pytest.raises(fxc.PolicyError, match=match):
        fxc.compile(_model(), "baseline", loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],), loss_scale=scale)


def test_scale_without_a_loss_or_with_auto_is_refused():
    x, y = _data()
    with pytest.raises(fxc.PolicyError, match="loss_fn"):
        fxc.compile(_model(), "baseline", example_inputs=(x[:2],), loss_scale=4)
    with pytest.raises(fxc.PolicyError, match="auto"):
        fxc.compile(_model(), fxc.auto(max_formats=2), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],),
                    calibration_data=[(x, y)], loss_scale=4)


def test_cli_train_loss_scale(capsys):
    from fxcompile import cli
    argv = ["train", "--model", "mlp", "--dataset", "synthetic", "--policy", "baseline", "--epochs", "1"]
    with pytest.raises(SystemExit, match="fxcompile: loss_scale must be a power of two.*got 3.0"):
        cli.main(argv + ["--loss-scale", "3"])
    cli.main(argv + ["--loss-scale", "16"])
    assert "test accuracy" in capsys.readouterr().out
