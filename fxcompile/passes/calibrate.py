"""Pass: run sample batches forward *and* backward and record per-edge statistics.

For every value with a role, ``node.meta["fxc_stats"]`` becomes a :class:`NodeStats`:
the statistics of the value itself, of its gradient (the *sum* over its uses) and of each
use's gradient.  Each is a :class:`TensorStats`: max |x|, fraction of zeros, and a log2
histogram of |x| (bin ``e`` holds ``2**(e-1) <= |x| < 2**e``, with the count, sum |x| and
sum x² of its members), from which percentiles, the overflow/underflow rate of a format
and its expected rounding + saturation error follow.

The graph runs in floating point (calibrate before ``insert_casts``), in its current
training mode, under ``torch.random.fork_rng``; parameters, their ``.grad`` and buffers
(batch-norm running statistics) are left exactly as they were::

    >>> gm = annotate_roles(expose_params(trace(model)))
    >>> calibrate(gm, [(x, y)], loss_graph=annotate_roles(trace(LossGraph(nn.CrossEntropyLoss())), True))
    >>> gm.graph.find_nodes(op="placeholder")[0].meta["fxc_stats"].value.max_abs
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.fx as fx

from ..core import ir
from ..core.formats import FixedPoint

__all__ = ["CONTRACT", "calibrate", "TensorStats", "NodeStats", "calibration_json", "save_calibration", "load_calibration",
           "E_MIN", "E_MAX"]

CONTRACT = ir.Contract(requires=(ir.ROLE,), provides=(ir.STATS,))

# float32 spans 2**-149 .. 2**128; bins below 2**-100 are merged (no format resolves them).
E_MIN, E_MAX = -100, 129
_NBINS = E_MAX - E_MIN + 1


@dataclasses.dataclass
class TensorStats:
    """Streaming statistics of |x| over calibration batches, with a log2 histogram.

    ``hist[i]`` counts the nonzero finite values whose binary exponent is ``e = E_MIN + i``
    (``2**(e-1) <= |x| < 2**e``, as :func:`torch.frexp` gives it); ``hist_abs``/``hist_sq``
    hold their sum |x| and sum x².  Zeros are counted apart, non-finite values likewise.
    """

    count: int = 0
    zeros: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0
    hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_NBINS, np.int64))
    hist_abs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_NBINS, np.float64))
    hist_sq: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_NBINS, np.float64))

    # ---- accumulation --------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> TensorStats:
        a = x.detach().flatten().abs().double()
        finite = torch.isfinite(a)
        self.nonfinite += int((~finite).sum())
        a = a[finite]
        self.count += a.numel()
        nonzero = a[a != 0]
        self.zeros += a.numel() - nonzero.numel()
        if nonzero.numel():
            self.max_abs = max(self.max_abs, float(nonzero.max()))
            _, e = torch.frexp(nonzero)
            idx = e.long().clamp_(E_MIN, E_MAX).sub_(E_MIN)
            self.hist += torch.bincount(idx, minlength=_NBINS).numpy()
            self.hist_abs += torch.bincount(idx, weights=nonzero, minlength=_NBINS).numpy()
            self.hist_sq += torch.bincount(idx, weights=nonzero * nonzero, minlength=_NBINS).numpy()
        return self

    def merge(self, other: TensorStats) -> TensorStats:
        return TensorStats(self.count + other.count, self.zeros + other.zeros, self.nonfinite + other.nonfinite,
                           max(self.max_abs, other.max_abs), self.hist + other.hist,
                           self.hist_abs + other.hist_abs, self.hist_sq + other.hist_sq)

    # ---- summaries -----------------------------------------------------------------------
    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.count if self.count else 0.0

    @property
    def mean_square(self) -> float:
        return float(self.hist_sq.sum()) / self.count if self.count else 0.0

    @property
    def exponents(self) -> np.ndarray:
        """The bin exponents ``e`` (bin ``e`` holds ``2**(e-1) <= |x| < 2**e``)."""
        return np.arange(E_MIN, E_MAX + 1)

    def percentile(self, q: float) -> float:
        """An upper bound within a factor 2 of the ``q``-th percentile (0..100) of |x|: a bin edge."""
        if not self.count:
            return 0.0
        rank = q / 100.0 * self.count
        if rank <= self.zeros:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.hist) + self.zeros, rank))
        return min(2.0 ** (E_MIN + min(i, _NBINS - 1)), self.max_abs)

    def _top_power(self, fmt: FixedPoint) -> int:
        # values >= 2**(bits-1-frac) are beyond every code of a signed symmetric format
        return (fmt.bits - (1 if fmt.signed else 0)) - fmt.frac

    def overflow_rate(self, fmt: FixedPoint) -> float:
        """Fraction of values at or above ``2**(bits-1-frac)`` (signed): they saturate (or wrap).

        Values in the last code step below that power of two also saturate and are not
        counted: the histogram does not resolve them.
        """
        if not self.count:
            return 0.0
        return float(self.hist[self.exponents - 1 >= self._top_power(fmt)].sum()) / self.count

    def underflow_rate(self, fmt: FixedPoint) -> float:
        """Fraction of the *nonzero* values that round to zero (|x| < half a step, nearest rounding)."""
        nonzero = self.count - self.zeros
        if not nonzero:
            return 0.0
        return float(self.hist[self.exponents <= -fmt.frac - 1].sum()) / nonzero

    def squared_error(self, fmt: FixedPoint, rounding: str | None = None) -> float:
        """Expected total squared error of casting every recorded value to ``fmt``.

        Saturated bins (``|x| >= 2**(bits-1-frac)``) pay ``(|x| - max)**2`` exactly from their
        moments.  With ``nearest`` rounding, bins below half a step flush to zero and pay
        x², the bin ``[step/2, step)`` rounds up and pays ``(step - |x|)**2``; every other
        bin pays the uniform rounding noise ``step**2 / 12``.  With ``stochastic`` rounding
        (unbiased) a value below one step has variance ``|x| (step - |x|)`` and the rest
        ``step**2 / 6``.
        """
        rounding = rounding or fmt.rounding
        e, n, s1, s2 = self.exponents, self.hist, self.hist_abs, self.hist_sq
        step, top = 2.0 ** -fmt.frac, fmt.max_value
        sat = e - 1 >= self._top_power(fmt)
        err = float((s2[sat] - 2 * top * s1[sat] + n[sat] * top * top).sum())
        rest = ~sat
        if rounding == "stochastic":
            small = rest & (e <= -fmt.frac)
            err += float((step * s1[small] - s2[small]).sum())
            err += float(n[rest & ~small].sum()) * step * step / 6
        else:
            flush = rest & (e <= -fmt.frac - 1)
            up = rest & (e == -fmt.frac)
            err += float(s2[flush].sum())
            err += float((n[up] * step * step - 2 * step * s1[up] + s2[up]).sum())
            err += float(n[rest & ~flush & ~up].sum()) * step * step / 12
        return max(err, 0.0)

    def squared_errors(self, bits: int, fracs: np.ndarray, rounding: str = "nearest") -> np.ndarray:
        """:meth:`squared_error` of the signed symmetric formats ``(bits, f)`` for every ``f`` in
        ``fracs`` at once (the cost model's inner loop)."""
        f = np.asarray(fracs, dtype=np.float64)[:, None]
        nz = np.nonzero(self.hist)[0]
        if not len(nz):
            return np.zeros(len(f))
        used = slice(nz[0], nz[-1] + 1)  # empty bins add nothing; skip them
        e, n = self.exponents[None, used], self.hist[None, used]
        s1, s2 = self.hist_abs[None, used], self.hist_sq[None, used]
        step = 2.0 ** -f
        top = (2.0 ** (bits - 1) - 1) * step
        sat = e - 1 >= bits - 1 - f
        rest = ~sat
        err = np.where(sat, s2 - 2 * top * s1 + n * top * top, 0.0)
        if rounding == "stochastic":
            small = rest & (e <= -f)
            err += np.where(small, step * s1 - s2, 0.0) + np.where(rest & ~small, n * step * step / 6, 0.0)
        else:
            flush, up = rest & (e <= -f - 1), rest & (e == -f)
            err += np.where(flush, s2, 0.0) + np.where(up, n * step * step - 2 * step * s1 + s2, 0.0)
            err += np.where(rest & ~flush & ~up, n * step * step / 12, 0.0)
        return np.maximum(err.sum(axis=1), 0.0)

    def noise_to_signal(self, fmt: FixedPoint, rounding: str | None = None) -> float:
        """Expected ``sum (q(x) - x)**2 / sum x**2``; 0 for an all-zero tensor."""
        signal = float(self.hist_sq.sum())
        return self.squared_error(fmt, rounding) / signal if signal > 0 else 0.0

    # ---- data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        nz = np.nonzero(self.hist)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        return {"count": self.count, "zeros": self.zeros, "nonfinite": self.nonfinite, "max_abs": self.max_abs,
                "zero_fraction": self.zero_fraction, "p50": self.percentile(50), "p99": self.percentile(99),
                "p99_9": self.percentile(99.9), "exponent_min": E_MIN + lo,
                "hist": self.hist[lo:hi].tolist(), "hist_abs": self.hist_abs[lo:hi].tolist(),
                "hist_sq": self.hist_sq[lo:hi].tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TensorStats:
        s = cls(d["count"], d["zeros"], d["nonfinite"], d["max_abs"])
        lo = d["exponent_min"] - E_MIN
        for name in ("hist", "hist_abs", "hist_sq"):
            getattr(s, name)[lo:lo + len(d[name])] = d[name]
        return s

    def summary(self) -> str:
        if not self.count:
            return "no data"
        return (f"max {self.max_abs:.3g}  p99 {self.percentile(99):.3g}  p50 {self.percentile(50):.3g}  "
                f"zeros {100 * self.zero_fraction:.1f}%")


@dataclasses.dataclass
class NodeStats:
    """Statistics of one value: itself, its summed gradient, and each use's gradient."""

    value: TensorStats
    gradient: TensorStats | None = None
    uses: dict[str, TensorStats] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value.to_dict(), "gradient": self.gradient.to_dict() if self.gradient else None,
                "uses": {k: v.to_dict() for k, v in self.uses.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> NodeStats:
        return cls(TensorStats.from_dict(d["value"]), TensorStats.from_dict(d["gradient"]) if d["gradient"] else None,
                   {k: TensorStats.from_dict(v) for k, v in d["uses"].items()})


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class _Recorder(fx.Interpreter):
    """Runs the graph; records each role value and keeps a clone per value and per use, so that
    ``torch.autograd.grad`` can return the summed gradient and each use's gradient apart."""

    def __init__(self, gm: fx.GraphModule, stats: dict, probes: dict):
        super().__init__(gm)
        self.stats, self.probes = stats, probes

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if ir.ROLE.get(n) is None or not _is_float(result):
            return result
        self.stats.setdefault(n.name, NodeStats(TensorStats())).value.update(result)
        if result.requires_grad:
            result = result.clone()
            self.probes[(n.name, "*")] = result
        return result

    def map_nodes_to_values(self, args, n: fx.Node):
        def load(a: fx.Node):
            v = self.env[a]
            if n.op == "output" or ir.ROLE.get(a) is None or not _is_float(v) or not v.requires_grad:
                return v
            key = (a.name, n.name)
            if key not in self.probes:
                self.probes[key] = v.clone()
            return self.probes[key]
        return fx.node.map_arg(args, load)


def _as_batches(batches: Iterable):
    for b in batches:
        if isinstance(b, (tuple, list)):
            yield tuple(b[:-1]) if len(b) > 1 else tuple(b), (b[-1] if len(b) > 1 else None)
        else:
            yield (b,), None


def _record(stats: dict, probes: dict, grads) -> None:
    for (producer, consumer), g in zip(probes, grads):
        if g is None or producer not in stats:
            continue
        node = stats[producer]
        if consumer == "*":
            node.gradient = (node.gradient or TensorStats()).update(g)
        else:
            node.uses.setdefault(consumer, TensorStats()).update(g)


def calibrate(gm: fx.GraphModule, batches: Iterable, loss_graph: fx.GraphModule | None = None,
              loss_fn: Callable | None = None) -> fx.GraphModule:
    """Record statistics of values and gradients on ``batches``; returns ``gm`` (meta only).

    ``batches`` yields ``(x, y)`` pairs (or ``(x1, x2, ..., y)``, or bare inputs ``x``).  The
    gradients come from ``loss_graph(prediction, y)`` (whose own values are recorded in its
    ``node.meta`` too), else from ``loss_fn(prediction, y)``; with neither, or without
    targets, only forward statistics are recorded.
    """
    modules = [gm] + ([loss_graph] if loss_graph is not None else [])
    buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in modules]
    stats = [{} for _ in modules]
    with torch.random.fork_rng():
        try:
            for inputs, target in _as_batches(batches):
                probes = [{} for _ in modules]
                # the gradient at the input too: the sensitivity objective weighs the input's rounding by it
                inputs = tuple(x.detach().requires_grad_() if _is_float(x) else x for x in inputs)
                with torch.enable_grad():
                    out = _Recorder(gm, stats[0], probes[0]).run(*inputs)
                    loss = None
                    if target is not None and loss_graph is not None:
                        loss = _Recorder(loss_graph, stats[1], probes[1]).run(out, target)
                    elif target is not None and loss_fn is not None:
                        loss = loss_fn(out, target)
                    tensors = [t for p in probes for t in p.values()]
                    if loss is not None and tensors and _is_float(loss) and loss.requires_grad:
                        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                        i = 0
                        for s, p in zip(stats, probes):
                            _record(s, p, grads[i:i + len(p)])
                            i += len(p)
        finally:
            with torch.no_grad():
                for m, saved in zip(modules, buffers):
                    for k, b in m.named_buffers():
                        b.copy_(saved[k])
    for m, s in zip(modules, stats):
        for node in m.graph.nodes:
            if node.name in s:
                ir.STATS.set(node, s[node.name])
    return gm


def calibration_json(*graphs: tuple[str, fx.GraphModule]) -> str:
    """The statistics of ``(prefix, graph)`` pairs as JSON: ``{prefix + node name: NodeStats}``."""
    out = {}
    for prefix, gm in graphs:
        for node in gm.graph.nodes:
            if ir.STATS.has(node):
                out[prefix + node.name] = ir.STATS.of(node).to_dict()
    return json.dumps(out, indent=1, allow_nan=False, default=lambda v: None if math.isnan(v) else v)


def save_calibration(qmodel: fx.GraphModule, path: str | Path) -> None:
    """Write the calibration statistics of a compiled model (and its loss graph) as JSON."""
    Path(path).write_text(calibration_json(*ir.graphs(qmodel)) + "\n")


def load_calibration(path: str | Path) -> dict[str, NodeStats]:
    return {k: NodeStats.from_dict(v) for k, v in json.loads(Path(path).read_text()).items()}
