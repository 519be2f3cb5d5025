"""Every quantization point is fixed point: one training step, every value and gradient checked.

An ``fx.Interpreter`` re-runs the compiled graphs node by node and records the forward value
of every node, the gradient reaching every node's output (tensor hooks), and the gradient
each cast sends back to its input (a hook on a private view of the cast's input, so with
fan-out every branch's gradient is seen on its own).  Each value must be an exact multiple
of ``2**-frac`` inside its format's code range; the range is computed here from the
definition, not by fxcompile.
"""
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.models import ResidualCNN, SeedCNN


class Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values, self.grads, self.emitted = {}, {}, {}

    @staticmethod
    def _hook(t, table, node):
        if isinstance(t, torch.Tensor) and t.requires_grad and not t.is_leaf:
            t.register_hook(lambda g: table.__setitem__(node, g.detach().clone()))

    def run_node(self, n):
        if n.op == "call_module" and "fxc_edge" in n.meta:
            (src,) = self.map_nodes_to_values(n.args, n)
            if isinstance(src, torch.Tensor) and src.requires_grad:
                src = src.view_as(src)  # this cast's own input: its gradient is what this cast emits
                self._hook(src, self.emitted, n)
            out = self.call_module(n.target, (src,), {})
        else:
            out = super().run_node(n)
        self.values[n] = out
        self._hook(out, self.grads, n)
        return out


def _is_float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def off_grid(t, fmt):
    """How many elements of ``t`` are not values of ``fmt`` (exact: scaling by 2**frac is exact)."""
    if fmt is None:
        return 0
    lo, hi = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.signed else (0, 2 ** fmt.bits - 1)
    if fmt.narrow:
        lo += 1
    code = t.detach().double() * 2.0 ** fmt.frac + fmt.zero_point
    ok = torch.isfinite(code) & (code == code.round()) & (code >= lo) & (code <= hi)
    return int((~ok).sum())


def _origin(node):
    while "fxc_edge" in node.meta:
        node = node.args[0]
    return node


def violations(gm, rec, seen):
    """Every way ``gm``'s recorded run breaks "every quantization point is fixed point"."""
    bad = []
    for n in gm.graph.nodes:
        edge = n.meta.get("fxc_edge")
        if edge is not None:
            if _is_float(rec.values[n]):
                if k := off_grid(rec.values[n], edge.forward):
                    bad.append(f"forward {edge.name} ({edge.role} {edge.forward}): {k} values off grid")
                seen.add(("forward", edge.role))
            if n in rec.emitted:
                if k := off_grid(rec.emitted[n], edge.backward):
                    bad.append(f"gradient {edge.name} ({edge.backward_role} {edge.backward}): {k} values off grid")
                seen.add(("backward", edge.backward_role))
            continue
        if n.op in ("call_function", "call_module", "call_method", "output"):
            for a in n.all_input_nodes:
                if not _is_float(rec.values.get(a)):
                    continue
                if "fxc_edge" not in a.meta:
                    bad.append(f"{n.name} consumes {a.name} without a cast")
                    continue
                producer = _origin(a)
                use = producer.meta.get("fxc_uses", {}).get(n.name, producer.meta["fxc_value"])
                if k := off_grid(rec.values[a], use.forward):
                    bad.append(f"input {use.name} of {n.name} ({use.role} {use.forward}): {k} values off grid")
                seen.add(("forward", use.role))
        value = n.meta.get("fxc_value")
        if value is not None and n in rec.grads:
            # the gradient reaching a producer is the (summed) gradient its value cast quantized
            if k := off_grid(rec.grads[n], value.backward):
                bad.append(f"gradient into {n.name} ({value.backward_role} {value.backward}): {k} values off grid")
            seen.add(("backward", value.backward_role))
    return bad


def train_step(q, x, y, store=True):
    """One step through the recorders; returns (violations, roles seen, recorders, loss)."""
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    if store:
        opt = fxc.fixed_point_optimizer(opt, q)
    opt.zero_grad()
    rm, rl = Recorder(q), Recorder(q.loss)
    prediction = rm.run(x)
    loss = rl.run(prediction, y)
    loss.backward()
    seen = set()
    bad = violations(q, rm, seen) + violations(q.loss, rl, seen)
    formats = {}
    for node in q.graph.nodes:
        if node.op == "get_attr" and node.meta.get("fxc_value") is not None:
            formats[node.target] = node.meta["fxc_value"]
    for name, p in q.named_parameters():
        edge = formats[name]
        if k := off_grid(p.grad, edge.backward):
            bad.append(f"{name}.grad ({edge.backward_role} {edge.backward}): {k} values off grid")
        if k := off_grid(p, edge.forward):
            bad.append(f"{name} before the step ({edge.role} {edge.forward}): {k} values off grid")
    with torch.no_grad():  # the recorder ran the very graph the module runs
        output = next(n for n in q.graph.nodes if n.op == "output").args[0]
        assert torch.equal(q(x), rm.values[output].detach())
    opt.step()
    for name, p in q.named_parameters():
        if k := off_grid(p, formats[name].forward):
            bad.append(f"{name} after the step ({formats[name].role} {formats[name].forward}): {k} values off grid")
        seen.add(("stored", formats[name].role))
    assert torch.isfinite(loss)
    return bad, seen, rm, rl, loss


