"""Formats that follow training (fxcompile.training.reassign): the schedule moves binary points
in place, never holds more than K formats, resumes bit-identically from a checkpoint, and what
export_onnx / to_hls4ml deploy are the formats the casts hold at the end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile.core import ir
from fxcompile.errors import PolicyError
from fxcompile.experiments.data import synthetic
from fxcompile.training.checkpoint import checkpoints
from fxcompile.training.reassign import FormatSchedule, Reassign, cast_formats, distinct_formats
from fxcompile.training.train import TrainConfig, train

N_TRAIN, BATCH = 160, 16   # 10 steps an epoch


class TinyCNN(nn.Module):
    """The seed CNN's shape (conv, ReLU, max pool, flatten, linear), small enough for seconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return self.fc1(self.flatten(self.pool1(self.relu1(self.conv1(x)))))


def _compiled(k=3, seed=0):
    (tx, ty), _ = synthetic(n_train=128, n_test=8)
    torch.manual_seed(seed)
    batches = [(tx[i * 16:(i + 1) * 16], ty[i * 16:(i + 1) * 16]) for i in range(2)]
    q = fxc.compile(TinyCNN(), fxc.auto(max_formats=k, bits=16), loss_fn=nn.CrossEntropyLoss(),
                    example_inputs=(tx[:2],), calibration_data=batches)
    return q, tx, ty


def _train_steps(q, opt, sched, tx, ty, steps, start=1):
    for step in range(start, start + steps):
        i = step % 8
        x, y = tx[i * 16:(i + 1) * 16], ty[i * 16:(i + 1) * 16]
        sched.before_step(step)
        opt.zero_grad(set_to_none=True)
        q.loss(q(x), y).backward()
        opt.step()
        sched.after_step(step)


@pytest.mark.parametrize("k, rechoose", [(1, True), (3, False), (3, True)])
def test_formats_move_and_never_exceed_k(k, rechoose):
    q, tx, ty = _compiled(k)
    before = cast_formats(q)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    sched = FormatSchedule(q, Reassign(every=3, observe_every=1, rechoose=rechoose), opt)
    seen = []
    for step in range(1, 10):
        _train_steps(q, opt, sched, tx, ty, 1, start=step)
        seen.append(len(distinct_formats(q)))
        assert len(fxc.assignment(q).formats()) <= k
    assert max(seen) <= k and sched.reassignments == 3
    if k > 1:  # (one format may well stay where calibration put it)
        assert sched.moves > 0 and cast_formats(q) != before
    # the optimizer stores each parameter in its cast's current format, and the parameters lie on it
    from fxcompile.runtime.optim import parameter_formats
    specs = {id(p): spec for p, spec in opt.fxc_parameter_formats}
    for _, p, fmt in parameter_formats(q):
        assert specs[id(p)][0] == fmt.frac
        codes = p.detach().double() * 2.0 ** fmt.frac
        assert torch.equal(codes, codes.round()), "a parameter is off its moved grid"


def test_tied_slots_move_together():
    """An elided cast keeps its source's formats, so its forward stays an identity."""
    q, tx, ty = _compiled(3)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    sched = FormatSchedule(q, Reassign(every=3, observe_every=1, rechoose=True), opt)
    _train_steps(q, opt, sched, tx, ty, 9)
    assert sched.moves > 0
    for node in q.graph.nodes:
        if ir.ELIDED.get(node):
            src = node.args[0].args[0]
            a, b = q.get_submodule(node.target).edge, q.get_submodule(src.target).edge
            assert (a.forward, a.backward) == (b.forward, b.backward), node.name


