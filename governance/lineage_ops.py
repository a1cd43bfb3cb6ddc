"""Gated reads of the lineage store (what ``lakewarden lineage show`` runs).

Lineage names tables, models, runs and git commits: it says what was made from what, which is
governed knowledge in itself. The verb asks the gate for stage ``lineage`` on
``system:lineage`` before the store is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from governance.gate import Actor, Resource
from governance.policy import Stage

if TYPE_CHECKING:
    from governance.lineage import LineageGraph
    from governance.workspace import Workspace

Direction = Literal["up", "down", "both"]


@dataclass(frozen=True)
class LineageView:
    """What ``name`` was made from (``upstream``) and what was made from it (``downstream``).

    A direction not asked for is ``None``; ``found`` says whether either graph reaches past ``name``.
    """

    name: str
    upstream: "LineageGraph | None"
    downstream: "LineageGraph | None"

    @property
    def found(self) -> bool:
        return any(g is not None and len(g.nodes) > 1 for g in (self.upstream, self.downstream))


def lineage_of(ws: "Workspace", actor: Actor, name: str, *, direction: Direction = "both",
               depth: int | None = None) -> LineageView:
    """The lineage of a dataset or model (``silver.customers``, ``model:credit``), up, down or both."""
    ws.gate.enforce(Stage.LINEAGE, actor, Resource.system("lineage"))
    up = ws.lineage.upstream(name, depth=depth) if direction in ("up", "both") else None
    down = ws.lineage.downstream(name, depth=depth) if direction in ("down", "both") else None
    return LineageView(name, up, down)
