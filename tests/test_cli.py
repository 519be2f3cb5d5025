"""The command line, run in-process through ``fxcompile.cli.main``."""
import json

import pytest

from fxcompile import Assignment, assignment, compile, optimized
from fxcompile.cli import main
from fxcompile.experiments.data import IDX_FILES


def test_inspect_writes_table_json_and_dot(tmp_path, capsys):
    out, dot = tmp_path / "out.json", tmp_path / "g.dot"
    main(["inspect", "fxcompile.experiments.models:SeedCNN", "--policy", "optimized", "--json", str(out), "--dot", str(dot)])
    text = capsys.readouterr().out
    assert "graph captured by: fx" in text and "policy: optimized" in text
    assert "conv1_weight->*" in text and "16.11" in text
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
