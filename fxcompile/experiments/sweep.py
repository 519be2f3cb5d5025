"""Sweeps: a grid (or list) of policies and hyperparameters, each point run for several seeds.

A sweep file is TOML::

    name = "weight-share"
    seeds = 2                       # a count (seeds 0..n-1) or a list [0, 3, 7]
    output = "results/weight.csv"   # optional; --out wins; default results/<name>.csv

    [defaults]                      # every point starts from these
    dataset = "fashion_mnist"       # fashion_mnist, digits (scikit-learn, bundled) or synthetic
    train_subset = 6000
    model = "seed_cnn"              # seed_cnn, mlp, residual_cnn, resnet18 (torchvision)
    policy = "baseline"             # baseline, optimized, 8bit, fp32, or a policy file (relative to this file)
    epochs = 2
    batch_size = 32
    lr = 0.001

    [[points]]                      # a list of points ...
    policy = "fp32"

    [[grid]]                        # ... and/or grids: the product of the listed values
    weight.frac_share = [0.25, 0.5, 0.75]
    weight.bits = [16, 24]

A point with ``policy = "auto"`` lets the cost model choose its formats (:func:`fxcompile.auto`,
calibrated on the point's training data); ``auto.<field>`` keys set its arguments and sweep
like any other key, so a list of budgets gives one point each::

    [defaults]
    policy = "auto"
    auto.max_formats = 3
    auto.bits = [8, 16]             # a choice of widths (or "8/16"); auto.bits.<role> per role
    [[grid]]
    auto.weight_memory_bits = [4e6, 5.5e6]     # also auto.bops, auto.hls4ml_dsps, auto.objective, ...

``auto.*`` keys apply only to ``policy = "auto"`` points (other points keep their ids), and
role fields cannot be given with it.  Such a run records in the JSON-lines file the formats
chosen, the objective, what the chosen widths use of ``weight_memory_bits``, ``bops`` and (with
hls4ml installed) ``hls4ml_dsps`` (``usage``) and the budgets; its CSV role columns hold the
formats each role got.

The points of a sweep are the union of ``points`` and every ``grid``'s product, each merged
over ``defaults``.  Policy fields are ``<role>.<field>`` with field ``format`` ("16.8"),
``bits``, ``frac``, ``frac_share`` (frac = round(share * bits)) or ``rounding``, applied in
that order on top of the point's policy.  Two points that resolve to the same run (same data,
model, hyperparameters and formats) are one point.

Results go to a CSV, one row per finished run, appended atomically (one whole line, flush,
fsync) as each run finishes, and a JSON-lines file beside it with each run's metadata
(policy, versions, git revision, wall time, per-epoch history).  Running a sweep again skips
the (point, seed) pairs already in the CSV, so a killed sweep resumes without duplicating or
losing rows::

    fxcompile sweep examples/study/table.toml --out results/table.csv
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import platform
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ..core.formats import FixedPoint, as_format
from ..core.policy import ROLES, Policy, load_policy
from ..errors import PolicyError, SweepError

__all__ = ["SweepError", "Point", "Sweep", "load_sweep", "run_point", "run_sweep", "read_rows", "COLUMNS",
           "DATASETS", "build_model", "load_dataset"]

DATASETS = ("fashion_mnist", "digits", "synthetic")
HYPER = {"dataset": str, "train_subset": int, "data_seed": int, "model": str, "epochs": int, "batch_size": int,
         "lr": float, "weight_rounding": str, "synthetic_train": int, "synthetic_test": int, "loss_scale": float,
         "reassign_every": int}
DEFAULTS = {"dataset": "fashion_mnist", "train_subset": None, "data_seed": 0, "model": "seed_cnn",
            "policy": "baseline", "epochs": 5, "batch_size": 32, "lr": 1e-3, "weight_rounding": None,
            "synthetic_train": 512, "synthetic_test": 256, "loss_scale": 1.0, "reassign_every": 0}
ROLE_FIELDS = ("format", "bits", "frac", "frac_share", "rounding")
FORMAT_ROLES = ("activation", "gradient", "loss", "weight", "bias")   # the study's five, one CSV column each
COLUMNS = ("sweep", "point", "seed", "label", "dataset", "model", "policy", *FORMAT_ROLES, "epochs", "batch_size",
           "lr", "train_size", "test_size", "accuracy", "history", "final_loss", "step_time_ms", "wall_time_s",
           "cpu_time_s", "config")


# ---- points -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
    """One resolved run configuration; ``id`` hashes everything that changes the result."""

    config: dict          # dataset, model, hyperparameters, policy_name, policy (dict or None for FP32)
    label: str            # what the sweep file varied, e.g. "weight.frac_share=0.75"

    @functools.cached_property
    def id(self) -> str:
        return hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]

    def policy(self):
        """The point's :class:`Policy`, its :func:`fxcompile.auto` settings, or ``None`` (FP32)."""
        if self.is_auto:
            from ..core.auto import auto
            return auto(**auto_kwargs(self.config["policy"]["auto"]))
        return None if self.config["policy"] is None else Policy.from_dict(self.config["policy"])

    @property
    def is_auto(self) -> bool:
        return is_auto(self.config)

    def formats(self) -> dict[str, str]:
        if self.is_auto:   # chosen when the run calibrates; its row records them
            return {r: "auto" for r in FORMAT_ROLES}
        p = self.policy()
        return {r: ("float" if p is None or p.format_for(r) is None else str(p.format_for(r))) for r in FORMAT_ROLES}


