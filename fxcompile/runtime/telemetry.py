"""Numerical telemetry: per-edge counts of overflow, underflow and NaN/Inf, both directions.

Each :class:`~fxcompile.passes.casts.Cast` can carry :class:`EdgeCounters`.  While enabled,
every forward and backward through the cast adds to int64 counter tensors, with no host
synchronisation; counts are read (one sync) only by :func:`summary`, :func:`check` or
:func:`fxcompile.reports.inspect`.  What is counted, per direction:

* ``overflow`` — finite values outside the format's range ``[min_value, max_value]``
  (saturated, or wrapped with ``overflow="wrap"``);
* ``underflow`` — nonzero finite values that became exactly 0 (flushed to zero by rounding);
* ``nonfinite`` — NaN or ±Inf arriving at the cast.  The cast turns ±Inf into NaN and lets
  NaN through (a fixed-point register cannot hold either, and neither may silently become a
  number).

Backward counts see the gradient arriving at the cast (``g_in``) and the one it passes on
(``g_out``); gradients the clipped straight-through estimator zeroes because the forward value
saturated are neither overflow nor underflow.  Usage::

    >>> telemetry.enable(qmodel)
    >>> loss = qmodel.loss(qmodel(x), y); loss.backward()
    >>> telemetry.summary(qmodel)[0]
    {'edge': 'x->*', 'role': 'input', 'forward_elements': 1568, 'forward_overflow': 0, ...}
    >>> telemetry.check(qmodel, threshold=0.01)   # warns once per edge saturating > 1 %
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from ..core import ir
from .cast import cast, spec_bounds

__all__ = ["EdgeCounters", "SaturationWarning", "enable", "disable", "reset", "summary", "check", "table",
           "counters_state", "load_counters", "FIELDS"]

FIELDS = ("forward_elements", "forward_overflow", "forward_underflow", "forward_nonfinite",
          "backward_elements", "backward_overflow", "backward_underflow", "backward_nonfinite")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class SaturationWarning(UserWarning):
    """An edge saturates more often than the threshold allows."""


def _observable(x) -> bool:
    # Graph capture (torch.compile, torch.export, ONNX tracing) runs the module on fake or
    # traced tensors; counting there would bake a side effect into the captured graph.
    return (type(x) in _PLAIN and x.is_floating_point() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def _outside(x: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(finite values outside [lo, hi], non-finite values) of ``x`` as int64 tensors, and
    whether ``x`` is known to be all finite and in range."""
    if x.device.type == "cpu":
        # On CPU reading a scalar costs no synchronisation; one min/max pass rules out the
        # common case (nothing out of range, nothing non-finite; a NaN fails both tests).
        mn, mx = torch.aminmax(x)
        if mn.item() >= lo and mx.item() <= hi:
            zero = torch.zeros((), dtype=torch.int64)
            return zero, zero, True
    finite = torch.isfinite(x)
    return (((x > hi) | (x < lo)) & finite).sum(), x.numel() - finite.sum(), False


def _nonzero_on_grid(y: torch.Tensor, step: float, clean: bool) -> torch.Tensor:
    """Nonzeros of ``y``, whose values are multiples of ``step``; ``clean``: all finite."""
    if clean and y.numel() < 1 << 24:
        # every nonzero clamps to ±step, so the float sum is an exact multiple of step; this
        # is several times faster than count_nonzero on CPU
        return (torch.clamp(y, -step, step).abs_().sum() * (1.0 / step)).round_().long()
    return torch.count_nonzero(y)


def _touches(y: torch.Tensor, lo: float, hi: float) -> bool:
    """Might some of ``y`` sit at a bound (or be NaN)?  Always True off CPU (no sync there)."""
    if y.device.type != "cpu":
        return True
    mn, mx = torch.aminmax(y)
    return not (mn.item() > lo and mx.item() < hi)


class EdgeCounters:
    """The counters of one cast (see :data:`FIELDS`), accumulated as one int64 tensor.

    ``every`` > 1 counts only every ``every``-th call (elements too, so fractions stay right).
    """

    def __init__(self, name: str, role: str, every: int = 1):
        self.name, self.role, self.every = name, role, every
        self.counts = torch.zeros(len(FIELDS), dtype=torch.int64)
        self.warned = False
        self.calls = 0

    def cast(self, x, fwd: list, bwd: list, clip: bool):
        """``fxcompile.runtime.cast.cast(x, fwd, bwd, clip)``, counting what happens to ``x`` and its gradient."""
        if not (fwd or bwd) or not _observable(x):
            return cast(x, fwd, bwd, clip)
        self.calls += 1
        if (self.calls - 1) % self.every:
            return cast(x, fwd, bwd, clip)
        if self.counts.device != x.device:  # counts stay on the model's device: adding them never syncs
            self.counts = self.counts.to(x.device)
        track = bool(bwd) and torch.is_grad_enabled() and x.requires_grad
        # A fresh alias of x has this cast as its only user, so its gradient is the cast's output.
        xin = x.view_as(x) if track else x
        y = cast(xin, fwd, bwd, clip)
        saturated = None
        with torch.no_grad():
            if fwd:
                lo, hi = spec_bounds(fwd)
                overflow, nonfinite, clean = _outside(x, lo, hi)
                # rounding never turns zero into nonzero, so the difference counts the flushes
                underflow = torch.count_nonzero(x) - _nonzero_on_grid(y, 2.0 ** -fwd[0], clean)
                self.counts[:4] += torch.stack([overflow.new_tensor(x.numel()), overflow, underflow, nonfinite])
                if track and clip and fwd[5] == 0 and _touches(y, lo, hi):
                    saturated = (y <= lo) | (y >= hi) | torch.isnan(y)  # the cast's STE zeroes these
        if track and y is not xin:
            arriving = {}
            y.register_hook(lambda g: arriving.__setitem__("g", g))
            xin.register_hook(lambda g_out: self._backward(arriving.pop("g", None), g_out, bwd, saturated))
        return y

    @torch.no_grad()
    def _backward(self, g_in, g_out, bwd, saturated) -> None:
        if g_in is None:
            return
        lo, hi = spec_bounds(bwd)
        if saturated is None:
            overflow, nonfinite, clean = _outside(g_in, lo, hi)
            underflow = torch.count_nonzero(g_in) - _nonzero_on_grid(g_out, 2.0 ** -bwd[0], clean)
        else:
            finite = torch.isfinite(g_in)
            kept = finite & ~saturated
            overflow = (((g_in > hi) | (g_in < lo)) & kept).sum()
            underflow = ((g_out == 0) & (g_in != 0) & kept).sum()
            nonfinite = g_in.numel() - finite.sum()
        self.counts[4:] += torch.stack([overflow.new_tensor(g_in.numel()), overflow, underflow, nonfinite])

    def as_dict(self) -> dict:
        return {"edge": self.name, "role": self.role, **dict(zip(FIELDS, self.counts.tolist()))}


