"""Telemetry counters against an independent count taken with module hooks."""

import warnings

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.runtime import telemetry
from fxcompile.core.assignment import Edge
from fxcompile.experiments.models import SeedCNN
from fxcompile.passes.casts import Cast

# narrow formats so that the seed CNN overflows and underflows in both directions
NARROW = fxc.Policy(activation="8.4", gradient="8.12,stochastic", loss="8.5", weight="12.8", bias="8.6")


def _hooked_counts(module: Cast, record: dict):
    """Oracle: count from the cast's observed input, output and gradients, in float64."""
    fwd, bwd = module.edge.forward, module.edge.backward

    def outside(t, fmt):
        t = t.double()
        return int(((t.clamp(fmt.min_value, fmt.max_value) != t) & torch.isfinite(t)).sum())

    def on_forward(mod, args, y):
        (x,) = args
        c = record.setdefault(mod, dict.fromkeys(telemetry.FIELDS, 0))
        c["saturated"] = None
        if fwd is not None and not mod.forward_identity and x.is_floating_point():
            c["forward_elements"] += x.numel()
            c["forward_overflow"] += outside(x, fwd)
            c["forward_underflow"] += int(((x != 0) & (y == 0)).sum())
            c["forward_nonfinite"] += int((~torch.isfinite(x)).sum())
            if mod.clip_gradient:
                lo, hi = fwd.min_value, fwd.max_value
                c["saturated"] = (y.detach() <= lo) | (y.detach() >= hi) | torch.isnan(y.detach())

    def on_backward(mod, grad_input, grad_output):
        c = record[mod]
        if mod.backward_identity:
            return   # elided: the gradient arrives on its grid and in range, nothing is rounded
        g_in, g_out = grad_output[0], grad_input[0]
        keep = ~c["saturated"] if c["saturated"] is not None else torch.ones_like(g_in, dtype=torch.bool)
        c["backward_elements"] += g_in.numel()
        c["backward_overflow"] += outside(torch.where(keep, g_in, 0.0), bwd)
        c["backward_underflow"] += int(((g_out == 0) & (g_in != 0) & torch.isfinite(g_in) & keep).sum())
        c["backward_nonfinite"] += int((~torch.isfinite(g_in)).sum())

    module.register_forward_hook(on_forward)
    module.register_full_backward_hook(on_backward)


def test_counters_match_a_direct_count_on_the_seed_cnn():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28) * 6
    y = torch.randint(0, 10, (8,))
    q = telemetry.enable(fxc.compile(SeedCNN(), NARROW, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x[:2],)))
    record = {}
    casts = [m for g in (q, q.loss) for m in g.casts.children()]
    for m in casts:
        _hooked_counts(m, record)
    for _ in range(2):
        q.zero_grad()
        q.loss(q(x), y).backward()
    totals = dict.fromkeys(telemetry.FIELDS, 0)
    for m in casts:
        got = m.counters.as_dict()
        want = record[m]
        for f in telemetry.FIELDS:
            if f.startswith("backward") and want["backward_elements"] == 0:
                continue
            assert got[f] == want[f], (m.counters.name, f, got[f], want[f])
            totals[f] += got[f]
    # the comparison is only meaningful if something overflowed and underflowed both ways
    for f in ("forward_overflow", "forward_underflow", "backward_overflow", "backward_underflow"):
        assert totals[f] > 0, f
    text = fxc.inspect(q)
    assert "telemetry:" in text and "fwd over" in text


def _cast(fwd="8.4", bwd="8.4"):
    edge = Edge("x", "*", "activation_out", fxc.as_format(fwd), "gradient", fxc.as_format(bwd), "", None)
    c = Cast(edge)
    c.counters = telemetry.EdgeCounters("x->*", "activation_out")
    return c


def test_nan_and_inf_are_counted_and_never_become_numbers():
    c = _cast()
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 100.0, 0.01, 0.0], requires_grad=True)
    y = c(x)
    assert torch.isnan(y[1:4]).all() and y[4] == fxc.fixed(8, 4).max_value and y[5] == 0
    g = torch.tensor([float("inf"), 1.0, 1.0, 1.0, 1.0, 0.001, -float("inf")])
    y.backward(g)
    assert torch.isnan(x.grad[0]) and torch.isnan(x.grad[6])  # ±Inf gradients become NaN
    d = c.counters.as_dict()
    assert (d["forward_nonfinite"], d["forward_overflow"], d["forward_underflow"]) == (3, 1, 1)
    assert d["backward_nonfinite"] == 2
    # the gradient at the saturated element is clipped, not counted as overflow or underflow
    assert d["backward_underflow"] == 1 and d["backward_overflow"] == 0


def test_saturation_warning_once_per_edge_naming_it():
    q = telemetry.enable(fxc.compile(nn.Sequential(nn.Linear(4, 4)), NARROW, example_inputs=(torch.zeros(1, 4),)))
    q(torch.tensor([[50.0, 0.0, 0.0, 0.0]]))  # the input edge saturates on 1 of 4 values
    with pytest.warns(telemetry.SaturationWarning, match=r"edge input_1->\* \(input\).* 1 of 4 forward"):
        assert [d["edge"] for d in telemetry.check(q, threshold=0.2)] == ["input_1->*"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        telemetry.check(q, threshold=0.2)  # once per edge
        assert telemetry.check(q, threshold=0.3) == []


def test_off_by_default_and_disable():
    q = fxc.compile(SeedCNN(), fxc.baseline(), example_inputs=(torch.randn(2, 1, 28, 28),))
    assert all(m.counters is None for m in q.casts.children())
    assert telemetry.summary(q) == [] and "telemetry" not in fxc.inspect(q)
    telemetry.enable(q, every=2)
    for _ in range(3):
        q(torch.randn(2, 1, 28, 28))
    assert telemetry.summary(q)[0]["forward_elements"] == 2 * 2 * 28 * 28  # calls 1 and 3 counted
    telemetry.disable(q)
    assert telemetry.summary(q) == []
