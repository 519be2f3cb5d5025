"""Report: Student-t intervals against numerical integration, tables and figures from a results CSV."""

import json
import math
import statistics

import pytest

from fxcompile.experiments.report import interval, load_results, markdown_table, report, summarize, t_critical
from fxcompile.experiments.sweep import COLUMNS, FORMAT_ROLES, Point, _line, resolve


def _t_cdf(t: float, df: int, steps: int = 4000) -> float:
    """P(T <= t) by Simpson's rule on Student's t density (independent of any table)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = t / steps
    s = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 15, 24, 30, 35, 50, 90, 200, 1000])
def test_t_critical_is_the_975_quantile(df):
    # within the table's three decimals: the CDF crosses 0.975 between t - 2e-3 and t + 2e-3
    t = t_critical(df)
    assert _t_cdf(t - 2e-3, df) < 0.975 < _t_cdf(t + 2e-3, df)


def test_interval_matches_the_textbook_formula():
    values = [81.0, 83.0, 82.0, 86.0]
    mean, std, half = interval(values)
    assert mean == 83.0 and std == pytest.approx(math.sqrt(14 / 3))
    assert half == pytest.approx(3.182 * math.sqrt(14 / 3) / 2)
    assert math.isnan(interval([80.0])[2])


def _rows(specs):
    """Results rows as the sweep writes them: (settings, label, [accuracy per seed], [history per seed])."""
    lines = [_line(COLUMNS)]
    for settings, label, accs, hists in specs:
        point = Point(resolve(dict({"dataset": "synthetic", "epochs": 3}, **settings), "t"), label)
        formats = point.formats()
        for seed, (acc, hist) in enumerate(zip(accs, hists)):
            row = {"sweep": "s", "point": point.id, "seed": seed, "label": label, "dataset": "synthetic",
                   "model": "seed_cnn", "policy": point.config["policy_name"], **formats, "epochs": 3,
                   "batch_size": point.config["batch_size"], "lr": 0.001, "train_size": 512, "test_size": 256,
                   "accuracy": acc, "history": json.dumps(hist), "final_loss": 0.5, "step_time_ms": 1.0,
                   "wall_time_s": 1.0, "cpu_time_s": 1.0, "config": json.dumps(point.config, sort_keys=True)}
            lines.append(_line(row[k] for k in COLUMNS))
    return "".join(lines)


SPECS = [
    ({"policy": "fp32"}, "policy=fp32", [0.90, 0.92], [[0.8, 0.85, 0.90], [0.8, 0.86, 0.92]]),
    ({"policy": "baseline"}, "policy=baseline", [0.85, 0.86, 0.84], [[0.7, 0.8, 0.85], [0.7, 0.8, 0.86],
                                                                      [0.7, 0.8, 0.84]]),
    ({"policy": "optimized"}, "policy=optimized", [0.80, 0.82], [[0.7, 0.75, 0.80], [0.7, 0.75, 0.82]]),
    ({"weight.frac_share": 0.25}, "weight.frac_share=0.25", [0.10, 0.11], [[0.1] * 3, [0.1, 0.1, 0.11]]),
    ({"weight.frac_share": 0.75}, "weight.frac_share=0.75", [0.84, 0.85], [[0.7, 0.8, 0.84], [0.7, 0.8, 0.85]]),
    ({"activation.frac_share": 0.25}, "activation.frac_share=0.25", [0.83, 0.83], [[0.7, 0.8, 0.83]] * 2),
    ({"batch_size": 64}, "batch_size=64", [0.80, 0.81], [[0.6, 0.7, 0.80], [0.6, 0.7, 0.81]]),
]


def test_report_tables_and_figures(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(_rows(SPECS))
    points = summarize(load_results([csv_path]))
    assert len(points) == len(SPECS)
    text = report([csv_path], tmp_path / "out")
    md = (tmp_path / "out" / "summary.md").read_text()
    table = markdown_table(points)
    # the study's table: FP32, baseline, optimized, in that order, with mean ± std and the t interval
    lines = [line for line in table.splitlines() if line.startswith("| fp32") or line.startswith("| baseline")
             or line.startswith("| optimized")]
    assert [line.split("|")[1].strip() for line in lines] == ["fp32", "baseline", "optimized"]
    base = [85.0, 86.0, 84.0]
    mean, std = statistics.fmean(base), statistics.stdev(base)
    half = 4.303 * std / math.sqrt(3)
    assert f"{mean:.2f} ± {std:.2f}" in lines[1] and f"[{mean - half:.2f}, {mean + half:.2f}]" in lines[1]
    assert f"{mean - 91.0:+.2f}" in lines[1]   # Δ vs FP32 (mean 91 %)
    assert "weight.frac_share=0.25" not in table and table in md and "baseline" in text
    assert [c.strip() for c in lines[0].split("|")[2:7]] == ["float"] * 5
    assert [c.strip().split(",")[0] for c in lines[2].split("|")[2:7]] == ["16.4", "16.9", "16.11", "16.11", "10.8"]
    # figures: the weight and activation lines pass through the baseline point; the batch sweep
    for name in ("frac_share.png", "epochs.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert name in md


def test_role_lines_and_batch_groups_are_found_from_formats(tmp_path):
    from fxcompile.experiments.report import batch_lines, role_lines
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(_rows(SPECS))
    points = summarize(load_results([csv_path]))
    (ref, lines), = role_lines(points)
    assert ref.label == "policy=baseline" and sorted(lines) == ["activation", "weight"]
    assert [p.formats["weight"].split(",")[0] for p in lines["weight"]] == ["24.6", "24.12", "24.18"]
    (group,) = [g for g in batch_lines(points)]
    assert [p.config["batch_size"] for p in group] == [32, 64]
