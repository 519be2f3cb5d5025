"""Sweeps over hardware budgets: points whose formats fxc.auto chooses, and their report."""

import json

import pytest

from fxcompile.core.auto import Auto
from fxcompile.experiments.report import auto_runs, report
from fxcompile.experiments.sweep import SweepError, load_sweep, read_rows, run_sweep

# the MLP's weights and biases take 1.88e6 bits at 8 bits and 3.76e6 at 16 bits
BUDGETS = """
name = "budgets"
seeds = 1

[defaults]
dataset = "synthetic"
synthetic_train = 96
synthetic_test = 48
model = "mlp"
epochs = 1
batch_size = 16
policy = "auto"
auto.max_formats = 3
auto.bits = [8, 16]
auto.calibration_batches = 2

[[points]]
policy = "fp32"

[[grid]]
auto.weight_memory_bits = [2500000, 4000000]
"""


def _write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_budgets_expand_into_one_auto_point_each(tmp_path):
    sweep = load_sweep(_write(tmp_path, BUDGETS + "auto.bops = [1e7, 2e7, 4e7]\n"))
    auto = [p for p in sweep.points if p.is_auto]
    assert len(sweep.points) == 7 and len(auto) == 6
    fp32 = [p for p in sweep.points if not p.is_auto]
    assert fp32[0].config["policy"] is None and "auto" not in json.dumps(fp32[0].config)
    pairs = {(p.config["policy"]["auto"]["weight_memory_bits"], p.config["policy"]["auto"]["bops"]) for p in auto}
    assert pairs == {(m, b) for m in (2500000, 4000000) for b in (1e7, 2e7, 4e7)}
    policy = auto[0].policy()
    assert isinstance(policy, Auto) and policy.max_formats == 3 and policy.bits_for("weight") == (8, 16)
    assert (policy.weight_memory_bits, policy.bops) == (2500000, 1e7)
    assert auto[0].config["policy_name"].startswith("auto(") and "weight_memory_bits=2500000" in auto[0].label
    assert len({p.id for p in auto}) == 6 and all(set(p.formats().values()) == {"auto"} for p in auto)


def test_per_role_widths_and_the_width_string_name_the_same_choice(tmp_path):
    a = load_sweep(_write(tmp_path, BUDGETS.replace('auto.bits = [8, 16]', 'auto.bits.activation = "8/16"\n'
                                                    'auto.bits.weight = 16'), "a.toml"))
    b = load_sweep(_write(tmp_path, BUDGETS.replace('auto.bits = [8, 16]', 'auto.bits.weight = 16\n'
                                                    'auto.bits.activation = [16, 8]'), "b.toml"))
    assert [p.id for p in a.points] == [p.id for p in b.points]
    assert a.points[1].policy().bits_for("activation") == (8, 16) and a.points[1].policy().bits_for("weight") == (16,)


def test_points_without_auto_keep_their_ids(tmp_path):
    # the ids that results files written before auto points existed hold for these points
    text = """
seeds = 1
[defaults]
dataset = "synthetic"
model = "mlp"
epochs = 1
[[points]]
policy = "fp32"
[[points]]
policy = "baseline"
loss_scale = 8
[[grid]]
weight.frac_share = [0.25, 0.5]
[[grid]]
policy = ["8bit"]
reassign_every = [50]
"""
    ids = [("policy=fp32", "6362f286b185"), ("policy=baseline loss_scale=8", "fccab6de23fa"),
           ("weight.frac_share=0.25", "59fc0112aaf2"), ("weight.frac_share=0.5", "57a44aeb6bef"),
           ("policy=8bit reassign_every=50", "22b044ac0ea0")]
    assert [(p.label, p.id) for p in load_sweep(_write(tmp_path, text)).points] == ids
    # auto.* settings apply only to policy = "auto" points: the others keep their ids beside them
    with_auto = text.replace('epochs = 1\n', 'epochs = 1\nauto.weight_memory_bits = 1e6\n', 1)
    assert [(p.label, p.id) for p in load_sweep(_write(tmp_path, with_auto, "b.toml")).points] == ids