def test_threshold_triggers_a_reassignment():
    q, tx, ty = _compiled(3)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    # squeeze the first activation's format so it saturates: the threshold must move it back
    sched = FormatSchedule(q, Reassign(saturation=0.01, observe_every=1, max_formats=4), opt)
    fmt = q.casts.conv1.edge.forward
    squeezed = fmt.replace(frac=fmt.frac + 10)
    sched.set_formats({(cast, "fwd"): squeezed for cast in ("casts.conv1", "casts.relu1", "casts.pool1")})
    _train_steps(q, opt, sched, tx, ty, 1)
    assert sched.reassignments == 1 and "saturation" in sched.log[0]["reason"]
    assert q.casts.conv1.edge.forward.frac < squeezed.frac


def test_bad_settings_name_the_field():
    with pytest.raises(PolicyError, match="every"):
        Reassign(every=-1)
    with pytest.raises(PolicyError, match="saturation"):
        Reassign(every=5, saturation=2.0)
    with pytest.raises(PolicyError, match="nothing would trigger"):
        Reassign()
    with pytest.raises(PolicyError, match="no fixed-point casts"):
        FormatSchedule(nn.Linear(2, 2), Reassign(every=1))


def _config(epochs):
    return TrainConfig(model="mlp", policy=fxc.auto(max_formats=2, bits=16, calibration_batches=2),
                       epochs=epochs, batch_size=BATCH, progress=False, checkpoint_every=4,
                       reassign=Reassign(every=3, observe_every=1, window=4, rechoose=True))


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_resume_is_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = synthetic(n_train=N_TRAIN, n_test=32)
        ref = train(_config(2), *data)
        assert ref["reassignments"] == 6 and ref["reassign_moves"] > 0
        first = train(_config(1), *data, checkpoint_dir=tmp_path)
        # drop the epoch-end checkpoint: resume from step 8, between the re-assignments at 6 and 9
        ckpts = checkpoints(tmp_path)
        ckpts[-1].unlink()
        assert checkpoints(tmp_path)[-1].name == "ckpt-000000008.pt"
        resumed = train(_config(2), *data, checkpoint_dir=tmp_path, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert first["reassignments"] == 3 and resumed["start_step"] == 8 and resumed["steps_run"] == 12
    a, b = ref["model_object"], resumed["model_object"]
    _same(a.state_dict(), b.state_dict())
    assert cast_formats(a) == cast_formats(b)
    assert ref["history"] == resumed["history"]
    assert resumed["reassignments"] == 6


def test_resume_refuses_other_schedule_settings(tmp_path):
    data = synthetic(n_train=N_TRAIN, n_test=32)
    train(_config(1), *data, checkpoint_dir=tmp_path)
    cfg = _config(2)
    cfg.reassign = Reassign(every=5)
    with pytest.raises(fxc.FxcompileError, match="reassign"):
        train(cfg, *data, checkpoint_dir=tmp_path, resume=True)


def test_deployed_formats_are_the_final_ones(tmp_path):
    from fxcompile.deploy.export import integer_graph, verify
    q, tx, ty = _compiled(3)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    start = cast_formats(q)
    sched = FormatSchedule(q, Reassign(every=4, observe_every=1, rechoose=True), opt)
    _train_steps(q, opt, sched, tx, ty, 8)
    final = cast_formats(q)
    assert final != start
    q.eval()
    graph = integer_graph(q, (tx[:1],))
    checked = 0
    for op in graph.ops:
        node = next((n for n in q.graph.nodes if n.name == op.source), None)
        if node is None or not ir.EDGE.has(node) or op.fmt is None:
            continue
        fmt = ir.stored_format(q.get_submodule(node.target).edge.forward)
        assert (op.fmt.bits, op.frac) == (fmt.bits, fmt.frac), op.source
        checked += 1
    assert checked >= 3
    moved = [n for n, (f, _) in final.items() if f is not None and start[n][0] is not None and f.frac != start[n][0].frac]
    assert moved
    path = tmp_path / "m.onnx"
    fxc.export_onnx(q, path, example_inputs=(tx[:1],))
    report = verify(q, path, tx[:32])
    assert report["mismatches"] == 0 and report["simulation_mismatches"] == 0


def test_hls4ml_precisions_are_the_final_formats():
    pytest.importorskip("hls4ml")
    from fxcompile.deploy.backends.hls4ml import hls_plan, hls_precision
    q, tx, ty = _compiled(3)
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(q.parameters(), 1e-3), q)
    sched = FormatSchedule(q, Reassign(every=4, observe_every=1, rechoose=True), opt)
    _train_steps(q, opt, sched, tx, ty, 8)
    assert sched.moves > 0
    q.eval()
    _, layers = hls_plan(q, (tx[:1],))
    edges = {ir.EDGE.of(n).name: q.get_submodule(n.target).edge for n in q.graph.nodes if ir.EDGE.has(n)}
    checked = 0
    for layer in layers:
        for key, edge_name in layer.edges.items():
            if edge_name in edges and edges[edge_name].forward is not None:
                want = hls_precision(ir.stored_format(edges[edge_name].forward))
                assert layer.precision[key] == want, (layer.name, key)
                checked += 1
    assert checked >= 3