def is_auto(config: dict) -> bool:
    """Whether a point's configuration lets the cost model (:func:`fxcompile.auto`) choose its formats."""
    return isinstance(config.get("policy"), dict) and "auto" in config["policy"]


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _base_policy(name: Any, where: str, folder: Path) -> tuple[str, Policy | None]:
    if not isinstance(name, str):
        raise SweepError(f"{where}: policy must be a name (baseline, optimized, 8bit, fp32) or a policy file, got {name!r}")
    if name in ("fp32", "float"):
        return "fp32", None
    path = folder / name
    try:
        policy = load_policy(path if path.suffix in (".toml", ".json") else name)
    except PolicyError as e:
        raise SweepError(f"{where}: {e}") from None
    return policy.name or Path(name).stem, policy


def _apply_role(policy: Policy | None, role: str, fields: dict, where: str) -> Policy:
    if role not in ROLES:
        raise SweepError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    unknown = set(fields) - set(ROLE_FIELDS)
    if unknown:
        raise SweepError(f"{where}: unknown field(s) {sorted(f'{role}.{u}' for u in unknown)}; "
                         f"a role takes {', '.join(ROLE_FIELDS)}")
    if "frac" in fields and "frac_share" in fields:
        raise SweepError(f"{where}: give {role}.frac or {role}.frac_share, not both")
    fmt = as_format(fields["format"], where=f"{where}: {role}.format") if "format" in fields else \
        (policy.format_for(role) if policy is not None else None)
    if fmt is None and not {"format", "bits"} & set(fields):
        raise SweepError(f"{where}: role {role!r} is floating point in this policy; give {role}.format or "
                         f"{role}.bits before changing its other fields")
    try:
        if fmt is None:
            fmt = FixedPoint(int(fields["bits"]), 0)
        if "bits" in fields:
            fmt = fmt.replace(bits=int(fields["bits"]))
        if "frac" in fields:
            fmt = fmt.replace(frac=int(fields["frac"]))
        if "frac_share" in fields:
            fmt = fmt.replace(frac=round(float(fields["frac_share"]) * fmt.bits))
        if "rounding" in fields:
            fmt = fmt.replace(rounding=fields["rounding"])
    except ValueError as e:
        raise SweepError(f"{where}: {role}: {e}") from None
    base = policy.to_dict() if policy is not None else {"formats": {}}
    base["formats"][role] = str(fmt)
    return Policy.from_dict(base, where=where)


AUTO_BUDGETS = ("weight_memory_bits", "bops", "hls4ml_dsps")


def _auto_fields() -> tuple[str, ...]:
    from ..core.auto import Auto
    return tuple(f.name for f in dataclasses.fields(Auto) if f.name != "name")


