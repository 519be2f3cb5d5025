"""TensorBoard logging of a training run: loss, accuracy, learning rate, and per edge the
telemetry counters and the distribution of values and gradients against the edge's format.

Needs the ``tensorboard`` package (``pip install tensorboard`` or the ``tensorboard`` extra).
What one run writes (``step`` is the optimizer step)::

    train/loss, train/lr                        every step
    test/accuracy, train/epoch_loss             every epoch
    saturation/<edge>/{forward,backward}        fraction of values outside the format's range,
    flush_to_zero/<edge>/{forward,backward}     of nonzero values rounded to 0,
    nan/<edge>/{forward,backward}               of NaN/±Inf arrivals, over the last ``every`` steps
    values/<edge>, gradients/<edge>             histograms of log2|x| of the values (gradients)
                                                arriving at the edge's cast, one step in ``every``

A histogram's bins span the format's range in octaves: the lowest edge bin ends at
``-frac`` (below it a value rounds to zero) and the highest starts at the format's largest
power of two (above its ``max_value`` a value saturates), so where the mass sits relative
to both ends reads straight off the plot.  The formats are also written once as a text
table (``formats``)::

    log = TensorBoardLog("runs/tb", qmodel, every=50)
    ...; log.step(step, loss, lr); ...; log.epoch(step, accuracy=0.9, train_loss=0.3)
    log.close()
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..core import ir

__all__ = ["TensorBoardLog", "require_tensorboard"]


def require_tensorboard():
    """``SummaryWriter``, or an ImportError that says how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs TensorBoard: pip install tensorboard "
                          "(or pip install 'fxcompile[tensorboard]')") from None
    return SummaryWriter


def _log2_bins(fmt) -> torch.Tensor:
    """Bin edges in log2|x|: two octaves beyond each end of the format, one bin an octave
    split in four, with ``-frac`` and ``log2(max_value)`` on bin edges."""
    lo, hi = -fmt.frac, math.ceil(math.log2(max(abs(fmt.max_value), abs(fmt.min_value), 2.0 ** -fmt.frac)))
    return torch.arange(4 * (lo - 2), 4 * (hi + 2) + 1, dtype=torch.float64) / 4


class TensorBoardLog:
    """Writes one run's scalars and histograms under ``log_dir`` (see the module docstring).

    ``model`` is the trained module: for a compiled fixed-point model the per-edge telemetry
    (:mod:`fxcompile.runtime.telemetry`, enabled here one step in ``every`` unless already on)
    and the value/gradient histograms are logged too; an FP32 model logs only the scalars.
    """

    def __init__(self, log_dir, model: torch.nn.Module, every: int = 50):
        if every < 1:
            raise ValueError(f"TensorBoardLog: every must be >= 1, got {every}")
        self.writer = require_tensorboard()(log_dir=str(log_dir))
        self.every, self.casts, self._last, self._hooks = every, [], {}, []
        self._capturing = False
        if isinstance(model, fx.GraphModule):
            from ..runtime import telemetry
            if not any(getattr(c, "counters", None) for _, _, c in telemetry._casts(model)):
                telemetry.enable(model, every=every)
            self.casts = [(prefix + c.edge.name, c) for prefix, gm in ir.graphs(model) if hasattr(gm, "casts")
                          for c in gm.casts.children()]
            for name, c in self.casts:
                self._hooks.append(c.register_forward_hook(self._capture_hook(name, c)))
            self.writer.add_text("formats", "\n".join(
                ["| edge | role | forward | backward |", "|---|---|---|---|"]
                + [f"| {n} | {c.edge.role} | {c.edge.forward or 'float'} | {c.edge.backward or 'float'} |"
                   for n, c in self.casts]), 0)

    def _capture_hook(self, name, cast):
        def hook(module, inputs, output):
            if not self._capturing or not isinstance(inputs[0], torch.Tensor) or not inputs[0].is_floating_point():
                return
            step = self._step
            if cast.edge.forward is not None:
                self._histogram(f"values/{name}", inputs[0], cast.edge.forward, step)
            if cast.edge.backward is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._histogram(f"gradients/{name}", g, cast.edge.backward, step))
        return hook

    def _histogram(self, tag: str, x: torch.Tensor, fmt, step: int) -> None:
        with torch.no_grad():
            x = x.detach().abs().flatten().double()
            x = x[(x > 0) & torch.isfinite(x)]
            if not x.numel():
                return
            bins = _log2_bins(fmt)
            mag = torch.log2(x).clamp(float(bins[0]), float(bins[-1]))
            counts = torch.histogram(mag, bins).hist
            # written raw so that empty buckets stay: the x axis then spans the format's range
            self.writer.add_histogram_raw(tag, float(mag.min()), float(mag.max()), mag.numel(), float(mag.sum()),
                                          float((mag * mag).sum()), bins[1:].tolist(), counts.tolist(), step)

    def before_step(self, step: int) -> None:
        """Call before the forward of optimizer step ``step`` (counted from 1): arms the
        histogram capture one step in ``every``."""
        self._step = step
        self._capturing = bool(self.casts) and (step - 1) % self.every == 0

    def step(self, step: int, loss: float, lr: float) -> None:
        """After optimizer step ``step``: loss and learning rate; every ``every`` steps the telemetry."""
        self._capturing = False
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        if self.casts and step % self.every == 0:
            self._telemetry(step)

    def _telemetry(self, step: int) -> None:
        for name, c in self.casts:
            k = getattr(c, "counters", None)
            if k is None:
                continue
            counts = k.counts.tolist()
            last = self._last.get(name, [0] * len(counts))
            for way, base in (("forward", 0), ("backward", 4)):
                n = counts[base] - last[base]
                if n <= 0:
                    continue
                for tag, i in (("saturation", 1), ("flush_to_zero", 2), ("nan", 3)):
                    self.writer.add_scalar(f"{tag}/{name}/{way}", (counts[base + i] - last[base + i]) / n, step)
            self._last[name] = counts

    def epoch(self, step: int, accuracy: float, train_loss: float) -> None:
        self.writer.add_scalar("test/accuracy", accuracy, step)
        self.writer.add_scalar("train/epoch_loss", train_loss, step)
        self.writer.flush()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.writer.close()
