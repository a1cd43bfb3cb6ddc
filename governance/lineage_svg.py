"""A picture of lineage: datasets → runs → models, laid out left to right, as inline SVG.

No graphviz: the graph is small (runs of the same job over the same datasets are drawn
as one node, "×N runs"), and a layered layout is a few dozen lines:

1. Nodes are datasets (tables, files, feature views, training sets, models) and run
   groups; edges go dataset → run group (read) and run group → dataset (written).
2. Cycles (a job that reads and writes the same table, e.g. retention) are broken by
   dropping the back edges a depth-first search finds; self-loops are never drawn.
3. Each node's layer is its longest path from a source (a topological order), so every
   drawn edge points right.
4. Within a layer, nodes are ordered by the mean position of their neighbours in the
   layer before (barycenter), sweeping a few times, which keeps crossings low.

Example::

    pic = lineage_picture(ws.lineage.completed_runs())
    html_fragment = pic.svg           # <svg ...>...</svg>, every label escaped
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from governance.lineage import LineageRun

__all__ = ["PicNode", "LineagePicture", "lineage_picture"]

NODE_W = 190
NODE_H = 42
COL_GAP = 70
ROW_GAP = 18
MARGIN = 16
_MAX_LABEL = 26

# fill, stroke per node kind
_STYLE = {
    "table": ("#e3effb", "#2f6db5"),
    "file": ("#f1f1f1", "#777777"),
    "feature_view": ("#e2f5f1", "#1f8a70"),
    "training_set": ("#e2f5f1", "#1f8a70"),
    "model": ("#fdebd9", "#c26a12"),
    "run": ("#efeaf7", "#6a4ca8"),
}


@dataclass
class PicNode:
    """A box in the picture. ``kind`` is a dataset kind or ``run``; x/y are its top-left corner."""

    id: str
    label: str
    sub: str
    kind: str
    layer: int = 0
    order: int = 0
    x: int = 0
    y: int = 0


@dataclass
class LineagePicture:
    """The laid-out graph and its SVG."""

    nodes: dict[str, PicNode] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    width: int = 0
    height: int = 0
    svg: str = ""


def _short(text: str) -> str:
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def _graph(runs: Iterable[LineageRun]) -> tuple[dict[str, PicNode], list[tuple[str, str]]]:
    """Nodes and edges, with runs of one job over the same datasets merged into one node."""
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[LineageRun]] = defaultdict(list)
    nodes: dict[str, PicNode] = {}
    versions: dict[str, set[int]] = defaultdict(set)
    for run in runs:
        key = (run.job, tuple(sorted({r.name for r in run.inputs})), tuple(sorted({r.name for r in run.outputs})))
        groups[key].append(run)
        for ref in (*run.inputs, *run.outputs):
            nodes.setdefault("d:" + ref.name, PicNode("d:" + ref.name, ref.name, "", ref.kind))
            if ref.version is not None:
                versions[ref.name].add(ref.version)
    for name, vs in versions.items():
        nodes["d:" + name].sub = "v" + str(max(vs)) + (f" ({len(vs)} versions)" if len(vs) > 1 else "")
    for n in nodes.values():
        if not n.sub:
            n.sub = n.kind
    edges: dict[tuple[str, str], None] = {}
    for i, ((job, ins, outs), members) in enumerate(sorted(groups.items())):
        rid = f"r:{i}"
        last = members[-1].run_id
        sub = f"{len(members)} runs, last …{last[-8:]}" if len(members) > 1 else f"run …{last[-8:]}"
        nodes[rid] = PicNode(rid, job, sub, "run")
        for name in ins:
            edges[("d:" + name, rid)] = None
        for name in outs:
            edges[(rid, "d:" + name)] = None
    return nodes, list(edges)


_KIND_RANK = {"file": 0, "table": 1, "feature_view": 2, "training_set": 3, "run": 4, "model": 5}


def _acyclic(nodes: dict[str, PicNode], edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The edges without self-loops and without the back edges of a depth-first search.

    The search starts from sources, then from the kinds data starts as (files, then
    tables, ...), so a cycle is cut where data flows back (into a landing file, say).
    """
    succ: dict[str, list[str]] = defaultdict(list)
    has_pred: set[str] = set()
    for a, b in edges:
        if a != b:
            succ[a].append(b)
            has_pred.add(b)
    roots = sorted(nodes, key=lambda k: (k in has_pred, _KIND_RANK.get(nodes[k].kind, 9), k))
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    back: set[tuple[str, str]] = set()
    for root in roots:
        if root in state:
            continue
        stack = [(root, iter(succ[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
    return [(a, b) for a, b in edges if a != b and (a, b) not in back]


def _layers(nodes: dict[str, PicNode], dag: list[tuple[str, str]]) -> None:
    """Longest path from a source (Kahn's topological order)."""
    indeg = {n: 0 for n in nodes}
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in dag:
        succ[a].append(b)
        indeg[b] += 1
    queue = sorted(n for n, d in indeg.items() if d == 0)
    while queue:
        n = queue.pop(0)
        for m in succ[n]:
            nodes[m].layer = max(nodes[m].layer, nodes[n].layer + 1)
            indeg[m] -= 1
            if indeg[m] == 0:
                queue.append(m)


def _order(nodes: dict[str, PicNode], dag: list[tuple[str, str]], sweeps: int = 4) -> list[list[str]]:
    """Nodes per layer, ordered by the barycenter of their neighbours (down and up sweeps)."""
    depth = max((n.layer for n in nodes.values()), default=-1) + 1
    cols: list[list[str]] = [sorted(k for k, n in nodes.items() if n.layer == i) for i in range(depth)]
    pred: dict[str, list[str]] = defaultdict(list)
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in dag:
        pred[b].append(a)
        succ[a].append(b)

    def pos() -> dict[str, int]:
        return {k: i for col in cols for i, k in enumerate(col)}

    for s in range(sweeps):
        down = s % 2 == 0
        rng = range(1, depth) if down else range(depth - 2, -1, -1)
        for i in rng:
            p = pos()
            nbrs = pred if down else succ

            def bary(k: str, p: dict[str, int] = p, nbrs: dict[str, list[str]] = nbrs) -> float:
                ns = nbrs[k]
                return sum(p[n] for n in ns) / len(ns) if ns else p[k]

            cols[i].sort(key=lambda k: (bary(k), k))
    return cols


def _svg(pic: LineagePicture, dag: list[tuple[str, str]]) -> str:
    e = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" role="img" width="{pic.width}" '
        f'height="{pic.height}" viewBox="0 0 {pic.width} {pic.height}" font-family="sans-serif" '
        'style="max-width:100%;height:auto">',
        "<title>Lineage: datasets, runs and models</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#888"/></marker></defs>',
    ]
    drawn = set(dag)
    for a, b in pic.edges:
        if a == b:
            continue
        s, t = pic.nodes[a], pic.nodes[b]
        x1, y1 = s.x + NODE_W, s.y + NODE_H // 2
        x2, y2 = t.x, t.y + NODE_H // 2
        if (a, b) not in drawn:  # a back edge (a cycle): drawn dashed, right to left
            x1, x2 = s.x, t.x + NODE_W
        mid = (x1 + x2) // 2
        dash = "" if (a, b) in drawn else ' stroke-dasharray="4 3"'
        out.append(
            f'<path class="edge" d="M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}" fill="none" '
            f'stroke="#888" stroke-width="1.4"{dash} marker-end="url(#arrow)"/>'
        )
    for n in sorted(pic.nodes.values(), key=lambda n: (n.layer, n.order)):
        fill, stroke = _STYLE.get(n.kind, _STYLE["table"])
        rx = 14 if n.kind == "run" else 4
        out.append(
            f'<g class="node {e(n.kind)}" data-name="{e(n.label)}"><title>{e(n.label)} ({e(n.sub)})</title>'
            f'<rect x="{n.x}" y="{n.y}" width="{NODE_W}" height="{NODE_H}" rx="{rx}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.5"/>'
            f'<text x="{n.x + 10}" y="{n.y + 17}" font-size="12" font-weight="bold" fill="#222">{e(_short(n.label))}</text>'
            f'<text x="{n.x + 10}" y="{n.y + 33}" font-size="10.5" fill="#555">{e(_short(n.sub))}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)


def lineage_picture(runs: Iterable[LineageRun]) -> LineagePicture:
    """Lay out completed lineage runs and draw them (see the module docstring)."""
    nodes, edges = _graph(runs)
    dag = _acyclic(nodes, edges)
    _layers(nodes, dag)
    cols = _order(nodes, dag)
    for i, col in enumerate(cols):
        for j, k in enumerate(col):
            n = nodes[k]
            n.order = j
            n.x = MARGIN + i * (NODE_W + COL_GAP)
            n.y = MARGIN + j * (NODE_H + ROW_GAP)
    rows = max((len(c) for c in cols), default=0)
    pic = LineagePicture(
        nodes=nodes,
        edges=edges,
        width=2 * MARGIN + len(cols) * NODE_W + max(len(cols) - 1, 0) * COL_GAP,
        height=2 * MARGIN + rows * NODE_H + max(rows - 1, 0) * ROW_GAP,
    )
    pic.svg = _svg(pic, dag)
    return pic
