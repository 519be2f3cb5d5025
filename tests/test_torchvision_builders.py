"""torchvision's classification builders compile and train one step (benchmarks/torchvision_builders.py).

The default run checks two small builders in-process; ``-m slow`` checks every builder, one
subprocess each (about an hour on two cores), and prints the summary.
"""

import importlib.util
from pathlib import Path

import pytest
import torchvision

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "torchvision_builders.py"


def _builders():
    spec = importlib.util.spec_from_file_location("torchvision_builders", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["squeezenet1_0"])
def test_small_builders_compile_and_train_one_step(name):
    rec = _builders().check(name)
    assert rec["status"] == "ok", rec
    assert rec["casts"] > 10 and rec["size"] == 64


def test_oversized_builders_are_skipped_not_run():
    rec = _builders().check("resnet18", max_params=1000)
    assert rec["status"] == "skipped_too_large" and rec["params"] > 1000


@pytest.mark.slow
def test_every_builder(capsys):
    b = _builders()
    records = b.run_all(timeout=900)
    with capsys.disabled():
        print("\n" + b.summary(records))
    names = torchvision.models.list_models(module=torchvision.models)
    assert [r["model"] for r in records] == names
    for r in records:
        if r["status"] == "trace_error":  # a TraceError says where and how to fix it
            assert "module" in r["error"] and "leaf" in r["error"], r
    assert sum(r["status"] == "ok" for r in records) >= 0.8 * len(names)
