"""Random small CNN graphs from the registry's ops deploy bit-exactly (hypothesis).

Each example is a random program over 4-d values: convs (dense, grouped, depthwise, strided,
dilated, with or without bias), elementwise nonlinearities (clips and lookup tables), max and
average pools (padding, ceil mode), stand-alone batch norms with random running statistics,
residual adds and products of earlier values (fan-out), concatenations, spatial means and
nearest upsampling, then a global average pool and a linear layer.  It is compiled under a
policy with random formats per role and evaluated on random inputs; the fixed-point
simulation, the integer reference and ONNX Runtime must agree on every output code.  A
failing example is printed by hypothesis as the program and formats that broke the rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.export import integer_graph, onnx_session

SIZE = 8          # input height and width
CHANNELS = 3      # input channels
CLASSES = 4
NONLINEAR = {"relu": F.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "hardswish": F.hardswish,
             "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu,
             "gelu": F.gelu, "leaky_relu": F.leaky_relu}


class Program(nn.Module):
    """Runs ``steps`` (tuples ``(op, sources, params)``) over the list of values so far; the
    layers they need are built here.  fx unrolls the loop at trace time."""

    def __init__(self, steps: list[tuple], channels: list[int]):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleDict()
        for i, (op, src, p) in enumerate(steps):
            if op == "conv":
                self.layers[str(i)] = nn.Conv2d(channels[src[0]], p["out"], p["k"], stride=p["stride"],
                                                padding=p["dilation"] * (p["k"] // 2), dilation=p["dilation"],
                                                groups=p["groups"], bias=p["bias"])
            elif op == "bn":
                bn = nn.BatchNorm2d(channels[src[0]])
                g = torch.Generator().manual_seed(p["seed"])
                bn.running_mean = torch.randn(bn.num_features, generator=g)
                bn.running_var = torch.rand(bn.num_features, generator=g) * 2 + 0.1
                with torch.no_grad():
                    bn.weight.copy_(torch.randn(bn.num_features, generator=g))
                    bn.bias.copy_(torch.randn(bn.num_features, generator=g))
                self.layers[str(i)] = bn
        self.head = nn.Linear(channels[-1], CLASSES)

    def forward(self, x):
        values = [x]
        for i, (op, src, p) in enumerate(self.steps):
            a = values[src[0]]
            if op in ("conv", "bn"):
                y = self.layers[str(i)](a)
            elif op in NONLINEAR:
                y = NONLINEAR[op](a)
            elif op == "max_pool":
                y = F.max_pool2d(a, p["k"], p["stride"], p["padding"], ceil_mode=p["ceil"])
            elif op == "avg_pool":
                y = F.avg_pool2d(a, 2)
            elif op == "add":
                y = a + values[src[1]]
            elif op == "mul":
                y = a * values[src[1]]
            elif op == "cat":
                y = torch.cat([a, values[src[1]]], 1)
            elif op == "mean":
                y = a.mean((2, 3), keepdim=True)
            else:  # "upsample"
                y = F.interpolate(a, scale_factor=2, mode="nearest")
            values.append(y)
        return self.head(F.adaptive_avg_pool2d(values[-1], 1).flatten(1))


def _pool_out(h, k, stride, padding, ceil):
    span = h + 2 * padding - k
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= h + padding:   # PyTorch drops a last window that starts in the padding
        out -= 1
    return out


@st.composite
def programs(draw):
    """``(steps, channels)``: a random program and the channels of each of its values."""
    shapes = [(CHANNELS, SIZE)]          # (channels, height = width) of each value
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(shapes) - 1))
        c, h = shapes[i]
        same = [j for j, s in enumerate(shapes) if s == (c, h)]
        spatial = [j for j, s in enumerate(shapes) if s[1] == h]
        choices = ["conv", "bn", "nonlinear", "add", "mul", "cat", "mean"]
        choices += ["max_pool", "avg_pool"] if h >= 2 else []
        choices += ["upsample"] if h <= 4 else []
        op = draw(st.sampled_from(choices))
        if op == "conv":
            k = draw(st.sampled_from([1, 3]))
            out = draw(st.integers(1, 6))
            groups = draw(st.sampled_from([g for g in (1, c) if c % g == 0 and out % g == 0]))
            stride = draw(st.sampled_from([1, 2])) if h >= 2 else 1
            dilation = draw(st.sampled_from([1, 2])) if k == 3 else 1
            params = {"k": k, "out": out, "groups": groups, "stride": stride, "dilation": dilation,
                      "bias": draw(st.booleans())}
            steps.append(("conv", (i,), params))
            shapes.append((out, (h - 1) // stride + 1))
        elif op == "bn":
            steps.append(("bn", (i,), {"seed": draw(st.integers(0, 2 ** 16))}))
            shapes.append((c, h))
        elif op == "nonlinear":
            steps.append((draw(st.sampled_from(sorted(NONLINEAR))), (i,), {}))
            shapes.append((c, h))
        elif op in ("add", "mul"):
            steps.append((op, (i, draw(st.sampled_from(same))), {}))
            shapes.append((c, h))
        elif op == "cat":
            j = draw(st.sampled_from(spatial))
            steps.append(("cat", (i, j), {}))
            shapes.append((c + shapes[j][0], h))
        elif op == "mean":
            steps.append(("mean", (i,), {}))
            shapes.append((c, 1))
        elif op == "max_pool":
            k = draw(st.sampled_from([k for k in (2, 3) if k <= h]))
            padding = draw(st.sampled_from([0, 1] if k == 3 else [0]))
            stride, ceil = draw(st.sampled_from([1, 2])), draw(st.booleans())
            steps.append(("max_pool", (i,), {"k": k, "stride": stride, "padding": padding, "ceil": ceil}))
            shapes.append((c, _pool_out(h, k, stride, padding, ceil)))
        elif op == "avg_pool":
            steps.append(("avg_pool", (i,), {}))
            shapes.append((c, h // 2))
        else:
            steps.append(("upsample", (i,), {}))
            shapes.append((c, 2 * h))
    return steps, [s[0] for s in shapes]


@st.composite
def policies(draw):
    """A policy with random signed formats for the forward roles (activations of at most 16
    bits, so every nonlinearity has its lookup table) and the baseline's gradient formats."""
    def fmt(lo, hi):
        bits = draw(st.integers(lo, hi))
        return fxc.fixed(bits, draw(st.integers(1, bits - 2)))
    return fxc.Policy(activation=fmt(6, 16), weight=fmt(4, 16), bias=fmt(6, 16), gradient=fxc.fixed(16, 10),
                      loss=fxc.fixed(16, 10))


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 30)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs(), policy=policies(), seed=st.integers(0, 2 ** 16))
def test_random_graphs_deploy_with_zero_differing_codes(program, policy, seed):
    steps, channels = program
    torch.manual_seed(seed)
    model = Program(steps, channels).eval()
    x = torch.randn(16, CHANNELS, SIZE, SIZE) * 3
    q = fxc.compile(model, policy, example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:2],))
    with torch.no_grad():
        sim = q(x)
    (ref,) = run_integer(graph, x)
    (ort, _) = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    assert int((sim != ref).sum()) == 0, "the simulation differs from the integer reference"
    assert int((torch.from_numpy(ort) != ref).sum()) == 0, "ONNX Runtime differs from the integer reference"
