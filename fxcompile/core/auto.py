"""``fxc.auto(...)``: a policy that asks the cost model to choose every edge's format.

    >>> policy = fxc.auto(max_formats=3, bits=16)
    >>> qmodel = fxc.compile(model, policy, loss_fn=nn.CrossEntropyLoss(), calibration_data=batches)

``compile`` then calibrates the graph on ``calibration_data`` (values *and* gradients) and
runs :func:`fxcompile.passes.choose_formats` instead of reading formats from role tables.
``bits`` is one width for everything or a width per role (``{"activation": 8,
"gradient": 8, "weight": 16}``); a tuple of widths lets the solver choose among them,
paying ``bits_cost`` per bit moved.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from ..errors import PolicyError
from .formats import MAX_BITS, ROUNDINGS
from .policy import FALLBACK, ROLES, check_prediction_gradient

__all__ = ["Auto", "auto", "parse_bits", "OBJECTIVES"]

OBJECTIVES = ("nsr", "reach", "sensitivity")
# where a role's width comes from when the user did not name it
_BITS_FALLBACK = dict(FALLBACK, bias="weight", loss="gradient")


@dataclasses.dataclass(frozen=True)
class Auto:
    """The cost model's settings (see :mod:`fxcompile.passes.choose_formats` for the objective).

    ``max_formats``: at most this many distinct (bits, frac) formats in the whole model,
    forward and backward.  ``objective``: ``"sensitivity"`` (the default) weighs each edge's
    rounding and saturation error by the loss's sensitivity to it, measured on the calibration
    batches (forward: ``E[(dL/dv)^2]``; backward: the sensitivity of the parameters whose
    gradients the error reaches), and counts drift in both directions; ``"nsr"`` sums each
    edge's expected noise-to-signal ratio; ``"reach"`` weights each by 1 + the number of values
    its error reaches through the graph (forward: descendants; backward: ancestors).  On the
    seed CNN at 16 bits (5 epochs, 3 seeds) ``sensitivity`` trains no worse with more formats
    (K = 2, 3, 4 within 0.21 points of FP32), where ``nsr``'s K = 3 fell 0.76 points below its
    K = 2 (``benchmarks/auto_formats_results.md``).
    ``weight_memory_bits`` and ``bops`` (bit-operations: per conv/linear, MACs per sample
    times activation bits times weight bits) are budgets beside ``max_formats``: the chosen
    widths never exceed them (they bind only when ``bits`` offers several widths).
    ``hls4ml_dsps`` is a third budget: the DSPs hls4ml's own resource estimator
    (``VivadoDSPEstimator``) gives the deployed model, where a conv/linear layer whose weights
    have 9 or more bits takes one DSP per multiplier divided by ``hls4ml_reuse_factor``, and
    narrower weights take none (it needs hls4ml installed).  ``format_cost``: added per
    distinct format used (the solver may then use fewer than ``max_formats``).
    ``bits_cost``: added per bit moved per element, relative to all elements (only matters
    when ``bits`` offers several widths).  ``fracs``: the candidate binary points.
    ``gradient_rounding``: the rounding of every backward format.  ``update_rounding``: the
    rounding of stored weights and biases, which :func:`fxcompile.fixed_point_optimizer`
    applies to each update (reads of a stored parameter are exact whatever it is);
    ``"stochastic"``, as in the shipped policies, keeps updates smaller than half a step
    from being lost.  ``margin``: octaves by
    which forward values may grow and gradients (and the loss value) shrink after
    calibration (the cost of a frac is averaged over those drifts; the input is the data,
    which does not drift), so formats chosen on the untrained model keep headroom for the
    trained one.  ``None`` (the default) allows 4 octaves for formats of
    12 bits or more and 1 octave for narrower ones: on the seed CNN at 16 bits, 2 octaves
    left the trained fc1 outputs saturating 2.4 % of the time and the logits 0.6 %, 4 did
    not; at 8 bits, 2 or more octaves push the logits' gradient into a format whose range
    it overflows and training stalls at chance, while 1 octave trains.
    ``output_margin``: octaves by which the model's output (the loss's prediction) may grow
    beyond ``margin``; ``None`` (the default) is ``margin`` again, so the output may grow twice
    as far as other values.  Its scale is set by the loss rather than by the untrained model:
    cross-entropy is lowest at unbounded logits, so training keeps widening them (on the seed
    CNN from 0.19 untrained to past 16, over 6 octaves); with the same 4 octaves as the rest,
    K = 4 at 16 bits put the logits on 16.14 (range ±2) and trained 5 points below K = 3 on
    a short run.
    ``clip_gradient`` and ``prediction_gradient`` are :class:`~fxcompile.Policy`'s: with
    ``prediction_gradient="inward"`` a saturated logit still gets the gradient that moves it
    back into range.  It matters where one narrow format holds every activation: at 8 bits
    with K = 3 the seed CNN's logits sit at the format's ceiling for over 90 % of test images
    and clipped gradients leave wrong classes tied there with the true one.
    """

    max_formats: int = 3
    bits: Any = 16
    objective: str = "sensitivity"
    fracs: tuple[int, int] = (-16, 48)
    rounding: str = "nearest"
    gradient_rounding: str = "nearest"
    update_rounding: str = "stochastic"
    margin: int | None = None
    output_margin: int | None = None
    format_cost: float = 0.0
    bits_cost: float = 0.0
    clip_gradient: bool = True
    prediction_gradient: str | None = None
    calibration_batches: int = 8
    name: str | None = None
    weight_memory_bits: int | None = None
    bops: float | None = None
    hls4ml_dsps: int | None = None
    hls4ml_reuse_factor: int = 1

    def __post_init__(self):
        if isinstance(self.max_formats, bool) or not isinstance(self.max_formats, int) or self.max_formats < 1:
            raise PolicyError(f"auto: max_formats must be a positive int, got {self.max_formats!r}")
        if self.objective not in OBJECTIVES:
            raise PolicyError(f"auto: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        check_prediction_gradient(self.prediction_gradient, "auto")
        for field in ("rounding", "gradient_rounding", "update_rounding"):
            if getattr(self, field) not in ROUNDINGS:
                raise PolicyError(f"auto: {field} must be one of {ROUNDINGS}, got {getattr(self, field)!r}")
        if self.margin is not None and (isinstance(self.margin, bool) or not isinstance(self.margin, int)
                                        or not 0 <= self.margin <= 16):
            raise PolicyError(f"auto: margin must be None or an int in 0..16 (octaves), got {self.margin!r}")
        if self.output_margin is not None and (isinstance(self.output_margin, bool)
                                               or not isinstance(self.output_margin, int)
                                               or not 0 <= self.output_margin <= 16):
            raise PolicyError(f"auto: output_margin must be None or an int in 0..16 (octaves), "
                              f"got {self.output_margin!r}")
        for field in ("weight_memory_bits", "bops"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise PolicyError(f"auto: {field} must be None or a positive number (a budget), got {v!r}")
        if self.hls4ml_dsps is not None and (isinstance(self.hls4ml_dsps, bool)
                                             or not isinstance(self.hls4ml_dsps, (int, float))
                                             or not self.hls4ml_dsps >= 0):
            raise PolicyError(f"auto: hls4ml_dsps must be None or a number >= 0 (a budget of DSPs), "
                              f"got {self.hls4ml_dsps!r}")
        if (isinstance(self.hls4ml_reuse_factor, bool) or not isinstance(self.hls4ml_reuse_factor, int)
                or self.hls4ml_reuse_factor < 1):
            raise PolicyError(f"auto: hls4ml_reuse_factor must be a positive int, got {self.hls4ml_reuse_factor!r}")
        if self.hls4ml_dsps is not None and importlib.util.find_spec("hls4ml") is None:
            raise PolicyError("auto: the hls4ml_dsps budget is hls4ml's own DSP estimate and needs hls4ml: "
                              "pip install 'fxcompile[hls]'")
        lo, hi = self.fracs
        if not (isinstance(lo, int) and isinstance(hi, int) and -64 <= lo <= hi <= 64):
            raise PolicyError(f"auto: fracs must be (lo, hi) ints within -64..64, got {self.fracs!r}")
        bits = self.bits if isinstance(self.bits, dict) else {"default": self.bits}
        for role, widths in bits.items():
            if role != "default" and role not in ROLES:
                raise PolicyError(f"auto: bits has unknown role {role!r}; roles are {', '.join(ROLES)}")
            for w in _widths(widths):
                if isinstance(w, bool) or not isinstance(w, int) or not 2 <= w <= MAX_BITS:
                    raise PolicyError(f"auto: bits[{role!r}] must be ints in 2..{MAX_BITS}, got {widths!r}")
        if isinstance(self.bits, dict):
            object.__setattr__(self, "bits", dict(self.bits))

    def bits_for(self, role: str) -> tuple[int, ...]:
        """The candidate widths of a role: its own entry, else its coarser role's, else 16."""
        if not isinstance(self.bits, dict):
            return _widths(self.bits)
        r = role
        while r not in self.bits:
            if r not in _BITS_FALLBACK:
                return _widths(self.bits.get("default", 16))
            r = _BITS_FALLBACK[r]
        return _widths(self.bits[r])

    def margin_for(self, bits: int) -> int:
        """Octaves of drift allowed for a format of ``bits`` bits (see ``margin``)."""
        if self.margin is not None:
            return self.margin
        return 4 if bits >= 12 else 1

    def output_margin_for(self, bits: int) -> int:
        """Octaves the model's output may grow beyond ``margin_for(bits)`` (see ``output_margin``)."""
        return self.output_margin if self.output_margin is not None else self.margin_for(bits)

    def describe(self) -> str:
        if self.name:
            return self.name
        bits = self.bits if not isinstance(self.bits, dict) else ",".join(f"{k}={v}" for k, v in self.bits.items())
        extra = f", gradient_rounding={self.gradient_rounding}" if self.gradient_rounding != "nearest" else ""
        extra += f", update_rounding={self.update_rounding}" if self.update_rounding != "stochastic" else ""
        extra += f", margin={self.margin}" if self.margin is not None else ""
        extra += f", output_margin={self.output_margin}" if self.output_margin is not None else ""
        extra += f", weight_memory_bits={self.weight_memory_bits:g}" if self.weight_memory_bits is not None else ""
        extra += f", bops={self.bops:g}" if self.bops is not None else ""
        extra += f", hls4ml_dsps={self.hls4ml_dsps:g}" if self.hls4ml_dsps is not None else ""
        extra += f", hls4ml_reuse_factor={self.hls4ml_reuse_factor}" if self.hls4ml_reuse_factor != 1 else ""
        extra += f", prediction_gradient={self.prediction_gradient}" if self.prediction_gradient is not None else ""
        return f"auto(K={self.max_formats}, bits={bits}, objective={self.objective}{extra})"

    def __str__(self) -> str:
        return self.describe()


