"""Which torchvision CNNs export as integer ONNX graphs under ``baseline``, bit-exactly?

Builds each model with ``num_classes=10`` at a small input, compiles it under ``baseline``,
and exports the integer flavour.  On random inputs it prints the differing output codes
between the fixed-point simulation (eval mode), the integer reference and ONNX Runtime, or
the op names of the ``ExportError`` that stops the export (it names every node that does not
lower) and, when those are activation modules, the same figures with them replaced by ReLU
(what the other ops do)::

    python benchmarks/cnn_exports.py --threads 1 --results benchmarks/results/cnn_exports.json
    python benchmarks/cnn_exports.py --models densenet121 shufflenet_v2_x0_5

A batch norm right after a conv folds into it at export, which drops a rounding the
simulation makes, so models with such pairs may differ from the simulation by a few codes
while ORT still equals the integer reference (``deploy/fold_bn.py``); freshly built models
have identity batch-norm statistics, where the fold changes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys
import time

import torch
import torchvision

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.export import integer_graph, onnx_session

MODELS = {  # name: (builder keyword arguments, input size)
    "resnet18": ({}, 64),
    "densenet121": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "vgg11": ({}, 224),     # its adaptive pool to 7 × 7 lowers when the features are 7 × 7
    "alexnet": ({}, 224),   # the same with 6 × 6
    "regnet_y_400mf": ({}, 64),
}


def _unsupported(message: str) -> list[str]:
    """The distinct op labels an ExportError lists, e.g. ['Sigmoid', 'SiLU']."""
    return sorted(set(re.findall(r"'[\w.]+' \(([\w.]+)\)", message)))


def _relu_for(model: torch.nn.Module, labels: list[str]) -> bool:
    """Replace the activation modules whose class names are ``labels`` by ReLU; whether any were."""
    replaced = False
    for module in model.modules():
        for name, child in module.named_children():
            if type(child).__name__ in labels:
                setattr(module, name, torch.nn.ReLU())
                replaced = True
    return replaced


def run(name: str, batch: int, relu_for: list[str] | None = None) -> dict:
    """Export ``name``; if it stops at activation modules only, also report the model with
    those replaced by ReLU (``with_relu_for``: what the other ops do)."""
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    if relu_for:
        _relu_for(model, relu_for)
    x = torch.randn(batch, 3, size, size)
    start = time.perf_counter()
    try:
        q = fxc.compile(model, fxc.baseline(), example_inputs=(x[:2],)).eval()
        graph = integer_graph(q, (x[:2],))
    except fxc.ExportError as e:
        labels = _unsupported(str(e))
        result = {"exports": False, "stopped_by": labels or [str(e)[:300]]}
        if relu_for is None and labels and all(hasattr(torch.nn, label) for label in labels):
            result["with_relu_for"] = run(name, batch, labels)
        return result
    with torch.no_grad():
        sim = q(x)
    (ref,) = run_integer(graph, x)
    out, _ = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    out = torch.from_numpy(out)
    return {"exports": True, "input": f"{batch}x3x{size}x{size}", "integer_ops": len(graph.ops),
            "output_codes": ref.numel(), "differing_simulation_vs_integer": int((sim != ref).sum()),
            "differing_ort_vs_integer": int((out != ref).sum()), "seconds": round(time.perf_counter() - start, 1)}


def _line(r: dict) -> str:
    return (f"exports ({r['input']}, {r['integer_ops']} integer ops): differing output codes simulation vs "
            f"integer {r['differing_simulation_vs_integer']}, ORT vs integer {r['differing_ort_vs_integer']} of "
            f"{r['output_codes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        r = results[name] = run(name, args.batch)
        if r["exports"]:
            print(f"{name:20s} {_line(r)}", flush=True)
        else:
            print(f"{name:20s} does not export: {', '.join(r['stopped_by'])}", flush=True)
            if "with_relu_for" in r:
                relu = r["with_relu_for"]
                print(f"{'':20s} with ReLU for {', '.join(r['stopped_by'])}: "
                      f"{_line(relu) if relu['exports'] else 'stops at ' + ', '.join(relu['stopped_by'])}", flush=True)
    if args.results:
        command = "python " + " ".join(sys.argv)
        args.results.write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                            "torchvision": torchvision.__version__, "models": results},
                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
