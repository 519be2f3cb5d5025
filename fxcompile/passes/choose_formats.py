"""Pass: choose every edge's forward and backward format with a cost model, under a budget
of at most K distinct (bits, frac) formats.  Writes the same ``node.meta["fxc_value"]`` /
``node.meta["fxc_uses"]`` as :func:`assign_formats`, so ``insert_casts`` follows unchanged.

**Decisions.**  One per value: its forward format (shared by all its uses, so a value is
rounded once) and its backward format (the *summed* gradient); plus, for a value with
several consumers, one per use for that use's gradient (each branch's gradient is rounded
before the sum).

**Constraints** (networkx): the inputs of one adder must share a binary point — the forward
values meeting in an ``add``/``sub``/``cat``/``stack``, and the per-use gradients summed at
a fan-out.  Decisions joined by such constraints form the connected components of a
"must share binary point" graph; each component is solved as one decision whose cost is
the sum of its members'.

**Objective** (minimised)::

    sum over decisions d:  w_d * NSR_d(bits_d, frac_d)  +  bits_cost * bits_d * elements_d / elements
    + format_cost * (number of distinct formats)

``NSR_d`` is the expected noise-to-signal ratio of rounding the calibrated values of d to
the format: :meth:`TensorStats.squared_error` (rounding noise ``step²/12``, values flushed
to zero, and saturation error ``(|x| - max)²``) over ``sum x²``, averaged over the values
drifting by ``0..margin`` octaves as training moves them (forward values grow, gradients
and the loss value shrink, the input data stays; calibration sees the untrained model; the
model's output, whose scale the loss sets, may grow ``output_margin`` octaves further).  ``w_d`` is 1
(``objective="nsr"``) or, with ``objective="reach"``, a sensitivity estimate from the graph:
1 + the number of values the error reaches (a forward value's error reaches everything
computed from it; a gradient's error reaches the gradients of everything it comes from,
so the gradient at the logits weighs more than the one at the first layer), or, with
``objective="sensitivity"``, the loss's measured sensitivity to the decision's relative error
(:func:`_sensitivity_weights`; drift then counts in both directions).  The multiplier width of every MAC and
the bits moved are reported by :func:`fxcompile.reports.profile.hardware_summary`.

**Solver.**  When each decision has one width (``bits`` fixed per role) and each cost is
unimodal in frac, a dynamic program over the sorted fracs is exact (1-D k-medians: a
decision takes the cheaper of the two chosen fracs around its own best frac), and a
knapsack over widths splits K between them.  Otherwise the DP (or a greedy start) is
refined by swap local search and the gap to a lower bound is reported; that search runs
for k = 1..K in turn, each starting from the k-1 solution and keeping only improvements, so
the objective never rises with K.  **Budgets** (``weight_memory_bits``, ``bops``,
``hls4ml_dsps``) constrain the widths the decisions take (:func:`hardware_budgets`); when the unconstrained choice
exceeds one, the same k = 1..K search runs with every candidate set's decisions moved to
narrower formats of the set until the budgets hold, and a budget no width can meet is
refused by name.  The solution,
with the objective for every K up to ``max_formats``, is ``gm.meta["fxc_solution"]``; its
``predicted`` is the chosen formats' objective at one drift for every width
(:data:`PREDICTION_DRIFT`), which ranks assignments of different widths and margins::

    >>> calibrate(gm, batches, loss_graph=lg)
    >>> choose_formats(gm, fxc.auto(max_formats=3), loss_graph=lg)
    >>> gm.meta["fxc_solution"].formats
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import math
import os
import sys
import types
import time
import warnings

import networkx as nx
import numpy as np
import torch.fx as fx

from ..core import ir, ops
from ..core.assignment import Edge
from ..core.auto import Auto
from ..errors import PolicyError
from ..core.formats import MAX_BITS, FixedPoint
from .assign import _shape, edge_roles

__all__ = ["CONTRACT", "choose_formats", "solve", "Solution", "Budget", "hardware_budgets", "must_share_graph",
           "dsp_estimator", "hls4ml_layer_dsps"]

CONTRACT = ir.Contract(requires=(ir.ROLE, ir.STATS), provides=(ir.VALUE, ir.USES, ir.NOISE),
                       graph_provides=(ir.SOLUTION, ir.CLIP_GRADIENT, ir.PREDICTION_GRADIENT))

_BIG = 1e18  # cost of a candidate a decision may not take (a width it is not allowed)
# Octaves of drift at which Solution.predicted scores the chosen formats, whatever margin chose
# them: the default margin depends on the width (4 octaves at 12 bits or more, 1 below), so
# objectives of assignments at different widths are averages over different drifts and do not
# rank them; training moves values as far whatever their width.  4 (the model's output 4
# more) is the default at 16 bits, the drift the seed CNN showed from untrained to trained.
PREDICTION_DRIFT = 4
EXHAUSTIVE_LIMIT = 5e7  # table entries the exact enumeration may read before the heuristic takes over


@dataclasses.dataclass
class _Decision:
    key: tuple               # (graph index, node name, slot); slot is "fwd", "bwd" or ("use", consumer)
    role: str
    widths: tuple
    stats: object            # TensorStats or None
    rounding: str
    weight: float = 1.0
    output: bool = False     # the model's output (the loss's prediction): see _mark_outputs


@dataclasses.dataclass
class Solution:
    """What the solver chose: the formats, the objective and how it compares."""

    formats: list[tuple[int, int]]
    objective: float
    baseline_objective: float      # one format per width, from the global max
    lower_bound: float             # the objective with no limit on formats
    exact: bool
    curve: dict[int, float]        # K -> best objective with at most K formats (exact solver only)
    solve_seconds: float
    decisions: int
    components: int
    usage: dict = dataclasses.field(default_factory=dict)   # budget name -> what the chosen widths use
    predicted: float | None = None  # the chosen formats' objective at the common drift (PREDICTION_DRIFT)

    @property
    def gap(self) -> float:
        """Relative gap to the lower bound (0 when the solution is exact for this K)."""
        if self.exact:
            return 0.0
        return (self.objective - self.lower_bound) / self.objective if self.objective > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gap"] = self.gap
        return d


# ---- the solver over a cost table ------------------------------------------------------------

def _unimodal(row: np.ndarray) -> bool:
    d = np.diff(row)
    tol = 1e-12 * max(float(np.abs(row).max()), 1e-300)
    up = np.nonzero(d > tol)[0]
    return not len(up) or bool((d[up[0]:] >= -tol).all())


def _dp_curve(a: np.ndarray, kmax: int):
    """Exact 1-D k-medians over sorted candidates for unimodal rows: best cost and set for k=1..kmax."""
    v, m = a.shape
    kmax = min(kmax, m)
    best = a.argmin(axis=1)
    pre = np.array([a[best < j, j].sum() for j in range(m)])
    suf = np.array([a[best >= j, j].sum() for j in range(m)])
    mid = np.full((m, m), np.inf)
    for i in range(m - 1):
        sel = best >= i
        if not sel.any():
            mid[i, i + 1:] = 0.0
            continue
        rows = a[sel]
        mins = np.minimum(rows[:, i:i + 1], rows[:, i + 1:])
        inside = best[sel][:, None] < np.arange(i + 1, m)[None, :]
        mid[i, i + 1:] = (mins * inside).sum(axis=0)
    dp = np.full((kmax + 1, m), np.inf)
    back = np.zeros((kmax + 1, m), dtype=np.int64)
    dp[1] = pre
    for k in range(2, kmax + 1):
        tot = dp[k - 1][:, None] + mid
        back[k] = tot.argmin(axis=0)
        dp[k] = tot[back[k], np.arange(m)]
    curve, sets = {}, {}
    for k in range(1, kmax + 1):
        total = dp[k] + suf
        j = int(total.argmin())
        if not np.isfinite(total[j]):
            break
        chosen = [j]
        for kk in range(k, 1, -1):
            j = int(back[kk][j])
            chosen.append(j)
        curve[k], sets[k] = float(total[chosen[0]]), sorted(chosen)
    return curve, sets


def _exhaustive_curve(a: np.ndarray, kmax: int, limit: float):
    """Best set of each size k=1..kmax by enumerating all subsets (exact for any rows), or
    None when that is more than ``limit`` cost-table entries of work."""
    v, m = a.shape
    kmax = min(kmax, m)
    if sum(math.comb(m, k) for k in range(1, kmax + 1)) * max(v, 1) > limit:
        return None
    curve, sets = {}, {}
    for k in range(1, kmax + 1):
        best, best_set = math.inf, None
        combos = itertools.combinations(range(m), k)
        while True:
            chunk = np.array(list(itertools.islice(combos, 4096)), dtype=np.int64).reshape(-1, k)
            if not len(chunk):
                break
            totals = np.minimum.reduce([a[:, chunk[:, i]] for i in range(k)]).sum(axis=0)
            j = int(totals.argmin())
            if totals[j] < best:
                best, best_set = float(totals[j]), chunk[j].tolist()
        curve[k], sets[k] = best, best_set
    return curve, sets


def _objective(cost: np.ndarray, chosen) -> float:
    return float(cost[:, list(chosen)].min(axis=1).sum()) if len(chosen) else math.inf


def _local_search(cost: np.ndarray, chosen: list[int], k: int, format_cost: float) -> list[int]:
    chosen = list(chosen)
    c = cost.shape[1]
    while len(chosen) < k:  # greedy fill
        cur = cost[:, chosen].min(axis=1) if chosen else np.full(cost.shape[0], _BIG * 10)
        gains = np.minimum(cur[:, None], cost).sum(axis=0)
        gains[chosen] = np.inf
        j = int(gains.argmin())
        if chosen and gains[j] + format_cost >= cur.sum():
            break
        chosen.append(j)
    best = _objective(cost, chosen)
    for _ in range(100):
        improved = False
        for pos in range(len(chosen)):
            rest = chosen[:pos] + chosen[pos + 1:]
            base = cost[:, rest].min(axis=1) if rest else np.full(cost.shape[0], _BIG * 10)
            totals = np.minimum(base[:, None], cost).sum(axis=0)
            totals[chosen] = np.inf
            j = int(totals.argmin())
            if totals[j] < best * (1 - 1e-12):
                chosen[pos], best, improved = j, float(totals[j]), True
        if not improved:
            break
    return sorted(set(chosen)) if c else chosen


@dataclasses.dataclass
class Budget:
    """A hardware budget on the widths the decisions (rows) take: ``usage = sum_t coef[t] *
    x_t(w[rows[t]]) * (w[partners[t]] if partners[t] >= 0 else 1)``, ``w[r]`` the bit width of
    row r's column and ``x_t(w)`` that width, or ``steps[t, w]`` when the budget has ``steps``.
    Linear terms count memory (elements × bits); bilinear ones bit-operations (MACs ×
    activation bits × weight bits); steps a resource that jumps with a width (DSPs: a layer's
    multipliers use them only from some weight width up)."""

    name: str
    limit: float
    coef: np.ndarray
    rows: np.ndarray
    partners: np.ndarray
    steps: np.ndarray | None = None   # (terms, MAX_BITS + 1): term t's factor at each width

    def _terms(self, row_w: np.ndarray, partner_w: np.ndarray) -> np.ndarray:
        x = row_w if self.steps is None else self.steps[np.arange(len(self.rows)), row_w.astype(np.int64)]
        return self.coef * x * np.where(self.partners >= 0, partner_w, 1.0)

    def usage(self, row_widths: np.ndarray) -> float:
        w = np.asarray(row_widths, dtype=np.float64)
        return float(self._terms(w[self.rows], w[np.maximum(self.partners, 0)]).sum())

    def delta(self, row_widths: np.ndarray, new_widths: np.ndarray) -> np.ndarray:
        """(rows × new widths): the exact change of usage when row r alone moves to ``new_widths[j]``."""
        w = np.asarray(row_widths, dtype=np.float64)
        rw, pw = w[self.rows], w[np.maximum(self.partners, 0)]
        old = self._terms(rw, pw)
        same = self.partners == self.rows
        other = (self.partners >= 0) & ~same
        out = np.zeros((len(new_widths), len(w)))
        for j, b in enumerate(np.asarray(new_widths, dtype=np.float64)):
            moved = np.full(len(rw), b)
            np.add.at(out[j], self.rows, self._terms(moved, np.where(same, b, pw)) - old)
            np.add.at(out[j], self.partners[other], (self._terms(rw, moved) - old)[other])
        return out.T


def _within(budgets, row_widths) -> bool:
    return all(b.usage(row_widths) <= b.limit * (1 + 1e-12) for b in budgets)


def _repair(cost: np.ndarray, chosen, assign: np.ndarray, widths: np.ndarray, budgets) -> np.ndarray | None:
    """Move rows among the ``chosen`` columns until every budget holds, each step the move that
    removes the most excess per unit of cost added; None when no move helps any more."""
    v = cost.shape[0]
    chosen = np.asarray(chosen, dtype=np.int64)
    assign = assign.copy()
    allowed = cost[:, chosen] < _BIG
    wnew = widths[chosen].astype(np.float64)
    for _ in range(4 * v * len(chosen) + 4):
        rw = widths[assign].astype(np.float64)
        over = [(b, b.usage(rw) - b.limit) for b in budgets]
        over = [(b, e) for b, e in over if e > b.limit * 1e-12]
        if not over:
            return assign
        gain = np.zeros((v, len(chosen)))
        for b, excess in over:
            gain += np.minimum(np.maximum(-b.delta(rw, wnew), 0.0), excess) / excess
        valid = allowed & (gain > 1e-15)
        if not valid.any():
            return None
        dcost = cost[:, chosen] - cost[np.arange(v), assign][:, None]
        score = np.where(valid, np.maximum(dcost, 0.0) / np.where(valid, gain, 1.0), np.inf)
        # the best move of each row, cheapest first, as many as the first-order estimate says
        # remove the excess (then the usage is recomputed exactly)
        j = score.argmin(axis=1)
        rows = np.argsort(score[np.arange(v), j], kind="stable")
        rows = rows[np.isfinite(score[rows, j[rows]])]
        enough = np.searchsorted(np.cumsum(gain[rows, j[rows]]), 1.0) + 1
        for r in rows[:max(1, enough)]:
            assign[r] = chosen[j[r]]
    return None


def _evaluate(cost: np.ndarray, chosen, widths: np.ndarray, budgets, format_cost: float):
    """(objective, assignment) of the column set ``chosen`` under the budgets; (inf, None) if none fits."""
    chosen = sorted(set(int(c) for c in chosen))
    if not chosen:
        return math.inf, None
    sub = cost[:, chosen]
    if (sub.min(axis=1) >= _BIG).any():
        return math.inf, None
    assign = np.asarray(chosen, dtype=np.int64)[sub.argmin(axis=1)]
    if budgets and not _within(budgets, widths[assign]):
        assign = _repair(cost, chosen, assign, widths, budgets)
        if assign is None:
            return math.inf, None
    used = len(set(assign.tolist()))
    return float(cost[np.arange(cost.shape[0]), assign].sum()) + format_cost * used, assign


def _monotone(cost: np.ndarray, max_formats: int, widths: np.ndarray, format_cost: float, budgets,
              starts: dict, tries: int = 6):
    """Best column sets for k = 1..max_formats, each search starting from the k-1 solution and
    accepting only improvements, so the objective never rises with k (by construction).
    ``starts[k]``: another candidate set for k (the unconstrained optimum), taken when better.
    Moves are ranked by their objective without budgets; the ``tries`` best are evaluated
    with them.  Returns (curve, best set, its assignment) per k."""
    v, c = cost.shape
    best_obj, best_set, best_assign = math.inf, [], None
    curve, sets = {}, {}

    def ranked(base_set):
        base = cost[:, base_set].min(axis=1) if base_set else np.full(v, _BIG * 10)
        totals = np.minimum(base[:, None], cost).sum(axis=0)
        totals[list(base_set)] = np.inf
        out = []
        for w in np.unique(widths):  # the best of each width: a narrower one may be what fits the budgets
            cols = np.nonzero(widths == w)[0]
            order = cols[np.argsort(totals[cols], kind="stable")[:tries]]
            out += [int(j) for j in order if np.isfinite(totals[j])]
        return sorted(out, key=lambda j: totals[j])

    trail: list[int] = []  # the greedy set without budgets: a start while nothing smaller fits
    for k in range(1, max_formats + 1):
        candidates = []
        grow = best_set if best_set else trail
        if len(grow) < k:
            candidates += [grow + [j] for j in ranked(grow)]
        if len(trail) < k and ranked(trail):
            trail = trail + ranked(trail)[:1]
        if k in starts:
            candidates.append(list(starts[k]))
        if k - 1 in starts:
            candidates += [list(starts[k - 1]) + [j] for j in ranked(list(starts[k - 1]))]
        for cand in candidates:
            obj, assign = _evaluate(cost, cand, widths, budgets, format_cost)
            if obj < best_obj * (1 - 1e-12):
                best_obj, best_set, best_assign = obj, sorted(set(cand)), assign
        for _ in range(20):  # swaps: replace one chosen column, keep it only if the objective falls
            improved = False
            for pos in range(len(best_set)):
                rest = best_set[:pos] + best_set[pos + 1:]
                for j in ranked(rest):
                    if j in best_set:
                        continue
                    obj, assign = _evaluate(cost, rest + [j], widths, budgets, format_cost)
                    if obj < best_obj * (1 - 1e-12):
                        best_obj, best_set, best_assign, improved = obj, sorted(rest + [j]), assign, True
                        break
            if not improved:
                break
        if best_assign is not None:
            best_set = sorted(set(best_assign.tolist()))
            curve[k], sets[k] = best_obj, (list(best_set), best_assign.copy())
    return curve, sets


def _budget_error(budgets, cost: np.ndarray, widths: np.ndarray) -> PolicyError:
    """Name the budget no choice of widths can meet, with the least it could be."""
    narrow = np.array([widths[cost[r] < _BIG].min() for r in range(cost.shape[0])])
    for b in budgets:
        least = b.usage(narrow)
        if least > b.limit:
            return PolicyError(f"auto: the {b.name} budget ({b.limit:g}) is below {least:g}, what the narrowest "
                               f"widths the roles allow need; raise {b.name} or offer narrower widths in bits")
    return PolicyError(f"auto: no choice of at most the allowed formats meets the budgets "
                       f"({', '.join(f'{b.name}={b.limit:g}' for b in budgets)}); raise max_formats or the budgets")


def solve(cost: np.ndarray, max_formats: int, widths: np.ndarray | None = None, format_cost: float = 0.0,
          budgets=None):
    """Choose at most ``max_formats`` columns of ``cost`` (decisions × candidates) minimising
    ``sum_d min_{c chosen} cost[d, c] + format_cost * len(chosen)``.

    ``widths[c]`` groups candidates (their bit width); candidates of a group are sorted by
    frac.  ``budgets``: :class:`Budget` constraints on the widths the rows take.  The
    objective of the returned curve never rises with k.  Returns ``(chosen columns,
    assignment per decision, objective, exact, curve)``.
    """
    budgets = list(budgets or ())
    cost = np.asarray(cost, dtype=np.float64)
    v, c = cost.shape
    widths = np.zeros(c, dtype=np.int64) if widths is None else np.asarray(widths)
    allowed = cost < _BIG
    per_decision = [set(widths[allowed[d]].tolist()) for d in range(v)]
    if any(not g for g in per_decision):
        raise PolicyError("a decision has no allowed candidate format")
    used_groups = sorted(set().union(*per_decision)) if v else []
    starts: dict[int, list] = {}
    separable = all(len(g) == 1 for g in per_decision)
    curve: dict[int, float] = {}
    chosen: list[int] = []
    exact = False
    if separable and used_groups:
        if max_formats < len(used_groups):
            raise PolicyError(f"auto: max_formats={max_formats} is fewer than the {len(used_groups)} bit widths "
                              f"the roles use ({', '.join(map(str, used_groups))}); raise max_formats or use "
                              "fewer widths")
        exact = True
        tables = []
        for g in used_groups:
            cols = np.nonzero(widths == g)[0]
            rows = [d for d in range(v) if per_decision[d] == {g}]
            sub = cost[np.ix_(rows, cols)]
            kmax = max_formats - len(used_groups) + 1
            if all(_unimodal(r) for r in sub):
                gcurve, gsets = _dp_curve(sub, kmax)
            else:
                found = _exhaustive_curve(sub, kmax, EXHAUSTIVE_LIMIT)
                exact &= found is not None
                gcurve, gsets = found or _dp_curve(sub, kmax)
            tables.append((cols, gcurve, gsets))
        # knapsack over widths: best total for each budget
        state = {0: (0.0, [])}
        for cols, gcurve, gsets in tables:
            nxt = {}
            for used, (val, picks) in state.items():
                for k, f in gcurve.items():
                    if used + k > max_formats:
                        continue
                    cand = (val + f + format_cost * k, picks + [int(cols[j]) for j in gsets[k]])
                    if used + k not in nxt or cand[0] < nxt[used + k][0]:
                        nxt[used + k] = cand
            state = nxt
        for k in range(1, max_formats + 1):
            within = [s for u, s in state.items() if u <= k]
            if within:
                curve[k], starts[k] = min(within)[0], sorted(min(within)[1])
        chosen = sorted(min(state.values())[1])
    if not exact:
        # k = 1..max_formats, each swap search starting from the k-1 solution (and from the
        # width-split start when there is one): never worse with more formats
        start, prev, curve, starts = list(chosen), [], {}, {}
        for k in range(1, max_formats + 1):
            options = [_local_search(cost, prev, k, format_cost)]
            if start and len(start) <= k:
                options.append(_local_search(cost, start, k, format_cost))
            found = min(options, key=lambda ch: _objective(cost, ch) + format_cost * len(ch))
            if not prev or (_objective(cost, found) + format_cost * len(found)
                            < (_objective(cost, prev) + format_cost * len(prev)) * (1 - 1e-12)):
                prev = found
            if _objective(cost, prev) < _BIG:
                curve[k], starts[k] = _objective(cost, prev) + format_cost * len(prev), list(prev)
        chosen = prev
    assign = np.array([chosen[int(np.argmin(cost[d, chosen]))] for d in range(v)], dtype=np.int64)
    if budgets and not _within(budgets, widths[assign]):
        # the budgets bind: k = 1..max_formats, each from the k-1 solution, and from the
        # unconstrained solution for k moved within the budgets
        curve, found = _monotone(cost, max_formats, widths, format_cost, budgets, starts)
        if not found:
            raise _budget_error(budgets, cost, widths)
        chosen, assign = found[max(found)]
        return chosen, assign, curve[max(curve)], False, curve
    assign = np.array([chosen[int(np.argmin(cost[d, chosen]))] for d in range(v)], dtype=np.int64)
    objective = _objective(cost, chosen) + format_cost * len(chosen)
    return chosen, assign, objective, exact, curve


# ---- from graphs to decisions ----------------------------------------------------------------

def _role_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.op != "output"]


def _with_roles(gm: fx.GraphModule):
    """(node, role, forward policy role, backward policy role) of every value with a role."""
    for node in gm.graph.nodes:
        role = ir.ROLE.get(node)
        if role is not None:
            yield (node, role, *edge_roles(role))


def _decisions(graphs: list[fx.GraphModule], policy: Auto) -> list[_Decision]:
    out = []
    for gi, gm in enumerate(graphs):
        for node, role, value_role, grad_role in _with_roles(gm):
            stats = ir.STATS.get(node)
            out.append(_Decision((gi, node.name, "fwd"), value_role, policy.bits_for(value_role),
                                 stats.value if stats else None, policy.rounding))
            # the input's gradient leaves the model (calibration records it only to weigh the input)
            grad_stats = stats.gradient if stats and role != "input" else None
            out.append(_Decision((gi, node.name, "bwd"), grad_role, policy.bits_for(grad_role),
                                 grad_stats, policy.gradient_rounding))
            users = _role_users(node)
            if len(users) > 1:
                use_role = grad_role if role in ir.PARAMETER_ROLES else "gradient"
                for u in users:
                    out.append(_Decision((gi, node.name, ("use", u.name)), use_role, policy.bits_for(use_role),
                                         stats.uses.get(u.name) if stats and role != "input" else None,
                                         policy.gradient_rounding))
    return out


def must_share_graph(graphs: list[fx.GraphModule], decisions: list[_Decision]) -> nx.Graph:
    """Decisions (by key) joined when one adder sums them: adder inputs, fan-out gradients."""
    g = nx.Graph()
    g.add_nodes_from(d.key for d in decisions)
    for gi, gm in enumerate(graphs):
        for node in gm.graph.nodes:
            if ir.ROLE.get(node) is None:
                continue
            if (op := ops.op_of(gm, node)) is not None and op.group == "adder":
                ins = [(gi, a.name, "fwd") for a in node.all_input_nodes if ir.ROLE.get(a) is not None]
                nx.add_path(g, ins)
            users = _role_users(node)
            if len(users) > 1:
                nx.add_path(g, [(gi, node.name, ("use", u.name)) for u in users])
    return g


def _value_dag(graphs: list[fx.GraphModule]) -> nx.DiGraph:
    """Every node of the graphs, (graph index, name), with an edge from each input to its user;
    the model's output feeds the loss graph's prediction."""
    dag = nx.DiGraph()
    for gi, gm in enumerate(graphs):
        for node in gm.graph.nodes:
            dag.add_node((gi, node.name), role=ir.ROLE.get(node))
            for a in node.all_input_nodes:
                dag.add_edge((gi, a.name), (gi, node.name))
    if len(graphs) > 1:
        out = [n for n in graphs[0].graph.nodes if n.op == "output"]
        pred = [n for n in graphs[1].graph.nodes if n.op == "placeholder"][:1]
        if out and pred:
            dag.add_edge((0, out[0].name), (1, pred[0].name))
    return dag


# a decision the loss is (measured) insensitive to still prefers less noise: its weight is at
# least this fraction of the largest
_SENSITIVITY_FLOOR = 1e-6


def _sensitivity_weights(graphs: list[fx.GraphModule], decisions: list[_Decision]) -> None:
    """Weight each decision by the loss's sensitivity to its relative error, from calibration.

    Forward value v: a small error e changes the loss by about ``dL/dv · e``, so an error of
    relative size ``NSR`` costs ``E[(dL/dv)^2] · sum v^2 · NSR`` (first order, errors
    uncorrelated with the gradient): the weight is ``E[(dL/dv)^2] · sum v^2``.  The loss value
    itself feeds no gradient and gets the floor.  Backward (a gradient of v, summed or per
    use): its relative error becomes a relative error of the gradient of every parameter it
    flows into (the parameters v is computed from), which moves them as that much error in
    their updates; the weight is the sum of those parameters' forward weights."""
    stats = {}
    for gi, gm in enumerate(graphs):
        for node in gm.graph.nodes:
            if ir.STATS.get(node) is not None:
                stats[(gi, node.name)] = ir.STATS.of(node)

    def forward_weight(key) -> float:
        st = stats.get(key)
        if st is None or st.gradient is None or not st.gradient.count:
            return 0.0
        return st.gradient.mean_square * float(st.value.hist_sq.sum())

    dag = _value_dag(graphs)
    roles = nx.get_node_attributes(dag, "role")
    params = [n for n, r in roles.items() if r in ir.PARAMETER_ROLES]
    bit = {n: 1 << i for i, n in enumerate(params)}
    weights = [forward_weight(n) for n in params]
    reach = {}  # node -> bit set of the parameters it is computed from (itself included)
    for n in nx.topological_sort(dag):
        m = bit.get(n, 0)
        for a in dag.predecessors(n):
            m |= reach[a]
        reach[n] = m
    for d in decisions:
        node = d.key[:2]
        if d.key[2] == "fwd":
            d.weight = 0.0 if d.role == "loss" else forward_weight(node)
            continue
        m = reach[node]
        d.weight = sum(w for i, w in enumerate(weights) if m >> i & 1)
    top = max((d.weight for d in decisions), default=0.0)
    floor = _SENSITIVITY_FLOOR * top if top > 0 else 1.0
    for d in decisions:
        d.weight = max(d.weight, floor)


