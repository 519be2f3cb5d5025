"""export_onnx and the runners on input a user gets wrong: wrong shapes, non-finite values;
and the files it writes."""

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxcompile as fxc
from fxcompile.cli import main
from fxcompile.deploy.backends.integer import count_non_finite, run_integer
from fxcompile.deploy.export import export_onnx, integer_graph, onnx_session
from fxcompile.experiments.models import SeedCNN


@pytest.fixture(scope="module")
def seed_cnn():
    torch.manual_seed(0)
    return fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(torch.randn(1, 1, 28, 28),))


@pytest.mark.parametrize("flavour", ["integer", "qdq"])
@pytest.mark.parametrize("shape, node, op", [((1, 3, 28, 28), "conv1", "Conv2d"), ((1, 1, 20, 20), "fc1", "Linear")])
def test_wrong_example_shape_is_one_error_naming_input_shape_and_op(seed_cnn, tmp_path, flavour, shape, node, op, capfd):
    with pytest.raises(fxc.ExportError) as info:
        export_onnx(seed_cnn, tmp_path / "m.onnx", (torch.randn(shape),), flavour=flavour)
    message = str(info.value)
    assert f"example input 'x' of shape {shape}" in message
    assert f"rejected by node '{node}' ({op})" in message
    assert "compiled for (1, 1, 28, 28)" in message
    assert "\n" not in message and "ShapeProp" not in message
    assert "Traceback" not in capfd.readouterr().err  # nothing printed on the way
    assert list(tmp_path.iterdir()) == []


def test_wrong_number_of_example_inputs_is_named(seed_cnn, tmp_path):
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(fxc.ExportError, match=r"takes 1 input\(s\) \('x'\), got 2 example input\(s\)"):
        export_onnx(seed_cnn, tmp_path / "m.onnx", (x, x))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_exported_file_gets_the_permissions_of_the_umask(tmp_path, umask, mode):
    q = fxc.compile(nn.Sequential(nn.Linear(4, 3)), fxc.baseline(), example_inputs=(torch.randn(1, 4),))
    old = os.umask(umask)
    try:
        export_onnx(q, tmp_path / "m.onnx", (torch.randn(1, 4),))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.onnx").st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left


# ---- non-finite inputs ---------------------------------------------------------------------

def _model(input_format):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    policy = fxc.Policy(input=input_format, activation="16.8", weight="16.10", bias="16.8")
    q = fxc.compile(model, policy, example_inputs=(torch.randn(1, 6),)).eval()
    fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.0), q, rounding="nearest")
    return q


def _non_finite_batch():
    x = torch.randn(7, 6) * 4
    x[1, 2], x[3, 0], x[4, 5], x[5, 1], x[5, 4] = float("nan"), float("inf"), float("-inf"), float("nan"), float("inf")
    return x


@pytest.mark.parametrize("input_format", ["16.8", "8.4", "8.4,wrap", "12.3,floor,narrow", "10.2,toward_zero,zp=5"])
def test_simulation_and_integer_graph_agree_on_non_finite_inputs(input_format, tmp_path):
    """The documented behaviour: the deployed input quantizer maps NaN to 0 and ±Inf to its
    format's bounds.  The integer reference and ONNX Runtime do exactly that, i.e. they compute
    the simulation's result for the input with those replacements, bit for bit; the simulation
    itself keeps NaN visible in the rows that held a non-finite input."""
    q = _model(input_format)
    fmt = fxc.FixedPoint.parse(input_format)
    x = _non_finite_batch()
    graph = integer_graph(q, (x[:1],))
    with pytest.warns(UserWarning, match=r"input 'input_1': 2 NaN, 2 \+Inf, 1 -Inf values in 4 sample\(s\)"):
        (ref,) = run_integer(graph, x, codes=True)
    session = onnx_session(fxc.export_onnx(q, tmp_path / "m.onnx", (x[:1],)))
    _, ort = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(ort, ref.numpy())
    replaced = torch.nan_to_num(x, nan=0.0, posinf=fmt.max_value, neginf=fmt.min_value)
    with torch.no_grad():
        sim = q(replaced)
    frac = graph.op_of(graph.outputs[0]).frac
    assert torch.equal(torch.round(sim.double() * 2.0 ** frac).to(torch.int64), ref)
    with torch.no_grad():
        raw = q(x)
    rows = ~torch.isfinite(x).all(1)
    assert torch.isnan(raw[rows]).all() and torch.isfinite(raw[~rows]).all()


def test_count_non_finite():
    assert count_non_finite(_non_finite_batch()) == {"nan": 2, "posinf": 2, "neginf": 1, "samples": 4}
    assert count_non_finite(torch.zeros(3, 2)) == {"nan": 0, "posinf": 0, "neginf": 0, "samples": 0}


def test_finite_inputs_give_no_warning():
    q = _model("16.8")
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_integer(integer_graph(q, (x[:1],)), x)


def test_run_onnx_reports_non_finite_inputs(tmp_path, capsys, monkeypatch):
    import fxcompile.experiments.data as data
    x = torch.rand(20, 1, 28, 28)
    x[0, 0, 0, 0], x[3, 0, 5, 5], x[3, 0, 6, 6] = float("nan"), float("inf"), float("-inf")
    monkeypatch.setattr(data, "fashion_mnist", lambda root, train_subset=None, **kw: (None, (x, torch.zeros(20, dtype=torch.long))))
    main(["export", str(tmp_path / "mlp.onnx"), "--model", "mlp"])
    main(["run-onnx", str(tmp_path / "mlp.onnx")])
    out = capsys.readouterr().out
    assert "input 'x': 1 NaN, 1 +Inf, 1 -Inf values in 2 sample(s)" in out
    assert "maps NaN to 0 and ±Inf to its format's bounds" in out
    assert "on 20 test images" in out


def test_verify_counts_simulation_and_ort_differences_separately(tmp_path):
    torch.manual_seed(0)
    q = fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(torch.randn(1, 1, 28, 28),))
    x = torch.randn(6, 1, 28, 28)
    path = tmp_path / "m.onnx"
    export_onnx(q, path, (x[:2],))
    r = fxc.deploy.export.verify(q, path, x)
    assert (r["mismatches"], r["simulation_mismatches"], r["outputs"]) == (0, 0, 60)
    # a simulation one output code off shows up as simulation differences only
    forward = q.forward
    q.forward = lambda x: forward(x) + 2.0 ** -8
    r = fxc.deploy.export.verify(q, path, x)
    assert r["mismatches"] == 0 and r["simulation_mismatches"] > 0
