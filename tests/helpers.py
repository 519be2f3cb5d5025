"""What several test modules share: compiled models on their grid, comparisons with the
integer reference, and where the Fashion-MNIST files are.  Test modules import from here,
never from one another."""

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fxcompile as fxc
from fxcompile import fixed
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.deploy.fold_bn import fold_bn
from fxcompile.experiments.models import SeedCNN
from fxcompile.core.quantizer import quantize_reference
from fxcompile.passes.casts import Cast

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"   # the README's ../shared/data/fashion-mnist
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
NO_GPU = "no CUDA GPU here: the same kernels are checked under Triton's interpreter (the 'interpreter' cases)"
NO_DATA = ("no Fashion-MNIST files: neither FXCOMPILE_DATA nor ../shared/data/fashion-mnist holds the four "
           "IDX files (the other tests use synthetic data)")


def fashion_mnist_root() -> str | None:
    """``FXCOMPILE_DATA`` if set, else ``../shared/data/fashion-mnist`` beside the repository,
    if it holds the four IDX files; None otherwise."""
    env = os.environ.get("FXCOMPILE_DATA")
    for root in ([Path(env)] if env else []) + [SHARED_DATA]:
        if all((root / f).is_file() for f in IDX_FILES):
            return str(root)
    return None


def on_grid(q):
    """Store parameters in their formats, as fixed-point training leaves them."""
    fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.0), q, rounding="nearest")
    return q.eval()


def compiled_with_loss(model=SeedCNN, policy=None):
    """``model()`` compiled with a cross-entropy loss graph (the baseline policy by default)."""
    return fxc.compile(model(), policy or fxc.baseline(), loss_fn=nn.CrossEntropyLoss(),
                       example_inputs=(torch.randn(2, 1, 28, 28),))


def compiled(model, policy, x, **options):
    """``model()`` with random batch-norm statistics, compiled (with ``options``) for inference and on its grid."""
    torch.manual_seed(0)
    model = model()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    return on_grid(fxc.compile(model, policy, example_inputs=(x[:2],), **options))


def run_ort(model, x):
    return onnx_session(model).run(None, {"x": x.numpy()})


def differences(model, q, x, run=run_ort):
    """(output codes that differ, largest |difference|, top-1 agreement) of ``run(model, x)``
    (ONNX Runtime by default) vs the integer reference."""
    graph = integer_graph(q, (x[:1],))
    (ref,) = run_integer(graph, x, codes=True)
    (out,) = run(model, x)
    codes = torch.from_numpy(np.round(out.astype(np.float64) * 2.0 ** graph.op_of(graph.outputs[0]).frac))
    codes = codes.to(torch.int64)
    return int((codes != ref).sum()), int((codes - ref).abs().max()), float((codes.argmax(1) == ref.argmax(1)).float().mean())


def fixed_point_edges(gm):
    """(cast node name, format, the parameter or None) of every edge of the BN-folded graph ``gm``."""
    return [(n.name, gm.get_submodule(n.target).edge.forward,
             gm.get_parameter(n.args[0].target).detach() if n.args[0].op == "get_attr" else None)
            for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Cast)
            and gm.get_submodule(n.target).edge.forward is not None]


def assert_corruption_is_caught(export, corrupt, run=run_ort):
    """The seed CNN exported by ``export`` matches the integer reference exactly, and after
    ``corrupt(model)`` (in place) the comparison sees many codes off by more than rounding."""
    x = torch.randn(32, 1, 28, 28) * 1.5
    q = compiled(SeedCNN, fxc.baseline(), x)
    model = export(fold_bn(q), (x[:1],))
    assert differences(model, q, x, run)[0] == 0  # untrained weights: no sum lands near a boundary
    corrupt(model)
    differ, largest, _ = differences(model, q, x, run)
    assert differ > x.shape[0] and largest > 4


# ---- the cast kernels: formats, dtypes and inputs every kernel is checked over --------------

FORMATS = [
    fixed(16, 8), fixed(8, 4, signed=False), fixed(24, 12), fixed(8, -2), fixed(2, 0),
    fixed(8, 3, zero_point=5),
    fixed(32, 16, overflow="wrap"), fixed(8, 4, signed=False, overflow="wrap"), fixed(23, 10, overflow="wrap"),
    fixed(12, 20, zero_point=-100, overflow="wrap"),
]
ROUNDINGS = ["nearest", "stochastic", "floor", "toward_zero"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SEED = 0x1234_5678_9ABC


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[t.dtype]
    return t.contiguous().reshape(-1).view(ints)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal shape and dtype, NaN in the same places, every other element equal bit for bit."""
    assert a.shape == b.shape and a.dtype == b.dtype
    nan_a, nan_b = torch.isnan(a).reshape(-1), torch.isnan(b).reshape(-1)
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def kernel_inputs(fmt, dtype):
    """Values spanning many binades plus ties, signed zero, NaN and ±Inf, in several layouts."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64, generator=g) * torch.logspace(-6, 12, 1000, dtype=torch.float64)
    step = 2.0 ** -fmt.frac
    x[:10] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5 * step, 1.5 * step, -0.0,
                           -2.5 * step, 1e300, -1e300, 3.0], dtype=torch.float64)
    x = x.to(dtype)
    return {"1000": x, "strided": x[::3], "empty": x[:0], "0-d": x[5], "transposed": x.view(10, 100).t(),
            "4-d": x[:960].view(2, 3, 10, 16)}


def kernel_reference(x, spec, seed):
    """The reference quantizer, with the counter-based draws for stochastic rounding."""
    return quantize_reference(x, spec, seed=seed) if spec[4] == 1 else quantize_reference(x, spec)


def differing_codes(q, x, test):
    """(simulation vs integer reference, ORT vs integer reference) differing output codes of the
    compiled model ``q`` (lowered for ``x[:2]``) on ``test``, and the integer graph."""
    from fxcompile.deploy.backends.onnx import to_onnx
    graph = integer_graph(q, (x[:2],))
    with torch.no_grad():
        sim = q(test)
    (ref,) = run_integer(graph, test)
    out, _ = onnx_session(to_onnx(graph)).run(None, {"x": test.numpy()})
    return int((sim != ref).sum()), int((torch.from_numpy(out) != ref).sum()), graph
