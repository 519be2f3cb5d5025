import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import SeedCNN


def test_seed_cnn_compiles_and_trains_one_step():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    q = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    loss = q.loss(q(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    w = q.conv1.weight
    assert fxc.fixed(24, 12).representable(w).all()
