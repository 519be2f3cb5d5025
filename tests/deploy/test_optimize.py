"""optimize: the rewritten integer graph gives the same codes as the lowered one, bit for bit."""

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.deploy.optimize import optimize
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN


def _graph(model, policy, x):
    """The integer graph of ``model`` compiled with ``policy``, weights on their grid, batch
    norm statistics random (so that folding gives non-trivial biases)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    q = fxc.compile(model, policy, example_inputs=(x[:2],))
    fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.0), q, rounding="nearest")
    return integer_graph(q.eval(), (x[:2],))


def _assert_same_results(graph, fast, x):
    for codes in (True, False):
        (expected,), (got,) = run_integer(graph, x, codes=codes), run_integer(fast, x, codes=codes)
        assert expected.dtype == got.dtype and torch.equal(expected, got)


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
def test_optimized_graph_runs_bit_for_bit_like_the_lowered_one(model):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28) * 1.5
    graph = _graph(model(), fxc.baseline(), x)
    before = [(op.op, op.out, op.inputs) for op in graph.ops]
    fast = optimize(graph)
    assert [(op.op, op.out, op.inputs) for op in graph.ops] == before  # the input graph is left alone
    assert len(fast.ops) < len(graph.ops)  # every model has a ReLU after a requantize to fold
    assert (fast.inputs, fast.outputs) == (graph.inputs, graph.outputs)
    _assert_same_results(graph, fast, x)


class _EveryRewrite(nn.Module):
    """conv → ReLU → max pool (requantize and ReLU move behind the pool with the conv's bias,
    then the ReLU folds), conv → padded overlapping max pool (the requantize alone moves, the
    bias with it), linear → ReLU (folds, no pool)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 6 * 6, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(self.conv2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_every_rewrite():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28) * 3
    policy = fxc.Policy(activation="12.5", input="16.8", weight="16.11", bias="16.8")
    graph = _graph(_EveryRewrite(), policy, x)
    fast = optimize(graph)
    ops = {op.out: op for op in fast.ops}
    users = {name: [op for op in fast.ops if name in op.inputs] for name in ops}
    pools = [op for op in graph.ops if op.op == "max_pool2d"]
    assert len(pools) == 2 and not any(op.op == "relu" for op in fast.ops)
    for pool in pools:  # each pool reads its conv, carries its bias, and a requantize keeps its name
        moved = ops[f"{pool.out}_acc"]
        conv = ops[moved.inputs[0]]
        assert conv.op == "conv2d" and conv.attrs["bias"] is None and moved.attrs["bias"] is not None
        assert [u.op for u in users[moved.out]] == ["requantize"] and users[moved.out][0].out == pool.out
    relus = [op.out for op in graph.ops if op.op == "relu"]  # after conv1 (feeding pool1), after fc1
    assert len(relus) == 2 and pools[0].inputs[0] == relus[0]
    folded = [op.out for op in fast.ops if op.op == "requantize" and op.attrs.get("relu")]
    assert sorted(folded) == sorted([pools[0].out, relus[1]])
    _assert_same_results(graph, fast, x)
    # and ONNX Runtime agrees with the reference on the optimised graph
    (codes,) = run_integer(fast, x, codes=True)
    _, ort_codes = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    assert np.array_equal(ort_codes, codes.numpy())


def test_wrapping_requantize_is_not_moved():
    """A wrapping requantize is not monotone: neither rewrite applies."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28) * 3
    policy = fxc.Policy(activation="10.4,wrap", input="16.8", weight="16.11", bias="16.8")
    graph = _graph(SeedCNN(), policy, x)
    fast = optimize(graph)
    assert [op.op for op in fast.ops] == [op.op for op in graph.ops]
    assert all(a is b for a, b in zip(fast.ops, graph.ops))
    _assert_same_results(graph, fast, x)


@pytest.mark.parametrize("act, bounds", [(nn.ReLU6(), (0, 48)), (nn.Hardtanh(-1, 2), (-8, 16))])
def test_a_clip_after_a_saturating_requantize_folds_into_it(act, bounds):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), act, nn.Flatten())
    model[1].running_var.fill_(0.02)
    x = torch.randn(16, 1, 6, 6) * 3
    q = fxc.compile(model.eval(), "8bit", example_inputs=(x[:1],)).eval()
    graph = integer_graph(q, (x[:1],))
    fast = optimize(graph)
    assert "clip" in [op.op for op in graph.ops] and "clip" not in [op.op for op in fast.ops]
    assert [op.attrs.get("clamp") for op in fast.ops if op.op == "requantize"][-1] == bounds
    (ref,) = run_integer(graph, x, codes=True)
    assert torch.equal(run_integer(fast, x, codes=True)[0], ref)
    assert ref.min() == bounds[0] and ref.max() == bounds[1]  # both bounds reached
    session = onnx_session(to_onnx(graph))
    assert np.array_equal(session.run(None, {session.get_inputs()[0].name: x.numpy()})[1], ref.numpy())
