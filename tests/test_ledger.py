"""The privacy ledger: budgets compose across runs; a run past the budget is refused before it starts."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from governance.errors import AccessDenied
from governance.ledger import LedgerError, PrivacyLedger
from governance.workspace import Workspace


def test_runs_compose_and_exhaustion_is_refused_before_training(workspace: Workspace):
    led = PrivacyLedger(workspace)
    sam = workspace.actor("sam")
    a = led.reserve(sam, "customers", purpose="credit_scoring", epsilon=8.0, delta=1e-6)
    led.commit(a.run_id, epsilon=7.5)
    b = led.reserve(sam, "customers", purpose="credit_scoring", epsilon=8.0, delta=1e-6)
    st = led.status("customers")
    assert (st.epsilon_spent, st.epsilon_reserved, st.epsilon_left) == (7.5, 8.0, 4.5)
    with pytest.raises(AccessDenied) as exc:
        led.reserve(sam, "customers", purpose="credit_scoring", epsilon=5.0, delta=1e-6)
    assert exc.value.decision.rule_ids == ("customers/privacy/epsilon_total",)
    assert "(15.5 spent, 4.5 left)" in str(exc.value)
    led.release(b.run_id)  # that run never touched data
    assert led.status("customers").epsilon_left == 12.5
    c = led.reserve(sam, "customers", purpose="credit_scoring", epsilon=5.0, delta=1e-6)
    led.commit(c.run_id, epsilon=4.9)
    st = led.status("customers")
    assert st.epsilon_spent == pytest.approx(12.4) and st.runs == 2 and st.delta_spent == pytest.approx(2e-6)


def test_per_run_cap_purpose_and_wrong_transitions(workspace: Workspace):
    led = PrivacyLedger(workspace)
    sam = workspace.actor("sam")
    with pytest.raises(AccessDenied, match="customers/privacy/epsilon_per_run"):
        led.reserve(sam, "customers", purpose="credit_scoring", epsilon=9.0, delta=1e-6)
    with pytest.raises(AccessDenied, match="customers/purposes/credit_scoring/sensitive"):
        led.reserve(sam, "customers", purpose="credit_scoring", epsilon=1.0, delta=1e-6, columns=["sex"])
    with pytest.raises(AccessDenied, match="roles/stages/train"):
        led.reserve(workspace.actor("ana"), "customers", purpose="analytics", epsilon=1.0, delta=1e-6)
    r = led.reserve(sam, "customers", purpose="credit_scoring", epsilon=2.0, delta=1e-6)
    with pytest.raises(LedgerError, match="more than its reservation"):
        led.commit(r.run_id, epsilon=2.5)
    led.commit(r.run_id, epsilon=2.0)
    with pytest.raises(LedgerError, match="already spent"):
        led.release(r.run_id)
    with pytest.raises(LedgerError, match="no privacy run"):
        led.commit("nope", epsilon=1.0)
    with pytest.raises(LedgerError, match="epsilon must be > 0"):
        led.reserve(sam, "customers", purpose="credit_scoring", epsilon=0, delta=1e-6)
    workspace.audit.flush()
    assert [e["action"] for e in workspace.audit.query(action="privacy.reserve").to_pylist()] == ["privacy.reserve"]


def _reserve(config: str, out) -> None:  # noqa: ANN001
    ws = Workspace.open(config)
    try:
        PrivacyLedger(ws).reserve(ws.actor("sam"), "customers", purpose="credit_scoring", epsilon=8.0, delta=1e-6)
        out.put("ok")
    except AccessDenied:
        out.put("denied")
    finally:
        ws.close()


def test_concurrent_reservations_cannot_overspend(project: Path):
    ws = Workspace.open(project / "lakewarden.yaml")
    led = PrivacyLedger(ws)
    r = led.reserve(ws.actor("sam"), "customers", purpose="credit_scoring", epsilon=5.0, delta=1e-6)
    led.commit(r.run_id, epsilon=5.0)  # 15 left: room for one more run of 8, not two
    ws.close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_reserve, args=(str(project / "lakewarden.yaml"), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(q.get(timeout=10) for _ in procs) == ["denied", "ok"]
    ws = Workspace.open(project / "lakewarden.yaml")
    assert PrivacyLedger(ws).status("customers").epsilon_left == 7.0
    ws.close()


def test_a_build_sums_its_own_runs(workspace: Workspace):
    from governance.ledger import new_build_id

    led = PrivacyLedger(workspace)
    sam = workspace.actor("sam")
    build, other = new_build_id(), new_build_id()

    def run(eps: float, b: str | None, state: str = "spent") -> str:
        r = led.reserve(sam, "customers", purpose="credit_scoring", epsilon=eps, delta=1e-6, model="credit", build=b)
        if state == "spent":
            led.commit(r.run_id, epsilon=eps - 0.5)
        elif state == "released":
            led.release(r.run_id)
        return r.run_id

    a, _, _, d, _ = run(3.0, build), run(2.0, other), run(1.0, None), run(2.0, build, "reserved"), run(1.0, build, "released")
    cost = led.build_cost(build)
    assert [r.run_id for r in cost.runs] == [a, d] and [r.state for r in cost.runs] == ["spent", "reserved"]
    assert cost.epsilon == pytest.approx(2.5 + 2.0) and cost.delta == pytest.approx(2e-6)  # a reservation counts
    assert (cost.dataset, cost.model) == ("customers", "credit")
    assert led.build_cost(new_build_id()).runs == ()
    with pytest.raises(LedgerError, match="32 lowercase hex"):
        led.reserve(sam, "customers", purpose="credit_scoring", epsilon=1.0, delta=1e-6, build="credit@1")
    with pytest.raises(LedgerError, match="32 lowercase hex"):
        led.build_cost("credit@1")


def test_a_ledger_from_before_builds_gains_the_columns(workspace: Workspace):
    """A ledger written before runs named their build: old rows read NULL, new runs record theirs."""
    from datetime import datetime, timezone

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from governance.ledger import SCHEMA, new_build_id

    led = PrivacyLedger(workspace)
    old = pa.schema([f for f in SCHEMA if f.name not in ("model", "build")])
    write_deltalake(led.uri, pa.Table.from_pylist([{
        "run_id": "a" * 32, "dataset": "customers", "state": "spent", "epsilon": 3.0, "delta": 1e-5,
        "purpose": "credit_scoring", "accountant": "prv", "actor": "sam", "recorded_at": datetime.now(timezone.utc),
    }], schema=old), mode="append", configuration={"delta.appendOnly": "true"})
    build = new_build_id()
    assert led.build_cost(build).runs == ()
    r = led.reserve(workspace.actor("sam"), "customers", purpose="credit_scoring", epsilon=1.0, delta=1e-6, build=build)
    led.commit(r.run_id, epsilon=1.0)
    assert [x.run_id for x in led.build_cost(build).runs] == [r.run_id]
    assert led.status("customers").epsilon_spent == pytest.approx(4.0)
    rows = {x["run_id"]: x for x in DeltaTable(led.uri).to_pyarrow_table().to_pylist()}
    assert rows["a" * 32]["build"] is None and rows[r.run_id]["build"] == build
