"""Every quantization point is fixed point: one training step, every value and gradient checked.

An ``fx.Interpreter`` re-runs the compiled graphs node by node and records the forward value
of every node, the gradient reaching every node's output (tensor hooks), and the gradient
each cast sends back to its input (a hook on a private view of the cast's input, so with
fan-out every branch's gradient is seen on its own).  Each value must be an exact multiple
of ``2**-frac`` inside its format's code range; the range is computed here from the
definition, not by fxcompile, and the format each edge should have comes from the policy
(role → format, overrides) through a small resolver here, with roles read off the graph's
structure: the compiler's own record of formats (``node.meta``) is never the expectation.
"""
import dataclasses
import fnmatch

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
    lo, hi = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.signed else (0, 2 ** fmt.bits - 1)
    if fmt.narrow:
        lo += 1
    code = t.detach().double() * 2.0 ** fmt.frac + fmt.zero_point
    ok = torch.isfinite(code) & (code == code.round()) & (code >= lo) & (code <= hi)
    return int((~ok).sum())


# ---- what the policy says, resolved here (not read from the compiler's node.meta) ----------

_FALLBACK = {"input": "activation", "activation_in": "activation", "activation_out": "activation",
             "weight_gradient": "gradient", "bias_gradient": "gradient"}


def policy_format(policy, role, node):
    """The policy's format for ``role`` at ``node``: role formats, then the overrides whose
    pattern matches the node's name or target (later ones win), then the role's fallback."""
    formats = dict(policy.formats)
    names = [node.name] + ([node.target] if isinstance(node.target, str) else [])
    for o in policy.overrides:
        assert o.op is None, "this resolver matches overrides by pattern only"
        if any(fnmatch.fnmatchcase(n, o.pattern) for n in names):
            formats.update(o.formats)
    while role not in formats:
        if role not in _FALLBACK:
            return None
        role = _FALLBACK[role]
    return formats[role]


class Expected:
    """The (role, format) pairs the policy gives the values of one graph of a compiled model;
    roles come from the graph's structure (``loss_graph``: the loss function's graph, whose
    first input is the prediction and whose result is the loss)."""

    def __init__(self, policy, gm, loss_graph):
        self.policy, self.gm, self.loss_graph = policy, gm, loss_graph
        self.parameters = dict(gm.named_parameters())
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self.results = {_origin(a) for a in output.all_input_nodes}   # through the casts fxcompile added

    def roles(self, node):
        """(forward role, backward role) of the value ``node`` produces; None for a value that
        is not a fixed-point quantity (labels, buffers, modules, sizes)."""
        if node.op == "get_attr":
            if node.target not in self.parameters:
                return None
            is_bias = node.target.rsplit(".", 1)[-1].endswith("bias")
            return ("bias", "bias_gradient") if is_bias else ("weight", "weight_gradient")
        if node.op == "placeholder":
            first = node is next(iter(self.gm.graph.nodes))
            return ("activation_out", "gradient") if self.loss_graph and first else ("input", "gradient")
        if node.op in ("call_function", "call_module", "call_method"):
            if self.loss_graph and node in self.results:
                return "loss", "loss"
            return "activation_out", "gradient"
        return None

    def value(self, producer):
        """(forward, backward) of ``producer``'s value as it leaves the producer."""
        roles = self.roles(producer)
        return None if roles is None else tuple((r, policy_format(self.policy, r, producer)) for r in roles)

    def use(self, producer, consumer):
        """(forward, backward) on the edge ``producer → consumer``: a parameter keeps its
        value's formats; any other value gets the consumer's ``activation_in`` / ``gradient``."""
        value = self.value(producer)
        if value is None or value[0][0] in ("weight", "bias"):
            return value
        return tuple((r, policy_format(self.policy, r, consumer)) for r in ("activation_in", "gradient"))


def _is_cast(n):
    return n.op == "call_module" and n.target.startswith("casts.")


def _origin(node):
    while _is_cast(node):
        node = node.args[0]
    return node


