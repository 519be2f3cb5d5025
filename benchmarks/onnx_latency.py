"""ORT latency of the exported integer graph ÷ a float ONNX export of the same model.

Both are exported from the same (untrained: latency does not depend on the weights) model,
loaded into ONNX Runtime's CPU provider with one intra-op thread, and timed side by side in
this process, alternating, on the same batch; the figure is the ratio of the medians::

    python benchmarks/onnx_latency.py [--models seed_cnn mlp residual_cnn] [--batch 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import onnx
import torch

import fxcompile as fxc
from fxcompile.export import onnx_session
from fxcompile.models import build


def _float_onnx(model, x) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["output"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def measure(name: str, policy: str, batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(batch, 1, 28, 28)
    qmodel = fxc.compile(model, policy, example_inputs=(x[:1],)).eval()
    fxc.fixed_point_optimizer(torch.optim.SGD(qmodel.parameters(), lr=0.0), qmodel, rounding="nearest")
    with tempfile.TemporaryDirectory() as tmp:
        integer = onnx_session(fxc.export_onnx(qmodel, f"{tmp}/{name}.onnx", (x[:1],)), threads=1)
    floating = onnx_session(_float_onnx(model, x[:1]), threads=1)
    feed = {"x": x.numpy()}
    times = {"integer": [], "float": []}
    for session in (integer, floating):  # warm up
        session.run(None, feed)
    for _ in range(repeats):
        for key, session in (("integer", integer), ("float", floating)):
            t0 = time.perf_counter()
            session.run(None, feed)
            times[key].append(time.perf_counter() - t0)
    return statistics.median(times["integer"]), statistics.median(times["float"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["seed_cnn", "mlp", "residual_cnn"])
    p.add_argument("--policy", default="baseline")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"ONNX Runtime CPU, 1 thread, batch {args.batch}, median of {args.repeats}; policy {args.policy}")
    print(f"{'model':<14}{'integer ms':>12}{'float ms':>10}{'ratio':>8}")
    for name in args.models:
        t_int, t_float = measure(name, args.policy, args.batch, args.repeats)
        print(f"{name:<14}{1e3 * t_int:>12.2f}{1e3 * t_float:>10.2f}{t_int / t_float:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
