"""Pass: record each node's tensor shape and dtype in ``node.meta["tensor_meta"]``.

Runs the graph once on example inputs with ``torch.fx.passes.shape_prop.ShapeProp``, in eval
mode and without gradients, so batch-norm statistics and parameters are left untouched::

    >>> gm = propagate_shapes(trace(torch.nn.Linear(4, 2)), (torch.randn(3, 4),))
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..core import ir

__all__ = ["CONTRACT", "propagate_shapes"]

CONTRACT = ir.Contract()  # writes torch.fx's own node.meta["tensor_meta"]


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    modes = {m: m.training for m in gm.modules()}
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])
    return gm
