"""Does torchvision's resnet18 export as an integer ONNX graph under ``baseline``, bit-exactly?

Builds ``torchvision.models.resnet18(num_classes=10)`` with its first convolution taking one
channel (or ``--channels 3``: torchvision's own), compiles it under ``baseline`` (batch norm
folded at export), and exports the integer flavour, then the QDQ and QONNX flavours.  On random 96 × 96 inputs (layer4 is then 3 × 3: a global average by 9) it prints the number of differing output codes
between the fixed-point simulation, the integer reference and ONNX Runtime, or the
``ExportError`` that stops the export (it names every unsupported node)::

    python benchmarks/resnet18_export.py --batch 16 --results benchmarks/results/resnet18_export.json

``--results FILE`` adds this run's figures to FILE (one entry per input configuration).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile

import torch
import torchvision
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import to_onnx
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--results", type=pathlib.Path, help="add this run's figures to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    if args.channels == 1:
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    q = fxc.compile(model, fxc.baseline(), example_inputs=(x[:2],)).eval()
    try:
        graph = integer_graph(q, (x[:2],))
    except fxc.ExportError as e:
        print(f"resnet18 integer export: FAILED\n{e}")
        return
    with torch.no_grad():
        sim = q(x)
    (ref,) = run_integer(graph, x)
    out, _ = onnx_session(to_onnx(graph)).run(None, {"x": x.numpy()})
    out = torch.from_numpy(out)
    print(f"resnet18 integer export: ok ({len(graph.ops)} integer ops), {args.batch} inputs of {args.size}x{args.size}")
    print(f"differing output codes: simulation vs integer reference {int((sim != ref).sum())}, "
          f"ORT vs integer reference {int((out != ref).sum())} (of {ref.numel()})")
    agreement = (sim.argmax(1) == out.argmax(1)).float().mean().item()
    print(f"top-1 agreement simulation vs ORT: {agreement:.3f}")
    if args.results:
        data = json.loads(args.results.read_text()) if args.results.exists() else {"runs": {}}
        command = "python " + " ".join(sys.argv)
        data.update(command=command, date=datetime.date.today().isoformat())  # the latest run's
        data["runs"][f"{args.channels}x{args.size}x{args.size}, batch {args.batch}"] = {"command": command,
            "integer_ops": len(graph.ops), "output_codes": ref.numel(),
            "differing_simulation_vs_integer": int((sim != ref).sum()),
            "differing_ort_vs_integer": int((out != ref).sum()), "top1_agreement": agreement}
        args.results.write_text(json.dumps(data, indent=1) + "\n")
    for flavour in ("qdq", "qonnx"):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(q, pathlib.Path(tmp) / f"resnet18_{flavour}.onnx", (x[:2],), flavour=flavour)
            print(f"resnet18 {flavour} export: ok")
        except fxc.ExportError as e:
            print(f"resnet18 {flavour} export: FAILED\n{e}")


if __name__ == "__main__":
    main()
