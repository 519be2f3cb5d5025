"""DDP with fixed-point gradient all-reduce: 2 CPU processes, gloo, localhost, bounded time.

The hook's sum against exact integer arithmetic, and train_ddp (loss scaling, the hook from
FixedPointAllReduce.from_model) against single-process training on the same global batch:
bit-identical gradients and parameters after every step."""

import json
import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fxcompile.training.distributed import FixedPointAllReduce, close_process_group, fixed_point_allreduce_hook, train_ddp

WORLD = 2
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    """Run fn(rank, *args) on WORLD processes; fail (never hang) past TIMEOUT_S."""
    port = _free_port()
    ctx = mp.start_processes(fn, args=(port, *args), nprocs=WORLD, join=False, start_method="spawn")
    waited = 0
    while not ctx.join(timeout=5):
        waited += 5
        if waited >= TIMEOUT_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")


def _init(rank, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))


def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 5, generator=g) * (3.0 if rank else 0.5), torch.randn(6, 3, generator=g)


def _oracle_codes(g: np.ndarray, bits: int, frac: int) -> np.ndarray:
    # exact: float64 holds g * 2**frac exactly; np.rint rounds half to even; two's-complement saturation
    q = np.rint(g.astype(np.float64) * 2.0 ** frac)
    lim = 2 ** (bits - 1) - 1
    return np.clip(q, -lim - 1, lim).astype(object)   # Python ints: the sum cannot overflow


def _exact_case(rank, fmt_text):
    bits, frac = (int(s) for s in fmt_text.split("."))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(FixedPointAllReduce(default=fmt_text), fixed_point_allreduce_hook)
    x, y = _rank_batch(rank)
    ((ddp(x) - y) ** 3).sum().backward()   # cubed: gradients large enough to saturate small formats
    # Oracle: every rank's local float gradient (plain autograd on a copy), coded exactly, summed.
    expected = None
    for r in range(WORLD):
        copy = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        with torch.no_grad():
            for p, w in zip(copy.parameters(), reference):
                p.copy_(w)
        xr, yr = _rank_batch(r)
        ((copy(xr) - yr) ** 3).sum().backward()
        codes = [_oracle_codes(p.grad.numpy(), bits, frac) for p in copy.parameters()]
        expected = codes if expected is None else [a + b for a, b in zip(expected, codes)]
    # the exact sum, rounded once to the gradient's float32 (exact while the summed codes fit in 24 bits)
    ok = all(np.array_equal(p.grad.numpy(),
                            np.array([float(c) / 2 ** frac for c in e.ravel()]).astype(np.float32)
                            .reshape(e.shape))
             for p, e in zip(model.parameters(), expected))
    saturated = any((np.abs(e) == WORLD * (2 ** (bits - 1) - 1)).any() for e in expected)
    quantized = all(torch.equal(p.grad.double() * 2 ** frac, (p.grad.double() * 2 ** frac).round())
                    for p in model.parameters()) if bits <= 24 else True
    return {"ok": bool(ok), "saturated": bool(saturated), "on_grid": bool(quantized)}


def _nan_case(rank):
    model = nn.Linear(3, 2)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(FixedPointAllReduce(default="16.8"), fixed_point_allreduce_hook)
    x = torch.ones(2, 3) * (float("nan") if rank == 1 else 1.0)
    ddp(x).sum().backward()
    return bool(all(torch.isnan(p.grad).all() for p in model.parameters()))


def _hook_worker(rank, port, out_dir):
    _init(rank, port)
    ok = False
    try:
        # 8.4: int32 codes; 32.20: int64 codes (31 + 1 bits of sum > 30)
        out = {fmt: _exact_case(rank, fmt) for fmt in ("8.4", "32.20")}
        out["nan"] = _nan_case(rank)
        with open(os.path.join(out_dir, f"hook_{rank}.json"), "w") as f:
            json.dump(out, f)
        ok = True
    finally:
        close_process_group(synchronize=ok)