def _widths_setting(value: Any, key: str, where: str) -> int | list[int]:
    """One width (16), a choice of widths ([8, 16] or "8/16")."""
    if isinstance(value, str):
        try:
            value = [int(w) for w in value.split("/")]
        except ValueError:
            raise SweepError(f"{where}: {key} must be a width (16), a list of widths ([8, 16]) or \"8/16\", "
                             f"got {value!r}") from None
    if isinstance(value, list):
        if not value or not all(isinstance(w, int) and not isinstance(w, bool) for w in value):
            raise SweepError(f"{where}: {key} must be a width (16), a list of widths ([8, 16]) or \"8/16\", "
                             f"got {value!r}")
        return sorted(set(value)) if len(set(value)) > 1 else value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{where}: {key} must be a width (16), a list of widths ([8, 16]) or \"8/16\", got {value!r}")
    return value


def auto_settings(fields: dict, where: str) -> dict:
    """Check the ``auto.<field>`` keys of a point (``auto.bits.<role>`` gives a role's widths) and
    return them as the JSON settings of :func:`fxcompile.auto` that a point's id hashes.

    Only the fields given are kept, so a point's id does not depend on the cost model's defaults."""
    from ..core.auto import auto
    known = _auto_fields()
    settings: dict[str, Any] = {}
    for key, value in fields.items():
        field, _, role = key.partition(".")
        if field not in known or (role and field != "bits"):
            raise SweepError(f"{where}: unknown key auto.{key}; auto takes {', '.join(known)} "
                             "(and auto.bits.<role>)")
        if field == "bits" and role:
            settings.setdefault("bits", {})
            if not isinstance(settings["bits"], dict):
                raise SweepError(f"{where}: give auto.bits or auto.bits.<role>, not both")
            settings["bits"][role] = _widths_setting(value, f"auto.bits.{role}", where)
        elif field == "bits":
            if "bits" in settings:
                raise SweepError(f"{where}: give auto.bits or auto.bits.<role>, not both")
            settings["bits"] = _widths_setting(value, "auto.bits", where)
        elif field in AUTO_BUDGETS:
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf
                    or (value == 0 and field != "hls4ml_dsps")):   # no DSPs at all is a budget too
                kind = "a number >= 0" if field == "hls4ml_dsps" else "a positive number"
                raise SweepError(f"{where}: auto.{field} is a budget and must be {kind}, got {value!r}")
            settings[field] = value
        elif field == "fracs":
            if not isinstance(value, list) or len(value) != 2:
                raise SweepError(f"{where}: auto.fracs must be [lo, hi], got {value!r}")
            settings[field] = list(value)
        else:
            settings[field] = value
    if isinstance(settings.get("bits"), dict):
        settings["bits"] = dict(sorted(settings["bits"].items()))
    try:
        auto(**auto_kwargs(settings))
    except (PolicyError, TypeError, ValueError) as e:
        raise SweepError(f"{where}: {str(e).replace('auto: ', 'auto.', 1)}") from None
    return dict(sorted(settings.items(), key=lambda kv: known.index(kv[0])))


def auto_kwargs(settings: dict) -> dict:
    """A point's auto settings as keyword arguments of :func:`fxcompile.auto`."""
    kwargs = dict(settings)
    if "fracs" in kwargs:
        kwargs["fracs"] = tuple(kwargs["fracs"])
    return kwargs


def _auto_name(settings: dict) -> str:
    def show(v):
        if isinstance(v, dict):
            return ",".join(f"{k}={show(w)}" for k, w in v.items())
        if isinstance(v, list):
            return "/".join(map(str, v))
        return f"{v:g}" if isinstance(v, float) else str(v)
    return "auto(" + ", ".join(f"{k}={show(v)}" for k, v in settings.items()) + ")"


