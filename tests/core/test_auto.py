import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.experiments.data import synthetic
from fxcompile.experiments.models import MLP
from fxcompile.training.train import TrainConfig, train


def test_bits_per_role_fall_back_to_coarser_roles():
    a = fxc.auto(max_formats=3, bits={"activation": 8, "gradient": 8, "weight": 16})
    assert a.bits_for("activation_in") == (8,) and a.bits_for("input") == (8,)
    assert a.bits_for("weight_gradient") == (8,) and a.bits_for("loss") == (8,)
    assert a.bits_for("bias") == (16,)
    assert fxc.auto(bits=(8, 16)).bits_for("weight") == (8, 16)
    assert fxc.auto(bits={"gradient": 8}).bits_for("weight") == (16,)


@pytest.mark.parametrize("kwargs,field", [({"max_formats": 0}, "max_formats"), ({"bits": 40}, "bits"),
                                          ({"bits": {"activations": 8}}, "activations"),
                                          ({"objective": "snr"}, "objective"), ({"margin": -1}, "margin"),
                                          ({"gradient_rounding": "up"}, "gradient_rounding"),
                                          ({"update_rounding": "down"}, "update_rounding")])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(fxc.PolicyError, match=field):
        fxc.auto(**kwargs)


def test_default_margin_depends_on_the_width_and_an_explicit_one_wins():
    assert fxc.auto().margin_for(16) == 4 and fxc.auto().margin_for(12) == 4 and fxc.auto().margin_for(8) == 1
    assert fxc.auto(margin=2).margin_for(16) == 2 and fxc.auto(margin=0).margin_for(8) == 0
    assert "margin=2" in str(fxc.auto(margin=2)) and "margin" not in str(fxc.auto())
    torch.manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]

    def logits_format(policy):
        q = fxc.compile(MLP(), policy, loss_fn=nn.CrossEntropyLoss(), calibration_data=batches)
        return next(r.forward for r in fxc.assignment(q) if r.name == "fc3->*")
    # more octaves of headroom: a coarser binary point for the same values
    assert logits_format(fxc.auto(max_formats=6)).frac < logits_format(fxc.auto(max_formats=6, margin=1)).frac


def test_compile_needs_calibration_data():
    with pytest.raises(fxc.PolicyError, match="calibration_data"):
        fxc.compile(MLP(), fxc.auto(), loss_fn=nn.CrossEntropyLoss())


@pytest.mark.parametrize("update", [None, "nearest"])
def test_stored_parameters_round_their_updates_stochastically_unless_told(update):
    from fxcompile.runtime.optim import fixed_point_optimizer, parameter_formats
    torch.manual_seed(0)
    options = {} if update is None else {"update_rounding": update}
    q = fxc.compile(MLP(), fxc.auto(max_formats=2, **options), loss_fn=nn.CrossEntropyLoss(),
                    calibration_data=[(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))])
    records = fxc.assignment(q)
    parameters = [r for r in records if r.role in ("weight", "bias")]
    others = [r for r in records if r.role not in ("weight", "bias") and r.forward is not None]
    assert parameters and others
    assert {r.forward.rounding for r in parameters} == {update or "stochastic"}
    assert {r.forward.rounding for r in others} == {"nearest"}
    # an update far below half a step survives on average only when it is rounded stochastically
    name, p, fmt = parameter_formats(q)[0]
    opt = fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=1.0), q)
    before = p.detach().clone()
    for _ in range(64):
        p.grad = torch.full_like(p, -fmt.scale / 8)
        opt.step()
    moved = float((p.detach() - before).mean() / (64 * fmt.scale / 8))
    assert (0.8 < moved < 1.2) if update is None else moved == 0.0, (name, moved)


def test_different_widths_in_one_adder_are_an_error():
    class Skip(nn.Module):
        def forward(self, x):
            return x + torch.relu(x)
    with pytest.raises(fxc.PolicyError, match="same bits"):
        fxc.compile(Skip(), fxc.auto(bits={"input": 8, "activation": 16}), calibration_data=[torch.randn(2, 3)])


def test_train_accepts_an_auto_policy():
    (tx, ty), (vx, vy) = synthetic(n_train=96, n_test=64)
    policy = fxc.auto(max_formats=2, bits=16, calibration_batches=2)
    m = train(TrainConfig(model="mlp", policy=policy, epochs=1, progress=False), (tx, ty), (vx, vy))
    q = m["model_object"]
    assert len(fxc.assignment(q).formats()) <= 2
    # learnable synthetic data, 10 classes: chance is 10 % (one standard error on 64 images: 4 points)
    assert m["final_loss_finite"] and m["accuracy"] > 0.5
    assert m["policy"].startswith("auto(K=2")
    # plain policies still train the old way
    m = train(TrainConfig(model="mlp", policy="baseline", epochs=1, progress=False), (tx, ty), (vx, vy))
    assert m["policy"] == "baseline" and m["accuracy"] > 0.5


def test_inspect_assignment_reports_noise_hardware_and_writes_plots(tmp_path, capsys):
    from fxcompile.cli import main
    main(["inspect", "fxcompile.experiments.models:ResidualCNN", "--assignment", "--input-shape", "4,1,28,28",
          "--max-formats", "3", "--bits", "activation=8,gradient=8,weight=16", "--calibration-batches", "1",
          "--profile", str(tmp_path / "p.png"), "--noise-vs-k", str(tmp_path / "k.png"),
          "--calibration-json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "NSR fwd" in out and "objective by K: K=2:" in out and "K=3:" in out
    # convolutions and the linear layer multiply an 8-bit activation by a 16-bit weight
    assert "MAC operand widths: 8x16 (3x)" in out
    for name in ("p.png", "k.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    from fxcompile.passes.calibrate import load_calibration
    stats = load_calibration(tmp_path / "c.json")
    assert "loss.loss_fn" in stats and stats["conv1"].gradient.count > 0


def test_parse_bits_reads_widths_choices_and_roles_and_names_what_it_cannot_read():
    from fxcompile.core.auto import parse_bits
    assert parse_bits("16") == 16
    assert parse_bits("8/16") == (8, 16)
    assert parse_bits("activation=8, gradient=8/12,weight=16") == {"activation": 8, "gradient": (8, 12), "weight": 16}
    with pytest.raises(fxc.PolicyError, match="'x8'"):
        parse_bits("activation=x8")
    with pytest.raises(fxc.PolicyError, match="'weight'.*role=width"):
        parse_bits("activation=8,weight")


def test_inspect_assignment_takes_the_sensitivity_objective_margins_and_budgets(capsys):
    from fxcompile.cli import main
    args = ["inspect", "fxcompile.experiments.models:ResidualCNN", "--assignment", "--input-shape", "4,1,28,28",
            "--max-formats", "3", "--bits", "8/16", "--calibration-batches", "1", "--objective", "sensitivity",
            "--output-margin", "2"]
    main(args)
    free = capsys.readouterr().out
    used = dict(kv.rsplit(" ", 1) for kv in free.split("hardware budgets used: ")[1].splitlines()[0].split(", "))
    memory = float(used["weight_memory_bits"])
    main(args + ["--weight-memory-bits", str(int(memory * 0.75))])
    tight = capsys.readouterr().out
    used = dict(kv.rsplit(" ", 1) for kv in tight.split("hardware budgets used: ")[1].splitlines()[0].split(", "))
    assert float(used["weight_memory_bits"]) <= memory * 0.75 < memory
