"""Training checkpoints that survive being killed at any moment.

A checkpoint is one file ``ckpt-<step>.pt`` in a directory: a header line with the SHA-256
of the body, then the body, a ``torch.save`` of a dict (model, optimizer, policy, RNG
states, epoch/step position, metrics so far).  It is written to a temporary file in the same
directory, flushed, fsynced and renamed over its final name, so a reader sees either the old
set of files or the new one, never a half-written file.  The newest ``keep`` checkpoints are
kept; :func:`load_latest` verifies the checksum and, if the newest file is truncated or
corrupted, warns and falls back to the one before it::

    >>> save_checkpoint("runs/a", {"step": 10, "model": model.state_dict()}, step=10)
    >>> state = load_latest("runs/a")          # None when there is no good checkpoint
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path

import torch

from ..core.files import atomic_write
from ..errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "load_latest", "checkpoints", "rng_state",
           "set_rng_state", "CheckpointError", "CheckpointWarning"]

_MAGIC = b"fxcompile-checkpoint sha256="
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointWarning(UserWarning):
    """Resuming skipped a bad checkpoint."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files in ``directory``, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: str | os.PathLike, state: dict, step: int, keep: int = 2) -> Path:
    """Write ``state`` atomically as ``directory/ckpt-<step>.pt``; delete all but the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    path = directory / f"ckpt-{step:09d}.pt"
    with atomic_write(path, fsync=True) as f:
        f.write(_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n")
        f.write(body)
    _fsync_dir(directory)
    for old in checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and verify one checkpoint file; :class:`CheckpointError` says what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None
    header, sep, body = data.partition(b"\n")
    if not header.startswith(_MAGIC) or not sep:
        raise CheckpointError(f"{path}: not an fxcompile checkpoint (bad header; truncated?)")
    if hashlib.sha256(body).hexdigest().encode() != header[len(_MAGIC):]:
        raise CheckpointError(f"{path}: checksum mismatch ({len(body)} bytes of body): "
                              "the file is truncated or corrupted")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a valid checksum over an unloadable body
        raise CheckpointError(f"{path}: cannot unpickle checkpoint ({e})") from None


def load_latest(directory: str | os.PathLike) -> dict | None:
    """The newest good checkpoint in ``directory`` (warning about each bad one skipped), or None."""
    for path in reversed(checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", CheckpointWarning, stacklevel=2)
    return None


def rng_state(*generators: torch.Generator) -> dict:
    """Every random state training draws from: torch's global RNG, Python's ``random``, and
    the given generators (e.g. the data-shuffling one)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured (the same generators, in the same order)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fingerprint(cfg, train_size: int) -> dict:
    """What must not change between a run and its resumption (``epochs`` may grow)."""
    policy = cfg.policy
    if hasattr(policy, "to_dict"):
        policy = policy.to_dict()
    elif policy is not None and not isinstance(policy, str):
        policy = repr(policy)
    model = cfg.model if isinstance(cfg.model, str) else type(cfg.model).__name__
    found = {"model": model, "policy": policy,
             "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
             "weight_rounding": cfg.weight_rounding, "train_size": train_size}
    if getattr(cfg, "reassign", None) is not None:   # absent without one, like loss_scale
        found["reassign"] = cfg.reassign.to_dict()
    if getattr(cfg, "loss_scale", 1) != 1:   # absent when 1, so checkpoints written before it resume
        found["loss_scale"] = float(cfg.loss_scale)
    return found


class TrainingCheckpointer:
    """Checkpoints of :func:`fxcompile.training.train.train`: every ``every`` steps and at each epoch end.

    A checkpoint holds the position as ``(epoch, step)`` = the next step to run, and the state
    of the data-shuffling generator at the start of that epoch, so resuming redraws the same
    permutation and skips the steps already done.  ``resume=False`` refuses a directory that
    already holds checkpoints (they would be mixed with the new run's).
    """

    def __init__(self, directory, cfg, train_size: int, every: int = 0, resume: bool = False, keep: int = 2):
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.resume = resume
        self.fingerprint = _fingerprint(cfg, train_size)
        if not resume and checkpoints(self.directory):
            raise CheckpointError(f"{self.directory}: holds checkpoints of an earlier run; resume it "
                                  "(--resume / resume=True) or choose an empty checkpoint directory")

    def restore(self, model, optimizer, shuffle: torch.Generator, schedule=None):
        """Load the newest good checkpoint into model/optimizer/RNGs (and a format ``schedule``:
        its formats, histories and counters); ``(epoch, step, history, losses)``."""
        state = load_latest(self.directory) if self.resume else None
        if state is None:
            return 0, 0, [], []
        for key in {**state["fingerprint"], **self.fingerprint}:
            value = self.fingerprint.get(key)
            if state["fingerprint"].get(key) != value:
                raise CheckpointError(f"{self.directory}: the checkpoint was written by a different run "
                                      f"({key}: {state['fingerprint'].get(key)!r} there, {value!r} now); "
                                      "resume with the same settings or choose another checkpoint directory")
        if schedule is not None and state.get("schedule") is not None:
            schedule.load_state_dict(state["schedule"])   # formats first: the weights below are on their grids
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("telemetry") is not None:
            from ..runtime.telemetry import load_counters
            load_counters(model, state["telemetry"])
        shuffle.set_state(state["shuffle"])
        set_rng_state(state["rng"])
        return state["epoch"], state["step"], list(state["history"]), list(state["losses"])

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """Checkpoint after ``step`` steps of an epoch? (The epoch-end one is written separately.)"""
        return bool(self.every) and step % self.every == 0 and step < steps_per_epoch

    def save(self, model, optimizer, shuffle_state: torch.Tensor, epoch: int, step: int, steps_per_epoch: int,
             history: list, losses: list, schedule=None) -> Path:
        from ..runtime.telemetry import counters_state
        state = {"fingerprint": self.fingerprint, "epoch": epoch, "step": step,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "shuffle": shuffle_state, "rng": rng_state(), "history": history, "losses": losses,
                 "telemetry": counters_state(model),
                 "schedule": schedule.state_dict() if schedule is not None else None}
        return save_checkpoint(self.directory, state, epoch * steps_per_epoch + step, self.keep)
