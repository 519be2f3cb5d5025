"""Stand-alone batch norms: rewritten into their fixed-point definition (a per-channel affine
map with a 16-significant-bit scale, rounded once by the output cast's format); those right
after a conv/linear are left for fold_bn."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import integer_graph


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0, self.conv, self.bn1 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(F.relu(self.bn0(x))))


def _randomised(bn: nn.BatchNorm2d, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.1, 4, generator=g)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    return bn


@pytest.mark.parametrize("fold, bn1", [(False, ops.fixed_point_batch_norm), (True, ops.batch_norm)])
def test_every_batch_norm_is_rewritten_unless_folding_is_asked_for(fold, bn1):
    q = fxc.compile(Block(), fxc.baseline(), example_inputs=(torch.randn(2, 3, 6, 6),), fold_batch_norm=fold)
    targets = {n.name: n.target for n in q.graph.nodes if n.name in ("bn0", "bn1")}
    assert targets == {"bn0": ops.fixed_point_batch_norm, "bn1": bn1}


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


@pytest.mark.parametrize("fold", [False, True])
def test_a_trained_conv_and_batch_norm_deploys_exactly_unless_folded(fold):
    torch.manual_seed(0)
    x = torch.randn(256, 2, 8, 8) * 2
    net = ConvBN()
    _randomised(net.bn)
    q = fxc.compile(net, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],), fold_batch_norm=fold)
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.1), q)
    q.loss(q(x[:32]), torch.arange(32) % 4).backward()
    opt.step()
    q.eval()
    graph = integer_graph(q, (x[:2],))
    (reference,) = run_integer(graph, x)
    with torch.no_grad():
        differing = int((q(x) != reference).sum())
    if fold:
        assert differing > 0  # the folded weights are rounded again: a few codes differ
    else:
        assert differing == 0


def test_affine_is_16_significant_bits_of_scale_and_the_offset_at_the_output_point():
    bn = _randomised(nn.BatchNorm2d(5)).eval()
    s, s_frac, t = ops.batch_norm_affine(bn, bn.weight, bn.bias, 8)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    assert 2 ** 15 <= int(s.abs().max()) <= 2 ** 16
    assert torch.all((s.double() * 2.0 ** -s_frac - scale).abs() <= 2.0 ** -(s_frac + 1) + 1e-12)
    offset = bn.bias.double() - bn.running_mean.double() * scale
    assert torch.all((t.double() / 256 - offset).abs() <= 2.0 ** -9 + 1e-12)


def test_eval_forward_is_the_affine_map_rounded_once_and_training_keeps_batch_statistics():
    bn = _randomised(nn.BatchNorm2d(3))
    fmt = as_format("16.8")
    x = torch.round(torch.randn(4, 3, 5, 5) * 3 * 256) / 256
    y = ops.fixed_point_batch_norm(x, bn.eval(), bn.weight, bn.bias, fmt.spec())
    s, s_frac, t = ops.batch_norm_affine(bn, bn.weight, bn.bias, 8)
    codes = (x * 256).long()
    for (n, c, h, w) in [(0, 0, 0, 0), (1, 1, 2, 3), (3, 2, 4, 4), (2, 0, 1, 1)]:
        exact = Fraction(int(codes[n, c, h, w]) * int(s[c]), 2 ** (8 + s_frac)) + Fraction(int(t[c]), 256)
        assert float(y[n, c, h, w]) * 256 == min(max(round(exact * 256), -32768), 32767)
    bn.train()
    y_train = ops.fixed_point_batch_norm(x, bn, bn.weight, bn.bias, fmt.spec())
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(y_train, expected, atol=1e-5)


def test_eval_backward_is_the_scale():
    bn = _randomised(nn.BatchNorm2d(3)).eval()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = ops.fixed_point_batch_norm(x, bn, bn.weight.detach(), bn.bias.detach(), as_format("16.8").spec())
    (grad,) = torch.autograd.grad(y.sum(), x)
    s, s_frac, _ = ops.batch_norm_affine(bn, bn.weight, bn.bias, 8)
    assert torch.allclose(grad, (s.float() * 2.0 ** -s_frac).view(1, 3, 1, 1).expand_as(x))