def test_allreduce_is_the_sum_of_the_ranks_quantized_gradients(tmp_path):
    _spawn(_hook_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"hook_{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert r["8.4"]["ok"] and r["32.20"]["ok"], r
        assert r["8.4"]["saturated"] and r["8.4"]["on_grid"], r   # saturation and rounding were exercised
        assert r["nan"], "a non-finite gradient on one rank must make the bucket NaN on every rank"


# ---- train_ddp against one process: bit-identical parameters after every step ----------------

def _exact_policy():
    """Nearest rounding everywhere (no random draws that depend on the batch split), formats in
    which every product and partial sum of a weight gradient is exact in float32 and on its
    gradient grid (8-bit activations and weights on 2**-4 and 2**-6, activation gradients on
    2**-10, loss gradients on 2**-16: weight gradients on 2**-14 and 2**-20, held by 32.20), and
    a loss format wide enough that no rank's loss value saturates.  The module docstring's
    conditions for an all-reduce equal to one process's gradient."""
    import fxcompile as fxc
    return fxc.Policy(activation="8.4", gradient="16.10", loss="24.16", weight="8.6", bias="8.6",
                      weight_gradient="32.20", bias_gradient="32.16", name="exact")


DDP_STEPS, DDP_BATCH = 4, 16


def _ddp_config(loss_scale=1):
    from fxcompile.training.train import TrainConfig
    return TrainConfig(model="mlp", policy=_exact_policy(), epochs=1, batch_size=DDP_BATCH, lr=0.01, seed=0,
                       progress=False, loss_scale=loss_scale)


def _ddp_data():
    from fxcompile.experiments.data import synthetic
    return synthetic(DDP_STEPS * DDP_BATCH, 16, seed=5)


def _recording_steps(monkeypatch_target):
    """Make the optimizer built by fxcompile.training.train._build record, at every step, the
    gradients it is given and the parameters it leaves; returns the list it appends to."""
    import fxcompile.training.train as training
    build, steps = training._build, []

    def recording_build(*args, **kwargs):
        model, loss_fn, opt = build(*args, **kwargs)
        step = opt.step

        def recorded_step(*a, **k):
            grads = [p.grad.detach().clone() for p in model.parameters()]
            out = step(*a, **k)
            steps.append((grads, [p.detach().clone() for p in model.parameters()]))
            return out
        opt.step = recorded_step
        return model, loss_fn, opt
    monkeypatch_target(training, "_build", recording_build)
    return steps


def _ddp_worker(rank, port, out_dir, loss_scale):
    from fxcompile.training.distributed import train_ddp
    _init(rank, port)
    ok = False
    try:
        steps = _recording_steps(setattr)
        train_ddp(_ddp_config(loss_scale), *_ddp_data())
        torch.save(steps, os.path.join(out_dir, f"ddp_{rank}.pt"))
        ok = True
    finally:
        close_process_group(synchronize=ok)


@pytest.mark.parametrize("loss_scale", [1, 16])
def test_two_ranks_give_the_single_process_parameters_bit_for_bit_after_every_step(tmp_path, monkeypatch, loss_scale):
    from fxcompile.training.train import train
    _spawn(_ddp_worker, str(tmp_path), loss_scale)
    ranks = [torch.load(tmp_path / f"ddp_{r}.pt", weights_only=True) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _recording_steps(monkeypatch.setattr)
        train(_ddp_config(loss_scale), *_ddp_data())
    finally:
        torch.set_num_threads(threads)
    assert len(single) == DDP_STEPS and all(len(r) == DDP_STEPS for r in ranks)
    for i, (grads, params) in enumerate(single):
        for r in ranks:
            rank_grads, rank_params = r[i]
            for g, rg in zip(grads, rank_grads):
                assert torch.equal(g, rg), f"step {i + 1}: the summed gradient differs from one process's"
            for p, rp in zip(params, rank_params):
                assert torch.equal(p, rp), f"step {i + 1}: parameters differ from one process's"
        # not vacuous: the step moved the parameters, with gradients that are not all zero
        before = single[i - 1][1] if i else None
        assert any(bool(g.abs().sum() > 0) for g in grads)
        if before is not None:
            assert any(not torch.equal(a, b) for a, b in zip(before, params)), f"step {i + 1} changed nothing"


def _data():
    from fxcompile.experiments.data import synthetic
    (tx, ty), (vx, vy) = synthetic(1024, 1024, seed=3)
    g = torch.Generator().manual_seed(4)
    # extra noise so the task is not trivially separable and accuracies can differ
    return (tx + 6.0 * torch.randn(tx.shape, generator=g), ty), (vx + 6.0 * torch.randn(vx.shape, generator=g), vy)


def _train_worker(rank, port, out_dir):
    from fxcompile.training.train import TrainConfig
    _init(rank, port)
    ok = False
    try:
        train_data, test_data = _data()
        cfg = TrainConfig(model="mlp", policy="baseline", epochs=2, batch_size=64, seed=0, progress=False)
        m = train_ddp(cfg, train_data, test_data)
        flat = torch.cat([p.detach().flatten() for p in m["model_object"].parameters()]).double()
        gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        with open(os.path.join(out_dir, f"train_{rank}.json"), "w") as f:
            json.dump({"accuracy": m["accuracy"], "same_parameters": all(torch.equal(gathered[0], t) for t in gathered)},
                      f)
        del m
        ok = True
    finally:
        close_process_group(synchronize=ok)


@pytest.mark.slow   # two training processes plus the single-process reference
def test_two_process_training_matches_single_process_on_the_global_batch(tmp_path):
    from fxcompile.training.train import TrainConfig, train
    _spawn(_train_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"train_{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["same_parameters"] for r in results)
    torch.set_num_threads(1)
    single = train(TrainConfig(model="mlp", policy="baseline", epochs=2, batch_size=64, seed=0, progress=False),
                   *_data())["accuracy"]
    ddp = results[0]["accuracy"]
    print(f"baseline MLP, synthetic, global batch 64, 2 epochs: single process {100 * single:.2f}%, "
          f"2 ranks {100 * ddp:.2f}%")
    # 1024 test samples: one binomial standard error is <= 1.6 points; allow three
    assert abs(ddp - single) <= 0.05
    assert ddp > 0.3   # far above chance (10 %): the averaged updates really train
