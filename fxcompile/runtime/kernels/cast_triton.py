"""The Triton source of the CUDA cast kernel (imported only when a kernel is launched).

One kernel covers every operator: it replays ``quantize_reference`` step by step in the same
work precision as ``cast_cpu.cpp``, so the three agree bit for bit.  Every step is either
exact or one correctly rounded IEEE operation, and the launch turns off fused multiply-adds
(``enable_fp_fusion=False``), as ``-ffp-contract=off`` does for the C++ kernel.  Only
operations that Triton's interpreter executes like the GPU are used: round-half-even is
written with the ``2**23`` (``2**52``) trick instead of ``rint``, truncation with
``floor``/``ceil``, and bfloat16 is converted on its bits (the interpreter truncates
float32 -> bfloat16 instead of rounding to nearest even).  The one exception is ``fmod``
(wrapping formats whose range is not a power of two): libdevice's exact ``fmod`` on the GPU,
NumPy's exact ``fmod`` (Triton's ``%`` on floats) in the interpreter; and the mask's row sum
is ``tl.sum`` on the GPU, the same sum through ``tl.reduce`` in the interpreter.  The GPU's
``floor`` flushes subnormal inputs to zero, so a negative subnormal gets its floor, -1, by
hand.  :func:`fxcompile.runtime.kernels.gpu.ptx` compiles a variant for a CUDA target
without a GPU, which is how the tests check the instructions the GPU will run.

A program handles ``WORDS`` blocks of 64 elements, one row per saturation-mask word, so the
packed mask is a row sum of ``flag << lane`` (distinct powers of two: the sum is a bitwise or).
"""

import triton.language as tl
from triton.language.extra import libdevice

# globals a kernel reads must be constexpr objects
NEAREST, STOCHASTIC, FLOOR, TOWARD_ZERO = (tl.constexpr(i) for i in range(4))
SATURATE, WRAP, WRAP_POW2 = (tl.constexpr(i) for i in range(3))
OUT_NARROW, OUT_DOUBLE, OUT_BF16 = (tl.constexpr(i) for i in range(3))


