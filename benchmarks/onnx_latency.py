"""ORT latency of the exported integer graph and of the QDQ export ÷ a float ONNX export of the same model.

All three are exported from the same (untrained: latency does not depend on the weights) model,
loaded into ONNX Runtime's CPU provider with one intra-op thread (default graph optimizations,
so the QDQ model runs as ORT fuses it), and timed side by side in this process, alternating,
on the same batch; the figures are the ratios of the medians.  ``--models`` takes the bundled
models and torchvision's classification models (``fxcompile.experiments.models.build(name,
num_classes=10, in_channels=1)``), ``--policies`` shipped names or policy files; each pair is
also checked with ``verify`` on the batch (output codes that differ between ONNX Runtime and
the integer reference, ``ort≠int``, and between the simulation and the integer reference,
``sim≠int``).  ``--profile`` also prints
where the integer graph's time goes (ORT's profiler, kernel time summed by op type and by the
lowered op: node names start with it)::

    python benchmarks/onnx_latency.py [--models seed_cnn mlp residual_cnn] [--policies baseline 8bit] \
        [--batch 64] [--size 28] [--repeats 20] [--runs 3] [--profile] [--results FILE]
    python benchmarks/onnx_latency.py --models resnet18 mobilenet_v2 --policies baseline 8bit \
        --runs 3 --results benchmarks/results/onnx_latency.json

The QDQ export is timed twice: as ``export_onnx(..., flavour="qdq")`` writes it, and with
``uint8_activations=True`` (signed 8-bit activations as uint8, the form ORT fuses throughout);
``--qdq-fold-batch-norms`` writes both with ``fold_batch_norms=True`` (each batch norm after a
conv folded into it with per-channel weight scales; the integer graph is unchanged).
``vit`` is the small ViT of ``examples/vit_fashion_mnist.py`` (2 layers; integer softmax,
LayerNorm and GELU)::

    python benchmarks/onnx_latency.py --models vit --runs 3 --results benchmarks/results/vit_latency.json

``--runs`` repeats the whole measurement (fresh sessions) and prints the spread of the ratio.
``--results FILE`` writes every run's times, ratios and differing codes as JSON.
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
import datetime
import importlib
import io
import json
import os
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
from fxcompile.deploy.export import integer_graph, onnx_session, verify
from fxcompile.experiments.models import build


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


def _build(name: str) -> torch.nn.Module:
    """A bundled or torchvision model by name (one channel, 10 classes), or ``vit``: the small
    ViT of ``examples/vit_fashion_mnist.py``."""
    if name == "vit":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
        from vit_fashion_mnist import ViT
        return ViT()
    return build(name, num_classes=10, in_channels=1)


def measure(name: str, policy: str, batch: int, repeats: int, with_profile: bool = False, against=None,
            size: int = 28, fold_batch_norm: bool = False, qdq_fold: bool = False):
    """Median seconds a run: the integer graph, the QDQ graph and the QDQ graph with uint8
    activations (``None`` when the QDQ flavour cannot write this model), the float graph and (``against``: an exporter module) the same
    integer graph exported by it; the profile report; and ``verify``'s differing codes."""
    torch.manual_seed(0)
    model = _build(name).eval()
    x = torch.randn(batch, 1, size, size)
    qmodel = fxc.compile(model, policy, example_inputs=(x[:1],), fold_batch_norm=fold_batch_norm).eval()
    fxc.fixed_point_optimizer(torch.optim.SGD(qmodel.parameters(), lr=0.0), qmodel, rounding="nearest")
    with tempfile.TemporaryDirectory() as tmp:
        exported = fxc.export_onnx(qmodel, f"{tmp}/{name}.onnx", (x[:1],))
        try:
            qdq = fxc.export_onnx(qmodel, f"{tmp}/{name}_qdq.onnx", (x[:1],), flavour="qdq",
                                  fold_batch_norms=qdq_fold)
            qdq_u8 = fxc.export_onnx(qmodel, f"{tmp}/{name}_qdq_u8.onnx", (x[:1],), flavour="qdq",
                                     uint8_activations=True, fold_batch_norms=qdq_fold)
        except fxc.ExportError:
            qdq = qdq_u8 = None
    checked = verify(qmodel, exported, x)
    sessions = {"integer": onnx_session(exported, threads=1), "float": onnx_session(_float_onnx(model, x[:1]), threads=1)}
    if qdq is not None:
        sessions["qdq"] = onnx_session(qdq, threads=1)
        sessions["qdq_u8"] = onnx_session(qdq_u8, threads=1)
    feed = {"x": x.numpy()}
    if against is not None:
        sessions["against"] = onnx_session(against.to_onnx(integer_graph(qmodel, (x[:1],))), threads=1)
        codes = [sessions[key].run(None, feed)[1] for key in ("integer", "against")]
        if not np.array_equal(*codes):
            raise SystemExit(f"{name}: the two exporters' graphs give different codes")
    times = {key: [] for key in sessions}
    for session in sessions.values():  # warm up
        session.run(None, {session.get_inputs()[0].name: feed["x"]})
    for _ in range(repeats):
        for key, session in sessions.items():
            inputs = {session.get_inputs()[0].name: feed["x"]}
            t0 = time.perf_counter()
            session.run(None, inputs)
            times[key].append(time.perf_counter() - t0)
    report = profile(exported, feed, repeats) if with_profile else ""
    medians = {key: statistics.median(t) for key, t in times.items()}
    medians.setdefault("qdq", None)
    medians.setdefault("qdq_u8", None)
    return medians, report, {k: checked[k] for k in ("mismatches", "simulation_mismatches", "outputs")}