def _reach_weights(graphs: list[fx.GraphModule], decisions: list[_Decision]) -> None:
    """Weight each decision by how much of the graph its error reaches: a forward value's
    rounding error flows into every value computed from it, a gradient's into the gradient
    of every value it is computed from.  Weight = 1 + number of role values reached."""
    dag = _value_dag(graphs)
    roles = nx.get_node_attributes(dag, "role")
    for d in decisions:
        reached = nx.descendants(dag, d.key[:2]) if d.key[2] == "fwd" else nx.ancestors(dag, d.key[:2])
        d.weight = 1.0 + sum(1 for n in reached if roles.get(n) is not None)


def _expected_nsr(d: _Decision, bits: int, fracs: np.ndarray, margin: int, both: bool = False,
                  growth: int = 0) -> np.ndarray:
    """NSR per candidate frac, averaged over the value drifting ``0..margin`` octaves the way
    training moves it: forward values (weights, activations) grow; gradients and the loss value
    shrink; the input is the data, which training does not move.  Scaling values by ``2**s`` is
    rounding them at frac ``f + s``, so a drift is a shift along fracs.  ``both``: every value
    but the input drifts ``-margin..margin`` octaves (the sensitivity objective).  A growing
    forward value may grow ``growth`` octaves further (the model's output: :func:`_mark_outputs`)."""
    signal = float(d.stats.hist_sq.sum())
    if signal <= 0:
        return np.zeros(len(fracs))
    forward = d.key[2] == "fwd"
    sign = 1 if forward and d.role != "loss" else -1
    top = margin + (growth if forward and sign > 0 and d.role != "input" else 0)
    pad = max(margin, top)
    wide = np.arange(fracs[0] - pad, fracs[-1] + pad + 1)
    table = d.stats.squared_errors(bits, wide, d.rounding) / signal
    drifts = [0] if forward and d.role == "input" else range(top + 1)
    if both and not (forward and d.role == "input"):  # either way: values and gradients may grow or shrink
        drifts = range(-margin, top + 1)
    return np.mean([table[pad + sign * s: pad + sign * s + len(fracs)] for s in drifts], axis=0)