ALL_ROLES = {("forward", r) for r in ("input", "activation_out", "activation_in", "weight", "bias", "loss")} | \
            {("backward", r) for r in ("gradient", "weight_gradient", "bias_gradient", "loss")} | \
            {("stored", "weight"), ("stored", "bias")}


def _data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g) * 2, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("policy", [fxc.baseline(), fxc.optimized()], ids=lambda p: p.name)
def test_every_value_and_gradient_of_a_training_step_is_fixed_point(policy):
    torch.manual_seed(0)
    x, y = _data()
    q = fxc.compile(SeedCNN(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    bad, seen, rm, rl, loss = train_step(q, x, y)
    assert not bad, "\n".join(bad)
    assert ALL_ROLES <= seen, ALL_ROLES - seen
    # the checks looked at real, non-trivial numbers
    assert sum(int((g != 0).sum()) for g in rm.emitted.values()) > 1000
    assert len(rm.emitted) == len([n for n in q.graph.nodes if n.op == "get_attr"]) + \
        len([n for n in q.graph.nodes if n.op == "call_function" or (n.op == "call_module" and "fxc_edge" not in n.meta)])


def test_fan_out_gradient_sum_is_quantized():
    # relu1 feeds conv2 and the residual add.  Its value's gradient format (16.6) is coarser
    # than its uses' (16.10): the sum of the two branch gradients must be rounded again.
    torch.manual_seed(0)
    x, y = _data(1)
    policy = fxc.Policy(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8",
                        overrides=[{"pattern": "relu1", "gradient": "16.6"}])
    q = fxc.compile(ResidualCNN(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    bad, seen, rm, rl, _ = train_step(q, x, y)
    assert not bad, "\n".join(bad)
    assert ALL_ROLES <= seen
    nodes = {n.name: n for n in q.graph.nodes}
    branches = [rm.emitted[nodes["casts_relu1__conv2"]], rm.emitted[nodes["casts_relu1__add"]]]
    total = rm.grads[nodes["relu1"]]
    assert off_grid(branches[0] + branches[1], fxc.fixed(16, 6)) > 0  # the plain sum is not on the 16.6 grid
    assert off_grid(total, fxc.fixed(16, 6)) == 0
    assert off_grid(total, fxc.fixed(16, 10)) == 0


def _sabotaged(change, store=True):
    torch.manual_seed(0)
    x, y = _data()
    q = fxc.compile(SeedCNN(), fxc.baseline(), loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    change(q)
    return train_step(q, x, y, store)[0]


def test_a_missing_backward_rounding_is_detected():
    def drop(q):
        q.casts.pool1._bwd = []
    bad = _sabotaged(drop)
    assert any("pool1" in b and "gradient" in b for b in bad), bad


def test_a_missing_forward_rounding_is_detected():
    def drop(q):
        q.casts.fc1._fwd = []
    bad = _sabotaged(drop)
    assert any("fc1" in b and "forward" in b for b in bad), bad


def test_a_removed_cast_is_detected():
    def remove(q):
        node = next(n for n in q.graph.nodes if n.name == "casts_relu1")
        node.replace_all_uses_with(node.args[0])
        q.graph.erase_node(node)
        q.recompile()
    bad = _sabotaged(remove)
    assert any("without a cast" in b and "relu1" in b for b in bad), bad


def test_unquantized_weight_update_is_detected():
    bad = _sabotaged(lambda q: None, store=False)
    assert any("fc2.bias after the step" in b for b in bad), bad


class TiedMLP(nn.Module):
    """One Linear called twice: its weight is one value with two uses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_shared_weight_gradient_is_summed_then_quantized():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 8, generator=g) * 4, torch.randint(0, 10, (6,), generator=g)
    policy = fxc.Policy(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8",
                        weight_gradient="16.5")
    q = fxc.compile(TiedMLP(), policy, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    bad, seen, rm, _, _ = train_step(q, x, y)
    assert not bad, "\n".join(bad)
    weight = next(n for n in q.graph.nodes if n.op == "get_attr" and n.target == "fc.weight")
    assert len(weight.meta["fxc_uses"]) == 2
    assert off_grid(q.fc.weight.grad, fxc.fixed(16, 5)) == 0
