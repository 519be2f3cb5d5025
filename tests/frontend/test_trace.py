"""Pass trace: fx and export front-ends, leaf modules, errors that say what to do."""
import pytest
import torch
from torch import nn

from fxcompile import TraceError
from fxcompile.frontend import trace


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = Block()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_fx_front_end_reproduces_the_model():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 3)
    gm = trace(model)
    assert gm.meta["fxc_frontend"] == "fx"
    assert torch.equal(gm(x), model(x))
    assert _targets(gm) == ["inp", "block.fc", "out"]


@pytest.mark.parametrize("leaf", [Block, "block", "bl*"])
def test_leaf_modules_by_type_or_pattern(leaf):
    gm = trace(Net(), leaf_modules=[leaf])
    assert _targets(gm) == ["inp", "block", "out"]


class Loop(nn.Module):
    def forward(self, x):
        return sum(row for row in x)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(nn.ReLU(), Loop())

    def forward(self, x):
        return self.stage(x)


def test_iteration_error_names_the_submodule_and_the_line():
    with pytest.raises(TraceError) as info:
        trace(Holder(), frontend="fx")
    msg = str(info.value)
    assert "'stage.1' (Loop)" in msg
    assert "sum(row for row in x)" in msg and "test_trace.py" in msg
    assert "leaf_modules=['stage.1']" in msg
    gm = trace(Holder(), leaf_modules=["stage.1"])
    x = torch.randn(3, 2)
    assert torch.equal(gm(x), Holder()(x))


class TopLevelBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_top_level_failure_suggests_export():
    with pytest.raises(TraceError) as info:
        trace(TopLevelBranch(), frontend="fx")
    msg = str(info.value)
    assert "top-level module (TopLevelBranch)" in msg and "frontend='export'" in msg
    assert "control flow" in msg
    assert isinstance(info.value.__cause__, Exception)  # the original error stays attached


def test_export_front_end():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 3)
    gm = trace(model, frontend="export", example_inputs=(x,))
    assert gm.meta["fxc_frontend"] == "export"
    assert torch.equal(gm(x), model(x))
    x9 = torch.randn(9, 3)
    assert torch.equal(gm(x9), model(x9))
    gm.eval()
    gm.train()  # a plain GraphModule: training loops may switch modes
    params = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert set(params) == {"inp.weight", "inp.bias", "block.fc.weight", "block.fc.bias", "out.weight", "out.bias"}


def test_auto_uses_fx_when_it_works_and_warns_when_it_falls_back():
    x = torch.randn(2, 3)
    assert trace(Net(), frontend="auto", example_inputs=(x,)).meta["fxc_frontend"] == "fx"

    class ShapeBranch(nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 1 else x

    with pytest.warns(UserWarning, match="Falling back"):
        gm = trace(ShapeBranch(), frontend="auto", example_inputs=(x,))
    assert gm.meta["fxc_frontend"] == "export"
    with pytest.raises(TraceError, match="control flow"):  # no example inputs: nothing to fall back to
        trace(ShapeBranch(), frontend="auto")


def test_auto_keeps_what_fx_cannot_trace_as_a_leaf_when_export_cannot_help():
    with pytest.warns(UserWarning, match="as leaf modules"):
        gm = trace(Holder())  # no example inputs: torch.export cannot be tried
    assert gm.meta["fxc_frontend"] == "leaf"
    assert "stage.1 (Loop)" in gm.meta["fxc_frontend_reason"] and "torch.fx failed" in gm.meta["fxc_frontend_reason"]
    assert _targets(gm) == ["stage.0", "stage.1"]
    x = torch.randn(3, 2)
    assert torch.equal(gm(x), Holder()(x))
    with pytest.raises(TraceError, match="Pass example_inputs"):  # nothing to keep as a leaf at the top level
        trace(TopLevelBranch())


class SamePad(nn.Module):
    """TensorFlow-style "same" padding computed from the input's size (EfficientNet-TF, timm's Conv2dSame)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pad_h = max((-(-ih // 2) - 1) * 2 + 3 - ih, 0)
        pad_w = max((-(-iw // 2) - 1) * 2 + 3 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return self.fc(self.conv(x).mean((2, 3)))


def test_auto_captures_size_dependent_padding_with_a_symbolic_batch():
    torch.manual_seed(0)
    model = SamePad()
    with pytest.warns(UserWarning, match="Falling back"):
        gm = trace(model, example_inputs=(torch.randn(1, 2, 9, 9),))
    assert gm.meta["fxc_frontend"] == "export"
    assert gm.meta["fxc_frontend_reason"].startswith("torch.fx failed")
    for batch in (2, 32):
        x = torch.randn(batch, 2, 9, 9)
        assert torch.equal(gm(x), model(x))


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x).reshape(4, 3)


def test_export_names_the_input_dimension_and_the_node_that_fix_the_batch_size():
    with pytest.raises(TraceError) as info:
        trace(FixedBatch(), frontend="export", example_inputs=(torch.randn(4, 8),))
    msg = str(info.value)
    assert "dimension 0 (the batch) of input 'x'" in msg
    assert "node 'reshape'" in msg and ".reshape(4, 3)" in msg


def test_export_takes_keyword_inputs_and_keeps_integer_inputs_as_they_are():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, ids, mask=None):
            return self.fc(self.emb(ids) * mask.unsqueeze(-1))

    model = Tagger()
    ids, mask = torch.randint(0, 10, (1, 5)), torch.ones(1, 5)
    gm = trace(model, frontend="export", example_inputs={"mask": mask, "ids": ids})
    ids, mask = torch.randint(0, 10, (3, 7)), torch.ones(3, 7)  # batch and sequence length both change
    assert torch.equal(gm(ids=ids, mask=mask), model(ids, mask))


def test_export_graph_follows_train_and_eval_for_dropout_and_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    gm = trace(model, frontend="export", example_inputs=(x,))
    gm.eval()
    model.eval()
    assert torch.equal(gm(x), model(x))  # no dropout, running statistics
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(2)
    assert not torch.equal(a, gm(x))  # dropout draws again in training mode
