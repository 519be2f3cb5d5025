"""Pure-PyTorch implementations of the cast operators (no compiler needed; CUDA without Triton).

They are the reference (:func:`fxcompile.core.quantizer.quantize_reference`) with the counter-based
stochastic rounding and the packed saturation mask, so they return exactly what the C++
kernel returns, only slower.
"""

from __future__ import annotations

import torch

from ...core.quantizer import STOCHASTIC, draw_seed, inside, quantize_reference

__all__ = ["pack_mask", "unpack_mask", "quantize", "quantize_mask", "cast_backward", "cast", "register"]


def pack_mask(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> ``ceil(numel / 64)`` int64 words, bit ``i % 64`` of word ``i // 64``."""
    flat = flags.reshape(-1)
    pad = (-flat.numel()) % 64
    bits = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 64)
    # distinct powers of two never carry, so the (wrapping) int64 sum is a bitwise or
    return (bits << torch.arange(64, device=flags.device)).sum(1)


def unpack_mask(words: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (words.unsqueeze(1) >> torch.arange(64, device=words.device)) & 1
    return bits.view(-1)[:numel].bool()


def _check(spec, what: str) -> None:
    """The C++ kernel's spec check, with its message."""
    if len(spec) != 6:
        raise RuntimeError(f"fxcompile: {what} spec must be [frac, code_min, code_max, zero_point, rounding, "
                           f"overflow] (6 ints), got {len(spec)} ints")
    if not (0 <= spec[4] <= 3 and 0 <= spec[5] <= 1):
        raise RuntimeError(f"fxcompile: {what} spec has an unknown rounding or overflow index: {list(spec)}")


def _seed(spec, seed):
    if spec[4] != STOCHASTIC:
        return None
    return draw_seed() if seed is None else seed


def quantize(x, spec, seed=None):
    if not spec:
        return x.clone()
    _check(spec, "quantize")
    s = _seed(spec, seed)
    return quantize_reference(x, spec) if s is None else quantize_reference(x, spec, seed=s)


def quantize_(x, spec, seed=None):
    if spec:
        x.copy_(quantize(x, spec, seed))
    return x


def quantize_mask(x, spec, seed=None):
    y = quantize(x, spec, seed)
    return y, pack_mask(~inside(y, spec))


def cast_backward(grad, mask, spec, seed=None):
    if mask is not None:
        grad = torch.where(unpack_mask(mask, grad.numel()).view(grad.shape), 0.0, grad)
    return quantize(grad, spec, seed) if spec else grad.clone()


class _Cast(torch.autograd.Function):
    @staticmethod
    def forward(x, fwd, bwd, clip):
        if not fwd:
            return x.view_as(x), None
        if clip:
            return torch.ops.fxcompile.quantize_mask(x, fwd)
        return torch.ops.fxcompile.quantize(x, fwd), None

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.bwd = inputs[2]
        ctx.clip = output[1] is not None
        if ctx.clip:
            ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(*(m for m in output[1:] if m is not None))

    @staticmethod
    def backward(ctx, grad, _):
        if not ctx.clip and not ctx.bwd:
            return grad, None, None, None
        mask = ctx.saved_tensors[0] if ctx.clip else None
        return torch.ops.fxcompile.cast_backward(grad, mask, ctx.bwd), None, None, None


def cast(x, fwd, bwd, clip=True, parameter=False):  # always a rounded copy: same values
    if not fwd and not bwd:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.fxcompile.quantize(x, fwd) if fwd else x
    return _Cast.apply(x, list(fwd), list(bwd), bool(clip and fwd and fwd[5] == 0))[0]


def _fake_quantize(x, spec, seed=None):
    return torch.empty_like(x)


def _fake_quantize_inplace(x, spec, seed=None):
    return x


def _fake_quantize_mask(x, spec, seed=None):
    return torch.empty_like(x), x.new_empty(((x.numel() + 63) // 64,), dtype=torch.int64)


def _fake_cast_backward(grad, mask, spec, seed=None):
    return torch.empty_like(grad)


def buffer_cache(limit=-1):
    """No cache here: the pure-PyTorch cast allocates through PyTorch."""
    return [0, 0, 0, 0]


def register(lib: torch.library.Library, cpu: bool, cuda: bool = True) -> None:
    """Register fake (meta) and (with ``cuda``) CUDA implementations; with ``cpu`` CPU and the autograd cast."""
    if not cpu:
        torch.library.register_fake("fxcompile::quantize", _fake_quantize, lib=lib)
        torch.library.register_fake("fxcompile::quantize_", _fake_quantize_inplace, lib=lib)
        torch.library.register_fake("fxcompile::quantize_mask", _fake_quantize_mask, lib=lib)
        torch.library.register_fake("fxcompile::cast_backward", _fake_cast_backward, lib=lib)
    for key in (("CPU",) if cpu else ("CUDA",) if cuda else ()):
        lib.impl("quantize", quantize, key)
        lib.impl("quantize_", quantize_, key)
        lib.impl("quantize_mask", quantize_mask, key)
        lib.impl("cast_backward", cast_backward, key)
    if cpu:
        lib.impl("cast", cast, "CompositeImplicitAutograd")
        lib.impl("buffer_cache", buffer_cache, "CompositeExplicitAutograd")
