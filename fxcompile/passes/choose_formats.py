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
and the loss value shrink, the input data stays; calibration sees the untrained model).  ``w_d`` is 1
(``objective="nsr"``) or, with ``objective="reach"``, a sensitivity estimate from the graph:
1 + the number of values the error reaches (a forward value's error reaches everything
computed from it; a gradient's error reaches the gradients of everything it comes from,
so the gradient at the logits weighs more than the one at the first layer).  The multiplier width of every MAC and
the bits moved are reported by :func:`fxcompile.reports.profile.hardware_summary`.

**Solver.**  When each decision has one width (``bits`` fixed per role) and each cost is
unimodal in frac, a dynamic program over the sorted fracs is exact (1-D k-medians: a
decision takes the cheaper of the two chosen fracs around its own best frac), and a
knapsack over widths splits K between them.  Otherwise the DP (or a greedy start) is
refined by swap local search and the gap to a lower bound is reported.  The solution,
with the objective for every K up to ``max_formats``, is ``gm.meta["fxc_solution"]``::

    >>> calibrate(gm, batches, loss_graph=lg)
    >>> choose_formats(gm, fxc.auto(max_formats=3), loss_graph=lg)
    >>> gm.meta["fxc_solution"].formats
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings

import networkx as nx
import numpy as np
import torch.fx as fx

from ..core import ir, ops
from ..core.assignment import Edge
from ..core.auto import Auto
from ..errors import PolicyError
from ..core.formats import FixedPoint
from .assign import _shape, edge_roles

__all__ = ["CONTRACT", "choose_formats", "solve", "Solution", "must_share_graph"]

CONTRACT = ir.Contract(requires=(ir.ROLE, ir.STATS), provides=(ir.VALUE, ir.USES, ir.NOISE),
                       graph_provides=(ir.SOLUTION, ir.CLIP_GRADIENT))

_BIG = 1e18  # cost of a candidate a decision may not take (a width it is not allowed)
EXHAUSTIVE_LIMIT = 5e7  # table entries the exact enumeration may read before the heuristic takes over


@dataclasses.dataclass
class _Decision:
    key: tuple               # (graph index, node name, slot); slot is "fwd", "bwd" or ("use", consumer)
    role: str
    widths: tuple
    stats: object            # TensorStats or None
    rounding: str
    weight: float = 1.0


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


def solve(cost: np.ndarray, max_formats: int, widths: np.ndarray | None = None, format_cost: float = 0.0):
    """Choose at most ``max_formats`` columns of ``cost`` (decisions × candidates) minimising
    ``sum_d min_{c chosen} cost[d, c] + format_cost * len(chosen)``.

    ``widths[c]`` groups candidates (their bit width); candidates of a group are sorted by
    frac.  Returns ``(chosen columns, assignment per decision, objective, exact, curve)``.
    """
    cost = np.asarray(cost, dtype=np.float64)
    v, c = cost.shape
    widths = np.zeros(c, dtype=np.int64) if widths is None else np.asarray(widths)
    allowed = cost < _BIG
    per_decision = [set(widths[allowed[d]].tolist()) for d in range(v)]
    if any(not g for g in per_decision):
        raise PolicyError("a decision has no allowed candidate format")
    used_groups = sorted(set().union(*per_decision)) if v else []
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
                curve[k] = min(within)[0]
        chosen = sorted(min(state.values())[1])
    if not exact:
        k = max_formats
        chosen = _local_search(cost, chosen, k, format_cost)
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
            out.append(_Decision((gi, node.name, "bwd"), grad_role, policy.bits_for(grad_role),
                                 stats.gradient if stats else None, policy.gradient_rounding))
            users = _role_users(node)
            if len(users) > 1:
                use_role = grad_role if role in ir.PARAMETER_ROLES else "gradient"
                for u in users:
                    out.append(_Decision((gi, node.name, ("use", u.name)), use_role, policy.bits_for(use_role),
                                         stats.uses.get(u.name) if stats else None, policy.gradient_rounding))
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


def _reach_weights(graphs: list[fx.GraphModule], decisions: list[_Decision]) -> None:
    """Weight each decision by how much of the graph its error reaches: a forward value's
    rounding error flows into every value computed from it, a gradient's into the gradient
    of every value it is computed from.  Weight = 1 + number of role values reached."""
    dag = nx.DiGraph()
    for gi, gm in enumerate(graphs):
        for node in gm.graph.nodes:
            dag.add_node((gi, node.name), role=ir.ROLE.get(node))
            for a in node.all_input_nodes:
                dag.add_edge((gi, a.name), (gi, node.name))
    if len(graphs) > 1:  # the model's output is the loss graph's prediction
        out = [n for n in graphs[0].graph.nodes if n.op == "output"]
        pred = [n for n in graphs[1].graph.nodes if n.op == "placeholder"][:1]
        if out and pred:
            dag.add_edge((0, out[0].name), (1, pred[0].name))
    roles = nx.get_node_attributes(dag, "role")
    for d in decisions:
        reached = nx.descendants(dag, d.key[:2]) if d.key[2] == "fwd" else nx.ancestors(dag, d.key[:2])
        d.weight = 1.0 + sum(1 for n in reached if roles.get(n) is not None)


def _expected_nsr(d: _Decision, bits: int, fracs: np.ndarray, margin: int) -> np.ndarray:
    """NSR per candidate frac, averaged over the value drifting ``0..margin`` octaves the way
    training moves it: forward values (weights, activations) grow; gradients and the loss value
    shrink; the input is the data, which training does not move.  Scaling values by ``2**s`` is
    rounding them at frac ``f + s``, so a drift is a shift along fracs."""
    signal = float(d.stats.hist_sq.sum())
    if signal <= 0:
        return np.zeros(len(fracs))
    wide = np.arange(fracs[0] - margin, fracs[-1] + margin + 1)
    table = d.stats.squared_errors(bits, wide, d.rounding) / signal
    forward = d.key[2] == "fwd"
    sign = 1 if forward and d.role != "loss" else -1
    drifts = [0] if forward and d.role == "input" else range(margin + 1)
    return np.mean([table[margin + sign * s: margin + sign * s + len(fracs)] for s in drifts], axis=0)


def choose_formats(gm: fx.GraphModule, policy: Auto, loss_graph: fx.GraphModule | None = None) -> fx.GraphModule:
    """Choose formats for ``gm`` (and ``loss_graph``, jointly: K counts both) from the
    calibration statistics in ``node.meta["fxc_stats"]`` (see :func:`calibrate`)."""
    t0 = time.perf_counter()
    graphs = [gm] + ([loss_graph] if loss_graph is not None else [])
    decisions = _decisions(graphs, policy)
    if policy.objective == "reach":
        _reach_weights(graphs, decisions)
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
                nsr = _expected_nsr(m, w, fracs, policy.margin_for(w))
                member_nsr[(m.key, w)] = nsr
                row += m.weight * nsr
                elements += m.stats.count
            cost[ci, cols] = row + policy.bits_cost * w * elements / total_elements

    chosen, assign, objective, exact, curve = solve(cost, policy.max_formats, cand_widths, policy.format_cost)

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
    ir.SOLUTION.set(gm, Solution(sorted({cand[j] for j in chosen}), objective, baseline, lower, exact, curve,
                                 time.perf_counter() - t0, len(decisions), len(components)))
    return gm


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
