import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def fashion_root():
    """The Fashion-MNIST root from FXCOMPILE_DATA, or skip (tests then use synthetic data)."""
    root = os.environ.get("FXCOMPILE_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("FXCOMPILE_DATA does not point at the Fashion-MNIST files")
    return root