def _widths(w) -> tuple[int, ...]:
    return tuple(sorted(set(w))) if isinstance(w, (tuple, list, set, frozenset)) else (w,)


def parse_bits(text: str):
    """``bits`` from its command-line form: ``16``; ``8/16`` (the solver chooses among the
    widths); per role, ``activation=8,gradient=8,weight=16`` (each side may be ``8/16``).
    Raises :class:`PolicyError` naming the part it cannot read."""
    def widths(part: str, whole: str):
        try:
            ws = tuple(int(x) for x in part.split("/"))
        except ValueError:
            raise PolicyError(f"auto: bits {whole!r}: {part!r} is not a width or widths like 16 or 8/16") from None
        return ws if len(ws) > 1 else ws[0]
    text = text.strip()
    if "=" not in text:
        return widths(text, text)
    out = {}
    for part in text.split(","):
        role, eq, value = part.partition("=")
        if not eq or not role.strip():
            raise PolicyError(f"auto: bits {text!r}: {part!r} is not role=width (e.g. activation=8)")
        out[role.strip()] = widths(value.strip(), text)
    return out


def auto(max_formats: int = 3, bits: Any = 16, objective: str = "sensitivity", **options) -> Auto:
    """A policy that chooses each edge's format from calibration under a budget of formats.

        fxc.auto(max_formats=3, bits=16)
        # 8-bit activations and gradients: the setting measured in benchmarks/auto_formats_results.md
        # (the input image may share the weights' 16-bit format: no extra format)
        fxc.auto(max_formats=3, bits={"activation": 8, "gradient": 8, "weight": 16, "loss": 16, "input": 16},
                 gradient_rounding="stochastic", objective="reach")
    """
    return Auto(max_formats=max_formats, bits=bits, objective=objective, **options)
