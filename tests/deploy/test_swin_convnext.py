"""Swin and ConvNeXt deploy integer-only: layer scale (a product with a parameter, as a
fixed-point product), channels-last LayerNorm, windows merged into the batch axis and split off
it again, ``torch.roll``, a relative-position bias table gathered by a constant index, the
attention mask (a float buffer) added to the scores, the attention scale (a number that is no
power of two) and the channels-last global average.  Small blocks of torchvision and timm
train a step under ``baseline`` and export with 0 differing output codes between the
simulation, the integer reference and ONNX Runtime; QDQ and QONNX export too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session, verify
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.errors import ExportError


def _trained(model, shape, classes, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(8, *shape)
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    before = [p.detach().clone() for p in q.parameters()]
    loss = q.loss(q(x), torch.randint(0, classes, (8,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, q.parameters()))
    return q.eval()


def _deploys_exactly(q, shape, tmp_path, images=24):
    x = torch.randn(images, *shape) * 2
    model = export_onnx(q, tmp_path / "int.onnx", (x[:1],))
    result = verify(q, model, x)
    assert result["outputs"] > 0
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    (codes,) = onnx_session(model).run(None, {"x": x.numpy()})[1:]
    assert np.unique(codes).size > 20  # the outputs are not trivially constant
    graph = integer_graph(q, (x[:1],))
    (qdq,) = onnx_session(export_onnx(q, tmp_path / "qdq.onnx", (x[:1],), flavour="qdq")).run(None, {"x": x.numpy()})
    frac = graph.op_of(graph.outputs[0]).frac
    assert np.abs(np.round(qdq.astype(np.float64) * 2.0 ** frac) - codes).max() <= 16
    export_onnx(q, tmp_path / "qonnx.onnx", (x[:1],), flavour="qonnx")  # checked by onnx's full check
    return graph


class ConvNeXtTV(nn.Module):
    """torchvision's ConvNeXt stem and two blocks (layer scale of shape (C, 1, 1), LayerNorm2d)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import CNBlock, LayerNorm2d
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16))
        self.blocks = nn.Sequential(CNBlock(16, 0.5, 0.0), CNBlock(16, 0.5, 0.0))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_torchvision_convnext_blocks_deploy_exactly(tmp_path):
    q = _trained(ConvNeXtTV(), (3, 16, 16), 10)
    graph = _deploys_exactly(q, (3, 16, 16), tmp_path)
    names = [op.op for op in graph.ops]
    # the layer scales (per-channel products: affine), the norms
    assert names.count("affine") == 2 and names.count("layer_norm") == 3


def test_timm_convnext_deploys_exactly(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=10,
                                          ls_init_value=0.5)
    q = _trained(model, (3, 32, 32), 10)
    _deploys_exactly(q, (3, 32, 32), tmp_path)


def test_timm_swin_deploys_exactly(tmp_path):
    # 8 x 8 tokens in windows of 4: the second block's windows are shifted (roll, attention mask)
    timm = pytest.importorskip("timm")
    model = timm.models.swin_transformer.SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2,),
                                                         num_heads=(2,), window_size=4, num_classes=10)
    q = _trained(model, (3, 16, 16), 10)
    graph = _deploys_exactly(q, (3, 16, 16), tmp_path)
    names = [op.op for op in graph.ops]
    assert names.count("constant") == 3  # one relative-position bias per block, the shifted block's mask
    assert "scale" in names  # q times head_dim ** -0.5


# ---- the ops, one by one ---------------------------------------------------------------------

class Rolled(nn.Module):
    def forward(self, x):
        return torch.roll(x, shifts=(-1, 2), dims=(2, 3))