def violations(gm, rec, expected, seen):
    """Every value the policy quantizes that ``gm``'s recorded run left off its grid (or float)."""
    bad = []

    def check(what, t, role_fmt, where):
        role, fmt = role_fmt
        seen.add((where, role))
        if fmt is not None and (k := off_grid(t, fmt)):
            bad.append(f"{what} ({role} {fmt}): {k} values off grid")

    for n in gm.graph.nodes:
        if _is_cast(n):
            producer = _origin(n)
            if _is_cast(n.args[0]):   # the cast of one use: its consumer is its only user
                (consumer,) = n.users
                fwd, bwd = expected.use(producer, consumer)
                name = f"{producer.name}->{consumer.name}"
            else:                     # the cast right after the producer
                fwd, bwd = expected.value(producer)
                name = f"{producer.name}->*"
            if _is_float(rec.values[n]):
                check(f"forward {name}", rec.values[n], fwd, "forward")
            if n in rec.emitted:
                check(f"gradient {name}", rec.emitted[n], bwd, "backward")
            continue
        if n.op in ("call_function", "call_module", "call_method", "output"):
            for a in n.all_input_nodes:
                producer = _origin(a)
                if not _is_float(rec.values.get(a)) or expected.roles(producer) is None:
                    continue
                fwd = (expected.value(producer) if n.op == "output" else expected.use(producer, n))[0]
                if not _is_cast(a):
                    if fwd[1] is not None:
                        bad.append(f"{n.name} consumes {a.name} without a cast")
                    continue
                check(f"input {producer.name}->{n.name} of {n.name}", rec.values[a], fwd, "forward")
        if expected.roles(n) is not None and n in rec.grads and _is_float(rec.values[n]):
            # the gradient reaching a producer is the (summed) gradient its value cast quantized
            check(f"gradient into {n.name}", rec.grads[n], expected.value(n)[1], "backward")
    return bad


def train_step(q, x, y, policy, store=True):
    """One step through the recorders, checked against ``policy``; returns (violations, roles
    seen, recorders, loss)."""
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    if store:
        opt = fxc.fixed_point_optimizer(opt, q)
    opt.zero_grad()
    rm, rl = Recorder(q), Recorder(q.loss)
    prediction = rm.run(x)
    loss = rl.run(prediction, y)
    loss.backward()
    seen = set()
    expected = Expected(policy, q, loss_graph=False)
    bad = violations(q, rm, expected, seen) + violations(q.loss, rl, Expected(policy, q.loss, loss_graph=True), seen)
    formats = {n.target: expected.value(n) for n in q.graph.nodes if n.op == "get_attr" and expected.roles(n)}
    assert set(formats) == {name for name, _ in q.named_parameters()}

    def check(what, t, role_fmt):
        role, fmt = role_fmt
        assert fmt is not None, f"the test policies quantize every parameter ({what})"
        if k := off_grid(t, fmt):
            bad.append(f"{what} ({role} {fmt}): {k} values off grid")
    for name, p in q.named_parameters():
        check(f"{name}.grad", p.grad, formats[name][1])
        check(f"{name} before the step", p, formats[name][0])
    # the recorder ran the very graph the module runs, with a gradient as it did (without one,
    # convs and linear layers sum exactly: passes.accumulators)
    output = next(n for n in q.graph.nodes if n.op == "output").args[0]
    assert torch.equal(q(x).detach(), rm.values[output].detach())
    opt.step()
    for name, p in q.named_parameters():
        check(f"{name} after the step", p, formats[name][0])
        seen.add(("stored", formats[name][0][0]))
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
    bad, seen, rm, rl, loss = train_step(q, x, y, policy)
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
    bad, seen, rm, rl, _ = train_step(q, x, y, policy)
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
    return train_step(q, x, y, fxc.baseline(), store)[0]


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


def test_an_edge_made_float_in_metadata_and_cast_is_detected():
    # The compiler's own record then agrees with the cast: only the policy says the gradient
    # leaving pool1 is 16.10.
    def make_float(q):
        node = next(n for n in q.graph.nodes if n.name == "casts_pool1")
        edge = dataclasses.replace(node.meta["fxc_edge"], backward=None)
        node.meta["fxc_edge"] = edge
        next(n for n in q.graph.nodes if n.name == "pool1").meta["fxc_value"] = edge
        q.get_submodule(node.target).set_edge(edge)
    bad = _sabotaged(make_float)
    assert any("pool1" in b and "gradient" in b and "16.10" in b for b in bad), bad


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
    bad, seen, rm, _, _ = train_step(q, x, y, policy)
    assert not bad, "\n".join(bad)
    weight = next(n for n in q.graph.nodes if n.op == "get_attr" and n.target == "fc.weight")
    assert len(weight.meta["fxc_uses"]) == 2
    assert off_grid(q.fc.weight.grad, fxc.fixed(16, 5)) == 0
