"""Batch-norm folding: the folded graph against PyTorch's own float batch norm."""

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN
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
    q = fxc.compile(model, WIDE, example_inputs=(x,))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    folded = fold_bn(q).eval()
    assert len(_bn_nodes(q)) == 2 and not _bn_nodes(folded)
    with torch.no_grad():
        expected = model(x)  # PyTorch's conv + batch norm in float: an independent oracle
        assert torch.allclose(folded(x), expected, atol=1e-4, rtol=1e-4)
    for k, v in q.state_dict().items():  # the compiled model is left untouched
        assert torch.equal(v, before[k])


def test_folded_parameters_are_requantized_to_the_layer_formats():
    torch.manual_seed(0)
    model = _random_statistics(ResidualCNN())
    q = fxc.compile(model, fxc.baseline(), example_inputs=(torch.randn(2, 1, 28, 28),))
    folded = fold_bn(q)
    for name in ("conv1", "conv2"):
        conv = folded.get_submodule(name)
        assert fxc.fixed(24, 12).representable(conv.weight).all()
        assert fxc.fixed(16, 8).representable(conv.bias).all()  # the batch norm's bias format
        gamma = model.get_submodule(name.replace("conv", "bn"))
        scale = gamma.weight / torch.sqrt(gamma.running_var + gamma.eps)
        w = fxc.fixed(24, 12).quantize(model.get_submodule(name).weight * scale.view(-1, 1, 1, 1))
        assert torch.allclose(conv.weight, w, atol=2 ** -11)


def test_batch_norm_after_a_shared_value_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    x = torch.randn(2, 1, 6, 6)
    q = fxc.compile(Shared().eval(), fxc.baseline(), example_inputs=(x,))
    folded = fold_bn(q)
    assert len(_bn_nodes(folded)) == 1
    with pytest.raises(fxc.ExportError, match="'bn' .*batch norm folds only"):
        lower(folded, (x,))