@pytest.mark.parametrize("line, words", [
    ("auto.weight_memory_bits = -1", ["auto.weight_memory_bits", "positive"]),
    ("auto.weight_memory_bits = 0", ["auto.weight_memory_bits", "positive"]),
    ('auto.bops = "a lot"', ["auto.bops", "'a lot'"]),
    ("auto.bops = true", ["auto.bops"]),
    ("auto.max_formats = 0", ["auto.max_formats"]),
    ("auto.hls4ml_dsps = -1", ["auto.hls4ml_dsps", ">= 0"]),
    ("auto.hls4ml_reuse_factor = 0", ["auto.hls4ml_reuse_factor", "positive int"]),
    ('auto.objective = "accuracy"', ["auto.objective", "accuracy"]),
    ('auto.bits = "8/x"', ["auto.bits", "8/x"]),
    ("auto.budget = 3", ["auto.budget", "weight_memory_bits"]),
    ("weight.bits = 8", ["weight.bits", "auto"]),
])
def test_bad_auto_values_name_the_key(tmp_path, line, words):
    path = _write(tmp_path, BUDGETS + "[[points]]\n" + line + "\n")
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_a_dsp_budget_sweeps_like_the_others(tmp_path):
    """auto.hls4ml_dsps (no DSPs at all included) gives one point each, with its reuse factor."""
    sweep = load_sweep(_write(tmp_path, BUDGETS.replace("auto.weight_memory_bits = [2500000, 4000000]",
                                                        "auto.hls4ml_dsps = [0, 20000]\nauto.hls4ml_reuse_factor = [2]")))
    auto = [p.policy() for p in sweep.points if p.is_auto]
    assert sorted((a.hls4ml_dsps, a.hls4ml_reuse_factor) for a in auto) == [(0, 2), (20000, 2)]
    assert any("hls4ml_dsps=20000" in p.label for p in sweep.points)


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budgets")
    sweep = load_sweep(_write(tmp, BUDGETS))
    out = run_sweep(sweep, tmp / "r.csv", workers=1, progress=False)
    return sweep, out


def test_a_budget_sweep_records_formats_objective_and_usage_within_budget(budget_sweep):
    sweep, out = budget_sweep
    rows = read_rows(out)
    assert len(rows) == 3
    meta = {m["point"]: m for m in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines())}
    usages = []
    for p in sweep.points:
        result = meta[p.id]["result"]
        row = next(r for r in rows if r["point"] == p.id)
        if not p.is_auto:
            assert "objective" not in result and row["weight"] == "float"
            continue
        budget = p.config["policy"]["auto"]["weight_memory_bits"]
        assert result["budgets"] == {"weight_memory_bits": budget}
        assert 0 < result["usage"]["weight_memory_bits"] <= budget and result["usage"]["bops"] > 0
        assert result["objective"] > 0 and 1 <= len(result["formats"]) <= 3
        assert result["distinct_formats"] <= 3
        # the CSV's role columns hold the chosen formats
        assert set(row["weight"].split()) <= set(result["formats"]) and row["activation"] != "auto"
        usages.append((budget, result["usage"]["weight_memory_bits"], result["objective"]))
    (small, used_small, obj_small), (large, used_large, obj_large) = sorted(usages)
    # the tighter budget binds: narrower widths, more predicted noise
    assert used_small < used_large and obj_small > obj_large


def test_the_report_of_a_budget_sweep_draws_the_pareto_fronts(budget_sweep, tmp_path):
    sweep, out = budget_sweep
    runs = auto_runs([out], read_rows(out))
    assert len(runs) == 2 and all({"objective", "usage", "formats"} <= set(r) for r in runs)
    text = report([out], tmp_path / "rep")
    summary = (tmp_path / "rep" / "summary.md").read_text()
    for name in ("objective_vs_accuracy.png", "pareto_weight_memory_bits.png", "pareto_bops.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0 and name in summary and name in text
    assert "Formats chosen by the cost model" in summary
    assert all(r["policy"] in summary for r in runs)


def test_auto_runs_read_only_the_finished_runs_of_the_results(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("")
    recs = [{"point": p, "seed": 0, "label": p, "config": {"policy_name": f"auto({p})"},
             "result": {"accuracy": a, "objective": o, "usage": {"bops": b}, "formats": ["8.4"]}}
            for p, a, o, b in [("a", 0.5, 3.0, 10), ("b", 0.7, 2.0, 20), ("c", 0.9, 1.0, 40)]]
    csv.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"point": "d", "se')
    runs = auto_runs([csv], [{"point": "a", "seed": "0"}, {"point": "c", "seed": "0"}])
    assert [r["policy"] for r in runs] == ["auto(a)", "auto(c)"] and runs[1]["usage"] == {"bops": 40}


def test_a_budget_no_width_meets_names_the_budget(tmp_path):
    sweep = load_sweep(_write(tmp_path, BUDGETS.replace("[2500000, 4000000]", "[1000]")))
    with pytest.raises(SweepError, match="weight_memory_bits"):
        run_sweep(sweep, tmp_path / "r.csv", workers=1, progress=False)
