"""Fixed-point weight storage: keep every parameter exactly in its format after each step."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..core import ir
from . import kernels
from .loss_scale import unscale_gradients
from ..core.formats import FixedPoint

__all__ = ["fixed_point_optimizer", "parameter_formats"]


def parameter_formats(qmodel: fx.GraphModule) -> list[tuple[str, torch.nn.Parameter, FixedPoint]]:
    """(name, parameter, storage format) for every parameter edge of the compiled model."""
    out = []
    for _, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            value = ir.VALUE.get(node)
            if node.op == "get_attr" and value is not None and value.forward is not None:
                out.append((node.target, gm.get_parameter(node.target), value.forward))
    return out


def fixed_point_optimizer(optimizer: torch.optim.Optimizer, qmodel: fx.GraphModule,
                          rounding: str | None = None) -> torch.optim.Optimizer:
    """Make ``optimizer`` store parameters in their weight/bias formats after every step.

    The parameters are rounded once now and after each ``optimizer.step()``.  ``rounding``
    overrides the formats' rounding for the update (``"stochastic"`` keeps updates smaller
    than half a step from being lost: since the old value is on the grid, rounding the new
    value stochastically rounds the update stochastically).  The store records each
    parameter's version counter, so the next forward's parameter casts pass the parameters
    through without reading them again; any in-place change made afterwards (``p.clamp_``,
    ``p.copy_``, ``load_state_dict``) is seen and checked, but writes through ``p.data`` or a
    NumPy view bypass the counter and are not: change parameters in place under
    ``torch.no_grad()`` instead.  A model compiled with ``loss_scale`` has its parameters'
    gradients divided by that scale before each step (once per ``step()``; clip or read them
    after the step, or divide them yourself).  Returns ``optimizer``::

        opt = fxc.fixed_point_optimizer(torch.optim.Adam(qmodel.parameters(), 1e-3), qmodel)
    """
    params = [(p, (fmt if rounding is None else fmt.replace(rounding=rounding)).spec())
              for _, p, fmt in parameter_formats(qmodel)]

    kernels.load()
    inplace = torch.ops.fxcompile.quantize_.default

    @torch.no_grad()
    def store(*_):
        for p, spec in params:
            if spec:
                inplace(p, spec, None)   # one pass over the parameter, no copy

    scale = ir.LOSS_SCALE.get(qmodel, 1.0)
    if scale != 1:
        optimizer.register_step_pre_hook(lambda *_: unscale_gradients(optimizer, scale))
    store()
    optimizer.register_step_post_hook(store)
    optimizer.fxc_parameter_formats = params
    return optimizer
