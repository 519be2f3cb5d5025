"""prediction_gradient="inward": the casts of the prediction a loss consumes keep the gradient
that moves a saturated value back into range, and zero only what pushes it further out."""
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile import Policy, cast, fixed
from fxcompile.errors import PolicyError
from fxcompile.experiments.models import SeedCNN
from fxcompile.runtime.cast import keep_inward

FMT = fixed(8, 4)  # range [-8, 7.9375]


def _grad(x, g, inward):
    x = x.clone().requires_grad_(True)
    y = cast(x, FMT, None, clip_gradient=not inward)
    if inward:
        y = keep_inward(y, FMT.spec())
    y.backward(g)
    return y.detach(), x.grad


def test_keep_inward_zeroes_only_the_outward_part_at_a_bound():
    x = torch.tensor([20.0, 20.0, -20.0, -20.0, 1.0, 1.0, 7.9375])
    g = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    y, inward = _grad(x, g, True)
    assert torch.equal(y, cast(x, FMT))  # the forward is the cast's
    # at the ceiling a negative gradient (descent raises the value) is dropped, a positive one kept;
    # at the floor the reverse; inside the range everything passes; a value exactly on a bound counts
    assert inward.tolist() == [0.0, 1.0, 0.0, -1.0, 1.0, -1.0, 0.0]
    _, clipped = _grad(x, g, False)
    assert clipped.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0]


def test_keep_inward_zeroes_a_nan_and_leaves_non_tensors_alone():
    x = torch.tensor([float("nan"), 0.5], requires_grad=True)
    keep_inward(x * 1, FMT.spec()).backward(torch.tensor([1.0, 1.0]))
    assert x.grad.tolist() == [0.0, 1.0]
    assert keep_inward(3, FMT.spec()) == 3
    t = torch.ones(2)
    assert keep_inward(t, []) is t


def _compiled(policy, loss=True):
    x = torch.randn(4, 1, 28, 28)
    kw = dict(loss_fn=nn.CrossEntropyLoss()) if loss else {}
    if isinstance(policy, fxc.Auto):
        kw["calibration_data"] = [(x, torch.randint(0, 10, (4,)))]
    return fxc.compile(SeedCNN(), policy, example_inputs=(x,), **kw)


def _inward(q):
    mods = list(q.casts.named_children())
    if hasattr(q, "loss"):
        mods += [("loss." + n, m) for n, m in q.loss.casts.named_children()]
    return sorted(n for n, m in mods if m.inward_gradient)


@pytest.mark.parametrize("make", [lambda pg: Policy(activation="8.4", prediction_gradient=pg),
                                  lambda pg: fxc.auto(bits=8, max_formats=2, gradient_rounding="stochastic",
                                                           prediction_gradient=pg)])
def test_only_the_prediction_casts_are_marked(make):
    assert _inward(_compiled(make(None))) == []
    q = _compiled(make("inward"))
    assert _inward(q) == ["fc2", "loss.prediction"]  # the model's output and the loss's input
    assert "inward gradient" in repr(q.casts.fc2) and "inward" not in repr(q.casts.fc1)
    assert _inward(_compiled(make("inward"), loss=False)) == ["fc2"]


def _logit_gradients(policy):
    """The gradient reaching fc2's output when every logit is driven far past the 8.4 ceiling."""
    torch.manual_seed(0)
    model = SeedCNN()
    with torch.no_grad():
        model.fc2.bias.fill_(50.0)  # every logit saturates at the ceiling (7.9375)
    x = torch.randn(4, 1, 28, 28)
    q = fxc.compile(model, policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    seen = {}
    q.casts.fc2.register_full_backward_hook(lambda m, gi, go: seen.update(g=gi[0]))
    out = q(x)
    assert torch.all(out == FMT.max_value)
    q.loss(out, torch.zeros(4, dtype=torch.long)).backward()
    return seen["g"]


def test_a_wrong_class_at_the_ceiling_is_pushed_down_only_with_inward():
    formats = dict(activation="8.4", gradient="16.14", loss="16.10", weight="16.8", bias="16.8")
    clipped = _logit_gradients(Policy(**formats))
    inward = _logit_gradients(Policy(prediction_gradient="inward", **formats))
    assert torch.all(clipped == 0)  # the clamp's derivative: nothing moves a saturated logit
    # all ten logits are tied at the ceiling: the true class (0) would be pushed further up (dropped),
    # the nine wrong classes are pushed down, by softmax's 1/10 over the batch of 4
    assert torch.all(inward[:, 0] == 0)
    assert torch.allclose(inward[:, 1:], torch.full((4, 9), 0.1 / 4), atol=2 ** -14)


def test_telemetry_sees_the_same_gradients():
    from fxcompile.runtime import telemetry
    formats = dict(activation="8.4", gradient="16.14", loss="16.10", weight="16.8", bias="16.8")
    policy = Policy(prediction_gradient="inward", **formats)
    plain = _logit_gradients(policy)
    orig = fxc.compile

    def with_telemetry(*a, **k):
        q = orig(*a, **k)
        telemetry.enable(q, every=1)
        return q
    fxc.compile = with_telemetry
    try:
        counted = _logit_gradients(policy)
    finally:
        fxc.compile = orig
    assert torch.equal(plain, counted)


@pytest.mark.parametrize("value", ["outward", True, 1])
def test_a_bad_value_is_refused_naming_the_option(value):
    with pytest.raises(PolicyError, match="prediction_gradient"):
        Policy(prediction_gradient=value)
    with pytest.raises(PolicyError, match="prediction_gradient"):
        fxc.auto(prediction_gradient=value)


@pytest.mark.parametrize("policy", ["8bit", "auto:2"])
def test_cli_train_sets_it_on_a_named_or_auto_policy(tmp_path, capsys, policy):
    from fxcompile.cli import main
    from tests.experiments.test_imagefolder import make_folder
    make_folder(tmp_path / "imgs", per_class=4)
    data = ["--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "16"]
    main(["train", "--model", "tests.experiments.test_imagefolder:TinyCNN", *data, "--policy", policy,
          "--epochs", "1", "--batch-size", "8", "--prediction-gradient", "inward", "--save", str(tmp_path / "r.pt")])
    capsys.readouterr()
    saved = torch.load(tmp_path / "r.pt", weights_only=True)["fxcompile"]["policy"]
    saved = saved.get("auto", saved)
    assert saved["prediction_gradient"] == "inward"
    with pytest.raises(SystemExit, match="fp32"):
        main(["train", *data, "--policy", "fp32", "--prediction-gradient", "inward"])