def _mark_outputs(graphs: list[fx.GraphModule], decisions: list[_Decision]) -> None:
    """Mark the model's output (the loss's prediction), which may grow ``output_margin``
    octaves beyond the margin (:meth:`Auto.output_margin_for`).  Its scale is set by the loss,
    not by the untrained model the calibration sees: cross-entropy is lowest at unbounded
    logits, so training keeps widening them (log-odds of ever more confident predictions) from
    their near-zero start.  On the seed CNN the untrained logits reach 0.19 and the trained
    ones pass 16 (over 6 octaves)."""
    outputs = set()
    for node in graphs[0].graph.nodes:
        if node.op == "output":
            outputs |= {(0, a.name) for a in node.all_input_nodes}
    if len(graphs) > 1:  # the loss graph's first placeholder is the prediction
        pred = [n for n in graphs[1].graph.nodes if n.op == "placeholder"][:1]
        outputs |= {(1, n.name) for n in pred}
    for d in decisions:
        if d.key[2] == "fwd" and d.key[:2] in outputs and d.role not in ("input", "loss"):
            d.output = True


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape is not None else 0


_DSP_PACKAGE = "hls4ml.optimization.dsp_aware_pruning"


@functools.lru_cache(maxsize=None)
def dsp_estimator():
    """hls4ml's ``VivadoDSPEstimator`` (its DSP-aware pruning's resource estimate), or a
    :class:`PolicyError` saying hls4ml must be installed.  The estimator's package imports
    hls4ml's Keras optimiser (TensorFlow, QKeras) on import, which the estimator does not use:
    its module is loaded with that package's ``__init__`` skipped, then every module the load
    added is taken out of ``sys.modules`` again."""
    name = f"{_DSP_PACKAGE}.objectives.vivado_objectives"
    if _DSP_PACKAGE in sys.modules:   # imported for real (TensorFlow is installed): import as usual
        return importlib.import_module(name).VivadoDSPEstimator
    try:
        import hls4ml.optimization
    except ImportError as e:
        raise PolicyError("auto: the hls4ml_dsps budget is hls4ml's own DSP estimate and needs hls4ml: "
                          "pip install 'fxcompile[hls]'") from e
    root = os.path.join(os.path.dirname(hls4ml.optimization.__file__), "dsp_aware_pruning")
    stubs = {n: types.ModuleType(n) for n in (_DSP_PACKAGE, f"{_DSP_PACKAGE}.keras", f"{_DSP_PACKAGE}.keras.config")}
    stubs[_DSP_PACKAGE].__path__ = [root]
    stubs[f"{_DSP_PACKAGE}.keras"].__path__ = [os.path.join(root, "keras")]
    stubs[f"{_DSP_PACKAGE}.keras.config"].SUPPORTED_LAYERS = ()
    before = set(sys.modules)
    sys.modules.update(stubs)
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise PolicyError(f"auto: the hls4ml_dsps budget could not load hls4ml's DSP estimator ({e})") from e
    finally:
        for added in set(sys.modules) - before:
            if added.startswith(_DSP_PACKAGE):
                del sys.modules[added]
    return module.VivadoDSPEstimator


