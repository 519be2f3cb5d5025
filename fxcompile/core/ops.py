"""The op registry: every op fxcompile knows, declared once.

An :class:`Op` says how ``torch.fx`` nodes map to it (module classes, functions, tensor
methods, ATen overload packets of ``torch.export`` graphs) and its :data:`group`, which is
what the passes reason with (``elide_casts`` skips casts after format-preserving ops, the cost
model aligns the binary points of an adder's operands, the hardware summary counts
multiply-accumulates).  Each backend keeps its own table keyed by op name — the lowering
rules (:data:`fxcompile.deploy.lower.RULES`), the QDQ/QONNX float ops
(:data:`fxcompile.deploy.backends.qdq.FLOAT_OPS`) — with every op it does not handle listed,
with the reason, in its ``UNSUPPORTED`` table; ``tests/core/test_ops.py`` checks each table
covers the registry.  The integer graph's own ops (:data:`INTEGER_OPS`) are covered the same
way by the integer executor, the ONNX emitters and the hls4ml handoff.  Adding an op means
one entry here, its function in each backend, and their tests::

    >>> op_of(gm, node).name, op_of(gm, node).group
    ('conv2d', 'multiply_accumulate')

The module also holds the functions the IR's nodes call that are fxcompile's own:
:func:`batch_norm` and :func:`call_with_parameters` (written by ``expose_params``),
:func:`fixed_point_average`, :func:`fixed_point_avg_pool2d`, :func:`fixed_point_mean` and
:func:`fixed_point_divide`
(written by ``passes.averages``), whose reciprocals are :func:`reciprocal` and
:func:`divisor_reciprocal`, and :func:`fixed_point_matmul`, :func:`fixed_point_softmax`,
:func:`fixed_point_layer_norm` (written by
``passes.definitions``; their integer algorithms are :mod:`fxcompile.core.intmath`),
:func:`fixed_point_mul` (``passes.products``) and
:func:`fixed_point_batch_norm` (``passes.batch_norms``), whose affine map is
:func:`batch_norm_affine`.  :func:`fixed_point_conv2d` (and ``1d``, ``3d``) and
:func:`fixed_point_linear` (``passes.accumulators``) are the conv/linear ops themselves
(registered as ``conv2d``, ``linear``...), computed exactly at inference.  Module classes of optional packages (timm's ``DropPath``) are
named by their qualified class name (``module_names``), so the registry imports none of them.
:func:`lookup` is written by ``passes.lookup_tables``; it is defined with the clips' bounds
in :mod:`fxcompile.core.nonlinear`.  :func:`fill_masked`, :func:`key_padding_mask` and
:func:`all_kept` are written by ``passes.masks`` (attention masks as a select), and
:func:`fixed_point_addmm` by ``passes.accumulators`` (transformers' ``Conv1D``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import intmath, ir
from .nonlinear import lookup
from .quantizer import ROUNDINGS, quantize_reference

__all__ = ["Op", "OPS", "GROUPS", "INTEGER_OPS", "op_of", "module_op", "ops_in", "batch_norm", "call_with_parameters",
           "fixed_point_average", "reciprocal", "average_windows", "RECIPROCAL_BITS",
           "fixed_point_avg_pool2d", "adaptive_windows", "avg_pool_divisors", "average_factors",
           "divisor_reciprocal", "fixed_point_divide", "fixed_point_mean",
           "fixed_point_mul", "scalar_codes", "fixed_point_batch_norm", "batch_norm_affine", "SCALE_BITS",
           "fixed_point_matmul", "fixed_point_softmax", "fixed_point_layer_norm", "matmul_equation", "matmul_product",
           "code_bits", "fixed_point_conv1d", "fixed_point_conv2d", "fixed_point_conv3d", "fixed_point_linear",
           "lookup", "CLIP_OPS", "LOOKUP_OPS", "fixed_point_addmm", "key_padding_mask", "fill_masked", "all_kept"]

GROUPS = {
    "cast": "the fixed-point cast on an edge",
    "format_preserving": "maps values of any fixed-point format to values of that format, bounds to bounds",
    "shape": "moves values without changing them (and so preserves formats)",
    "adder": "operands meet in one adder or one tensor and must share a binary point",
    "multiply_accumulate": "sums of products: the wide-accumulator ops",
    "elementwise": "an elementwise function of one value",
    "reduction": "sums (and averages) over some dimensions",
    "normalization": "a per-channel affine map from statistics",
    "size": "Python values computed from shapes (sizes, their arithmetic, asserts): evaluated when lowering",
    "resample": "moves values to new places and may add values (padding): formats need not be preserved",
}


def batch_norm(x, module: nn.modules.batchnorm._BatchNorm, weight, bias):
    """``module(x)`` with the given affine parameters; follows ``module.training`` at run time."""
    training = module.training or module.running_mean is None
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    return F.batch_norm(x, module.running_mean if not module.training or module.track_running_stats else None,
                        module.running_var if not module.training or module.track_running_stats else None,
                        weight, bias, training, momentum, module.eps)


def call_with_parameters(module: nn.Module, names: tuple, params: tuple, *args, **kwargs):
    """Call ``module`` with its parameters ``names`` replaced by ``params`` (the casted values)."""
    return torch.func.functional_call(module, dict(zip(names, params)), args, kwargs, strict=False)


RECIPROCAL_BITS = 16  # significant bits of 1/n for a divisor n that is not a power of two


def reciprocal(n: int) -> tuple[int, int]:
    """``1/n`` in fixed point: ``(c, r)`` with ``c · 2**-r`` the reciprocal.

    A power of two is exact (``c = 1``); otherwise ``c = round(2**r / n)`` has
    :data:`RECIPROCAL_BITS` significant bits (``r = 15 + n.bit_length()``, so
    ``2**15 < c < 2**16``; no ties occur, since ``2**(r+1) / n`` is never an odd integer)::

        >>> reciprocal(49)
        (42799, 21)
    """
    if n < 1:
        raise ValueError(f"an average needs a positive divisor, got {n}")
    if n & (n - 1) == 0:
        return 1, n.bit_length() - 1
    r = RECIPROCAL_BITS - 1 + n.bit_length()
    return ((1 << (r + 1)) + n) // (2 * n), r


def average_windows(shape, output_size) -> tuple[tuple[int, int], int] | None:
    """The uniform window (kernel = stride) of an adaptive average over the last two dims of
    ``shape`` to ``output_size``, and its divisor; ``None`` when the windows are uneven."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = shape[-2:]
    oh, ow = h if oh is None else oh, w if ow is None else ow
    if h % oh or w % ow:
        return None
    return (h // oh, w // ow), (h // oh) * (w // ow)


class _FixedPointAverage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, n, spec):
        c, r = reciprocal(n)
        # exact in float64: window sums of codes times c stay below 2**53 for inputs of up to
        # 24 bits and windows of up to 2**13 elements
        total = F.avg_pool2d(x.double(), kernel, kernel, divisor_override=1)
        y = quantize_reference(total * c * 2.0 ** -r, spec)  # the one rounding: the output format's
        ctx.kernel, ctx.n = kernel, n
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # the float derivative of the average; the output cast after this op has already
        # zeroed the gradient where it saturated, and the input cast rounds what this returns
        # (the windows tile the input: uniform windows are exactly what this op runs)
        up = grad.repeat_interleave(ctx.kernel[0], -2).repeat_interleave(ctx.kernel[1], -1) / ctx.n
        return up, None, None, None


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """The windows ``[start, end)`` of an adaptive pool from ``size`` to ``out`` along one dim,
    by PyTorch's rule ``start = ⌊i · size / out⌋``, ``end = ⌈(i + 1) · size / out⌉`` (uneven
    or overlapping where ``out`` does not divide ``size``; an ``out`` above ``size`` repeats
    values)::

        >>> adaptive_windows(5, 3), adaptive_windows(1, 3)
        ([(0, 2), (1, 4), (3, 5)], [(0, 1), (0, 1), (0, 1)])
    """
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def avg_pool_divisors(size: tuple, out: tuple, kernel, stride, padding, count_include_pad: bool,
                      divisor_override) -> list[list[int]]:
    """The divisor of each output position of ``F.avg_pool2d`` from an input of spatial ``size``
    to ``out`` (both (H, W)), by PyTorch's rule: the window clipped to the padded input
    (``count_include_pad``) or to the input, or ``divisor_override``::

        >>> avg_pool_divisors((3, 3), (3, 3), (3, 3), (1, 1), (1, 1), False, None)
        [[4, 6, 4], [6, 9, 6], [4, 6, 4]]
    """
    if divisor_override:
        return [[int(divisor_override)] * out[1] for _ in range(out[0])]
    dims = []
    for n, o, k, s, p in zip(size, out, kernel, stride, padding):
        counts = []
        for i in range(o):
            start, end = i * s - p, min(i * s - p + k, n + p)
            counts.append(end - start if count_include_pad else max(min(end, n) - max(start, 0), 1))
        dims.append(counts)
    return [[a * b for b in dims[1]] for a in dims[0]]


