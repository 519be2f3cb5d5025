"""Formats that follow training: re-assignment of the casts' binary points on a schedule.

``fxc.auto`` chooses formats once, on the untrained model; as training moves values and
gradients, a format chosen then saturates or flushes.  A :class:`FormatSchedule` moves the
binary points of the compiled model's casts while it trains, in place (no retrace), in the
manner of dynamic fixed point (Courbariaux, Bengio & David 2014) and Flexpoint (Koster et
al. 2017):

* **observe**: one training step in ``observe_every``, hooks on every cast record the
  largest |x| of the value arriving at it and of the gradient arriving at its output, and a
  strided sample of at most ``sample`` of its elements (no host synchronisation until the
  step ends);
* **predict**: each slot (a cast's forward or backward format) keeps its last ``window``
  observations; the maxima's growth per observation (a least-squares slope of their log2,
  counted only when positive) is extrapolated to the next scheduled re-assignment, and the
  cost of a binary point is the rounding-plus-saturation noise-to-signal of the window's
  samples (their log2 histogram, :class:`~fxcompile.passes.calibrate.TensorStats`, as
  calibration builds it) shifted by that growth, averaged over ``headroom`` further octaves of growth
  (so a format moves before its values saturate);
* **re-assign** every ``every`` steps, and after an observation whose saturation rate
  exceeds ``saturation`` or whose underflow rate (nonzero values flushed to zero) exceeds
  ``underflow`` on some slot.  ``rechoose=False`` moves each of the current formats (the set
  of slots sharing one format moves together, to the binary point minimising their summed
  cost, never onto another format of the same width); ``rechoose=True`` re-runs the
  solver (:func:`fxcompile.passes.choose_formats.solve`) over every slot, so slots may change
  format.  Widths never change.  Either way the model never holds more than ``max_formats``
  distinct (bits, frac) formats (default: the ``fxc.auto`` policy's, else as many as the
  model has at the start).

Slots that must keep one binary point are moved as one: a use's forward and its value's, an
elided cast and its source, the inputs of one adder, the per-use gradients of a fan-out.
The casts around a fixed-point definition whose format is an argument of its node (a
product, a batch norm, an average, a matmul, a softmax) keep their forward formats; convs,
linear layers and lookup tables follow (their passes run again after each move).  Moving a
stored parameter's format rounds the parameter to it (nearest) and changes the format
:func:`fxcompile.fixed_point_optimizer` stores updates in.  Every cast's ``node.meta`` edge
and the graph's assignment follow, so ``export_onnx`` and ``to_hls4ml`` deploy the final
formats::

    sched = FormatSchedule(qmodel, Reassign(every=200), optimizer=opt)
    for step, (x, y) in enumerate(batches, 1):
        sched.before_step(step)
        opt.zero_grad(); qmodel.loss(qmodel(x), y).backward(); opt.step()
        sched.after_step(step)

:meth:`FormatSchedule.state_dict` holds the formats, the histories and the counters, so a
run resumed from a checkpoint continues bit-identically (``fxcompile.training.train`` does
this with ``TrainConfig(reassign=...)``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque

import numpy as np
import torch
import torch.fx as fx

from ..core import ir, ops
from ..core.auto import Auto
from ..errors import PolicyError
from ..passes.accumulators import FLOAT_LAYERS, exact_accumulators
from ..passes.calibrate import TensorStats
from ..passes.casts import Cast
from ..passes.choose_formats import solve
from ..passes.lookup_tables import lookup_tables
from ..runtime.cast import quantize

__all__ = ["Reassign", "FormatSchedule", "distinct_formats", "cast_formats", "apply_formats"]

_BIG = 1e18          # cost of a binary point a slot may not take (the solver's convention)
_MAX_GROWTH = 8      # octaves of predicted growth at most
_MAX_GRADIENT_FLUSH = 0.25   # as passes.choose_formats: beyond this, training likely stalls


@dataclasses.dataclass(frozen=True)
class Reassign:
    """When and how formats move during training (see the module docstring).

    ``every``: re-assign every N optimizer steps (0: only when a threshold fires).
    ``observe_every``: record ranges one step in M (default ``max(1, every // 8)``, or 10).
    ``window``: observations a prediction reads.  ``headroom``: octaves of growth beyond
    the predicted one that the chosen binary point is also scored for.  ``saturation`` /
    ``underflow``: re-assign after an observation where some slot's saturation / underflow
    rate exceeds this fraction (``None``: off).  ``rechoose``: re-run the solver instead of
    moving the current formats.  ``max_formats``: the bound on distinct formats (default: the
    policy's).  ``sample``: elements per tensor the histogram reads.
    """

    every: int = 0
    observe_every: int | None = None
    window: int = 8
    headroom: int = 1
    saturation: float | None = None
    underflow: float | None = None
    rechoose: bool = False
    max_formats: int | None = None
    sample: int = 4096

    def __post_init__(self):
        def positive(name, value, zero=False):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
                raise PolicyError(f"reassign: {name} must be an int >= {0 if zero else 1}, got {value!r}")
        positive("every", self.every, zero=True)
        if self.observe_every is not None:
            positive("observe_every", self.observe_every)
        positive("window", self.window)
        positive("headroom", self.headroom, zero=True)
        positive("sample", self.sample)
        if self.max_formats is not None:
            positive("max_formats", self.max_formats)
        for name in ("saturation", "underflow"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
                raise PolicyError(f"reassign: {name} must be None or a fraction in [0, 1), got {v!r}")
        if not self.every and self.saturation is None and self.underflow is None:
            raise PolicyError("reassign: nothing would trigger a re-assignment; give every=N steps, or a "
                              "saturation or underflow threshold")

    @property
    def observe(self) -> int:
        if self.observe_every is not None:
            return self.observe_every
        return max(1, self.every // 8) if self.every else 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- the model's casts as slots --------------------------------------------------------------

def _cast_nodes(qmodel: fx.GraphModule):
    """(qualified name, graph, node, Cast) of every cast of the compiled graphs."""
    for prefix, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            if node.op == "call_module" and ir.EDGE.has(node):
                mod = gm.get_submodule(node.target)
                if isinstance(mod, Cast):
                    yield prefix + node.target, gm, node, mod


def cast_formats(qmodel: fx.GraphModule) -> dict[str, tuple]:
    """``{qualified cast name: (forward format, backward format)}`` of the casts as they are now."""
    return {name: (c.edge.forward, c.edge.backward) for name, _, _, c in _cast_nodes(qmodel)}


def distinct_formats(qmodel: fx.GraphModule) -> set[tuple[int, int]]:
    """Distinct (bits, frac) formats the casts hold, forward and backward."""
    return {(f.bits, f.frac) for fwd, bwd in cast_formats(qmodel).values() for f in (fwd, bwd) if f is not None}


class _Union:
    def __init__(self):
        self.parent = {}

    def add(self, k):
        self.parent.setdefault(k, k)

    def find(self, k):
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def join(self, a, b):
        if a in self.parent and b in self.parent:
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)


def _is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and ir.EDGE.has(node)


def _baked(node: fx.Node) -> bool:
    """A fixed-point definition whose node holds a format that no pass brings up to date."""
    t = node.target
    return (node.op == "call_function" and getattr(t, "__module__", None) == ops.__name__
            and getattr(t, "__name__", "").startswith("fixed_point_") and t not in FLOAT_LAYERS)


# ---- the schedule ------------------------------------------------------------------------------

class FormatSchedule:
    """Moves the formats of ``qmodel``'s casts during training under a :class:`Reassign` config."""

    def __init__(self, qmodel: fx.GraphModule, config: Reassign, optimizer: torch.optim.Optimizer | None = None):
        if not isinstance(qmodel, fx.GraphModule) or not any(True for _ in _cast_nodes(qmodel)):
            raise PolicyError("reassign: the model has no fixed-point casts; compile it with a fixed-point policy "
                              "(fxc.compile) before scheduling its formats")
        self.qmodel, self.config, self.optimizer = qmodel, config, optimizer
        policy = ir.POLICY.get(qmodel)
        self.fracs = tuple(policy.fracs) if isinstance(policy, Auto) else (-16, 48)
        self.max_formats = config.max_formats or (policy.max_formats if isinstance(policy, Auto) else None) \
            or len(distinct_formats(qmodel))
        if len(distinct_formats(qmodel)) > self.max_formats:
            raise PolicyError(f"reassign: the model holds {len(distinct_formats(qmodel))} distinct formats, more "
                              f"than max_formats={self.max_formats}")
        self._casts = {name: (gm, node, c) for name, gm, node, c in _cast_nodes(qmodel)}
        from ..reports.inspect import assignment
        self.initial_assignment = assignment(qmodel).to_json()   # what compile chose (export chooses it again)
        self._components()
        self.history = {slot: deque(maxlen=config.window) for slot in self.slots}
        self.reassignments = 0     # how many re-assignments ran
        self.moves = 0             # how many slot formats they changed
        self.log: list[dict] = []  # one entry per re-assignment: step, reason, formats
        self._pending: dict | None = None
        self._warned = False
        self._handles: list = []

    # -- structure
    def _components(self) -> None:
        u = _Union()
        self.slots = []
        for name, (gm, node, c) in self._casts.items():
            for way, fmt in (("fwd", c.edge.forward), ("bwd", c.edge.backward)):
                if fmt is not None:
                    u.add((name, way))
                    self.slots.append((name, way))
        cast_of = {id(node): name for name, (gm, node, c) in self._casts.items()}
        pinned = set()
        for name, (gm, node, c) in self._casts.items():
            src = node.args[0] if node.args else None
            if c.edge.consumer != "*" and _is_cast(src) and id(src) in cast_of:
                # a use reads its value's cast: one forward format
                if self._casts[cast_of[id(src)]][2].edge.forward == c.edge.forward:
                    u.join((name, "fwd"), (cast_of[id(src)], "fwd"))
            if ir.ELIDED.get(node) and isinstance(src, fx.Node) and src.args and _is_cast(src.args[0]):
                s = cast_of[id(src.args[0])]
                u.join((name, "fwd"), (s, "fwd"))
                u.join((name, "bwd"), (s, "bwd"))
            if ir.BACKWARD_ELIDED.get(node) and len(node.users) == 1:
                (op,) = node.users
                for consumer in op.users:
                    if _is_cast(consumer) and id(consumer) in cast_of:
                        u.join((name, "bwd"), (cast_of[id(consumer)], "bwd"))
        for prefix, gm in ir.graphs(self.qmodel):
            for node in gm.graph.nodes:
                op = ops.op_of(gm, node) if node.op in ("call_function", "call_method", "call_module") else None
                ins = [cast_of[id(a)] for a in node.all_input_nodes if _is_cast(a) and id(a) in cast_of]
                if op is not None and op.group == "adder" and not _is_cast(node):
                    for a, b in zip(ins, ins[1:]):
                        u.join((a, "fwd"), (b, "fwd"))
                if _baked(node):
                    pinned.update((a, "fwd") for a in ins)
                    pinned.update((cast_of[id(n)], "fwd") for n in node.users if _is_cast(n) and id(n) in cast_of)
                if _is_cast(node) and ir.EDGE.of(node).consumer == "*":
                    uses = [cast_of[id(n)] for n in node.users if _is_cast(n) and id(n) in cast_of]
                    for a, b in zip(uses, uses[1:]):   # per-use gradients summed at a fan-out
                        u.join((a, "bwd"), (b, "bwd"))
        groups: dict = {}
        for slot in self.slots:
            groups.setdefault(u.find(slot), []).append(slot)
        self.components = list(groups.values())
        self.pinned = [any(s in pinned for s in comp) for comp in self.components]

    def _format(self, slot):
        edge = self._casts[slot[0]][2].edge
        return edge.forward if slot[1] == "fwd" else edge.backward

    # -- observation
    def observing(self, step: int) -> bool:
        return step % self.config.observe == 0

    def before_step(self, step: int) -> None:
        """Call before training step ``step`` (1-based, counted over the whole run)."""
        if not self.observing(step):
            return
        self._pending = {}
        for name, (gm, node, c) in self._casts.items():
            # a direction the cast passes through (an elided cast, a use's forward) sees values
            # already rounded and clipped upstream: the cast it is tied to sees the true range
            fwd = (name, "fwd") if c.edge.forward is not None and c._fwd else None
            bwd = (name, "bwd") if c.edge.backward is not None and c._bwd else None
            if fwd is None and bwd is None:
                continue
            self._handles.append(c.register_forward_hook(self._hook(fwd, bwd)))

    def _hook(self, fwd, bwd):
        def hook(module, args, out):
            x = args[0] if args else None
            if fwd is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
                self._record(fwd, x)
            if bwd is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                self._handles.append(out.register_hook(lambda g: self._record(bwd, g)))
        return hook

    @torch.no_grad()
    def _record(self, slot, t: torch.Tensor) -> None:
        # a few tensor ops and no host synchronisation: the histogram is built at re-assignment
        a = t.detach().abs().flatten()
        if not a.numel():
            return
        stride = -(-a.numel() // self.config.sample)
        self._pending.setdefault(slot, []).append((a.max(), a[::stride].float().contiguous()))

    def after_step(self, step: int) -> bool:
        """Call after the optimizer step of step ``step``; re-assigns when due.  True if it did."""
        reason = None
        if self._pending is not None:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            observed = {}
            for slot, seen in self._pending.items():
                peaks = torch.stack([p for p, _ in seen]).float().tolist()
                peak = max((p for p in peaks if math.isfinite(p)), default=0.0)
                observed[slot] = (peak, torch.cat([x for _, x in seen]))
                self.history[slot].append(observed[slot])
            reason = self._threshold(observed) if self.config.saturation is not None or \
                self.config.underflow is not None else None
            self._pending = None
        if self.config.every and step % self.config.every == 0:
            reason = reason or "schedule"
        if reason is None:
            return False
        self.reassign(step, reason)
        return True

    def _threshold(self, observed: dict) -> str | None:
        """Why the observed step calls for a re-assignment (telemetry's definitions, on the sample):
        saturation = values beyond the format's range; underflow = nonzero values that round to 0."""
        sat, under = self.config.saturation, self.config.underflow
        for slot, (_, x) in observed.items():
            fmt = ir.stored_format(self._format(slot))
            if sat is not None and x.numel():
                rate = float((x > fmt.max_value).float().mean())
                if rate > sat:
                    return f"saturation on {slot[0]} ({slot[1]}): {100 * rate:.2f} %"
            nonzero = x[x > 0]
            if under is not None and nonzero.numel():
                rate = float((nonzero < 2.0 ** (-fmt.frac - 1)).float().mean())
                if rate > under:
                    return f"underflow on {slot[0]} ({slot[1]}): {100 * rate:.2f} %"
        return None

    # -- prediction and choice
    def _growth(self, slot) -> float:
        """Octaves the slot's maxima are predicted to grow by the next scheduled re-assignment."""
        peaks = [p for p, _ in self.history[slot] if p > 0]
        if len(peaks) < 3:
            return 0.0
        y = np.log2(peaks)
        x = np.arange(len(y), dtype=np.float64)
        slope = float(np.polyfit(x, y, 1)[0])
        horizon = max(self.config.every, self.config.observe) / self.config.observe
        return min(max(slope, 0.0) * horizon, _MAX_GROWTH)

    def _cost(self, slot, bits: int, fracs: np.ndarray) -> np.ndarray | None:
        window = list(self.history[slot])
        if not window:
            return None
        stats = TensorStats().update(torch.cat([x for _, x in window]))
        stats.max_abs = max(stats.max_abs, max(p for p, _ in window))
        signal = float(stats.hist_sq.sum())
        if signal <= 0:
            return None
        fmt = self._format(slot)
        rounding = "nearest" if slot[1] == "fwd" and ir.stored_format(fmt) is not fmt else fmt.rounding
        rounding = rounding if rounding in ("nearest", "stochastic") else "nearest"
        lo = math.ceil(self._growth(slot))
        drifts = range(lo, lo + self.config.headroom + 1)
        wide = np.arange(fracs[0], fracs[-1] + drifts[-1] + 1)
        table = stats.squared_errors(bits, wide, rounding) / signal
        return np.mean([table[d: d + len(fracs)] for d in drifts], axis=0)

    def reassign(self, step: int = 0, reason: str = "requested") -> dict:
        """Choose and apply new binary points now; returns ``{slot: (old, new)}`` of those that moved."""
        fracs = np.arange(self.fracs[0], self.fracs[1] + 1)
        current = [(self._format(c[0]).bits, self._format(c[0]).frac) for c in self.components]
        widths = sorted({b for b, _ in current})
        cand = [(w, int(f)) for w in widths for f in fracs]
        cand += sorted(set(current) - set(cand))   # a format outside the range keeps its place
        cand_widths = np.array([w for w, _ in cand])
        cost = np.full((len(self.components), len(cand)), _BIG)
        for ci, comp in enumerate(self.components):
            bits, frac = current[ci]
            if self.pinned[ci] or not self.fracs[0] <= frac <= self.fracs[1]:
                cost[ci, cand.index((bits, frac))] = 0.0
                continue
            row = np.zeros(len(fracs))
            for slot in comp:
                c = self._cost(slot, bits, fracs)
                if c is not None:
                    row += c
            cost[ci, [cand.index((bits, int(f))) for f in fracs]] = row
        if self.config.rechoose:
            _, assign, _, _, _ = solve(cost, self.max_formats, cand_widths)
            new = [cand[j] for j in assign]
        else:
            new = self._move(cost, cand, current)
        moved = self._apply(new)
        self._warn_if_flushing()
        self.reassignments += 1
        self.moves += len(moved)
        self.log.append({"step": step, "reason": reason, "moved": len(moved),
                         "formats": sorted(f"{b}.{f}" for b, f in distinct_formats(self.qmodel))})
        return moved

    def _warn_if_flushing(self) -> None:
        """Warn (once) when, after a re-assignment, the formats still round most of an activation
        gradient to zero on the last observation: then K formats cannot hold the model's ranges."""
        if self._warned:
            return
        worst = []
        for (name, way), h in self.history.items():
            edge = self._casts[name][2].edge
            if way != "bwd" or edge.backward_role != "gradient" or edge.backward.rounding != "nearest" or not h:
                continue
            x = h[-1][1]
            nonzero = x[x > 0]
            if nonzero.numel():
                rate = float((nonzero < 2.0 ** (-edge.backward.frac - 1)).float().mean())
                if rate > _MAX_GRADIENT_FLUSH:
                    worst.append((rate, f"{edge.backward} flushes {100 * rate:.0f} % of the gradient at {name}"))
        if worst:
            self._warned = True
            text = "; ".join(t for _, t in sorted(worst, reverse=True)[:3])
            warnings.warn(f"reassign (max_formats={self.max_formats}): after moving the formats, {text}: "
                          f"{self.max_formats} format(s) cannot hold both the values' and the gradients' ranges; "
                          "training will likely stall — allow more formats, more gradient bits, or "
                          "gradient_rounding='stochastic'", UserWarning, stacklevel=3)

    def _move(self, cost: np.ndarray, cand: list, current: list) -> list:
        """Each current format moves as one to its cheapest binary point not taken by another."""
        groups: dict = {}
        for ci, fmt in enumerate(current):
            groups.setdefault(fmt, []).append(ci)
        taken, new = set(), list(current)
        for fmt in sorted(groups, key=lambda f: -len(groups[f])):
            members = groups[fmt]
            cols = [j for j, c in enumerate(cand) if c[0] == fmt[0]]
            total = cost[np.ix_(members, cols)].sum(axis=0)
            order = np.argsort(total, kind="stable")
            choice = fmt
            for j in order:
                c = cand[cols[j]]
                if total[j] >= _BIG:
                    break
                if c not in taken:
                    choice = c
                    break
            taken.add(choice)
            for ci in members:
                new[ci] = choice
        return new

    def _apply(self, new: list) -> dict:
        target = {}
        for comp, (bits, frac) in zip(self.components, new):
            for slot in comp:
                fmt = self._format(slot)
                if fmt.frac != frac:
                    target[slot] = fmt.replace(frac=frac)
        return self.set_formats(target)

    @torch.no_grad()
    def set_formats(self, target: dict) -> dict:
        """Give the slots ``{(cast name, "fwd" | "bwd"): FixedPoint}`` their formats in place:
        casts, node.meta edges, stored parameters and the optimizer's storage formats, and the
        layers and tables that read a cast's format.  Returns ``{slot: (old, new)}``."""
        moved = {}
        changed_graphs = {}
        by_cast: dict = {}
        for (name, way), fmt in target.items():
            by_cast.setdefault(name, {})[way] = fmt
        producers = {}
        for name, changes in by_cast.items():
            gm, node, c = self._casts[name]
            edge = c.edge
            new_edge = dataclasses.replace(edge, forward=changes.get("fwd", edge.forward),
                                           backward=changes.get("bwd", edge.backward))
            if new_edge == edge:
                continue
            for way in changes:
                moved[(name, way)] = ((edge.forward, new_edge.forward) if way == "fwd"
                                      else (edge.backward, new_edge.backward))
            c.set_edge(new_edge)
            ir.EDGE.set(node, new_edge)
            changed_graphs[id(gm)] = gm
            producers.setdefault(id(gm), (gm, set()))[1].add(edge.producer)
            if edge.consumer == "*" and edge.role in ir.PARAMETER_ROLES and new_edge.forward != edge.forward:
                self._move_parameter(gm, node, edge.forward, new_edge.forward)
        for gm, names in producers.values():
            self._update_meta(gm, names)
        for gm in changed_graphs.values():
            exact_accumulators(gm)
            lookup_tables(gm)
        held = distinct_formats(self.qmodel)
        if len(held) > self.max_formats:  # the choice guarantees this; a broken invariant must not train on
            raise RuntimeError(f"reassign: the model now holds {len(held)} formats ({sorted(held)}), more than "
                               f"max_formats={self.max_formats}")
        return moved

    def _move_parameter(self, gm, node, old, new) -> None:
        p = node.args[0]
        if not (isinstance(p, fx.Node) and p.op == "get_attr"):
            return
        param = ir.fetch(gm, p.target)
        param.copy_(quantize(param.detach(), ir.stored_format(new).spec()))
        params = getattr(self.optimizer, "fxc_parameter_formats", None)
        if params is not None:
            for i, (q, spec) in enumerate(params):
                if q is param and spec:
                    params[i] = (q, [new.frac, *spec[1:]])

    def _update_meta(self, gm, names) -> None:
        """The producers' VALUE / USES edges follow their casts (what assignment() and the
        optimizer read)."""
        casts = {}
        for name, (g, node, c) in self._casts.items():
            if g is gm and c.edge.producer in names:
                casts[(c.edge.producer, c.edge.consumer)] = c.edge
        for node in gm.graph.nodes:
            if node.name not in names or not ir.VALUE.has(node):
                continue
            value = casts.get((node.name, "*"), ir.VALUE.of(node))
            ir.VALUE.set(node, value)
            uses = dict(ir.USES.get(node) or {})
            for user, edge in uses.items():
                own = casts.get((node.name, user))
                uses[user] = own if own is not None else dataclasses.replace(edge, forward=value.forward,
                                                                              backward=value.backward)
            ir.USES.set(node, uses)

    # -- checkpoints
    def state_dict(self) -> dict:
        """Formats, histories and counters, as plain data (checkpoints load it with weights_only)."""
        formats = {name: [c.edge.forward.frac if c.edge.forward is not None else None,
                          c.edge.backward.frac if c.edge.backward is not None else None]
                   for name, (_, _, c) in self._casts.items()}
        history = {f"{name}|{way}": {"peaks": [p for p, _ in h], "samples": [x.clone() for _, x in h]}
                   for (name, way), h in self.history.items()}
        return {"config": self.config.to_dict(), "formats": formats, "history": history,
                "reassignments": self.reassignments, "moves": self.moves, "log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            raise PolicyError(f"reassign: the saved schedule has settings {state['config']}, this one "
                              f"{self.config.to_dict()}")
        self.load_formats(state["formats"])
        for key, entries in state["history"].items():
            name, way = key.rsplit("|", 1)
            self.history[(name, way)] = deque(zip(entries["peaks"], entries["samples"]), maxlen=self.config.window)
        self.reassignments, self.moves, self.log = state["reassignments"], state["moves"], list(state["log"])

    def load_formats(self, formats: dict) -> dict:
        """Give the casts the binary points ``formats`` (``state_dict()["formats"]``)."""
        target = {}
        for name, fracs in formats.items():
            if name not in self._casts:
                raise PolicyError(f"reassign: the saved schedule has a cast {name!r} this model lacks")
            for way, frac in zip(("fwd", "bwd"), fracs):
                fmt = self._format((name, way)) if (name, way) in self.history else None
                if fmt is not None and frac is not None and fmt.frac != frac:
                    target[(name, way)] = fmt.replace(frac=frac)
        return self.set_formats(target)


def apply_formats(qmodel: fx.GraphModule, formats: dict, optimizer=None) -> dict:
    """Give a freshly compiled ``qmodel`` the formats a schedule ended a run with
    (``FormatSchedule.state_dict()["formats"]``), e.g. to export a saved run; returns the moves."""
    return FormatSchedule(qmodel, Reassign(every=1), optimizer).load_formats(formats)
