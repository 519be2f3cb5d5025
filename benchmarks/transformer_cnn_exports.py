"""Do swin and convnext (torchvision, timm) export integer-only under ``baseline``, bit-exactly?

Builds each model with random weights and 10 classes at 64x64 (timm's swin with windows of 4,
which divide its 16, 8, 4 and 2-wide stages; torchvision's swin_t with its windows of 7, the
stages padded to whole windows; torchvision's MaxVit in maxvit_t's configuration with
partitions of 2, ``maxvit_t_p2``, or as maxvit_t builds it at 224x224, ``maxvit_t``, its convs and
linear layers given PyTorch's default init), compiles it under ``baseline``, takes one SGD
step on a random batch of 8, switches to eval and exports the integer, QDQ and QONNX flavours.
On 64 random inputs it reports the differing output codes ORT vs integer reference and
simulation vs integer reference (``fxcompile.deploy.export.verify``), and how far the QDQ
flavour (ORT) and the QONNX flavour (qonnx's executor, if installed, on the first
``--qonnx-images``) are from the integer graph; a model that does not export gets the start
of the error::

    python benchmarks/transformer_cnn_exports.py --threads 1 --results benchmarks/results/swin_convnext_exports.json
    python benchmarks/transformer_cnn_exports.py --models convnext_atto swin_tiny

``--results`` adds this run's models to the file (replacing their earlier figures), so each
model can be measured in a run of its own; ``--part I N`` verifies the I-th of N equal parts of
the same random inputs, and the parts of a model add up to one record (runs of the parts may go
in parallel)::

    for i in 1 2 3 4; do python benchmarks/transformer_cnn_exports.py --threads 1 --models swin_t \
        --qonnx-images 1 --part $i 4 --results benchmarks/results/swin_convnext_exports.json; done
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import pathlib
import sys
import tempfile

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


def _maxvit(size, partition):
    def build():
        # maxvit_t's configuration; maxvit_t() itself fixes partitions of 7, which need 221 to 224 pixels
        from torchvision.models.maxvit import MaxVit
        model = MaxVit(input_size=(size, size), stem_channels=64, block_channels=[64, 128, 256, 512],
                       block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.2, partition_size=partition,
                       num_classes=10)
        for m in model.modules():  # MaxVit's init (std 0.02) gives nearly the same output codes for every input
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()
        return model, (3, size, size)
    return build


MODELS = {  # name: builder returning (model, input shape without the batch)
    "convnext_tiny": _torchvision("convnext_tiny"),       # torchvision: layer scale, LayerNorm2d
    "swin_t": _torchvision("swin_t"),                     # torchvision: windows of 7, written out while tracing
    "maxvit_t_p2": _maxvit(SIZE, 2),                      # torchvision's maxvit_t with partitions of 2 at 64x64
    "maxvit_t": _maxvit(224, 7),                          # torchvision's maxvit_t as built, 224x224
    "convnext_atto": _timm("convnext_atto"),              # timm: channels-last LayerNorm2d, gamma reshaped
    "swin_tiny": _timm("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=64, help="random inputs to verify on")
    parser.add_argument("--qonnx-images", type=int, default=4,
                        help="inputs to run the QONNX flavour on (qonnx's executor is slow; 0: skip)")
    parser.add_argument("--part", type=int, nargs=2, metavar=("I", "N"), default=(1, 1),
                        help="verify only the I-th of N equal parts of the random inputs (QONNX on part 1 only); "
                             "with --results the parts of a model add up to one record")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformer_exports
    transformer_exports.MODELS.update(MODELS)  # run() builds its models from that table
    results = {}
    for name in args.models:
        i, n = args.part
        r = results[name] = run(name, args.images, args.qonnx_images if i == 1 else 0, (i - 1, n))
        if n > 1:
            r["parts"] = [f"{i} of {n}"]
        transformer_exports.print_record(name, r, 16)
    if args.results:  # models measured before in this file are kept: one run per model fits a shared machine
        # runs in parallel (--part) write one after the other
        with open(pathlib.Path(tempfile.gettempdir()) / f"{args.results.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _write(args.results, results)


def _write(path: pathlib.Path, results: dict) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = old.get("runs", []) + [{"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                                   "load_average": [round(v, 1) for v in os.getloadavg()], "models": list(results)}]
    before = old.get("models", {})
    models = {**before, **{name: _parts(before.get(name), r) for name, r in results.items()}}
    path.write_text(json.dumps({"command": " && ".join(r["command"] for r in runs), "date": runs[-1]["date"],
                                "runs": runs, "models": models}, indent=1) + "\n")


def _parts(old: dict | None, new: dict) -> dict:
    """A model's record from the parts measured so far (``--part``): counts added up, largest
    differences kept; a whole run, a part of another split or a part measured again replaces the
    old record."""
    if not (old and new.get("parts") and old.get("parts") and old.get("exported") and new["exported"]
            and old["parts"][0].split(" of ")[1] == new["parts"][0].split(" of ")[1]
            and new["parts"][0] not in old["parts"]):
        return new
    merged = {**old, "parts": old["parts"] + new["parts"], "seconds": round(old["seconds"] + new["seconds"], 1)}
    n, rest = (int(v) for v in (old["input"].split("x", 1)[0], new["input"].split("x", 1)[0]))
    merged["input"] = f"{n + rest}x{old['input'].split('x', 1)[1]}"
    for key in ("output_codes", "differing_ort_vs_integer", "differing_simulation_vs_integer"):
        merged[key] = old[key] + new[key]
    merged["qdq_vs_integer"] = {
        "differing_codes": old["qdq_vs_integer"]["differing_codes"] + new["qdq_vs_integer"]["differing_codes"],
        "max_code_difference": max(old["qdq_vs_integer"]["max_code_difference"],
                                   new["qdq_vs_integer"]["max_code_difference"])}
    if "qonnx_vs_integer" in new:
        merged["qonnx_vs_integer"] = new["qonnx_vs_integer"]
    return merged


if __name__ == "__main__":
    main()
