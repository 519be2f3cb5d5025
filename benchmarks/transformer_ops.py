"""How far are the fixed-point definitions of products of two activations, softmax and
LayerNorm from float64, and do they deploy bit-exactly?

Prints, side by side in one process: how many output codes a float32 product of two 16.8
activations (attention scores, d = 64) gets wrong against the exact sum (which the
definition computes); the largest error of the integer softmax and LayerNorm against float64
in units of the output format's last place (LSB), and how many codes differ from float64
rounded once to the output format; and the differing output codes of a tiny attention block
(tests/deploy/test_attention.py) between the simulation, the integer reference, ONNX Runtime
and the QDQ flavour (float ops between Q/DQ pairs) after one training step; and what each
definition costs in training against the float op followed by a cast::

    python benchmarks/transformer_ops.py --results benchmarks/results/transformer_ops.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.runtime.cast import cast

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.deploy.test_attention import Attention  # noqa: E402


def _codes(t, fmt):
    return torch.round(t.double() * 2.0 ** fmt.frac)


def _grid(shape, fmt, g, spread=None):
    lo, hi = (fmt.code_min, fmt.code_max) if spread is None else (-spread, spread)
    return (torch.randint(lo, hi + 1, shape, generator=g).double() * fmt.scale).float()


def products(g) -> dict:
    """Q·Kᵀ over d = 64 of 16.8 codes, rounded to 16.8 and to 32.16: float32 against the exact sums."""
    out, fmt = {}, as_format("16.8")
    for spread in (512, 4096):  # |values| <= 2 and <= 16
        q, k = _grid((64, 197, 64), fmt, g, spread), _grid((64, 197, 64), fmt, g, spread)
        for name in ("16.8", "32.16"):
            fout, spec = as_format(name), fmt.spec()
            exact = fout.quantize(torch.einsum("bqd,bkd->bqk", q.double(), k.double()))
            float32 = fout.quantize(torch.einsum("bqd,bkd->bqk", q, k).double())
            definition = ops.fixed_point_matmul(q.double(), k.double(), ops.matmul_equation("bqd,bkd->bqk"), spec,
                                                spec, fout.spec())
            out[f"values_up_to_{spread * fmt.scale:g}_to_{name}"] = {
                "scores": exact.numel(), "float32_differing_codes": int((float32 != exact).sum()),
                "definition_differing_codes": int((definition != exact).sum())}
    return out


def _error(y, p, fmt):
    inside = (p > fmt.min_value) & (p < fmt.max_value)
    err = ((y.double() - p).abs() / fmt.scale)[inside]
    once = fmt.quantize(p)
    return {"max_error_lsb": round(float(err.max()), 4), "values": int(inside.sum()),
            "differing_from_float64_rounded_once": int((y.double() != once)[inside].sum())}


def softmax(g) -> dict:
    out = {}
    fin = as_format("8.4")
    codes = torch.arange(fin.code_min, fin.code_max + 1)
    pairs = (torch.stack(torch.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1, 2).double() * fin.scale).float()
    for name, x, fin, fout in (("every_pair_8.4_to_16.14", pairs, fin, as_format("16.14")),
                               ("rows_197_16.8_to_16.8", _grid((256, 197), as_format("16.8"), g, 2048),
                                as_format("16.8"), as_format("16.8")),
                               ("rows_197_16.8_to_16.14", _grid((256, 197), as_format("16.8"), g, 2048),
                                as_format("16.8"), as_format("16.14"))):
        y = ops.fixed_point_softmax(x, fin.spec(), fout.spec())
        out[name] = _error(y, torch.softmax(x.double(), -1), fout)
    return out


def layer_norm(g) -> dict:
    out = {}
    fmt, wfmt, bfmt = as_format("16.8"), as_format("24.12"), as_format("16.8")
    for n in (64, 768):
        spread = torch.tensor([4, 64, 1024, 16384]).repeat_interleave(64).reshape(-1, 1)
        x = ((torch.randint(-2 ** 15, 2 ** 15, (256, n), generator=g) % (2 * spread + 1) - spread).double()
             * fmt.scale).float()
        w = wfmt.quantize(torch.rand(n, generator=g) * 2 - 0.5)
        b = bfmt.quantize(torch.randn(n, generator=g))
        y = ops.fixed_point_layer_norm(x, (n,), w, b, 1e-5, fmt.spec(), wfmt.spec(), bfmt.spec(), fmt.spec())
        out[f"rows_{n}_16.8"] = _error(y, nn.functional.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5),
                                       fmt)
    return out


def attention(batch: int) -> dict:
    torch.manual_seed(0)
    x, target = torch.randn(16, 6, 32), torch.randn(16, 6, 32)
    q = fxc.compile(Attention(), fxc.baseline(), loss_fn=nn.MSELoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    q.loss(q(x), target).backward()
    opt.step()
    q.eval()
    graph = integer_graph(q, (x[:2],))
    x = torch.randn(batch, 6, 32) * 2
    with torch.no_grad():
        sim = q(x)
    (codes,) = run_integer(graph, x, codes=True)
    _, ort = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    frac = graph.op_of(graph.outputs[0]).frac
    sim_codes = torch.round(sim.double() * 2.0 ** frac).long()
    (qdq,) = onnx_session(to_qdq(q, (x[:2],))).run(None, {"x": x.numpy()})
    qdq_codes = torch.round(torch.from_numpy(qdq).double() * 2.0 ** frac).long()
    return {"output_codes": codes.numel(), "simulation_vs_integer": int((sim_codes != codes).sum()),
            "ort_vs_integer": int((torch.from_numpy(ort) != codes).sum()),
            "qdq_vs_integer": int((qdq_codes != codes).sum()), "qdq_max_codes_off": int((qdq_codes - codes).abs().max())}


def _seconds(fn, *inputs, repeat: int = 20) -> float:
    """Median seconds of forward + backward of ``fn`` on ``inputs``."""
    times = []
    for _ in range(repeat + 2):
        leaves = [t.detach().requires_grad_() for t in inputs]
        start = time.perf_counter()
        fn(*leaves).sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[repeat // 2]


def training_cost(g) -> dict:
    """Forward + backward of each definition against the float op and a cast, at the sizes of
    examples/vit_fashion_mnist.py (batch 64, 17 tokens, width 64, 4 heads), interleaved."""
    fmt, w_fmt = as_format("16.8"), as_format("24.12")
    spec, w_spec = fmt.spec(), w_fmt.spec()
    x, s, q = _grid((64, 17, 64), fmt, g, 512), _grid((64, 4, 17, 17), fmt, g, 512), _grid((64, 4, 17, 16), fmt, g, 512)
    w, b = w_fmt.quantize(torch.rand(64, generator=g) + 0.5), fmt.quantize(torch.randn(64, generator=g))
    perms = ops.matmul_equation("bhqd,bhkd->bhqk")
    pairs = {
        "layer_norm": (lambda x, w, b: ops.fixed_point_layer_norm(x, (64,), w, b, 1e-5, spec, w_spec, spec, spec),
                       lambda x, w, b: cast(nn.functional.layer_norm(x, (64,), w, b), spec, spec), (x, w, b)),
        "softmax": (lambda s: ops.fixed_point_softmax(s, spec, spec), lambda s: cast(torch.softmax(s, -1), spec, spec),
                    (s,)),
        "matmul": (lambda a, b: ops.fixed_point_matmul(a, b, perms, spec, spec, spec),
                   lambda a, b: cast(a @ b.transpose(-2, -1), spec, spec), (q, q)),
    }
    out = {}
    for name, (definition, float_op, inputs) in pairs.items():
        times = [(_seconds(definition, *inputs), _seconds(float_op, *inputs)) for _ in range(3)]
        d, f = sorted(t[0] for t in times)[1], sorted(t[1] for t in times)[1]
        out[name] = {"definition_ms": round(1e3 * d, 3), "float_op_and_cast_ms": round(1e3 * f, 3),
                     "ratio": round(d / f, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    figures = {"products": products(g), "softmax": softmax(g), "layer_norm": layer_norm(g),
               "attention_block": attention(args.batch), "training_cost": training_cost(g)}
    print(json.dumps(figures, indent=1))
    if args.results:
        record = {"command": "python benchmarks/transformer_ops.py " + " ".join(sys.argv[1:]),
                  "date": datetime.date.today().isoformat(), "torch": torch.__version__, **figures}
        args.results.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
