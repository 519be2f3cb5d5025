"""Fused cast kernels, registered as ``torch.ops.fxcompile.*`` operators.

Five operators, defined here once and implemented either by the C++ kernel in
``cast_cpu.cpp`` (vectorised, multi-threaded with ATen's OpenMP pool, built with
``torch.utils.cpp_extension`` on first use and cached) or, when no compiler is available, by
the pure-PyTorch reference (one warning says so)::

    quantize(Tensor x, int[] spec, int? seed=None) -> Tensor
    quantize_(Tensor(a!) x, int[] spec, int? seed=None) -> Tensor(a!)    # in place
    quantize_mask(Tensor x, int[] spec, int? seed=None) -> (Tensor y, Tensor mask)
    cast_backward(Tensor grad, Tensor? mask, int[] spec, int? seed=None) -> Tensor
    cast(Tensor x, int[] forward, int[] backward, bool clip=True, bool parameter=False) -> Tensor
    buffer_cache(int limit=-1) -> int[]          # [cached bytes, limit, reused, allocated]

``cast`` is the autograd-aware one.  ``parameter=True`` marks a stored parameter: when every
element is already exactly in the forward format (as ``fxc.fixed_point_optimizer`` keeps
them), the C++ cast returns the parameter itself (a view) instead of a rounded copy, so
the layers save the parameter for backward as in FP32 rather than a copy of it.  The
in-place ``quantize_`` and a successful check record the parameter with its version counter,
data pointer and grid, and the next check of the unchanged parameter is skipped (any
in-place PyTorch op bumps the counter; writes through ``.data`` do not and are not seen).

``mask`` is the saturation mask of ``y`` packed one bit per element into ``ceil(numel / 64)``
int64 words (bit ``i % 64`` of word ``i // 64`` is set where ``y[i]`` sits at or beyond a bound
of the format, or is NaN), which is all the backward needs.  Stochastic rounding draws
``u`` from a counter-based hash of ``(seed, element index)`` (:func:`fxcompile.runtime.cast.counter_uniform`);
without an explicit ``seed`` the seed is drawn from PyTorch's default generator, so
``torch.manual_seed`` makes training reproducible::

    >>> from fxcompile import kernels
    >>> kernels.load()            # 'cpp', or 'python' without a compiler
    'cpp'
    >>> torch.ops.fxcompile.quantize(torch.tensor([0.3]), fixed(8, 4).spec())
    tensor([0.3125])

The C++ kernels take their output buffers of 64 KiB and more from a small cache that keeps
freed blocks for the next request of the same size (a training step asks for the same
sizes every step; glibc would otherwise hand that memory back to the kernel and fault it
in again, page by page, on the next step).  It holds at most 1 GiB of freed blocks by
default (``FXCOMPILE_BUFFER_CACHE_MB`` sets the limit at load time, :func:`set_cache_limit`
at run time, 0 disables it); :func:`empty_cache` frees them and :func:`cache_info` reports::

    >>> kernels.cache_info()
    {'cached_bytes': 6651904, 'limit_bytes': 1073741824, 'reused': 5320, 'allocated': 14}

Set ``FXCOMPILE_KERNELS=python`` to force the fallback (on CPU and CUDA).

**CUDA.**  On CUDA tensors the same operators run Triton kernels (:mod:`.gpu`, source in
``cast_triton.py``; Triton ships with PyTorch's Linux wheels, else the pure-PyTorch code
runs there too).  They equal the C++ kernel bit for bit for every rounding and overflow mode
and for float32, float16, bfloat16 and float64: the same steps in the same work precision,
no fused multiply-adds, and stochastic rounding from the same counter-based hash of
``(seed, element index)`` with the seed drawn from the same CPU generator, so a run seeded
alike stores the same parameters on CPU and GPU, and no random tensor is materialised.
The autograd ``cast`` is the C++ one (its forward and backward dispatch to the CUDA
operators); the fake implementations make the operators opaque single nodes to
``torch.compile`` and export on any device.  Parameter casts on CUDA always return a
rounded copy (the "already on its grid" shortcut is CPU only).  Under autocast a cast of a
float16/bfloat16 tensor rounds to the format in float32 and stores the nearest
float16/bfloat16: exact for formats whose codes fit the significand (11 bits for float16, 8
for bfloat16), the nearest representable value otherwise, identically on CPU and GPU.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors:
``gpu.quantize(x, spec)`` (and the other functions of :mod:`.gpu`) on a CPU tensor
interprets the kernel, and ``with kernels.on_cpu():`` routes every CPU cast through it (how the
tests train the seed CNN on the CUDA code path and compare it with the C++ kernel).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings

import torch

from ...core.quantizer import draw_seed
from . import fallback, gpu
from .fallback import pack_mask, unpack_mask

__all__ = ["load", "backend", "on_cpu", "build_error", "build_directory", "compiler_message", "is_cached", "draw_seed",
           "pack_mask", "unpack_mask", "cache_info", "empty_cache",
           "set_cache_limit", "KERNEL_SOURCE"]

KERNEL_SOURCE = os.path.join(os.path.dirname(__file__), "cast_cpu.cpp")
_SEEDED = (torch.Tag.nondeterministic_seeded,)
_LIB = torch.library.Library("fxcompile", "FRAGMENT")
_LIB.define("quantize(Tensor x, int[] spec, int? seed=None) -> Tensor", tags=_SEEDED)
_LIB.define("quantize_(Tensor(a!) x, int[] spec, int? seed=None) -> Tensor(a!)", tags=_SEEDED)
_LIB.define("quantize_mask(Tensor x, int[] spec, int? seed=None) -> (Tensor, Tensor)", tags=_SEEDED)
_LIB.define("cast_backward(Tensor grad, Tensor? mask, int[] spec, int? seed=None) -> Tensor", tags=_SEEDED)
_LIB.define("cast(Tensor x, int[] forward, int[] backward, bool clip=True, bool parameter=False) -> Tensor",
            tags=_SEEDED)
_LIB.define("buffer_cache(int limit=-1) -> int[]")

_EXTENSION = "fxcompile_cast_cpu"
_backend: str | None = None
_build_error: str | None = None
_lock = threading.Lock()


def cache_info() -> dict[str, int]:
    """The output-buffer cache: bytes of freed blocks held, its limit, and how many buffers
    were reused from it or newly allocated (all 0 with the pure-PyTorch kernels)."""
    load()
    cached, limit, reused, allocated = torch.ops.fxcompile.buffer_cache(-1)
    return {"cached_bytes": cached, "limit_bytes": limit, "reused": reused, "allocated": allocated}


def set_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed output buffers for reuse (0: none); frees the excess."""
    load()
    _set_cache_limit(nbytes, "set_cache_limit: nbytes")


