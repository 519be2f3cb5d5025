"""Do the elementwise nonlinearities deploy bit-exactly, and what still stops torchvision's mobile CNNs?

For each nonlinearity (the clips ReLU6, Hardtanh, clamp; the lookup tables of Hardswish,
Hardsigmoid, SiLU, GELU, sigmoid, tanh, LeakyReLU, ELU, Mish):

* every 16.8 input code through the activation alone, to 16.13 outputs: the output codes
  where the simulation and ONNX Runtime differ from the integer reference, and where the QDQ
  flavour (the float function between quantizers) differs, with its largest difference;
* a small CNN (conv → activation → linear) compiled under ``baseline`` and trained a few
  steps, on random inputs: differing output codes between simulation, integer reference and ORT.

Then torchvision's mobile CNNs (``mobilenet_v2``, ``mobilenet_v3_small``, ``efficientnet_b0``,
``regnet_x_400mf``, ``num_classes=10``, a 1×3×64×64 input) under ``baseline``: how many of their
nonlinearities became clips or tables, and the ``ExportError`` that stops their integer export
(if any)::

    python benchmarks/nonlinear_export.py --results benchmarks/results/nonlinear_export.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import numpy as np
import torch
import torchvision
from torch import nn

import fxcompile as fxc
from fxcompile.core import ops
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.backends.qdq import to_qdq
from fxcompile.deploy.export import integer_graph, onnx_session

ACTS = {
    "ReLU6": nn.ReLU6(), "Hardtanh(-0.3, 0.7)": nn.Hardtanh(-0.3, 0.7), "clamp(min=0.1)": lambda x: x.clamp(min=0.1),
    "Hardswish": nn.Hardswish(), "Hardsigmoid": nn.Hardsigmoid(), "SiLU": nn.SiLU(), "GELU": nn.GELU(),
    "GELU(tanh)": nn.GELU(approximate="tanh"), "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(),
    "LeakyReLU(0.1)": nn.LeakyReLU(0.1), "ELU": nn.ELU(), "Mish": nn.Mish(),
}
MODELS = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf")


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.act = fn if isinstance(fn, nn.Module) else None
        self.fn = fn

    def forward(self, x):
        return self.act(x) if self.act is not None else self.fn(x)


class CNN(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 8, 3, padding=1), Act(fn), nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


def every_code(fn) -> dict:
    fin, fout = as_format("16.8"), as_format("16.13")
    x = ((torch.arange(fin.code_min, fin.code_max + 1, dtype=torch.float64)) * fin.scale).float().reshape(1, -1)
    q = fxc.compile(Act(fn), fxc.Policy(input=fin, activation_in=fin, activation=fout), example_inputs=(x,)).eval()
    graph = integer_graph(q, (x,))
    with torch.no_grad():
        sim = torch.round(q(x).double() * 2 ** fout.frac).long()
    (ref,) = run_integer(graph, x, codes=True)
    _, ort = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    (qdq,) = onnx_session(to_qdq(q, (x,))).run(None, {"x": x.numpy()})[:1]
    distance = np.abs(np.round(qdq.astype(np.float64) * 2 ** fout.frac) - ref.numpy())
    return {"input_codes": x.numel(), "integer_ops": [op.op for op in graph.ops],
            "differing_simulation_vs_integer": int((sim != ref).sum()),
            "differing_ort_vs_integer": int((torch.from_numpy(ort) != ref).sum()),
            "differing_qdq_vs_integer": int((distance > 0).sum()), "largest_qdq_difference": int(distance.max())}


def trained_cnn(fn, batch: int) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 12, 12), torch.randint(0, 10, (64,))
    q = fxc.compile(CNN(fn), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.05), q)
    for _ in range(3):
        opt.zero_grad()
        q.loss(q(x), y).backward()
        opt.step()
    q.eval()
    test = torch.randn(batch, 1, 12, 12) * 2
    with torch.no_grad():
        sim = q(test)
    graph = integer_graph(q, (test[:2],))
    (ref,) = run_integer(graph, test)
    out, _ = onnx_session(to_onnx(graph)).run(None, {"x": test.numpy()})
    return {"output_codes": ref.numel(), "differing_simulation_vs_integer": int((sim != ref).sum()),
            "differing_ort_vs_integer": int((torch.from_numpy(out) != ref).sum())}


def torchvision_model(name: str) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    q = fxc.compile(getattr(torchvision.models, name)(num_classes=10), fxc.baseline(), example_inputs=(x,)).eval()
    kinds = {}
    for node in q.graph.nodes:
        op = ops.op_of(q, node)
        if op is not None and (op.name in ops.CLIP_OPS + ops.LOOKUP_OPS or op.name == "lookup"):
            key = f"lookup {node.args[1]}" if op.name == "lookup" else op.name
            kinds[key] = kinds.get(key, 0) + 1
    try:
        graph = integer_graph(q, (x,))
        stop = None
        with torch.no_grad():
            sim = q(x)
        (ref,) = run_integer(graph, x)
        differing = int((sim != ref).sum())
    except fxc.ExportError as e:
        stop, differing = str(e).split(" Ops that lower:")[0], None
    return {"nonlinearities": kinds, "export_stopped_by": stop, "differing_simulation_vs_integer": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    functions = {}
    for name, fn in ACTS.items():
        functions[name] = {"every_16_8_code": every_code(fn), "trained_cnn": trained_cnn(fn, args.batch)}
        e, c = functions[name]["every_16_8_code"], functions[name]["trained_cnn"]
        print(f"{name:20s} {'+'.join(o for o in e['integer_ops'] if o in ('clip', 'lookup')) or '-':7s} "
              f"every code: sim {e['differing_simulation_vs_integer']}, ORT {e['differing_ort_vs_integer']}, "
              f"QDQ {e['differing_qdq_vs_integer']} (largest {e['largest_qdq_difference']}) of {e['input_codes']}; "
              f"trained CNN: sim {c['differing_simulation_vs_integer']}, ORT {c['differing_ort_vs_integer']} "
              f"of {c['output_codes']}")
    models = {}
    for name in MODELS:
        models[name] = torchvision_model(name)
        m = models[name]
        print(f"{name}: {m['nonlinearities']}; "
              + (f"export stopped: {m['export_stopped_by']}" if m["export_stopped_by"]
                 else f"exports, {m['differing_simulation_vs_integer']} differing codes"))
    if args.results:
        command = "python " + " ".join(sys.argv)
        args.results.write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                            "functions": functions, "torchvision": models}, indent=1) + "\n")


if __name__ == "__main__":
    main()
