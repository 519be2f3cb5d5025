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
        trace(Holder())
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
        trace(TopLevelBranch())
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
