"""The structural ops of CNNs (concatenation, slices and splits, reshapes and transposes,
padding, nearest upsampling, products of activations, stand-alone batch norm, grouped and
dilated convs, eval-time identities, shape bookkeeping) deploy bit-exactly: after a training
step under the baseline policy, the simulation's eval forward, the integer reference and ONNX
Runtime agree on every output code."""

from __future__ import annotations

import operator
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcompile as fxc
from tests.helpers import differing_codes
from fxcompile.core import ir, ops
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.deploy.fold_bn import fold_bn


def _conv(i, o, k=3, **kw):
    return nn.Conv2d(i, o, k, padding=kw.pop("padding", k // 2), **kw)


# ---- one small graph per op ----------------------------------------------------------------

class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _conv(3, 4), _conv(3, 2)

    def forward(self, x):
        return torch.cat([self.a(x), F.relu(self.b(x)), x], dim=1)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _conv(3, 3)

    def forward(self, x):
        return torch.stack([self.a(x), x], 2).flatten(1, 2)


class ViewTranspose(nn.Module):  # shufflenet's channel shuffle
    def __init__(self):
        super().__init__()
        self.a = _conv(3, 6)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return y.reshape(n, -1, h, w).permute(0, 2, 3, 1)


class Slices(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _conv(3, 6)

    def forward(self, x):
        y = self.a(x)
        parts = [y[:, 1:5:2], y[:, :, 1:, :-1][:, 4:, None, ...].squeeze(2), y[:, -1:, 2], y[..., ::3, 0]]
        return torch.cat([p.flatten(1) for p in parts], 1)


class Splits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _conv(3, 6)

    def forward(self, x):
        y = self.a(x)
        p, q = y.chunk(2, dim=1)
        r, s = torch.split(y, [2, 4], 1)
        u = y.unbind(1)
        return torch.cat([q, p, s, r, u[0].unsqueeze(1)], 1)


class Pad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.pad = _conv(3, 4), nn.ZeroPad2d((1, 0, 2, 1))

    def forward(self, x):
        return F.pad(self.pad(self.a(x)), (1, 1, 1, 1))


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.up = _conv(3, 4), nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        y = self.up(self.a(x))
        return F.interpolate(y, size=(y.shape[2] * 3, y.shape[3]), mode="nearest")


class CeilPool(nn.Module):  # squeezenet's and googlenet's max pools
    def __init__(self):
        super().__init__()
        self.a = _conv(3, 4)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)

    def forward(self, x):
        y = F.relu(self.a(x))
        return torch.cat([self.pool(y), F.max_pool2d(self.a(x), 3, 2, 1, ceil_mode=True)[..., 1:, :-1]], 1)


class Mul(nn.Module):  # a product of two activations, broadcast over the spatial axes
    def __init__(self):
        super().__init__()
        self.a, self.b = _conv(3, 4), nn.Conv2d(3, 4, 1)
        nn.init.constant_(self.b.bias, 0.5)  # a scale that the ReLU lets through

    def forward(self, x):
        return self.a(x) * F.relu(self.b(x.mean((2, 3), keepdim=True))) * 0.5


class StandaloneBN(nn.Module):  # a batch norm first in a block, and one after an add
    def __init__(self):
        super().__init__()
        self.bn0, self.a, self.bn1 = nn.BatchNorm2d(3), _conv(3, 3), nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.relu(self.bn0(x))
        return self.bn1(self.a(y) + x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = _conv(3, 6, groups=3)
        self.g = _conv(6, 4, padding=2, dilation=2, groups=2)
        self.d = _conv(4, 4, 3, padding=3, dilation=3, stride=2)

    def forward(self, x):
        return self.d(F.relu(self.g(F.relu(self.dw(x)))))


class Bookkeeping(nn.Module):  # timm-style shape checks, dropout and stochastic depth
    def __init__(self):
        super().__init__()
        self.a, self.drop = _conv(3, 4), nn.Dropout(0.5)
        self.drop_path = DropPath()

    def forward(self, x):
        b, c, h, w = x.shape
        torch._assert(h == 8, "input height")
        torch._assert(x.dim() == 4, "rank")
        y = self.drop_path(self.drop(self.a(x)))
        return y.view(b, -1, (h * w) // 2 - h // 4 * 2 + 4)


class DropPath(nn.Module):  # timm's class (timm.layers.drop.DropPath), random in training
    __module__ = "timm.layers.drop"

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


# ---- the blocks of real CNNs ---------------------------------------------------------------

class DenseBlock(nn.Module):  # densenet: BN → ReLU → conv on the concatenation so far
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.BatchNorm2d(3 + 2 * i), nn.ReLU(), _conv(3 + 2 * i, 2))
                                     for i in range(3)])
        self.norm = nn.BatchNorm2d(9)

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return F.relu(self.norm(torch.cat(features, 1)))


class ShuffleBlock(nn.Module):  # shufflenet v2: split, branch, concatenate, shuffle
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), _conv(4, 4, groups=4), nn.Conv2d(4, 4, 1),
                                    nn.ReLU())

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), 1)
        n, c, h, w = y.size()
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class SEBlock(nn.Module):  # squeeze-excitation: mean → conv → relu → conv → relu → multiply
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(_conv(3, 8), nn.ReLU())
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        s = F.relu(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return y * s


class SeparableNet(nn.Module):  # depthwise, dilated and grouped convs
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(3), _conv(3, 8), nn.ReLU(), _conv(8, 8, groups=8), nn.ReLU(),
                                 _conv(8, 8, padding=2, dilation=2, groups=4), nn.ReLU(),
                                 _conv(8, 4, stride=2, groups=2))

    def forward(self, x):
        return self.net(x)


