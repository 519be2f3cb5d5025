"""A tiny attention block (LayerNorm, q/k/v projections split into heads, Q·Kᵀ, softmax, ·V,
output projection, residual, LayerNorm) trains a step under ``baseline`` and exports with 0
differing codes between the simulation, the integer reference and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import integer_graph, onnx_session


class Attention(nn.Module):
    """Pre-norm self-attention; the scale 1/√d of the scores is folded into the query projection."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm, self.out_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.proj = (nn.Linear(width, width) for _ in range(4))
        with torch.no_grad():
            self.q.weight.mul_((width // heads) ** -0.5)
            self.q.bias.mul_((width // heads) ** -0.5)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (f(h).unflatten(-1, (self.heads, -1)) for f in (self.q, self.k, self.v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        attention = torch.softmax(scores, dim=-1)
        mixed = torch.einsum("bhqk,bkhd->bqhd", attention, v).flatten(2)
        return self.out_norm(x + self.proj(mixed))


def test_attention_block_trains_and_exports_bit_exactly():
    torch.manual_seed(0)
    x, target = torch.randn(16, 6, 32), torch.randn(16, 6, 32)
    q = fxc.compile(Attention(), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(x[:2],))
    called = [n.target for n in q.graph.nodes if n.op == "call_function" and n.target in
              (ops.fixed_point_matmul, ops.fixed_point_softmax, ops.fixed_point_layer_norm)]
    assert called == [ops.fixed_point_layer_norm, ops.fixed_point_matmul, ops.fixed_point_softmax,
                      ops.fixed_point_matmul, ops.fixed_point_layer_norm]
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    before = q.q.weight.detach().clone()
    loss = q.loss(q(x), target)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, q.q.weight)
    q.eval()
    graph = integer_graph(q, (x[:2],))
    assert {"matmul", "softmax", "layer_norm"} <= {op.op for op in graph.ops}
    x = torch.randn(64, 6, 32) * 2
    with torch.no_grad():
        sim = q(x)
    (ref,), (codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    _, ort_codes = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    sim_codes = torch.round(sim.double() * 2.0 ** graph.op_of(graph.outputs[0]).frac).long()
    assert int((sim_codes != codes).sum()) == 0
    assert int((torch.from_numpy(ort_codes) != codes).sum()) == 0
    assert codes.unique().numel() > 100  # the outputs are not trivially constant
    # the QDQ flavour runs float MatMul, Softmax, LayerNormalization between its pairs: close, not exact
    (qdq,) = onnx_session(to_qdq(q, (x[:2],))).run(None, {"x": x.numpy()})
    qdq_codes = torch.round(torch.from_numpy(qdq).double() * 2.0 ** graph.op_of(graph.outputs[0]).frac).long()
    assert (qdq_codes - codes).abs().max() <= 2 and (qdq_codes != codes).float().mean() < 0.05