def average_factors(divisors: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Per output position, the :func:`reciprocal` ``c · 2**-r`` of its divisor at one binary
    point ``r`` (the largest): ``(factors, r)`` with ``factors`` int64 ``c · 2**(r − r_p)``, the
    same values, exactly."""
    recips = [[reciprocal(n) for n in row] for row in divisors]
    r = max(rp for row in recips for _, rp in row)
    return torch.tensor([[c << (r - rp) for c, rp in row] for row in recips], dtype=torch.int64), r


def _rounded_average(sums: torch.Tensor, divisors: list[list[int]], spec: list) -> torch.Tensor:
    """Window sums (float64, exact) times each position's reciprocal, rounded once with ``spec``."""
    factors, r = average_factors(divisors)
    return quantize_reference(sums * (factors.double() * 2.0 ** -r).to(sums.device), spec)


def _adaptive_sums(x: torch.Tensor, output_size) -> tuple[torch.Tensor, list[list[int]]]:
    """Window sums of an adaptive pool (float64: exact) and each position's divisor."""
    (h, w), (oh, ow) = x.shape[-2:], _output_size(x.shape, output_size)
    rows, cols = adaptive_windows(h, oh), adaptive_windows(w, ow)
    a = torch.zeros(oh, h, dtype=torch.float64, device=x.device)
    b = torch.zeros(w, ow, dtype=torch.float64, device=x.device)
    for i, (s, e) in enumerate(rows):
        a[i, s:e] = 1
    for j, (s, e) in enumerate(cols):
        b[s:e, j] = 1
    return a @ x.double() @ b, [[(re - rs) * (ce - cs) for cs, ce in cols] for rs, re in rows]


def _output_size(shape, output_size) -> tuple[int, int]:
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    return (shape[-2] if oh is None else oh), (shape[-1] if ow is None else ow)


def fixed_point_avg_pool2d(x: torch.Tensor, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool,
                           divisor_override, spec: list) -> torch.Tensor:
    """``F.avg_pool2d`` as deployed: each window's sum (zero padding adds nothing) times the
    :func:`reciprocal` of that position's divisor (:func:`avg_pool_divisors`: 9 everywhere for a
    3x3 window with ``count_include_pad``, 4 and 6 at the borders without), computed exactly
    and rounded once with the format ``spec`` of the cast after it.  The backward is the float
    pool's derivative."""
    if x.dim() != 4:
        raise ValueError(f"fixed_point_avg_pool2d: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    kernel, stride, padding = _pair(kernel), _pair(stride or kernel), _pair(padding)

    def exact(x):
        sums = F.avg_pool2d(x.double(), kernel, stride, padding, ceil_mode, True, 1)
        divisors = avg_pool_divisors(x.shape[-2:], sums.shape[-2:], kernel, stride, padding, count_include_pad,
                                     divisor_override)
        return _rounded_average(sums, divisors, spec).to(x.dtype)
    return _Definition.apply(exact, lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad,
                                                           divisor_override), x)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def fixed_point_average(x: torch.Tensor, output_size, squeeze: bool, spec: list) -> torch.Tensor:
    """The average over windows of the last two dims of ``x`` as deployed: an adaptive average
    pool to ``output_size`` (a global average is ``(1, 1)``; ``squeeze`` drops those dims, as
    ``mean(dim=(2, 3))`` does; only with ``(1, 1)``), rounded to the format ``spec`` of the
    cast after it.

    The fixed-point definition, shared with the integer graph: each window's sum of input
    values times the :func:`reciprocal` ``c · 2**-r`` of its size, computed exactly, then
    rounded once with ``spec``'s rounding and overflow.  Uneven windows (an output size
    not dividing the input: PyTorch's :func:`adaptive_windows`, overlapping or repeating
    values) do the same with each position's own divisor (:func:`average_factors`).  The
    backward is the float average's derivative.
    """
    if x.dim() != 4:
        raise ValueError(f"fixed_point_average: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    windows = average_windows(x.shape, output_size)
    if windows is None:
        def exact(x):
            sums, divisors = _adaptive_sums(x, output_size)
            return _rounded_average(sums, divisors, spec).to(x.dtype)
        y = _Definition.apply(exact, lambda x: F.adaptive_avg_pool2d(x, output_size), x)
    else:
        y = _FixedPointAverage.apply(x, *windows, list(spec))
    return y[..., 0, 0] if squeeze else y


def divisor_reciprocal(divisor) -> tuple[int, int]:
    """``1/divisor`` for any finite non-zero float ``divisor``: ``(c, r)`` with ``c · 2**-r`` the
    reciprocal.  A power of two is exact (``c = ±1``, ``r`` may be negative); otherwise ``|c|``
    has :data:`RECIPROCAL_BITS` significant bits, ``c = round(2**r / divisor)`` to nearest, ties
    to even, with ``2**(e-1) <= |divisor| < 2**e`` and ``r = 15 + e`` (an integer divisor gets
    :func:`reciprocal`'s ``(c, r)``)::

        >>> divisor_reciprocal(3), divisor_reciprocal(0.5), divisor_reciprocal(-1.5)
        ((43691, 17), (1, -1), (-43691, 16))
    """
    from fractions import Fraction
    if not (isinstance(divisor, (int, float)) and math.isfinite(divisor)) or divisor == 0:
        raise ValueError(f"a division needs a finite non-zero constant divisor, got {divisor!r}")
    f = Fraction(divisor)
    sign, f = (-1 if f < 0 else 1), abs(f)
    num, den = f.numerator, f.denominator
    if num & (num - 1) == 0 and den & (den - 1) == 0:
        return sign, num.bit_length() - den.bit_length()
    e = num.bit_length() - den.bit_length()
    while Fraction(2) ** e <= f:
        e += 1
    while Fraction(2) ** (e - 1) > f:
        e -= 1
    r = RECIPROCAL_BITS - 1 + e
    return sign * round(Fraction(2) ** r / f), r


def fixed_point_divide(x: torch.Tensor, divisor: float, spec: list) -> torch.Tensor:
    """``x / divisor`` (a constant) as deployed: ``x`` times the :func:`divisor_reciprocal`
    ``c · 2**-r`` of the divisor, computed exactly (float64: codes of up to 24 bits times a
    16-bit ``c``), then rounded once to the format ``spec`` of the cast after it.  A power of two
    is exact, as in float; any other divisor differs from the float quotient by the reciprocal's
    rounding (relative error below 2**-16) before the cast rounds.  The backward is the float
    quotient's (``grad / divisor``)::

        >>> fixed_point_divide(torch.tensor([1.0]), 3, fixed(16, 8).spec())   # 256 · 43691 / 2**17 → 85/256
        tensor([0.3320])
    """
    c, r = divisor_reciprocal(divisor)

    def exact(x):
        return quantize_reference(x.double() * c * 2.0 ** -r, spec).to(x.dtype)
    return _Definition.apply(exact, lambda x: x / divisor, x)


def fixed_point_mean(x: torch.Tensor, dims: tuple, keepdim: bool, spec: list) -> torch.Tensor:
    """``x.mean(dims, keepdim)`` over non-batch ``dims`` (mambaout's ``mean((1, 2))`` of an NHWC
    tensor) as deployed: the sum over ``dims`` times the :func:`reciprocal` ``c · 2**-r`` of the
    number of values ``n``, computed exactly (float64: codes of up to 24 bits summed over up to
    2**13 values, times a 16-bit ``c``), rounded once to the format ``spec`` of the cast after
    it.  The backward is the float mean's."""
    dims = tuple(d % x.dim() for d in dims)
    n = math.prod(x.shape[d] for d in dims)
    c, r = reciprocal(n)

    def exact(x):
        return quantize_reference(x.double().sum(dims, keepdim=keepdim) * c * 2.0 ** -r, spec).to(x.dtype)
    return _Definition.apply(exact, lambda x: x.mean(dims, keepdim=keepdim), x)


# ---- products of two activations, softmax, LayerNorm: fixed-point definitions (passes.definitions) ----

class _Definition(torch.autograd.Function):
    """Forward: ``exact(*tensors)``, an op's fixed-point definition; backward: the derivative of
    the float op ``reference`` at the same inputs (the casts around the op round it)."""

    @staticmethod
    def forward(ctx, exact, reference, *tensors):
        ctx.reference = reference
        ctx.save_for_backward(*tensors)
        return exact(*tensors)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.reference(*inputs), wanted, grad) if wanted else ())
        return (None, None, *(next(grads) if t.requires_grad else None for t in inputs))


