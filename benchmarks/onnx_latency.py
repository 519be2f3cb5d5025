"""ORT latency of the exported integer graph ÷ a float ONNX export of the same model.

Both are exported from the same (untrained: latency does not depend on the weights) model,
loaded into ONNX Runtime's CPU provider with one intra-op thread, and timed side by side in
this process, alternating, on the same batch; the figure is the ratio of the medians.
``--profile`` also prints where the integer graph's time goes (ORT's profiler, kernel time
summed by op type and by the lowered op: node names start with it)::

    python benchmarks/onnx_latency.py [--models seed_cnn mlp residual_cnn] [--batch 64] [--repeats 20] [--runs 3] [--profile]

``vit`` is the small ViT of ``examples/vit_fashion_mnist.py`` (2 layers; integer softmax,
LayerNorm and GELU); ``--results`` writes the figures as JSON with the command and date::

    python benchmarks/onnx_latency.py --models vit --runs 3 --results benchmarks/results/vit_latency.json

``--runs`` repeats the whole measurement (fresh sessions) and prints the spread of the ratio.
``--against REV`` also exports the same integer graph with the ONNX backend
(``fxcompile/deploy/backends/onnx/``, or the single module ``fxcompile/deploy/backends/onnx.py``
or ``fxcompile/backends/onnx.py`` of older revisions) as of git revision ``REV``, checks that
both give the same codes, times it in the same alternation and prints current / ``REV``
(steadier than comparing ratios from two runs)::

    python benchmarks/onnx_latency.py --models residual_cnn --runs 3 --against HEAD~3
"""

from __future__ import annotations

import argparse
import atexit
import collections
import importlib
import io
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import types
import tempfile
import time

import numpy as np
import onnx
import torch

import fxcompile as fxc
from fxcompile.deploy import lower as lowering_now
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.experiments.models import build


def _build(name: str) -> torch.nn.Module:
    """A bundled model by name, or ``vit``: the small ViT of ``examples/vit_fashion_mnist.py``."""
    if name == "vit":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
        from vit_fashion_mnist import ViT
        return ViT()
    return build(name)


