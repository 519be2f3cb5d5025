"""Which vision transformers export integer-only under ``baseline``, bit-exactly?

Builds each model with random weights and 10 classes at a small image size, compiles it under
``baseline`` (fx tracing writes ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``
out in registry ops), takes one SGD step on a random batch of 8, switches to eval and exports
the three flavours.  On 64 random inputs it reports the differing output codes ORT vs integer
reference and simulation vs integer reference (``fxcompile.deploy.export.verify``), and how
far the QDQ flavour (ORT, on the 64 inputs) and the QONNX flavour (qonnx's executor, if
installed, on the first ``--qonnx-images``) are from the integer graph: differing output codes
and the largest difference in codes.  ``--latency``
also times the example ViT's integer graph against a float ONNX export of its FP32 model
(ONNX Runtime, one thread, alternating, median of ``--repeats``)::

    python benchmarks/transformer_exports.py --threads 1 --latency --results benchmarks/results/transformer_exports.json
    python benchmarks/transformer_exports.py --models example deit_tiny
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session, verify

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))


def _example():
    from vit_fashion_mnist import ViT
    return ViT(), (1, 28, 28)


def _torchvision_vit_b_16():
    import torchvision
    return torchvision.models.vit_b_16(image_size=32, num_classes=10), (3, 32, 32)


def _timm(name):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, img_size=32, num_classes=10), (3, 32, 32)
    return build


MODELS = {  # name: builder returning (model, input shape without the batch)
    "example": _example,                                   # examples/vit_fashion_mnist.py: patch 7, 2 layers, width 64
    "vit_b_16": _torchvision_vit_b_16,                     # torchvision, 12 layers, width 768, patch 16 at 32x32
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224"),  # timm, 12 layers, width 192, at 32x32
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224"),
}


def _codes(out: np.ndarray, frac: int) -> np.ndarray:
    return np.round(out.astype(np.float64) * 2.0 ** frac).astype(np.int64)


def _distance(codes: np.ndarray, ref: np.ndarray) -> dict:
    return {"differing_codes": int((codes != ref).sum()), "output_codes": int(ref.size),
            "max_code_difference": int(np.abs(codes - ref).max())}


def flavour_figures(q, models: dict, example: tuple, test: tuple, qonnx_count: int, count_key: str) -> dict:
    """The exported ``models`` (one per flavour) of ``q`` compared on the model inputs ``test``:
    ``verify``'s differing codes of the integer graph, and the QDQ graph's (and on the first
    ``qonnx_count`` inputs, the QONNX graph's) distance from the integer reference's codes."""
    checked = verify(q, models["integer"], test if len(test) > 1 else test[0])
    graph = integer_graph(q, example)
    frac = graph.op_of(graph.outputs[0]).frac

    def run_onnx(model, inputs):
        session = onnx_session(model)
        return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})

    if checked["mismatches"] == 0:  # ORT's integer graph gave the integer reference's codes: not run again
        ref = run_onnx(models["integer"], test)[1]
    else:
        (ref,) = run_integer(graph, *test, codes=True)
        ref = ref.numpy()
    (qdq,) = run_onnx(models["qdq"], test)
    figures = {"integer_ops": len(graph.ops), "output_codes": checked["outputs"],
               "differing_ort_vs_integer": checked["mismatches"],
               "differing_simulation_vs_integer": checked["simulation_mismatches"],
               "qdq_vs_integer": _distance(_codes(qdq, frac), ref)}
    if qonnx_count:
        try:
            from fxcompile.deploy.backends.qonnx import run_qonnx
            with warnings.catch_warnings():  # qonnx's shape inference leaves the symbolic sizes 0
                warnings.filterwarnings("ignore", message="Output shapes disagree")
                (qo,) = run_qonnx(models["qonnx"], *[t[:qonnx_count] for t in test])
            figures["qonnx_vs_integer"] = {count_key: qonnx_count, **_distance(_codes(qo, frac), ref[:qonnx_count])}
        except ImportError:
            figures["qonnx_vs_integer"] = "qonnx not installed"
    return figures


def run(name: str, images: int, qonnx_images: int, part: tuple[int, int] = (0, 1)) -> dict:
    """One model's record; ``part=(i, n)`` verifies only the i-th of n equal parts of the
    ``images`` random inputs (the same inputs as a whole run; a record per part)."""
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    start = time.perf_counter()
    q = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],))
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.01), q)
    opt.zero_grad()
    q.loss(q(x), y).backward()
    opt.step()
    q.eval()
    test = torch.randn(images, *shape)
    i, n = part
    test = test[i * images // n:(i + 1) * images // n]
    result = {"input": "x".join(map(str, (len(test), *shape))), "parameters": sum(p.numel() for p in model.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            models = {f: export_onnx(q, f"{tmp}/{f}.onnx", (x[:1],), flavour=f) for f in ("integer", "qdq", "qonnx")}
        except fxc.ExportError as e:
            return {**result, "exported": False, "error": str(e)[:500]}
        result["exported"] = True
        result.update(flavour_figures(q, models, (x[:1],), (test,), qonnx_images, "images"))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def latency(batch: int, repeats: int) -> dict:
    """Median seconds per run of the example ViT: integer graph vs the FP32 model's float ONNX."""
    torch.manual_seed(0)
    model, shape = _example()
    model.eval()
    x = torch.randn(batch, *shape)
    q = fxc.compile(model, fxc.baseline(), example_inputs=(x[:2],)).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (x[:1],), buf, dynamo=False, input_names=["x"], output_names=["output"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"integer": onnx_session(export_onnx(q, f"{tmp}/int.onnx", (x[:1],)), threads=1),
                    "float": onnx_session(onnx.load_from_string(buf.getvalue()), threads=1)}
    feed, times = {"x": x.numpy()}, {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feed)
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"batch": batch, "repeats": repeats, "integer_ms": round(1e3 * med["integer"], 2),
            "float_ms": round(1e3 * med["float"], 2), "ratio": round(med["integer"] / med["float"], 1)}


