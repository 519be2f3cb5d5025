"""The ONNX forms of softmax, LayerNorm and table lookups: both forms of each (one int64
division, or the longer one kept for numerators that could leave int64) equal the integer
reference; the example ViT's saved states resume and export; the latency benchmark times it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core.formats import as_format
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.backends.onnx import emitters, to_onnx
from fxcompile.deploy.export import integer_graph, onnx_session

REPO = Path(__file__).resolve().parents[2]


class _Block(nn.Module):
    """LayerNorm over rows of ``n``, then softmax and GELU: the three ops this file is about."""

    def __init__(self, n: int):
        super().__init__()
        torch.manual_seed(1)
        self.norm = nn.LayerNorm(n)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2.0)
            self.norm.bias.uniform_(-1.0, 1.0)

    def forward(self, x):
        y = self.norm(x)
        return torch.cat([torch.softmax(y * 4.0, -1), nn.functional.gelu(y)], -1)


def _rows(n: int, seed: int) -> torch.Tensor:
    """Rows of 16.8 codes of four spreads, and rows with repeated codes (softmax ties)."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([1, 8, 256, 8192]).repeat_interleave(8).reshape(-1, 1, 1)
    codes = torch.randint(-2 ** 15, 2 ** 15, (32, 3, n), generator=g) % (2 * spread + 1) - spread
    repeated = torch.randint(-4, 5, (8, 3, n), generator=g) * 64
    return (torch.cat([codes, repeated]).double() / 256).clamp(-127, 127).float()


@pytest.mark.parametrize("n", [48, 64])
@pytest.mark.parametrize("one_division", [True, False])
def test_softmax_layer_norm_and_lookup_forms_equal_the_reference(n, one_division, monkeypatch):
    if not one_division:
        monkeypatch.setattr(emitters, "_ONE_DIVISION_LIMIT", 0)
    x = _rows(n, seed=n)
    q = fxc.compile(_Block(n), fxc.baseline(), example_inputs=(x[:2],)).eval()
    graph = integer_graph(q, (x[:2],))
    assert {"layer_norm", "softmax", "lookup"} <= {op.op for op in graph.ops}
    model = to_onnx(graph)
    ops = [node.op_type for node in model.graph.node]
    # the two means' floors (exact multiples for rows of 2**L), and z's floor in the longer form
    assert ops.count("Mod") == (0 if n == 64 else 2) + (0 if one_division else 1)
    assert ("Equal" in ops) == one_division                   # softmax's tie test, in its one-division form
    (codes,) = [o for o in onnx_session(model).run(None, {"x": x.numpy()}) if o.dtype == np.int64]
    ref = run_integer(graph, x, codes=True)[0]
    assert torch.equal(torch.from_numpy(codes), ref), f"{int((torch.from_numpy(codes) != ref).sum())} codes differ"


def test_table_lookups_are_gather_elements_not_gather():
    x = _rows(64, seed=3)
    q = fxc.compile(_Block(64), fxc.baseline(), example_inputs=(x[:2],)).eval()
    ops = [node.op_type for node in to_onnx(integer_graph(q, (x[:2],))).graph.node]
    # the exp table and the GELU table: one GatherElements each (Gather is left to isqrt's start)
    assert ops.count("GatherElements") == 2


def test_isqrt_start_from_the_count_of_powers_of_two_for_inputs_known_positive():
    # emit_isqrt without max(k, 1) (lo >= 1) on every bit length's edges
    import math
    from onnx import TensorProto, helper
    from fxcompile.deploy.backends.onnx.builder import OPSET, _Builder
    b = _Builder(None, {})
    out = emitters.emit_isqrt(b, "n", lo=1)
    assert "Max" not in [node.op_type for node in b.nodes]
    graph = helper.make_graph(b.nodes + [helper.make_node("Identity", [out], ["root"])], "isqrt",
                              [helper.make_tensor_value_info("n", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("root", TensorProto.INT64, ["N"])], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 10)
    n = [v for k in range(1, 63) for v in (2 ** k - 1, 2 ** k, 2 ** k + 1)] + [1, 2 ** 63 - 1]
    (root,) = onnx_session(model).run(None, {"n": np.array(n, np.int64)})
    assert root.tolist() == [math.isqrt(v) for v in n]


def _example():
    sys.path.insert(0, str(REPO / "examples"))
    import vit_fashion_mnist
    return vit_fashion_mnist


def test_the_example_saves_its_state_exports_and_resumes(tmp_path, monkeypatch):
    example = _example()
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    test = (torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g))
    settings = dict(epochs=1, batch=32, patch=7, depth=1, loss_scale=16, out=tmp_path, export=True)
    rec = example.run("baseline", 0, train, test, **settings)
    assert (tmp_path / "seed0_baseline_x16.pt").exists() and (tmp_path / "seed0_baseline_x16.onnx").exists()
    assert rec["ort_vs_integer"] == 0 and rec["simulation_vs_integer"] == 0 and rec["output_codes"] == 400
    assert rec["ort_accuracy"] == rec["simulation_accuracy"] == rec["accuracy"]
    assert json.loads((tmp_path / "seed0_baseline_x16.json").read_text()) == rec

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(example, "train", no_training)
    assert example.run("baseline", 0, train, test, **settings) == rec            # the record, as it is
    again = example.run("baseline", 0, train, test, **settings, recheck=True)   # the saved state, exported again
    assert {k: again[k] for k in rec} == rec


def test_the_latency_benchmark_times_the_example_vit_and_writes_its_results(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import onnx_latency
    path = tmp_path / "latency.json"
    onnx_latency.main(["--models", "vit", "--batch", "2", "--repeats", "2", "--results", str(path)])
    record = json.loads(path.read_text())
    (vit,) = [r for r in record["models"] if r["model"] == "vit"]
    run = vit["runs"][0]
    assert run["integer_ms"] > 0 and run["float_ms"] > 0
    assert run["integer_over_float"] == pytest.approx(run["integer_ms"] / run["float_ms"], rel=0.05)
    assert run["mismatches"] == 0 and run["simulation_mismatches"] == 0
    assert record["command"].startswith("python benchmarks/onnx_latency.py --models vit")
    assert "vit" in capsys.readouterr().out
