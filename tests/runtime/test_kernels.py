"""The fused cast kernels against the pure-PyTorch reference and independent oracles."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest
import torch

import fxcompile as fxc
from fxcompile import fixed
from fxcompile.runtime import kernels
from fxcompile.core.quantizer import counter_uniform, inside, quantize_reference
from fxcompile.runtime.cast import cast, quantize
from fxcompile.runtime.kernels import fallback
from tests.helpers import DTYPES, FORMATS, ROUNDINGS, SEED, assert_same_bits
from tests.helpers import kernel_inputs as _inputs
from tests.helpers import kernel_reference as _reference

@pytest.fixture(scope="module", autouse=True)
def _loaded():
    kernels.load()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_fused_forward_mask_and_backward_equal_the_reference(fmt, rounding, dtype):
    spec = fmt.replace(rounding=rounding).spec()
    for name, x in _inputs(fmt, dtype).items():
        ref = _reference(x, spec, SEED)
        assert_same_bits(torch.ops.fxcompile.quantize(x, spec, SEED), ref)
        inplace = x.clone()   # keeps the transposed layout: in place on a non-contiguous tensor too
        assert torch.ops.fxcompile.quantize_(inplace, spec, SEED) is inplace
        assert_same_bits(inplace, ref)
        y, mask = torch.ops.fxcompile.quantize_mask(x, spec, SEED)
        assert_same_bits(y, ref)
        assert torch.equal(mask, kernels.pack_mask(~inside(ref, spec))), name
        grad = (torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
        assert_same_bits(torch.ops.fxcompile.cast_backward(grad, mask, spec, SEED),
                         _reference(torch.where(inside(ref, spec), grad, 0.0), spec, SEED))
        assert_same_bits(torch.ops.fxcompile.cast_backward(grad, None, spec, SEED), _reference(grad, spec, SEED))
        assert_same_bits(torch.ops.fxcompile.cast_backward(grad, mask, [], None),
                         torch.where(inside(ref, spec), grad, 0.0))


def test_the_active_implementation_is_the_compiled_kernel():
    # everything above would pass trivially against the fallback; say which one was tested
    if os.environ.get("FXCOMPILE_KERNELS") == "python":
        pytest.skip("fallback forced by FXCOMPILE_KERNELS=python")
    assert kernels.backend() == "cpp"


def _lowbias32(v: int) -> int:
    m = 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & m
    v ^= v >> 15
    v = (v * 0x846CA68B) & m
    return v ^ (v >> 16)


@pytest.mark.parametrize("seed", [0, 7, (1 << 62) - 1, 0xDEADBEEF_CAFEF00D])
def test_counter_uniform_is_the_documented_hash(seed):
    """Python integers as the oracle for the int64 tensor arithmetic of the reference."""
    u32, u64 = counter_uniform((300,), seed, torch.float32), counter_uniform((300,), seed, torch.float64)
    for i in (0, 1, 2, 63, 64, 299):
        h = _lowbias32((_lowbias32((i & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF)) + ((i >> 32) ^ (seed >> 32)))
                       & 0xFFFFFFFF)
        assert u32[i].item() == (h >> 8) / 2 ** 24
        assert u64[i].item() == h / 2 ** 32


def _round_half_even(q: Fraction) -> int:
    return round(q)  # Python rounds Fractions half to even


def test_cast_autograd_against_exact_rational_arithmetic():
    fwd, bwd = fixed(8, 4), fixed(8, 6)
    x = torch.tensor([0.03125, 0.09375, -1.2, 7.9, 8.5, -9.0, 7.96875, 0.5], dtype=torch.float64)
    g = torch.tensor([0.3, -0.015625, 1.1, 2.2, 5.0, -0.7, 0.1, 3.0], dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y = cast(xr, fwd, bwd)
    y.backward(g)
    for xi, gi, yi, dxi in zip(x.tolist(), g.tolist(), y.tolist(), xr.grad.tolist()):
        code = min(max(_round_half_even(Fraction(xi) * 2 ** 4), fwd.code_min), fwd.code_max)
        assert Fraction(yi) == Fraction(code, 2 ** 4)
        inside = fwd.code_min < code < fwd.code_max
        gcode = min(max(_round_half_even(Fraction(gi) * 2 ** 6), bwd.code_min), bwd.code_max)
        assert Fraction(dxi) == (Fraction(gcode, 2 ** 6) if inside else 0)


def test_cast_saves_one_bit_per_element():
    saved = []
    x = torch.randn(3, 50, 7, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cast(x, fixed(16, 8), fixed(16, 10))
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.int64, (x.numel() + 63) // 64)]
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("clip", [True, False])
def test_cast_gradient_equals_reference_composition(clip):
    fwd, bwd = fixed(8, 4, rounding="floor").spec(), fixed(10, 6).spec()
    x = (torch.randn(5, 33) * 6).requires_grad_()
    g = torch.randn(5, 33) * 3
    y = cast(x, fwd, bwd, clip_gradient=clip)
    y.backward(g)
    ref = quantize_reference(x.detach(), fwd)
    assert_same_bits(y.detach(), ref)
    gin = torch.where(inside(ref, fwd), g, 0.0) if clip else g
    assert_same_bits(x.grad, quantize_reference(gin, bwd))


def test_cast_edge_cases():
    x = torch.randn(4, requires_grad=True)
    assert cast(x, None, None) is x
    assert cast(torch.arange(3), fixed(8, 4)).dtype == torch.int64
    y = cast(x, None, fixed(8, 4))  # float forward, fixed-point gradient
    assert torch.equal(y, x)
    y.backward(torch.full((4,), 0.3))
    assert torch.equal(x.grad, torch.full((4,), 0.3125))
    with torch.no_grad():
        assert cast(x, fixed(8, 4), fixed(8, 4)).grad_fn is None
    with pytest.raises(RuntimeError, match="spec"):
        torch.ops.fxcompile.quantize(x.detach(), [4, -127, 127])


@pytest.mark.parametrize("spec, message", [([4, -127, 127], "got 3 ints"),
                                           ([4, -127, 127, 0, 9, 0], "unknown rounding or overflow")])
def test_the_pure_pytorch_kernels_check_a_spec_like_the_cpp_kernel(spec, message):
    x = torch.randn(5)
    for impl in (fallback.quantize, fallback.quantize_mask, torch.ops.fxcompile.quantize):
        with pytest.raises(RuntimeError, match=message):
            impl(x, spec)


def test_stochastic_rounding_is_reproducible_from_the_global_seed_and_unbiased():
    spec = fixed(16, 4, rounding="stochastic").spec()
    x = torch.full((200_000,), 0.3)
    torch.manual_seed(3)
    a = quantize(x, spec)
    torch.manual_seed(3)
    seed = kernels.draw_seed()  # the kernel draws its seed exactly like this
    assert torch.equal(a, quantize_reference(x, spec, seed=seed))
    torch.manual_seed(3)
    assert torch.equal(a, quantize(x, spec))
    assert not torch.equal(a, quantize(x, spec))  # a fresh seed for the next call
    assert set(a.unique().tolist()) == {0.25, 0.3125}
    assert abs(a.double().mean().item() - 0.3) < 2e-4  # 6 sigma for 2e5 Bernoulli(0.8) steps of 1/16


def test_stochastic_cast_backward_draws_its_own_seed():
    spec = fixed(16, 8, rounding="stochastic").spec()
    x = torch.randn(1000, requires_grad=True)
    grads = []
    for _ in range(2):
        torch.manual_seed(11)
        x.grad = None
        cast(x, spec, spec).backward(torch.full((1000,), 0.001))
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert set(grads[0].unique().tolist()) <= {0.0, 2 ** -8}


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fallback_matches_the_kernel(rounding):
    spec = fixed(12, 6, rounding=rounding).spec()
    x = torch.randn(3, 70) * 40
    y, mask = torch.ops.fxcompile.quantize_mask(x, spec, SEED)
    fy, fmask = fallback.quantize_mask(x, spec, SEED)
    assert_same_bits(fy, y)
    assert_same_bits(fallback.quantize_(x.clone(), spec, SEED), y)
    assert torch.equal(fmask, mask)
    g = torch.randn(3, 70)
    assert_same_bits(fallback.cast_backward(g, mask, spec, SEED), torch.ops.fxcompile.cast_backward(g, mask, spec, SEED))


def test_pack_and_unpack_mask_round_trip():
    flags = torch.rand(130) < 0.5
    words = kernels.pack_mask(flags)
    assert words.shape == (3,) and words.dtype == torch.int64
    assert torch.equal(kernels.unpack_mask(words, 130), flags)
    assert kernels.pack_mask(torch.tensor([False] * 63 + [True])).item() == -(1 << 63)


def test_without_a_compiler_the_fallback_is_used_with_one_warning():
    script = textwrap.dedent("""
        import warnings, torch
        import fxcompile.runtime.kernels as k
        def no_compiler():
            raise OSError("g++: command not found")
        k._build = no_compiler
        from fxcompile import fixed
        from fxcompile.runtime.cast import cast, quantize_reference
        x = torch.randn(100, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = cast(x, fixed(8, 4), fixed(8, 4))
            y = cast(y, fixed(8, 4), fixed(8, 4))
        y.sum().backward()
        assert k.backend() == "python", k.backend()
        assert k.cache_info() == {"cached_bytes": 0, "limit_bytes": 0, "reused": 0, "allocated": 0}
        assert torch.equal(y, quantize_reference(x.detach(), fixed(8, 4).spec()))
        assert torch.equal(x.grad, torch.where(x.abs() < 7.9, 1.0, 0.0))
        mine = [w for w in caught if "fused C++ cast kernel" in str(w.message)]
        assert len(mine) == 1, [str(w.message) for w in caught]
        print("ok")
    """)
    env = dict(os.environ, FXCOMPILE_KERNELS="")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_compiled_model_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    policy = fxc.Policy(activation="16.8", gradient="16.10", weight="24.12", bias="16.8", loss="16.10")
    qmodel = fxc.compile(model, policy)
    x = torch.randn(5, 12)
    eager = qmodel(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in qmodel.parameters()]
    qmodel.zero_grad()
    compiled = torch.compile(qmodel, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, eager)
    for p, g in zip(qmodel.parameters(), eager_grads):
        assert torch.equal(p.grad, g)


def _backward_kernel_calls(loss) -> int:
    """How many times backward allocated a new gradient (the out-of-place operator ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    return sum(e.count for e in prof.key_averages() if e.key == "fxcompile::cast_backward")


def test_backward_overwrites_the_gradient_buffer_only_when_it_owns_it():
    fwd, bwd = fixed(16, 8).spec(), fixed(16, 10).spec()
    x = (torch.randn(4, 100) * 200).requires_grad_()
    w = torch.randn(4, 100)
    assert _backward_kernel_calls((cast(x, fwd, bwd) * w).sum()) == 0  # mul's fresh gradient is reused
    ref = quantize_reference(x.detach(), fwd)
    assert_same_bits(x.grad, quantize_reference(torch.where(inside(ref, fwd), w, 0.0), bwd))
    # add's backward hands one gradient tensor to both casts: neither may overwrite it
    a, b = (torch.randn(300) * 300).requires_grad_(), (torch.randn(300) * 300).requires_grad_()
    g = torch.randn(300) * 0.37
    fwd2, bwd2 = fixed(8, 2).spec(), fixed(8, 3).spec()
    assert _backward_kernel_calls(((cast(a, fwd, bwd) + cast(b, fwd2, bwd2)) * g).sum()) >= 1
    for leaf, f, bw in ((a, fwd, bwd), (b, fwd2, bwd2)):
        ref = quantize_reference(leaf.detach(), f)
        assert_same_bits(leaf.grad, quantize_reference(torch.where(inside(ref, f), g, 0.0), bw))


def test_parameter_cast_passes_a_parameter_on_its_grid_through_without_a_copy():
    fmt = fixed(24, 12)
    w = torch.nn.Parameter(quantize_reference(torch.randn(64, 30), fmt.spec()))
    y = cast(w, fmt, fixed(16, 10), clip_gradient=False, parameter=True)
    assert y.data_ptr() == w.data_ptr() and torch.equal(y, w)
    y.backward(torch.full_like(y, 0.3))
    assert torch.equal(w.grad, torch.full_like(w, 0.2998046875))  # gradient still rounded to 16.10
    with torch.no_grad():
        assert cast(w, fmt, None, parameter=True) is w
    off_grid = torch.nn.Parameter(w.detach() + 2 ** -14)  # one element off the grid is enough
    y = cast(off_grid, fmt, None, clip_gradient=False, parameter=True)
    assert y.data_ptr() != off_grid.data_ptr()
    assert_same_bits(y.detach(), quantize_reference(off_grid.detach(), fmt.spec()))
    signed_zero = torch.tensor([-0.0, 1.0])  # formats with a zero point turn -0 into +0: not "already fixed"
    asym = fixed(8, 4, zero_point=3)
    assert_same_bits(cast(signed_zero, asym, None, parameter=True), quantize_reference(signed_zero, asym.spec()))


def _cpp_only():
    if kernels.backend() != "cpp":
        pytest.skip("the output-buffer cache belongs to the C++ kernels")


def test_output_buffers_are_reused_by_size_and_stay_ordinary_tensors():
    _cpp_only()
    spec = fixed(16, 8).spec()
    x = torch.randn(64, 1024) * 50  # 256 KiB: large enough to be cached
    kernels.empty_cache()
    y = quantize(x, spec)
    ptr, before = y.data_ptr(), kernels.cache_info()
    del y
    assert kernels.cache_info()["cached_bytes"] >= x.numel() * 4
    x2 = -x
    z = quantize(x2, spec)
    after = kernels.cache_info()
    assert z.data_ptr() == ptr and after["reused"] == before["reused"] + 1
    assert after["allocated"] == before["allocated"]
    assert_same_bits(z, quantize_reference(x2, spec))  # the block's old contents are overwritten
    z.resize_(128, 1024)  # an ordinary resizable tensor
    z[64:] = 1.0
    assert torch.equal(z[:64], quantize_reference(x2, spec)) and bool((z[64:] == 1).all())
    small = kernels.cache_info()["allocated"]
    quantize(torch.randn(100), spec)
    assert kernels.cache_info()["allocated"] == small  # small outputs are not the cache's


def test_cache_limit_and_empty_cache():
    _cpp_only()
    spec, x = fixed(16, 8).spec(), torch.randn(200, 1000)
    limit = kernels.cache_info()["limit_bytes"]
    try:
        kernels.set_cache_limit(0)
        del_me = quantize(x, spec)
        del del_me
        assert kernels.cache_info()["cached_bytes"] == 0
        kernels.set_cache_limit(1 << 30)
        del_me = quantize(x, spec)
        del del_me
        assert kernels.cache_info()["cached_bytes"] >= x.numel() * 4
        kernels.empty_cache()
        assert kernels.cache_info()["cached_bytes"] == 0 and kernels.cache_info()["limit_bytes"] == 1 << 30
        with pytest.raises(ValueError, match="nbytes"):
            kernels.set_cache_limit(-1)
    finally:
        kernels.set_cache_limit(limit)


def test_training_is_identical_with_and_without_the_buffer_cache():
    _cpp_only()
    from fxcompile.experiments.models import SeedCNN
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    limit, params = kernels.cache_info()["limit_bytes"], []
    try:
        for cache in (0, 1 << 30):
            kernels.set_cache_limit(cache)
            torch.manual_seed(0)
            qmodel = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=torch.nn.CrossEntropyLoss())
            opt = fxc.fixed_point_optimizer(torch.optim.Adam(qmodel.parameters(), lr=1e-3), qmodel)
            for _ in range(3):
                opt.zero_grad()
                qmodel.loss(qmodel(x), y).backward()
                opt.step()
            params.append([p.detach().clone() for p in qmodel.parameters()])
        assert kernels.cache_info()["reused"] > 0
    finally:
        kernels.set_cache_limit(limit)
    for a, b in zip(*params):
        assert_same_bits(a, b)


def test_the_cache_is_safe_across_threads():
    _cpp_only()
    import concurrent.futures
    spec = fixed(12, 6, rounding="stochastic").spec()
    inputs = [torch.randn(n, 1024) * 30 for n in (16, 32, 48)]

    def work(i):
        for j in range(40):
            x = inputs[(i + j) % 3]
            y, mask = torch.ops.fxcompile.quantize_mask(x, spec, i * 1000 + j)
            if not torch.equal(y, quantize_reference(x, spec, seed=i * 1000 + j)):
                return False
        return True
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


@pytest.mark.parametrize("value, expected", [("0.5", "limit 524288"), ("lots", "FXCOMPILE_BUFFER_CACHE_MB"),
                                             ("-1", "FXCOMPILE_BUFFER_CACHE_MB must be >= 0")])
def test_the_cache_limit_comes_from_the_environment(value, expected):
    _cpp_only()
    script = "from fxcompile.runtime import kernels; kernels.load(); print('limit', kernels.cache_info()['limit_bytes'])"
    env = dict(os.environ, FXCOMPILE_BUFFER_CACHE_MB=value, FXCOMPILE_KERNELS="")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert expected in out.stdout + out.stderr, out.stderr[-2000:]


def test_in_place_quantize_bumps_the_version_counter():
    x = torch.randn(100, requires_grad=True)
    y = x * 1.0
    z = y * y  # saves y for backward
    with torch.no_grad():
        torch.ops.fxcompile.quantize_(y, fixed(8, 4).spec())
    assert y._version == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_a_stored_parameter_is_checked_again_after_any_change():
    fmt, bwd = fixed(16, 8), fixed(16, 10)
    w = torch.nn.Parameter(torch.randn(64, 300))
    with torch.no_grad():
        torch.ops.fxcompile.quantize_(w, fmt.replace(rounding="stochastic").spec())  # the optimizer's store
    assert cast(w, fmt, bwd, clip_gradient=False, parameter=True).data_ptr() == w.data_ptr()
    with torch.no_grad():
        w.add_(2 ** -12)  # off the grid, through an in-place op: the version counter moves
    y = cast(w, fmt, bwd, clip_gradient=False, parameter=True)
    assert y.data_ptr() != w.data_ptr()
    assert_same_bits(y.detach(), quantize_reference(w.detach(), fmt.spec()))
    with torch.no_grad():
        torch.ops.fxcompile.quantize_(w, fmt.spec())
    w.data = w.data + 2 ** -12  # new storage
    assert cast(w, fmt, bwd, clip_gradient=False, parameter=True).data_ptr() != w.data_ptr()
    with torch.no_grad():
        torch.ops.fxcompile.quantize_(w, fmt.spec())
    finer = fixed(16, 6)  # another grid: checked, and w (on 2**-8 steps) is not on it
    assert cast(w, finer, bwd, clip_gradient=False, parameter=True).data_ptr() != w.data_ptr()


def test_a_stored_parameter_skips_the_check_until_it_changes():
    """What the record buys: the check does not read the parameter again.  Shown with the one
    kind of write it cannot see (``.data`` has its own version counter), which the docs warn of."""
    _cpp_only()
    fmt = fixed(16, 8)
    w = torch.nn.Parameter(torch.randn(1000))
    with torch.no_grad():
        torch.ops.fxcompile.quantize_(w, fmt.spec())
    w.data.add_(2 ** -12)  # bypasses w's version counter
    assert cast(w, fmt, None, clip_gradient=False, parameter=True).data_ptr() == w.data_ptr()
    with torch.no_grad():
        w.mul_(1.0)  # any in-place op: checked again
    assert cast(w, fmt, None, clip_gradient=False, parameter=True).data_ptr() != w.data_ptr()


def test_cpp_enums_follow_the_spec_layout():
    """The C++ kernel numbers rounding and overflow modes as the spec layout does."""
    import re
    from fxcompile.core.quantizer import OVERFLOWS, ROUNDINGS
    source = open(kernels.KERNEL_SOURCE).read()
    for enum, names in (("Rounding", ROUNDINGS), ("Overflow", OVERFLOWS)):
        body = re.search(rf"enum {enum} \{{([^}}]*)\}}", source).group(1)
        values = {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}
        assert {name.upper(): i for i, name in enumerate(names)}.items() <= values.items(), enum


def test_a_first_build_says_one_plain_line_and_hides_torchs_cuda_notice(monkeypatch, tmp_path, capfd):
    import logging
    import torch.utils.cpp_extension as cpp_extension
    calls = []

    def fake_load(**kwargs):  # what torch does on a machine with a CUDA toolkit and no GPU
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
        calls.append(kwargs["name"])

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert not kernels.is_cached()
    kernels._build()
    err = capfd.readouterr().err
    assert calls == ["fxcompile_cast_cpu"]
    assert "CUDA" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "building the C++ cast kernel" in lines[0] and "about a minute" in lines[0]
    assert str(tmp_path / "fxcompile_cast_cpu") in lines[0] and " done in " in lines[0]
    # once built, nothing is said
    (tmp_path / "fxcompile_cast_cpu").mkdir()
    (tmp_path / "fxcompile_cast_cpu" / "fxcompile_cast_cpu.so").write_bytes(b"")
    assert kernels.is_cached()
    kernels._build()
    assert capfd.readouterr().err == ""


def test_compiler_message_keeps_the_errors_not_the_command_lines():
    output = ("Error building extension 'fxcompile_cast_cpu': [1/2] c++ -c cast_cpu.cpp -o cast_cpu.o\n"
              "FAILED: [code=1] cast_cpu.o\nc++ -O3 -c cast_cpu.cpp -o cast_cpu.o\n"
              "cast_cpu.cpp:3:10: fatal error: torch/extension.h: No such file or directory\n"
              "compilation terminated.\nninja: build stopped: subcommand failed.")
    assert kernels.compiler_message(output) == "cast_cpu.cpp:3:10: fatal error: torch/extension.h: No such file or directory"
    assert kernels.compiler_message("something odd\nlast words") == "last words"