def resolve(settings: dict, where: str, folder: Path = Path(".")) -> dict:
    """Turn flat point settings into a run configuration (the dict a :class:`Point` hashes)."""
    settings = dict(settings)
    unknown = [k for k in settings if k not in HYPER and k != "policy" and k.split(".")[0] not in (*ROLES, "auto")]
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {sorted(unknown)}; keys are {sorted(HYPER)}, policy, "
                         f"auto.<field>, and <role>.<field> with role in {', '.join(ROLES)} and field in "
                         f"{', '.join(ROLE_FIELDS)}")
    auto = {k[len("auto."):]: v for k, v in settings.items() if k.startswith("auto.")}
    for k in auto:   # like synthetic_train, auto.* apply only where they are used (policy = "auto")
        del settings["auto." + k]
    auto = auto_settings(auto, where) if settings.get("policy") == "auto" or auto else None
    auto = auto if settings.get("policy") == "auto" else None
    config = {k: DEFAULTS[k] for k in HYPER}
    for k, kind in HYPER.items():
        if k in settings and settings[k] is not None:
            try:
                config[k] = kind(settings[k])
            except (TypeError, ValueError):
                raise SweepError(f"{where}: {k} must be {kind.__name__}, got {settings[k]!r}") from None
    if config["dataset"] not in DATASETS:
        raise SweepError(f"{where}: dataset must be one of {DATASETS}, got {config['dataset']!r}")
    if auto is not None:
        clash = sorted(k for k in settings if k.split(".")[0] in ROLES)
        if clash:
            raise SweepError(f"{where}: policy \"auto\" chooses every format; {', '.join(clash)} cannot be "
                             "given with it")
        settings["policy"] = "fp32"   # replaced below by the cost model's settings
    name, policy = _base_policy(settings.get("policy", DEFAULTS["policy"]), where, folder)
    by_role: dict[str, dict] = {}
    for k, v in settings.items():
        if "." in k:
            role, _, field = k.partition(".")
            by_role.setdefault(role, {})[field] = v
    for role in sorted(by_role, key=ROLES.index):
        policy = _apply_role(policy, role, by_role[role], where)
    if policy is not None:
        policy.name = name
    config["policy_name"] = name
    config["policy"] = policy.to_dict() if policy is not None else None
    if auto is not None:   # only auto points carry the key, so every other point keeps its id
        config["policy_name"] = _auto_name(auto)
        config["policy"] = {"auto": auto}
    if config["dataset"] != "synthetic":
        del config["synthetic_train"], config["synthetic_test"]
    scale = config.pop("loss_scale")   # kept only when not 1, so points without it keep their ids
    if scale != 1:
        if policy is None and auto is None:
            raise SweepError(f"{where}: loss_scale scales a fixed-point gradient; the fp32 policy has none")
        if scale <= 0 or math.frexp(scale)[0] != 0.5:
            raise SweepError(f"{where}: loss_scale must be a power of two (1, 2, 4, ..., 16, ...), got {scale!r}")
        config["loss_scale"] = scale
    every = config.pop("reassign_every")   # kept only when set, like loss_scale
    if every:
        if (policy is None and auto is None) or every < 0:
            raise SweepError(f"{where}: reassign_every moves fixed-point formats every N > 0 steps; "
                             + ("the fp32 policy has none" if policy is None else f"got {every!r}"))
        config["reassign_every"] = every
    return config


def _label(varied: dict) -> str:
    return " ".join(f"{k}={v:g}" if k.startswith("auto.") and isinstance(v, float) else f"{k}={v}"
                    for k, v in varied.items()) or "defaults"


@dataclasses.dataclass
class Sweep:
    name: str
    seeds: list[int]
    points: list[Point]
    output: str | None = None

    @property
    def runs(self) -> list[tuple[Point, int]]:
        return [(p, s) for p in self.points for s in self.seeds]


def _expand(grid: dict, where: str) -> Iterator[dict]:
    keys = list(grid)
    values = []
    for k in keys:
        v = grid[k]
        if not isinstance(v, list) or not v:
            raise SweepError(f"{where}: grid key {k!r} needs a non-empty list of values, got {v!r}")
        values.append(v)
    for combo in itertools.product(*values):
        yield dict(zip(keys, combo))


