"""``fxcompile export`` and ``fxcompile run-onnx`` end to end."""

import numpy as np
import onnx
import pytest
import torch

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.cli import main
from fxcompile.deploy.export import integer_graph, onnx_session
from fxcompile.experiments.models import MLP


def test_export_command_writes_the_integer_graph_of_the_weights(tmp_path, capsys):
    torch.manual_seed(0)
    model = MLP()
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    main(["export", str(tmp_path / "mlp.onnx"), "--model", "mlp", "--policy", "optimized",
          "--state-dict", str(tmp_path / "mlp.pt")])
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(8, 1, 28, 28)
    q = fxc.compile(model, fxc.optimized(), example_inputs=(x,))
    fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=0.0), q, rounding="nearest")
    _, codes = onnx_session(onnx.load(tmp_path / "mlp.onnx")).run(None, {"x": x.numpy()})
    assert np.array_equal(codes, run_integer(integer_graph(q, (x,)), x, codes=True)[0].numpy())


def test_export_command_names_a_bad_weights_file(tmp_path):
    (tmp_path / "bad.pt").write_text("not weights")
    with pytest.raises(SystemExit, match="bad.pt"):
        main(["export", str(tmp_path / "m.onnx"), "--model", "mlp", "--state-dict", str(tmp_path / "bad.pt")])
    assert not (tmp_path / "m.onnx").exists()


def test_run_onnx_command(tmp_path, capsys, fashion_root):
    main(["export", str(tmp_path / "mlp.onnx"), "--model", "mlp"])
    main(["run-onnx", str(tmp_path / "mlp.onnx"), "--data", fashion_root])
    assert "on 10000 test images" in capsys.readouterr().out
