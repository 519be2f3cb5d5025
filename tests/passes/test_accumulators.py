"""Convs and linear layers whose exact sum float32 cannot hold run it exactly when no gradient
is needed (float64, rounded once by the output cast's format) and as the float32 op when one
is; the integer graph, the simulation and ONNX Runtime then agree code for code."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
import fxcompile.compiler as compiler
from fxcompile.core import ops
from fxcompile.core.formats import as_format
from fxcompile.core.quantizer import quantize_reference
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import export_onnx, integer_graph, verify
from fxcompile.deploy.fold_bn import fold_bn
from fxcompile.experiments.models import SeedCNN
from fxcompile.passes.accumulators import FIXED_POINT_LAYERS, accumulator_bits, exact_accumulators
from fxcompile.passes.casts import output_cast

from ..helpers import on_grid

DEFINITIONS = set(FIXED_POINT_LAYERS.values())

# one output of a 1x1 conv over 3 channels (and a linear over 3 features): 8·8 + 2**-8·0.5 +
# 2**-8·2**-12 = 64 + 2**-9 + 2**-20 needs 27 significant bits.  float32 keeps 64 + 2**-9 (the
# 2**-20 is below half its ulp there, 2**-17, in any summation order), a tie that 16.8's
# round-to-nearest-even takes down to 64; the exact sum rounds up to 64 + 2**-8.
X = [8.0, 2.0 ** -8, 2.0 ** -8]
W = [8.0, 0.5, 2.0 ** -12]


class OneByOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.fc = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(W).view(1, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([W]))

    def forward(self, x):
        return torch.cat([self.conv(x).flatten(1), self.fc(x.flatten(1))], 1)


def exact_codes(x_values, w_values, x_frac=8, w_frac=12, out_frac=8) -> int:
    """The oracle: Python integers summed exactly, rounded to ``out_frac`` ties to even."""
    acc = sum(round(x * 2 ** x_frac) * round(w * 2 ** w_frac) for x, w in zip(x_values, w_values))
    return round(Fraction(acc, 2 ** (x_frac + w_frac - out_frac)))


def test_float32_rounds_the_sum_and_the_exact_definition_does_not(tmp_path):
    x = torch.tensor(X).view(1, 3, 1, 1)
    q = on_grid(fxc.compile(OneByOne(), fxc.baseline(), example_inputs=(x,)))
    targets = {n.name: n.target for n in q.graph.nodes if n.op == "call_function"}
    assert targets["conv"] is ops.fixed_point_conv2d and targets["fc"] is ops.fixed_point_linear
    oracle = exact_codes(X, W)
    assert oracle == 64 * 256 + 1

    # what the layers computed before: float32 sums, then the cast (ties to even: 64)
    float32 = F.conv2d(x, q.conv.weight).flatten()
    assert float32.item() != float(Fraction(sum(Fraction(a) * Fraction(b) for a, b in zip(X, W))))
    assert quantize_reference(float32, fxc.fixed(16, 8).spec()).item() * 256 == oracle - 1
    with torch.enable_grad():  # a gradient is needed: training's float32 op, unchanged
        assert (q(x) * 256).tolist() == [[oracle - 1, oracle - 1]]

    with torch.no_grad():  # inference: the exact sum, rounded once
        conv = ops.fixed_point_conv2d(x, q.conv.weight, None, 1, 0, 1, 1, fxc.fixed(16, 8).spec())
        linear = ops.fixed_point_linear(x.flatten(1), q.fc.weight, None, fxc.fixed(16, 8).spec())
        assert conv.item() * 256 == linear.item() * 256 == oracle
        assert (q(x) * 256).tolist() == [[oracle, oracle]]
    (ref,) = run_integer(integer_graph(q, (x,)), x, codes=True)
    assert ref.tolist() == [[oracle, oracle]]

    export_onnx(q, tmp_path / "m.onnx", (x,))
    report = verify(q, tmp_path / "m.onnx", x)
    assert report["mismatches"] == 0 and report["simulation_mismatches"] == 0


class Layers(nn.Module):
    """Every layer kind the pass rewrites: conv1d, grouped conv2d, depthwise conv2d, conv3d, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c3 = nn.Conv3d(4, 2, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        a = self.c1(x.flatten(2)).sum()
        b = self.depthwise(self.grouped(x))
        c = self.c3(x.unsqueeze(2)).sum()
        return self.fc(b.flatten(1)) + a + c


def test_every_conv_and_linear_kind_runs_its_exact_sum_without_a_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6) * 4
    q = on_grid(fxc.compile(Layers(), fxc.baseline(), example_inputs=(x[:2],)))
    rewritten = {n.name: n for n in q.graph.nodes if n.op == "call_function" and n.target in DEFINITIONS}
    assert set(rewritten) == {"c1", "grouped", "depthwise", "c3", "fc"}
    # each keeps its op in the registry, so every backend takes it as the conv/linear it is
    assert {ops.op_of(q, n).name for n in rewritten.values()} == {"conv1d", "conv2d", "conv3d", "linear"}
    seen = {}
    # run each definition on the inputs the graph gives it and compare with the float64 oracle
    interp = torch.fx.Interpreter(q)
    original = interp.run_node

    def run_node(n):
        out = original(n)
        if n.name in rewritten:
            args = interp.fetch_args_kwargs_from_env(n)[0]
            seen[n.name] = (args, out)
        return out
    interp.run_node = run_node
    with torch.no_grad():
        interp.run(x)
    for name, (args, out) in seen.items():
        target = rewritten[name].target
        float_op = {ops.fixed_point_conv1d: F.conv1d, ops.fixed_point_conv2d: F.conv2d,
                    ops.fixed_point_conv3d: F.conv3d, ops.fixed_point_linear: F.linear}[target]
        *layer_args, spec = args
        tensors = [a.double() if isinstance(a, torch.Tensor) else a for a in layer_args]
        expected = quantize_reference(float_op(*tensors), spec).float()
        assert torch.equal(out, expected), name
        assert spec == output_cast(q, rewritten[name]).edge.forward.spec()


