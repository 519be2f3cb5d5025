"""``compile``: the pass pipeline, and nothing else."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx

from .core import ir
from .core.auto import Auto
from .core.policy import Policy, warn_unused
from .errors import PolicyError
from .frontend import roles
from .frontend.expose_params import expose_params
from .frontend.functionalize import functionalize
from .frontend.gelu import tanh_gelu
from .frontend.roles import annotate_roles
from .frontend.shapes import propagate_shapes
from .frontend.trace import CONTRACT as TRACE_CONTRACT
from .frontend.trace import trace
from .passes import assign, averages, calibrate as calibration, casts, choose_formats as cost_model, elide_casts as elision
from .passes import accumulators, batch_norms, definitions, masks, products
from .passes import lookup_tables as tables
from .passes import loss_scale as loss_scaling
from .passes.assign import assign_formats
from .passes.accumulators import exact_accumulators
from .passes.averages import fixed_point_averages
from .passes.batch_norms import fixed_point_batch_norms
from .passes.calibrate import calibrate
from .passes.casts import insert_casts
from .passes.choose_formats import choose_formats
from .passes.definitions import fixed_point_definitions
from .passes.elide_casts import elide_identity_casts
from .passes.products import fixed_point_products
from .passes.lookup_tables import lookup_tables
from .passes.loss_scale import scale_loss_gradient
from .runtime.loss_scale import scale_gradient

__all__ = ["compile", "LossGraph", "NamedLoss"]


class LossGraph(torch.nn.Module):
    """Wraps a loss function so it can be traced as a graph ``(prediction, target) -> loss``."""

    def __init__(self, loss_fn: Callable):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, prediction, target):
        return self.loss_fn(prediction, target)


def _checked(fn: Callable, contract: ir.Contract, enabled: bool) -> Callable:
    """``fn`` (a pass ``gm -> gm``) with its contract checked before and after it, if ``enabled``."""
    if not enabled:
        return fn

    def run(gm, *args, **kwargs):
        ir.check_contract(gm, fn.__name__, contract, "before")
        out = fn(gm, *args, **kwargs)
        ir.check_contract(out, fn.__name__, contract, "after")
        return out
    return run


class NamedLoss(torch.nn.Module):
    """``qmodel.loss(output)`` for a model that computes its own loss: its output named ``name``."""

    def __init__(self, name: str, scale: float = 1.0):
        super().__init__()
        self.name, self.scale = name, scale

    def forward(self, prediction, target=None):
        return scale_gradient(prediction[self.name], self.scale)


def _front(model, *, loss_graph=False, leaf_modules=(), frontend="auto", example_inputs=None, loss_output=None,
           check=False):
    """Capture and annotate: trace, functionalise, expose parameters, shapes (with example inputs), roles."""
    gm = trace(model, leaf_modules, frontend, example_inputs)
    if check:
        ir.check_contract(gm, "trace", TRACE_CONTRACT, "after")
    gm = functionalize(gm)
    gm = tanh_gelu(gm)  # GPT-2's gelu_new written out: one F.gelu call (a lookup table)
    gm = expose_params(gm)
    if example_inputs is not None:
        gm = propagate_shapes(gm, example_inputs)
    return _checked(annotate_roles, roles.CONTRACT, check)(gm, loss_graph=loss_graph, loss_output=loss_output)


def compile(model: torch.nn.Module, policy: Policy | Auto | str | None = None, *,
            loss_fn: Callable | str | None = None, example_inputs: Sequence | dict | None = None,
            leaf_modules: Iterable = (), frontend: str = "auto",
            calibration_data: Iterable | None = None, elide_casts: bool = True, loss_scale: float = 1,
            fold_batch_norm: bool = False, check_contracts: bool = False) -> fx.GraphModule:
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
    ``qmodel.loss(output)`` returns it.  ``loss_scale`` (a power of two, default 1) multiplies
    the loss's gradient before the backward casts round it, so small gradients are not flushed
    to zero; ``fxc.fixed_point_optimizer`` divides the parameters' gradients by it before each
    step (:mod:`fxcompile.passes.loss_scale`).  Every batch norm deploys as its own fixed-point
    affine map, which the simulation's eval forward runs too (:mod:`fxcompile.passes.batch_norms`);
    ``fold_batch_norm=True`` folds those right after a conv/linear into it at export instead
    (one op fewer, but a few output codes may differ from the simulation).  Convs and linear
layers whose sums float32 cannot hold run their exact sum in float64 whenever no gradient is
needed (inference, export verification) and the float32 op when one is (training's forward,
as fast as before): :mod:`fxcompile.passes.accumulators`.  ``elide_casts`` turns
    casts whose forward provably changes nothing (after ReLU, max-pool, flatten) into forward
    identities; their gradients are still rounded.  ``check_contracts`` (for pass authors)
    checks between passes that each finds the node.meta facts it requires and writes those
    it promises (:class:`fxcompile.core.ir.Contract`).
    """
    check = check_contracts
    auto = isinstance(policy, Auto)
    policy = policy if auto else Policy.coerce(policy)
    named = loss_fn if isinstance(loss_fn, str) else None
    gm = _front(model, leaf_modules=leaf_modules, frontend=frontend, example_inputs=example_inputs, loss_output=named,
                check=check)
    loss = _front(LossGraph(loss_fn), loss_graph=True, frontend="fx", check=check) if callable(loss_fn) else None
    graphs = [g for g in (gm, loss) if g is not None]
    if loss_scale != 1 and (auto or loss_fn is None):
        raise PolicyError("loss_scale needs a loss (loss_fn=...) and a policy with fixed gradient formats; fxc.auto "
                          "already chooses each gradient's fractional bits from its calibrated values"
                          if auto else "loss_scale scales the loss's gradient: pass loss_fn=... to compile the loss")
    if auto:
        if calibration_data is None:
            raise PolicyError("fxc.auto(...) chooses formats from calibration: pass calibration_data=[(x, y), ...] "
                              "(a few training batches) to compile")
        calibration_data = list(calibration_data)
        for g in graphs:
            ir.CALIBRATION_BATCHES.set(g, len(calibration_data))
        gm = _checked(calibrate, calibration.CONTRACT, check)(gm, calibration_data, loss_graph=loss)
        gm = _checked(choose_formats, cost_model.CONTRACT, check)(gm, policy, loss_graph=loss)
    else:
        for g in graphs:
            _checked(assign_formats, assign.CONTRACT, check)(g, policy, warn_unused_overrides=False)
        # one warning over the model and loss graphs: an override may target either
        warn_unused(policy, [m for g in graphs for m in ir.OVERRIDE_MATCHES.of(g)])
    for g in graphs:
        _checked(insert_casts, casts.CONTRACT, check)(g)
        if elide_casts:
            _checked(elide_identity_casts, elision.CONTRACT, check)(g)
        _checked(fixed_point_averages, averages.CONTRACT, check)(g)
        _checked(lookup_tables, tables.CONTRACT, check)(g)
        _checked(fixed_point_definitions, definitions.CONTRACT, check)(g)
        _checked(fixed_point_products, products.CONTRACT, check)(g)
        _checked(masks.attention_masks, masks.CONTRACT, check)(g)
        _checked(fixed_point_batch_norms, batch_norms.CONTRACT, check)(g, fold=fold_batch_norm)
        _checked(exact_accumulators, accumulators.CONTRACT, check)(g)
    gm = _checked(scale_loss_gradient, loss_scaling.CONTRACT, check)(gm, loss_scale, loss_graph=loss)
    ir.POLICY.set(gm, policy)
    if loss is not None or named:
        if hasattr(gm, "loss"):
            raise ValueError("the model already has an attribute 'loss'; compile's loss graph needs that name")
        gm.add_module("loss", loss if loss is not None else NamedLoss(named, ir.LOSS_SCALE.of(gm)))
    return gm
