"""The training loop's side-by-side step timing and its TensorBoard log."""

import torch

from fxcompile.experiments.data import synthetic
from fxcompile.experiments.models import MLP
from fxcompile.runtime import kernels
from fxcompile.training.train import TrainConfig, step_times_side_by_side


class Counting(MLP):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_side_by_side_timing_warms_up_then_times_each_model_in_turn():
    train_data, _ = synthetic(n_train=64, n_test=8)
    models = [Counting(), Counting()]
    times = step_times_side_by_side([TrainConfig(model=models[0]), TrainConfig(model=models[1], policy="baseline")],
                                    train_data, steps=4, warmup=2)
    assert kernels.backend() is not None
    assert len(times) == 2 and all(t > 0 for t in times)
    assert models[0].calls == 6


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_log_holds_scalars_telemetry_and_histograms_against_the_format(tmp_path):
    import pytest
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra (pip install tensorboard)")
    from fxcompile.training.train import train
    train_data, test_data = synthetic(n_train=64, n_test=16)
    cfg = TrainConfig(model="mlp", policy="baseline", epochs=2, batch_size=16, progress=False,
                      tensorboard=str(tmp_path / "tb"), tensorboard_every=2)
    m = train(cfg, train_data, test_data)
    acc = _events(tmp_path / "tb")
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert sum(e.value for e in loss[:4]) / 4 == pytest.approx(m["history"][0]["train_loss"])
    assert [round(e.value, 6) for e in acc.Scalars("train/lr")] == [1e-3] * 8
    assert [e.value for e in acc.Scalars("test/accuracy")] == pytest.approx([h["accuracy"] for h in m["history"]])
    # per-edge telemetry fractions, both directions, every 2 steps
    assert [e.step for e in acc.Scalars("saturation/fc1->*/forward")] == [2, 4, 6, 8]
    for kind in ("saturation", "flush_to_zero", "nan"):   # relu1's cast rounds the gradient (fc1's passes it)
        assert f"{kind}/relu1->*/backward" in tags["scalars"]
        assert all(0 <= e.value <= 1 for e in acc.Scalars(f"{kind}/fc1->*/forward"))
    # histograms of log2|x| whose bins span the edge's format: 16.8 reaches 2**-8 .. 2**7
    h = acc.Histograms("values/fc1->*")
    assert [e.step for e in h] == [1, 3, 5, 7]
    limits = h[0].histogram_value.bucket_limit
    assert min(limits) <= -8 and max(limits) >= 7
    assert 0 < h[0].histogram_value.num <= 16 * 256    # the nonzero values of one batch of 16 x 256
    assert "gradients/fc1->*" in tags["histograms"] and "values/fc1_weight->*" in tags["histograms"]
    grad = acc.Histograms("gradients/fc1->*")[0].histogram_value
    assert grad.num > 0 and min(grad.bucket_limit) <= -10    # gradients are 16.10


def test_fp32_runs_log_the_scalars_only(tmp_path):
    import pytest
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra (pip install tensorboard)")
    from fxcompile.training.train import train
    train_data, test_data = synthetic(n_train=32, n_test=8)
    train(TrainConfig(model="mlp", epochs=1, batch_size=16, progress=False, tensorboard=str(tmp_path / "tb")),
          train_data, test_data)
    tags = _events(tmp_path / "tb").Tags()
    assert {"train/loss", "train/lr", "test/accuracy"} <= set(tags["scalars"]) and not tags["histograms"]
