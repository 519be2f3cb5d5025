"""compile + one training step on real architectures; front-ends, leaf modules and trace errors."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fxcompile as fxc
from fxcompile import TraceError
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN


def one_step(model, x, y, **compile_kwargs):
    """Compile under the baseline, take one Adam step with fixed-point storage; returns (q, loss)."""
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,), **compile_kwargs)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), lr=1e-3), q)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    loss = q.loss(q(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), loss
    assert fxc.fixed(16, 10).representable(loss.detach()).all()
    changed = sum(not torch.equal(before[n], p) for n, p in q.named_parameters())
    assert changed > 0
    stored = opt.fxc_parameter_formats_named
    for name, p, fmt in stored[:3] + stored[-3:]:
        assert fmt.representable(p).all(), name
    return q, loss


@pytest.fixture(autouse=True)
def _named_formats(monkeypatch):
    """Record (name, parameter, format) next to what fixed_point_optimizer stores."""
    from fxcompile.runtime import optim
    original = optim.fixed_point_optimizer

    def wrapped(opt, qmodel, rounding=None):
        opt = original(opt, qmodel, rounding)
        opt.fxc_parameter_formats_named = optim.parameter_formats(qmodel)
        return opt
    monkeypatch.setattr(fxc, "fixed_point_optimizer", wrapped)


def _images(n, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


MODELS = {
    "seed_cnn": (lambda: SeedCNN(), (2, 1, 28)),
    "mlp": (lambda: MLP(), (2, 1, 28)),
    "residual_cnn": (lambda: ResidualCNN(), (2, 1, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 64)),
    "vit_tiny": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                                hidden_dim=64, mlp_dim=128, num_classes=10), (2, 3, 32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), (2, 3, 32)),
}
SLOW = {"vit_b_16"}  # 86M parameters: the Adam step alone dominates; vit_tiny covers the architecture


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_compile_and_train_one_step(name):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    x, y = _images(*shape)
    q, _ = one_step(build(), x, y)
    assert q.meta["fxc_frontend"] == "fx"
    roles = {e.role for e in fxc.assignment(q)}
    assert {"input", "weight", "activation_out", "loss"} <= roles


class Gate(nn.Module):
    """A value-dependent branch: no tracer can turn it into one graph."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 0.5
        return -x


class ShapeGate(nn.Module):
    """A shape-dependent branch: fx cannot trace it, torch.export specialises it."""

    def forward(self, x):
        if x.shape[-1] > 4:
            return x * 0.5
        return -x


class Branchy(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.ReLU(), gate)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.block(self.fc1(x)))


def test_data_dependent_branch_names_the_submodule_and_how_to_fix_it():
    with pytest.raises(TraceError) as info:
        fxc.compile(Branchy(Gate()), fxc.baseline(), frontend="fx")
    msg = str(info.value)
    assert "'block.1'" in msg and "Gate" in msg
    assert "if x.sum() > 0:" in msg
    assert "leaf" in msg and "leaf_modules=['block.1']" in msg


def test_auto_front_end_keeps_the_branching_submodule_as_a_leaf_and_inspect_says_why():
    with pytest.warns(UserWarning, match="block.1 \\(Gate\\) as leaf"):
        q = fxc.compile(Branchy(Gate()), fxc.baseline(), loss_fn=nn.CrossEntropyLoss())
    assert [n.target for n in q.graph.nodes if n.op == "call_module" and not n.target.startswith("casts")] == [
        "block.0", "block.1"]
    report = fxc.inspect(q)
    assert "graph captured by: leaf (torch.fx failed" in report and "block.1 (Gate) as leaves" in report


def test_leaf_module_makes_the_branching_model_compile_and_train():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    q, _ = one_step(Branchy(Gate()), x, y, leaf_modules=["block.1"])
    gate = [n for n in q.graph.nodes if n.op == "call_module" and n.target == "block.1"]
    assert len(gate) == 1
    # quantized at its boundary: a cast feeds it and a cast takes its output
    assert "fxc_edge" in gate[0].args[0].meta
    assert all("fxc_edge" in u.meta for u in gate[0].users)
    assert fxc.fixed(16, 8).representable(q(x)).all()


def test_export_frontend_compiles_and_trains_seed_cnn():
    torch.manual_seed(0)
    x, y = _images(2, 1, 28)
    q, _ = one_step(SeedCNN(), x, y, frontend="export")
    assert q.meta["fxc_frontend"] == "export"
    assert "graph captured by: export" in fxc.inspect(q)
    a = fxc.assignment(q)
    assert len(a.by_role("weight")) >= 4 and len(a.by_role("bias")) >= 4
    assert {e.op for e in a if e.role == "activation_in"} >= {"conv2d", "linear", "relu"}
    x8, y8 = _images(8, 1, 28, seed=1)  # the batch dimension is not baked in
    q.loss(q(x8), y8).backward()
    with pytest.raises(TraceError, match="example_inputs"):
        fxc.compile(SeedCNN(), fxc.baseline(), frontend="export")


def test_auto_falls_back_to_export():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    with pytest.warns(UserWarning, match="block.1"):
        q, _ = one_step(Branchy(ShapeGate()), x, y, frontend="auto")
    assert q.meta["fxc_frontend"] == "export"
    assert "graph captured by: export" in fxc.inspect(q)
    assert fxc.compile(SeedCNN(), fxc.baseline(), frontend="auto",
                       example_inputs=(x.new_zeros(1, 1, 28, 28),)).meta["fxc_frontend"] == "fx"
    assert "graph captured by: fx" in fxc.inspect(fxc.compile(SeedCNN(), fxc.baseline()))


def test_auto_reports_both_front_ends_when_neither_captures_the_model():
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TraceError) as info:
            fxc.compile(Gate(), fxc.baseline(), frontend="auto", example_inputs=(8 * x[:, :1],))
    msg = str(info.value)  # a value-dependent branch at the top level: no leaf to keep either
    assert "top-level module (Gate)" in msg and "torch.export failed too" in msg


def test_unknown_frontend_and_non_module():
    with pytest.raises(TraceError, match="frontend"):
        fxc.compile(SeedCNN(), fxc.baseline(), frontend="onnx")
    with pytest.raises(TraceError, match="nn.Module"):
        fxc.compile(lambda x: x, fxc.baseline())
