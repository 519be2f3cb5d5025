"""Batch-norm folding: the folded graph against PyTorch's own float batch norm."""

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN
from fxcompile.core import ops
from fxcompile.frontend.expose_params import batch_norm
from fxcompile.deploy.fold_bn import fold_bn
from fxcompile.deploy.lower import lower

WIDE = fxc.Policy(activation="32.20", weight="32.20", bias="32.20", gradient="16.10", loss="16.10")


def _random_statistics(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.3, 3, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is batch_norm]


def test_folded_graph_matches_float_batch_norm():
    torch.manual_seed(0)
    model = _random_statistics(ResidualCNN())
    x = torch.randn(8, 1, 28, 28)
    q = fxc.compile(model, WIDE, example_inputs=(x,), fold_batch_norm=True)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    folded = fold_bn(q).eval()
    assert len(_bn_nodes(q)) == 2 and not _bn_nodes(folded)
    with torch.no_grad():
        expected = model(x)  # PyTorch's conv + batch norm in float: an independent oracle
        assert torch.allclose(folded(x), expected, atol=1e-4, rtol=1e-4)
    for k, v in q.state_dict().items():  # the compiled model is left untouched
        assert torch.equal(v, before[k])


def _nearest(x, bits, frac):
    """x rounded half to even onto the signed narrow-range (symmetric, saturating) bits.frac grid."""
    lim = 2 ** (bits - 1) - 1
    return np.clip(np.rint(x * 2.0 ** frac), -lim, lim) / 2.0 ** frac


def test_folded_parameters_equal_the_documented_formula_exactly():
    # The module docstring: W' = W·s, b' = (b − μ)·s + β, s = γ / sqrt(σ² + ε) in float64 from the
    # quantized W, γ, β (these convolutions have no bias), then W' rounded to the weight format
    # (24.12) and b' to the batch norm's bias format (16.8), nearest.  Recomputed here in NumPy.
    torch.manual_seed(0)
    model = _random_statistics(ResidualCNN())
    q = fxc.compile(model, fxc.baseline(), example_inputs=(torch.randn(2, 1, 28, 28),), fold_batch_norm=True)
    folded = fold_bn(q)
    for name in ("conv1", "conv2"):
        bn = model.get_submodule(name.replace("conv", "bn"))
        w = _nearest(model.get_submodule(name).weight.detach().double().numpy(), 24, 12)
        gamma = _nearest(bn.weight.detach().double().numpy(), 24, 12)
        beta = _nearest(bn.bias.detach().double().numpy(), 16, 8)
        mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        s = gamma / np.sqrt(var + bn.eps)
        expected_w = _nearest(w * s.reshape(-1, 1, 1, 1), 24, 12)
        expected_b = _nearest((0.0 - mean) * s + beta, 16, 8)
        conv = folded.get_submodule(name)
        assert np.array_equal(conv.weight.detach().double().numpy(), expected_w), name
        assert np.array_equal(conv.bias.detach().double().numpy(), expected_b), name
        assert len(np.unique(expected_b)) == len(expected_b)   # not a degenerate all-equal bias


def test_batch_norm_after_a_shared_value_is_not_folded_but_stands_alone():
    class Shared(nn.Module):
        def __init__(self, **bn):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, **bn)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    x = torch.randn(2, 1, 6, 6)
    q = fxc.compile(Shared().eval(), fxc.baseline(), example_inputs=(x,))
    folded = fold_bn(q)
    assert [n.target for n in folded.graph.nodes if n.name == "bn"] == [ops.fixed_point_batch_norm]
    assert "affine" in [op.op for op in lower(folded, (x,)).ops]
    # without running statistics there is nothing to fold and no fixed affine map
    q = fxc.compile(Shared(track_running_stats=False).eval(), fxc.baseline(), example_inputs=(x,))
    folded = fold_bn(q)
    assert len(_bn_nodes(folded)) == 1
    with pytest.raises(fxc.ExportError, match="'bn' .*batch norm lowers folded.*or stand-alone with running"):
        lower(folded, (x,))
