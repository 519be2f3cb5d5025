"""examples/deploy_trained.py on a tiny Fashion-MNIST stand-in: it trains, saves the state,
exports and checks the integer graph on every test image, and resumes from what it wrote."""

import json
import struct
import sys
from pathlib import Path

import torch

from fxcompile.experiments.data import IDX_FILES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import deploy_trained  # noqa: E402


def _write_fashion_mnist(root: Path, n_train=64, n_test=40):
    """Uncompressed IDX files in torchvision's layout: class-dependent pixels plus noise."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 256, (10, 28, 28), generator=g)
    for images, labels, n in ((IDX_FILES[0], IDX_FILES[1], n_train), (IDX_FILES[2], IDX_FILES[3], n_test)):
        y = torch.randint(0, 10, (n,), generator=g)
        pixels = (protos[y] + torch.randint(-60, 61, (n, 28, 28), generator=g)).clamp(0, 255).to(torch.uint8)
        (raw / images[:-3]).write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.numpy().tobytes())
        (raw / labels[:-3]).write_bytes(struct.pack(">II", 2049, n) + y.to(torch.uint8).numpy().tobytes())


def test_deploy_trained_trains_exports_checks_and_resumes(tmp_path, monkeypatch, capsys):
    _write_fashion_mnist(tmp_path / "data")
    out, results = tmp_path / "runs", tmp_path / "results.json"
    argv = ["--data", str(tmp_path / "data"), "--models", "seed_cnn", "--out", str(out), "--results", str(results)]
    deploy_trained.main(argv)
    assert {p.name for p in out.iterdir()} == {"seed_cnn.pt", "seed_cnn.onnx", "seed_cnn.json"}
    data = json.loads(results.read_text())
    assert data["command"] == "python examples/deploy_trained.py " + " ".join(argv) and data["date"]
    rec = data["models"]["seed_cnn"]
    assert rec["train_size"] == 64 and rec["test_size"] == 40 and rec["steps_run"] == 2
    assert rec["output_codes"] == 40 * 10
    assert rec["ort_vs_integer"] == 0 and rec["simulation_vs_integer"] == 0
    assert rec["ort_accuracy"] == rec["integer_accuracy"] == rec["simulation_eval_accuracy"]
    assert "seed_cnn" in capsys.readouterr().out

    # a record on disk is reported again; with --recheck the saved state is exported and checked
    # again, never trained again
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(deploy_trained, "train", no_training)
    (out / "seed_cnn.onnx").unlink()
    deploy_trained.main(argv)
    assert not (out / "seed_cnn.onnx").exists()
    assert json.loads(results.read_text())["models"]["seed_cnn"] == rec
    deploy_trained.main(argv + ["--recheck"])
    assert (out / "seed_cnn.onnx").exists()
    again = json.loads(results.read_text())["models"]["seed_cnn"]
    assert again == rec


def test_recalibrated_batch_norms_are_what_deploys(tmp_path):
    _write_fashion_mnist(tmp_path / "data")
    out, results = tmp_path / "runs", tmp_path / "results.json"
    argv = ["--data", str(tmp_path / "data"), "--models", "residual_cnn", "seed_cnn", "--out", str(out),
            "--results", str(results), "--recalibrate", "48"]
    deploy_trained.main(argv)
    data = json.loads(results.read_text())["models"]
    rec = data["residual_cnn"]
    assert rec["recalibrated_images"] == 48 and "recalibrated_images" not in data["seed_cnn"]  # no batch norm
    assert rec["ort_vs_integer"] == 0 and rec["simulation_vs_integer"] == 0
    # the same saved state exported without recalibrating gives other batch-norm constants
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "residual_cnn.pt").write_bytes((out / "residual_cnn.pt").read_bytes())
    deploy_trained.main(["--data", str(tmp_path / "data"), "--models", "residual_cnn", "--out", str(plain)])
    assert (plain / "residual_cnn.onnx").read_bytes() != (out / "residual_cnn.onnx").read_bytes()
