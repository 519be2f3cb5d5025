"""Fixed-point formats.

A :class:`FixedPoint` names a set of representable values ``(code - zero_point) * 2**-frac``
where ``code`` is an integer of ``bits`` bits.  ``fixed(16, 8)`` and the string ``"16.8"``
name the same format, two's complement over all 2**16 codes, as hls4ml's ``ap_fixed<16,8>``
and QPyTorch's ``fixed_point_quantize(x, 16, 8)`` are::

    >>> fixed(16, 8) == FixedPoint.parse("16.8")
    True
    >>> fixed(16, 8).min_value, fixed(16, 8).max_value
    (-128.0, 127.99609375)
    >>> fixed(16, 8, narrow=True).min_value      # the string "16.8,narrow"
    -127.99609375

Semantics, kept identical in every backend (torch simulation, integer reference, ONNX):

* ``rounding="nearest"`` rounds half to even (``torch.round``, ONNX ``QuantizeLinear``,
  hls4ml ``AP_RND_CONV``).  ``floor`` rounds toward -inf, ``toward_zero`` truncates,
  ``stochastic`` rounds up with probability equal to the fractional remainder.
* Range: a signed b-bit format uses the full two's-complement code range
  ``-2**(b-1) .. 2**(b-1) - 1``, an unsigned one ``0 .. 2**b - 1``.  ``narrow=True``
  (``"16.8,narrow"``) drops the most negative code, so a signed format saturates at
  ``±(2**(b-1) - 1)`` and negation never overflows (hls4ml's ``AP_SAT_SYM``, QONNX's
  ``narrow=1``); it applies to signed saturating formats only.
* Zero point: ``zero_point`` (``"16.8,zp=3"``, default 0) is an integer code offset,
  independent of the range; :meth:`FixedPoint.fit_zero_point` chooses one from an observed
  range.  The scale is always a power of two.
* The old ``mode="symmetric"`` (narrow range, zero point 0) and ``mode="asymmetric"`` (full
  range) still parse, with a :class:`DeprecationWarning` naming the new spelling.
* ``overflow="saturate"`` clamps to the range; ``overflow="wrap"`` wraps two's-complement
  style over all ``2**bits`` codes (as hardware registers do).
* NaN and ±Inf are not numbers a fixed-point register can hold; the simulation's cast turns
  them into NaN (never into a number) so they stay visible in training.  The *deployed* input
  quantizer (integer reference, ONNX) has no NaN code: it maps NaN to code 0 and ±Inf to the
  bounds (as saturating float-to-fixed conversions in hardware do), and the runners count and
  report such inputs (:func:`fxcompile.deploy.backends.integer.quantize_input`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import torch

from ..errors import FormatError
from .quantizer import OVERFLOWS, ROUNDINGS, draw_seed, quantize_reference

__all__ = ["FixedPoint", "fixed", "as_format", "ROUNDINGS", "OVERFLOWS", "MODES"]

MODES = ("symmetric", "asymmetric")  # deprecated spellings of narrow=True / narrow=False
MAX_BITS = 32
MAX_ABS_FRAC = 64

_PATTERN = re.compile(r"^\s*(u?)(\d+)\.(-?\d+)\s*((?:,\s*[\w=+-]+\s*)*)$")


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """A fixed-point number format: ``bits`` total bits, ``frac`` fractional bits.

    ``narrow`` drops the code ``-2**(bits-1)`` (signed, saturating formats only);
    ``zero_point`` offsets the codes; ``mode`` is the deprecated spelling of both::

        >>> str(FixedPoint(16, 8, narrow=True, zero_point=3))
        '16.8,narrow,zp=3'
    """

    bits: int
    frac: int
    signed: bool = True
    mode: dataclasses.InitVar[str | None] = None  # deprecated: use narrow / zero_point
    rounding: str = "nearest"
    overflow: str = "saturate"
    zero_point: int = 0
    narrow: bool = False

    def __post_init__(self, mode: str | None):
        for name in ("bits", "frac", "zero_point"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise FormatError(f"FixedPoint.{name} must be an int, got {value!r}")
        for name in ("signed", "narrow"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"FixedPoint.{name} must be a bool, got {getattr(self, name)!r}")
        if mode is not None:
            self._apply_mode(mode)
        if not 1 <= self.bits <= MAX_BITS:
            raise FormatError(f"FixedPoint.bits must be in 1..{MAX_BITS}, got {self.bits}")
        if self.signed and self.bits < 2:
            raise FormatError("FixedPoint.bits must be >= 2 for a signed format (one bit is the sign)")
        if abs(self.frac) > MAX_ABS_FRAC:
            raise FormatError(f"FixedPoint.frac must be in -{MAX_ABS_FRAC}..{MAX_ABS_FRAC}, got {self.frac}")
        if self.rounding not in ROUNDINGS:
            raise FormatError(f"FixedPoint.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.overflow not in OVERFLOWS:
            raise FormatError(f"FixedPoint.overflow must be one of {OVERFLOWS}, got {self.overflow!r}")
        if self.narrow and not self.signed:
            raise FormatError("FixedPoint.narrow applies to signed formats only (it drops the code -2**(bits-1)); "
                              "an unsigned format has no negative codes to drop")
        if self.narrow and self.overflow == "wrap":
            raise FormatError("FixedPoint.narrow and overflow='wrap' conflict: wrapping runs over all 2**bits codes; "
                              "keep one of them")
        lo, hi = self._full_range()
        if not lo <= self.zero_point <= hi:
            raise FormatError(f"FixedPoint.zero_point {self.zero_point} is outside the {self.bits}-bit code range {lo}..{hi}")

    def _apply_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise FormatError(f"FixedPoint.mode must be one of {MODES}, got {mode!r} "
                              "(mode is deprecated: use narrow=True and zero_point)")
        new = "narrow=True ('<bits>.<frac>,narrow')" if mode == "symmetric" else \
            "the default full range (drop mode; a zero point is zero_point=..., 'zp=...')"
        warnings.warn(f"FixedPoint mode={mode!r} is deprecated: write {new}", DeprecationWarning, stacklevel=4)
        if mode == "symmetric":
            if self.zero_point != 0:
                raise FormatError(f"FixedPoint.zero_point must be 0 in symmetric mode, got {self.zero_point}")
            # the old symmetric mode narrowed only signed saturating formats
            object.__setattr__(self, "narrow", self.signed and self.overflow == "saturate")
        elif self.narrow:
            raise FormatError("FixedPoint.narrow=True and mode='asymmetric' (full range) conflict; keep narrow")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> FixedPoint:
        """Parse ``"16.8"``, ``"u8.8"``, ``"16.8,narrow"`` or ``"16.8,stochastic,wrap,zp=3"``.

        Each option sets one field; two options that set the same field differently
        (``"16.8,stochastic,floor"``) raise :class:`FormatError` naming both.
        """
        if not isinstance(text, str):
            raise FormatError(f"a format string looks like '16.8', got {text!r}")
        m = _PATTERN.match(text)
        if not m:
            raise FormatError(f"cannot parse format {text!r}: write '<bits>.<frac>' such as '16.8' "
                              "(prefix 'u' for unsigned, options after commas, e.g. '16.8,stochastic')")
        kwargs: dict[str, Any] = {"bits": int(m.group(2)), "frac": int(m.group(3)), "signed": not m.group(1)}
        given: dict[str, str] = {}  # field → the option that set it
        for opt in filter(None, (o.strip() for o in m.group(4).split(","))):
            if opt in ROUNDINGS:
                field, value = "rounding", opt
            elif opt in OVERFLOWS:
                field, value = "overflow", opt
            elif opt == "narrow":
                field, value = "narrow", True
            elif opt in MODES:
                new = f"'{m.group(1)}{m.group(2)}.{m.group(3)},narrow'" if opt == "symmetric" else \
                    "no option (the full range is the default)"
                warnings.warn(f"format option {opt!r} in {text!r} is deprecated: write {new}",
                              DeprecationWarning, stacklevel=2)
                field, value = "narrow", opt == "symmetric"
            elif re.fullmatch(r"zp=[+-]?\d+", opt):
                field, value = "zero_point", int(opt[3:])
            else:
                raise FormatError(f"unknown option {opt!r} in format {text!r}; options are "
                                  f"{ROUNDINGS + OVERFLOWS + ('narrow',)} and zp=<int>")
            if field in given and kwargs[field] != value:
                raise FormatError(f"conflicting options {given[field]!r} and {opt!r} in format {text!r}: "
                                  f"both set the {field}; keep one")
            given[field], kwargs[field] = opt, value
        if given.get("narrow") == "symmetric":  # the old symmetric mode narrowed only what it could
            kwargs["narrow"] = kwargs["signed"] and kwargs.get("overflow") != "wrap"
            if kwargs.get("zero_point"):
                raise FormatError(f"conflicting options 'symmetric' and {given['zero_point']!r} in format {text!r}: "
                                  "the symmetric mode had zero point 0; write 'narrow' with the zp")
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> FixedPoint:
        fields = {f.name for f in dataclasses.fields(cls)} | {"mode"}  # mode: deprecated, still read
        unknown = set(data) - fields
        if unknown:
            raise FormatError(f"unknown format field(s) {sorted(unknown)}; fields are {sorted(fields)}")
        missing = {"bits", "frac"} - set(data)
        if missing:
            raise FormatError(f"format is missing field(s) {sorted(missing)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> FixedPoint:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        text = f"{'' if self.signed else 'u'}{self.bits}.{self.frac}"
        for name, default in (("rounding", "nearest"), ("overflow", "saturate")):
            if getattr(self, name) != default:
                text += f",{getattr(self, name)}"
        if self.narrow:
            text += ",narrow"
        if self.zero_point:
            text += f",zp={self.zero_point}"
        return text

    # ---- ranges -------------------------------------------------------------------------
    def _full_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    @property
    def code_min(self) -> int:
        """Smallest code the format produces: ``-2**(bits-1)``, one more when ``narrow``."""
        lo, _ = self._full_range()
        return lo + 1 if self.narrow else lo

    @property
    def code_max(self) -> int:
        return self._full_range()[1]

    @property
    def scale(self) -> float:
        """Value of one code step, ``2**-frac``."""
        return 2.0 ** -self.frac

    @property
    def min_value(self) -> float:
        return (self.code_min - self.zero_point) * self.scale

    @property
    def max_value(self) -> float:
        return (self.code_max - self.zero_point) * self.scale

    @property
    def integer_bits(self) -> int:
        """Bits left of the binary point, sign included (hls4ml's ``I`` in ``ap_fixed<W,I>``)."""
        return self.bits - self.frac

    def fit_zero_point(self, lo: float, hi: float) -> FixedPoint:
        """The format whose zero point centres the observed range [lo, hi] on its codes."""
        full_lo, full_hi = self.code_min, self.code_max
        mid_code = (full_lo + full_hi) / 2
        zp = round(mid_code - (lo + hi) / 2 / self.scale)
        return self.replace(zero_point=int(min(max(zp, full_lo), full_hi)))

    # ---- tensors ------------------------------------------------------------------------
    def spec(self) -> list[int]:
        """The format as the int list the cast kernels take (see :mod:`fxcompile.core.quantizer`)."""
        return [self.frac, self.code_min, self.code_max, self.zero_point,
                ROUNDINGS.index(self.rounding), OVERFLOWS.index(self.overflow)]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` to this format (the cast without autograd); same dtype as ``x``.

        The reference quantizer, bit for bit what the fused kernels compute (stochastic
        rounding draws its seed from the default generator, as they do)."""
        seed = draw_seed() if self.rounding == "stochastic" else None
        return quantize_reference(x, self.spec(), seed=seed)

    def to_codes(self, x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Integer codes of ``x`` rounded to this format (NaN/Inf are an error here)."""
        if not torch.isfinite(x).all():
            raise FormatError(f"cannot encode non-finite values in format {self}")
        y = self.quantize(x.double())
        return torch.round(y * 2.0 ** self.frac).to(dtype) + self.zero_point

    def from_codes(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ((q.to(torch.float64) - self.zero_point) * self.scale).to(dtype)

    def representable(self, x: torch.Tensor) -> torch.Tensor:
        """Bool mask: which elements of ``x`` are exactly values of this format."""
        t = x.double() * 2.0 ** self.frac + self.zero_point
        return (t == torch.round(t)) & (t >= self.code_min) & (t <= self.code_max)


def fixed(bits: int, frac: int, **options) -> FixedPoint:
    """Shorthand: ``fixed(16, 8)`` is the study's activation format."""
    return FixedPoint(bits, frac, **options)


def as_format(value: Any, where: str = "format") -> FixedPoint | None:
    """Accept a FixedPoint, a '16.8' string, a dict, a (bits, frac) pair, or None (float)."""
    if value is None or isinstance(value, FixedPoint):
        return value
    try:
        if isinstance(value, str):
            return None if value.strip().lower() in ("float", "fp32", "none") else FixedPoint.parse(value)
        if isinstance(value, dict):
            return FixedPoint.from_dict(value)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return FixedPoint(*value)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    raise FormatError(f"{where}: expected a format such as '16.8' or fixed(16, 8), got {value!r}")
