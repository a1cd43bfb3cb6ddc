"""The compliance report: gathered from a real workspace, written by the CLI, seen in a browser.

The browser tests render the file in headless Chromium (``--dump-dom`` and
``--screenshot``) and check what a person would see. They skip when Chromium is not
installed, and fail instead when ``LAKEWARDEN_REQUIRE_CHROMIUM=1`` (``make test``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from cli_helpers import lw_in, server_env

from governance.lineage import DatasetRef, LineageRun
from governance.lineage_svg import lineage_picture

REPO = Path(__file__).resolve().parents[1]
TOKEN = re.compile(r"sub_[a-z2-7]{26}")
FAIR = {
    "sex": {"disparate_impact": 0.93, "equal_opportunity_diff": 0.04, "predictive_parity_diff": -0.03},
    "ethnicity": {"disparate_impact": 0.71, "equal_opportunity_diff": -0.06, "predictive_parity_diff": 0.05},
}
SECTIONS = ("Data-subject requests", "Policy decisions", "Privacy budgets", "Model cards", "Lineage",
            "Audit-chain integrity")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Ingest, a deny, a private run in the ledger, a registered and approved model, then the report."""
    d = tmp_path_factory.mktemp("report")
    shutil.copytree(REPO / "policies", d / "policies")
    assert lw_in(d, "init", ".").returncode == 0
    assert lw_in(d, "generate", "--out", "landing", "--people", "60", "--transactions-per-person", "2",
                 "--seed", "5").returncode == 0
    with open(d / "landing/customers.csv", newline="") as fh:
        people = list(csv.DictReader(fh))
    personal = {r[c] for r in people for c in ("customer_id", "name", "email", "phone") if r.get(c)}
    p = lw_in(d, "ingest", "customers", "landing/customers.csv", user="dana")
    assert p.returncode == 0, p.stderr
    assert lw_in(d, "silver", "customers", user="dana").returncode == 0
    deny = lw_in(d, "sql", "SELECT count(*) FROM bronze.customers", user="ana")
    assert deny.returncode == 3 and "customers/access/analyst/layers" in deny.stderr

    from governance.ledger import PrivacyLedger
    from governance.workspace import Workspace
    from training.registry import Registry

    with Workspace.open(d / "lakewarden.yaml") as ws:
        led = PrivacyLedger(ws)
        res = led.reserve(ws.actor("sam"), "customers", purpose="credit_scoring", epsilon=3.0, delta=1e-5)
        led.commit(res.run_id, epsilon=2.5)
        run = ws.lineage.emit("train.credit", inputs=[DatasetRef("silver.customers", version=0)],
                              outputs=[DatasetRef("model:credit", kind="model")])
        reg = Registry(ws)
        ref = reg.register(
            ws.actor("sam"), name="credit", dataset="customers", files={"model.pt": b"weights"},
            card_fields={
                "purpose": "credit_scoring", "features": ["customer_profile:income"], "label": "defaulted",
                "data_versions": {"silver.customers": 0},
                "privacy": {"epsilon": 2.5, "delta": 1e-5, "accountant": "prv"},
                "utility": {"accuracy": 0.81, "auc": 0.86}, "fairness": FAIR, "lineage_run_ids": [run],
            },
        )
        reg.approve(ws.actor("carla"), ref, override_reason="ethnicity groups too small to judge in this pilot")
    # Two data-subject requests: an erasure run to the end (history purged at once), and an
    # access request under CCPA that is only filed.
    erased, asked = people[0]["customer_id"], people[1]["customer_id"]
    p = lw_in(d, "requests", "erase", "--subject", erased, "--purge-now", user="carla")
    assert p.returncode == 0, p.stderr
    p = lw_in(d, "requests", "access", "--subject", asked, "--regime", "ccpa", "--out", str(d / "export"), user="carla")
    assert p.returncode == 0, p.stderr
    out = d / "report.html"
    p = lw_in(d, "audit", "report", "--html", str(out), user="carla")
    assert p.returncode == 0, p.stderr
    return {"dir": d, "html": out, "stdout": p.stdout, "personal": personal}