def load_sweep(paths: str | Path | Iterable[str | Path], overrides: dict | None = None,
               seeds: list[int] | None = None) -> Sweep:
    """Read one or more sweep files into one :class:`Sweep` (points deduplicated across files).

    ``overrides`` replace keys of every file's ``[defaults]`` (grid and point values still win);
    ``seeds`` replaces the files' seeds.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    names, all_seeds, points, seen, output = [], [], [], set(), None
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SweepError(f"{path}: no such sweep file") from None
        except tomllib.TOMLDecodeError as e:
            raise SweepError(f"{path}: invalid TOML: {e}") from None
        known = {"name", "seeds", "output", "defaults", "points", "grid"}
        if set(data) - known:
            raise SweepError(f"{path}: unknown key(s) {sorted(set(data) - known)}; keys are {sorted(known)}")
        names.append(data.get("name", path.stem))
        output = output or data.get("output")
        s = data.get("seeds", 1)
        file_seeds = list(range(s)) if isinstance(s, int) else list(s)
        if not file_seeds or not all(isinstance(x, int) for x in file_seeds):
            raise SweepError(f"{path}: seeds must be a positive count or a list of ints, got {s!r}")
        all_seeds += [x for x in file_seeds if x not in all_seeds]
        defaults = dict(_flatten(data.get("defaults", {})), **(overrides or {}))
        grids = data.get("grid", [])
        grids = [grids] if isinstance(grids, dict) else grids
        listed = [_flatten(p) for p in data.get("points", [])]
        varied_sets = listed + [v for i, g in enumerate(grids) for v in _expand(_flatten(g), f"{path}: grid[{i}]")]
        for i, varied in enumerate(varied_sets or [{}]):
            config = resolve(dict(defaults, **varied), f"{path}: point {i} ({_label(varied)})", path.parent)
            point = Point(config, _label(varied))
            if point.id not in seen:
                seen.add(point.id)
                points.append(point)
    return Sweep("+".join(names), seeds if seeds is not None else all_seeds, points, output)


# ---- one run ------------------------------------------------------------------------------

def _digits(data_seed: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # 8x8 upsampled to 28x28 so every Fashion-MNIST model takes it unchanged
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(data_seed))
    n_test = len(x) // 4
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


@functools.lru_cache(maxsize=4)
def load_dataset(dataset: str, train_subset: int | None = None, data_seed: int = 0, root: str | None = None,
                 synthetic_train: int = 512, synthetic_test: int = 256):
    """(train, test) tensors for a sweep's dataset; cached per process (workers load once)."""
    if dataset == "fashion_mnist":
        from .data import fashion_mnist
        return fashion_mnist(root, train_subset=train_subset, seed=data_seed)
    if dataset == "digits":
        try:
            train, test = _digits(data_seed)
        except ImportError:
            raise SweepError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    elif dataset == "synthetic":
        from .data import synthetic
        train, test = synthetic(synthetic_train, synthetic_test, seed=data_seed)
    else:
        raise SweepError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if train_subset:
        idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(data_seed))[:train_subset]
        train = (train[0][idx], train[1][idx])
    return train, test


def build_model(name: str, num_classes: int = 10) -> torch.nn.Module:
    """fxcompile's models by name, plus ``resnet18``: torchvision's, adapted to 1x28x28 inputs.

    The adapted resnet18 takes one channel through a 3x3 stride-1 first convolution and has
    no stem max-pool, so 28x28 images keep enough resolution for its four stages.
    """
    if name == "resnet18":
        import torchvision
        m = torchvision.models.resnet18(num_classes=num_classes)
        m.conv1 = torch.nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = torch.nn.Identity()
        return m
    from .models import build
    return build(name)


