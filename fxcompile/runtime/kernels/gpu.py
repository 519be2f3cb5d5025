"""The cast operators on CUDA tensors: Triton kernels, bit for bit the C++ CPU kernel.

The functions here take the operators' arguments and launch the kernel of
:mod:`~fxcompile.runtime.kernels.cast_triton` on the tensor's device: compiled for a CUDA
tensor, and run by Triton's interpreter for a CPU tensor, which is how the CUDA path is
tested on a machine without a GPU.  :func:`register` makes them the CUDA implementation of
``torch.ops.fxcompile.*``; :func:`fxcompile.runtime.kernels.on_cpu` makes them the CPU implementation for the length
of a ``with`` block, so a whole training run can take the CUDA code path on CPU::

    >>> from fxcompile.runtime.kernels import gpu
    >>> gpu.quantize(torch.tensor([0.3]), fixed(8, 4).spec())     # the interpreter, on CPU
    tensor([0.3125])
    >>> with kernels.on_cpu():
    ...     train(qmodel)                 # every cast runs the Triton kernel

Stochastic rounding hashes ``(seed, element index)`` exactly as the CPU kernel does, and
draws its seed from the same (CPU) default generator, so a run seeded alike stores the
same parameters on CPU and GPU.  No random tensor is materialised.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading

import torch

from ...core.quantizer import draw_seed

__all__ = ["available", "quantize", "quantize_", "quantize_mask", "cast_backward", "register", "OPS"]

_NEAREST, _STOCHASTIC = 0, 1
_SATURATE, _WRAP, _WRAP_POW2 = 0, 1, 2
_OUT_NARROW, _OUT_DOUBLE, _OUT_BF16 = 0, 1, 2
_WORDS = 16  # mask words (of 64 elements) per program on the GPU: 1024 elements
_WORDS_INTERPRETED = 4096  # the interpreter pays per operation, not per element: few, large programs
_lock = threading.Lock()
_launchers: dict[bool, object] = {}
_params: dict[tuple, torch.Tensor] = {}


def available() -> bool:
    """Whether Triton is installed (it ships with PyTorch's Linux wheels); not imported yet."""
    return importlib.util.find_spec("triton") is not None


def _interpret_everything() -> bool:
    # TRITON_INTERPRET=1 asks Triton to interpret every kernel, CUDA tensors included
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _kernel(gpu: bool):
    """The kernel, compiled (``gpu``: a ``triton.jit`` function) or run by Triton's interpreter."""
    k = _launchers.get(gpu)
    if k is None:
        with _lock:
            k = _launchers.get(gpu)
            if k is None:
                try:
                    import triton

                    from . import cast_triton
                except Exception as exc:  # noqa: BLE001 - a broken install: say what to do
                    raise RuntimeError(f"fxcompile: the Triton cast kernels need Triton 3, which failed to import "
                                       f"({type(exc).__name__}: {exc}); install it (pip install 'triton>=3') or "
                                       "set FXCOMPILE_KERNELS=python for the pure-PyTorch cast") from exc
                if gpu:
                    k = triton.jit(cast_triton.cast_kernel, do_not_specialize=["n", "s0", "s1"])
                else:
                    from triton.runtime.interpreter import InterpretedFunction
                    k = InterpretedFunction(cast_triton.cast_kernel)
                _launchers[gpu] = k
    return k


def _check_spec(spec, what: str):
    if len(spec) != 6:
        raise RuntimeError(f"fxcompile: {what} spec must be [frac, code_min, code_max, zero_point, rounding, "
                           f"overflow] (6 ints), got {len(spec)} ints")
    if not (0 <= spec[4] <= 3 and 0 <= spec[5] <= 1):
        raise RuntimeError(f"fxcompile: {what} spec has an unknown rounding or overflow index: {list(spec)}")


def _wide(dtype: torch.dtype, spec) -> bool:
    # as cast_cpu.cpp's Spec::needs_double: float32 holds integers exactly up to 2**24, and
    # wrapping adds offsets up to twice the code range to a code
    return dtype == torch.float64 or spec[2] - spec[1] >= 1 << (22 if spec[5] == _WRAP else 24)


def _params_for(spec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The format's constants in the work dtype, cached per device (no copy to the GPU per call)."""
    key = (tuple(spec), dtype, device)
    p = _params.get(key)
    if p is None:
        frac, qmin, qmax, zp = spec[:4]
        wide = _wide(dtype, spec)
        work = torch.float64 if wide else torch.float32
        # the saturation bounds as the reference compares them: in the value's own dtype
        # (16-bit types through float32, like c10's conversions from double)
        bounds = torch.tensor([(qmin - zp) * 2.0 ** -frac, (qmax - zp) * 2.0 ** -frac], dtype=torch.float64)
        if dtype != torch.float64:
            bounds = bounds.to(torch.float32).to(dtype)
        bounds = bounds.to(work)
        rng = float(qmax - qmin + 1)
        consts = torch.tensor([math.ldexp(1.0, frac), math.ldexp(1.0, -frac), zp, qmin, qmax, rng, 1.0 / rng],
                              dtype=torch.float64).to(work)
        magic = torch.tensor([2.0 ** (52 if wide else 23)], dtype=work)
        p = torch.cat([consts, bounds, magic]).to(device)
        if len(_params) > 4096:
            _params.clear()
        _params[key] = p
    return p


def _launch(x: torch.Tensor, y: torch.Tensor, spec, seed: int, mask_in: torch.Tensor | None = None,
            mask_out: torch.Tensor | None = None) -> None:
    """y = round(mask_in ? 0 : x) for contiguous x and y (x may be y); mask_out gets y's saturation bits."""
    n = x.numel()
    if n == 0:
        return
    dtype = x.dtype
    if dtype == torch.bfloat16:
        x, y = x.view(torch.int16), y.view(torch.int16)
    gpu = x.device.type != "cpu" and not _interpret_everything()
    seed &= (1 << 64) - 1
    words = _cdiv(n, 64)
    block = _WORDS if gpu else min(_WORDS_INTERPRETED, 1 << (words - 1).bit_length())  # a power of 2
    grid = (_cdiv(words, block),)
    args = (x, y, _params_for(spec or _COPY, dtype, x.device),
            x if mask_in is None else mask_in, x if mask_out is None else mask_out, n,
            seed & 0xFFFFFFFF, seed >> 32)
    meta = _variant(dtype, spec, mask_in is not None, mask_out is not None, gpu, block)
    kernel = _kernel(gpu)
    if gpu:
        with torch.cuda.device(x.device):  # Triton launches on the current device and stream
            kernel[grid](*args, **meta, num_warps=4, enable_fp_fusion=False)
    else:
        import numpy as np
        with np.errstate(all="ignore"):  # 0 * Inf and Inf - Inf are meant: NaN stays visible
            kernel[grid](*args, **meta)


_COPY = [0, 0, 0, 0, _NEAREST, _SATURATE]  # no rounding: the backward's masking alone


def _variant(dtype: torch.dtype, spec, mask_in: bool, mask_out: bool, gpu: bool, words: int) -> dict:
    """The kernel's compile-time parameters for one call."""
    quantize = bool(spec)
    spec = list(spec) if quantize else _COPY
    rng = spec[2] - spec[1] + 1
    overflow = _WRAP_POW2 if spec[5] == _WRAP and rng & (rng - 1) == 0 else spec[5]
    out = {torch.float64: _OUT_DOUBLE, torch.bfloat16: _OUT_BF16}.get(dtype, _OUT_NARROW)
    return dict(ROUNDING=spec[4], OVERFLOW=overflow, ZP=spec[3] != 0, QUANTIZE=quantize, MASK_IN=mask_in,
                MASK_OUT=mask_out, OUT=out, WIDE=_wide(dtype, spec), GPU=gpu, WORDS=words)


def ptx(dtype: torch.dtype, spec, mask_in: bool = False, mask_out: bool = True, arch: int = 80) -> str:
    """The PTX of the kernel a CUDA call with ``dtype`` and ``spec`` runs, compiled for
    ``sm_<arch>`` without a GPU (Triton's bundled ptxas checks it too)::

        >>> "fma" in gpu.ptx(torch.float32, fixed(16, 8).spec())   # no fused multiply-adds
        False
    """
    if _interpret_everything():
        raise RuntimeError("gpu.ptx: TRITON_INTERPRET=1 makes Triton interpret its own library functions, "
                           "which then cannot be compiled; unset it")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    meta = _variant(dtype, spec, mask_in, mask_out, True, _WORDS)
    work = "fp64" if meta["WIDE"] else "fp32"
    data = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*i16", torch.float64: "*fp64"}[dtype]
    signature = {"x_ptr": data, "y_ptr": data, "p_ptr": "*" + work, "mask_in_ptr": "*i64", "mask_out_ptr": "*i64",
                 "n": "i32", "s0": "i64", "s1": "i64"}
    source = ASTSource(_kernel(True), signature, meta)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _seed(spec, seed):
    if len(spec) == 6 and spec[4] == _STOCHASTIC:
        return draw_seed() if seed is None else int(seed)
    return 0


def _floating(x: torch.Tensor, op: str, what: str = "tensor") -> None:
    if not x.is_floating_point():
        raise RuntimeError(f"fxcompile.{op}: expected a floating-point {what}, got {x.dtype}")


def quantize(x: torch.Tensor, spec, seed: int | None = None) -> torch.Tensor:
    """``torch.ops.fxcompile.quantize`` with the Triton kernel."""
    if not spec:
        return x.clone()
    _floating(x, "quantize")
    _check_spec(spec, "forward")
    s = _seed(spec, seed)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x.contiguous(), y, spec, s)
    return y


def quantize_(x: torch.Tensor, spec, seed: int | None = None) -> torch.Tensor:
    """``torch.ops.fxcompile.quantize_``: in place, one pass for a contiguous ``x``."""
    if not spec:
        return x
    _floating(x, "quantize_")
    _check_spec(spec, "forward")
    s = _seed(spec, seed)
    if x.is_contiguous():
        _launch(x, x, spec, s)
        if not x.is_inference():
            # a write PyTorch did not see: bump the version counter as its in-place ops do
            torch.autograd.graph.increment_version(x)
    else:
        y = x.contiguous()
        _launch(y, y, spec, s)
        x.copy_(y)
    return x


def quantize_mask(x: torch.Tensor, spec, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.fxcompile.quantize_mask``: the rounded copy and its packed saturation mask."""
    _floating(x, "quantize_mask")
    _check_spec(spec, "forward")
    s = _seed(spec, seed)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = torch.empty(((x.numel() + 63) // 64,), dtype=torch.int64, device=x.device)
    _launch(x.contiguous(), y, spec, s, mask_out=mask)
    return y, mask


def cast_backward(grad: torch.Tensor, mask: torch.Tensor | None, spec, seed: int | None = None) -> torch.Tensor:
    """``torch.ops.fxcompile.cast_backward``: zero where ``mask`` has a bit, round to ``spec``."""
    _floating(grad, "cast_backward", "gradient")
    if mask is not None and not (mask.dtype == torch.int64 and mask.is_contiguous()
                                 and mask.numel() == (grad.numel() + 63) // 64):
        raise RuntimeError("fxcompile.cast_backward: mask must hold ceil(numel / 64) int64 words")
    if spec:
        _check_spec(spec, "backward")
    elif mask is None:
        return grad.clone(memory_format=torch.contiguous_format)
    s = _seed(spec, seed)
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    _launch(grad.contiguous(), out, spec, s, mask_in=mask)
    return out


OPS = {"quantize": quantize, "quantize_": quantize_, "quantize_mask": quantize_mask, "cast_backward": cast_backward}


def register(lib: torch.library.Library) -> None:
    """Make these the CUDA implementations of the operators."""
    for name, fn in OPS.items():
        lib.impl(name, fn, "CUDA")