def code_bits(spec) -> int:
    """Bits of the largest centred code magnitude of the format ``spec``."""
    frac, qmin, qmax, zp = spec[:4]
    return max(abs(qmin - zp), abs(qmax - zp)).bit_length()


def matmul_equation(equation: str) -> tuple | None:
    """How the two-operand einsum ``equation`` is a batched matmul: ``(perm_a, perm_b, perm_out)``,
    the permutations taking ``a`` to (batch…, i, j) and ``b`` to (batch…, j, k), and the product
    (batch…, i, k) to the output (``None`` where one is the identity); ``None`` if it is no
    matmul (one contracted index, one free index an operand, the others batch dims)::

        >>> matmul_equation("bhqd,bhkd->bhqk"), matmul_equation("bqhd,bkhd->bhqk")
        ((None, (0, 1, 3, 2), None), ((0, 2, 1, 3), (0, 2, 3, 1), None))
    """
    terms = equation.replace(" ", "").split("->")
    if len(terms) != 2 or "." in equation or len(terms[0].split(",")) != 2:
        return None
    (a, b), out = terms[0].split(","), terms[1]
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    batch = "".join(c for c in out if c in a and c in b)
    i, k = [c for c in a if c not in b], [c for c in b if c not in a]
    j = [c for c in a if c in b and c not in out]
    if not (len(i) == len(j) == len(k) == 1 and len(a) == len(b) == len(out) == len(batch) + 2 and set(out) <= set(a + b)):
        return None
    perms = (tuple(a.index(c) for c in batch + i[0] + j[0]), tuple(b.index(c) for c in batch + j[0] + k[0]),
             tuple((batch + i[0] + k[0]).index(c) for c in out))
    return tuple(None if p == tuple(range(len(p))) else p for p in perms)


