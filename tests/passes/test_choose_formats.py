import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN
from fxcompile.passes import choose_formats
from fxcompile.passes.choose_formats import _BIG, solve


def brute_force(cost, format_cost=0.0):
    """Best objective for each number of distinct formats k: every assignment of an allowed
    format to every edge (itertools.product), scored as the sum of its entries plus
    ``format_cost`` per distinct format.  Shares no code with the solver."""
    allowed = [[c for c in range(cost.shape[1]) if cost[d, c] < _BIG] for d in range(cost.shape[0])]
    a = np.array(list(itertools.product(*allowed)), dtype=np.int64)           # assignments × edges
    distinct = 1 + (np.diff(np.sort(a, axis=1), axis=1) != 0).sum(axis=1)
    total = cost[np.arange(cost.shape[0]), a].sum(axis=1) + format_cost * distinct
    best = {k: total[distinct == k].min() for k in np.unique(distinct).tolist()}
    return {k: min(v for kk, v in best.items() if kk <= k) for k in range(1, cost.shape[1] + 1)
            if any(kk <= k for kk in best)}


def _unimodal_table(rng, v, m):
    centre = rng.integers(0, m, v)
    f = np.arange(m)[None, :]
    return rng.uniform(0.1, 3, (v, 1)) * np.abs(f - centre[:, None]) ** rng.uniform(1, 3, (v, 1)) + rng.uniform(0, 1, (v, 1))


@pytest.fixture
def paths(monkeypatch):
    """The solver's paths each solve() call took (names of the inner routines it called)."""
    taken = set()
    for name in ("_dp_curve", "_exhaustive_curve", "_local_search"):
        inner = getattr(choose_formats, name)

        def spy(*args, _inner=inner, _name=name, **kwargs):
            out = _inner(*args, **kwargs)
            if not (_name == "_exhaustive_curve" and out is None):
                taken.add(_name)
            return out
        monkeypatch.setattr(choose_formats, name, spy)
    return taken


def _check_exact(cost, k, path, paths, widths=None, format_cost=0.0):
    paths.clear()
    chosen, assign, objective, exact, curve = solve(cost, k, widths, format_cost=format_cost)
    assert paths == path
    best = brute_force(cost, format_cost)
    assert exact and len(chosen) <= k
    assert objective == pytest.approx(best[k], rel=1e-12)
    assert objective == pytest.approx(cost[np.arange(len(cost)), assign].sum() + format_cost * len(chosen), rel=1e-12)
    for kk, value in curve.items():
        assert value == pytest.approx(best[kk], rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dynamic_programme_equals_brute_force(seed, k, paths):
    rng = np.random.default_rng(seed)
    _check_exact(_unimodal_table(rng, 7, 6), k, {"_dp_curve"}, paths)   # unimodal rows


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_subset_enumeration_equals_brute_force(seed, k, paths):
    rng = np.random.default_rng(50 + seed)
    _check_exact(rng.uniform(0, 1, (7, 6)), k, {"_exhaustive_curve"}, paths)   # any rows


@pytest.mark.parametrize("seed", range(3))
def test_solver_with_two_widths_and_a_format_cost_equals_brute_force(seed, paths):
    rng = np.random.default_rng(100 + seed)
    a, b = _unimodal_table(rng, 4, 4), rng.uniform(0, 1, (3, 3))
    cost = np.full((7, 7), _BIG)
    cost[:4, :4], cost[4:, 4:] = a, b
    widths = np.array([8] * 4 + [16] * 3)
    for k in (2, 3, 4):
        _check_exact(cost, k, {"_dp_curve", "_exhaustive_curve"}, paths, widths, format_cost=0.05)


@pytest.mark.parametrize("seed", range(3))
def test_too_many_subsets_falls_back_to_local_search_bounded_by_brute_force(seed, paths, monkeypatch):
    monkeypatch.setattr(choose_formats, "EXHAUSTIVE_LIMIT", 0)   # a table too large to enumerate
    cost = np.random.default_rng(150 + seed).uniform(0, 1, (7, 6))
    chosen, assign, objective, exact, _ = solve(cost, 3)
    assert paths == {"_dp_curve", "_local_search"} and not exact and len(chosen) <= 3
    best = brute_force(cost)[3]
    assert best <= objective + 1e-9 and objective <= 1.25 * best
    assert objective == pytest.approx(cost[np.arange(len(cost)), assign].sum())


def test_solver_refuses_fewer_formats_than_widths():
    cost = np.full((2, 4), _BIG)
    cost[0, :2], cost[1, 2:] = 1.0, 1.0
    with pytest.raises(fxc.PolicyError, match="max_formats=1"):
        solve(cost, 1, np.array([8, 8, 16, 16]))


def _compile(policy, model=None):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model = model or ResidualCNN(width=4)
    return fxc.compile(model, policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],),
                       calibration_data=[(x, y)]), x, y


@pytest.fixture(scope="module")
def compiled():
    return _compile(fxc.auto(max_formats=3, bits=16, margin=0))


def test_compiled_model_never_uses_more_than_k_formats(compiled):
    q, _, _ = compiled
    assert len(fxc.assignment(q).formats()) == 3
    q, _, _ = _compile(fxc.auto(max_formats=1, bits=16))
    assert fxc.assignment(q).formats() == {q.meta["fxc_solution"].formats[0]}
    q, _, _ = _compile(fxc.auto(max_formats=2, bits={"activation": 8, "gradient": 8, "weight": 16}))
    formats = fxc.assignment(q).formats()
    assert len(formats) == 2 and {b for b, _ in formats} == {8, 16}


