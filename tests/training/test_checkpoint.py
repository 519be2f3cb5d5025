"""Checkpoint files: atomic, checksummed, the last two kept, bad ones skipped with a warning."""

import argparse
import warnings

import pytest
import torch

import fxcompile as fxc
from fxcompile import cli
from fxcompile.training.checkpoint import (CheckpointError, CheckpointWarning, checkpoints, load_checkpoint, load_latest,
                                  rng_state, save_checkpoint, set_rng_state)
from fxcompile.experiments.data import synthetic
from fxcompile.training.train import TrainConfig, train


def test_save_load_roundtrip_and_keep_last_two(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"step": step, "w": torch.full((3,), float(step))}, step)
    files = checkpoints(tmp_path)
    assert [p.name for p in files] == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert not list(tmp_path.glob(".ckpt-*"))  # no temporary left behind
    state = load_latest(tmp_path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage):
    save_checkpoint(tmp_path, {"step": 1}, 1)
    newest = save_checkpoint(tmp_path, {"step": 2, "w": torch.arange(1000.0)}, 2)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0x01
    else:
        data = b""
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt-000000002.pt"):
        load_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match="ckpt-000000002.pt.*falling back"):
        assert load_latest(tmp_path)["step"] == 1


def test_no_good_checkpoint_is_none(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    (tmp_path / "ckpt-000000001.pt").write_bytes(b"garbage")
    with pytest.warns(CheckpointWarning):
        assert load_latest(tmp_path) is None


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    import random
    g = torch.Generator().manual_seed(5)
    save_checkpoint(tmp_path, {"rng": rng_state(g)}, 1)
    expect = (torch.rand(4), random.random(), torch.rand(4, generator=g))
    set_rng_state(load_latest(tmp_path)["rng"], g)
    got = (torch.rand(4), random.random(), torch.rand(4, generator=g))
    assert torch.equal(expect[0], got[0]) and expect[1] == got[1] and torch.equal(expect[2], got[2])


def _cfg(**kw):
    return TrainConfig(**{**dict(model="mlp", policy=fxc.baseline(), epochs=2, batch_size=16, checkpoint_every=2,
                                 progress=False), **kw})


def test_truncated_newest_checkpoint_resume_matches_uninterrupted(tmp_path):
    data = synthetic(n_train=48, n_test=16)
    ref = train(_cfg(), *data)
    first = train(_cfg(), *data, checkpoint_dir=tmp_path)
    files = checkpoints(tmp_path)
    assert len(files) == 2  # the last two: end of epoch 2 and the one before
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(CheckpointWarning, match=newest.name):
        resumed = train(_cfg(), *data, checkpoint_dir=tmp_path, resume=True)
    for m in (first, resumed):
        a, b = ref["model_object"].state_dict(), m["model_object"].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == ref["history"]


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_checkpoints(tmp_path):
    data = synthetic(n_train=32, n_test=16)
    train(_cfg(epochs=1), *data, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="lr"):
        train(_cfg(epochs=1, lr=0.5), *data, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="resume"):
        train(_cfg(epochs=1), *data, checkpoint_dir=tmp_path)
    # a finished run resumes to its result; more epochs continue it
    assert train(_cfg(epochs=1), *data, checkpoint_dir=tmp_path, resume=True)["history"][0]["epoch"] == 1
    assert len(train(_cfg(epochs=2), *data, checkpoint_dir=tmp_path, resume=True)["history"]) == 2


def test_loss_scaled_run_resumes_bit_identically_and_only_with_its_scale(tmp_path):
    data = synthetic(n_train=48, n_test=16)
    ref = train(_cfg(loss_scale=8), *data)
    train(_cfg(loss_scale=8, epochs=1), *data, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="loss_scale"):
        train(_cfg(), *data, checkpoint_dir=tmp_path, resume=True)
    resumed = train(_cfg(loss_scale=8), *data, checkpoint_dir=tmp_path, resume=True)
    assert resumed["start_step"] == 3 and resumed["history"] == ref["history"]
    a, b = ref["model_object"].state_dict(), resumed["model_object"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    unscaled = train(_cfg(), *data)["model_object"].state_dict()
    assert not all(torch.equal(a[k], unscaled[k]) for k in a)


def test_cli_train_checkpoint_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_dataset", lambda args: (*synthetic(n_train=32, n_test=16), {"classes": [str(i) for i in range(10)], "channels": 1}))
    argv = ["train", "--model", "mlp", "--policy", "baseline", "--epochs", "1", "--batch-size", "16",
            "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "1"]
    cli.main(argv)
    assert checkpoints(tmp_path / "seed-0")
    cli.main(argv + ["--resume"])
    with pytest.raises(SystemExit, match="holds checkpoints"):
        cli.main(argv)
    with pytest.raises(SystemExit, match="--resume needs --checkpoint-dir"):
        cli.main(["train", "--resume"])
