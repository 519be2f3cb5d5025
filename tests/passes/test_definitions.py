"""Products of two activations and softmax: the simulation, the integer reference and ONNX
Runtime run one fixed-point definition, so they agree bit for bit; the definitions against
exact oracles (Python integers, float64) and their backward against float autograd."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompile as fxc
from fxcompile.core import intmath, ops
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.errors import ExportError


class Product(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, a, b):
        if self.kind == "matmul":
            return torch.matmul(a, b)
        if self.kind == "@":
            return a @ b
        if self.kind == "bmm":
            return torch.bmm(a, b)
        if self.kind == "mm":
            return a.mm(b)
        return torch.einsum(self.kind, a, b)


class Softmax(nn.Module):
    def __init__(self, kind="function", dim=-1):
        super().__init__()
        self.kind, self.dim, self.module = kind, dim, nn.Softmax(dim)

    def forward(self, x):
        if self.kind == "module":
            return self.module(x)
        if self.kind == "method":
            return x.softmax(self.dim)
        return torch.nn.functional.softmax(x, dim=self.dim)


def _grid(shape, fmt, generator):
    return torch.randint(fmt.code_min, fmt.code_max + 1, shape, generator=generator).double().mul(fmt.scale).float()


def _three_ways(q, graph, inputs, names):
    """Codes of the simulation (eval forward), the integer reference and ONNX Runtime."""
    fmt_frac = graph.op_of(graph.ops[-1].inputs[0]).frac
    with torch.no_grad():
        sim = q(*inputs)
    (ref,), (ref_codes,) = run_integer(graph, *inputs), run_integer(graph, *inputs, codes=True)
    _, ort_codes = onnx_session(to_onnx(graph)).run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    sim_codes = torch.round(sim.double() * 2.0 ** fmt_frac).long()
    return sim_codes, ref_codes, torch.from_numpy(ort_codes), sim, ref


PRODUCTS = [  # kind, shape of a, shape of b
    ("matmul", (3, 5, 64), (3, 64, 7)),
    ("@", (2, 2, 5, 64), (2, 2, 64, 6)),    # batch and head dims
    ("bmm", (3, 5, 64), (3, 64, 4)),
    ("mm", (5, 64), (64, 3)),
    ("bhqd,bhkd->bhqk", (2, 3, 5, 64), (2, 3, 6, 64)),  # Q·Kᵀ: the second operand transposed
    ("bqk,bkd->bqd", (2, 5, 6), (2, 6, 64)),             # scores·V
    ("bqhd,bkhd->bhqk", (2, 5, 3, 64), (2, 6, 3, 64)),   # heads not yet moved before the tokens
    ("bhqk,bkhd->bqhd", (2, 3, 5, 6), (2, 6, 3, 64)),    # and moved back after the product
]


@pytest.mark.parametrize("kind, sa, sb", PRODUCTS, ids=[p[0] for p in PRODUCTS])
def test_products_of_two_activations_are_exact_through_every_backend(kind, sa, sb):
    g = torch.Generator().manual_seed(0)
    fmt = as_format("16.8")
    a, b = _grid(sa, fmt, g), _grid(sb, fmt, g)
    q = fxc.compile(Product(kind), fxc.baseline(), example_inputs=(a, b)).eval()
    assert [n.target for n in q.graph.nodes if n.op == "call_function"] == [ops.fixed_point_matmul]
    graph = integer_graph(q, (a, b))
    assert [op.op for op in graph.ops if op.op == "matmul"] == ["matmul"]
    sim_codes, ref_codes, ort_codes, sim, ref = _three_ways(q, graph, (a, b), ("a", "b"))
    assert torch.equal(sim_codes, ref_codes), f"{(sim_codes != ref_codes).sum()} codes differ"
    assert torch.equal(ort_codes, ref_codes) and torch.equal(sim, ref)
    # the definition from Python integers: round(Σ a·b · 2**-8) to nearest, ties to even, saturated
    ca, cb = (torch.round(t.double() * 256).long() for t in (a, b))
    exact = torch.einsum(kind, ca, cb) if "," in kind else torch.matmul(ca, cb)
    expected = [max(-2 ** 15, min(2 ** 15 - 1, round(Fraction(int(v), 256)))) for v in exact.flatten()[:500]]
    assert ref_codes.flatten()[:500].tolist() == expected


def test_float32_products_are_not_exact_and_the_simulation_does_not_use_them():
    # 16.8 codes over a reduction of 256: sums of up to 2**38, beyond float32's 24 bits
    g = torch.Generator().manual_seed(1)
    fmt, spec = as_format("16.8"), as_format("16.8").spec()
    a, b = _grid((64, 256), fmt, g), _grid((256, 64), fmt, g)
    exact = torch.round((a.double() @ b.double()) * 256)  # exact in float64: < 2**53
    float32 = torch.round((a @ b).double() * 256)
    assert (float32 != exact).sum() > 0                   # float32 loses codes ...
    sim = ops.fixed_point_matmul(a.double(), b.double(), None, spec, spec, as_format("32.8").spec())
    assert torch.equal(torch.round(sim * 256), exact)     # ... the definition does not
    with pytest.raises(ValueError, match="more than float64 holds"):
        ops.fixed_point_matmul(a, b, None, as_format("32.8").spec(), as_format("32.8").spec(), spec)


def test_product_backward_is_the_float_products():
    g = torch.Generator().manual_seed(2)
    spec = as_format("16.8").spec()
    a, b = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    a1, b1, a2, b2 = (t.clone().requires_grad_() for t in (a, b, a, b))
    w = torch.randn(2, 3, 5, generator=g)
    (ops.fixed_point_matmul(a1, b1, ops.matmul_equation("bqd,bkd->bqk"), spec, spec, spec) * w).sum().backward()
    (torch.einsum("bqd,bkd->bqk", a2, b2) * w).sum().backward()
    assert torch.allclose(a1.grad, a2.grad) and torch.allclose(b1.grad, b2.grad)


@functools.lru_cache
def _python_table(frac_in, span):
    return [round(math.exp(-d * 2.0 ** -frac_in) * 2 ** intmath.SOFTMAX_BITS) for d in range(span + 1)]


def _python_softmax(codes, frac_in, frac_out):
    """The definition from Python integers and ``math.exp``: table, sum, ties-to-even division."""
    table = _python_table(frac_in, 255)
    top = max(codes)
    e = [table[top - c] for c in codes]
    return [round(Fraction(v * 2 ** frac_out, sum(e))) for v in e]


def _every_pair(fmt):
    lo, hi = fmt.code_min, fmt.code_max
    codes = torch.arange(lo, hi + 1)
    pairs = torch.stack(torch.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1, 2)
    return (pairs.double() * fmt.scale).float()


SOFTMAX_CASES = [("8.4", "16.14"), ("8.2", "16.14,floor"), ("8.6", "8.7")]  # input, output


@pytest.mark.parametrize("fin, fout", SOFTMAX_CASES)
def test_softmax_of_every_pair_of_8_bit_codes(fin, fout):
    fmt_in, fmt_out = as_format(fin), as_format(fout)
    x = _every_pair(fmt_in)                          # 65,536 rows of length 2
    q = fxc.compile(Softmax(), fxc.Policy(input=fin, activation_in=fin, activation_out=fout), example_inputs=(x[:2],)).eval()
    assert [n.target for n in q.graph.nodes if n.op == "call_function"] == [ops.fixed_point_softmax]
    graph = integer_graph(q, (x[:2],))
    sim_codes, ref_codes, ort_codes, sim, ref = _three_ways(q, graph, (x,), ("x",))
    assert torch.equal(sim_codes, ref_codes), f"{(sim_codes != ref_codes).sum()} codes differ"
    assert torch.equal(ort_codes, ref_codes)
    # against float64 within the documented bound: the output rounding, the table's n · 2**-30,
    # and saturation where 2**frac (a probability of 1) is beyond the format's largest code
    p = torch.softmax(x.double(), -1)
    lsb = fmt_out.scale
    bound = (lsb if fmt_out.rounding == "floor" else lsb / 2) + 2 * 2.0 ** -30
    err = (ref.double() - p).abs()
    saturated = p > fmt_out.max_value
    assert err[~saturated].max() <= bound
    assert torch.all(err[saturated] <= p[saturated] - fmt_out.max_value + bound)
    if fmt_out.rounding == "nearest":
        rows = list(range(0, len(x), 997))
        expected = [_python_softmax([round(float(v) * 2 ** fmt_in.frac) for v in x[r]], fmt_in.frac, fmt_out.frac)
                    for r in rows]
        assert ref_codes[rows].clamp(fmt_out.code_min, fmt_out.code_max).tolist() == \
            [[min(c, fmt_out.code_max) for c in row] for row in expected]


def test_softmax_of_random_long_rows_within_the_bound():
    g = torch.Generator().manual_seed(3)
    fmt_in, fmt_out = as_format("16.8"), as_format("16.8")
    narrow = torch.randint(-512, 513, (64, 197), generator=g).double().mul(fmt_in.scale).float()
    x = torch.cat([_grid((64, 197), fmt_in, g), narrow])  # wide and narrow spreads
    spec_in, spec_out = fmt_in.spec(), fmt_out.spec()
    y = ops.fixed_point_softmax(x, spec_in, spec_out).double()
    err = (y - torch.softmax(x.double(), -1)).abs().max().item()
    assert err <= fmt_out.scale / 2 + 197 * 2.0 ** -30
    assert torch.equal(y.sum(-1).round(), torch.ones(len(x), dtype=torch.float64))


@pytest.mark.parametrize("kind", ["function", "module", "method"])
def test_softmax_backward_is_the_float_softmaxs(kind):
    g = torch.Generator().manual_seed(4)
    x = _grid((4, 9), as_format("16.8"), g)
    q = fxc.compile(Softmax(kind), fxc.Policy(input="16.8", activation_in="16.8", activation_out="32.20", gradient="float"),
                    example_inputs=(x,))
    assert [n.target for n in q.graph.nodes if n.op == "call_function"] == [ops.fixed_point_softmax]
    w = torch.randn(4, 9, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (q(x1) * w).sum().backward()
    (torch.softmax(x2, -1) * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)


def test_nodes_without_a_definition_are_left_and_refused():
    x = torch.randn(2, 3, 4)
    q = fxc.compile(Softmax(dim=1), fxc.baseline(), example_inputs=(x,))
    assert not any(n.target is ops.fixed_point_softmax for n in q.graph.nodes)
    with pytest.raises(ExportError, match="'softmax'.*over the last dim"):
        integer_graph(q.eval(), (x,))
    # 24-bit codes times 24-bit codes over 64 terms: float64 could not hold the sums exactly
    a, b = torch.randn(2, 3, 64), torch.randn(2, 64, 5)
    q = fxc.compile(Product("matmul"), fxc.Policy(input="24.12", activation="24.12"), example_inputs=(a, b))
    assert not any(n.target is ops.fixed_point_matmul for n in q.graph.nodes)
    with pytest.raises(ExportError, match="'matmul'.*not rewritten"):
        integer_graph(q.eval(), (a, b))


@pytest.mark.parametrize("fout", ["16.6,floor", "16.6,toward_zero", "12.10,wrap", "u16.8"])
def test_products_round_with_the_output_casts_rounding_and_overflow(fout):
    g = torch.Generator().manual_seed(8)
    fmt = as_format("16.8")
    a, b = _grid((2, 3, 5, 32), fmt, g), _grid((2, 3, 6, 32), fmt, g)
    policy = fxc.Policy(input="16.8", activation_in="16.8", activation_out=fout)
    q = fxc.compile(Product("bhqd,bhkd->bhqk"), policy, example_inputs=(a, b)).eval()
    graph = integer_graph(q, (a, b))
    sim_codes, ref_codes, ort_codes, sim, ref = _three_ways(q, graph, (a, b), ("a", "b"))
    assert torch.equal(sim_codes, ref_codes) and torch.equal(ort_codes, ref_codes)
    exact = torch.einsum("bhqd,bhkd->bhqk", a.double(), b.double())
    assert torch.equal(sim.double(), as_format(fout).quantize(exact))


def test_qdq_runs_the_float_ops_between_pairs():
    g = torch.Generator().manual_seed(5)
    fmt = as_format("16.8")
    x = _grid((8, 6, 16), fmt, g)

    class Scores(nn.Module):
        def forward(self, q, k):
            return torch.softmax(torch.einsum("bqd,bkd->bqk", q, k), -1)
    q = fxc.compile(Scores(), fxc.baseline(), example_inputs=(x, x)).eval()
    graph = integer_graph(q, (x, x))
    (ref,) = run_integer(graph, x, x)
    (out,) = onnx_session(to_qdq(q, (x, x))).run(None, {"q": x.numpy(), "k": x.numpy()})
    # the float product and softmax between Q/DQ pairs: at most one output code from the integer graph
    assert np.abs(out - ref.numpy()).max() <= fmt.scale


class Norm(nn.Module):
    def __init__(self, n, affine=True, seed=0):
        super().__init__()
        self.ln = nn.LayerNorm(n, elementwise_affine=affine)
        if affine:
            g = torch.Generator().manual_seed(seed)
            self.ln.weight.data = torch.rand(n, generator=g) * 3 - 1  # negative and > 1 gains too
            self.ln.bias.data = torch.randn(n, generator=g)

    def forward(self, x):
        return self.ln(x)


def _layer_norm_bound(q, x, ref, fmt_out, frac_in):
    """Per element: |y − y*| within the output rounding plus |w| times the bound on z (README)."""
    ln = q.get_submodule("ln") if hasattr(q, "ln") else None
    n = x.shape[-1]
    node = next(n_ for n_ in q.graph.nodes if n_.target is ops.fixed_point_layer_norm)
    w_spec, b_spec = node.args[6], node.args[7]
    params = dict(q.named_parameters())
    w = torch.round(params["ln.weight"].double() * 2 ** w_spec[0]) / 2 ** w_spec[0] if w_spec else torch.ones(n)
    b = torch.round(params["ln.bias"].double() * 2 ** b_spec[0]) / 2 ** b_spec[0] if b_spec else torch.zeros(n)
    xd = x.double()
    z = F.layer_norm(xd, (n,), eps=1e-5)
    expected = z * w.double() + b.double()
    plan = intmath.layer_norm_plan(n, ops.code_bits(node.args[5]), frac_in, 1e-5)
    sigma = torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    bound_z = 2.0 ** -(plan["k"] + 1) + (2.0 ** -(plan["k"] + plan["g"]) + 2 * z.abs()) / (sigma * 2.0 ** (frac_in + plan["p"]))
    bound = fmt_out.scale / 2 + w.double().abs() * bound_z
    inside = (expected > fmt_out.min_value) & (expected < fmt_out.max_value)
    return (ref.double() - expected).abs()[inside], bound.expand_as(expected)[inside]


@pytest.mark.parametrize("fin, fout, affine", [("8.4", "16.10", True), ("8.6", "16.12", False)])
def test_layer_norm_of_every_pair_of_8_bit_codes(fin, fout, affine):
    fmt_in, fmt_out = as_format(fin), as_format(fout)
    x = _every_pair(fmt_in)                          # 65,536 rows of length 2
    policy = fxc.Policy(input=fin, activation_in=fin, activation_out=fout, weight="24.12", bias="16.8")
    q = fxc.compile(Norm(2, affine), policy, example_inputs=(x[:2],)).eval()
    assert [n.target for n in q.graph.nodes if n.op == "call_function"] == [ops.fixed_point_layer_norm]
    graph = integer_graph(q, (x[:2],))
    sim_codes, ref_codes, ort_codes, sim, ref = _three_ways(q, graph, (x,), ("x",))
    assert torch.equal(sim_codes, ref_codes), f"{(sim_codes != ref_codes).sum()} codes differ"
    assert torch.equal(ort_codes, ref_codes)
    err, bound = _layer_norm_bound(q, x, ref, fmt_out, fmt_in.frac)
    assert torch.all(err <= bound), f"{(err > bound).sum()} values beyond the bound, worst {err.max()}"


def test_layer_norm_of_random_rows_through_every_backend():
    g = torch.Generator().manual_seed(6)
    fmt = as_format("16.8")
    spread = torch.tensor([1, 8, 256, 8192]).repeat_interleave(16).reshape(-1, 1, 1)
    offset = torch.randint(-8192, 8192, (64, 3, 1), generator=g)
    codes = (torch.randint(-2 ** 15, 2 ** 15, (64, 3, 48), generator=g) % (2 * spread + 1) - spread + offset)
    x = (codes.double() * fmt.scale).float()
    q = fxc.compile(Norm(48, seed=1), fxc.baseline(), example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:2],))
    sim_codes, ref_codes, ort_codes, sim, ref = _three_ways(q, graph, (x,), ("x",))
    assert torch.equal(sim_codes, ref_codes) and torch.equal(ort_codes, ref_codes)
    err, bound = _layer_norm_bound(q, x, ref, fmt, fmt.frac)
    assert torch.all(err <= bound), f"{(err > bound).sum()} values beyond the bound, worst {err.max()}"


def test_layer_norm_backward_is_the_float_layer_norms():
    g = torch.Generator().manual_seed(7)
    x = _grid((4, 5, 12), as_format("16.8"), g) / 64
    spec, w_spec = as_format("16.14").spec(), as_format("24.12").spec()
    m = Norm(12)
    w, b = (torch.round(t.detach() * 4096) / 4096 for t in (m.ln.weight, m.ln.bias))
    inputs = [t.clone().requires_grad_() for t in (x, w, b, x, w, b)]
    y = torch.randn(4, 5, 12, generator=g)
    (ops.fixed_point_layer_norm(*inputs[:1], (12,), *inputs[1:3], 1e-5, spec, w_spec, w_spec, spec) * y).sum().backward()
    (F.layer_norm(inputs[3], (12,), inputs[4], inputs[5], 1e-5) * y).sum().backward()
    for a, b_ in zip(inputs[:3], inputs[3:]):
        assert torch.allclose(a.grad, b_.grad, atol=1e-5)


def test_isqrt_in_onnx_equals_the_reference():
    # LayerNorm's σ is the one isqrt in the graph: drive it over every bit length directly
    import onnx
    from onnx import TensorProto, helper
    from fxcompile.deploy.backends.onnx.builder import OPSET, _Builder
    from fxcompile.deploy.backends.onnx.emitters import emit_isqrt
    b = _Builder(None, {})
    out = emit_isqrt(b, "n")
    graph = helper.make_graph(b.nodes + [helper.make_node("Identity", [out], ["root"])], "isqrt",
                              [helper.make_tensor_value_info("n", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("root", TensorProto.INT64, ["N"])], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 10)
    n = torch.tensor([v for k in range(63) for v in (2 ** k - 1, 2 ** k, 2 ** k + 1)] + [2 ** 63 - 1]
                     + [k * k - 1 for k in range(1, 3000, 7)] + [(2 ** 31 + 5) ** 2 - 1])
    (root,) = onnx_session(model).run(None, {"n": n.numpy()})
    assert root.tolist() == [math.isqrt(v) for v in n.tolist()] == intmath.isqrt(n).tolist()
