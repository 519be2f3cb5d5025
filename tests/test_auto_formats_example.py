"""examples/auto_formats.py names each run's file by everything that changes the run."""

import importlib.util
import json
from pathlib import Path

import pytest

from fxcompile.training.reassign import Reassign
from tests.helpers import REPO

_PATH = Path(__file__).resolve().parents[1] / "examples" / "auto_formats.py"
_spec = importlib.util.spec_from_file_location("auto_formats_example", _PATH)
auto_formats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_formats)


def test_reassign_settings_give_distinct_run_files():
    schedules = [Reassign(every=200), Reassign(every=100), Reassign(every=200, rechoose=True),
                 Reassign(every=200, saturation=0.01), Reassign(every=200, underflow=0.01),
                 Reassign(every=200, headroom=2),
                 Reassign(every=200, headroom=0)]
    stems = [auto_formats._reassign_stem(r) for r in schedules]
    assert len(set(stems)) == len(stems), stems
    # runs made before the saturation and headroom options were recorded keep their names
    assert stems[0] == "-reassign200" and stems[2] == "-reassign200-rechoose"


def test_label_names_the_schedule():
    row = {"policy": "auto:3", "reassign": Reassign(every=200, saturation=0.01, underflow=0.2, headroom=2).to_dict()}
    label = auto_formats._label(row)
    assert "every 200" in label and "saturation > 0.01" in label and "underflow > 0.2" in label
    assert "headroom 2" in label
    assert auto_formats._label({"policy": "auto:3"}) == "auto:3"


def _block(text: str, marker: str) -> str:
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


@pytest.mark.parametrize("marker, results, fp32", [
    ("TABLE_MAIN", "auto_formats.json", "study.json"),
    ("TABLE_PROXY", "auto_formats_proxy.json", "auto_formats_proxy_fp32.json"),
])
def test_results_tables_are_their_results_files(marker, results, fp32):
    """benchmarks/auto_formats_results.md's tables are ``examples/auto_formats.py --table``'s
    output for the results files, row for row."""
    doc = (REPO / "benchmarks" / "auto_formats_results.md").read_text()
    load = lambda name: json.loads((REPO / "benchmarks" / "results" / name).read_text())  # noqa: E731
    assert _block(doc, marker) == auto_formats.table(load(results), load(fp32))


def test_table_groups_seeds_and_compares_with_fp32():
    run = {"policy": "auto(K=2, bits=16, objective=nsr)", "formats": ["16.10", "16.20"], "objective": 1e-3,
           "predicted": 2e-3}
    results = {"runs": [dict(run, seed=1, accuracy=0.91), dict(run, seed=0, accuracy=0.92),
                        dict(run, seed=0, accuracy=0.5, policy="auto(K=1, bits=16, objective=nsr)")]}
    lines = auto_formats.table(results, {"policies": {"fp32": {"mean": 92.0}}}).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| K=1,") and "50.00 % | -42.00 |" in lines[2]
    assert "92.00 (0), 91.00 (1) | 91.50 ± 0.71 % | -0.50 |" in lines[3]


def test_argmax_ties_counts_images_whose_top_output_is_shared():
    import torch

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    out = torch.tensor([[2.0, 2.0, 0.0], [2.0, 1.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    model = Fixed().train()
    assert auto_formats.argmax_ties(model, (out, None), batch_size=3) == 3
    assert model.training  # left as it was


def test_results_rank_runs_of_the_default_gradient_rule_and_pool_the_others(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = [("auto(K=1)", 0.10, 1e-1), ("auto(K=2)", 0.90, 1e-3), ("auto(K=3)", 0.91, 1e-4),
            ("auto(K=1, prediction_gradient=inward)", 0.95, 1e-1)]
    for i, (policy, acc, pred) in enumerate(rows):
        (runs / f"r{i}.json").write_text(json.dumps({"policy": policy, "seed": 0, "accuracy": acc, "objective": pred,
                                                     "predicted": pred}))
    out = auto_formats.write_results(runs, tmp_path / "results.json")
    assert out["spearman_predicted_runs"] == 3 and out["spearman_predicted_accuracy"] == pytest.approx(1.0)
    # pooled: ranks of -predicted (1.5, 3, 4, 1.5) against accuracy's (1, 2, 3, 4): 0.5 / sqrt(4.5 * 5)
    assert out["spearman_pooled_runs"] == 4 and out["spearman_predicted_accuracy_pooled"] == pytest.approx(0.5 / 22.5 ** 0.5)
    assert len(out["runs"]) == 4  # every run is listed