def matmul_product(a, b, perms):
    """``a @ b`` (``perms`` None), else the einsum that :func:`matmul_equation` read as ``perms``."""
    if perms is None:
        return torch.matmul(a, b)
    pa, pb, po = perms
    # contiguous operands: a batched matmul of strided ones falls back to one product a batch
    y = torch.matmul(a.permute(pa).contiguous() if pa else a, b.permute(pb).contiguous() if pb else b)
    return y.permute(po) if po else y


def fixed_point_matmul(a: torch.Tensor, b: torch.Tensor, perms: tuple | None, a_spec: list, b_spec: list,
                       spec: list) -> torch.Tensor:
    """``a @ b`` of two fixed-point activations (with ``perms`` from :func:`matmul_equation`, the
    einsum it stands for) as deployed: the exact sum of products, rounded once to the format
    ``spec`` of the cast after it.

    float32 cannot hold these sums (two 16-bit codes make a 30-bit product, and a length-d
    reduction adds ``log2 d`` bits), so the product is taken in float64, exact while the codes'
    bits (``a_spec``, ``b_spec``) plus those of the reduction length stay within 53 — the
    integer graph's ``matmul`` is the same sum in int64.  The backward is the float product's.
    """
    k = a.shape[perms[0][-1] if perms and perms[0] else -1]
    bits = code_bits(a_spec) + code_bits(b_spec) + k.bit_length()
    if bits > 53:
        raise ValueError(f"fixed_point_matmul: products of {code_bits(a_spec)}- and {code_bits(b_spec)}-bit codes "
                         f"summed over {k} terms need {bits} bits, more than float64 holds exactly (53); "
                         "give the operands narrower formats")

    def exact(a, b):
        return quantize_reference(matmul_product(a.double(), b.double(), perms), spec).to(a.dtype)
    return _Definition.apply(exact, lambda a, b: matmul_product(a, b, perms), a, b)


def fixed_point_softmax(x: torch.Tensor, in_spec: list, spec: list) -> torch.Tensor:
    """Softmax over the last dim as deployed (:func:`fxcompile.core.intmath.softmax_codes`): an
    exact table of ``exp`` over the code differences to the row maximum, their integer sum and
    an integer division rounded with the rounding of the cast after it (format ``spec``);
    ``x``'s codes are read in the input format ``in_spec`` (at most 16 bits).  The backward is
    the float softmax's."""
    frac, qmin, qmax = in_spec[:3]
    if qmax - qmin >= 1 << 16 or not 0 <= spec[0] <= 32:
        raise ValueError(f"fixed_point_softmax: needs an input of at most 16 bits (got {(qmax - qmin).bit_length()}) "
                         f"and an output with 0 to 32 fractional bits (got {spec[0]})")
    table = intmath.exp_table(frac, qmax - qmin)

    def exact(x):
        codes = torch.round(x.double() * 2.0 ** frac).to(torch.int64)
        y = intmath.softmax_codes(codes, table.to(x.device), spec[0], ROUNDINGS[spec[4]])
        return quantize_reference(y.double() * 2.0 ** -spec[0], spec).to(x.dtype)
    return _Definition.apply(exact, lambda x: torch.softmax(x, -1), x)


def fixed_point_layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float, in_spec: list, w_spec: list | None, b_spec: list | None,
                           spec: list) -> torch.Tensor:
    """LayerNorm over the last dim as deployed (:func:`fxcompile.core.intmath.layer_norm_codes`):
    integer mean and variance, :func:`~fxcompile.core.intmath.isqrt`, an integer division to
    ``z`` at 16 fractional bits, the exact affine map with the weight and bias codes (formats
    ``w_spec``, ``b_spec``), rounded once to the format ``spec`` of the cast after it.  The
    backward is the float LayerNorm's."""
    n = x.shape[-1]
    if tuple(normalized_shape) != (n,):
        raise ValueError(f"fixed_point_layer_norm: normalizes the last dim only, got normalized_shape "
                         f"{tuple(normalized_shape)} for an input of shape {tuple(x.shape)}")
    wf, bf = (w_spec[0] if w_spec else 0), (b_spec[0] if b_spec else 0)
    plan = intmath.layer_norm_plan(n, code_bits(in_spec), in_spec[0], eps, wf, bf)
    k = plan["k"]
    if (code_bits(w_spec) if w_spec else 1) + k + (math.isqrt(n) + 1).bit_length() + 1 > 53:
        raise ValueError("fixed_point_layer_norm: the weight's codes times z need more than float64's 53 bits; "
                         "give the weight a narrower format")

    def codes(t, frac):
        return torch.round(t.double() * 2.0 ** frac).to(torch.int64)

    def exact(x, *params):
        params = iter(params)
        w = codes(next(params), wf) if weight is not None else None
        b = codes(next(params), bf) << (k + wf - bf) if bias is not None else None
        acc = intmath.layer_norm_codes(codes(x, in_spec[0]), plan, w, b)
        return quantize_reference(acc.double() * 2.0 ** -(k + wf), spec).to(x.dtype)

    def reference(x, *params):
        params = iter(params)
        w, b = (next(params) if weight is not None else None), (next(params) if bias is not None else None)
        return F.layer_norm(x, (n,), w, b, eps)
    return _Definition.apply(exact, reference, x, *(t for t in (weight, bias) if t is not None))


class _FixedPointMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, spec):
        ctx.save_for_backward(a, b)
        # exact in float64: a product of two codes of up to 24 bits has at most 48
        return quantize_reference(a.double() * b.double(), spec).to(torch.promote_types(a.dtype, b.dtype))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return (grad * b).sum_to_size(a.shape), (grad * a).sum_to_size(b.shape), None


