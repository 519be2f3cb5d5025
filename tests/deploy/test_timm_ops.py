"""The ops timm's CNNs write in their own way deploy bit-exactly: batch norms called as
functions with a module's buffers (timm's ``BatchNormAct2d``), in fx and torch.export graphs.
After training steps under the baseline policy, the simulation's eval forward, the integer
reference and ONNX Runtime agree on every output code, and the QDQ and QONNX flavours export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from tests.helpers import differing_codes
from fxcompile.core import ops
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.backends.qonnx import to_qonnx
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.deploy.fold_bn import fold_bn


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: ``F.batch_norm`` with its own buffers, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class FunctionalBN(nn.Module):
    def __init__(self, norm=BatchNormAct):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


class ModuleBN(FunctionalBN):
    def __init__(self):
        super().__init__(lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()))


def _trained(model, frontend="auto", steps=2):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    q = fxc.compile(model, fxc.baseline(), loss_fn=lambda out, y: F.cross_entropy(out.flatten(1), y),
                    example_inputs=(x[:2],), frontend=frontend)
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.5), q)
    for step in range(steps):
        opt.zero_grad()
        q.loss(q(x * (step + 1)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    return q.eval(), x


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_functional_batch_norm_is_the_module_form(frontend):
    torch.manual_seed(0)
    functional, module = FunctionalBN(), ModuleBN()
    module.load_state_dict({k.replace("bn.", "bn.0."): v for k, v in functional.state_dict().items()})
    qf, x = _trained(functional, frontend)
    qm, _ = _trained(module, frontend)
    # the same fixed-point definition, following the mode at run time, with the same statistics
    assert [n.target for n in qf.graph.nodes if n.target is ops.fixed_point_batch_norm] == [ops.fixed_point_batch_norm]
    bn = qf.get_submodule("bn")
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and int(bn.num_batches_tracked) == 2
    assert torch.equal(bn.running_var, qm.get_submodule("bn.0").running_var)
    assert not torch.equal(bn.running_var, torch.ones(4))
    test = torch.randn(64, 3, 8, 8) * 2
    with torch.no_grad():
        assert torch.equal(qf(test), qm(test))
        assert not torch.equal(qf(test), qf.train()(test))  # training mode: batch statistics
    assert differing_codes(qf.eval(), x, test)[:2] == (0, 0)


def test_a_functional_batch_norm_exports_in_every_flavour():
    q, x = _trained(FunctionalBN())
    test = torch.randn(16, 3, 8, 8)
    out, _ = onnx_session(to_onnx(integer_graph(q, (x[:2],)))).run(None, {"x": test.numpy()})
    for to in (to_qdq, to_qonnx):
        model = to(fold_bn(q), (x[:2],))
        assert any(node.op_type in ("Mul", "Add") for node in model.graph.node)
    (qdq,) = onnx_session(to_qdq(fold_bn(q), (x[:2],))).run(None, {"x": test.numpy()})[:1]
    assert qdq.shape == out.shape and abs(qdq - out).max() < 0.05


def test_a_functional_batch_norm_without_running_statistics_stays_as_it_is():
    class NoStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.batch_norm(self.a(x), None, None, training=True)

    q = fxc.compile(NoStats(), fxc.baseline(), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert [n.target for n in q.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)] \
        == [F.batch_norm]


class Head(nn.Module):  # timm's classifier heads: F.dropout(x, p, training=self.training)
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.dropout(torch.flatten(self.a(x), 1), p=0.5, training=self.training))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_functional_dropout_traced_in_training_mode_follows_the_mode(frontend):
    x = torch.randn(8, 3, 8, 8)
    q = fxc.compile(Head(), fxc.baseline(), example_inputs=(x[:2],), frontend=frontend)
    with torch.no_grad():
        assert not torch.equal(q.train()(x), q(x))  # dropout draws anew each call
        assert torch.equal(q.eval()(x), q(x))
    assert [op.op for op in integer_graph(q, (x[:2],)).ops if op.op in ("linear", "conv2d")] == ["conv2d", "linear"]


class GhostShortcut(nn.Module):  # ghostnet: a slice of a concatenation, then += the shortcut on it
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.a(x)
        out = torch.cat([y, self.b(y)], 1)
        out = out[:, :5]
        out += torch.cat([x, x[:, :2]], 1)
        return out


def test_an_in_place_op_on_a_slice_read_only_through_that_slice_deploys():
    from fxcompile.frontend.functionalize import write_back
    q, x = _trained(GhostShortcut(), steps=1)
    assert not any(n.target is write_back for n in q.graph.nodes)
    assert differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)[:2] == (0, 0)



class LayerScale(nn.Module):  # convnext: x.mul(gamma.reshape(1, -1, 1, 1)), and a scalar parameter
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.1)
        self.scale = nn.Parameter(torch.tensor(0.75))

    def forward(self, x):
        return x[:, :1] + self.a(x).mul(self.gamma.reshape(1, -1, 1, 1)) * self.scale


class Divisions(nn.Module):  # repvit's (head + head_dist) / 2, a division by 3, res2net's padded 3x3 pool
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.pool, self.pool2 = nn.AvgPool2d(3, 1, padding=1), nn.AvgPool2d(2, 1, padding=1)

    def forward(self, x):
        y = (self.a(x) + self.b(x)) / 2
        return torch.cat([self.pool(y / 3), self.pool2(y)[..., :8, :8] / 0.75], 1)


class ChannelsLastMean(nn.Module):  # mambaout's head: mean((1, 2)) of an NHWC tensor; a channel mean
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([y.permute(0, 2, 3, 1).mean((1, 2)), y.mean(1, keepdim=True).flatten(1)], 1)


MODELS = [FunctionalBN, GhostShortcut, LayerScale, Divisions, ChannelsLastMean]


@pytest.mark.parametrize("make", MODELS, ids=[m.__name__ for m in MODELS])
def test_deploys_with_zero_differing_codes_in_every_flavour(make):
    q, x = _trained(make())
    test = torch.randn(64, 3, 8, 8) * 2
    assert differing_codes(q, x, test)[:2] == (0, 0)
    out, _ = onnx_session(to_onnx(integer_graph(q, (x[:2],)))).run(None, {"x": test.numpy()})
    (qdq,) = onnx_session(to_qdq(fold_bn(q), (x[:2],))).run(None, {"x": test.numpy()})[:1]
    assert qdq.shape == out.shape and abs(qdq - out).max() <= 2 ** -6
    assert to_qonnx(fold_bn(q), (x[:2],)).graph.node


def test_a_product_with_a_constant_that_is_not_per_channel_is_refused_naming_the_node():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.rand(8))

        def forward(self, x):
            return self.a(x) * self.w

    x = torch.randn(2, 3, 8, 8)
    q = fxc.compile(Rows(), fxc.baseline(), example_inputs=(x,)).eval()
    with pytest.raises(fxc.ExportError, match=r"node 'mul' \(mul\): a product with a constant of shape \(8,\)"):
        integer_graph(q, (x,))


def test_a_division_by_a_constant_is_a_moved_binary_point_or_times_a_16_bit_reciprocal():
    assert ops.divisor_reciprocal(8) == (1, 3) and ops.divisor_reciprocal(0.25) == (1, -2)
    assert ops.divisor_reciprocal(3) == (43691, 17) and ops.divisor_reciprocal(49) == ops.reciprocal(49)
    c, r = ops.divisor_reciprocal(-1.4142135623730951)
    assert 2 ** 15 <= -c < 2 ** 16 and abs(c * 2.0 ** -r + 1 / 1.4142135623730951) <= 2.0 ** -(r + 1)
    q, x = _trained(Divisions())
    targets = [n.target for n in q.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.fixed_point_divide) == 2 and targets.count(ops.fixed_point_avg_pool2d) == 2  # every pool
    assert ops.op_of(q, next(n for n in q.graph.nodes if n.name == "truediv")).name == "truediv"  # / 2 stays
    codes = [op.op for op in integer_graph(q, (x[:2],)).ops]
    assert codes.count("scale") == 3 and codes.count("pad") == 2
    with pytest.raises(ValueError, match="finite non-zero constant divisor"):
        ops.divisor_reciprocal(0.0)


def test_a_division_whose_output_format_changed_after_compile_is_refused_naming_the_node():
    from fxcompile.core.formats import as_format
    q, x = _trained(Divisions())
    cast = q.casts.truediv_1
    cast.set_edge(cast.edge.__class__(**{**cast.edge.__dict__, "forward": as_format("8.3")}))
    with pytest.raises(fxc.ExportError, match=r"node 'truediv_1' \(truediv\): a division by 3 deploys only as"):
        integer_graph(q, (x[:2],))


class ZeroStart(nn.Module):  # focalnet: ctx_all = 0, then ctx_all = ctx_all + ctx * gate
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        total = 0
        for conv in (self.a, self.b):
            total = total + conv(x)
        return total


def test_a_sum_started_at_zero_deploys():
    q, x = _trained(ZeroStart())
    assert [op.op for op in integer_graph(q, (x[:2],)).ops].count("add") == 1
    assert differing_codes(q, x, torch.randn(64, 3, 8, 8) * 2)[:2] == (0, 0)
    (out,) = onnx_session(to_qdq(fold_bn(q), (x[:2],))).run(None, {"x": x.numpy()})[:1]
    assert out.shape == (8, 4, 8, 8)


def test_a_mean_over_other_dims_is_a_window_sum_times_a_reciprocal():
    q, x = _trained(ChannelsLastMean())
    assert [n.target for n in q.graph.nodes].count(ops.fixed_point_mean) == 2
    codes = [op.op for op in integer_graph(q, (x[:2],)).ops]
    assert codes.count("sum_pool2d") == 2 and codes.count("scale") == 1  # 64 values: c = 1; 6 channels: c != 1


def test_nearest_upsampling_writes_valid_qonnx():  # hrnet's and ghostnetv3's Upsample at QONNX's opset 11
    import onnx

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.interpolate(self.a(x), scale_factor=2, mode="nearest")

    q, x = _trained(Up())
    onnx.checker.check_model(to_qonnx(fold_bn(q), (x[:2],)), full_check=True)
    (qdq,) = onnx_session(to_qdq(fold_bn(q), (x[:2],))).run(None, {"x": x.numpy()})[:1]
    assert qdq.shape == (8, 4, 16, 16)
