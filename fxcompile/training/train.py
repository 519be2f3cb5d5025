"""Training and evaluation on in-memory tensors: FP32 or under a fixed-point policy."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.auto import Auto
from ..compiler import compile
from ..runtime.optim import fixed_point_optimizer
from ..core.policy import Policy

__all__ = ["TrainConfig", "train", "evaluate", "write_metrics", "step_times_side_by_side"]


@dataclasses.dataclass
class TrainConfig:
    """The study's hyperparameters are the defaults: Adam, lr 0.001, batch 32, 5 epochs."""

    model: str = "seed_cnn"
    policy: Any = None            # None / "fp32": plain FP32 training; else a Policy or file
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    weight_rounding: str | None = None   # override the update rounding of parameter storage
    loss_scale: float = 1         # power of two multiplying the loss's gradient (fixed-point policies only)
    progress: bool = True
    checkpoint_every: int = 100   # steps between checkpoints (with a checkpoint_dir; epoch ends always)
    telemetry: int = 0            # N > 0: count overflow/underflow/NaN on every cast, one step in N
    saturation_warning: float = 0.01   # warn once per edge saturating more than this fraction
    tensorboard: str | None = None   # log scalars and per-edge telemetry/histograms to this folder
    tensorboard_every: int = 50   # steps between telemetry scalars and histograms
    reassign: Any = None          # a training.reassign.Reassign: formats follow training (fixed-point policies)

    def policy_name(self) -> str:
        if self.policy is None:
            return "fp32"
        return getattr(self.policy, "name", None) or str(self.policy)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(x)


def calibration_batches(cfg: TrainConfig, train_data, count: int) -> list:
    """``count`` training batches of ``cfg.batch_size`` drawn with their own generator, so the
    training order stays the one ``cfg.seed`` gives."""
    tx, ty = train_data
    idx = torch.randperm(len(tx), generator=torch.Generator().manual_seed(10_000 + cfg.seed))
    return [(tx[i], ty[i]) for i in idx[:count * cfg.batch_size].split(cfg.batch_size)]


def _build(cfg: TrainConfig, example: torch.Tensor, train_data=None):
    from ..experiments.models import build
    model = build(cfg.model) if isinstance(cfg.model, str) else cfg.model
    criterion = nn.CrossEntropyLoss()
    if cfg.policy is None or cfg.policy == "fp32":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        return model, (lambda out, y: criterion(out, y)), opt
    if isinstance(cfg.policy, Auto):
        batches = calibration_batches(cfg, train_data, cfg.policy.calibration_batches)
        qmodel = compile(model, cfg.policy, loss_fn=criterion, example_inputs=(example,), calibration_data=batches,
                         loss_scale=cfg.loss_scale)
    else:
        qmodel = compile(model, Policy.coerce(cfg.policy), loss_fn=criterion, example_inputs=(example,),
                         loss_scale=cfg.loss_scale)
    opt = fixed_point_optimizer(torch.optim.Adam(qmodel.parameters(), lr=cfg.lr), qmodel, cfg.weight_rounding)
    return qmodel, qmodel.loss, opt


