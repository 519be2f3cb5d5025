"""The IR: the facts passes write on a ``torch.fx`` graph, and the helpers every layer shares.

fxcompile's intermediate representation is a ``torch.fx.GraphModule`` whose ``node.meta`` (and
``gm.meta``) carry what the passes found out.  Each fact has one :class:`Key` here, with its
type, the pass that provides it and a typed accessor, so a reader finds every key in one
place and a pass that runs too early fails with a message naming the pass it needs::

    >>> from fxcompile.core import ir
    >>> ir.ROLE.set(node, "activation")
    >>> ir.ROLE.get(node)
    'activation'
    >>> ir.VALUE.of(node)        # KeyError naming the pass that writes it, if it has not run
    Edge(...)

Passes declare what they require and provide as tuples of keys (:class:`Contract`);
``fxc.compile(..., check_contracts=True)`` checks them between passes.  Also here: the
compiled model's graphs (:func:`graphs`), the get-attr helper (:func:`fetch`), the
parameter roles, and the rule for reading a stored parameter (:func:`stored_format`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

import torch.fx as fx

from .formats import FixedPoint

__all__ = ["Key", "Contract", "check_contract", "OP", "MODULE", "FRONTEND_REASON", "LEAVES", "ROLE", "VALUE", "USES", "EDGE", "STATS", "NOISE",
           "ELIDED", "BACKWARD_ELIDED", "FRONTEND", "POLICY", "SOLUTION", "OVERRIDE_MATCHES", "CLIP_GRADIENT",
           "PREDICTION_GRADIENT",
           "CALIBRATION_BATCHES", "LOSS_SCALE", "KEYS", "NODE_KEYS", "GRAPH_KEYS", "PARAMETER_ROLES", "graphs", "fetch", "stored_format"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Key(Generic[T]):
    """One fact in ``node.meta`` or ``gm.meta``: its string key, what it holds, who writes it."""

    name: str
    holds: str
    provided_by: str
    scope: str = "node"  # "node": node.meta; "graph": gm.meta

    def has(self, holder: fx.Node | fx.GraphModule) -> bool:
        return self.name in holder.meta

    def get(self, holder: fx.Node | fx.GraphModule, default: Any = None) -> T | Any:
        return holder.meta.get(self.name, default)

    def of(self, holder: fx.Node | fx.GraphModule) -> T:
        """The fact, which must be there (``KeyError`` naming the pass that provides it)."""
        try:
            return holder.meta[self.name]
        except KeyError:
            where = f"node {holder.name!r}" if isinstance(holder, fx.Node) else "the graph"
            raise KeyError(f"{where} has no {self.name!r} ({self.holds}): run {self.provided_by} first") from None

    def set(self, holder: fx.Node | fx.GraphModule, value: T) -> None:
        holder.meta[self.name] = value


# ---- the keys, in the order the pipeline writes them -------------------------------------
# (scope "node": node.meta; "graph": gm.meta)
FRONTEND: Key[str] = Key("fxc_frontend", "the front-end that captured the graph", "frontend.trace", "graph")
FRONTEND_REASON: Key[str] = Key("fxc_frontend_reason", "why that front-end captured it", "frontend.trace", "graph")
LEAVES: Key[list] = Key("fxc_leaves", "modules the leaf fallback kept opaque", "frontend.trace", "graph")
MODULE: Key[str] = Key("fxc_module", "the path of the module a node came from", "frontend.expose_params")
OP: Key[str] = Key("fxc_op", "the op name a policy override matches", "frontend.roles.annotate_roles")
ROLE: Key[str | None] = Key("fxc_role", "why the value exists: input, activation, weight, bias, loss or None",
                            "frontend.roles.annotate_roles")
CALIBRATION_BATCHES: Key[int] = Key("fxc_calibration_batches", "how many batches calibrated the graph",
                                    "compiler.compile", "graph")
STATS: Key[Any] = Key("fxc_stats", "NodeStats of values and gradients", "passes.calibrate.calibrate")
VALUE: Key[Any] = Key("fxc_value", "the value's Edge as its producer emits it (consumer '*')",
                      "passes.assign.assign_formats or passes.choose_formats")
USES: Key[dict] = Key("fxc_uses", "consumer name -> the Edge of that use", "passes.assign.assign_formats")
OVERRIDE_MATCHES: Key[list] = Key("fxc_override_matches", "(names, op) pairs a policy override could match",
                                  "passes.assign.assign_formats", "graph")
NOISE: Key[dict] = Key("fxc_noise", "predicted noise-to-signal of the chosen formats",
                       "passes.choose_formats.choose_formats")
SOLUTION: Key[Any] = Key("fxc_solution", "the cost model's Solution", "passes.choose_formats", "graph")
CLIP_GRADIENT: Key[bool] = Key("fxc_clip_gradient", "whether casts zero the gradient where they saturated",
                               "passes.assign.assign_formats or passes.choose_formats", "graph")
PREDICTION_GRADIENT: Key[str | None] = Key(
    "fxc_prediction_gradient", "None, or 'inward': the casts of the prediction a loss consumes zero only the "
    "gradient that pushes a saturated value further out", "passes.assign.assign_formats or passes.choose_formats",
    "graph")
EDGE: Key[Any] = Key("fxc_edge", "the Edge a cast node sits on", "passes.casts.insert_casts")
ELIDED: Key[bool] = Key("fxc_elided", "the cast's forward is provably the identity",
                        "passes.elide_casts.elide_identity_casts")
BACKWARD_ELIDED: Key[bool] = Key("fxc_backward_elided", "the cast's gradient arrives on its grid",
                                 "passes.elide_casts.elide_identity_casts")
POLICY: Key[Any] = Key("fxc_policy", "the Policy or Auto the model was compiled under", "compiler.compile", "graph")
LOSS_SCALE: Key[float] = Key("fxc_loss_scale", "the power of two the loss's gradient is multiplied by",
                             "passes.loss_scale.scale_loss_gradient", "graph")

KEYS = (FRONTEND, FRONTEND_REASON, LEAVES, MODULE, OP, ROLE, CALIBRATION_BATCHES, STATS, VALUE, USES, OVERRIDE_MATCHES, NOISE, SOLUTION,
        CLIP_GRADIENT, PREDICTION_GRADIENT, EDGE, ELIDED, BACKWARD_ELIDED, POLICY, LOSS_SCALE)
NODE_KEYS = tuple(k for k in KEYS if k.scope == "node")
GRAPH_KEYS = tuple(k for k in KEYS if k.scope == "graph")


# ---- pass contracts ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Contract:
    """What a pass needs on some node (or the graph) before it runs, and what it writes.

    ``requires`` and ``provides`` hold node keys; ``graph_requires``/``graph_provides`` hold
    ``gm.meta`` keys.  A node key is satisfied when at least one node carries it."""

    requires: tuple[Key, ...] = ()
    provides: tuple[Key, ...] = ()
    graph_requires: tuple[Key, ...] = ()
    graph_provides: tuple[Key, ...] = ()


def _missing(gm: fx.GraphModule, node_keys, graph_keys) -> list[str]:
    missing = [k.name for k in graph_keys if not k.has(gm)]
    missing += [k.name for k in node_keys if not any(k.has(n) for n in gm.graph.nodes)]
    return missing


def check_contract(gm: fx.GraphModule, name: str, contract: Contract, when: str) -> None:
    """Raise ``RuntimeError`` if ``gm`` lacks what ``contract`` requires (``when="before"``) or
    provides (``when="after"``) for the pass ``name``."""
    if when == "before":
        missing = _missing(gm, contract.requires, contract.graph_requires)
    else:
        missing = _missing(gm, contract.provides, contract.graph_provides)
    if missing:
        verb = "requires" if when == "before" else "promises"
        raise RuntimeError(f"pass {name} {verb} {', '.join(missing)} on the graph, which "
                           f"{'is not there: an earlier pass is missing' if when == 'before' else 'it did not write'}")


# ---- shared helpers ----------------------------------------------------------------------
PARAMETER_ROLES = ("weight", "bias")


def graphs(qmodel: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The compiled graphs: the model's, and the loss graph's when there is one (name prefix, graph)."""
    out = [("", qmodel)]
    if isinstance(getattr(qmodel, "loss", None), fx.GraphModule):
        out.append(("loss.", qmodel.loss))
    return out


def fetch(gm: fx.GraphModule, target: str):
    """The object a ``get_attr`` target names (a parameter, buffer or submodule)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def stored_format(fmt: FixedPoint | None) -> FixedPoint | None:
    """The format a *stored* parameter is read in.

    A parameter trained by ``fxc.fixed_point_optimizer`` already lies on its format's grid,
    where every rounding agrees; the format's rounding applies to the update, not to reads.
    Stochastic rounding has no deterministic meaning for a read, so ``nearest`` stands in."""
    if fmt is not None and fmt.rounding == "stochastic":
        return fmt.replace(rounding="nearest")
    return fmt
