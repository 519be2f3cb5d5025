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

__all__ = ["CONTRACT", "propagate_shapes", "positional_inputs"]

CONTRACT = ir.Contract()  # writes torch.fx's own node.meta["tensor_meta"]


def positional_inputs(gm: fx.GraphModule, example_inputs) -> tuple:
    """Example inputs in the order of ``gm``'s placeholders; a dict (keyword inputs) is matched
    by name, a missing one takes the placeholder's default."""
    if not isinstance(example_inputs, dict):
        return tuple(example_inputs)
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            name = node.target.lstrip("*")
            out.append(example_inputs[name] if name in example_inputs else (node.args[0] if node.args else None))
    return tuple(out)


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """``example_inputs``: a tuple of positional inputs or a dict of keyword inputs."""
    example_inputs = positional_inputs(gm, example_inputs)
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
