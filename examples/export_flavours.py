"""Export one trained SeedCNN in each ONNX flavour and measure how far each is from the integer graph.

A short fixed-point training (synthetic data by default: offline, well under a minute; or
Fashion-MNIST with ``--data``), then ``fxc.export_onnx(..., flavour=...)`` for every flavour,
each run on the whole test set and compared code by code with the integer reference
(:mod:`fxcompile.deploy.backends.integer`, bit-true int64):

* integer — int64 ops, ONNX Runtime (bit-exact by construction: the check of the check),
* qdq     — float ops between QuantizeLinear/DequantizeLinear pairs, ONNX Runtime with all
            graph optimizations (its quantized-op fusions), and again with none,
* qonnx   — float ops between QONNX ``Quant`` nodes, qonnx's own executor (``execute_onnx``).

Columns: output codes that differ from the reference (of all output codes), the largest
|code difference|, top-1 agreement with the reference, and each one's accuracy.  Policies are
shipped names (``8bit``: 8-bit activations and weights, the QDQ model ONNX Runtime fuses
into QLinearConv/QGemm) or files::

    python examples/export_flavours.py                      # synthetic data
    python examples/export_flavours.py --data /path/to/fashion-mnist --train-subset 12000 \
        --policies baseline optimized 8bit
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.experiments.data import fashion_mnist, synthetic
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.training.train import TrainConfig, train


def ort_runner(path, optimize: bool):
    import onnxruntime as ort
    session = onnx_session(str(path), threads=1)
    if not optimize:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda xb: session.run(None, {"x": xb.numpy()})[0]


def qonnx_runner(path):
    import onnx
    from fxcompile.deploy.backends.qonnx import run_qonnx
    model = onnx.load(path)
    return lambda xb: run_qonnx(model, xb)[0]


def reference_codes(graph, x, batch_size: int) -> torch.Tensor:
    """The integer reference's output codes (int64, bit-true)."""
    return torch.cat([run_integer(graph, x[i:i + batch_size], codes=True)[0] for i in range(0, len(x), batch_size)])


def compare(run, ref: torch.Tensor, frac: int, x, y, batch_size: int) -> dict:
    """``run`` (float outputs) against the reference codes ``ref`` (binary point ``frac``)."""
    out = np.concatenate([np.asarray(run(x[i:i + batch_size]), dtype=np.float64) for i in range(0, len(x), batch_size)])
    codes = torch.from_numpy(np.round(out * 2.0 ** frac).astype(np.int64))  # exact: on the output grid
    return {"differ": int((codes != ref).sum()), "outputs": ref.numel(), "largest": int((codes - ref).abs().max()),
            "agree": float((codes.argmax(1) == ref.argmax(1)).double().mean()),
            "accuracy": float((codes.argmax(1) == y).double().mean())}


def write_results(path, argv, **results) -> None:
    """The measured figures as JSON beside the command that produced them and the date."""
    import datetime, json, os, sys
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv))
    Path(path).write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                      "load_average": [round(v, 1) for v in os.getloadavg()], **results},
                                     indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: synthetic data)")
    p.add_argument("--train-subset", type=int, default=12000, help="training images with --data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--policies", nargs="*", default=["baseline", "optimized"])
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch")
    p.add_argument("--out", default=None, help="keep the .onnx files in this folder")
    p.add_argument("--results", default=None, help="also write the table as JSON here (with command and date)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.data:
        (tx, ty), (vx, vy) = fashion_mnist(args.data, train_subset=args.train_subset)
        source = "Fashion-MNIST"
    else:
        (tx, ty), (vx, vy) = synthetic(n_train=2048, n_test=2000)
        source = "synthetic"
    out = Path(args.out or tempfile.mkdtemp(prefix="fxcompile-flavours-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}: {args.epochs} epoch(s) on {len(tx)} {source} images; "
          f"compared on {len(vx)} test images")
    rows = []
    for policy in args.policies:
        t0 = time.perf_counter()
        cfg = TrainConfig(model=args.model, policy=policy, epochs=args.epochs,
                          progress=False)
        m = train(cfg, (tx, ty), (vx, vy))
        qmodel = m["model_object"].eval()
        graph = integer_graph(qmodel, (vx[:1],))
        ref, frac = reference_codes(graph, vx, args.batch_size), graph.op_of(graph.outputs[0]).frac
        paths = {f: out / f"{args.model}_{policy}_{f}.onnx" for f in fxc.export.FLAVOURS}
        for flavour, path in paths.items():
            fxc.export_onnx(qmodel, path, example_inputs=(vx[:1],), flavour=flavour)
        runners = [("integer", "ORT", ort_runner(paths["integer"], True)),
                   ("qdq", "ORT", ort_runner(paths["qdq"], True)),
                   ("qdq", "ORT, no graph opt.", ort_runner(paths["qdq"], False)),
                   ("qonnx", "qonnx execute_onnx", qonnx_runner(paths["qonnx"]))]
        for flavour, runtime, run in runners:
            r = compare(run, ref, frac, vx, vy, args.batch_size)
            r.update(policy=Path(policy).stem, flavour=flavour, runtime=runtime)
            rows.append(r)
        print(f"  {policy}: trained, exported and compared in {time.perf_counter() - t0:.0f} s "
              f"(integer-graph accuracy {100 * rows[-4]['accuracy']:.2f}%)", flush=True)
    print()
    head = (f"{'policy':<11}{'flavour':<9}{'runtime':<21}{'codes != ref':>13}{'of outputs':>11}"
            f"{'max |dcode|':>12}{'top-1 agree':>13}{'accuracy':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['policy']:<11}{r['flavour']:<9}{r['runtime']:<21}{r['differ']:>13}{r['outputs']:>11}"
              f"{r['largest']:>12}{100 * r['agree']:>12.2f}%{100 * r['accuracy']:>9.2f}%")
    if args.results:
        write_results(args.results, argv, model=args.model, data=source, train_images=len(tx), test_images=len(vx),
                      epochs=args.epochs, rows=rows)


if __name__ == "__main__":
    main()