def test_only_a_compliance_officer_may_produce_it(lake: dict):
    out = lake["dir"] / "ana.html"
    p = lw_in(lake["dir"], "audit", "report", "--html", str(out), user="ana")
    assert p.returncode == 3 and "roles/stages/audit" in p.stderr
    assert not out.exists()
    q = lw_in(lake["dir"], "audit", "query", "--action", "gate.decide", "--outcome", "deny", "--actor", "ana",
              "--format", "json", user="carla")
    assert any(e["stage"] == "audit" and e["rule_ids"] == "roles/stages/audit" for e in json.loads(q.stdout))


def test_report_is_audited_with_counts(lake: dict):
    q = lw_in(lake["dir"], "audit", "query", "--action", "audit.report", "--format", "json", user="carla")
    events = json.loads(q.stdout)
    assert len(events) == 1 and events[0]["actor"] == "carla"
    details = json.loads(events[0]["details"])
    assert details["models"] == 1 and details["budgets"] == 2 and details["denies"] >= 1 and details["audit_ok"]
    assert "wrote" in lake["stdout"] and "audit chain verified" in lake["stdout"]


def test_html_is_self_contained_and_holds_no_personal_data(lake: dict):
    text = lake["html"].read_text()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I)  # nothing fetched
    assert "@import" not in text and "url(http" not in text
    assert not TOKEN.search(text), "a subject token reached the report"
    leaked = [v for v in lake["personal"] if len(v) > 3 and v in text]
    assert not leaked, f"personal data in the report: {leaked[:3]}"


def test_bad_paths_are_one_line_errors(lake: dict):
    p = lw_in(lake["dir"], "audit", "report", "--html", "no/such/folder/r.html", user="carla")
    assert p.returncode == 2 and "the folder no/such/folder does not exist" in p.stderr
    p = lw_in(lake["dir"], "audit", "report", "--html", "landing", user="carla")
    assert p.returncode == 2 and "is a folder" in p.stderr


