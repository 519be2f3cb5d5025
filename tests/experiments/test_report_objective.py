import json

import pytest

from fxcompile.experiments.report import _pareto, report, spearman


def test_spearman_matches_the_rank_difference_formula():
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); here d = (0, 1, -1, 0)
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [5, 5, 6, 7]) == pytest.approx(0.9486832980505138)   # a tie: average ranks


def test_pareto_front_keeps_only_points_nothing_beats():
    assert _pareto([(3, 84.0), (1, 80.0), (4, 90.0), (2, 85.0), (2, 70.0)]) == [(1, 80.0), (2, 85.0), (4, 90.0)]


def test_cost_model_report_plots_accuracy_against_objective_and_budgets(tmp_path):
    runs = [{"policy": f"auto(K={k})", "seed": 0, "accuracy": acc, "objective": obj, "formats": ["16.10"],
             "usage": {"weight_memory_bits": mem, "bops": 2 * mem, "hls4ml_dsps": mem // 10}}
            for k, acc, obj, mem in [(1, 0.10, 1e-2, 100), (2, 0.90, 1e-4, 200), (3, 0.91, 1e-5, 300), (4, 0.905, 2e-5, 400)]]
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"command": "x", "date": "d", "runs": runs}))
    text = report([path], tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    rho = spearman([-r["objective"] for r in runs], [r["accuracy"] for r in runs])
    assert rho == pytest.approx(1.0) and f"Spearman rank correlation (minus objective, accuracy) {rho:.2f}" in summary
    for name in ("objective_vs_accuracy.png", "pareto_weight_memory_bits.png", "pareto_bops.png",
                 "pareto_hls4ml_dsps.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0 and name in summary
    assert "| hls4ml DSPs |" in summary and "| 300 | 600 | 30 | 91.00 |" in summary
    assert "auto(K=3)" in text and "91.00" in text


def test_cost_model_report_ranks_fixed_format_runs_by_the_objective_at_the_common_drift(tmp_path):
    # the predictions rank these runs perfectly and the solver's objectives backwards; a run whose
    # formats moved during training (re-assignment) is listed but not ranked, and so is one trained
    # with another gradient rule at the prediction
    runs = [{"policy": f"auto(K={k})", "seed": 0, "accuracy": acc, "objective": obj, "predicted": pred}
            for k, acc, obj, pred in [(1, 0.10, 1e-5, 1e-1), (2, 0.90, 1e-4, 1e-3), (3, 0.91, 1e-3, 1e-4)]]
    runs.append({"policy": "auto(K=1)", "seed": 1, "accuracy": 0.05, "objective": 1e-9,
                 "reassign": {"every": 200}})
    # nor is a run trained with another gradient rule at the prediction (same formats, same score)
    runs.append({"policy": "auto(K=1, prediction_gradient=inward)", "seed": 0, "accuracy": 0.95, "objective": 1e-5,
                 "predicted": 1e-1})
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"command": "x", "date": "d", "runs": runs}))
    report([path], tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "3 runs with fixed formats" in summary
    assert "(minus objective at the common drift, accuracy) 1.00 (with the solver's objective instead: -1.00)" in summary
    assert "| 4 | auto(K=1), reassign every 200 | 1 |" in summary and "| 0.1 |" in summary
