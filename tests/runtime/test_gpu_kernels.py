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
from fxcompile.core.quantizer import inside, quantize_reference
from fxcompile.runtime.kernels import gpu

from tests.helpers import DTYPES, FORMATS, NO_GPU, ROUNDINGS, SEED, assert_same_bits
from tests.helpers import kernel_inputs as _inputs
from tests.helpers import kernel_reference as _reference

pytestmark = pytest.mark.skipif(not gpu.available(), reason="Triton is not installed (pip install triton)")

DEVICES = ["interpreter", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NO_GPU)])]


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    kernels.load()


class CudaPath:
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
    path, spec = CudaPath(device), fmt.replace(rounding=rounding).spec()
    x = _values(fmt, dtype)
    cpu = torch.ops.fxcompile.quantize(x, spec, SEED)
    ref = _reference(x, spec, SEED)
    assert_same_bits(cpu, ref)
    y, mask = path.quantize_mask(x, spec, SEED)
    assert_same_bits(y, cpu)
    assert torch.equal(mask, torch.ops.fxcompile.quantize_mask(x, spec, SEED)[1])
    assert torch.equal(mask, kernels.pack_mask(~inside(ref, spec)))
    assert_same_bits(path.quantize(x, spec, SEED), cpu)
    grad = (torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    assert_same_bits(path.cast_backward(grad, mask, spec, SEED), torch.ops.fxcompile.cast_backward(grad, mask, spec, SEED))
    assert_same_bits(path.cast_backward(grad, None, spec, SEED), _reference(grad, spec, SEED))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [fixed(8, 3, mode="asymmetric", zero_point=5),
                                 fixed(12, 6, rounding="stochastic", overflow="wrap")], ids=str)
def test_layouts_empty_0d_strided_transposed(fmt, dtype, device):
    path, spec = CudaPath(device), fmt.spec()
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
        assert_same_bits(path.cast_backward(grad, mask, [], None), torch.where(inside(ref, spec), grad, 0.0))
        assert_same_bits(path.cast_backward(grad, None, [], None), grad.contiguous())


