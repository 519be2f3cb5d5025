"""The hls4ml_dsps budget: hls4ml's own DSP estimate of the deployed model, kept by the solver."""

import itertools
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from tests.deploy.backends.test_hls4ml import TinyCNN
from fxcompile.core.formats import MAX_BITS
from fxcompile.experiments.models import SeedCNN
from fxcompile.passes.choose_formats import _BIG, Budget, dsp_estimator, hls4ml_layer_dsps, solve

WIDTHS = (6, 8, 12, 16)


def _step_problem(seed, v=5, per_width=2):
    """A random cost table over widths 6/8/12/16 (narrower is noisier), a DSP-like budget
    (a term per row that costs its size from 9 bits up, nothing below) and a memory-like one."""
    rng = np.random.default_rng(seed)
    widths = np.repeat(WIDTHS, per_width)
    cost = rng.uniform(0, 1, (v, len(widths))) * (16.0 / widths)[None, :] ** 2
    cost[rng.uniform(size=v) < 0.2, :per_width] = _BIG      # some rows may not take 6 bits
    size = rng.integers(1, 50, v).astype(float)
    steps = np.array([[s if b >= 9 else 0.0 for b in range(MAX_BITS + 1)] for s in size])
    rows, none = np.arange(v), np.full(v, -1)
    dsps = Budget("hls4ml_dsps", size.sum() * rng.uniform(0.2, 0.8), np.ones(v), rows, none, steps)
    mem = Budget("weight_memory_bits", float(size.sum() * 16 * rng.uniform(0.6, 1.0)), size, rows, none)
    return cost, widths, [dsps, mem], size


def _brute_force(cost, widths, size, limits):
    """Best objective with at most k distinct candidates over every assignment within both limits
    (DSPs: a row's size when its width is 9 or more; memory: size x width), sharing no code with
    the solver."""
    allowed = [[c for c in range(cost.shape[1]) if cost[d, c] < _BIG] for d in range(cost.shape[0])]
    best = {}
    for a in itertools.product(*allowed):
        w = widths[list(a)]
        if (sum(s for s, b in zip(size, w) if b >= 9) > limits[0] * (1 + 1e-12)
                or sum(s * b for s, b in zip(size, w)) > limits[1] * (1 + 1e-12)):
            continue
        k = len(set(a))
        best[k] = min(best.get(k, np.inf), sum(cost[d, c] for d, c in enumerate(a)))
    return {k: min(x for kk, x in best.items() if kk <= k) for k in range(1, 5) if any(kk <= k for kk in best)}


@pytest.mark.parametrize("seed", range(8))
def test_solver_keeps_a_step_budget_and_lands_near_the_best(seed):
    cost, widths, budgets, size = _step_problem(seed)
    best = _brute_force(cost, widths, size, [b.limit for b in budgets])
    assert 1 in best or 2 in best  # the problem is feasible for some k: the checks below run
    for k in range(1, 5):
        if k not in best:
            with pytest.raises(fxc.PolicyError, match="budget"):
                solve(cost, k, widths, budgets=budgets)
            continue
        chosen, assign, objective, _, _ = solve(cost, k, widths, budgets=budgets)
        w = widths[assign]
        assert len(set(assign.tolist())) <= k
        assert sum(s for s, b in zip(size, w) if b >= 9) <= budgets[0].limit * (1 + 1e-12)
        assert budgets[0].usage(w) == sum(s for s, b in zip(size, w) if b >= 9)
        assert objective >= best[k] * (1 - 1e-12) and objective <= 1.3 * best[k]


