"""The CUDA cast kernels (Triton) against the C++ CPU kernel and the reference, bit for bit.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors
(:mod:`fxcompile.runtime.kernels.gpu` picks the interpreter for CPU tensors); with one, the
``cuda`` cases run the compiled kernels through ``torch.ops.fxcompile.*`` on CUDA tensors.
Tensors are small: the interpreter executes every block operation with NumPy.
"""

from __future__ import annotations

import pytest
import torch

import fxcompile as fxc
from fxcompile import fixed
from fxcompile.runtime import kernels, telemetry
from fxcompile.runtime.cast import _inside, quantize_reference
from fxcompile.runtime.kernels import gpu

from .test_kernels import DTYPES, FORMATS, ROUNDINGS, SEED, _inputs, _reference, assert_same_bits

pytestmark = pytest.mark.skipif(not gpu.available(), reason="Triton is not installed (pip install triton)")

_NO_GPU = "no CUDA GPU here: the same kernels are checked under Triton's interpreter (the 'interpreter' cases)"
DEVICES = ["interpreter", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason=_NO_GPU)])]


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    kernels.load()


class Path:
    """The operators of the CUDA path: the Triton functions on CPU tensors (interpreter), or
    the registered operators on CUDA tensors; results come back to the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def _to(self, t):
        return t.cuda() if self.cuda and isinstance(t, torch.Tensor) else t

    def _op(self, name):
        return getattr(torch.ops.fxcompile, name) if self.cuda else getattr(gpu, name)

    def quantize(self, x, spec, seed=None):
        return self._op("quantize")(self._to(x), spec, seed).cpu()

    def quantize_(self, x, spec, seed=None):
        x = self._to(x)
        assert self._op("quantize_")(x, spec, seed) is x
        return x.cpu()

    def quantize_mask(self, x, spec, seed=None):
        y, mask = self._op("quantize_mask")(self._to(x), spec, seed)
        return y.cpu(), mask.cpu()

    def cast_backward(self, grad, mask, spec, seed=None):
        return self._op("cast_backward")(self._to(grad), self._to(mask), spec, seed).cpu()


def _values(fmt, dtype):
    return _inputs(fmt, dtype)["1000"][:400]  # ties, signed zero, NaN, ±Inf, many binades


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_triton_kernels_equal_the_cpu_kernel_and_the_reference(fmt, rounding, dtype, device):
    path, spec = Path(device), fmt.replace(rounding=rounding).spec()
    x = _values(fmt, dtype)
    cpu = torch.ops.fxcompile.quantize(x, spec, SEED)
    ref = _reference(x, spec, SEED)
    assert_same_bits(cpu, ref)
    y, mask = path.quantize_mask(x, spec, SEED)
    assert_same_bits(y, cpu)
    assert torch.equal(mask, torch.ops.fxcompile.quantize_mask(x, spec, SEED)[1])
    assert torch.equal(mask, kernels.pack_mask(~_inside(ref, spec)))
    assert_same_bits(path.quantize(x, spec, SEED), cpu)
    grad = (torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    assert_same_bits(path.cast_backward(grad, mask, spec, SEED), torch.ops.fxcompile.cast_backward(grad, mask, spec, SEED))
    assert_same_bits(path.cast_backward(grad, None, spec, SEED), _reference(grad, spec, SEED))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [fixed(8, 3, mode="asymmetric", zero_point=5),
                                 fixed(12, 6, rounding="stochastic", overflow="wrap")], ids=str)
def test_layouts_empty_0d_strided_transposed(fmt, dtype, device):
    path, spec = Path(device), fmt.spec()
    for name, x in _inputs(fmt, dtype).items():
        if name == "1000":
            continue
        ref = _reference(x, spec, SEED)
        assert_same_bits(path.quantize(x, spec, SEED), ref)
        assert_same_bits(path.quantize_(x.clone(), spec, SEED), ref)  # in place, transposed layout kept
        y, mask = path.quantize_mask(x, spec, SEED)
        assert_same_bits(y, ref)
        assert torch.equal(mask, torch.ops.fxcompile.quantize_mask(x, spec, SEED)[1]), name
        grad = (torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 9).to(dtype)
        assert_same_bits(path.cast_backward(grad, mask, spec, SEED),
                         torch.ops.fxcompile.cast_backward(grad, mask, spec, SEED))
        assert_same_bits(path.cast_backward(grad, mask, [], None), torch.where(_inside(ref, spec), grad, 0.0))
        assert_same_bits(path.cast_backward(grad, None, [], None), grad.contiguous())


@pytest.mark.parametrize("words", [1, 16])
def test_many_programs_with_the_gpu_block_size(monkeypatch, words):
    """The interpreter normally runs one large program; here blocks are as small as (or smaller
    than) the GPU's, so element indices, hash counters and mask words cross program boundaries."""
    monkeypatch.setattr(gpu, "_WORDS_INTERPRETED", words)
    spec = fixed(10, 4, rounding="stochastic").spec()
    x = torch.randn(3000, generator=torch.Generator().manual_seed(3)) * 40
    y, mask = gpu.quantize_mask(x, spec, SEED)
    cy, cmask = torch.ops.fxcompile.quantize_mask(x, spec, SEED)
    assert_same_bits(y, cy)
    assert torch.equal(mask, cmask) and bool(mask.ne(0).any())
    g = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    assert_same_bits(gpu.cast_backward(g, mask, spec, SEED), torch.ops.fxcompile.cast_backward(g, mask, spec, SEED))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_rounding_gives_the_cpu_codes_for_the_same_seed(dtype, device):
    path = Path(device)
    spec = fixed(16, 4, rounding="stochastic").spec()
    x = torch.full((2000,), 0.3, dtype=dtype)
    torch.manual_seed(3)
    a = path.quantize(x, spec)          # the seed is drawn from the default (CPU) generator
    torch.manual_seed(3)
    assert_same_bits(a, torch.ops.fxcompile.quantize(x, spec))
    torch.manual_seed(3)
    assert_same_bits(a, quantize_reference(x, spec, seed=kernels.draw_seed()))
    assert set(a.float().unique().tolist()) == {0.25, 0.3125}    # both neighbours drawn
    assert not torch.equal(a, path.quantize(x, spec))            # a fresh seed for the next call
    for seed in (0, 7, (1 << 62) - 1, -1):                       # hi and lo seed words alike
        assert_same_bits(path.quantize(x, spec, seed), torch.ops.fxcompile.quantize(x, spec, seed))