# wrapping ranges that are not powers of two (no FixedPoint makes one; specs can): the fmod path
ODD_WRAPS = [[3, -100, 100, 0, 0, 1], [2, -7, 20, 5, 0, 1], [8, -5_000_000, 5_000_000, 0, 0, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", range(4))
@pytest.mark.parametrize("spec", ODD_WRAPS, ids=str)
def test_wrap_over_a_range_that_is_not_a_power_of_two(spec, rounding, dtype, device):
    path, spec = CudaPath(device), spec[:4] + [rounding, 1]
    x = _values(fixed(16, spec[0]), dtype)
    cpu = torch.ops.fxcompile.quantize(x, spec, SEED)
    assert_same_bits(cpu, _reference(x, spec, SEED))
    assert_same_bits(path.quantize(x, spec, SEED), cpu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subnormal_inputs(dtype, device):
    """GPU floor flushes subnormals to zero; the kernel must still floor -tiny to -1 (and keep
    the signs of zeros), as the CPU does."""
    path, tiny = CudaPath(device), torch.finfo(dtype).tiny
    # subnormal in the work precision too for float32, bfloat16 and float64 (not for float16)
    x = torch.tensor([-tiny / 4, tiny / 4, -tiny, tiny, -0.0, 0.0, -3 * tiny / 8], dtype=dtype)
    for rounding in ROUNDINGS:
        for frac in (0, 4):
            spec = fixed(8, frac, rounding=rounding).spec()
            assert_same_bits(path.quantize(x, spec, SEED), torch.ops.fxcompile.quantize(x, spec, SEED))
    assert torch.ops.fxcompile.quantize(x, fixed(8, 0, rounding="floor").spec())[0].item() == -1.0


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
    path = CudaPath(device)
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


def test_a_broken_triton_install_says_what_to_do(monkeypatch):
    import sys
    monkeypatch.setattr(gpu, "_launchers", {})
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    with pytest.raises(RuntimeError, match="FXCOMPILE_KERNELS=python"):
        gpu.quantize(torch.randn(3), fixed(8, 4).spec())


def test_on_cpu_routes_the_operators_to_triton_and_restores_the_cpu_kernel(monkeypatch):
    calls = []
    launch = gpu._launch
    monkeypatch.setattr(gpu, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    x = torch.randn(50, requires_grad=True)
    y0 = x * 1.0
    with kernels.on_cpu():
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


def _seed_cnn(device: str):
    from fxcompile.experiments.models import SeedCNN
    torch.manual_seed(0)
    qmodel = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=torch.nn.CrossEntropyLoss()).to(device)
    telemetry.enable(qmodel)
    return qmodel


def _steps(qmodel, opt, x, y, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        qmodel.loss(qmodel(x), y).backward()
        opt.step()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def _deterministic(request):
    if request.node.callspec.params.get("device") != "cuda":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


@pytest.mark.parametrize("device", DEVICES)
def test_seed_cnn_training_and_resume_on_the_gpu_path_end_with_the_reference_parameters(device, tmp_path,
                                                                                        _deterministic):
    """The seed CNN with the shipped baseline (stochastic gradients, weights and biases), 3 Adam
    steps.  Reference: an uninterrupted run with the C++ kernel (on a GPU: on the GPU, since
    convolutions differ across devices).  Checked: 2 steps on the CUDA path (the Triton
    kernels; under the interpreter without a GPU), a checkpoint, a fresh model resumed from
    it, 1 more step: the same parameter bits and the same telemetry counts."""
    from fxcompile.training.checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
    dev = "cuda" if device == "cuda" else "cpu"
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 1, 28, 28, generator=g).to(dev), torch.randint(0, 10, (2,), generator=g).to(dev)
    start = [p.detach().clone() for p in _seed_cnn(dev).parameters()]
    reference = _seed_cnn(dev)
    _steps(reference, fxc.fixed_point_optimizer(torch.optim.Adam(reference.parameters(), lr=1e-2), reference), x, y, 3)
    with kernels.on_cpu() if device == "interpreter" else _nothing():
        first = _seed_cnn(dev)
        opt = fxc.fixed_point_optimizer(torch.optim.Adam(first.parameters(), lr=1e-2), first)
        _steps(first, opt, x, y, 2)
        save_checkpoint(tmp_path, {"model": first.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                                   "telemetry": telemetry.counters_state(first)}, step=2)
        resumed = _seed_cnn(dev)
        opt = fxc.fixed_point_optimizer(torch.optim.Adam(resumed.parameters(), lr=1e-2), resumed)
        state = load_latest(tmp_path)
        resumed.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        telemetry.load_counters(resumed, state["telemetry"])
        _steps(resumed, opt, x, y, 1)
    params = list(reference.parameters())
    assert len(params) == 8 and not all(torch.equal(a.cpu(), b) for a, b in zip(params, start))  # it trained
    for a, b in zip(params, resumed.parameters()):
        assert_same_bits(a.detach().cpu(), b.detach().cpu())
    counts = telemetry.summary(reference)
    assert counts == telemetry.summary(resumed) and sum(r["forward_elements"] for r in counts) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark runs instead of refusing")
def test_the_step_time_benchmark_refuses_cuda_without_a_gpu(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time", path)
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_casts_under_autocast_equal_the_cpu_kernel(device):
    """Autocast hands the casts bfloat16 tensors; the Triton path rounds them like the C++ kernel
    (values of formats wider than bfloat16's 8-bit significand come out as the nearest bfloat16)."""
    dev = "cuda" if device == "cuda" else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    policy = fxc.Policy(activation="8.4", gradient="16.10,stochastic", weight="8.6", bias="8.4", loss="16.10")
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    results = []
    for path in ("cpu", device):
        qmodel = fxc.compile(model, policy).to(dev if path != "cpu" else "cpu")
        xs = x.to(dev if path != "cpu" else "cpu")
        torch.manual_seed(2)
        with kernels.on_cpu() if path == "interpreter" else _nothing():
            with torch.autocast(xs.device.type, dtype=torch.bfloat16):
                out = qmodel(xs)
            out.float().sum().backward()
        assert out.dtype == torch.bfloat16
        y = out.detach().float().cpu()
        assert_same_bits(quantize_reference(y, fixed(8, 4).spec()), y)  # 8-bit codes: exact in bfloat16
        results.append([out.detach().cpu()] + [p.grad.cpu() for p in qmodel.parameters()])
    if device == "cuda":  # matmuls round differently across devices: bits can differ there
        return
    for a, b in zip(*results):
        assert_same_bits(a, b)


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia.compiler as nvidia
        return bool(nvidia.get_ptxas(80).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend or no bundled ptxas
        return False


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton's NVIDIA backend (with its bundled ptxas) is missing")
@pytest.mark.skipif(gpu._interpret_everything(), reason="TRITON_INTERPRET=1: Triton's library is interpreted, not compiled")
def test_the_gpu_variants_compile_to_ieee_instructions_only():
    """What the interpreter cannot show: the compiled GPU code.  Every floating-point step must
    be one correctly rounded IEEE instruction: no fused multiply-add, no approximate division,
    no flush-to-zero except in floor/ceil (whose effect on subnormals the kernel undoes)."""
    import re
    variants = [(torch.float32, fixed(16, 8)), (torch.float16, fixed(8, 4, signed=False, overflow="wrap",
                                                                      rounding="stochastic")),
                (torch.bfloat16, fixed(8, 3, rounding="floor")), (torch.float64, fixed(24, 12, rounding="toward_zero"))]
    for dtype, fmt in variants:
        code = gpu.ptx(dtype, fmt.spec(), mask_in=True, mask_out=True)
        ops = set(re.findall(r"^\s*([a-z]+(?:\.[a-z0-9]+)*)", code, re.M))
        floating = {op for op in ops if re.search(r"\.(f16|bf16|f32|f64)\b", op)}
        assert floating and {"mul.rn.f32", "mul.rn.f64"} & floating, sorted(floating)
        bad = {op for op in floating if op.startswith(("fma", "mad", "div", "rcp", "sqrt", "ex2", "lg2"))
               or ".approx" in op or (".ftz" in op and not op.startswith(("cvt.rmi", "cvt.rpi")))}
        assert not bad, (dtype, str(fmt), sorted(bad))
        assert not re.search(r"^\s*(mul|add|sub)\.f(32|64)\b", code, re.M), "an arithmetic op without .rn may be fused"
    # a wrap whose range is not a power of two takes libdevice's fmod (exact; approximate steps inside)
    assert ".entry cast_kernel" in gpu.ptx(torch.float32, ODD_WRAPS[0])