def cast_kernel(x_ptr, y_ptr, p_ptr, mask_in_ptr, mask_out_ptr, n, s0, s1,
                ROUNDING: tl.constexpr, OVERFLOW: tl.constexpr, ZP: tl.constexpr, QUANTIZE: tl.constexpr,
                MASK_IN: tl.constexpr, MASK_OUT: tl.constexpr, OUT: tl.constexpr, WIDE: tl.constexpr,
                GPU: tl.constexpr, WORDS: tl.constexpr):
    word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS).to(tl.int64)
    lane = tl.arange(0, 64).to(tl.int64)
    idx = word[:, None] * 64 + lane[None, :]  # the logical (row-major) element index
    inb = idx < n
    words_in = word * 64 < n

    # params: scale, inv_scale, zp, qmin, qmax, range, inv_range, lo, hi, magic (work dtype)
    if OUT == OUT_BF16:  # x_ptr and y_ptr are int16 views of bfloat16 tensors
        raw = tl.load(x_ptr + idx, mask=inb, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        xv = (raw << 16).to(tl.float32, bitcast=True)
    elif OUT == OUT_DOUBLE:
        xv = tl.load(x_ptr + idx, mask=inb, other=0.0)
    else:
        xv = tl.load(x_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    if WIDE:
        xv = xv.to(tl.float64)
    if MASK_IN:  # the backward: zero the gradient where the forward value saturated
        zero_bits = tl.load(mask_in_ptr + word, mask=words_in, other=0)
        xv = tl.where(((zero_bits[:, None] >> lane[None, :]) & 1) != 0, 0.0, xv)

    if QUANTIZE:
        t = xv * tl.load(p_ptr + 0)
        if ROUNDING == NEAREST:
            # |t| + 2**23 (2**52) has a unit last place: the add rounds half to even
            magic = tl.load(p_ptr + 9)
            a = tl.abs(t)
            r = (a + magic) - magic
            t = tl.where((a < magic) & (t != 0.0), tl.where(t < 0.0, -r, r), t)
        elif ROUNDING == FLOOR:
            # floor compiles to cvt.rmi.ftz: a negative subnormal t is flushed to -0 first, so
            # floor would give -0 where IEEE (and the CPU) give -1
            f = tl.floor(t)
            t = tl.where((t < 0.0) & (f == 0.0), -1.0, f)
        elif ROUNDING == TOWARD_ZERO:
            t = tl.where(t < 0.0, tl.ceil(t), tl.floor(t))
        else:  # floor plus a Bernoulli(remainder) step, u from the counter-based hash
            h = (idx & 0xFFFFFFFF).to(tl.uint32) ^ s0.to(tl.uint32)
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            h = h + ((idx >> 32).to(tl.uint32) ^ s1.to(tl.uint32))
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            if WIDE:
                u = h.to(tl.float64) * 2.3283064365386963e-10  # 2**-32
            else:
                u = (h >> 8).to(tl.int32).to(tl.float32) * 5.960464477539063e-08  # 2**-24
            f = tl.floor(t)
            f = tl.where((t < 0.0) & (f == 0.0), -1.0, f)  # as for FLOOR: no flush to zero
            t = f + tl.where(u < t - f, 1.0, 0.0)

        rng = tl.load(p_ptr + 5)
        if OVERFLOW == WRAP:
            if GPU:
                m = libdevice.fmod(t, rng)
            else:
                m = t % rng
            t = tl.where(m < 0.0, m + rng, m)
        elif OVERFLOW == WRAP_POW2:
            t = t - rng * tl.floor(t * tl.load(p_ptr + 6))
        if ZP:
            t = t + tl.load(p_ptr + 2)
        qmin = tl.load(p_ptr + 3)
        if OVERFLOW == SATURATE:
            qmax = tl.load(p_ptr + 4)
            t = tl.where(t < qmin, qmin, t)
            t = tl.where(qmax < t, qmax, t)
        elif OVERFLOW == WRAP:
            if GPU:
                m = libdevice.fmod(t - qmin, rng)
            else:
                m = (t - qmin) % rng
            t = tl.where(m < 0.0, m + rng, m) + qmin
        else:
            a = t - qmin
            t = a - rng * tl.floor(a * tl.load(p_ptr + 6)) + qmin
        if ZP:
            t = t - tl.load(p_ptr + 2)
        v = t * tl.load(p_ptr + 1) + 0.0 * xv  # 0 * +-Inf = NaN: non-finite stays non-finite
    else:
        v = xv

    # store in the tensor's dtype; 16-bit types round from float32, as c10's conversions do
    if OUT == OUT_BF16:
        vf = v.to(tl.float32)
        b = vf.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
        b = tl.where(vf != vf, 0x7FC0, b)
        tl.store(y_ptr + idx, b.to(tl.uint16).to(tl.int16, bitcast=True), mask=inb)
        yv = (b << 16).to(tl.float32, bitcast=True)
    elif OUT == OUT_DOUBLE:
        tl.store(y_ptr + idx, v, mask=inb)
        yv = v
    else:
        yt = v.to(tl.float32).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + idx, yt, mask=inb)
        yv = yt.to(tl.float32)

    if MASK_OUT:  # bit set where y sits at or beyond a bound of the format, or is NaN
        if WIDE:
            yv = yv.to(tl.float64)
        inside = (yv > tl.load(p_ptr + 7)) & (yv < tl.load(p_ptr + 8))
        bits = tl.where(inside | (idx >= n), 0, 1).to(tl.int64) << lane[None, :]
        if GPU:
            words = tl.sum(bits, axis=1)
        else:  # tl.sum is a compiled function; the interpreter runs its combine step with NumPy
            words = tl.reduce(bits, 1, tl.standard._sum_combine)
        tl.store(mask_out_ptr + word, words, mask=words_in)