def hls4ml_layer_dsps(weight_shape, width: int, reuse_factor: int = 1) -> int:
    """The DSPs hls4ml's estimator gives a layer with weights of ``weight_shape`` and ``width``
    bits (``VivadoDSPEstimator.layer_resources``, which reads the weight shape, the weight
    precision's width and the reuse factor)."""
    NS = types.SimpleNamespace
    hls = NS(weight_precision=NS(width=int(width)), reuse_factor=int(reuse_factor), strategy="latency")
    return int(dsp_estimator().layer_resources(NS(weight_shape=tuple(weight_shape),
                                                  args={"hls4ml_attributes": hls}))[0])


def _hls4ml_available() -> bool:
    try:
        dsp_estimator()
    except PolicyError:
        return False
    return True


def hardware_budgets(graphs: list[fx.GraphModule], comp_of: dict, policy: Auto) -> list[Budget]:
    """The budgets as :class:`Budget` rows over components (``comp_of``: decision key -> row):
    ``weight_memory_bits`` (elements of every weight and bias × bits), ``bops`` (per
    multiply-accumulate op with a weight: MACs per sample × activation bits × weight bits) and
    ``hls4ml_dsps`` (per multiply-accumulate op with a weight: hls4ml's DSP estimate at each
    weight width, :func:`hls4ml_layer_dsps`; left out when hls4ml is not installed and the
    policy sets no limit).  A budget the policy leaves unset has an infinite limit (its usage
    is still reported)."""
    mem, bops, dsps = [], [], []
    for gi, gm in enumerate(graphs):
        for node in gm.graph.nodes:
            role = ir.ROLE.get(node)
            if role in ir.PARAMETER_ROLES and (gi, node.name, "fwd") in comp_of:
                mem.append((_numel(_shape(node)), comp_of[(gi, node.name, "fwd")], -1))
            if role is None or (op := ops.op_of(gm, node)) is None or op.group != "multiply_accumulate":
                continue
            weights = [a for a in node.all_input_nodes if ir.ROLE.get(a) == "weight"]
            acts = [a for a in node.all_input_nodes if ir.ROLE.get(a) not in (None, *ir.PARAMETER_ROLES)]
            out, w = _shape(node), _shape(weights[0]) if weights else None
            if weights and w:
                dsps.append((tuple(w), comp_of[(gi, weights[0].name, "fwd")]))
            if not weights or not acts or not out or not w or len(out) < 2:
                continue
            macs = _numel(w) * _numel(out) / (out[0] * w[0])
            bops.append((macs, comp_of[(gi, acts[0].name, "fwd")], comp_of[(gi, weights[0].name, "fwd")]))
    out = []
    for name, terms in (("weight_memory_bits", mem), ("bops", bops)):
        limit = getattr(policy, name)
        t = np.array(terms, dtype=np.float64).reshape(-1, 3)
        out.append(Budget(name, math.inf if limit is None else float(limit), t[:, 0],
                          t[:, 1].astype(np.int64), t[:, 2].astype(np.int64)))
    if policy.hls4ml_dsps is not None or _hls4ml_available():
        steps = np.array([[hls4ml_layer_dsps(shape, b, policy.hls4ml_reuse_factor) for b in range(MAX_BITS + 1)]
                          for shape, _ in dsps], dtype=np.float64).reshape(-1, MAX_BITS + 1)
        limit = math.inf if policy.hls4ml_dsps is None else float(policy.hls4ml_dsps)
        out.append(Budget("hls4ml_dsps", limit, np.ones(len(dsps)), np.array([r for _, r in dsps], dtype=np.int64),
                          np.full(len(dsps), -1, dtype=np.int64), steps))
    return out