def test_training_steps_are_bit_identical_to_the_float32_layers(monkeypatch):
    def train(model):
        torch.manual_seed(1)
        q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(),
                        example_inputs=(torch.randn(2, 1, 28, 28),))
        opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
        g = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(3):
            x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            loss = q.loss(q(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return q, torch.stack(losses), [p.detach().clone() for p in q.parameters()]

    torch.manual_seed(0)
    model = SeedCNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q, losses, params = train(model)
    assert sum(n.target in DEFINITIONS for n in q.graph.nodes) == 4  # conv1, conv2, fc1, fc2

    monkeypatch.setattr(compiler, "exact_accumulators", lambda gm: gm)  # the pipeline without the pass
    model.load_state_dict(state)
    q0, losses0, params0 = train(model)
    assert not any(n.target in DEFINITIONS for n in q0.graph.nodes)
    assert torch.equal(losses, losses0)
    assert all(torch.equal(a, b) for a, b in zip(params, params0))


def test_sums_within_float32_or_beyond_float64_keep_the_float_op():
    x = torch.randn(2, 1, 28, 28)
    narrow = fxc.Policy(activation="8.4", gradient="16.10", loss="16.10", weight="8.6", bias="8.4")
    wide = fxc.Policy(activation="32.16", gradient="16.10", loss="16.10", weight="32.16", bias="16.8")
    def rewritten(policy):
        q = fxc.compile(SeedCNN(), policy, example_inputs=(x,))
        return {n.name for n in q.graph.nodes if n.op == "call_function" and n.target in DEFINITIONS}
    # 8-bit codes: only fc1's fan-in (3136) takes the sum beyond 24 bits; 32-bit codes: beyond 53
    assert rewritten(narrow) == {"fc1"}
    assert rewritten(wide) == set()
    assert accumulator_bits(fxc.fixed(8, 4).spec(), fxc.fixed(8, 6).spec(), 288, fxc.fixed(8, 4).spec()) <= 24
    assert accumulator_bits(fxc.fixed(8, 4).spec(), fxc.fixed(8, 6).spec(), 3136, fxc.fixed(8, 4).spec()) > 24
    assert accumulator_bits(fxc.fixed(32, 16).spec(), fxc.fixed(32, 16).spec(), 9, fxc.fixed(16, 8).spec()) > 53


def test_accumulator_bits_counts_products_fan_in_and_the_aligned_bias():
    a, w, b = fxc.fixed(16, 8).spec(), fxc.fixed(24, 12).spec(), fxc.fixed(16, 8).spec()
    assert accumulator_bits(a, w, 1) == 39  # 2**15 · 2**23 = 2**38
    assert accumulator_bits(a, w, 4608) == 51  # resnet's 3x3x512: 4608 · 2**38 < 2**51
    assert accumulator_bits(a, w, 1, b) == 39  # the bias adds 2**15 · 2**12 to 2**38
    # a bias finer than the products moves the binary point: 2**14 · 2**7 + 2**7 in its units
    assert accumulator_bits(fxc.fixed(8, 0).spec(), fxc.fixed(8, 0).spec(), 1, fxc.fixed(8, 7).spec()) == 22


def test_folded_batch_norm_rounds_the_layer_to_its_own_output_format():
    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)).flatten(1)

    x = torch.randn(2, 3, 6, 6)
    policy = fxc.Policy(overrides=[{"pattern": "bn", "activation_out": "16.6"}], **fxc.baseline().formats)
    q = on_grid(fxc.compile(ConvBN(), policy, example_inputs=(x,), fold_batch_norm=True))
    (conv,) = [n for n in q.graph.nodes if n.name == "conv"]
    assert conv.target is ops.fixed_point_conv2d
    folded = fold_bn(q)
    (layer,) = [n for n in folded.graph.nodes if n.name == "conv"]
    assert layer.target is ops.fixed_point_conv2d
    assert layer.args[-1] == output_cast(folded, layer).edge.forward.spec() != conv.args[-1]
    with torch.no_grad():
        folded(x)  # runs