@pytest.mark.parametrize("seed", range(4))
def test_budget_delta_is_the_exact_change_of_a_one_row_move(seed):
    """Budget.delta (what the solver's repair ranks moves by) against recomputing the usage, for
    linear, bilinear (with a row paired with itself) and step terms."""
    rng = np.random.default_rng(seed)
    v = 6
    steps = rng.integers(0, 9, (4, MAX_BITS + 1)).astype(float)
    budgets = [Budget("m", 1.0, rng.uniform(1, 5, 4), rng.integers(v, size=4), np.full(4, -1)),
               Budget("b", 1.0, rng.uniform(1, 5, 4), np.array([0, 1, 2, 3]), np.array([3, 1, 4, 0])),
               Budget("d", 1.0, rng.uniform(1, 5, 4), rng.integers(v, size=4), np.full(4, -1), steps)]
    w = rng.choice(WIDTHS, v).astype(float)
    new = np.array(WIDTHS, dtype=float)
    for b in budgets:
        d = b.delta(w, new)
        assert d.shape == (v, len(new))
        for r, j in itertools.product(range(v), range(len(new))):
            moved = w.copy()
            moved[r] = new[j]
            assert d[r, j] == pytest.approx(b.usage(moved) - b.usage(w), rel=1e-12, abs=1e-9)
        assert np.abs(d).max() > 0


def test_the_layer_estimate_is_hls4mls_estimator():
    est = dsp_estimator()
    assert est.__name__ == "VivadoDSPEstimator"
    assert hls4ml_layer_dsps((32, 1, 3, 3), 16) == 288 and hls4ml_layer_dsps((32, 1, 3, 3), 8) == 0
    assert hls4ml_layer_dsps((10, 128), 9, reuse_factor=4) == 320
    import sys
    assert not any(m.startswith("hls4ml.optimization.dsp_aware_pruning") for m in sys.modules)


def _seed_cnn(bits=(8, 16), **options):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    return fxc.compile(SeedCNN(), fxc.auto(max_formats=3, bits=bits, **options), loss_fn=nn.CrossEntropyLoss(),
                       example_inputs=(x[:2],), calibration_data=[(x, y)])


def _weights(q):
    return {r.producer: (tuple(r.shape), r.forward.bits) for r in fxc.assignment(q)
            if r.role == "weight" and r.consumer == "*"}


def test_seed_cnn_keeps_within_the_dsp_budget():
    free = _seed_cnn()
    full = free.meta["fxc_solution"].usage["hls4ml_dsps"]
    assert full == sum(hls4ml_layer_dsps(s, 16) for s, _ in _weights(free).values()) > 0
    assert all(bits == 16 for _, bits in _weights(free).values())
    for limit in (full / 2, 0):
        q = _seed_cnn(hls4ml_dsps=limit)
        sol, weights = q.meta["fxc_solution"], _weights(q)
        used = sum(hls4ml_layer_dsps(s, b) for s, b in weights.values())
        assert sol.usage["hls4ml_dsps"] == used <= limit
        assert any(b < 9 for _, b in weights.values())
        assert sol.objective >= free.meta["fxc_solution"].objective   # a budget costs noise, never saves it
    assert all(b < 9 for _, b in weights.values())  # no DSPs at all: every weight narrow
    # the reuse factor divides every layer's multipliers
    q = _seed_cnn(hls4ml_reuse_factor=4, hls4ml_dsps=full / 8)
    wide = [s for s, b in _weights(q).values() if b >= 9]
    assert q.meta["fxc_solution"].usage["hls4ml_dsps"] == sum(np.prod(s) // 4 for s in wide) <= full / 8
    assert wide and len(wide) < len(_weights(q))


def test_auto_validates_the_dsp_budget_and_reuse_factor(monkeypatch):
    for bad in (-1, "100", True, float("nan")):
        with pytest.raises(fxc.PolicyError, match="hls4ml_dsps"):
            fxc.auto(hls4ml_dsps=bad)
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(fxc.PolicyError, match="hls4ml_reuse_factor"):
            fxc.auto(hls4ml_reuse_factor=bad)
    policy = fxc.auto(hls4ml_dsps=5000, hls4ml_reuse_factor=2)
    assert "hls4ml_dsps=5000" in policy.describe() and "hls4ml_reuse_factor=2" in policy.describe()
    assert "hls4ml" not in fxc.auto().describe()
    monkeypatch.setitem(__import__("sys").modules, "hls4ml", None)   # as if hls4ml were not installed
    with pytest.raises(fxc.PolicyError, match=r"hls4ml_dsps.*pip install 'fxcompile\[hls\]'"):
        fxc.auto(hls4ml_dsps=5000)
    fxc.auto(hls4ml_reuse_factor=2)   # no budget: nothing to estimate


def _tiny(policy):
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 5, (16,))
    return fxc.compile(TinyCNN(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],),
                       calibration_data=[(x, y)]), x