def choose_formats(gm: fx.GraphModule, policy: Auto, loss_graph: fx.GraphModule | None = None) -> fx.GraphModule:
    """Choose formats for ``gm`` (and ``loss_graph``, jointly: K counts both) from the
    calibration statistics in ``node.meta["fxc_stats"]`` (see :func:`calibrate`)."""
    t0 = time.perf_counter()
    graphs = [gm] + ([loss_graph] if loss_graph is not None else [])
    decisions = _decisions(graphs, policy)
    _mark_outputs(graphs, decisions)
    if policy.objective == "reach":
        _reach_weights(graphs, decisions)
    elif policy.objective == "sensitivity":
        _sensitivity_weights(graphs, decisions)
    index = {d.key: i for i, d in enumerate(decisions)}
    share = must_share_graph(graphs, decisions)
    components = [sorted(c, key=index.__getitem__) for c in nx.connected_components(share)]
    components.sort(key=lambda c: index[c[0]])

    all_widths = sorted({w for d in decisions for w in d.widths})
    fracs = np.arange(policy.fracs[0], policy.fracs[1] + 1)
    cand = [(w, int(f)) for w in all_widths for f in fracs]
    cand_widths = np.array([w for w, _ in cand])
    total_elements = sum(d.stats.count for d in decisions if d.stats is not None) or 1
    cost = np.full((len(components), len(cand)), _BIG)
    member_nsr = {}
    for ci, comp in enumerate(components):
        members = [decisions[index[k]] for k in comp]
        widths = set(members[0].widths)
        for m in members[1:]:
            if set(m.widths) != widths:
                raise PolicyError(f"auto: {m.key[1]} and {members[0].key[1]} meet in one adder and must share "
                                  f"a binary point, but their roles have different widths ({m.role}: {m.widths}, "
                                  f"{members[0].role}: {members[0].widths}); give those roles the same bits")
        for w in widths:
            cols = np.nonzero(cand_widths == w)[0]
            row = np.zeros(len(cols))
            elements = 0
            for m in members:
                if m.stats is None or not m.stats.count:
                    continue
                nsr = _expected_nsr(m, w, fracs, policy.margin_for(w), both=policy.objective == "sensitivity",
                                    growth=policy.output_margin_for(w) if m.output else 0)
                member_nsr[(m.key, w)] = nsr
                row += m.weight * nsr
                elements += m.stats.count
            cost[ci, cols] = row + policy.bits_cost * w * elements / total_elements

    comp_of = {k: ci for ci, comp in enumerate(components) for k in comp}
    budgets = hardware_budgets(graphs, comp_of, policy)
    chosen, assign, objective, exact, curve = solve(cost, policy.max_formats, cand_widths, policy.format_cost,
                                                    budgets=[b for b in budgets if math.isfinite(b.limit)])
    usage = {b.name: b.usage(cand_widths[assign]) for b in budgets}

    # the naive baseline: one format per width, its frac from the global max of everything in it
    baseline = 0.0
    for w in all_widths:
        peak = max((d.stats.max_abs for d in decisions if d.stats is not None and w in d.widths), default=0.0)
        f = int(np.clip(w - 1 - math.ceil(math.log2(peak)) if peak > 0 else w - 1, fracs[0], fracs[-1]))
        col = cand.index((w, f))
        baseline += float(cost[[ci for ci in range(len(components)) if cost[ci, col] < _BIG], col].sum())
    lower = float(cost.min(axis=1).sum())

    fmt_of = {}
    for ci, comp in enumerate(components):
        w, f = cand[assign[ci]]
        for k in comp:
            d = decisions[index[k]]
            rounding = policy.update_rounding if d.role in ir.PARAMETER_ROLES else d.rounding
            fmt_of[k] = (FixedPoint(w, f, rounding=rounding), float(member_nsr.get((k, w), np.zeros(len(fracs)))
                                                                       [f - fracs[0]]) if (k, w) in member_nsr else 0.0)
    for gi, g in enumerate(graphs):
        _write(g, gi, fmt_of, policy)
    _warn_if_untrainable(decisions, fmt_of, policy)
    predicted = _predicted(decisions, fmt_of, fracs, both=policy.objective == "sensitivity")
    ir.SOLUTION.set(gm, Solution(sorted({cand[j] for j in chosen}), objective, baseline, lower, exact, curve,
                                 time.perf_counter() - t0, len(decisions), len(components), usage,
                                 predicted=predicted))
    return gm


