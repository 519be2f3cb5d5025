"""Batch-norm running statistics recomputed for the weights a model ends with.

A batch norm's running mean and variance are a moving average of the batch statistics seen
during training, each taken with the weights of its step.  When the weights still move fast at
the end (fixed-point training of a deep net: resnet18's last stage after one epoch of
Fashion-MNIST under ``baseline``), the averages lag behind them, and the eval-mode model —
the one that deploys, since the integer graph runs the running statistics — classifies far
worse than its weights allow.  :func:`recalibrate_batch_norms` resets every batch norm's
statistics and recomputes them, as a cumulative average, from forward passes over some
training batches with the weights left as they are::

    >>> fxc.recalibrate_batch_norms(qmodel, (x for x, _ in batches))
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["recalibrate_batch_norms", "tracked_batch_norms"]


def tracked_batch_norms(model: nn.Module) -> list:
    """The batch norms of ``model`` that track running statistics (those recalibrating changes)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batch_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset the running statistics of every batch norm of ``model`` that tracks them and
    recompute them from ``model(batch)`` for each batch (training-mode forward passes under
    ``torch.no_grad``: no parameter changes, no gradients); return the number of batches.

    Each statistic becomes the plain average over the batches (``momentum=None`` while it
    runs; each module's own momentum is restored after).  ``model`` is left in eval mode.
    Raises ``ValueError`` naming the model if it has no batch norm that tracks statistics, or
    if ``batches`` is empty (the statistics would stay reset)."""
    norms = tracked_batch_norms(model)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no batch norm that tracks running statistics")
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    def restore():  # lose no data: the old statistics come back
        for m, (_, mean, var, tracked) in saved.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)

    count = 0
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                count += 1
    except BaseException:
        restore()
        raise
    finally:
        for m in norms:
            m.momentum = saved[m][0]
        model.eval()
    if count == 0:
        restore()
        raise ValueError(f"recalibrate_batch_norms({type(model).__name__}): no batches given; statistics kept")
    return count