def fixed_point_mul(a: torch.Tensor, b: torch.Tensor, spec: list) -> torch.Tensor:
    """``a * b`` (broadcasting) as deployed: the exact product of the two fixed-point values
    (the integer product of their codes, at the sum of their binary points), rounded once to
    the format ``spec`` of the cast after it.  Float32 would round products of more than 24
    significant bits; this forms them in float64, where products of codes of up to 24 bits
    are exact.  The backward is the float product's derivative::

        >>> fixed_point_mul(torch.tensor([1.5]), torch.tensor([0.75]), fixed(16, 8).spec())
        tensor([1.1250])

    ``b`` may be a Python number (attention's ``q * head_dim ** -0.5``): it is the float32
    value nearest to it (24 significant bits, what a float32 product reads), times ``a``
    exactly (codes of up to 29 bits), rounded once; see :func:`scalar_codes`.
    """
    if not isinstance(b, torch.Tensor):
        m, e = scalar_codes(b)
        b = torch.tensor(m * 2.0 ** -e, dtype=torch.float64, device=a.device)
        return _FixedPointMul.apply(a, b, list(spec)).to(a.dtype)
    return _FixedPointMul.apply(a, b, list(spec))


# ---- convolutions and linear layers: the exact accumulator at inference (passes.accumulators) ----