def test_cli_trains_saves_and_exports_the_final_formats(tmp_path, capsys, monkeypatch):
    from fxcompile.cli import main
    from fxcompile.deploy import export as export_module
    from tests.experiments.test_imagefolder import make_folder
    make_folder(tmp_path / "imgs", per_class=10)
    data = ["--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "16"]
    main(["train", "--model", "tests.experiments.test_imagefolder:TinyCNN", *data, "--policy", "auto:2",
          "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--reassign-every", "2", "--reassign-rechoose",
          "--save", str(tmp_path / "run.pt")])
    capsys.readouterr()
    saved = torch.load(tmp_path / "run.pt", weights_only=True)["fxcompile"]["formats"]
    exported = {}
    original = export_module.export_onnx

    def capture(qmodel, *args, **kwargs):
        exported.update({name: [f.frac if f is not None else None for f in fmts]
                         for name, fmts in cast_formats(qmodel).items()})
        return original(qmodel, *args, **kwargs)

    import fxcompile.training.reassign as reassign_module
    applied, apply = [], reassign_module.apply_formats
    monkeypatch.setattr(export_module, "export_onnx", capture)
    monkeypatch.setattr(reassign_module, "apply_formats", lambda *a, **k: applied.append(apply(*a, **k)))
    main(["export", str(tmp_path / "m.onnx"), "--state-dict", str(tmp_path / "run.pt")])
    assert applied and applied[0], "training moved no format: the check below would be vacuous"
    assert exported == saved
    with pytest.raises(SystemExit, match="fp32"):
        main(["train", *data, "--policy", "fp32", "--reassign-every", "2"])


def test_reassign_every_is_a_sweep_key_that_reaches_training():
    from fxcompile.experiments.sweep import SweepError, resolve, run_point
    plain = resolve({"policy": "baseline"}, "t")
    assert "reassign_every" not in plain and resolve({"policy": "baseline", "reassign_every": 0}, "t") == plain
    assert resolve({"policy": "baseline", "reassign_every": 3}, "t") == {**plain, "reassign_every": 3}
    with pytest.raises(SweepError, match="fp32"):
        resolve({"policy": "fp32", "reassign_every": 3}, "t")
    # moving the formats changes what training does, so the key is in the point's id
    small = {"dataset": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "model": "mlp", "epochs": 1,
             "batch_size": 16, "policy": "baseline"}
    runs = [run_point(resolve({**small, "reassign_every": n}, "t"), 0) for n in (0, 2)]
    assert runs[0]["final_loss"] != runs[1]["final_loss"]


def test_train_refuses_a_schedule_for_fp32():
    with pytest.raises(PolicyError, match="no fixed-point casts"):
        train(TrainConfig(model="mlp", policy=None, epochs=1, progress=False, reassign=Reassign(every=2)),
              *synthetic(n_train=32, n_test=8))