def _casts(qmodel: fx.GraphModule):
    for prefix, gm in ir.graphs(qmodel):
        if hasattr(gm, "casts"):
            for name, module in gm.casts.named_children():
                yield prefix, name, module


def enable(qmodel: fx.GraphModule, every: int = 1) -> fx.GraphModule:
    """Attach counters to every cast of ``qmodel`` (kept if already there); returns ``qmodel``.

    ``every=N`` counts one call in N per cast, dividing the cost by about N.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"telemetry.enable: every must be a positive int, got {every!r}")
    for prefix, _, c in _casts(qmodel):
        if getattr(c, "counters", None) is None:
            c.counters = EdgeCounters(prefix + c.edge.name, c.edge.role, every)
    return qmodel


def disable(qmodel: fx.GraphModule) -> fx.GraphModule:
    """Remove the counters (the casts then cost nothing extra)."""
    for _, _, c in _casts(qmodel):
        c.counters = None
    return qmodel


def _counters(qmodel) -> list[tuple[str, EdgeCounters]]:
    return [(prefix + name, c.counters) for prefix, name, c in _casts(qmodel)
            if getattr(c, "counters", None) is not None]


def reset(qmodel: fx.GraphModule) -> None:
    for _, k in _counters(qmodel):
        k.counts.zero_()
        k.warned = False


def summary(qmodel: fx.GraphModule) -> list[dict]:
    """One dict per counted edge: ``edge``, ``role`` and the :data:`FIELDS` (reads the counters)."""
    return [k.as_dict() for _, k in _counters(qmodel)]


def check(qmodel: fx.GraphModule, threshold: float = 0.01) -> list[dict]:
    """Warn (once per edge) about edges whose forward or backward overflow fraction exceeds
    ``threshold``; returns the offending edges' summaries."""
    bad = []
    for _, k in _counters(qmodel):
        d = k.as_dict()
        for way in ("forward", "backward"):
            n = d[f"{way}_elements"]
            if n and d[f"{way}_overflow"] / n > threshold:
                bad.append(d)
                if not k.warned:
                    k.warned = True
                    warnings.warn(f"edge {k.name} ({k.role}) saturates: {d[f'{way}_overflow']} of {n} "
                                  f"{way} values ({100 * d[f'{way}_overflow'] / n:.2f} %, threshold "
                                  f"{100 * threshold:g} %) are outside its format's range; widen its integer "
                                  "part (fewer frac bits) with a policy override", SaturationWarning, stacklevel=2)
                break
    return bad


def table(qmodel: fx.GraphModule) -> str:
    """Text table of the nonzero counters ('' when telemetry is off)."""
    rows = summary(qmodel)
    if not rows:
        return ""
    head = ("edge", "role", "fwd n", "fwd over", "fwd under", "fwd nan/inf",
            "bwd n", "bwd over", "bwd under", "bwd nan/inf")
    body = [(r["edge"], r["role"], *(str(r[f]) for f in FIELDS)) for r in rows
            if any(r[f] for f in FIELDS if not f.endswith("elements"))]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    total = {f: sum(r[f] for r in rows) for f in FIELDS}
    lines = [f"telemetry: {len(rows)} edges counted; overflow {total['forward_overflow']} fwd / "
             f"{total['backward_overflow']} bwd, underflow {total['forward_underflow']} fwd / "
             f"{total['backward_underflow']} bwd, NaN/Inf {total['forward_nonfinite']} fwd / "
             f"{total['backward_nonfinite']} bwd"]
    if body:
        lines += [fmt.format(*head)] + [fmt.format(*r) for r in body]
    return "\n".join(lines)


def counters_state(qmodel) -> dict | None:
    """The counters as ``{cast name: int64 CPU tensor}`` (for checkpoints), or None when off."""
    found = _counters(qmodel) if isinstance(qmodel, fx.GraphModule) else []
    return {name: k.counts.detach().to("cpu", copy=True) for name, k in found} or None


def load_counters(qmodel, state: dict) -> None:
    enable(qmodel)
    for name, k in _counters(qmodel):
        if name in state:
            k.counts.copy_(state[name])