def _predicted(decisions: list[_Decision], fmt_of: dict, fracs: np.ndarray, both: bool) -> float:
    """The weighted NSR of the chosen formats with every value drifting :data:`PREDICTION_DRIFT`
    octaves (the model's output as far again): the objective on one scale for every width and
    margin, which ranks assignments (``Solution.predicted``)."""
    total = 0.0
    for d in decisions:
        if d.stats is None or not d.stats.count:
            continue
        fmt = fmt_of[d.key][0]
        f = min(max(fmt.frac, int(fracs[0])), int(fracs[-1]))
        nsr = _expected_nsr(d, fmt.bits, fracs, PREDICTION_DRIFT, both=both,
                            growth=PREDICTION_DRIFT if d.output else 0)
        total += d.weight * float(nsr[f - fracs[0]])
    return total


# Beyond this, calibration says training will likely stall: most of an activation gradient
# rounds to zero.  At 16 bits the seed CNN flushes under 1 % with K >= 2, and 55 % with one
# format; at 8 bits nearest-rounded gradients flush 90 % at the logits.  (Forward saturation
# is no such sign: 8-bit activations that train to within 1.4 points saturate 15 %.)
_MAX_GRADIENT_FLUSH = 0.25


def _warn_if_untrainable(decisions: list[_Decision], fmt_of: dict, policy: Auto) -> None:
    """Warn when the chosen formats round most of an activation gradient to zero (nearest
    rounding; stochastic rounding keeps small gradients on average)."""
    offenders = []
    for d in decisions:
        if d.role != "gradient" or d.rounding != "nearest" or d.stats is None or not d.stats.count:
            continue
        fmt = fmt_of[d.key][0]
        rate = d.stats.underflow_rate(fmt)
        if rate > _MAX_GRADIENT_FLUSH:
            offenders.append((rate, f"{fmt} flushes {100 * rate:.0f} % of the gradient of {d.key[1]} to zero"))
    if offenders:
        # the three worst, once each (a value's summed and per-use gradients can read alike)
        worst = "; ".join(list(dict.fromkeys(text for _, text in sorted(offenders, reverse=True)))[:3])
        warnings.warn(f"auto (max_formats={policy.max_formats}): on the calibration batches {worst}; training "
                      "will likely stall — allow more formats (max_formats), more gradient bits, or "
                      "gradient_rounding='stochastic'", UserWarning, stacklevel=4)


