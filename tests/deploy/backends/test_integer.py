"""The integer reference executor against the float64 simulation (exact for these sizes)."""

import pytest
import torch

import fxcompile as fxc
from fxcompile.deploy.backends.integer import run_integer
from fxcompile.deploy.export import integer_graph
from fxcompile.experiments.models import MLP, ResidualCNN, SeedCNN
from fxcompile.deploy.fold_bn import fold_bn
from tests.helpers import on_grid


@pytest.mark.parametrize("model", [SeedCNN, MLP, ResidualCNN])
@pytest.mark.parametrize("policy", [fxc.baseline, fxc.optimized])
def test_integer_graph_equals_exact_simulation(model, policy):
    """16-bit codes times 24-bit codes summed over < 2**13 terms stay below 2**53: the
    float64 simulation of the (folded) graph is exact, so the integer graph must equal it."""
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28) * 2
    q = on_grid(fxc.compile(model(), policy(), example_inputs=(x[:2],)))
    (y,) = run_integer(integer_graph(q, (x[:2],)), x)
    with torch.no_grad():
        expected = fold_bn(q).double()(x.double()).float()
    assert torch.equal(y, expected)


def test_codes_are_the_output_format_codes():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    q = on_grid(fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(x[:2],)))
    graph = integer_graph(q, (x[:2],))
    (y,), (codes,) = run_integer(graph, x), run_integer(graph, x, codes=True)
    assert codes.dtype == torch.int64
    assert torch.equal(codes, fxc.fixed(16, 8).to_codes(y))