def _float_onnx(model, x) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["output"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def profile(model: onnx.ModelProto, feed: dict, repeats: int, top: int = 8) -> str:
    """Kernel time of ``model`` per run (ORT's profiler, one thread), by op type and by the
    lowered op (the first two parts of a node's name, e.g. ``conv2d/conv1``)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.intra_op_num_threads, opts.inter_op_num_threads = True, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = f"{tmp}/ort"
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(repeats):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op, by_source = collections.Counter(), collections.Counter()
    for e in events:
        by_op[e["args"]["op_name"]] += e["dur"] / repeats
        by_source["/".join(e["name"].split("/")[:2])] += e["dur"] / repeats
    total = sum(by_op.values())
    lines = [f"  kernel time {total / 1e3:.2f} ms a run"]
    for title, counter in (("op type", by_op), ("lowered op", by_source)):
        lines.append(f"  by {title}: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counter.most_common(top)))
    return "\n".join(lines)


# Where the ONNX backend lived, newest first (a module or a package, relative to fxcompile/), and
# the module that defines IntegerGraph: the current one stands in for it, so that both
# exporters take the same graph (and the revision's kernels are never registered twice).
_BACKENDS = ("deploy/backends/onnx", "backends/onnx")
_LOWERING = ("deploy.lower", "passes.lower", "lower")


def exporter_at(rev: str) -> types.ModuleType:
    """The ONNX backend (a module with ``to_onnx``) as of git revision ``rev`` of this repository.

    ``git archive`` extracts the revision's ``fxcompile`` into a temporary folder, imported as
    the private package ``_fxcompile_at_<rev>`` whose packages are bare (their ``__init__``
    does not run: only what the backend imports is loaded, from the revision, except the
    lowering module, which is this tree's)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="onnx_backend_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    archive = subprocess.run(["git", "archive", rev, "fxcompile"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    tree = tmp / "fxcompile"
    backend = next((b for b in _BACKENDS if (tree / b).is_dir() or (tree / f"{b}.py").is_file()), None)
    if backend is None:
        raise SystemExit(f"{rev}: no ONNX backend at fxcompile/{{{','.join(_BACKENDS)}}}(.py)")
    name = "_fxcompile_at_" + re.sub(r"\W", "_", rev)
    for init in sorted(tree.rglob("__init__.py")):
        if init.parent.relative_to(tree).as_posix().startswith(backend):
            continue  # the backend's own package (and its subpackages) import for real
        package = ".".join([name, *init.parent.relative_to(tree).parts])
        module = sys.modules[package] = types.ModuleType(package)
        module.__path__, module.__package__ = [str(init.parent)], package
    for lowering in _LOWERING:
        if (tree / f"{lowering.replace('.', '/')}.py").is_file():
            sys.modules[f"{name}.{lowering}"] = lowering_now
    return importlib.import_module(f"{name}.{backend.replace('/', '.')}")


def measure(name: str, policy: str, batch: int, repeats: int, with_profile: bool = False, against=None):
    """Median seconds a run: the integer graph, the float graph and (``against``: an exporter
    module) the same integer graph exported by it; and the profile report."""
    torch.manual_seed(0)
    model = _build(name).eval()
    x = torch.randn(batch, 1, 28, 28)
    qmodel = fxc.compile(model, policy, example_inputs=(x[:1],)).eval()
    fxc.fixed_point_optimizer(torch.optim.SGD(qmodel.parameters(), lr=0.0), qmodel, rounding="nearest")
    with tempfile.TemporaryDirectory() as tmp:
        exported = fxc.export_onnx(qmodel, f"{tmp}/{name}.onnx", (x[:1],))
    sessions = {"integer": onnx_session(exported, threads=1), "float": onnx_session(_float_onnx(model, x[:1]), threads=1)}
    feed = {"x": x.numpy()}
    if against is not None:
        sessions["against"] = onnx_session(against.to_onnx(integer_graph(qmodel, (x[:1],))), threads=1)
        codes = [sessions[key].run(None, feed)[1] for key in ("integer", "against")]
        if not np.array_equal(*codes):
            raise SystemExit(f"{name}: the two exporters' graphs give different codes")
    times = {key: [] for key in sessions}
    for session in sessions.values():  # warm up
        session.run(None, feed)
    for _ in range(repeats):
        for key, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feed)
            times[key].append(time.perf_counter() - t0)
    report = profile(exported, feed, repeats) if with_profile else ""
    return {key: statistics.median(t) for key, t in times.items()}, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["seed_cnn", "mlp", "residual_cnn"])
    p.add_argument("--policy", default="baseline")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runs", type=int, default=1, help="whole measurements per model (the ratio's spread)")
    p.add_argument("--against", metavar="REV", help="also time the integer graph as exported at git revision REV")
    p.add_argument("--profile", action="store_true", help="also print where the integer graph's time goes")
    p.add_argument("--results", default=None, help="also write the figures as JSON here (with command and date)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    against = exporter_at(args.against) if args.against else None
    print(f"ONNX Runtime CPU, 1 thread, batch {args.batch}, median of {args.repeats}; policy {args.policy}")
    extra = f"{args.against + ' ms':>14}{'vs ' + args.against:>14}" if against else ""
    print(f"{'model':<14}{'integer ms':>12}{'float ms':>10}{'ratio':>8}{extra}")
    records = {}
    for name in args.models:
        ratios, versus, runs = [], [], []
        for run in range(args.runs):
            t, report = measure(name, args.policy, args.batch, args.repeats, args.profile and run == args.runs - 1,
                                against)
            ratios.append(t["integer"] / t["float"])
            runs.append({"integer_ms": round(1e3 * t["integer"], 2), "float_ms": round(1e3 * t["float"], 2),
                         "ratio": round(ratios[-1], 2)})
            line = f"{name:<14}{1e3 * t['integer']:>12.2f}{1e3 * t['float']:>10.2f}{ratios[-1]:>8.2f}"
            if against:
                versus.append(t["integer"] / t["against"])
                line += f"{1e3 * t['against']:>14.2f}{versus[-1]:>14.3f}"
                runs[-1].update(against_ms=round(1e3 * t["against"], 2), against_ratio=round(t["against"] / t["float"], 2),
                                vs_against=round(versus[-1], 3))
            print(line, flush=True)
        if args.runs > 1:
            spread = f"{name:<14}{'over ' + str(args.runs) + ' runs':>22}{min(ratios):>8.2f}–{max(ratios):.2f}"
            if against:
                spread += f"{'':>10}{min(versus):.3f}–{max(versus):.3f}"
            print(spread, flush=True)
        if report:
            print(report, flush=True)
        records[name] = {"runs": runs, "median_ratio": round(statistics.median(ratios), 2),
                         "max_ratio": round(max(ratios), 2)}
        if against:
            records[name].update(against=args.against, median_vs_against=round(statistics.median(versus), 3),
                                 median_against_ratio=round(statistics.median(r["against_ratio"] for r in runs), 2))
    if args.results:
        pathlib.Path(args.results).write_text(json.dumps(
            {"command": "python benchmarks/onnx_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "date": time.strftime("%Y-%m-%d"), "load_average": [round(v, 1) for v in __import__("os").getloadavg()],
             "settings": {"batch": args.batch, "repeats": args.repeats, "policy": args.policy, "threads": 1},
             "models": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