def test_adder_inputs_and_fan_out_gradients_share_a_binary_point(compiled):
    q, _, _ = compiled
    nodes = {n.name: n for n in q.graph.nodes}
    add = nodes["add"]
    # the values meeting in the residual add share their forward frac
    fracs = {a.meta["fxc_edge"].forward.frac for a in add.all_input_nodes}
    assert len(fracs) == 1
    # relu1 fans out to conv2 and the add: the two gradients summed into it share a frac
    uses = nodes["relu1"].meta["fxc_uses"]
    assert set(uses) == {"conv2", "add"}
    assert uses["conv2"].backward.frac == uses["add"].backward.frac


def test_gradient_fracs_follow_gradient_magnitudes(compiled):
    q, _, _ = compiled
    nodes = {n.name: n for n in q.graph.nodes}
    conv1 = nodes["conv1"]
    stats = conv1.meta["fxc_stats"]
    bwd = conv1.meta["fxc_value"].backward
    # the chosen gradient format neither saturates nor flushes most calibrated gradients
    assert stats.gradient.overflow_rate(bwd) == 0.0
    assert stats.gradient.underflow_rate(bwd) < 0.05
    assert bwd.frac > conv1.meta["fxc_value"].forward.frac


def test_solution_beats_one_format_from_the_global_max_and_trains(compiled):
    q, x, y = compiled
    sol = q.meta["fxc_solution"]
    assert sol.exact and sol.objective <= sol.baseline_objective
    assert sorted(sol.curve) == [1, 2, 3] and sol.curve[3] <= sol.curve[2] <= sol.curve[1]
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    loss = q.loss(q(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in q.parameters())


@pytest.mark.parametrize("seed", range(4))
def test_heuristic_for_several_widths_per_decision_is_bounded_by_brute_force(seed, paths):
    rng = np.random.default_rng(200 + seed)
    cost = _unimodal_table(rng, 7, 6)
    cost[::3, :3] = _BIG  # some decisions may only take the wider candidates
    widths = np.array([8] * 3 + [16] * 3)
    chosen, assign, objective, exact, _ = solve(cost, 3, widths)
    assert paths == {"_local_search"} and not exact and len(chosen) <= 3
    best = brute_force(cost)[3]
    assert best <= objective + 1e-9
    assert objective == pytest.approx(cost[np.arange(len(cost)), assign].sum())
    assert objective <= 1.25 * best  # swap search lands close on tables this small


def test_drift_directions_by_role():
    """Activations and weights may grow, gradients and the loss value shrink, the input stays."""
    from fxcompile.passes.calibrate import TensorStats
    from fxcompile.passes.choose_formats import _Decision, _expected_nsr
    stats = TensorStats().update(torch.linspace(-3, 3, 1001))
    fracs = np.arange(0, 16)
    still = _expected_nsr(_Decision((0, "x", "fwd"), "input", (8,), stats, "nearest"), 8, fracs, 0)

    def best(role, slot, margin=3):
        return int(fracs[np.argmin(_expected_nsr(_Decision((0, "v", slot), role, (8,), stats, "nearest"),
                                                 8, fracs, margin))])
    assert np.array_equal(_expected_nsr(_Decision((0, "x", "fwd"), "input", (8,), stats, "nearest"), 8, fracs, 3),
                          still)
    at_rest = int(fracs[np.argmin(still)])
    assert best("activation_out", "fwd") < at_rest and best("weight", "fwd") < at_rest   # room to grow
    assert best("loss", "fwd") >= at_rest and best("gradient", "bwd") >= at_rest          # finer, or equal
    assert best("loss", "fwd") == best("gradient", "bwd")


def _auto_warnings(policy):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, _, _ = _compile(policy)
    return q, [str(w.message) for w in caught if "will likely stall" in str(w.message)]


def test_a_choice_that_flushes_most_gradients_warns_and_names_the_edge():
    q, found = _auto_warnings(fxc.auto(max_formats=1, bits=8))
    (bits, frac), = fxc.assignment(q).formats()
    assert len(found) == 1 and "flushes" in found[0] and "gradient of" in found[0], found
    assert f"{bits}.{frac} flushes" in found[0]  # names the chosen format
    # the numbers it quotes are the calibration's: recompute the worst from the statistics
    rate = max(n.meta["fxc_stats"].gradient.underflow_rate(n.meta["fxc_value"].backward)
               for n in q.graph.nodes
               if n.meta.get("fxc_stats") is not None and n.meta["fxc_stats"].gradient is not None
               and n.meta.get("fxc_value") is not None and n.meta["fxc_value"].backward_role == "gradient")
    assert f"{100 * rate:.0f} %" in found[0]
    # more formats, or stochastic gradients, and the warning goes
    assert _auto_warnings(fxc.auto(max_formats=3, bits=16))[1] == []
    assert _auto_warnings(fxc.auto(max_formats=1, bits=8, gradient_rounding="stochastic"))[1] == []


@pytest.mark.parametrize("objective", ["nsr", "sensitivity"])
def test_predicted_is_the_objective_at_the_common_drift_for_every_width(objective):
    from fxcompile.passes.choose_formats import PREDICTION_DRIFT
    # at the common drift the prediction is the objective itself
    sol = _compile(fxc.auto(max_formats=3, bits=16, objective=objective, margin=PREDICTION_DRIFT))[0].meta["fxc_solution"]
    assert sol.predicted == pytest.approx(sol.objective, rel=1e-9)
    # 8 bits choose with a 1-octave margin; the prediction still scores 4 octaves of drift, which
    # costs more than 1 (the formats kept less headroom than that drift)
    sol = _compile(fxc.auto(max_formats=3, bits=8, objective=objective))[0].meta["fxc_solution"]
    assert sol.predicted > sol.objective > 0