def run_point(config: dict, seed: int, root: str | None = None, tensorboard: str | None = None) -> dict:
    """Train one point for one seed in this process (one torch thread); returns the result columns.

    Deterministic: the same (config, seed) gives the same accuracy and history in any process.
    ``tensorboard`` is a folder for the run's TensorBoard log (:mod:`fxcompile.training.tensorboard`).
    """
    from ..training.train import TrainConfig, train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        extra = {k: config[k] for k in ("synthetic_train", "synthetic_test") if k in config}
        train_data, test_data = load_dataset(config["dataset"], config["train_subset"], config["data_seed"],
                                             root, **extra)
        torch.manual_seed(seed)   # model initialisation depends on the run's seed only
        model = build_model(config["model"])
        policy = Point(config, "").policy()
        cfg = TrainConfig(model=model, policy=policy, epochs=config["epochs"], batch_size=config["batch_size"],
                          lr=config["lr"], seed=seed, weight_rounding=config["weight_rounding"], progress=False,
                          tensorboard=tensorboard, loss_scale=config.get("loss_scale", 1))
        if config.get("reassign_every"):
            from ..training.reassign import Reassign
            cfg.reassign = Reassign(every=config["reassign_every"])
        try:
            m = train(cfg, train_data, test_data)
        except PolicyError as e:   # the cost model's: a budget no choice of widths meets
            raise SweepError(f"{config['policy_name']}: {e}") from None
        chosen = _chosen(m["model_object"], config) if is_auto(config) else {}
        return {"accuracy": m["accuracy"], "history": [h["accuracy"] for h in m["history"]],
                "final_loss": m["history"][-1]["train_loss"] if m["history"] else None,
                "step_time_ms": m["step_time_ms"], "train_size": m["train_size"], "test_size": m["test_size"],
                **chosen, "wall_time_s": time.perf_counter() - t0,
                "cpu_time_s": time.process_time() - c0}
    finally:
        torch.set_num_threads(threads)


def _coarse(role: str) -> str:
    from ..core.policy import FALLBACK
    return FALLBACK.get(role, role)


def _chosen(qmodel, config: dict) -> dict:
    """What the cost model chose for an auto point: its formats (all, and per CSV role column),
    its objective and what the chosen widths use of each hardware budget (and the budget)."""
    from ..core.ir import SOLUTION
    from ..reports.inspect import assignment
    sol = qmodel.meta[SOLUTION.name]
    by_role: dict[str, set] = {r: set() for r in FORMAT_ROLES}
    edges = assignment(qmodel)
    for e in edges:
        for role, fmt in ((e.role, e.forward), (e.backward_role, e.backward)):
            if fmt is not None and _coarse(role) in by_role:
                by_role[_coarse(role)].add((fmt.bits, fmt.frac))
    settings = config["policy"]["auto"]
    return {"formats": [f"{b}.{f}" for b, f in sol.formats], "distinct_formats": len(edges.formats()),
            "role_formats": {r: " ".join(f"{b}.{f}" for b, f in sorted(v)) or "float" for r, v in by_role.items()},
            "objective": sol.objective, "predicted": sol.predicted, "baseline_objective": sol.baseline_objective,
            "exact": sol.exact,
            "usage": {k: float(v) for k, v in sol.usage.items()},
            "budgets": {k: settings[k] for k in AUTO_BUDGETS if k in settings}}


def _init_worker():
    torch.set_num_threads(1)


# ---- results files ------------------------------------------------------------------------

def _line(values: Iterable) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _append(path: Path, text: str) -> None:
    # one write of whole lines, then flush + fsync: a kill leaves at most one partial last line
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _drop_partial_line(path: Path) -> None:
    """Cut a trailing line without its newline (a run killed mid-write); it is never a finished row."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def read_rows(path: str | Path) -> list[dict]:
    """The finished runs in a results CSV (a trailing partial line is ignored)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and list(rows[0]) != list(COLUMNS):
        raise SweepError(f"{path}: columns {list(rows[0])} are not a sweep results file's {list(COLUMNS)}; "
                         "write to a new --out file")
    return rows