def test_a_dsp_budget_below_the_least_possible_usage_is_refused_by_name():
    # weights of 12 or 16 bits: both layers take their DSPs (conv 72, fc 320) whichever the solver picks
    with pytest.raises(fxc.PolicyError, match="hls4ml_dsps budget .*below 392"):
        _tiny(fxc.auto(max_formats=3, bits=(12, 16), hls4ml_dsps=391))
    q, _ = _tiny(fxc.auto(max_formats=3, bits=(12, 16), hls4ml_dsps=392))
    assert q.meta["fxc_solution"].usage["hls4ml_dsps"] == 392


def test_without_hls4ml_the_usage_is_left_out_unless_the_budget_is_set(monkeypatch):
    q, _ = _tiny(fxc.auto(max_formats=3, bits=(8, 16)))
    assert q.meta["fxc_solution"].usage["hls4ml_dsps"] == 72 + 320
    monkeypatch.setitem(__import__("sys").modules, "hls4ml", None)   # as if hls4ml were not installed
    dsp_estimator.cache_clear()
    try:
        q, _ = _tiny(fxc.auto(max_formats=3, bits=(8, 16)))
        assert set(q.meta["fxc_solution"].usage) == {"weight_memory_bits", "bops"}
        with pytest.raises(fxc.PolicyError, match="hls4ml_dsps.*needs hls4ml"):
            dsp_estimator()
    finally:
        dsp_estimator.cache_clear()


@pytest.mark.parametrize("reuse_factor", [1, 4])
def test_usage_is_hls4mls_estimate_of_the_converted_model(tmp_path, reuse_factor):
    """The budget's usage against hls4ml's estimator summed over the layers of the model
    fxc.to_hls4ml hands to hls4ml, with the weight precision and reuse factor hls4ml holds
    (to_hls4ml deploys the reuse factor the budget assumed)."""
    pytest.importorskip("hls4ml")
    from fxcompile.deploy.backends.hls4ml import to_hls4ml
    # conv: 72 multipliers, fc: 320; 100 DSPs leave room for the conv's only (the nsr
    # objective keeps the conv's weights at 16 bits then: one layer on each side of the step)
    q, x = _tiny(fxc.auto(max_formats=3, bits=(8, 16), objective="nsr", hls4ml_dsps=100 // reuse_factor,
                          hls4ml_reuse_factor=reuse_factor))
    hls_model = to_hls4ml(q, tmp_path / "prj", example_inputs=(x[:1],), write=False)
    total, widths = 0, []
    for layer in hls_model.get_layers():
        if "weight" not in layer.weights:
            continue
        weight = layer.weights["weight"]
        attrs = NS(weight_shape=tuple(weight.data.shape),
                   args={"hls4ml_attributes": NS(weight_precision=weight.type.precision,
                                                 reuse_factor=layer.get_attr("reuse_factor"), strategy="latency")})
        total += int(dsp_estimator().layer_resources(attrs)[0])
        widths.append(weight.type.precision.width)
        assert layer.get_attr("reuse_factor") == reuse_factor, layer.name
    assert sorted(widths) == [8, 16]   # one layer on each side of hls4ml's 9-bit step
    assert total == q.meta["fxc_solution"].usage["hls4ml_dsps"] == 72 // reuse_factor


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_to_hls4ml_refuses_a_reuse_factor_that_is_no_positive_int(tmp_path, bad):
    pytest.importorskip("hls4ml")
    from fxcompile.deploy.backends.hls4ml import to_hls4ml
    q, x = _tiny(fxc.auto(max_formats=3, bits=(8, 16)))
    with pytest.raises(fxc.ExportError, match="reuse_factor"):
        to_hls4ml(q, tmp_path / "prj", example_inputs=(x[:1],), write=False, reuse_factor=bad)
