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