class _Text(HTMLParser):
    """Visible text by element path, plus the SVG nodes' names."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.h2: list[str] = []
        self.nodes: list[str] = []
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "g" and "node" in (a.get("class") or ""):
            self.nodes.append(a.get("data-name", ""))
        if tag == "tr":
            self.rows.append([])
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        if any(t in ("style", "title") for t in self.stack):
            return
        self.text.append(data)
        if self.stack and self.stack[-1] == "h2":
            self.h2.append(data.strip())
        if "tr" in self.stack and self.rows:
            self.rows[-1].append(data.strip())


def _chromium() -> str | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("LAKEWARDEN_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (LAKEWARDEN_REQUIRE_CHROMIUM=1) but not installed: run `make system`")
        pytest.skip("chromium is not installed (make system installs it)")
    return exe


def _browser(exe: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp / 'profile'}", *args],
        capture_output=True, text=True, timeout=120, env=server_env(),
    )


def test_chromium_shows_every_section(lake: dict, tmp_path: Path):
    exe = _chromium()
    p = _browser(exe, "--dump-dom", lake["html"].as_uri(), tmp=tmp_path)
    assert p.returncode == 0 and "<body" in p.stdout, p.stderr[-2000:]
    page = _Text()
    page.feed(p.stdout)
    assert page.h2 == list(SECTIONS)
    visible = " ".join(" ".join(page.text).split())
    # (a) both requests, with their regime, state and SLA
    reqs = [r for r in page.rows if r and r[0].startswith("req_")]
    assert sorted((r[1], r[2]) for r in reqs) == [("access", "CCPA"), ("erase", "GDPR")], reqs
    erase = next(r for r in reqs if r[1] == "erase")
    assert "done" in erase, erase
    # (b) the analyst's deny, with its rule and reason
    assert ["query", "customers/access/analyst/layers", "0", "1"] in page.rows  # counted by stage and rule
    deny = [r for r in page.rows if "customers/access/analyst/layers" in r and len(r) > 4]
    assert deny and "ana" in deny[0] and "query" in deny[0] and "table:bronze.customers" in deny[0]
    assert any("may not read the bronze layer" in c for c in deny[0])
    # (c) the budget: 2.5 of 20 spent on customers, nothing on transactions
    assert ["customers", "2.5 / 20", "0", "17.5"] == deny_free(page.rows, "customers")[:4]
    assert ["transactions", "0 / 20"] == deny_free(page.rows, "transactions")[:2]
    # (d) the model card: version, ε, the failed metric against its threshold, the approval
    assert "credit@1" in visible and "2.500" in visible
    di = [r for r in page.rows if r[:2] == ["ethnicity", "disparate_impact"]]
    assert di and di[0][2:5] == ["0.710", "≥ 0.8", "FAIL"]
    assert "carla (compliance_officer, overriding the fairness verdict)" in visible
    # (e) the lineage picture names the landing file, the tables and the model
    assert {"bronze.customers", "silver.customers", "model:credit", "train.credit"} <= set(page.nodes)
    # (f) integrity
    assert "verified" in visible and "signed checkpoints" in visible


def deny_free(rows: list[list[str]], first: str) -> list[str]:
    """The first table row whose first cell is ``first``, empty cells dropped."""
    for r in rows:
        cells = [c for c in r if c]
        if cells and cells[0] == first:
            return cells
    return []


def _pixels(png: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        return rgb.width, rgb.height, list(rgb.get_flattened_data()) if hasattr(rgb, "get_flattened_data") else list(rgb.getdata())


def test_chromium_screenshot_draws_the_graph_and_bars(lake: dict, tmp_path: Path):
    exe = _chromium()
    png = tmp_path / "report.png"
    p = _browser(exe, f"--screenshot={png}", "--window-size=1400,5000", "--hide-scrollbars",
                 lake["html"].as_uri(), tmp=tmp_path)
    assert p.returncode == 0 and png.exists(), p.stderr[-2000:]
    w, h, px = _pixels(png)
    assert (w, h) == (1400, 5000)
    counts: dict[tuple[int, int, int], int] = {}
    for c in px:
        counts[c] = counts.get(c, 0) + 1
    assert len(counts) > 50, "the screenshot is blank"
    table_fill, model_fill, run_fill, bar = (0xE3, 0xEF, 0xFB), (0xFD, 0xEB, 0xD9), (0xEF, 0xEA, 0xF7), (0x2F, 0x6D, 0xB5)
    box = 60 * 25  # a node box is 190×42, drawn smaller when the graph is scaled to the page width
    assert counts.get(model_fill, 0) > box, "the model node is not drawn"
    assert counts.get(run_fill, 0) > 2 * box, "run nodes are not drawn"
    assert counts.get(table_fill, 0) > 2 * box, "table nodes are not drawn"
    assert counts.get(bar, 0) > 10 * 10, "the budget bar is not drawn"


# -- the layout on its own ----------------------------------------------------------------------
def _ref(name: str) -> DatasetRef:
    kind = "model" if name.startswith("model:") else "file" if name.startswith("landing.") else "table"
    return DatasetRef(name, kind=kind)  # type: ignore[arg-type]


def _run(job: str, ins: list[str], outs: list[str]) -> LineageRun:
    return LineageRun(str(uuid.uuid4()), job, tuple(map(_ref, ins)), tuple(map(_ref, outs)))


def test_layout_points_every_edge_right_and_survives_cycles():
    runs = [
        _run("ingest.customers", ["landing.customers"], ["bronze.customers"]),
        _run("ingest.customers", ["landing.customers"], ["bronze.customers"]),
        _run("silver.customers", ["bronze.customers"], ["silver.customers"]),
        _run("train.credit", ["silver.customers"], ["model:credit"]),
        _run("retention.customers", ["bronze.customers"], ["bronze.customers"]),  # a self-cycle
        _run("loop.a", ["model:credit"], ["landing.customers"]),  # a longer cycle
    ]
    pic = lineage_picture(runs)
    n = pic.nodes
    assert sum(1 for x in n.values() if x.kind == "run") == 5  # the two ingest runs drawn once
    ingest = next(x for x in n.values() if x.label == "ingest.customers")
    assert ingest.sub.startswith("2 runs")
    order = ["d:landing.customers", "d:bronze.customers", "d:silver.customers", "d:model:credit"]
    assert [n[k].layer for k in order] == sorted(n[k].layer for k in order)
    assert len({n[k].layer for k in order}) == 4
    forward = [(a, b) for a, b in pic.edges if n[a].layer < n[b].layer]
    assert len(forward) >= len(pic.edges) - 3  # only the edges that close cycles point back
    assert 'stroke-dasharray' in pic.svg  # and those are drawn dashed
    xs = {(x.x, x.y) for x in n.values()}
    assert len(xs) == len(n)  # no two boxes on one spot
    assert pic.width > 0 and pic.height > 0


def test_svg_escapes_labels():
    pic = lineage_picture([_run("job<script>", ['a"b'], ["c&d"])])
    assert "<script>" not in pic.svg and "job&lt;script&gt;" in pic.svg
    assert 'data-name="a&quot;b"' in pic.svg and "c&amp;d" in pic.svg


def test_request_rows_render_with_their_sla_and_no_token():
    """Section (a)'s rendering of SLA states a fresh ledger cannot show (overdue, late)."""
    from datetime import datetime, timezone

    from governance.audit import VerifyReport
    from governance.lineage_svg import LineagePicture
    from governance.report import AuditReport, RequestRow

    t = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
    rows = [
        RequestRow("req-1", "erase", "gdpr", t, t, "done", "done", t, late=False),
        RequestRow("req-2", "access", "ccpa", t, t, "verifying", "overdue", None, late=True),
        RequestRow("req-3 sub_abcdefghijklmnopqrstuvwxyz", "erase", "gdpr", t, t, "filed", "due soon", None),
    ]
    rep = AuditReport(t, "carla", "demo", "0" * 64, rows, {}, [], [], [], [], LineagePicture(), VerifyReport(), None)
    page = rep.to_html()
    assert "3 request(s); 1 past their due date." in page
    assert '<span class="badge bad">overdue</span>' in page and '<span class="badge warn">due soon</span>' in page
    assert "CCPA" in page and "2026-01-05 09:30 UTC" in page
    assert not TOKEN.search(page) and "req-3 sub_…" in page


def test_model_cards_show_what_the_build_cost_or_unknown():
    """Section (d): the released model's ε, and what its build spent of the budget ("unknown" on a
    card registered before builds were recorded, never 0)."""
    from datetime import datetime, timezone

    from governance.audit import VerifyReport
    from governance.lineage_svg import LineagePicture
    from governance.report import AuditReport, ModelSummary

    t = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
    known = ModelSummary("credit", 2, "customers", "credit_scoring", 2.5, 1e-5, {}, (), True, "registered",
                         epsilon_spent=5.5, delta_spent=2e-5, runs=2)
    old = ModelSummary("credit", 1, "customers", "credit_scoring", 3.0, 1e-5, {}, (), True, "registered")
    page = AuditReport(t, "carla", "demo", "0" * 64, [], {}, [], [], [], [known, old], LineagePicture(),
                       VerifyReport(), None).to_html()
    assert "ε spent to build" in page
    assert "<td>5.500 (δ 2e-05, 2 runs)</td>" in page and "<td>unknown</td>" in page
