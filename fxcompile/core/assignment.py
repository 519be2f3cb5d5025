"""Assignment: the formats chosen for every edge of a compiled graph, as data.

An :class:`Edge` is one producer→consumer use of a value (``consumer="*"`` is the value
itself as its producer emits it; its backward format quantizes the *sum* of the gradients
of all its uses).  An :class:`Assignment` is a list of edges: printable, serialisable
(JSON), diffable.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable

from .formats import FixedPoint, as_format

__all__ = ["Edge", "Assignment"]


@dataclasses.dataclass(frozen=True)
class Edge:
    producer: str
    consumer: str
    role: str
    forward: FixedPoint | None
    backward_role: str
    backward: FixedPoint | None
    op: str = ""
    shape: tuple | None = None

    @property
    def name(self) -> str:
        return f"{self.producer}->{self.consumer}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["forward"] = str(self.forward) if self.forward else None
        d["backward"] = str(self.backward) if self.backward else None
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Edge:
        d = dict(d)
        d["forward"], d["backward"] = as_format(d["forward"]), as_format(d["backward"])
        d["shape"] = tuple(d["shape"]) if d.get("shape") is not None else None
        return cls(**d)


class Assignment(list):
    """A list of :class:`Edge` records with table, JSON and diff views."""

    def __init__(self, edges: Iterable[Edge] = ()):
        super().__init__(edges)

    def formats(self) -> set[tuple[int, int]]:
        """Distinct (bits, frac) formats used, forward and backward."""
        return {(f.bits, f.frac) for e in self for f in (e.forward, e.backward) if f is not None}

    def by_role(self, role: str) -> list[Edge]:
        return [e for e in self if e.role == role]

    def to_json(self) -> str:
        return json.dumps([e.to_dict() for e in self], indent=1)

    @classmethod
    def from_json(cls, text: str) -> Assignment:
        return cls(Edge.from_dict(d) for d in json.loads(text))

    def diff(self, other: Assignment) -> list[tuple[str, Edge | None, Edge | None]]:
        """Edges whose formats differ: (edge name, ours, theirs)."""
        mine, theirs = {e.name: e for e in self}, {e.name: e for e in other}
        out = []
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a is None or b is None or (a.forward, a.backward) != (b.forward, b.backward):
                out.append((name, a, b))
        return out

    def table(self) -> str:
        rows = [("edge", "op", "role", "forward", "backward", "shape")]
        for e in self:
            rows.append((e.name, e.op, e.role, str(e.forward or "float"),
                         f"{e.backward or 'float'} ({e.backward_role})",
                         "x".join(map(str, e.shape)) if e.shape is not None else "?"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
