"""Policy: which fixed-point format each role gets, with overrides by name pattern and op.

    >>> p = Policy(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8")
    >>> str(p.format_for("activation_out"))
    '16.8'

Finer roles fall back to coarser ones: ``activation_in``/``activation_out`` → ``activation``,
``weight_gradient``/``bias_gradient`` → ``gradient``, ``input`` → ``activation``.
A role set to ``None`` (or ``"float"``) stays in floating point.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

from ..errors import FormatError, PolicyError
from .formats import FixedPoint, as_format

__all__ = ["ROLES", "FALLBACK", "Override", "Policy", "baseline", "optimized", "load_policy"]

ROLES = ("input", "activation", "activation_in", "activation_out", "weight", "bias", "loss",
         "gradient", "weight_gradient", "bias_gradient")
FALLBACK = {"activation_in": "activation", "activation_out": "activation", "input": "activation",
            "weight_gradient": "gradient", "bias_gradient": "gradient"}
_UNSET = object()


def _resolve(formats: dict, role: str):
    while role not in formats or formats[role] is _UNSET:
        if role not in FALLBACK:
            return None
        role = FALLBACK[role]
    return formats[role]


@dataclasses.dataclass(frozen=True)
class Override:
    """Formats for the nodes whose name/module path matches ``pattern`` and whose op is ``op``.

    ``pattern`` is an fnmatch pattern (``"fc*"``, ``"layer1.*"``); ``op`` a module class or
    function name (``"Conv2d"``, ``"linear"``, ``"add"``).  Either may be omitted.
    """

    formats: dict
    pattern: str | None = None
    op: str | None = None

    def matches(self, names: Iterable[str], op: str | None) -> bool:
        if self.op is not None and (op is None or self.op.lower() != op.lower()):
            return False
        if self.pattern is not None and not any(fnmatch.fnmatchcase(n, self.pattern) for n in names if n):
            return False
        return True

    def describe(self) -> str:
        return " ".join(f"{k}={v!r}" for k, v in (("pattern", self.pattern), ("op", self.op)) if v)


def _keyed(error: Exception, key: tuple) -> Exception:
    """Attach the key path (``("overrides", 1, "weight")``) so file loaders can point at the line."""
    error.key = key
    return error


def _check_formats(formats: dict, where: str, key: tuple) -> dict:
    out = {}
    for role, value in formats.items():
        if role not in ROLES:
            raise _keyed(PolicyError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}"), key + (role,))
        try:
            out[role] = as_format(value, where=f"{where}.{role}")
        except FormatError as e:
            raise _keyed(e, key + (role,))
    return out


def _warn_conflicts(overrides: list[Override]) -> None:
    # Later overrides win, so a second override of the same target silently replaces a format
    # the user also wrote down; that is almost always an editing mistake.
    for j, b in enumerate(overrides):
        for i, a in enumerate(overrides[:j]):
            if (a.pattern, a.op) != (b.pattern, b.op):
                continue
            for role in sorted(set(a.formats) & set(b.formats)):
                if a.formats[role] != b.formats[role]:
                    first, second = (str(f) if f else "float" for f in (a.formats[role], b.formats[role]))
                    warnings.warn(f"policy overrides[{i}] and overrides[{j}] ({b.describe()}) both set "
                                  f"{role!r}, to {first} and {second}; the later one wins; remove one of them",
                                  stacklevel=4)


PREDICTION_GRADIENTS = (None, "inward")


def check_prediction_gradient(value: Any, where: str) -> str | None:
    """``prediction_gradient``: ``None`` (the prediction's casts clip like every other cast) or
    ``"inward"``; anything else raises :class:`PolicyError` naming it."""
    if value not in PREDICTION_GRADIENTS or isinstance(value, bool):
        raise _keyed(PolicyError(f"{where}: prediction_gradient must be None or 'inward', got {value!r}"),
                     ("prediction_gradient",))
    return value


class Policy:
    """Role → format, plus ordered overrides (later overrides win).

    ``clip_gradient`` (default ``True``): every cast zeroes the gradient where its forward
    value saturated (the derivative of a clamp); ``False`` passes it (straight through).
    ``prediction_gradient="inward"``: the casts of the prediction a loss consumes (the model's
    returned values and the loss graph's first input) zero only the part of the gradient
    that would push a saturated value further out, and keep the part that moves it back
    into range: a wrong class whose logit sits at the format's ceiling is pushed down instead
    of staying tied there with the true class.
    """

    def __init__(self, *, overrides: Iterable[Override | dict] = (), clip_gradient: bool = True,
                 prediction_gradient: str | None = None, name: str | None = None, **formats: Any):
        self.formats = _check_formats(formats, "formats", ("formats",))
        self.overrides = []
        for i, o in enumerate(overrides):
            if isinstance(o, dict):
                o = dict(o)
                pattern, op = o.pop("pattern", None), o.pop("op", None)
                if pattern is None and op is None:
                    raise _keyed(PolicyError(f"overrides[{i}]: give 'pattern' and/or 'op'"), ("overrides", i))
                o = Override(formats=o, pattern=pattern, op=op)
            self.overrides.append(Override(_check_formats(o.formats, f"overrides[{i}]", ("overrides", i)),
                                           o.pattern, o.op))
        _warn_conflicts(self.overrides)
        self.clip_gradient = bool(clip_gradient)
        self.prediction_gradient = check_prediction_gradient(prediction_gradient, "policy")
        self.name = name

    @classmethod
    def coerce(cls, policy: Any) -> Policy:
        if policy is None:
            return baseline()
        if isinstance(policy, Policy) or hasattr(policy, "assign"):
            return policy
        if isinstance(policy, (str, Path)):
            return load_policy(policy)
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        raise PolicyError(f"expected a Policy, a policy file or a dict, got {type(policy).__name__}")

    def format_for(self, role: str, names: Iterable[str] = (), op: str | None = None) -> FixedPoint | None:
        if role not in ROLES:
            raise PolicyError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        formats = dict(self.formats)
        for o in self.overrides:
            if o.matches(names, op):
                formats.update(o.formats)
        return _resolve(formats, role)

    def unused_overrides(self, seen: list[tuple[list[str], str | None]]) -> list[Override]:
        return [o for o in self.overrides if not any(o.matches(n, op) for n, op in seen)]

    # ---- files --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.name:
            d["name"] = self.name
        d["clip_gradient"] = self.clip_gradient
        if self.prediction_gradient is not None:
            d["prediction_gradient"] = self.prediction_gradient
        d["formats"] = {k: (str(v) if v is not None else "float") for k, v in self.formats.items()}
        d["overrides"] = [dict({k: v for k, v in (("pattern", o.pattern), ("op", o.op)) if v},
                               **{k: (str(v) if v is not None else "float") for k, v in o.formats.items()})
                          for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "policy") -> Policy:
        known = {"name", "clip_gradient", "prediction_gradient", "formats", "overrides"}
        unknown = set(data) - known
        if unknown:
            raise _keyed(PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; keys are {sorted(known)} "
                                     "(put role formats under [formats])"), (sorted(unknown)[0],))
        formats, overrides = data.get("formats", {}), data.get("overrides", [])
        if not isinstance(formats, dict):
            raise _keyed(PolicyError(f"{where}: 'formats' must be a table of role = format"), ("formats",))
        if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
            raise _keyed(PolicyError(f"{where}: 'overrides' must be a list of tables ([[overrides]] in TOML)"),
                         ("overrides",))
        for role in formats:
            if role not in ROLES:  # before the call: a role named like a keyword must not bind to it
                raise _keyed(PolicyError(f"{where}: formats: unknown role {role!r}; roles are {', '.join(ROLES)}"),
                             ("formats", role))
        if not isinstance(data.get("clip_gradient", True), bool):
            raise _keyed(PolicyError(f"{where}: 'clip_gradient' must be true or false"), ("clip_gradient",))
        try:
            return cls(name=data.get("name"), clip_gradient=data.get("clip_gradient", True),
                       prediction_gradient=data.get("prediction_gradient"), overrides=overrides, **formats)
        except (PolicyError, FormatError) as e:
            raise _keyed(type(e)(f"{where}: {e}"), getattr(e, "key", ())) from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        d = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(d, indent=2) + "\n")
        elif path.suffix == ".toml":
            path.write_text(_to_toml(d))
        else:
            raise PolicyError(f"{path}: policy files end in .toml or .json")

    def __eq__(self, other):
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def __repr__(self):
        body = ", ".join(f"{k}={str(v) if v else 'float'!r}" for k, v in self.formats.items())
        extra = f", overrides={len(self.overrides)}" if self.overrides else ""
        return f"Policy({body}{extra})"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def _to_toml(d: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, (dict, list))]
    lines += ["", "[formats]"] + [f"{k} = {_toml_value(v)}" for k, v in d["formats"].items()]
    for o in d["overrides"]:
        lines += ["", "[[overrides]]"] + [f"{k} = {_toml_value(v)}" for k, v in o.items()]
    return "\n".join(lines) + "\n"


_TOML_HEADER = re.compile(r"^\s*(\[\[?)([^\]]+)\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"^\s*((?:[\w-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[\w-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _toml_path(dotted: str) -> tuple:
    return tuple(part.strip().strip("\"'") for part in re.split(r"\.(?=(?:[^\"']|\"[^\"]*\"|'[^']*')*$)", dotted))


def _toml_line(text: str, key: tuple) -> int | None:
    """Line (1-based) of ``key`` (``("formats", "weight")``, ``("overrides", 1, "op")``) in TOML ``text``.

    Follows ``[table]`` and ``[[array]]`` headers, so the same name in another table or in
    another override is not mistaken for it.  A key inside an inline table or array gives the
    line that opens it; a whole override (``("overrides", 1)``) gives its ``[[overrides]]`` line.
    """
    names = tuple(k for k in key if isinstance(k, str))
    index = next((k for k in key if isinstance(k, int)), 0)
    table, counts, fallback = (), {}, None
    for lineno, line in enumerate(text.splitlines(), 1):
        header = _TOML_HEADER.match(line)
        if header:
            table = _toml_path(header.group(2))
            if header.group(1) == "[[":
                counts[table] = counts.get(table, -1) + 1
            if table == names and counts.get(table, 0) == index:
                fallback = fallback or lineno
            continue
        m = _TOML_KEY.match(line)
        if not m or (table in counts and counts[table] != index):
            continue
        full = table + _toml_path(m.group(1))
        if full == names:
            return lineno
        if full == names[:len(full)] and fallback is None:
            fallback = lineno  # an inline table or array that holds the key
    return fallback


def load_policy(path: str | Path) -> Policy:
    """Load a policy from ``.toml`` or ``.json``, or a shipped name (``baseline``, ``optimized``, ``8bit``)."""
    if str(path) in SHIPPED:
        return SHIPPED[str(path)]()
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"{path}: no such policy file (shipped policies: {', '.join(SHIPPED)})")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    elif path.suffix == ".toml":
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{path}: invalid TOML: {e}") from None
    else:
        raise PolicyError(f"{path}: policy files end in .toml or .json")
    try:
        return Policy.from_dict(data, where=str(path))
    except (PolicyError, FormatError) as e:
        key = getattr(e, "key", ())
        line = _toml_line(text, key) if path.suffix == ".toml" and key else None
        raise _keyed(type(e)(f"{e}" + (f" (line {line})" if line else "")), key) from None


# The study fixed bits and fractional bits, not rounding.  fxcompile rounds forward values to
# nearest, and rounds gradients and parameter updates stochastically: with nearest rounding a
# 16.10 gradient flushes every |g| < 2**-11 to zero and an update smaller than half a weight
# step is lost, which stalls training; stochastic rounding keeps both unbiased.
def baseline() -> Policy:
    """The study's baseline: activations 16/8, gradients 16/10, loss 16/10, weights 24/12, biases 16/8."""
    return Policy(name="baseline", activation="16.8", gradient="16.10,stochastic", loss="16.10",
                  weight="24.12,stochastic", bias="16.8,stochastic")


def optimized() -> Policy:
    """The study's hand-tuned formats: activations 16/4, gradients 16/9, loss 16/11, weights 16/11, biases 10/8."""
    return Policy(name="optimized", activation="16.4", gradient="16.9,stochastic", loss="16.11",
                  weight="16.11,stochastic", bias="10.8,stochastic")


def eight_bit() -> Policy:
    """``8bit``: 8-bit activations (8.3, the input u8.7) and weights (8.6) with 16-bit biases,
    gradients and loss: conv/linear deploy as one 8-bit product each, and ONNX Runtime fuses
    the QDQ export into its quantized kernels."""
    return Policy(name="8bit", activation="8.3", input="u8.7", weight="8.6,stochastic", bias="16.8,stochastic",
                  gradient="16.10,stochastic", loss="16.10")


def fp32() -> Policy:
    """Every role in floating point: the reference the fixed-point runs are measured against."""
    return Policy(name="fp32", **{r: None for r in ROLES if r not in FALLBACK})


SHIPPED = {"baseline": baseline, "optimized": optimized, "8bit": eight_bit, "fp32": fp32}


def warn_unused(policy: Policy, seen) -> None:
    for o in policy.unused_overrides(seen):
        warnings.warn(f"policy override ({o.describe()}) matches no node", stacklevel=3)