def _prepare(csv_path: Path, meta_path: Path) -> set[tuple[str, int]]:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_line(csv_path)
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        _append(csv_path, _line(COLUMNS))
        done = set()
    else:
        header = csv_path.open(encoding="utf-8").readline().strip()
        if header != _line(COLUMNS).strip():
            raise SweepError(f"{csv_path}: not a results file of this version (header {header[:60]!r}...); "
                             "write to a new --out file")
        done = {(r["point"], int(r["seed"])) for r in read_rows(csv_path)}
    # The CSV is the record of what finished; the metadata file keeps exactly its runs.
    if meta_path.exists():
        kept, keys = [], set()
        for line in meta_path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (rec.get("point"), rec.get("seed"))
            if line.endswith("\n") and key in done and key not in keys:
                keys.add(key)
                kept.append(line)
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, meta_path)
    return done


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Versions and git revision recorded with every run."""
    import torchvision
    from .. import __version__
    try:
        here = Path(__file__).resolve().parents[1]  # the package
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        if rev and dirty:
            rev += "+dirty"
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"fxcompile": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "git_revision": rev}


def _record(sweep: Sweep, point: Point, seed: int, result: dict) -> tuple[str, str]:
    formats = result.get("role_formats") or point.formats()
    c = point.config
    row = {"sweep": sweep.name, "point": point.id, "seed": seed, "label": point.label, "dataset": c["dataset"],
           "model": c["model"], "policy": c["policy_name"], **formats, "epochs": c["epochs"],
           "batch_size": c["batch_size"], "lr": c["lr"], "train_size": result["train_size"],
           "test_size": result["test_size"], "accuracy": repr(result["accuracy"]),
           "history": json.dumps(result["history"]), "final_loss": repr(result["final_loss"]),
           "step_time_ms": f"{result['step_time_ms']:.3f}", "wall_time_s": f"{result['wall_time_s']:.2f}",
           "cpu_time_s": f"{result['cpu_time_s']:.2f}",
           "config": json.dumps(c, sort_keys=True)}
    meta = {"point": point.id, "seed": seed, "sweep": sweep.name, "label": point.label, "config": c,
            "policy": c["policy"], **provenance(), "wall_time_s": result["wall_time_s"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "result": result}
    return _line(row[k] for k in COLUMNS), json.dumps(meta, sort_keys=True) + "\n"


# ---- executors ----------------------------------------------------------------------------

def _local(jobs, workers: int, root):
    if workers <= 1:
        for key, (config, seed, tb) in jobs:
            yield key, run_point(config, seed, root, tb)
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    # spawn: a fresh interpreter per worker, no forked torch thread pools
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(run_point, config, seed, root, tb): key for key, (config, seed, tb) in jobs}
        for fut in cf.as_completed(futures):
            yield futures[fut], fut.result()


def _ray(jobs, workers: int, root, address: str | None):
    try:
        import ray
    except ImportError:
        raise SweepError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(run_point)
        refs = {task.remote(config, seed, root, tb): key for key, (config, seed, tb) in jobs}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                yield refs[ref], ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def run_sweep(sweep: Sweep, out: str | Path, *, executor: str = "local", workers: int | None = None,
              root: str | None = None, ray_address: str | None = None, progress: bool = True,
              on_row: Callable[[dict], None] | None = None, tensorboard: str | Path | None = None) -> Path:
    """Run every (point, seed) not yet in ``out``; append each finished run as it completes.

    Returns the CSV path; the metadata is ``out`` with suffix ``.jsonl``.  With ``tensorboard``
    each run logs to ``<tensorboard>/<point id>-seed<seed>`` (the point ids are those of the CSV).
    """
    out = Path(out)
    meta_path = out.with_suffix(".jsonl")
    done = _prepare(out, meta_path)
    todo = [(p, s) for p, s in sweep.runs if (p.id, s) not in done]
    points = {p.id: p for p in sweep.points}
    workers = workers or os.cpu_count() or 1
    jobs = [((p.id, s), (p.config, s, f"{tensorboard}/{p.id}-seed{s}" if tensorboard else None)) for p, s in todo]
    if executor == "local":
        results = _local(jobs, min(workers, max(1, len(jobs))), root)
    elif executor == "ray":
        results = _ray(jobs, workers, root, ray_address) if jobs else iter(())
    else:
        raise SweepError(f"executor must be 'local' or 'ray', got {executor!r}")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sweep.runs), initial=len(sweep.runs) - len(todo), desc=sweep.name, unit="run")
    try:
        for (pid, seed), result in results:
            line, meta = _record(sweep, points[pid], seed, result)
            _append(meta_path, meta)
            _append(out, line)   # the CSV row last: it is what marks the run finished
            if on_row is not None:
                on_row({"point": pid, "seed": seed, **result})
            if bar is not None:
                bar.set_postfix(acc=f"{100 * result['accuracy']:.2f}%")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return out
