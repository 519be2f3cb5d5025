"""What one elementwise op costs ONNX Runtime's CPU provider, by type: the integer graph's
requantizes and LayerNorm are made of these, and their price against float32 bounds how close
an integer-only graph can come to a float one.

Each op runs alone in its own session (one intra-op thread) on a (64, 50, 64) tensor — the
example ViT's activations at batch 64 — and is timed in alternation with the others; the
figures are medians, and each is also given as a multiple of float32 ``Mul`` timed in the same
rounds::

    python benchmarks/ort_integer_ops.py [--repeats 50] [--results benchmarks/results/ort_integer_ops.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper

SHAPE = [64, 50, 64]
_NP = {T.INT32: np.int32, T.INT64: np.int64, T.UINT32: np.uint32, T.FLOAT: np.float32}


def _binary(op, dtype, value, **attrs):
    return op, dtype, dtype, [value], attrs


CASES = {
    "Mul float32": _binary("Mul", T.FLOAT, 3),
    "Add float32": _binary("Add", T.FLOAT, 3),
    "Mul int32": _binary("Mul", T.INT32, 3),
    "Add int32": _binary("Add", T.INT32, 3),
    "Min int32": _binary("Min", T.INT32, 3),
    "Div int32 (by 256)": _binary("Div", T.INT32, 256),
    "BitwiseAnd int32": _binary("BitwiseAnd", T.INT32, 255),
    "BitShift uint32 (right 8)": _binary("BitShift", T.UINT32, 8, direction="RIGHT"),
    "Mul int64": _binary("Mul", T.INT64, 3),
    "Add int64": _binary("Add", T.INT64, 3),
    "Div int64 (by 256)": _binary("Div", T.INT64, 256),
    "Cast int32 → int8": ("Cast", T.INT32, T.INT8, [], {"to": T.INT8}),
    "Cast int32 → int64": ("Cast", T.INT32, T.INT64, [], {"to": T.INT64}),
}


def _session(op, itype, otype, consts, attrs):
    inits = [numpy_helper.from_array(np.array(v, dtype=_NP[itype]), f"c{i}") for i, v in enumerate(consts)]
    node = helper.make_node(op, ["x"] + [t.name for t in inits], ["y"], **attrs)
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", itype, SHAPE)],
                              [helper.make_tensor_value_info("y", otype, SHAPE)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--results", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    runs = {}
    for name, (op, itype, otype, consts, attrs) in CASES.items():
        x = rng.integers(0, 1 << 20, size=SHAPE).astype(_NP[itype])
        runs[name] = (_session(op, itype, otype, consts, attrs), {"x": x})
    times = {name: [] for name in runs}
    for _ in range(3):  # warm up
        for sess, feed in runs.values():
            sess.run(None, feed)
    for _ in range(args.repeats):  # alternate, so that load hits every op alike
        for name, (sess, feed) in runs.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ref = ms["Mul float32"]
    print(f"ONNX Runtime {ort.__version__} CPU, 1 thread, {np.prod(SHAPE):,} elements, median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'op':<28} {'ms':>7} {'÷ Mul float32':>14}")
    for name, t in ms.items():
        print(f"{name:<28} {t:7.3f} {t / ref:14.2f}")
    if args.results:
        out = {"command": "python benchmarks/ort_integer_ops.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "settings": {"shape": SHAPE, "repeats": args.repeats, "threads": 1, "onnxruntime": ort.__version__,
                            "machine": platform.machine(), "load_average": round(os.getloadavg()[0], 1)},
               "ops": {name: {"ms": round(t, 4), "over_mul_float32": round(t / ref, 2)} for name, t in ms.items()}}
        Path(args.results).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
