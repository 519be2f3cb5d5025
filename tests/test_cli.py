"""The command line, run in-process through ``fxcompile.cli.main``."""
import json
import re

import pytest

from fxcompile import Assignment, assignment, compile, optimized
from fxcompile.cli import main
from fxcompile.experiments.data import IDX_FILES


def test_inspect_writes_table_json_and_dot(tmp_path, capsys):
    out, dot = tmp_path / "out.json", tmp_path / "g.dot"
    main(["inspect", "fxcompile.experiments.models:SeedCNN", "--policy", "optimized", "--json", str(out), "--dot", str(dot)])
    text = capsys.readouterr().out
    assert "graph captured by: fx" in text and "policy: optimized" in text
    assert re.search(r"^conv1_weight\s+get_attr\s+weight\s+16.11", text, re.M)
    a = Assignment.from_json(out.read_text())
    import torch
    from fxcompile.experiments.models import SeedCNN
    expected = assignment(compile(SeedCNN(), optimized(), example_inputs=(torch.randn(1, 1, 28, 28),)))
    assert a == expected
    assert all("conv1" not in e.producer or e.forward is not None for e in a)
    assert dot.read_text().startswith("digraph")
    assert json.loads(out.read_text())[0]["producer"] == "x"


def test_inspect_with_a_policy_file_and_export_frontend(tmp_path, capsys):
    path = tmp_path / "p.toml"
    optimized().save(path)
    main(["inspect", "fxcompile.experiments.models:MLP", "--policy", str(path), "--frontend", "export"])
    assert "graph captured by: export" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["inspect", "fxcompile.experiments.models.SeedCNN"], "module:callable"),
    (["inspect", "fxcompile.experiments.models:NoSuchModel"], "NoSuchModel"),
    (["inspect", "fxcompile.experiments.models:SeedCNN", "--policy", "nosuch.toml"], "nosuch.toml"),
])
def test_inspect_errors_are_messages_not_tracebacks(argv, expected):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert expected in str(info.value)


@pytest.mark.parametrize("command", ["demo", "train"])
def test_commands_without_data_say_how_to_point_at_the_idx_files(command, monkeypatch, tmp_path):
    monkeypatch.delenv("FXCOMPILE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([command])
    msg = str(info.value)
    assert "--data" in msg and "FXCOMPILE_DATA" in msg
    assert all(f in msg for f in IDX_FILES)


def test_train_with_an_empty_data_folder_names_the_missing_files(monkeypatch, tmp_path):
    monkeypatch.setenv("FXCOMPILE_DATA", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "1"])
    assert str(tmp_path) in str(info.value) and IDX_FILES[0] in str(info.value)


def test_doctor_reports_versions_threads_data_root_and_the_built_kernel(capsys, tmp_path):
    import torch
    assert main(["doctor", "--build", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"torch        {torch.__version__}" in out
    assert "onnxruntime" in out and "hls4ml" in out
    assert f"torch {torch.get_num_threads()} of" in out
    assert "data root    not usable" in out and str(tmp_path) in out
    assert "kernel       built: C++ cast kernel loaded from" in out


def _doctor(tmp_path, *args, **env):
    import os
    import subprocess
    import sys
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), FXCOMPILE_KERNELS="", **env)
    return subprocess.run([sys.executable, "-m", "fxcompile.cli", "doctor", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_doctor_without_build_says_the_kernel_is_not_built_yet(tmp_path):
    run = _doctor(tmp_path)
    assert run.returncode == 0, run.stderr
    assert "not built yet" in run.stdout and str(tmp_path / "ext" / "fxcompile_cast_cpu") in run.stdout
    assert not (tmp_path / "ext" / "fxcompile_cast_cpu" / "fxcompile_cast_cpu.so").exists()


def test_doctor_reports_a_failed_build_with_the_compilers_message_and_training_still_works(tmp_path):
    run = _doctor(tmp_path, "--build", CXX=str(tmp_path / "no-such-compiler"))
    assert run.returncode == 1
    assert "kernel       build error; fallback: pure-PyTorch cast" in run.stdout
    said = run.stdout.split("The compiler said:")[1]   # the shell's words ("not found" / "No such file")
    assert str(tmp_path / "no-such-compiler") in said.split("fix:")[0]
    assert "fix: install a C++ compiler" in run.stdout
    assert run.stderr.count("could not be built") == 1 and "CUDA" not in run.stderr
    # the same environment trains on the fallback, warning once
    script = ("import torch, fxcompile as fxc; from fxcompile.experiments.models import MLP; "
              "from fxcompile.runtime import kernels; torch.manual_seed(0); "
              "q = fxc.compile(MLP(), 'baseline', loss_fn=torch.nn.CrossEntropyLoss(), "
              "example_inputs=(torch.randn(2, 1, 28, 28),)); "
              "opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), 0.1), q); "
              "x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)); "
              "losses = [q.loss(q(x), y) for _ in range(1)]; losses[0].backward(); opt.step(); "
              "print(kernels.backend(), float(q.loss(q(x), y)) < float(losses[0]))")
    import os
    import subprocess
    import sys
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), FXCOMPILE_KERNELS="",
               CXX=str(tmp_path / "no-such-compiler"))
    train = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert train.stdout.split() == ["python", "True"], train.stderr[-2000:]
    assert train.stderr.count("could not be built") == 1