def conv2d_float64(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` in float64 as one matrix product per group over the whole batch (im2col:
    ``F.unfold``, then ``bmm``), the same sums as ``F.conv2d`` in float64, which on CPU takes a
    product per sample and, for the small feature maps of deep layers, streams the weight from
    memory once per sample.  Exact, as ``F.conv2d`` in float64, when every product and partial
    sum of the operands' values is a float64 without rounding (codes on a grid whose sum's bound
    stays within 53 bits: ``passes.accumulators``), in whatever order the product sums them.
    Inputs other than 4-d tensors with numeric padding go to ``F.conv2d``."""
    x, weight = x.double(), weight.double()
    bias = None if bias is None else bias.double()
    if x.dim() != 4 or isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    (sh, sw), (ph, pw), (dh, dw) = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                                    for v in (stride, padding, dilation))
    n, _, h, w = x.shape
    o, k = weight.shape[0], weight[0].numel()
    kh, kw = weight.shape[2:]
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # (N, C·kh·kw, L)
    cols = cols.view(n, groups, k, ho * wo).permute(1, 2, 0, 3).reshape(groups, k, n * ho * wo)
    y = torch.bmm(weight.reshape(groups, o // groups, k), cols)  # (groups, O / groups, N·L)
    y = y.view(o, n, ho, wo).transpose(0, 1)
    return (y if bias is None else y + bias.view(1, -1, 1, 1)).contiguous()


def _fixed_point_layer(float_op: Callable, x, weight, bias, args: tuple, spec) -> torch.Tensor:
    """``float_op(x, weight, bias, *args)`` rounded to ``spec`` as deployed, when no gradient is
    needed: the sum of products in float64 (exact while the accumulator's bound stays within
    53 bits, which ``passes.accumulators`` checks), rounded once.  When a gradient is needed it
    is ``float_op`` itself in the tensors' dtype (float32), the op training always ran."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return float_op(x, weight, bias, *args)
    float_op = conv2d_float64 if float_op is F.conv2d else float_op
    y = float_op(x.double(), weight.double(), None if bias is None else bias.double(), *args)
    return quantize_reference(y, spec).to(x.dtype)


def fixed_point_conv1d(x, weight, bias, stride, padding, dilation, groups, spec) -> torch.Tensor:
    """``F.conv1d`` as deployed at inference (see :func:`fixed_point_conv2d`)."""
    return _fixed_point_layer(F.conv1d, x, weight, bias, (stride, padding, dilation, groups), spec)


def fixed_point_conv2d(x, weight, bias, stride, padding, dilation, groups, spec) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` as deployed: without a
    gradient (``torch.no_grad()``, or no input requiring one) the exact sum of products of the
    fixed-point codes plus the bias, taken in float64 and rounded once to the format ``spec`` of
    the cast after it, as the integer graph's int64 accumulator and requantize do; with one, the
    float32 ``F.conv2d`` (training's forward and its speed are unchanged; the cast after it
    rounds).  Written by ``passes.accumulators``; ``lower`` deploys it as ``conv2d``."""
    return _fixed_point_layer(F.conv2d, x, weight, bias, (stride, padding, dilation, groups), spec)


def fixed_point_conv3d(x, weight, bias, stride, padding, dilation, groups, spec) -> torch.Tensor:
    """``F.conv3d`` as deployed at inference (see :func:`fixed_point_conv2d`)."""
    return _fixed_point_layer(F.conv3d, x, weight, bias, (stride, padding, dilation, groups), spec)


def fixed_point_linear(x, weight, bias, spec) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as deployed at inference (see :func:`fixed_point_conv2d`)."""
    return _fixed_point_layer(F.linear, x, weight, bias, (), spec)


def scalar_codes(k: float) -> tuple[int, int]:
    """A Python number as the float32 nearest to it, ``m · 2**-e`` with integer ``m`` (at most 24
    significant bits) and ``e`` (the fewest fractional bits)::

        >>> scalar_codes(0.5), scalar_codes(32 ** -0.5)
        ((1, 1), (11863283, 26))
    """
    v = float(torch.tensor(float(k), dtype=torch.float32))
    if not math.isfinite(v):
        raise ValueError(f"a product with the constant {k!r}: not a finite float32")
    m, e = v.as_integer_ratio()
    return m, e.bit_length() - 1


SCALE_BITS = 16  # significant bits of a stand-alone batch norm's per-channel scale


def batch_norm_affine(module: nn.modules.batchnorm._BatchNorm, weight, bias, frac: int
                      ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """A stand-alone batch norm in eval mode as the fixed-point affine map ``y = x · s + t``:
    ``(s_codes, s_frac, t_codes)``, per channel, int64.

    ``s = γ / sqrt(σ² + ε)`` (float64, from the running variance and the casted ``γ``) is
    rounded to :data:`SCALE_BITS` significant bits at one binary point for the tensor,
    ``s_frac = 16 − e`` where ``max|s| = f · 2**e``, ``f`` in [0.5, 1); ``t = β − μ · s`` (the
    unrounded ``s``) is rounded to the binary point ``frac`` of the output's format.  Both
    round to nearest, ties to even.  ``weight``/``bias`` ``None`` (``affine=False``) are 1 and 0::

        >>> s, s_frac, t = batch_norm_affine(bn, gamma, beta, frac=8)   # y = x·s·2**-s_frac + t·2**-8
    """
    if module.running_mean is None:
        raise ValueError("a stand-alone batch norm needs running statistics (track_running_stats=True)")
    mean, var = module.running_mean.detach().double(), module.running_var.detach().double()
    gamma = torch.ones_like(mean) if weight is None else weight.detach().double()
    beta = torch.zeros_like(mean) if bias is None else bias.detach().double()
    s = gamma / torch.sqrt(var + module.eps)
    largest = float(s.abs().max()) if s.numel() else 0.0
    s_frac = SCALE_BITS - math.frexp(largest)[1] if largest > 0 else SCALE_BITS
    s_codes = torch.round(s * 2.0 ** s_frac).long()
    t_codes = torch.round((beta - mean * s) * 2.0 ** frac).long()
    return s_codes, s_frac, t_codes


def fixed_point_batch_norm(x, module: nn.modules.batchnorm._BatchNorm, weight, bias, spec: list) -> torch.Tensor:
    """A batch norm that folds into no conv/linear, as deployed: in eval mode the affine map of
    :func:`batch_norm_affine` at the binary point of the format ``spec`` of the cast after it,
    ``x · s + t`` computed exactly (float64: codes of up to 24 bits times a 17-bit ``s``) and
    rounded once with ``spec``.  In training mode it is :func:`batch_norm` (batch statistics,
    running statistics updated); the cast after it rounds.  The backward of the eval form is
    ``s`` (as for frozen statistics)."""
    if module.training or module.running_mean is None:
        return batch_norm(x, module, weight, bias)
    s_codes, s_frac, t_codes = batch_norm_affine(module, weight, bias, int(spec[0]))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = (s_codes.double() * 2.0 ** -s_frac).view(shape).to(x.device)
    t = (t_codes.double() * 2.0 ** -int(spec[0])).view(shape).to(x.device)
    exact = x.double() * s + t
    y = quantize_reference(exact.detach(), spec).to(x.dtype)
    # the value is the fixed-point one; the gradient flows through x · s
    return y + (x * s.to(x.dtype) - (x * s.to(x.dtype)).detach())


def fixed_point_addmm(bias, x, weight, spec) -> torch.Tensor:
    """``torch.addmm(bias, x, weight)`` (transformers' ``Conv1D``: a linear layer whose weight is
    stored (in, out)) as deployed: :func:`fixed_point_linear` of ``weight.t()``."""
    return fixed_point_linear(x, weight.t(), bias, spec)


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """Which keys a (batch, length) ``attention_mask`` of integers keeps (non-zero), as a
    (batch, 1, 1, length) bool tensor that broadcasts over heads and queries."""
    return (mask != 0)[:, None, None, :]


def all_kept(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask of ``mask``'s shape that keeps every position: what a mask's condition
    is computed from when only its constant part (a causal mask) is wanted."""
    return torch.ones_like(mask)


def fill_masked(x: torch.Tensor, keep: torch.Tensor, spec: list, also: torch.Tensor | None = None) -> torch.Tensor:
    """Attention scores with a mask applied, as deployed: ``x`` where ``keep`` is true, elsewhere
    the smallest value of the format ``spec`` of the cast after it (its smallest code), which
    the integer softmax gives the least weight.  The additive form it replaces (``x`` plus a
    large negative number, rounded by that cast) saturates only where ``x`` is small enough;
    this select is exact in float and on codes.  The gradient flows to the kept positions.
    ``also``, if given, is a second condition (a causal mask beside a padding mask): kept where both are."""
    low = (int(spec[1]) - int(spec[3])) * 2.0 ** -int(spec[0])
    keep = keep.to(x.device, torch.bool)
    if also is not None:
        keep = keep & also.to(x.device, torch.bool)
    return torch.where(keep, x, torch.full((), low, dtype=x.dtype, device=x.device))


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: its name, group, and the fx node targets that are it."""

    name: str
    group: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()  # overload packet names in torch.export graphs
    module_names: tuple[str, ...] = ()  # module classes of optional packages, "package.module.Class"
    function_names: tuple[str, ...] = ()  # functions of layers above core, "package.module.function"

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"op {self.name!r}: unknown group {self.group!r}; groups are {sorted(GROUPS)}")


_DECLARED = [
    Op("cast", "cast"),  # a call of a Cast module: recognised by the edge it carries (ir.EDGE)
    Op("conv1d", "multiply_accumulate", (nn.Conv1d,), (F.conv1d, torch.conv1d, fixed_point_conv1d), (), ("conv1d",)),
    Op("conv2d", "multiply_accumulate", (nn.Conv2d,), (F.conv2d, torch.conv2d, fixed_point_conv2d), (), ("conv2d",)),
    Op("conv3d", "multiply_accumulate", (nn.Conv3d,), (F.conv3d, torch.conv3d, fixed_point_conv3d), (), ("conv3d",)),
    Op("linear", "multiply_accumulate", (nn.Linear,), (F.linear, fixed_point_linear), (), ("linear",)),
    Op("matmul", "multiply_accumulate", (), (torch.matmul, operator.matmul), ("matmul",), ("matmul",)),
    Op("mm", "multiply_accumulate", (), (torch.mm,), ("mm",), ("mm",)),
    Op("bmm", "multiply_accumulate", (), (torch.bmm,), ("bmm",), ("bmm",)),
    Op("relu", "format_preserving", (nn.ReLU,), (F.relu, torch.relu), ("relu",), ("relu",)),
    Op("max_pool1d", "format_preserving", (nn.MaxPool1d,), (F.max_pool1d, torch.max_pool1d), (), ("max_pool1d",)),
    Op("max_pool2d", "format_preserving", (nn.MaxPool2d,), (F.max_pool2d, torch.max_pool2d), (), ("max_pool2d",)),
    Op("max_pool3d", "format_preserving", (nn.MaxPool3d,), (F.max_pool3d, torch.max_pool3d), (), ("max_pool3d",)),
    Op("identity", "format_preserving", (nn.Identity,)),
    Op("flatten", "shape", (nn.Flatten,), (torch.flatten,), ("flatten",), ("flatten",)),
    Op("reshape", "shape", (), (torch.reshape,), ("view", "reshape"), ("view", "reshape")),
    Op("add", "adder", (), (operator.add, operator.iadd, torch.add), ("add", "add_"), ("add", "add_")),
    Op("sub", "adder", (), (operator.sub, operator.isub, torch.sub), ("sub", "sub_"), ("sub", "sub_")),
    Op("cat", "adder", (), (torch.cat, torch.concat, torch.concatenate), (), ("cat", "concat")),
    Op("stack", "adder", (), (torch.stack,), (), ("stack",)),
    Op("avg_pool2d", "reduction", (nn.AvgPool2d,), (F.avg_pool2d,), (), ("avg_pool2d",)),
    Op("adaptive_avg_pool2d", "reduction", (nn.AdaptiveAvgPool2d,), (F.adaptive_avg_pool2d,), (),
       ("adaptive_avg_pool2d", "_adaptive_avg_pool2d")),
    Op("mean", "reduction", (), (torch.mean,), ("mean",), ("mean",)),
    Op("fixed_point_average", "reduction", (), (fixed_point_average,)),  # written by passes.averages
    Op("fixed_point_avg_pool2d", "reduction", (), (fixed_point_avg_pool2d,)),  # written by passes.averages
    Op("fixed_point_mean", "reduction", (), (fixed_point_mean,)),  # written by passes.averages
    # division by a constant: a power of two moves the binary point; another constant's
    # fixed-point definition (passes.averages) multiplies by its reciprocal
    Op("truediv", "elementwise", (), (operator.truediv, torch.div, torch.true_divide), ("div", "true_divide"),
       ("div",)),
    Op("fixed_point_divide", "elementwise", (), (fixed_point_divide,)),  # written by passes.averages
    Op("dropout", "elementwise", (nn.Dropout,), (F.dropout,), (), ("dropout",)),  # the identity at eval time
    Op("batch_norm", "normalization", (), (batch_norm,)),
    # products of two activations, softmax, LayerNorm: their fixed-point definitions are written by passes.definitions
    Op("einsum", "multiply_accumulate", (), (torch.einsum,), (), ("einsum",)),
    Op("fixed_point_matmul", "multiply_accumulate", (), (fixed_point_matmul,)),
    Op("softmax", "normalization", (nn.Softmax,), (torch.softmax, F.softmax), ("softmax",), ("softmax", "_softmax")),
    Op("fixed_point_softmax", "normalization", (), (fixed_point_softmax,)),
    Op("layer_norm", "normalization", (nn.LayerNorm,), (F.layer_norm,), (), ("layer_norm", "native_layer_norm")),
    Op("fixed_point_layer_norm", "normalization", (), (fixed_point_layer_norm,)),
    Op("unflatten", "shape", (nn.Unflatten,), (torch.unflatten,), ("unflatten",)),  # split a dim into heads
    # structural ops of CNNs: shapes, slices, concatenation, products of activations, resampling
    Op("permute", "shape", (), (torch.permute,), ("permute",), ("permute",)),
    Op("transpose", "shape", (), (torch.transpose, torch.swapaxes, torch.swapdims), ("transpose", "swapaxes", "swapdims"),
       ("transpose",)),  # swapaxes: maxvit's grid partition
    Op("contiguous", "shape", (), (), ("contiguous",), ("clone", "contiguous")),
    Op("squeeze", "shape", (), (torch.squeeze, torch.unsqueeze), ("squeeze", "unsqueeze"), ("squeeze", "unsqueeze")),
    Op("getitem", "shape", (), (operator.getitem,)),  # slices of tensors, elements of tuples and sizes
    Op("split", "shape", (), (torch.split, torch.chunk, torch.unbind), ("split", "chunk", "unbind"),
       ("split", "chunk", "unbind", "split_with_sizes")),
    Op("size", "size", (), (getattr, operator.floordiv, operator.mod, operator.eq, operator.ne, operator.lt, operator.le,
                              operator.gt, operator.ge, torch._assert, math.sqrt, math.floor, math.ceil),
       ("size", "dim"), ("sym_size",), function_names=("fxcompile.frontend.attention.inverse_sqrt",)),
    # a tensor divided by a constant (a moved binary point when a power of two), or sizes divided
    # a constant (a class token) repeated over the batch, or a tensor broadcast to a larger shape
    Op("expand", "shape", (), (), ("expand",), ("expand",)),
    Op("mul", "multiply_accumulate", (), (operator.mul, operator.imul, torch.mul), ("mul", "mul_"), ("mul",)),
    Op("fixed_point_mul", "multiply_accumulate", (), (fixed_point_mul,)),  # written by passes.products
    Op("fixed_point_batch_norm", "normalization", (), (fixed_point_batch_norm,)),  # written by passes.batch_norms
    # shifted windows (swin): codes moved cyclically along non-batch axes
    Op("roll", "shape", (), (torch.roll,), ("roll",), ("roll",)),
    Op("pad", "resample", (nn.ZeroPad2d, nn.ConstantPad2d), (F.pad,), (), ("pad",)),
    # an in-place op on a view, written back into its base (frontend.functionalize)
    Op("write_back", "shape", function_names=("fxcompile.frontend.functionalize.write_back",)),
    # stochastic depth (timm's DropPath, torchvision's StochasticDepth): random in training, the
    # identity at eval time; traced as a leaf, so it follows the module's training flag at run time
    Op("drop_path", "elementwise", module_names=("timm.layers.drop.DropPath", "timm.models.layers.drop.DropPath",
                                                 "torchvision.ops.stochastic_depth.StochasticDepth")),
    Op("interpolate", "resample", (nn.Upsample, nn.UpsamplingNearest2d), (F.interpolate,), (),
       ("upsample_nearest2d",)),
    # elementwise nonlinearities (fxcompile.core.nonlinear): clips on codes, tables for the rest
    Op("relu6", "format_preserving", (nn.ReLU6,), (F.relu6,), (), ("relu6",)),
    Op("hardtanh", "format_preserving", (nn.Hardtanh,), (F.hardtanh,), (), ("hardtanh",)),
    Op("clamp", "format_preserving", (), (torch.clamp, torch.clip), ("clamp", "clip"), ("clamp", "clip")),
    Op("sigmoid", "elementwise", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",), ("sigmoid",)),
    Op("tanh", "elementwise", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",), ("tanh",)),
    Op("silu", "elementwise", (nn.SiLU,), (F.silu,), (), ("silu",)),
    Op("gelu", "elementwise", (nn.GELU,), (F.gelu,), (), ("gelu",)),
    Op("hardswish", "elementwise", (nn.Hardswish,), (F.hardswish,), (), ("hardswish",)),
    Op("hardsigmoid", "elementwise", (nn.Hardsigmoid,), (F.hardsigmoid,), (), ("hardsigmoid",)),
    Op("leaky_relu", "elementwise", (nn.LeakyReLU,), (F.leaky_relu,), (), ("leaky_relu",)),
    Op("elu", "elementwise", (nn.ELU,), (F.elu,), (), ("elu",)),
    Op("mish", "elementwise", (nn.Mish,), (F.mish,), (), ("mish",)),
    Op("lookup", "elementwise", (), (lookup,)),  # written by passes.lookup_tables
    # text transformers (Hugging Face): token and position embeddings, masks, Conv1D
    Op("embedding", "resample", (nn.Embedding,), (F.embedding,), (), ("embedding",)),  # rows of a table
    Op("addmm", "multiply_accumulate", (), (torch.addmm, fixed_point_addmm), ("addmm",), ("addmm",)),
    Op("slice", "shape", (), (), (), ("slice",)),  # aten.slice: a range along one axis
    Op("select", "shape", (), (), (), ("select",)),  # aten.select: one index along one axis, dropped
    Op("to", "shape", (), (), ("to",), ("to", "_to_copy")),  # a dtype or device change
    Op("where", "elementwise", (), (torch.where,), ("where", "masked_fill"), ("where", "masked_fill")),
    Op("key_padding_mask", "elementwise", (), (key_padding_mask,)),  # written by passes.masks
    Op("fill_masked", "elementwise", (), (fill_masked,)),  # written by passes.masks
    Op("all_kept", "size", (), (all_kept,)),  # written by passes.masks: depends on the mask's shape only
    # integer and bool tensors computed from sizes, buffers and integer inputs (positions, masks):
    # evaluated when lowering where they are constants for the example shape
    Op("bookkeeping", "size", (), (), (), ("arange", "new_ones", "ones", "zeros", "full", "ge", "gt", "le", "lt",
                                          "eq", "ne", "__and__", "__or__", "bitwise_and", "bitwise_or",
                                          "logical_and", "logical_or", "logical_not", "bitwise_not", "index",
                                          "diff", "cumsum", "gather", "_assert_tensor_metadata", "scalar_tensor",
                                          "lift_fresh_copy", "detach_")),
]

CLIP_OPS = ("relu6", "hardtanh", "clamp")  # exact on codes: a clamp to the bounds
LOOKUP_OPS = ("sigmoid", "tanh", "silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish")

OPS: dict[str, Op] = {op.name: op for op in _DECLARED}
_BY_MODULE = {m: op for op in _DECLARED for m in op.modules}
_BY_MODULE_NAME = {m: op for op in _DECLARED for m in op.module_names}
_BY_FUNCTION = {f: op for op in _DECLARED for f in op.functions}
_BY_FUNCTION_NAME = {f: op for op in _DECLARED for f in op.function_names}
_BY_METHOD = {m: op for op in _DECLARED for m in op.methods}
_BY_ATEN = {a: op for op in _DECLARED for a in op.aten}

INTEGER_OPS = {
    "quantize": "float input -> codes of the input edge's format",
    "requantize": "codes at one binary point -> codes of a format: rounding shift, then saturate or wrap",
    "conv2d": "int64 sums of products of input and weight codes (over each group's channels), plus aligned bias codes",
    "linear": "int64 sums of products of input and weight codes, plus aligned bias codes",
    "relu": "max(codes, 0)",
    "clip": "codes shifted left (exactly) to a finer binary point, then clamped to constant bounds",
    "lookup": "a table of output codes indexed by input code minus the smallest input code",
    "max_pool2d": "window maxima of codes",
    "sum_pool2d": "window sums of codes (a power-of-two average with the binary point moved)",
    "scale": "codes times an integer constant (an average's fixed-point reciprocal), binary point moved; "
             "per output position where the divisors differ",
    "adaptive_sum_pool2d": "window sums of codes over an adaptive pool's uneven or overlapping windows",
    "add": "operands shifted to the larger binary point, then added",
    "reshape": "the same codes in another shape",
    "dequantize": "codes -> float32 at an output",
    "matmul": "int64 sums of products of two activations' codes (the second operand transposed or not)",
    "softmax": "integer softmax over the last dim: exp table over code differences, sum, rounding division",
    "layer_norm": "integer LayerNorm over the last dim: integer mean and variance, isqrt, division, affine map",
    "transpose": "the same codes with the non-batch axes permuted",
    "slice": "a strided range of codes along non-batch axes",
    "concat": "operands shifted to the largest binary point, then concatenated along a non-batch axis",
    "mul": "the elementwise (broadcast) product of two operands' codes, at the sum of their binary points",
    "affine": "codes times a per-channel integer, plus a per-channel integer (at the product's binary point)",
    "pad": "codes with a constant (zero, or a max pool's smallest code) added around non-batch axes",
    "upsample": "codes repeated by integer factors along the spatial axes (nearest)",
    "constant": "constant codes (a parameter used as an operand: a class token, a position embedding)",
    "expand": "codes broadcast to a larger shape, the batch dimension taken from the graph's first input",
    "gather": "rows of a constant table of codes indexed by an integer input (token ids: an embedding)",
    "padding_mask": "an integer (batch, length) attention mask as 0/1 of shape (batch, 1, 1, length): non-zero kept",
    "select": "codes where a 0/1 condition (an input or a constant) is 1, a constant code (the format's smallest) "
              "elsewhere",
}


def op_of(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """The registered op ``node`` is, or ``None``."""
    if node.op == "call_module":
        if ir.EDGE.has(node):
            return OPS["cast"]
        return module_op(gm.get_submodule(node.target))
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return _BY_ATEN.get(node.target.overloadpacket.__name__)
        try:
            op = _BY_FUNCTION.get(node.target)
        except TypeError:  # an unhashable target
            return None
        return op or _BY_FUNCTION_NAME.get(f"{getattr(node.target, '__module__', '')}."
                                           f"{getattr(node.target, '__qualname__', '')}")
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def module_op(module: nn.Module) -> Op | None:
    """The registered op a module is (by class, or by qualified class name), or ``None``."""
    cls = type(module)
    return _BY_MODULE.get(cls) or _BY_MODULE_NAME.get(f"{cls.__module__}.{cls.__qualname__}")


def ops_in(*groups: str) -> set[str]:
    """Names of the ops in ``groups``."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown op group(s) {sorted(unknown)}; groups are {sorted(GROUPS)}")
    return {op.name for op in _DECLARED if op.group in groups}
