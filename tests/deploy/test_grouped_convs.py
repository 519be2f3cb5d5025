"""Grouped and depthwise convs deploy with their grouped weight: ONNX Runtime equals the integer
reference bit for bit, and the ONNX model's constants grow linearly with the channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.export import integer_graph, onnx_session
from tests.helpers import on_grid


class Convs(nn.Module):
    def __init__(self, c, convs):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.convs = nn.ModuleList(nn.Conv2d(*args, **kwargs) for args, kwargs in convs)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


CASES = {  # (in, out, kernel) and keywords of each conv after a 1x1 stem to 8 channels
    "depthwise": [((8, 8, 3), dict(padding=1, groups=8))],
    "depthwise_strided_5x5": [((8, 8, 5), dict(padding=2, stride=2, groups=8, bias=False))],
    "depthwise_dilated": [((8, 8, 3), dict(padding=2, dilation=2, groups=8))],
    "depthwise_multiplier": [((8, 16, 3), dict(padding=1, groups=8))],
    "grouped": [((8, 8, 3), dict(padding=1, groups=4)), ((8, 4, 1), dict(groups=2))],
    "grouped_strided": [((8, 12, 3), dict(stride=2, groups=2))],
    "grouped_wide": [((32, 32, 3), dict(padding=1, groups=2))],  # K = 144: uint8 limbs × int8 digits
}
POLICIES = {
    "baseline": fxc.baseline,  # 16.8 activations, 24.12 weights: two limbs, several digits, int64 sums
    "8-bit": lambda: fxc.Policy(input="8.4", activation="8.4", weight="8.6", bias="16.8"),  # int32 sums
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("eight_bit", [True, False])
def test_ort_equals_integer_reference_and_simulation(case, policy, eight_bit):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 9, 9) * 2
    q = on_grid(fxc.compile(Convs(CASES[case][0][0][0], CASES[case]), POLICIES[policy](), example_inputs=(x[:2],)))
    graph = integer_graph(q, (x[:2],))
    grouped = [op for op in graph.ops if op.op == "conv2d" and op.attrs.get("groups", 1) > 1]
    assert len(grouped) == len(CASES[case])
    (ref,), (ref_codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    out, codes = onnx_session(to_onnx(graph, eight_bit=eight_bit)).run(None, {"x": x.numpy()})
    assert np.array_equal(codes, ref_codes.numpy()), f"{int((codes != ref_codes.numpy()).sum())} codes differ"
    assert np.array_equal(out, ref.numpy())
    with torch.no_grad():
        sim = q(x)
    assert torch.equal(sim, ref)
    assert ref_codes.abs().sum() > 0  # not all zero: the convs computed something
    ops = [n.op_type for n in to_onnx(graph).graph.node]
    if case == "grouped_wide" and policy == "baseline":  # 16-bit codes: limbs on MatMulInteger
        assert "MatMulInteger" in ops
    if policy == "8-bit":  # 8-bit codes, exact sums below 2**24: every conv and its rounding is one QLinearConv
        assert ops.count("QLinearConv") == len(CASES[case]) + 1


def test_integer_reference_is_the_grouped_conv_of_the_codes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 9)
    q = on_grid(fxc.compile(Convs(8, CASES["grouped"][:1]), fxc.baseline(), example_inputs=(x[:2],)))
    graph = integer_graph(q, (x[:2],))
    op = next(op for op in graph.ops if op.op == "conv2d" and op.attrs.get("groups", 1) > 1)
    w = op.attrs["weight"]
    assert tuple(w.shape) == (8, 2, 3, 3) and op.attrs["groups"] == 4
    # oracle: each group's output channels from its own input channels, in Python-exact float64
    codes = torch.randint(-300, 300, (2, 8, 9, 9))
    expected = torch.cat([F.conv2d(codes[:, 2 * g:2 * g + 2].double(), w[2 * g:2 * g + 2].double(), padding=1)
                          for g in range(4)], 1).long() + op.attrs["bias"].view(1, -1, 1, 1)
    from fxcompile.deploy.backends.integer import KERNELS
    assert torch.equal(KERNELS["conv2d"](op, codes), expected)


@pytest.mark.parametrize("groups, cg", [(256, 1), (32, 8)])
def test_onnx_constants_grow_linearly_with_the_channels(groups, cg):
    c = groups * cg
    x = torch.randn(2, 3, 6, 6)
    model = Convs(c, [((c, c, 3), dict(padding=1, groups=groups))])
    q = on_grid(fxc.compile(model, fxc.baseline(), example_inputs=(x[:2],)))
    onnx_model = to_onnx(integer_graph(q, (x[:2],)))
    elements = sum(numpy_helper.to_array(t).size for t in onnx_model.graph.initializer)
    grouped_weight = c * cg * 9
    # the weight's digits, the bias, the stem: a few times the grouped weight, never the dense c * c * 9
    assert elements < 8 * grouped_weight + 64 * c < c * c * 9
    (out,) = onnx_session(onnx_model).run(None, {"x": x.numpy()})[:1]
    (ref,) = run_integer(integer_graph(q, (x[:2],)), x)
    assert np.array_equal(out, ref.numpy())
