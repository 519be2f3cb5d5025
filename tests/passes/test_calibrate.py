import json

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.compiler import LossGraph
from fxcompile.experiments.models import MLP, ResidualCNN
from fxcompile.frontend import annotate_roles, expose_params, trace
from fxcompile.passes.calibrate import E_MIN, NodeStats, TensorStats, calibrate, calibration_json


def _graphs(model):
    gm = annotate_roles(expose_params(trace(model)))
    lg = annotate_roles(trace(LossGraph(nn.CrossEntropyLoss())), loss_graph=True)
    return gm, lg


def _np_hist(a: np.ndarray) -> dict[int, int]:
    a = np.abs(a[np.isfinite(a)])
    _, e = np.frexp(a[a != 0])
    vals, counts = np.unique(np.maximum(e, E_MIN), return_counts=True)
    return dict(zip(vals.tolist(), counts.tolist()))


def _hist(s: TensorStats) -> dict[int, int]:
    return {int(e): int(c) for e, c in zip(s.exponents, s.hist) if c}


def test_statistics_equal_those_of_hooks_on_the_float_model():
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=16)
    batches = [(torch.randn(8, 20), torch.randint(0, 10, (8,))) for _ in range(3)]
    gm, lg = _graphs(model)
    calibrate(gm, batches, loss_graph=lg)

    # oracle: plain PyTorch autograd with module hooks on the original model
    values, grads, wgrads = {"fc1": [], "relu1": []}, {"fc1": [], "relu1": []}, []
    def hook(name):
        def record(module, inputs, output):
            values[name].append(output.detach().clone())
            output.register_hook(lambda g: grads[name].append(g.clone()))
        return record
    for name in values:
        getattr(model, name).register_forward_hook(hook(name))
    for x, y in batches:
        model.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        wgrads.append(model.fc2.weight.grad.clone())
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in values:
        s = nodes[name].meta["fxc_stats"]
        v, g = torch.cat([t.flatten() for t in values[name]]), torch.cat([t.flatten() for t in grads[name]])
        assert s.value.count == v.numel()
        assert s.value.max_abs == pytest.approx(v.abs().max().item(), rel=1e-7)
        assert s.value.zeros == int((v == 0).sum())
        assert _hist(s.value) == _np_hist(v.numpy())
        assert s.gradient.max_abs == pytest.approx(g.abs().max().item(), rel=1e-6)
        assert _hist(s.gradient) == _np_hist(g.numpy())
        assert s.value.hist_sq.sum() == pytest.approx(float((v.double() ** 2).sum()), rel=1e-9)
    w = nodes["fc2_weight"].meta["fxc_stats"]
    wg = torch.cat([t.flatten() for t in wgrads])
    assert _hist(w.gradient) == _np_hist(wg.numpy())
    assert w.gradient.max_abs == pytest.approx(wg.abs().max().item(), rel=1e-6)
    # a value with one use: that use's gradient is the value's gradient
    relu = nodes["relu1"].meta["fxc_stats"]
    assert _hist(relu.uses["fc2"]) == _hist(relu.gradient)


def test_fan_out_records_each_use_and_their_sum():
    torch.manual_seed(0)
    model = ResidualCNN(width=4)
    gm, lg = _graphs(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    calibrate(gm, [(x, y)], loss_graph=lg)
    relu1 = next(n for n in gm.graph.nodes if n.name == "relu1").meta["fxc_stats"]
    assert set(relu1.uses) == {"conv2", "add"}
    assert relu1.gradient.count == relu1.uses["add"].count == relu1.value.count


def test_calibration_leaves_parameters_gradients_and_batch_norm_alone():
    torch.manual_seed(0)
    model = ResidualCNN(width=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    gm, lg = _graphs(model)
    calibrate(gm, [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))] * 2, loss_graph=lg)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert model.conv1.weight.grad is None


@pytest.mark.parametrize("bits,frac", [(8, 4), (8, 6), (16, 14), (6, 2)])
def test_overflow_and_underflow_rates_match_direct_quantization(bits, frac):
    g = torch.Generator().manual_seed(bits * 100 + frac)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-10, 6, (20000,), generator=g)
    fmt = fxc.fixed(bits, frac)
    edge = 2.0 ** (bits - 1 - frac)
    x = x[(x.abs() < fmt.max_value - 2 * fmt.scale) | (x.abs() >= edge)]  # the histogram cannot split the last step
    x[:100] = 0.0
    s = TensorStats().update(x)
    q = fmt.quantize(x)
    saturated = (x > fmt.max_value) | (x < fmt.min_value)
    assert s.overflow_rate(fmt) == pytest.approx(saturated.double().mean().item(), abs=1e-12)
    nonzero = x != 0
    assert s.underflow_rate(fmt) == pytest.approx(((q == 0) & nonzero).sum().item() / nonzero.sum().item(), abs=1e-12)
    assert s.zero_fraction == pytest.approx(100 / len(x))


@pytest.mark.parametrize("frac", [-2, 3, 8, 12])
def test_predicted_error_matches_measured_error(frac):
    g = torch.Generator().manual_seed(frac + 10)
    x = torch.randn(50000, generator=g, dtype=torch.float64) * 3
    s = TensorStats().update(x)
    fmt = fxc.fixed(8, frac)
    measured = float(((fmt.quantize(x) - x) ** 2).sum())
    assert s.squared_error(fmt) == pytest.approx(measured, rel=0.03)
    sr = fmt.replace(rounding="stochastic")
    measured_sr = float(((sr.quantize(x) - x) ** 2).sum())
    assert s.squared_error(sr) == pytest.approx(measured_sr, rel=0.06)
    # the vectorised table the solver uses agrees with the scalar model
    table = s.squared_errors(8, np.array([frac - 1, frac, frac + 1]))
    assert table[1] == pytest.approx(s.squared_error(fmt), rel=1e-12)


def test_statistics_round_trip_through_json():
    torch.manual_seed(0)
    gm, lg = _graphs(MLP(in_features=20, hidden=16))
    calibrate(gm, [(torch.randn(8, 20), torch.randint(0, 10, (8,)))], loss_graph=lg)
    data = json.loads(calibration_json(("", gm), ("loss.", lg)))
    assert "loss.prediction" in data
    node = next(n for n in gm.graph.nodes if n.name == "fc1")
    back = NodeStats.from_dict(data["fc1"])
    ours = node.meta["fxc_stats"]
    assert np.array_equal(back.value.hist, ours.value.hist) and np.allclose(back.gradient.hist_sq, ours.gradient.hist_sq)
    fmt = fxc.fixed(8, 5)
    assert back.value.noise_to_signal(fmt) == pytest.approx(ours.value.noise_to_signal(fmt))