class Windows(nn.Module):
    """Windows of 2 x 2 into the batch axis, and back (swin's partition and reverse)."""

    def forward(self, x):
        b, h, w, c = x.shape
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, c)
        x = x * 2
        return x.view(-1, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


@pytest.mark.parametrize("make, shape", [(Rolled, (3, 4, 6)), (Windows, (4, 6, 3))])
def test_moves_equal_torch_at_any_batch(make, shape):
    x = torch.randn(5, *shape)
    q = fxc.compile(make(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:1],))  # lowered for one sample, run on five
    (out,) = run_integer(graph, x)
    with torch.no_grad():
        assert torch.equal(out, q(x))
    (ort,) = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})[:1]
    assert np.array_equal(ort, out.numpy())


class Biased(nn.Module):
    """Scores plus a bias table gathered by a constant index, plus a float mask buffer."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]))
        self.register_buffer("mask", torch.tensor([[0.0, -100.0, 0.0, -100.0]] * 4))

    def forward(self, x):  # x: (B, 2, 4, 4)
        bias = self.table[self.index.view(-1)].view(4, 4, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return (x + bias) + self.mask.unsqueeze(0).unsqueeze(0)


def test_gathered_bias_and_mask_are_constants(tmp_path):
    x = torch.randn(6, 2, 4, 4)
    q = fxc.compile(Biased(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:1],))
    assert [op.op for op in graph.ops].count("constant") == 2  # the bias, and the mask at the scores' binary point
    (out,) = run_integer(graph, x)
    with torch.no_grad():
        assert torch.equal(out, q(x))
    model = export_onnx(q, tmp_path / "int.onnx", (x[:1],))
    assert verify(q, model, x)["mismatches"] == 0
    export_onnx(q, tmp_path / "qdq.onnx", (x[:1],), flavour="qdq")


class OffGridMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.full((4,), 1e-5))

    def forward(self, x):
        return x + self.mask


def test_a_mask_off_the_grid_is_refused_naming_the_node():
    x = torch.randn(2, 4)
    q = fxc.compile(OffGridMask(), fxc.baseline(), example_inputs=(x,)).eval()
    with pytest.raises(ExportError, match=r"node 'add' \(add\): a constant operand lowers only on its other"):
        integer_graph(q, (x,))


class Scaled(nn.Module):
    def forward(self, x):
        return x * 32 ** -0.5


def test_a_product_with_a_number_is_exact():
    # float32 rounds code x 0.1767766... (16 + 24 bits); the definition is the exact product rounded once
    x = (torch.arange(-32768, 32768, dtype=torch.float32) / 256).reshape(256, 256)
    q = fxc.compile(Scaled(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    assert any(n.target is ops.fixed_point_mul for n in q.graph.nodes)
    m, e = ops.scalar_codes(32 ** -0.5)
    exact = torch.round(x.double() * 256 * m / 2.0 ** e) / 256  # ties: none at these codes
    with torch.no_grad():
        sim = q(x)
    assert torch.equal(sim.double(), exact)
    assert (x * (32 ** -0.5) * 256).round().ne(exact * 256).any()  # the float32 product alone differs
    graph = integer_graph(q, (x[:1],))
    assert "scale" in [op.op for op in graph.ops]
    (out,) = run_integer(graph, x)
    assert torch.equal(out, sim)


def test_channels_last_mean_is_a_fixed_point_mean():
    class Head(nn.Module):
        def forward(self, x):
            return x.mean((1, 2))
    x = torch.randn(4, 3, 5, 6)  # 15 values: not a power of two
    q = fxc.compile(Head(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    assert any(n.target is ops.fixed_point_mean for n in q.graph.nodes)
    graph = integer_graph(q, (x[:1],))
    (out,) = run_integer(graph, x)
    with torch.no_grad():
        assert torch.equal(out, q(x))


def test_roll_of_the_flattened_tensor_is_refused_naming_the_node():
    class Flat(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1)
    x = torch.randn(2, 4)
    q = fxc.compile(Flat(), fxc.baseline(), example_inputs=(x,)).eval()
    with pytest.raises(ExportError, match=r"node 'roll' \(roll\): rolling the flattened tensor does not lower"):
        integer_graph(q, (x,))