def print_record(name: str, r: dict, width: int) -> None:
    """One line for one model's record from :func:`run`."""
    if not r["exported"]:
        print(f"{name:{width}s} does not export: {r['error']}", flush=True)
        return
    qo = r.get("qonnx_vs_integer")
    if isinstance(qo, dict):  # records written before the distances counted their codes: 10 an image
        qo = (f", QONNX {qo['differing_codes']} of {qo.get('output_codes', qo.get('images', 0) * 10)} "
              f"(max {qo['max_code_difference']})")
    else:
        qo = ""
    print(f"{name:{width}s} exported ({r['integer_ops']} integer ops): differing codes of {r['output_codes']}: "
          f"ORT vs integer {r['differing_ort_vs_integer']}, simulation vs integer "
          f"{r['differing_simulation_vs_integer']}; QDQ {r['qdq_vs_integer']['differing_codes']} "
          f"(max {r['qdq_vs_integer']['max_code_difference']}){qo}; {r['seconds']} s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=64, help="random inputs to verify on")
    parser.add_argument("--qonnx-images", type=int, default=8,
                        help="inputs to run the QONNX flavour on (qonnx's executor is slow; 0: skip)")
    parser.add_argument("--qonnx-models", nargs="*", default=[m for m in MODELS if m != "vit_b_16"],
                        help="models whose QONNX flavour is run (default: all but vit_b_16, on which qonnx's "
                             "node-by-node executor ran over 10 minutes without finishing)")
    parser.add_argument("--latency", action="store_true", help="also time the example ViT, integer vs float ORT")
    parser.add_argument("--batch", type=int, default=64, help="batch of the latency measurement")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--results", type=pathlib.Path, help="write this run's figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        r = results[name] = run(name, args.images, args.qonnx_images if name in args.qonnx_models else 0)
        _write(args.results, {"models": results})  # each model as it finishes
        print_record(name, r, 24)
    out = {"models": results}
    if args.latency:
        out["latency"] = latency(args.batch, args.repeats)
        lat = out["latency"]
        print(f"example ViT, batch {lat['batch']}, ORT one thread: integer {lat['integer_ms']} ms, "
              f"float {lat['float_ms']} ms ({lat['ratio']}x)", flush=True)
    _write(args.results, out)


def _write(path: pathlib.Path | None, out: dict) -> None:
    if path:
        path.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                                    "load_average": [round(v, 1) for v in os.getloadavg()], **out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