def step_times_side_by_side(configs: list[TrainConfig], train_data, steps: int = 40,
                            warmup: int = 5) -> list[float]:
    """Median training-step time in seconds of each config's fresh model, measured side by side.

    The models are built (and the cast kernel loaded) first, then each runs ``warmup``
    untimed steps, then ``steps`` timed ones; the models take turns step by step in a rotating
    order on the same batches, so machine noise hits them alike and their ratio is fair::

        fp32, fx = step_times_side_by_side([TrainConfig(), TrainConfig(policy="baseline")], data)
    """
    from ..runtime import kernels
    kernels.load()
    tx, ty = train_data
    runs = []
    for cfg in configs:
        torch.manual_seed(cfg.seed)
        model, loss_fn, opt = _build(cfg, tx[:2], train_data)
        runs.append((model.train(), loss_fn, opt, []))
    batch = configs[0].batch_size
    for i in range(warmup + steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(tx)
        for j in range(len(runs)):
            model, loss_fn, opt, times = runs[(i + j) % len(runs)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(tx[idx]), ty[idx]).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return [statistics.median(times) for *_, times in runs]


def train(cfg: TrainConfig, train_data, test_data, *, checkpoint_dir=None, resume: bool = False) -> dict:
    """Train from ``cfg`` on (x, y) tensors; returns metrics (test accuracy after each epoch).

    With ``checkpoint_dir`` the run is checkpointed atomically every ``cfg.checkpoint_every``
    steps and at each epoch end (:mod:`fxcompile.training.checkpoint`); ``resume=True`` continues from
    the newest good checkpoint there, ending bit-identical to an uninterrupted run.  The metrics
    say where this process started (``start_step``, counted over all epochs; 0 for a fresh run)
    and how many optimizer steps it ran (``steps_run``): a resumed run has
    ``start_step + steps_run == epochs * steps per epoch``.
    """
    torch.manual_seed(cfg.seed)
    (tx, ty), (vx, vy) = train_data, test_data
    model, loss_fn, opt = _build(cfg, tx[:2], train_data)
    if cfg.telemetry and isinstance(model, torch.fx.GraphModule):
        from ..runtime import telemetry
        telemetry.enable(model, every=cfg.telemetry)
    schedule = None
    if cfg.reassign is not None:
        from .reassign import FormatSchedule
        schedule = FormatSchedule(model, cfg.reassign, opt)   # refuses a model without casts (fp32)
    log = None
    if cfg.tensorboard:
        from .tensorboard import TensorBoardLog
        log = TensorBoardLog(cfg.tensorboard, model, every=cfg.tensorboard_every)
    g = torch.Generator().manual_seed(cfg.seed)
    step_times, epochs, losses = [], [], []
    steps_per_epoch = (len(tx) + cfg.batch_size - 1) // cfg.batch_size
    ckpt, start_epoch, start_step = None, 0, 0
    if checkpoint_dir is not None:
        from .checkpoint import TrainingCheckpointer
        ckpt = TrainingCheckpointer(checkpoint_dir, cfg, len(tx), cfg.checkpoint_every, resume)
        start_epoch, start_step, epochs, losses = ckpt.restore(model, opt, g, schedule)
    start = start_epoch * steps_per_epoch + start_step
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=min(start_epoch * steps_per_epoch + start_step,
                   cfg.epochs * steps_per_epoch), desc=f"{cfg.policy_name()} seed {cfg.seed}", leave=False)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        shuffle_state = g.get_state()  # a mid-epoch checkpoint redraws this epoch's permutation
        perm = torch.randperm(len(tx), generator=g)
        for i in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            step = epoch * steps_per_epoch + i + 1
            if log is not None:
                log.before_step(step)
            t0 = time.perf_counter()
            if schedule is not None:
                schedule.before_step(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(tx[idx]), ty[idx])
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.after_step(step)
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if log is not None:
                log.step(step, losses[-1], opt.param_groups[0]["lr"])
            if bar is not None:
                bar.update()
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if ckpt is not None and ckpt.due(i + 1, steps_per_epoch):
                ckpt.save(model, opt, shuffle_state, epoch, i + 1, steps_per_epoch, epochs, losses, schedule)
        epochs.append({"epoch": epoch + 1, "accuracy": evaluate(model, vx, vy),
                       "train_loss": statistics.fmean(losses[-steps_per_epoch:])})
        if log is not None:
            log.epoch((epoch + 1) * steps_per_epoch, epochs[-1]["accuracy"], epochs[-1]["train_loss"])
        if cfg.telemetry and isinstance(model, torch.fx.GraphModule):
            telemetry.check(model, cfg.saturation_warning)
        if ckpt is not None:
            ckpt.save(model, opt, g.get_state(), epoch + 1, 0, steps_per_epoch, epochs, losses, schedule)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    return {"policy": cfg.policy_name(), "model": cfg.model if isinstance(cfg.model, str) else type(cfg.model).__name__,
            "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "train_size": len(tx), "test_size": len(vx), "accuracy": epochs[-1]["accuracy"] if epochs else None,
            "history": epochs, "step_time_ms": 1e3 * statistics.median(step_times) if step_times else None,
            "final_loss_finite": bool(torch.isfinite(torch.tensor(losses[-1:])).all()) if losses else None,
            "start_step": start, "steps_run": len(step_times),
            **({"reassignments": schedule.reassignments, "reassign_moves": schedule.moves,
                "final_formats": sorted(f"{b}.{f}" for b, f in _distinct(model))} if schedule is not None else {}),
            "model_object": model, **({"schedule_object": schedule} if schedule is not None else {})}


def _distinct(model):
    from .reassign import distinct_formats
    return distinct_formats(model)


def write_metrics(metrics: dict | list[dict], path: str | Path) -> None:
    """Write metrics as JSON (``.json``) or CSV (``.csv``, one row per run, no history)."""
    rows = metrics if isinstance(metrics, list) else [metrics]
    rows = [{k: v for k, v in r.items() if not k.endswith("_object")} for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        import csv
        flat = [{k: v for k, v in r.items() if k != "history"} for r in rows]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
    else:
        path.write_text(json.dumps(rows if isinstance(metrics, list) else rows[0], indent=2) + "\n")