def _policy(name: str):
    """A shipped policy's name or a policy file, and how the table calls it."""
    return name, pathlib.Path(name).stem if name.endswith((".toml", ".json")) else name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["seed_cnn", "mlp", "residual_cnn"],
                   help="bundled or torchvision models (built for 10 classes and one input channel)")
    p.add_argument("--policies", "--policy", nargs="+", default=["baseline"],
                   help="shipped policy names (baseline, optimized, 8bit) or policy files")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28, help="input height and width")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runs", type=int, default=1, help="whole measurements per model (the ratio's spread)")
    p.add_argument("--against", metavar="REV", help="also time the integer graph as exported at git revision REV")
    p.add_argument("--profile", action="store_true", help="also print where the integer graph's time goes")
    p.add_argument("--fold-batch-norm", action="store_true",
                   help="compile with fold_batch_norm=True (one rounding fewer per batch norm; not bit-exact "
                        "with the simulation)")
    p.add_argument("--qdq-fold-batch-norms", action="store_true",
                   help="the QDQ exports fold each batch norm after a conv into it (fold_batch_norms=True: "
                        "per-channel weight scales; the integer graph is unchanged)")
    p.add_argument("--results", type=pathlib.Path, help="write every run's figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    against = exporter_at(args.against) if args.against else None
    load = os.getloadavg()[0]
    print(f"ONNX Runtime CPU, 1 thread, batch {args.batch} of 1x{args.size}x{args.size}, median of {args.repeats}; "
          f"load average {load:.1f}" + ("; batch norms folded" if args.fold_batch_norm else "")
          + ("; QDQ batch norms folded" if args.qdq_fold_batch_norms else ""))
    extra = f"{args.against + ' ms':>14}{'vs ' + args.against:>14}" if against else ""
    print(f"{'model':<14}{'policy':<10}{'integer ms':>11}{'qdq ms':>9}{'qdq u8 ms':>10}{'float ms':>10}"
          f"{'int/float':>11}{'qdq/float':>11}{'u8/float':>10}{'ort≠int':>9}{'sim≠int':>9}{extra}")
    records = []
    ms = lambda v: 1e3 * v if v is not None else float("nan")  # noqa: E731
    for name in args.models:
        for policy, label in map(_policy, args.policies):
            ratios, qdq_ratios, u8_ratios, versus, runs = [], [], [], [], []
            for run in range(args.runs):
                t, report, checked = measure(name, policy, args.batch, args.repeats,
                                             args.profile and run == args.runs - 1, against, args.size,
                                             args.fold_batch_norm, args.qdq_fold_batch_norms)
                ratios.append(t["integer"] / t["float"])
                qdq, u8 = (t[k] / t["float"] if t[k] is not None else None for k in ("qdq", "qdq_u8"))
                qdq_ratios += [qdq] if qdq is not None else []
                u8_ratios += [u8] if u8 is not None else []
                line = (f"{name:<14}{label:<10}{ms(t['integer']):>11.2f}{ms(t['qdq']):>9.2f}{ms(t['qdq_u8']):>10.2f}"
                        f"{ms(t['float']):>10.2f}{ratios[-1]:>11.2f}{qdq if qdq is not None else float('nan'):>11.2f}"
                        f"{u8 if u8 is not None else float('nan'):>10.2f}{checked['mismatches']:>9}"
                        f"{checked['simulation_mismatches']:>9}")
                if against:
                    versus.append(t["integer"] / t["against"])
                    line += f"{1e3 * t['against']:>14.2f}{versus[-1]:>14.3f}"
                print(line, flush=True)
                runs.append({"integer_ms": round(ms(t["integer"]), 2), "float_ms": round(ms(t["float"]), 2),
                             "qdq_ms": None if t["qdq"] is None else round(ms(t["qdq"]), 2),
                             "qdq_uint8_ms": None if t["qdq_u8"] is None else round(ms(t["qdq_u8"]), 2),
                             "integer_over_float": round(ratios[-1], 2),
                             "qdq_over_float": None if qdq is None else round(qdq, 2),
                             "qdq_uint8_over_float": None if u8 is None else round(u8, 2), **checked})
                if against:
                    runs[-1].update(against=args.against, against_ms=round(ms(t["against"]), 2),
                                    against_over_float=round(t["against"] / t["float"], 2),
                                    integer_over_against=round(versus[-1], 3))
            if args.runs > 1:
                spread = f"{name:<14}{label:<10}{'over ' + str(args.runs) + ' runs':>40}{min(ratios):>11.2f}–{max(ratios):.2f}"
                if qdq_ratios:
                    spread += f"{min(qdq_ratios):>6.2f}–{max(qdq_ratios):.2f}{min(u8_ratios):>6.2f}–{max(u8_ratios):.2f}"
                if against:
                    spread += f"{'':>10}{min(versus):.3f}–{max(versus):.3f}"
                print(spread, flush=True)
            if report:
                print(report, flush=True)
            median = lambda v: round(statistics.median(v), 2) if v else None  # noqa: E731
            records.append({"model": name, "policy": label, "runs": runs,
                            "integer_over_float_median": median(ratios), "qdq_over_float_median": median(qdq_ratios),
                            "qdq_uint8_over_float_median": median(u8_ratios)})
    if args.results:
        args.results.write_text(json.dumps({
            "command": "python benchmarks/onnx_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "settings": {"batch": args.batch, "input": [1, args.size, args.size], "repeats": args.repeats,
                         "threads": 1, "fold_batch_norm": args.fold_batch_norm,
                         "qdq_fold_batch_norms": args.qdq_fold_batch_norms, "onnxruntime": _ort_version(), "load_average": round(load, 1)},
            "models": records}, indent=1) + "\n")


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


if __name__ == "__main__":
    main()
