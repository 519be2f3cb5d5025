"""Well-known models compile and train one step (benchmarks/model_zoo.py).

The default run checks one small torchvision builder in-process; ``-m slow`` runs the three
zoos (torchvision, a timm sample, Hugging Face architectures), one worker process per zoo.
"""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "model_zoo.py"


def _zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_small_builder_compiles_and_trains_one_step():
    rec = _zoo().check("torchvision", "squeezenet1_0")
    assert rec["status"] == "ok", rec
    assert rec["casts"] > 10 and rec["size"] == 64 and rec["frontend"] == "fx"


def test_the_two_largest_builders_are_skipped_without_being_built():
    zoo = _zoo()
    assert set(zoo.TORCHVISION_SKIP) <= set(zoo.names("torchvision"))
    rec = zoo.check("torchvision", "vit_h_14")
    assert rec["status"] == "skipped" and "params" not in rec


@pytest.mark.slow
def test_model_zoo(capsys, tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    zoo = _zoo()
    records = []
    for name in zoo.ZOOS:
        records += zoo.run(name, zoo.names(name), str(tmp_path / "model_zoo.jsonl"), 900)
    with capsys.disabled():
        print("\n" + zoo.summary(records))
    for name, share in (("torchvision", 1.0), ("timm", 0.97), ("hf", 1.0)):
        recs = [r for r in records if r["zoo"] == name and r["status"] != "skipped"]
        assert sum(r["status"] == "ok" for r in recs) >= share * len(recs), name
