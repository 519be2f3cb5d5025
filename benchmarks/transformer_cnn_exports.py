"""Do swin and convnext (torchvision, timm) export integer-only under ``baseline``, bit-exactly?

Builds each model with random weights and 10 classes at 64x64 (timm's swin with windows of 4,
which divide its 16, 8, 4 and 2-wide stages), compiles it under ``baseline``, takes one SGD
step on a random batch of 8, switches to eval and exports the integer, QDQ and QONNX flavours.
On 64 random inputs it reports the differing output codes ORT vs integer reference and
simulation vs integer reference (``fxcompile.deploy.export.verify``), and how far the QDQ
flavour (ORT) and the QONNX flavour (qonnx's executor, if installed, on the first
``--qonnx-images``) are from the integer graph; a model that does not export gets the start
of the error::

    python benchmarks/transformer_cnn_exports.py --threads 1 --results benchmarks/results/swin_convnext_exports.json
    python benchmarks/transformer_cnn_exports.py --models convnext_atto swin_tiny

``--results`` adds this run's models to the file (replacing their earlier figures), so each
model can be measured in a run of its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

import torch

from transformer_exports import run  # noqa: E402 - benchmarks/ is the script's directory

SIZE = 64


def _torchvision(name):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(num_classes=10), (3, SIZE, SIZE)
    return build


def _timm(name, **kwargs):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), (3, SIZE, SIZE)
    return build


MODELS = {  # name: builder returning (model, input shape without the batch)
    "convnext_tiny": _torchvision("convnext_tiny"),       # torchvision: layer scale, LayerNorm2d
    "swin_t": _torchvision("swin_t"),                     # torchvision: its attention is an fx.wrap'd function
    "convnext_atto": _timm("convnext_atto"),              # timm: channels-last LayerNorm2d, gamma reshaped
    "swin_tiny": _timm("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=64, help="random inputs to verify on")
    parser.add_argument("--qonnx-images", type=int, default=4,
                        help="inputs to run the QONNX flavour on (qonnx's executor is slow; 0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformer_exports
    transformer_exports.MODELS.update(MODELS)  # run() builds its models from that table
    results = {}
    for name in args.models:
        r = results[name] = run(name, args.images, args.qonnx_images)
        transformer_exports.print_record(name, r, 16)
    if args.results:  # models measured before in this file are kept: one run per model fits a shared machine
        old = json.loads(args.results.read_text()) if args.results.exists() else {}
        runs = old.get("runs", []) + [{"command": "python " + " ".join(sys.argv), "date":
                                       datetime.date.today().isoformat(),
                                       "load_average": [round(v, 1) for v in os.getloadavg()],
                                       "models": list(results)}]
        args.results.write_text(json.dumps({"command": " && ".join(r["command"] for r in runs),
                                            "date": runs[-1]["date"], "runs": runs,
                                            "models": {**old.get("models", {}), **results}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