def test_a_layer_follows_a_format_change_when_the_pass_runs_again():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28) * 2
    q = on_grid(fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(x[:2],)))
    cast = q.casts.fc2
    cast.set_edge(dataclasses.replace(cast.edge, forward=as_format("16.6,floor")))
    with pytest.raises(fxc.ExportError, match=r"node 'fc2' \(linear\): its exact sum rounds to the format of the "
                                              r"one cast after it, which changed after compile"):
        integer_graph(q, (x[:2],))
    exact_accumulators(q)
    (fc2,) = [n for n in q.graph.nodes if n.name == "fc2"]
    assert fc2.target is ops.fixed_point_linear and fc2.args[-1] == as_format("16.6,floor").spec()
    (ref,) = run_integer(integer_graph(q, (x[:2],)), x, codes=True)
    with torch.no_grad():
        sim = torch.round(q(x).double() * 64).long()
    assert torch.equal(sim, ref)
    # an output without a fixed-point format: the layer is the float op again
    cast.set_edge(dataclasses.replace(cast.edge, forward=None))
    exact_accumulators(q)
    assert fc2.target is F.linear and len(fc2.args) == 3


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_seed_cnn_deploys_with_no_differing_code_from_either_frontend(frontend, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28) * 2
    q = on_grid(fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(x[:2],), frontend=frontend))
    layers = [ops.op_of(q, n).name for n in q.graph.nodes if n.op == "call_function" and n.target in DEFINITIONS]
    assert layers == ["conv2d", "conv2d", "linear", "linear"]
    export_onnx(q, tmp_path / "m.onnx", (x[:2],))
    report = verify(q, tmp_path / "m.onnx", x)
    assert report["outputs"] == 320 and report["mismatches"] == 0 and report["simulation_mismatches"] == 0
