"""The solver under hardware budgets, its monotonicity in K, and the sensitivity objective."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN
from fxcompile.passes.choose_formats import _BIG, Budget, solve


def _random_problem(seed, v=5, c=6):
    """A random cost table over two widths (8 and 16), some rows allowed only the wider one,
    a memory-like budget (linear terms) and a BOPs-like one (products of two rows' widths)."""
    rng = np.random.default_rng(seed)
    widths = np.array([8] * (c // 2) + [16] * (c - c // 2))
    # narrower formats are noisier: a 16-bit candidate costs less than the 8-bit ones on average
    cost = rng.uniform(0, 1, (v, c)) * np.where(widths == 8, 4.0, 1.0)[None, :]
    cost[rng.uniform(size=v) < 0.25, : c // 2] = _BIG
    mem = [(float(rng.integers(1, 10)), r, -1) for r in range(v)]
    bops = [(float(rng.integers(1, 5)), int(rng.integers(v)), int(rng.integers(v))) for _ in range(3)]
    budgets = []
    for name, terms in (("weight_memory_bits", mem), ("bops", bops)):
        full = sum(co * 16 * (16 if p >= 0 else 1) for co, _, p in terms)
        t = np.array(terms)
        budgets.append((name, full * rng.uniform(0.55, 0.95), terms,
                        Budget(name, 0.0, t[:, 0], t[:, 1].astype(np.int64), t[:, 2].astype(np.int64))))
    return cost, widths, budgets


def _with_limits(budgets):
    return [Budget(name, limit, b.coef, b.rows, b.partners) for name, limit, _, b in budgets]


def brute_force(cost, widths, budgets):
    """Best objective for each k over every assignment of an allowed candidate to every row
    that keeps within every budget (usage summed term by term here, sharing no code with
    the solver); k -> best with at most k distinct candidates."""
    allowed = [[c for c in range(cost.shape[1]) if cost[d, c] < _BIG] for d in range(cost.shape[0])]
    best = {}
    for a in itertools.product(*allowed):
        w = [int(widths[c]) for c in a]
        if any(sum(co * w[r] * (w[p] if p >= 0 else 1) for co, r, p in terms) > limit * (1 + 1e-12)
               for _, limit, terms, _ in budgets):
            continue
        k = len(set(a))
        total = sum(cost[d, c] for d, c in enumerate(a))
        best[k] = min(best.get(k, np.inf), total)
    return {k: min(v for kk, v in best.items() if kk <= k) for k in range(1, cost.shape[1] + 1)
            if any(kk <= k for kk in best)}


def _usage(terms, row_widths):
    return sum(co * row_widths[r] * (row_widths[p] if p >= 0 else 1) for co, r, p in terms)


@pytest.mark.parametrize("seed", range(8))
def test_budgeted_solver_never_exceeds_k_or_a_budget_and_is_monotone_in_k(seed):
    cost, widths, budgets = _random_problem(seed)
    best = brute_force(cost, widths, budgets)
    previous = np.inf
    for k in range(1, 5):
        if k not in best:  # nothing fits with k formats: the solver must say so, naming a budget
            with pytest.raises(fxc.PolicyError, match="budget"):
                solve(cost, k, widths, budgets=_with_limits(budgets))
            continue
        chosen, assign, objective, _, curve = solve(cost, k, widths, budgets=_with_limits(budgets))
        row_widths = widths[assign]
        assert len(set(assign.tolist())) <= k and len(chosen) <= k
        for _, limit, terms, _ in budgets:
            assert _usage(terms, row_widths) <= limit * (1 + 1e-12)
        assert objective == pytest.approx(cost[np.arange(len(cost)), assign].sum(), rel=1e-12)
        assert objective >= best[k] * (1 - 1e-12)          # nothing beats exhaustive search
        assert objective <= 1.3 * best[k]                  # and the search lands close to it here
        assert objective <= previous * (1 + 1e-12)        # more formats never do worse
        assert all(curve[a] >= curve[b] * (1 - 1e-12) for a, b in zip(sorted(curve), sorted(curve)[1:]))
        previous = objective


@pytest.mark.parametrize("seed", range(8))
def test_solver_without_budgets_is_monotone_in_k_and_equals_brute_force_when_exact(seed):
    rng = np.random.default_rng(300 + seed)
    cost, widths, _ = _random_problem(300 + seed)
    best = brute_force(cost, widths, [])
    previous = np.inf
    for k in range(2, 6):
        chosen, assign, objective, exact, _ = solve(cost, k, widths)
        assert len(set(assign.tolist())) <= k
        assert best[k] * (1 - 1e-12) <= objective <= previous * (1 + 1e-12)
        if exact:
            assert objective == pytest.approx(best[k], rel=1e-12)
        previous = objective
    # one width per row: the exact path, monotone because optimal
    single = rng.uniform(0, 1, (6, 5))
    values = [solve(single, k)[2] for k in range(1, 6)]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx([brute_force(single, np.zeros(5, int), [])[k] for k in range(1, 6)])


def _compile(policy):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    return fxc.compile(ResidualCNN(width=4), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],),
                       calibration_data=[(x, y)])


def _parameter_bits(q):
    return sum(int(np.prod(r.shape)) * r.forward.bits for r in fxc.assignment(q)
               if r.role in ("weight", "bias") and r.consumer == "*")


def test_compiled_model_keeps_within_the_weight_memory_budget():
    free = _compile(fxc.auto(max_formats=3, bits=(8, 16), objective="sensitivity"))
    full = _parameter_bits(free)
    assert free.meta["fxc_solution"].usage["weight_memory_bits"] == full
    budget = 0.75 * full
    q = _compile(fxc.auto(max_formats=3, bits=(8, 16), objective="sensitivity", weight_memory_bits=budget))
    sol = q.meta["fxc_solution"]
    assert len(fxc.assignment(q).formats()) <= 3
    assert _parameter_bits(q) <= budget and sol.usage["weight_memory_bits"] == _parameter_bits(q)
    assert sol.objective >= free.meta["fxc_solution"].objective   # a budget costs noise, never saves it
    q = _compile(fxc.auto(max_formats=3, bits=(8, 16), objective="sensitivity", bops=0.6 * free.meta["fxc_solution"].usage["bops"]))
    assert q.meta["fxc_solution"].usage["bops"] <= 0.6 * free.meta["fxc_solution"].usage["bops"]


def test_a_budget_no_width_can_meet_is_refused_by_name():
    with pytest.raises(fxc.PolicyError, match="weight_memory_bits budget"):
        _compile(fxc.auto(max_formats=3, bits=(8, 16), weight_memory_bits=100))
    with pytest.raises(fxc.PolicyError, match="bops"):   # one width: the budget cannot move it
        _compile(fxc.auto(max_formats=3, bits=16, bops=10))
    with pytest.raises(fxc.PolicyError, match="weight_memory_bits"):
        fxc.auto(weight_memory_bits=-5)


def test_sensitivity_weights_come_from_calibrated_gradients():
    from fxcompile.passes.choose_formats import _decisions, _sensitivity_weights
    q = _compile(fxc.auto(max_formats=3, objective="sensitivity"))
    policy = fxc.auto(max_formats=3, objective="sensitivity")
    decisions = {d.key: d for d in _decisions([q], policy)}
    _sensitivity_weights([q], list(decisions.values()))
    nodes = {n.name: n for n in q.graph.nodes}
    for name in ("conv1", "relu1", "fc"):
        st = nodes[name].meta["fxc_stats"]
        assert decisions[(0, name, "fwd")].weight == pytest.approx(st.gradient.mean_square * st.value.hist_sq.sum())
    # a gradient's error reaches the parameters it flows into: more of them at the logits
    # than at the first layer
    assert decisions[(0, "fc", "bwd")].weight > decisions[(0, "conv1", "bwd")].weight > 0
    # the input is weighed by its own gradient, recorded by calibration
    x = next(n for n in q.graph.nodes if n.op == "placeholder" and n.meta.get("fxc_role") == "input")
    assert x.meta["fxc_stats"].gradient is not None and decisions[(0, x.name, "fwd")].weight > 0


def test_sensitivity_objective_leaves_headroom_for_gradients_to_grow():
    """The sensitivity objective lets gradients drift both ways: a coarser binary point than
    the one that only lets them shrink."""
    from fxcompile.passes.calibrate import TensorStats
    from fxcompile.passes.choose_formats import _Decision, _expected_nsr
    stats = TensorStats().update(torch.linspace(-3, 3, 1001) * 1e-3)
    fracs = np.arange(0, 32)
    d = _Decision((0, "v", "bwd"), "gradient", (8,), stats, "nearest")
    shrink = int(fracs[np.argmin(_expected_nsr(d, 8, fracs, 2))])
    both = int(fracs[np.argmin(_expected_nsr(d, 8, fracs, 2, both=True))])
    at_rest = int(fracs[np.argmin(_expected_nsr(d, 8, fracs, 0))])
    assert both < at_rest <= shrink


def _output_headroom(policy):
    """Octaves between the model output's calibrated peak and its chosen format's range."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    from fxcompile.experiments.models import SeedCNN
    q = fxc.compile(SeedCNN(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],),
                    calibration_data=[(x, y)])
    logits = next(n for n in q.graph.nodes if n.name == "fc2")
    fmt, peak = logits.meta["fxc_value"].forward, logits.meta["fxc_stats"].value.max_abs
    return float(np.log2(fmt.max_value / peak))


@pytest.mark.parametrize("objective", ["sensitivity", "nsr"])
def test_the_model_output_keeps_room_to_grow_twice_the_margin(objective):
    """Cross-entropy widens the logits far beyond their untrained range: with formats to spare,
    the logits take a format with room for margin + output_margin octaves (4 + 4 at 16 bits),
    not the 4 octaves of the other values (which put the seed CNN's logits on 16.14 at K = 4)."""
    grown = _output_headroom(fxc.auto(max_formats=6, bits=16, objective=objective))
    assert grown >= 7.5
    assert _output_headroom(fxc.auto(max_formats=6, bits=16, objective=objective, output_margin=0)) < 6
    assert _output_headroom(fxc.auto(max_formats=6, bits=16, objective=objective, output_margin=2)) < grown
    with pytest.raises(fxc.PolicyError, match="output_margin"):
        fxc.auto(output_margin=-1)