def _set_cache_limit(nbytes: int, what: str) -> None:
    if nbytes < 0:
        raise ValueError(f"{what} must be >= 0, got {nbytes}")
    torch.ops.fxcompile.buffer_cache(int(nbytes))


def empty_cache() -> None:
    """Free every cached output buffer (the limit stays)."""
    limit = cache_info()["limit_bytes"]
    torch.ops.fxcompile.buffer_cache(0)
    torch.ops.fxcompile.buffer_cache(limit)


def backend() -> str | None:
    """``'cpp'`` or ``'python'`` once :func:`load` ran, else ``None``."""
    return _backend


def load() -> str:
    """Register the operator implementations (building the C++ kernel the first time)."""
    global _backend
    if _backend is None:
        with _lock:
            if _backend is None:
                _backend = _load()
    return _backend


def build_error() -> str | None:
    """The build's full error output (the compiler's messages) when the C++ kernel failed to
    build in this process, else ``None``."""
    return _build_error


def build_directory() -> str:
    """The folder where ``torch.utils.cpp_extension`` caches the built kernel
    (``$TORCH_EXTENSIONS_DIR/fxcompile_cast_cpu``, or torch's per-user default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return os.path.join(root, _EXTENSION)
    with _quiet_cpp_extension():
        from torch.utils import cpp_extension
    try:
        return cpp_extension._get_build_directory(_EXTENSION, verbose=False)
    except Exception:  # noqa: BLE001 - a private helper: fall back to the documented root
        return os.path.join(cpp_extension.get_default_build_root(), _EXTENSION)


def compiler_message(error: str, lines: int = 10) -> str:
    """The lines of a build's error output that say what went wrong (the compiler's errors, a
    missing program), without the echoed command lines."""
    import re
    found = [ln.strip() for ln in error.splitlines()
             if re.search(r"error|not found|no such file|fatal|cannot", ln, re.IGNORECASE)
             and not ln.startswith(("FAILED", "Error building extension", "ninja: build stopped"))]
    found = found or [ln.strip() for ln in error.splitlines() if ln.strip()][-1:]
    return "\n".join(found[:lines])


def is_cached() -> bool:
    """Whether a built kernel newer than its source is in :func:`build_directory`."""
    built = os.path.join(build_directory(), _EXTENSION + ".so")
    return os.path.exists(built) and os.path.getmtime(built) >= os.path.getmtime(KERNEL_SOURCE)


class _quiet_cpp_extension:
    """Importing ``torch.utils.cpp_extension`` on a machine with a CUDA toolkit but no GPU logs
    "No CUDA runtime is found"; the CPU kernel needs neither, so that line would only mislead."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.utils.cpp_extension")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _build() -> None:
    with _quiet_cpp_extension():
        from torch.utils.cpp_extension import load as load_extension
    # -ffp-contract=off: no fused multiply-adds, so each step rounds like the reference's;
    # -fno-trapping-math (FP exception flags only, never values) lets selects vectorise
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    fresh = not is_cached()
    if fresh:  # the only output of a first build: what, how long, where
        print(f"fxcompile: building the C++ cast kernel (once, about a minute), cached in {build_directory()} ...",
              end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with _quiet_cpp_extension():  # and its compiler-compatibility notes: a real failure raises
            load_extension(name=_EXTENSION, sources=[KERNEL_SOURCE], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except BaseException:
        if fresh:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if fresh:
        print(f" done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _load() -> str:
    forced = os.environ.get("FXCOMPILE_KERNELS", "").lower() == "python"
    triton = not forced and gpu.available()
    fallback.register(_LIB, cpu=False, cuda=not triton)  # fake tensors, CUDA without Triton
    if triton:
        gpu.register(_LIB)
    if forced:
        fallback.register(_LIB, cpu=True)
        return "python"
    global _build_error
    try:
        _build()
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, no headers: all mean fallback
        _build_error = str(exc).strip() or type(exc).__name__
        reason = compiler_message(_build_error, lines=1)
        warnings.warn(f"fxcompile: the fused C++ cast kernel could not be built ({reason}); using the "
                      "pure-PyTorch cast, which is slower. Install a C++ compiler (g++) and ninja "
                      "(pip install ninja) to get the fast kernel; `fxcompile doctor --build` shows the compiler's message.", RuntimeWarning, stacklevel=3)
        fallback.register(_LIB, cpu=True)
        return "python"
    limit = os.environ.get("FXCOMPILE_BUFFER_CACHE_MB")
    if limit is not None:
        try:
            mib = float(limit)
        except ValueError:
            raise ValueError(f"FXCOMPILE_BUFFER_CACHE_MB must be a number of MiB, got {limit!r}") from None
        _set_cache_limit(int(mib * (1 << 20)), "FXCOMPILE_BUFFER_CACHE_MB")
    return "cpp"


@contextlib.contextmanager
def on_cpu():
    """Within the block, CPU tensors take the CUDA code path: the operators run the Triton
    kernel under Triton's interpreter, and ``cast`` is the Python autograd function that
    calls them (the C++ one may call the CPU kernel directly).  Slow: for tests."""
    load()
    lib = torch.library.Library("fxcompile", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            for name, fn in gpu.OPS.items():
                lib.impl(name, fn, "CPU")
            lib.impl("cast", fallback.cast, "CompositeImplicitAutograd")
        yield
    finally:
        lib._destroy()