def _write(gm: fx.GraphModule, gi: int, fmt_of: dict, policy: Auto) -> None:
    for node, role, value_role, grad_role in _with_roles(gm):
        op = ir.OP.get(node)
        (fwd, fwd_nsr), (bwd, bwd_nsr) = fmt_of[(gi, node.name, "fwd")], fmt_of[(gi, node.name, "bwd")]
        ir.VALUE.set(node, Edge(node.name, "*", value_role, fwd, grad_role, bwd, op, _shape(node)))
        noise = {"*": (fwd_nsr, bwd_nsr)}
        uses = {}
        users = _role_users(node)
        for user in users:
            use_bwd, use_nsr = fmt_of.get((gi, node.name, ("use", user.name)), (bwd, bwd_nsr))
            if role in ir.PARAMETER_ROLES:
                uses[user.name] = Edge(node.name, user.name, value_role, fwd, grad_role, use_bwd,
                                       ir.OP.get(user, ""), _shape(node))
            else:
                uses[user.name] = Edge(node.name, user.name, "activation_in", fwd, "gradient", use_bwd,
                                       ir.OP.get(user, "") or "", _shape(node))
            noise[user.name] = (0.0, use_nsr)
        ir.USES.set(node, uses)
        ir.NOISE.set(node, noise)
    ir.CLIP_GRADIENT.set(gm, policy.clip_gradient)
    ir.PREDICTION_GRADIENT.set(gm, policy.prediction_gradient)
