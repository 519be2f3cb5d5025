"""torchvision's Swin deploys integer-only: its shifted-window attention and patch merging,
functions ``torch.fx.wrap`` keeps whole, are written out while tracing for the example input's
shape (``fxcompile/frontend/windows.py``): padding to whole windows, the cyclic shift, the
windows moved into the batch axis, the relative-position bias, the attention mask of this size,
and the padding of an odd patch-merging input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session, verify
from fxcompile.errors import ExportError
from fxcompile.frontend import windows
from fxcompile.frontend.trace import trace

swin = pytest.importorskip("torchvision.models.swin_transformer")

# the functions fx keeps as leaf calls when it traces torchvision's Swin without shapes
_WRAPPED = {swin.shifted_window_attention, swin._patch_merging_pad, swin._get_relative_position_bias}


def _tiny(merging=None):
    # 20 x 20 images, patches of 4: a 5 x 5 stage (padded to 8 x 8 for windows of 4, shifted by 2,
    # so masked), an odd patch merging (padded to 6 x 6), then a 3 x 3 stage (one window, no shift)
    torch.manual_seed(0)
    kwargs = {}
    if merging:
        kwargs["downsample_layer"] = merging
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10, **kwargs)


def _leaf_calls(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _WRAPPED]


@pytest.mark.parametrize("merging", [None, "v2"])
def test_written_out_windows_equal_torchvision_at_any_batch(merging):
    model = _tiny(merging=swin.PatchMergingV2 if merging else None).eval()
    x = torch.randn(2, 3, 20, 20)
    gm = trace(model, example_inputs=(x,))
    assert _leaf_calls(gm) == []
    assert sum(n.target is torch.roll for n in gm.graph.nodes) == 2  # the shifted block: shift and back
    y = torch.randn(5, 3, 20, 20)  # traced at batch 2, run at 5
    with torch.no_grad():
        assert torch.allclose(gm.eval()(y), model(y), atol=1e-5)
    assert model.training is False and all(not m.training for m in model.modules())


def test_tracing_keeps_the_training_flags():
    model = _tiny().train()
    trace(model, example_inputs=(torch.randn(2, 3, 20, 20),))
    assert all(m.training for m in model.modules())


def test_attention_mask_is_torchvisions():
    # torchvision builds the mask inside shifted_window_attention; with scores of 0 and no bias
    # its softmax rows are uniform over the tokens the mask leaves at 0
    mask = windows.attention_mask(8, 8, (4, 4), (2, 2))
    assert mask.shape == (1, 4, 1, 16, 16)
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    assert (mask[0, 0] == 0).all()  # the first window holds one region only
    last = mask[0, 3, 0]  # the last window holds four regions of 2 x 2 tokens: 4 unmasked per row
    assert (last == 0).sum(-1).tolist() == [4] * 16 and torch.equal(last, last.T)


def test_torchvision_swin_deploys_exactly(tmp_path):
    model = _tiny()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 20, 20)
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    q.loss(q(x), torch.randint(0, 10, (8,))).backward()
    opt.step()
    q.eval()
    test = torch.randn(16, 3, 20, 20) * 2
    model_int = export_onnx(q, tmp_path / "int.onnx", (test[:1],))
    result = verify(q, model_int, test)
    assert result["outputs"] == 160
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    graph = integer_graph(q, (test[:1],))
    names = [op.op for op in graph.ops]
    assert names.count("constant") == 5  # a relative-position bias per block, the shifted block's mask
    (codes,) = onnx_session(model_int).run(None, {"x": test.numpy()})[1:]
    assert np.unique(codes).size > 20
    frac = graph.op_of(graph.outputs[0]).frac
    (qdq,) = onnx_session(export_onnx(q, tmp_path / "qdq.onnx", (test[:1],), flavour="qdq")).run(
        None, {"x": test.numpy()})
    assert np.abs(np.round(qdq.astype(np.float64) * 2.0 ** frac) - codes).max() <= 16
    export_onnx(q, tmp_path / "qonnx.onnx", (test[:1],), flavour="qonnx")


def test_without_example_inputs_export_names_the_attention():
    q = fxc.compile(_tiny(), fxc.baseline()).eval()
    assert _leaf_calls(q)
    with pytest.raises(ExportError, match="shifted_window_attention"):
        integer_graph(q, (torch.randn(1, 3, 20, 20),))


# ---- maxvit: the grid partition's swapaxes, MBConv, relative-position attention ------------------

class Swapped(nn.Module):
    def forward(self, x):  # (B, 2, 3, 4, 5)
        return torch.swapaxes(x, -2, -3).swapdims(1, 2) + torch.swapaxes(x, axis0=2, axis1=3).swapaxes(1, 2)


def test_swapaxes_is_a_transpose(tmp_path):
    x = torch.randn(6, 2, 3, 4, 5)
    q = fxc.compile(Swapped(), fxc.baseline(), example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:1],))
    assert [op.op for op in graph.ops].count("transpose") == 4
    model = export_onnx(q, tmp_path / "int.onnx", (x[:1],))
    result = verify(q, model, x)
    assert result["outputs"] == x.numel() and result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    export_onnx(q, tmp_path / "qdq.onnx", (x[:1],), flavour="qdq")


def test_torchvision_maxvit_deploys_exactly(tmp_path):
    maxvit = pytest.importorskip("torchvision.models.maxvit")
    torch.manual_seed(0)
    # 8 x 8 images: the stem's 4 x 4, a block of 2 x 2 in windows and grids of 2
    model = maxvit.MaxVit(input_size=(8, 8), stem_channels=8, block_channels=[16], block_layers=[1],
                          head_dim=8, stochastic_depth_prob=0.2, partition_size=2, num_classes=10)
    for m in model.modules():  # MaxVit's init (std 0.02) leaves its outputs nearly the same for every input
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    x = torch.randn(8, 3, 8, 8)
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    q.loss(q(x), torch.randint(0, 10, (8,))).backward()
    opt.step()
    q.eval()
    test = torch.randn(16, 3, 8, 8) * 2
    model_int = export_onnx(q, tmp_path / "int.onnx", (test[:1],))
    result = verify(q, model_int, test)
    assert result["outputs"] == 160
    assert result["mismatches"] == 0 and result["simulation_mismatches"] == 0
    graph = integer_graph(q, (test[:1],))
    (codes,) = onnx_session(model_int).run(None, {"x": test.numpy()})[1:]
    assert np.unique(codes).size > 20
    frac = graph.op_of(graph.outputs[0]).frac
    (qdq,) = onnx_session(export_onnx(q, tmp_path / "qdq.onnx", (test[:1],), flavour="qdq")).run(
        None, {"x": test.numpy()})
    assert np.abs(np.round(qdq.astype(np.float64) * 2.0 ** frac) - codes).max() <= 16
    export_onnx(q, tmp_path / "qonnx.onnx", (test[:1],), flavour="qonnx")
