"""An 8-bit conv and the rounding after it run as one ONNX ``QLinearConv`` with power-of-two
scales where that is exact (its int32 sum below 2**24): ONNX Runtime equals the integer
reference and the simulation on every code, ties included; elsewhere the conv keeps its
limb products and the integer rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.export import integer_graph, onnx_session
from tests.helpers import on_grid


def _policy(activation="8.4"):
    return fxc.Policy(input=activation, activation=activation, weight="8.6", bias="16.8")


def _check(model, x, policy=None):
    """ORT's codes equal the integer reference's and the simulation's; the ONNX model."""
    q = on_grid(fxc.compile(model, policy or _policy(), example_inputs=(x[:1],))).eval()
    graph = integer_graph(q, (x[:1],))
    onnx_model = to_onnx(graph)
    (ref,), (ref_codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    session = onnx_session(onnx_model)
    out, codes = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(codes, ref_codes.numpy()), f"{int((codes != ref_codes.numpy()).sum())} codes differ"
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    return onnx_model, ref_codes


def _qlinear_weights(onnx_model):
    init = {t.name: t for t in onnx_model.graph.initializer}
    return [init[n.input[3]] for n in onnx_model.graph.node if n.op_type == "QLinearConv"]


def test_every_input_code_and_every_tie_of_a_one_tap_conv():
    # a 1x1 conv of one channel: y = round((w · x + b) / 2**6) for all 256 codes x, with odd and
    # even weights and biases, so that every residue of the sum, ties to even included, occurs
    conv = nn.Conv2d(1, 6, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1, 3, -5, 64, -127, 127]).view(6, 1, 1, 1) / 64)
        conv.bias.copy_(torch.tensor([0, 8, -8, 0.5, -3, 2.25]) / 16)
    x = (torch.arange(-128, 128, dtype=torch.float32) / 16).view(1, 1, 16, 16)
    onnx_model, codes = _check(conv, x)
    assert len(_qlinear_weights(onnx_model)) == 1
    assert codes.min() == -128 and codes.max() == 127  # saturates at both ends too


def test_depthwise_and_pointwise_convs_with_batch_norm_and_relu6():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 8, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 4, 12, 12) * 2
    onnx_model, codes = _check(model.eval(), x, fxc.load_policy("8bit"))
    assert len(_qlinear_weights(onnx_model)) == 4
    # a batch norm reads the uint8 codes with the zero point in its offset: no Sub in between;
    # only the last conv, whose codes are the output, takes its zero point off
    subs = [n.name for n in onnx_model.graph.node if n.op_type == "Sub" and n.name.startswith("conv2d/")]
    assert len(subs) == 1 and subs[0].startswith("conv2d/_8/")
    assert codes.abs().sum() > 0


def test_pairs_that_could_overflow_int16_take_uint8_weights():
    # signed 8-bit inputs (zero point 128: up to 255) times weights beyond ±64 could saturate the
    # int16 pair sums of x86 kernels without VNNI: the weights go in as uint8 with zero point 128
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.uniform_(-2, 2)
        conv.weight[0, 0, 0, 0] = 1.9
    x = torch.randn(4, 3, 8, 8) * 3
    onnx_model, _ = _check(conv, x)
    (weight,) = _qlinear_weights(onnx_model)
    assert weight.data_type == TensorProto.UINT8


def test_small_weights_on_non_negative_inputs_stay_int8():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    with torch.no_grad():
        model[1].weight.uniform_(-1, 1)
    onnx_model, _ = _check(model, torch.randn(4, 3, 8, 8) * 3)
    (weight,) = _qlinear_weights(onnx_model)
    assert weight.data_type == TensorProto.INT8


def test_sums_that_float32_cannot_hold_keep_the_integer_rounding():
    # 128 channels × 9 taps × 127 × 128 > 2**24: QLinearConv's float32 scaling would round the
    # sum, so the conv stays on limb products and the rounding on integer ops
    conv = nn.Conv2d(128, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(127 / 64)
    x = torch.full((2, 128, 3, 3), -8.0)
    x[1] = 127 / 16
    onnx_model, codes = _check(conv, x)
    ops = [n.op_type for n in onnx_model.graph.node]
    assert "QLinearConv" not in ops and "MatMulInteger" in ops
    assert set(codes.flatten().tolist()) == {-128, 127}


@pytest.mark.parametrize("policy", ["baseline", "optimized"])
def test_wider_codes_never_use_it(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4))
    onnx_model, _ = _check(model, torch.randn(2, 1, 8, 8), fxc.load_policy(policy))
    assert not _qlinear_weights(onnx_model)