def test_bad_input_is_refused_with_the_operator_named():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="spec"):
        gpu.quantize(x, [4, -127, 127])
    with pytest.raises(RuntimeError, match="unknown rounding"):
        gpu.quantize(x, [4, -127, 127, 0, 7, 0])
    with pytest.raises(RuntimeError, match="quantize_mask: expected a floating-point"):
        gpu.quantize_mask(torch.arange(4), fixed(8, 4).spec())
    with pytest.raises(RuntimeError, match="ceil"):
        gpu.cast_backward(x, torch.zeros(2, dtype=torch.int64), fixed(8, 4).spec())


def test_on_cpu_routes_the_operators_to_triton_and_restores_the_cpu_kernel(monkeypatch):
    calls = []
    launch = gpu._launch
    monkeypatch.setattr(gpu, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    x = torch.randn(50, requires_grad=True)
    y0 = x * 1.0
    with gpu.on_cpu():
        y = fxc.cast(x, fixed(8, 4), fixed(8, 6))
        y.backward(torch.ones(50))
        z = y0 * y0
        with torch.no_grad():
            torch.ops.fxcompile.quantize_(y0, fixed(8, 4).spec())
    assert len(calls) == 3                  # forward, backward and the in-place store
    assert y0._version == 1                 # the in-place store bumped the version counter once
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    fxc.cast(x.detach(), fixed(8, 4))
    assert len(calls) == 3                  # the C++ kernel is back


def _train(steps: int, on_gpu_path: bool, telemetry_on: bool = True):
    from fxcompile.experiments.models import SeedCNN
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 1, 28, 28, generator=g), torch.randint(0, 10, (2,), generator=g)
    torch.manual_seed(0)
    qmodel = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=torch.nn.CrossEntropyLoss())
    if telemetry_on:
        telemetry.enable(qmodel)
    with gpu.on_cpu() if on_gpu_path else _nothing():
        opt = fxc.fixed_point_optimizer(torch.optim.Adam(qmodel.parameters(), lr=1e-2), qmodel)
        for _ in range(steps):
            opt.zero_grad()
            qmodel.loss(qmodel(x), y).backward()
            opt.step()
    return qmodel


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_seed_cnn_training_on_the_gpu_path_ends_with_the_cpu_parameters():
    """The seed CNN with the shipped baseline (stochastic gradients, weights and biases): the
    Triton kernels under the interpreter and the C++ kernel store the same bits."""
    cpu, triton, start = _train(3, False), _train(3, True), _train(0, False)
    assert len(list(cpu.parameters())) == 8
    assert not all(torch.equal(a, b) for a, b in zip(cpu.parameters(), start.parameters()))  # it trained
    for a, b in zip(cpu.parameters(), triton.parameters()):
        assert_same_bits(a.detach(), b.detach())
    assert telemetry.summary(cpu) == telemetry.summary(triton)
    assert sum(r["forward_elements"] for r in telemetry.summary(cpu)) > 0
