"""Vision transformers deploy integer-only: a class token expanded over the batch, position
embeddings added, q/k/v split by a permutation that moves the batch axis and unbound, the
attention scale from sizes, ``x[:, 0]``; torchvision's ``nn.MultiheadAttention`` and timm's
``F.scaled_dot_product_attention`` written out in registry ops while tracing.  Each small
model trains a step under ``baseline`` and exports with 0 differing output codes between the
simulation, the integer reference and ONNX Runtime; QDQ and QONNX export too."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session, verify
from fxcompile.errors import ExportError
from fxcompile.frontend.trace import trace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from vit_fashion_mnist import ViT  # noqa: E402


def _trained(model, shape, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(8, *shape)
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    before = [p.detach().clone() for p in q.parameters()]
    loss = q.loss(q(x), torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, q.parameters()))
    return q.eval()


def _deploys_exactly(q, shape, tmp_path):
    x = torch.randn(24, *shape) * 2
    model = export_onnx(q, tmp_path / "int.onnx", (x[:1],))
    result = verify(q, model, x)
    assert result["outputs"] == 24 * 10
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    graph = integer_graph(q, (x[:1],))
    (codes,) = onnx_session(model).run(None, {"x": x.numpy()})[1:]
    assert np.unique(codes).size > 50  # the outputs are not trivially constant
    # QDQ runs float MatMul/Softmax/LayerNormalization between its pairs: close to the integer graph
    (qdq,) = onnx_session(export_onnx(q, tmp_path / "qdq.onnx", (x[:1],), flavour="qdq")).run(None, {"x": x.numpy()})
    frac = graph.op_of(graph.outputs[0]).frac
    assert np.abs(np.round(qdq.astype(np.float64) * 2.0 ** frac) - codes).max() <= 16
    export_onnx(q, tmp_path / "qonnx.onnx", (x[:1],), flavour="qonnx")  # checked by onnx's full check
    return graph


def test_example_vit_deploys_exactly(tmp_path):
    q = _trained(ViT(dim=32, depth=1, heads=2, hidden=64), (1, 28, 28))
    graph = _deploys_exactly(q, (1, 28, 28), tmp_path)
    kinds = [op.op for op in graph.ops]
    assert {"constant", "expand", "concat", "softmax", "layer_norm", "matmul"} <= set(kinds)
    # the permuted qkv unbound along its first axis: one slice per part, no transpose of the batch
    assert all(op.attrs["perm"][0] == 0 for op in graph.ops if op.op == "transpose")


def test_torchvision_vit_multihead_attention_is_written_out(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    gm = trace(model)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)
                   for n in gm.graph.nodes)
    q = _trained(model, (3, 16, 16))
    assert sum(n.target is ops.fixed_point_matmul for n in q.graph.nodes) == 2
    _deploys_exactly(q, (3, 16, 16), tmp_path)


def test_timm_vit_fused_attention_is_written_out(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1,
                                                             num_heads=2, num_classes=10)
    assert model.blocks[0].attn.fused_attn  # F.scaled_dot_product_attention when run
    gm = trace(model, example_inputs=(torch.randn(2, 3, 16, 16),))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]  # attn_mask, is_causal fixed
    assert not any(n.target is torch.nn.functional.scaled_dot_product_attention for n in gm.graph.nodes)
    q = _trained(model, (3, 16, 16))
    _deploys_exactly(q, (3, 16, 16), tmp_path)


def test_multihead_attention_that_is_not_self_attention_stays_a_leaf():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, y):
            return self.attn(x, y, y, need_weights=False)[0]

    gm = trace(Cross())
    assert any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)
    x, y = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(gm(x, y), Cross.forward(gm, x, y))


def test_written_out_attention_computes_what_the_module_computes():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    gm, x = trace(Self()), torch.randn(3, 5, 16)
    torch.testing.assert_close(gm(x), mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = torch.randn(3, 3, 2, 5, 8).unbind(0)

    class Fused(nn.Module):
        def forward(self, q, k, v):
            return sdpa(q, k, v)

    fused = trace(Fused())
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored after tracing
    torch.testing.assert_close(fused(q, k, v), sdpa(q, k, v), atol=1e-5, rtol=1e-5)


class _Permuted(nn.Module):
    def __init__(self, use: str):
        super().__init__()
        self.use, self.proj = use, nn.Linear(8, 12)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.proj(x).view(b, t, 3, 4).permute(2, 0, 1, 3)
        if self.use == "unbind":
            q, k, v = qkv.unbind(0)
            return q + k + v
        if self.use == "index":
            return qkv[0] - qkv[2]
        return qkv.flatten(2)  # not a split of the first axis


@pytest.mark.parametrize("use", ["unbind", "index"])
def test_a_permutation_moving_the_batch_lowers_when_split_along_its_first_axis(use):
    q = fxc.compile(_Permuted(use), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(torch.randn(2, 5, 8),))
    q.eval()
    x = torch.randn(6, 5, 8)
    graph = integer_graph(q, (x[:1],))
    from fxcompile.deploy.backends.integer import run_integer
    (codes,) = run_integer(graph, x, codes=True)
    with torch.no_grad():
        sim = torch.round(q(x).double() * 2.0 ** graph.op_of(graph.outputs[0]).frac).long()
    assert torch.equal(codes, sim) and codes.abs().sum() > 0
    (qdq,) = onnx_session(to_qdq(q, (x[:1],))).run(None, {"x": x.numpy()})  # the float flavour takes it too
    qdq = np.round(qdq.astype(np.float64) * 2.0 ** graph.op_of(graph.outputs[0]).frac)
    assert qdq.shape == tuple(codes.shape) and np.abs(qdq - codes.numpy()).max() <= 1


def test_a_permutation_moving_the_batch_used_otherwise_is_refused_naming_it():
    q = fxc.compile(_Permuted("sum"), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(torch.randn(2, 5, 8),))
    with pytest.raises(ExportError, match=r"'permute'.*moves the batch dimension"):
        integer_graph(q, (torch.randn(1, 5, 8),))


def test_division_by_a_constant_moves_the_binary_point_or_deploys_its_fixed_point_definition():
    class Div(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k, self.lin = k, nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) / self.k

    x = torch.randn(2, 4)
    exact = fxc.compile(Div(4.0), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(x,)).eval()
    graph = integer_graph(exact, (x,))
    from fxcompile.deploy.backends.integer import run_integer
    (y,) = run_integer(graph, x)
    with torch.no_grad():
        assert torch.equal(y, exact(x))
    # by 3: its fixed-point definition (times the 16-bit reciprocal, rounded once) deploys exactly
    q = fxc.compile(Div(3.0), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(x,)).eval()
    (y,) = run_integer(integer_graph(q, (x,)), x)
    with torch.no_grad():
        assert torch.equal(y, q(x))


def test_sizes_through_sqrt_are_evaluated_for_the_example_shape():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(x) * (1.0 / math.sqrt(x.shape[-1]))  # 1/4

    x = torch.randn(3, 16)
    q = fxc.compile(Scaled(), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(x,)).eval()
    assert any(n.target is math.sqrt for n in q.graph.nodes)
    graph = integer_graph(q, (x[:1],))
    from fxcompile.deploy.backends.integer import run_integer
    (y,) = run_integer(graph, x)
    with torch.no_grad():
        assert torch.equal(y, q(x))


def test_defaults_after_the_example_inputs_are_traced_as_constants():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask=None, flag=False):
            y = self.lin(x)
            if mask is not None or flag:
                y = y * 2
            return y

    gm = trace(Masked(), example_inputs=(torch.randn(2, 4),))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any(n.target is torch._assert for n in gm.graph.nodes)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), gm.lin(x))