class UNetBlock(nn.Module):  # down, nearest upsample, pad to the skip's size, concatenate
    def __init__(self):
        super().__init__()
        self.enc, self.down = _conv(3, 4), nn.Conv2d(4, 6, 3, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = _conv(10, 4)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        y = self.up(F.relu(self.down(skip)))
        dy, dx = skip.size(2) - y.size(2), skip.size(3) - y.size(3)
        y = F.pad(y, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.dec(torch.cat([skip, y], dim=1))


MODELS = [Cat, Stack, ViewTranspose, Slices, Splits, Pad, Upsample, CeilPool, Mul, StandaloneBN, Grouped, Bookkeeping,
          DenseBlock, ShuffleBlock, SEBlock, SeparableNet, UNetBlock]


def _trained(make, policy=None, shape=(3, 8, 8)):
    """``make()`` compiled under ``policy`` (baseline) and trained one step, in eval mode."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(8, *shape)
    classes = model.eval()(x).flatten(1).shape[1]
    target = torch.randint(0, classes, (8,))
    q = fxc.compile(model.train(), policy or fxc.baseline(), loss_fn=lambda out, y: F.cross_entropy(out.flatten(1), y),
                    example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=1.0), q)
    before = [p.detach().clone() for p in q.parameters()]
    opt.zero_grad()
    q.loss(q(x), target).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, q.parameters())), "the step changed nothing"
    return q.eval(), x


@pytest.mark.parametrize("make", MODELS, ids=[m.__name__ for m in MODELS])
def test_deploys_with_zero_differing_codes(make):
    q, x = _trained(make)
    test = torch.randn(64, 3, 8, 8) * 2
    sim_vs_ref, ort_vs_ref, graph = differing_codes(q, x, test)
    assert (sim_vs_ref, ort_vs_ref) == (0, 0)
    with torch.no_grad():  # the deployed model computes what the float model computes, roughly
        assert q(test).shape == make().eval()(test).shape


def test_torchvision_stochastic_depth_is_a_leaf_and_the_identity_when_deployed():
    class Block(nn.Module):  # as in torchvision's convnext/efficientnet blocks
        def __init__(self):
            super().__init__()
            self.a, self.sd = _conv(3, 4), torchvision.ops.StochasticDepth(0.5, "row")

        def forward(self, x):
            return x[:, :1] + self.sd(self.a(x))

    # narrow formats: 8-bit codes times 8-bit weights over 27 terms stay exact in float32
    policy = fxc.Policy(activation="8.4", gradient="16.10,stochastic", loss="16.10", weight="8.6", bias="8.4",
                        name="narrow")
    q, x = _trained(Block, policy)
    assert [n.op for n in q.graph.nodes if n.name == "sd"] == ["call_module"]
    assert differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)[:2] == (0, 0)


def test_cat_aligns_operands_at_different_binary_points():
    # uses without a format of their own (activation_in=None) see each value as produced
    policy = fxc.Policy(activation="16.8", activation_in=None, gradient="16.10,stochastic", loss="16.10",
                        weight="24.12,stochastic", bias="16.8,stochastic",
                        overrides=[{"pattern": "relu", "activation_out": "12.3"}])
    q, x = _trained(Cat, policy)
    sim_vs_ref, ort_vs_ref, graph = differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)
    assert sorted(graph.op_of("cat").attrs["shifts"]) == [0, 0, 5] and (sim_vs_ref, ort_vs_ref) == (0, 0)


@pytest.mark.parametrize("make", [ShuffleBlock, UNetBlock, SEBlock], ids=lambda m: m.__name__)
def test_graphs_captured_by_torch_export_deploy_too(make):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    q = fxc.compile(make().eval(), fxc.baseline(), frontend="export", example_inputs=(x[:2],)).eval()
    assert ir.FRONTEND.of(q) == "export"
    assert differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)[:2] == (0, 0)


def test_the_qdq_flavour_writes_the_structural_ops():
    q, x = _trained(ShuffleBlock)
    test = torch.randn(32, 3, 8, 8)
    out, _ = onnx_session(to_onnx(integer_graph(q, (x[:2],)))).run(None, {"x": test.numpy()})
    (qdq,) = onnx_session(to_qdq(fold_bn(q), (x[:2],))).run(None, {"x": test.numpy()})[:1]
    assert qdq.shape == out.shape and np.abs(qdq - out).max() < 0.05


def test_grouped_convs_keep_their_grouped_weight():
    q, x = _trained(Grouped)
    graph = integer_graph(q, (x[:2],))
    dw, g = graph.op_of("dw"), graph.op_of("g")
    assert tuple(dw.attrs["weight"].shape) == (6, 1, 3, 3) and dw.attrs["groups"] == 3
    assert tuple(g.attrs["weight"].shape) == (4, 3, 3, 3) and g.attrs["groups"] == 2
    assert graph.op_of("d").attrs["dilation"] == (3, 3) and "groups" not in graph.op_of("d").attrs


def test_size_bookkeeping_is_evaluated_and_dropped():
    q, x = _trained(Bookkeeping)
    graph = integer_graph(q, (x[:2],))
    assert [op.op for op in graph.ops] == ["quantize", "conv2d", "requantize", "reshape", "dequantize"]
    assert graph.op_of("view").attrs["shape"] == (0, 8, 32)
    with pytest.raises(fxc.ExportError, match=r"node '_assert' .*input height"):
        integer_graph(q, (torch.randn(2, 3, 6, 8),))


# ---- products of activations ---------------------------------------------------------------

def test_a_product_is_the_wide_integer_product_rounded_once():
    q, x = _trained(SEBlock)
    assert any(n.target is ops.fixed_point_mul for n in q.graph.nodes)
    mul = integer_graph(q, (x[:2],)).op_of("mul")
    assert mul.op == "mul" and mul.frac == 16  # two 16.8 operands: the product's binary point
    # the definition from Python integers, on products of more than 24 bits that a 16.4 output
    # does not saturate: there a float32 product would round
    spec = as_format("16.4")
    g = torch.Generator().manual_seed(0)
    ca, cb = (torch.randint(-8192, 8192, (200_000,), generator=g) for _ in range(2))
    a, b = ca.float() / 256, cb.float() / 256
    y = (ops.fixed_point_mul(a, b, spec.spec()) * 16).long()
    float32 = (spec.quantize(a * b) * 16).long()
    differ = (y != float32).nonzero().flatten().tolist()
    assert differ, "no product here is inexact in float32"
    for i in differ + list(range(2000)):
        exact = Fraction(int(ca[i]) * int(cb[i]), 2 ** 12)
        assert int(y[i]) == min(max(round(exact), -32768), 32767)  # round: ties to even


def test_a_float_product_too_wide_for_float32_is_refused_and_a_narrow_one_deploys():
    for policy, refused in ((fxc.baseline(), True), (fxc.Policy(activation="8.4", gradient="16.10,stochastic", loss="16.10", weight="24.12,stochastic",
                                 bias="16.8,stochastic"), False)):
        q, x = _trained(SEBlock, policy)
        (node,) = [n for n in q.graph.nodes if n.target is ops.fixed_point_mul]
        node.target, node.args = operator.mul, node.args[:2]  # as if compile() had not rewritten it
        q.recompile()
        if refused:
            with pytest.raises(fxc.ExportError, match=r"node 'mul' \(mul\).*32768 × 32768 > 2\*\*24"):
                integer_graph(q, (x[:2],))
        else:
            assert differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)[:2] == (0, 0)


def test_a_product_whose_output_format_changed_after_compile_refuses_to_export():
    q, x = _trained(SEBlock)
    cast = q.casts.mul
    cast.set_edge(cast.edge.__class__(**{**cast.edge.__dict__, "forward": as_format("8.3")}))
    with pytest.raises(fxc.ExportError, match=r"node 'mul' \(fixed_point_mul\).*changed after compile"):
        integer_graph(q, (x[:2],))


def test_product_backward_is_the_float_derivative():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 1, 1, requires_grad=True)
    y = ops.fixed_point_mul(a, b, as_format("16.8").spec())
    g = torch.randn_like(y)
    ga, gb = torch.autograd.grad(y, (a, b), g)
    ea, eb = torch.autograd.grad(a * b, (a, b), g)
    assert torch.allclose(ga, ea) and torch.allclose(gb, eb)


# ---- refusals --------------------------------------------------------------------------------

class BatchReshape(nn.Module):  # samples' elements spread over rows of another size
    def forward(self, x):
        return x.reshape(3, -1)


class BatchCat(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], 0)


class Bilinear(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear")


class FunctionalDropout(nn.Module):  # fx records self.training as the constant it was when traced
    def forward(self, x):
        return F.dropout(x, 0.2, self.training)


@pytest.mark.parametrize("make, message", [
    (BatchReshape, r"node 'reshape' \(reshape\): reshapes \(2, 3, 8, 8\) to \(3, 128\)"),
    (BatchCat, r"node 'cat' \(cat\): along the batch dimension does not lower"),
    (Bilinear, r"node 'interpolate' \(interpolate\): only nearest upsampling"),
])
def test_what_does_not_lower_is_refused_naming_the_node(make, message):
    x = torch.randn(2, 3, 8, 8)
    q = fxc.compile(make(), fxc.baseline(), example_inputs=(x,)).eval()
    with pytest.raises(fxc.ExportError, match=message):
        integer_graph(q, (x,))


def test_functional_dropout_traced_in_eval_mode_is_the_identity():
    x = torch.randn(2, 3, 8, 8)
    q = fxc.compile(FunctionalDropout().eval(), fxc.baseline(), example_inputs=(x,))
    assert [op.op for op in integer_graph(q, (x,)).ops] == ["quantize", "dequantize"]


class InPlaceHead(nn.Module):  # efficientnet's classifier: flatten, then an in-place dropout on that view
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.fc = _conv(3, 2), nn.Dropout(0.2, inplace=True), nn.Linear(2 * 8 * 8, 5)

    def forward(self, x):
        x = torch.flatten(F.relu(self.a(x)), 1)
        return self.fc(self.drop(x))


class InPlacePart(nn.Module):  # an in-place op on a slice: written back into part of the tensor
    def __init__(self):
        super().__init__()
        self.a = _conv(3, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        y[:, :2].mul_(2)
        return y


def test_an_in_place_op_on_a_whole_view_deploys_and_one_on_a_part_is_refused(tmp_path):
    q, x = _trained(InPlaceHead)
    # only the written view is read again: it is the op's result, and nothing is written back
    assert not any(ops.op_of(q, n) is ops.OPS["write_back"] for n in q.graph.nodes)
    assert differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)[:2] == (0, 0)
    q, x = _trained(InPlacePart)
    with pytest.raises(fxc.ExportError, match=r"'write_back' \(write_back\): an in-place op on a part"):
        integer_graph(q, (x[:2],))
