"""Batch-norm running statistics recomputed for the final weights."""

import copy

import pytest
import torch
from torch import nn

import fxcompile as fxc


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_statistics_are_the_average_over_the_batches_and_parameters_stay():
    model = _net()
    batches = [torch.randn(8, 1, 8, 8) * s + s for s in (1.0, 2.0, 3.0)]
    params = {k: v.clone() for k, v in model.named_parameters()}
    model[1].running_mean.fill_(50.0)
    assert fxc.recalibrate_batch_norms(model, iter(batches)) == 3
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, atol=1e-4)
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert model[1].momentum == 0.1 and not model.training


def test_a_compiled_model_with_stale_statistics_recovers_its_eval_outputs():
    x = torch.randn(64, 1, 8, 8)
    q = fxc.compile(_net(), fxc.baseline(), example_inputs=(x[:2],))
    reference = copy.deepcopy(q).train()
    with torch.no_grad():
        good = reference(x)  # batch statistics: what recalibrating on x gives eval mode
    bn = next(m for m in q.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.add_(3.0)  # stale: as if the weights had moved on
    q.eval()
    with torch.no_grad():
        stale = q(x)
    fxc.recalibrate_batch_norms(q, [x])
    with torch.no_grad():
        again = q(x)
    assert (stale - good).abs().max() > 0.5
    assert (again - good).abs().max() < 0.05  # the variance's n / (n - 1) and rounding apart, the same


def test_errors_name_the_model_and_keep_the_statistics():
    with pytest.raises(ValueError, match="Linear has no batch norm"):
        fxc.recalibrate_batch_norms(nn.Linear(2, 2), [torch.randn(1, 2)])
    model = _net()
    model[1].running_mean.fill_(7.0)
    with pytest.raises(ValueError, match="no batches given"):
        fxc.recalibrate_batch_norms(model, [])
    assert torch.all(model[1].running_mean == 7.0)
    with pytest.raises(RuntimeError):
        fxc.recalibrate_batch_norms(model, [torch.randn(2, 1, 8, 8), torch.randn(2, 3)])  # the second fails
    assert torch.all(model[1].running_mean == 7.0) and model[1].momentum == 0.1
