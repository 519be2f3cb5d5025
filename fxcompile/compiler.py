"""``compile``: the pass pipeline, and nothing else."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx

from .core.auto import Auto
from .errors import PolicyError
from .passes.calibrate import calibrate
from .passes.choose_formats import choose_formats
from .core.policy import Policy, warn_unused
from .frontend.expose_params import expose_params
from .frontend.functionalize import functionalize
from .frontend.roles import annotate_roles
from .frontend.shapes import propagate_shapes
from .frontend.trace import trace
from .passes import assign_formats, insert_casts
from .passes.elide_casts import elide_identity_casts

__all__ = ["compile", "LossGraph", "NamedLoss"]


class LossGraph(torch.nn.Module):
    """Wraps a loss function so it can be traced as a graph ``(prediction, target) -> loss``."""

    def __init__(self, loss_fn: Callable):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, prediction, target):
        return self.loss_fn(prediction, target)


class NamedLoss(torch.nn.Module):
    """``qmodel.loss(output)`` for a model that computes its own loss: its output named ``name``."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, prediction, target=None):
        return prediction[self.name]


def _front(model, *, loss_graph=False, leaf_modules=(), frontend="auto", example_inputs=None, loss_output=None):
    """Capture and annotate: trace, functionalise, expose parameters, shapes (with example inputs), roles."""
    gm = functionalize(trace(model, leaf_modules, frontend, example_inputs))
    gm = expose_params(gm)
    if example_inputs is not None:
        gm = propagate_shapes(gm, example_inputs)
    return annotate_roles(gm, loss_graph=loss_graph, loss_output=loss_output)


def compile(model: torch.nn.Module, policy: Policy | Auto | str | None = None, *,
            loss_fn: Callable | str | None = None, example_inputs: Sequence | dict | None = None,
            leaf_modules: Iterable = (), frontend: str = "auto",
            calibration_data: Iterable | None = None, elide_casts: bool = True) -> fx.GraphModule:
    """Return a trainable fixed-point GraphModule of ``model`` under ``policy``.

    The result shares parameters with ``model``.  With ``loss_fn`` the loss is compiled too
    and is ``qmodel.loss(prediction, target)``, so the loss value and its gradient are
    fixed-point edges as well::

        qmodel = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss())
        loss = qmodel.loss(qmodel(x), y); loss.backward()

    With ``policy=fxc.auto(...)`` the formats are chosen by the cost model from statistics of
    ``calibration_data`` (batches ``(x, y)``), forward and backward.

    ``frontend="auto"`` captures with torch.fx, else torch.export with a symbolic batch size
    (needs ``example_inputs``: a tuple, or a dict of keyword inputs such as ``input_ids`` and
    ``attention_mask``), else fx with the modules it cannot trace as leaves.  A model that
    computes its own loss names that output: ``loss_fn="loss"`` makes it the loss edge and
    ``qmodel.loss(output)`` returns it.  ``elide_casts`` turns
    casts whose forward provably changes nothing (after ReLU, max-pool, flatten) into forward
    identities; their gradients are still rounded.
    """
    auto = isinstance(policy, Auto)
    policy = policy if auto else Policy.coerce(policy)
    named = loss_fn if isinstance(loss_fn, str) else None
    gm = _front(model, leaf_modules=leaf_modules, frontend=frontend, example_inputs=example_inputs, loss_output=named)
    loss = _front(LossGraph(loss_fn), loss_graph=True, frontend="fx") if callable(loss_fn) else None
    graphs = [g for g in (gm, loss) if g is not None]
    if auto:
        if calibration_data is None:
            raise PolicyError("fxc.auto(...) chooses formats from calibration: pass calibration_data=[(x, y), ...] "
                              "(a few training batches) to compile")
        calibration_data = list(calibration_data)
        for g in graphs:
            g.meta["fxc_calibration_batches"] = len(calibration_data)
        gm = calibrate(gm, calibration_data, loss_graph=loss)
        gm = choose_formats(gm, policy, loss_graph=loss)
    else:
        for g in graphs:
            assign_formats(g, policy, warn_unused_overrides=False)
        # one warning over the model and loss graphs: an override may target either
        warn_unused(policy, [m for g in graphs for m in g.meta["fxc_override_matches"]])
    for g in graphs:
        insert_casts(g)
        if elide_casts:
            elide_identity_casts(g)
    gm.meta["fxc_policy"] = policy
    if loss is not None or named:
        if hasattr(gm, "loss"):
            raise ValueError("the model already has an attribute 'loss'; compile's loss graph needs that name")
        gm.add_module("loss", loss if loss is not None else NamedLoss(named))
    return gm
