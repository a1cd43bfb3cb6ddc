"""Differentially private SQL (issue #20): the guarantee, the budget, the refusals.

The lake is small and written directly (as tests/test_sql.py does); the analyst role's queries on
customers are private (a copy of customers.yaml with ``query: private``). OpenDP draws its noise from
the operating system's CSPRNG and takes no seed, so the statistical tests use many trials and bounds
several standard deviations wide: each fails by chance far less than once in a million runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math

import pyarrow as pa
import pytest
import yaml
from deltalake import write_deltalake

from governance.errors import AccessDenied, PolicyError
from governance.keys.native import keyed_hashes
from governance.ledger import PrivacyLedger
from lakehouse.catalog import Catalog, TableRef
from lakehouse.masks import hash_column
from lakehouse.private_sql import compile_plan
from lakehouse.silver import MASK_HASH_KEY, hashed_columns
from lakehouse.sql import SqlError, run_query

N = 400
TARGET = 7  # the person the attacker asks about: region north, the only one born in 1950
REGIONS = ["north", "south", "east", "west", "restricted"]


def token(i: int) -> str:
    return "sub_" + base64.b32encode(hashlib.sha256(str(i).encode()).digest()).decode().lower()[:26]


def customers(n: int = N, *, without: int | None = None) -> pa.Table:
    rows = [i for i in range(n) if i != without]
    return pa.table({
        "customer_id": pa.array([token(i) for i in rows], pa.string()),
        "birth_date": pa.array([1950 if i == TARGET else 1960 + i % 40 for i in rows], pa.int32()),
        "zip_code": pa.array([f"{100 + i % 9}" for i in rows], pa.string()),
        "sex": pa.array([None] * len(rows), pa.binary()),
        "ethnicity": pa.array([None] * len(rows), pa.binary()),
        "income": pa.array([None if i % 10 == 3 else float(1000 * (i % 100)) for i in rows], pa.float64()),
        "region": pa.array(["north" if i == TARGET else REGIONS[i % 5] for i in rows], pa.string()),
        "defaulted": pa.array([i % 4 == 0 for i in rows], pa.bool_()),
    })


def put(ws, table: pa.Table, mode: str = "error") -> None:
    for c in hashed_columns(ws.policies, "customers"):
        if c in table.column_names and hash_column(c) not in table.column_names:
            table = table.append_column(hash_column(c), keyed_hashes(ws.keyring.system_key(MASK_HASH_KEY), table[c]))
    write_deltalake(Catalog(ws.config).uri(TableRef("silver", "customers")), table, mode=mode)


def private_policy(project, *, per_query: float = 1.0, per_analyst: float | None = 3.0, total: float = 20.0,
                   delta_per_query: float | None = None, delta_per_analyst: float | None = None) -> None:
    path = project / "policies" / "customers.yaml"
    pol = yaml.safe_load(path.read_text())
    pol["access"]["analyst"]["query"] = "private"
    pol["columns"]["income"]["max"] = 100_000  # the clamping range of SUM/AVG(income)
    pol["privacy"]["epsilon_total"] = total
    pol["privacy"]["epsilon_per_run"] = min(8.0, total)
    pol["private_queries"] = {"epsilon_per_query": per_query, "contributions": 1,
                              **({"epsilon_per_analyst": per_analyst} if per_analyst else {}),
                              **({"delta_per_query": delta_per_query} if delta_per_query else {}),
                              **({"delta_per_analyst": delta_per_analyst} if delta_per_analyst else {})}
    path.write_text(yaml.safe_dump(pol, sort_keys=False))
    roles = project / "policies" / "roles.yaml"
    cat = yaml.safe_load(roles.read_text())
    cat["principals"]["ann"] = ["analyst"]  # a second analyst
    roles.write_text(yaml.safe_dump(cat, sort_keys=False))


@pytest.fixture
def lake(project):
    from governance.workspace import Workspace

    private_policy(project)
    ws = Workspace.open(project / "lakewarden.yaml")
    put(ws, customers(without=TARGET))  # version 0: the target is not in the data
    put(ws, customers().slice(TARGET, 1), mode="append")  # version 1: the target joined
    yield ws
    ws.close()


def events(ws, action: str) -> list[dict]:
    ws.audit.flush()
    out = ws.audit.query(action=action).to_pylist()
    for e in out:
        for k in ("details", "rule_ids"):
            if isinstance(e.get(k), str) and e[k][:1] in "[{":
                e[k] = json.loads(e[k])
    return out


def plan_for(ws, sql: str, *, epsilon: float | None = None):
    """The private plan ``run_query`` compiles for the analyst (same gate decision, same policy)."""
    from governance.gate import Resource
    from governance.policy import Stage

    d = ws.gate.enforce(Stage.QUERY, ws.actor("ana"), Resource.table("customers"), {"layer": "silver"})
    return compile_plan(sql, ws, TableRef("silver", "customers"), d, epsilon=epsilon)


def rows_for(ws, plan, *, version: int) -> pa.Table:
    """The analyst's rows the plan reads (through the role's view: masks, row filter), as ``run_query`` fetches them."""
    from lakehouse.sql import _checked, _execute

    sql = plan.fetch_sql()
    return _execute(ws, ws.actor("ana"), sql, _checked(sql, ws), version=version, as_of=None, max_rows=None).table


# -- the verb ---------------------------------------------------------------------------
def test_a_private_count_is_noisy_says_so_and_spends_its_epsilon(lake):
    res = run_query(lake, lake.actor("ana"), "SELECT region, COUNT(*) AS n, AVG(income) AS mean_income "
                                             "FROM customers GROUP BY region")
    t = res.table
    assert t.column_names == ["region", "n", "n_ci_low", "n_ci_high", "mean_income", "mean_income_ci_low",
                              "mean_income_ci_high"]
    assert sorted(t["region"].to_pylist()) == sorted(REGIONS)  # the policy's keys, all of them
    rel = res.private
    assert rel is not None and rel.epsilon == 1.0 and rel.delta == 0.0 and "OpenDP" in rel.mechanism
    assert "customers/privacy/budget" in rel.rule_ids and "customers/access/analyst" in rel.rule_ids
    assert b"lakewarden.private" in t.schema.metadata
    for lo, v, hi in zip(t["n_ci_low"].to_pylist(), t["n"].to_pylist(), t["n_ci_high"].to_pylist()):
        assert lo < v < hi
    for lo, hi in zip(t["mean_income_ci_low"].to_pylist(), t["mean_income_ci_high"].to_pylist()):
        assert 0 <= lo <= hi <= 100_000
    ledger = PrivacyLedger(lake)
    assert ledger.status("customers").epsilon_spent == pytest.approx(1.0)
    assert ledger.analyst_status("customers", "ana").epsilon_spent == pytest.approx(1.0)
    ev = [e for e in events(lake, "sql.query") if e["outcome"] == "ok"][-1]
    assert ev["details"]["private"] is True and ev["details"]["epsilon"] == 1.0
    assert "customers/privacy/budget" in ev["details"]["rule_ids"]
    assert "rows" in ev["details"] and "n" not in ev["details"]  # never a value


def test_an_exact_role_is_unchanged(lake):
    res = run_query(lake, lake.actor("dana"), "SELECT COUNT(*) AS n FROM customers WHERE region = 'north'")
    assert res.private is None and res.table.to_pylist() == [{"n": 80 + 1}]
    assert PrivacyLedger(lake).status("customers").epsilon_spent == 0.0


def test_a_smaller_epsilon_may_be_asked_and_a_larger_one_is_refused(lake):
    res = run_query(lake, lake.actor("ana"), "SELECT COUNT(*) FROM customers", epsilon=0.25)
    assert res.private.epsilon == 0.25 and res.table.column_names[0] == "count_star"
    with pytest.raises(AccessDenied) as e:
        run_query(lake, lake.actor("ana"), "SELECT COUNT(*) FROM customers", epsilon=2.0)
    assert e.value.decision.rule_ids == ("customers/privacy/epsilon_per_query",)
    with pytest.raises(SqlError, match="exact"):
        run_query(lake, lake.actor("dana"), "SELECT COUNT(*) FROM customers", epsilon=1.0)


# -- the guarantee ------------------------------------------------------------------------
Q_ALL = "SELECT COUNT(*) AS n FROM customers WHERE region = 'north'"
Q_BUT = "SELECT COUNT(*) AS n FROM customers WHERE region = 'north' AND birth_date <> 1950"


def test_differencing_attack_succeeds_exactly_and_fails_privately(lake):
    """Is the target in the data? Two counts, with and without people born in 1950, differ by one
    exactly when the target is in. Worlds: version 0 (target out) and version 1 (target in)."""
    import random

    rng = random.Random(20)
    trials = 400
    # Exact engine (a role whose queries are exact): the difference answers every time.
    exact = {v: (run_query(lake, lake.actor("dana"), Q_ALL, version=v).table["n"][0].as_py()
                 - run_query(lake, lake.actor("dana"), Q_BUT, version=v).table["n"][0].as_py()) for v in (0, 1)}
    hits = sum((exact[b] == 1) == bool(b) for b in (rng.randrange(2) for _ in range(trials)))
    assert hits == trials
    # Private engine at ε = 0.1 per query (0.2 for the pair): the same plans run_query compiles.
    eps = 0.1
    p_all, p_but = plan_for(lake, Q_ALL, epsilon=eps), plan_for(lake, Q_BUT, epsilon=eps)
    data = {v: (rows_for(lake, p_all, version=v), rows_for(lake, p_but, version=v)) for v in (0, 1)}
    hits = 0
    for _ in range(trials):
        b = rng.randrange(2)
        r_all, r_but = data[b]
        diff = p_all.release(r_all)[0]["n"][0].as_py() - p_but.release(r_but)[0]["n"][0].as_py()
        guess = 1 if diff >= 1 else 0  # the attacker's best threshold: the exact difference is 0 or 1
        hits += guess == b
    bound = math.exp(2 * eps) / (1 + math.exp(2 * eps))  # ≈ 0.55: any attacker's best success rate
    margin = 5 * math.sqrt(0.25 / trials)  # five standard deviations of the success rate
    assert hits / trials <= bound + margin, (hits, trials, bound)


def test_count_noise_follows_the_mechanism(lake):
    """COUNT releases minus the true count: OpenDP's discrete Laplace at scale 1/ε (variance, mean, P(0))."""
    eps = 0.5
    plan = plan_for(lake, "SELECT COUNT(*) AS n FROM customers", epsilon=eps)
    rows = rows_for(lake, plan, version=1)
    true = run_query(lake, lake.actor("dana"), "SELECT COUNT(*) AS n FROM customers WHERE region <> 'restricted'",
                     version=1).table["n"][0].as_py()
    _, scales = plan.release(rows)
    s = scales["n"]
    assert s == pytest.approx(1 / eps)
    draws = 3000
    noise = [plan.release(rows)[0]["n"][0].as_py() - true for _ in range(draws)]
    q = math.exp(-1 / s)
    var = 2 * q / (1 - q) ** 2  # the discrete Laplace's variance
    p0 = (1 - q) / (1 + q)  # its probability of exactly 0
    mean = sum(noise) / draws
    sample_var = sum((x - mean) ** 2 for x in noise) / (draws - 1)
    assert abs(mean) < 5 * math.sqrt(var / draws)
    assert sample_var == pytest.approx(var, rel=0.25)  # the estimate's sd is ≈ 5% here
    zeros = sum(x == 0 for x in noise) / draws
    assert zeros == pytest.approx(p0, abs=5 * math.sqrt(p0 * (1 - p0) / draws))
    # the 95% interval OpenDP reports covers the truth about 95% of the time
    covered = 0
    for _ in range(400):
        t = plan.release(rows)[0]
        covered += t["n_ci_low"][0].as_py() <= true <= t["n_ci_high"][0].as_py()
    assert covered / 400 >= 0.95 - 5 * math.sqrt(0.05 * 0.95 / 400)


# -- the budget ---------------------------------------------------------------------------
def test_training_and_queries_exhaust_one_budget(project):
    from governance.workspace import Workspace

    private_policy(project, per_query=2.0, per_analyst=None, total=10.0)
    ws = Workspace.open(project / "lakewarden.yaml")
    try:
        put(ws, customers())
        ledger = PrivacyLedger(ws)
        run = ledger.reserve(ws.actor("sam"), "customers", purpose="credit_scoring", epsilon=6.0, delta=1e-6)
        ledger.commit(run.run_id, epsilon=6.0)
        for _ in range(2):
            run_query(ws, ws.actor("ana"), "SELECT COUNT(*) FROM customers", epsilon=2.0)
        assert ledger.status("customers").epsilon_spent == pytest.approx(10.0)
        before = len(events(ws, "privacy.reserve"))
        with pytest.raises(AccessDenied) as e:
            run_query(ws, ws.actor("ann"), "SELECT COUNT(*) FROM customers", epsilon=0.5)
        assert e.value.decision.rule_ids == ("customers/privacy/epsilon_total",)
        assert "10 spent by queries and training, 0 left" in str(e.value)
        assert len(events(ws, "privacy.reserve")) == before  # refused before it ran
        deny = [x for x in events(ws, "gate.decide") if x["outcome"] == "deny"][-1]
        assert "customers/privacy/epsilon_total" in str(deny["rule_ids"])
        # and training is refused by the same budget
        with pytest.raises(AccessDenied, match="epsilon_total|total budget"):
            ledger.reserve(ws.actor("sam"), "customers", purpose="credit_scoring", epsilon=1.0, delta=1e-6)
    finally:
        ws.close()


def test_one_analyst_exhausts_their_budget_and_another_still_queries(lake):
    for _ in range(3):
        run_query(lake, lake.actor("ana"), "SELECT COUNT(*) FROM customers")
    with pytest.raises(AccessDenied) as e:
        run_query(lake, lake.actor("ana"), "SELECT COUNT(*) FROM customers", epsilon=0.1)
    assert e.value.decision.rule_ids == ("customers/privacy/epsilon_per_analyst",)
    assert "ana's budget 3" in str(e.value)
    res = run_query(lake, lake.actor("ann"), "SELECT COUNT(*) FROM customers")
    assert res.private is not None
    ledger = PrivacyLedger(lake)
    assert ledger.analyst_status("customers", "ana").epsilon_spent == pytest.approx(3.0)
    assert ledger.analyst_status("customers", "ann").epsilon_spent == pytest.approx(1.0)
    assert ledger.status("customers").epsilon_spent == pytest.approx(4.0)


def test_a_refused_query_spends_nothing(lake):
    with pytest.raises(SqlError):
        run_query(lake, lake.actor("ana"), "SELECT * FROM customers")
    with pytest.raises(SqlError, match="Conversion Error"):  # compiles, then fails in DuckDB: released
        run_query(lake, lake.actor("ana"), "SELECT COUNT(*) FROM customers WHERE birth_date = 'abc'")
    assert PrivacyLedger(lake).status("customers").epsilon_spent == 0.0
    assert [e["details"]["epsilon"] for e in events(lake, "privacy.released")] == [1.0]


# -- group keys found in the data (a thresholded key release, δ > 0) ---------------------------
@pytest.fixture
def keyed_lake(project):
    from governance.workspace import Workspace

    private_policy(project, delta_per_query=1e-6, delta_per_analyst=2e-6)
    ws = Workspace.open(project / "lakewarden.yaml")
    put(ws, customers())
    yield ws
    ws.close()


def test_keys_found_in_the_data_are_released_above_the_threshold_and_spend_delta(keyed_lake):
    ws = keyed_lake
    res = run_query(ws, ws.actor("ana"), "SELECT zip_code, COUNT(*) AS n FROM customers GROUP BY zip_code")
    rel = res.private
    assert rel is not None and rel.delta == pytest.approx(1e-6) and rel.threshold is not None and rel.threshold > 1
    assert "groups found in the data are shown only where their noisy count reached" in rel.describe()
    assert json.loads(res.table.schema.metadata[b"lakewarden.private"])["key_threshold"] == rel.threshold
    truth = run_query(ws, ws.actor("dana"), "SELECT zip_code, COUNT(*) AS n FROM customers "
                                            "WHERE region <> 'restricted' GROUP BY zip_code").table.to_pylist()
    exact = {r["zip_code"]: r["n"] for r in truth}
    assert min(exact.values()) > rel.threshold + 20  # every zip is far above it: all nine come back
    got = {r["zip_code"]: r["n"] for r in res.table.to_pylist()}
    assert got.keys() == exact.keys() and all(abs(got[z] - exact[z]) <= 20 for z in exact)
    sums = run_query(ws, ws.actor("ana"), "SELECT zip_code, SUM(income) AS s FROM customers GROUP BY zip_code",
                     epsilon=0.5)
    assert sums.table.column_names == ["zip_code", "s", "s_ci_low", "s_ci_high"]  # the count it needs stays hidden
    mine = PrivacyLedger(ws).analyst_status("customers", "ana")
    assert mine.delta_spent == pytest.approx(2e-6) and mine.epsilon_spent == pytest.approx(1.5)
    with pytest.raises(AccessDenied) as e:  # a third would pass ε (2.0 of 3) but not the analyst's δ
        run_query(ws, ws.actor("ana"), "SELECT zip_code, COUNT(*) AS n FROM customers GROUP BY zip_code",
                  epsilon=0.5)
    assert e.value.decision.rule_ids == ("customers/privacy/delta_per_analyst",)
    # a public-key query spends no δ and is still answered
    assert run_query(ws, ws.actor("ana"), "SELECT region, COUNT(*) AS n FROM customers GROUP BY region",
                     epsilon=0.5).private.delta == 0.0


def test_a_group_of_one_person_is_not_released(keyed_lake):
    """The target is the only person born in 1950. Grouped by birth year (keys from the data), that
    group stays out of every release; the other years, about eight people each, are near the threshold."""
    plan = plan_for(keyed_lake, "SELECT birth_date, COUNT(*) AS n FROM customers GROUP BY birth_date")
    assert plan.thresholded and plan.delta == pytest.approx(1e-6)
    rows = rows_for(keyed_lake, plan, version=0)
    assert 1950 in rows["birth_date"].to_pylist()
    seen = set()
    for _ in range(200):  # P(a count of 1 clears the threshold) <= δ = 1e-6 per release
        seen |= set(plan.release(rows)[0]["birth_date"].to_pylist())
    assert 1950 not in seen
    assert PrivacyLedger(keyed_lake).status("customers").epsilon_spent == 0.0  # plans alone spend nothing


@pytest.mark.parametrize("sql, words", [
    ("SELECT customer_id, COUNT(*) FROM customers GROUP BY customer_id", "subject key column"),
])
def test_keys_from_the_data_never_group_by_one_persons_values(keyed_lake, sql, words):
    with pytest.raises(SqlError, match=words):
        run_query(keyed_lake, keyed_lake.actor("ana"), sql)


def test_delta_per_query_above_the_analysts_delta_is_a_policy_error(project):
    from governance.workspace import Workspace

    private_policy(project, delta_per_query=5e-5)  # privacy.delta of customers is 1e-5
    with pytest.raises(PolicyError, match=r"private_queries.delta_per_query.*exceeds privacy.delta"):
        Workspace.open(project / "lakewarden.yaml").policies


# -- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("sql, words", [
    ("SELECT * FROM customers", "SELECT * — it returns rows"),
    ("SELECT income FROM customers", "non-aggregate column income"),
    ("SELECT region, income FROM customers GROUP BY region", "non-aggregate column income"),
    ("SELECT c.region, COUNT(*) FROM customers c JOIN customers d ON c.customer_id = d.customer_id GROUP BY c.region",
     "JOIN"),
    ("SELECT COUNT(*) FROM customers LIMIT 5", "LIMIT"),
    ("SELECT region, COUNT(*) FROM customers GROUP BY region HAVING COUNT(*) > 3", "HAVING"),
    ("SELECT region, COUNT(*) AS n FROM customers GROUP BY region ORDER BY n", "ORDER BY n"),
    ("SELECT COUNT(DISTINCT zip_code) FROM customers", "COUNT(DISTINCT"),
    ("SELECT MAX(income) FROM customers", "only COUNT, SUM and AVG"),
    ("SELECT SUM(income_z) FROM customers", "hidden from role analyst"),
    ("SELECT SUM(birth_date) FROM customers", "SUM(birth_date) — it has no numeric min and max"),
    ("SELECT zip_code, COUNT(*) FROM customers GROUP BY zip_code", "its keys are not public"),
    ("SELECT zip_code, COUNT(*) FROM customers GROUP BY zip_code", "needs a thresholded key release (δ > 0)"),
    ("SELECT COUNT(*) FROM customers WHERE customer_id = 'x'", "WHERE on customer_id"),
    ("SELECT COUNT(*) FROM customers WHERE length(zip_code) > 2", "in WHERE"),
    ("SELECT COUNT(*) FROM (SELECT * FROM customers)", "subquery"),
    ("SELECT COUNT(*) FROM customers UNION ALL SELECT COUNT(*) FROM customers", "UNION"),
    ("SELECT COUNT(*) OVER () FROM customers", "window function"),
    ("SELECT SUM(income * 2) FROM customers", "aggregates take one column"),
])
def test_what_a_private_role_cannot_ask(lake, sql, words):
    with pytest.raises(SqlError) as e:
        run_query(lake, lake.actor("ana"), sql)
    assert words in str(e.value)
    assert PrivacyLedger(lake).status("customers").epsilon_spent == 0.0


def test_sum_over_a_column_without_bounds_names_the_fix(project):
    from governance.workspace import Workspace

    private_policy(project)
    path = project / "policies" / "customers.yaml"
    pol = yaml.safe_load(path.read_text())
    del pol["columns"]["income"]["max"]
    path.write_text(yaml.safe_dump(pol, sort_keys=False))
    ws = Workspace.open(project / "lakewarden.yaml")
    try:
        put(ws, customers())
        with pytest.raises(SqlError, match=r"SUM\(income\).*no numeric min and max.*columns.income.min and .max"):
            run_query(ws, ws.actor("ana"), "SELECT SUM(income) FROM customers")
    finally:
        ws.close()


# -- policy -------------------------------------------------------------------------------
def test_private_queries_need_a_privacy_budget(project):
    from governance.workspace import Workspace

    path = project / "policies" / "customers.yaml"
    pol = yaml.safe_load(path.read_text())
    pol["access"]["analyst"]["query"] = "private"
    del pol["privacy"]
    path.write_text(yaml.safe_dump(pol, sort_keys=False))
    with pytest.raises(PolicyError, match=r"customers.yaml.*access.analyst.query.*privacy budget"):
        Workspace.open(project / "lakewarden.yaml").policies


def test_per_query_above_the_total_is_a_policy_error(project):
    from governance.workspace import Workspace

    private_policy(project, per_query=50.0, per_analyst=None, total=20.0)
    with pytest.raises(PolicyError, match=r"private_queries.epsilon_per_query.*exceeds privacy.epsilon_total"):
        Workspace.open(project / "lakewarden.yaml").policies


# -- the CLI renders what the verb returns ------------------------------------------------------
def test_the_cli_says_a_result_is_noisy_and_refuses_in_one_line(lake, project):
    import os

    from cli_helpers import lw_in

    env = {"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]}
    p = lw_in(project, "sql", "SELECT region, COUNT(*) AS n FROM customers GROUP BY region", user="ana", env=env)
    assert p.returncode == 0, p.stderr
    assert "differentially private: ε=1, δ=0" in p.stdout and "n_ci_low" in p.stdout
    p = lw_in(project, "sql", "SELECT COUNT(*) AS n FROM customers", "--format", "json", user="ana", env=env)
    assert p.returncode == 0 and json.loads(p.stdout)[0].keys() == {"n", "n_ci_low", "n_ci_high"}
    assert "differentially private" in p.stderr
    p = lw_in(project, "sql", "SELECT * FROM customers", user="ana", env=env)
    assert p.returncode == 2 and "refused for a private role: SELECT *" in p.stdout + p.stderr
    p = lw_in(project, "sql", "SELECT COUNT(*) AS n FROM customers", "--epsilon", "0.25", user="ana", env=env)
    assert p.returncode == 0 and "differentially private: ε=0.25" in p.stdout, p.stderr
    p = lw_in(project, "sql", "SELECT COUNT(*) AS n FROM customers", "--epsilon", "5", user="ana", env=env)
    assert p.returncode == 3 and "customers/privacy/epsilon_per_query" in p.stdout + p.stderr
    p = lw_in(project, "sql", "SELECT COUNT(*) AS n FROM customers", "--epsilon", "0.5", user="dana", env=env)
    assert p.returncode == 2 and "epsilon applies to differentially private queries only" in p.stdout + p.stderr
    from governance.ledger import PrivacyLedger
    from governance.workspace import Workspace

    with Workspace.open(project / "lakewarden.yaml") as ws:  # 1 + 1 + 0.25: what the three releases spent
        assert PrivacyLedger(ws).analyst_status("customers", "ana").epsilon_spent == pytest.approx(2.25)
    p = lw_in(project, "privacy", "status", "customers", user="ana", env=env)
    assert p.returncode == 0 and "ana's private queries" in p.stdout, p.stdout + p.stderr
    row = [ln for ln in p.stdout.splitlines() if "customers" in ln and "2.25" in ln][-1]  # the second table
    assert [c.strip() for c in row.split("│")[1:-1]][1:4] == ["3", "2.25", "0.75"], row  # queries, ε spent, ε left
    p = lw_in(project, "privacy", "status", "customers", user="dana", env=env)
    assert p.returncode == 0 and "private queries" not in p.stdout


def test_the_trino_engine_answers_a_private_role_here_and_trino_gives_it_no_rows(lake, monkeypatch):
    """``--engine trino`` for a private role: nothing is sent to Trino (whose compiled rules deny the
    role the table, so a direct connection gets no exact answer); the role's governed view is read on
    the embedded engine and only the noisy aggregates leave. An exact role's query goes to Trino."""
    import lakehouse.trino as trino_mod
    from lakehouse.trino import compile_rules

    sent: list[tuple[str, str, str | None]] = []

    def fake_trino(ws, actor, sql, *, role=None, max_rows=None):
        sent.append((actor.name, sql, role))
        return pa.table({"n": [0]})

    monkeypatch.setattr(trino_mod, "run_query", fake_trino)
    res = run_query(lake, lake.actor("ana"), "SELECT region, COUNT(*) AS n FROM customers GROUP BY region",
                    engine="trino")
    assert res.private is not None and res.private.epsilon == 1.0
    assert sorted(res.table["region"].to_pylist()) == sorted(REGIONS)
    assert sent == []
    assert PrivacyLedger(lake).status("customers").epsilon_spent == pytest.approx(1.0)
    with pytest.raises(SqlError, match="JOIN"):  # refused before anything is read
        run_query(lake, lake.actor("ana"), "SELECT COUNT(*) FROM customers a JOIN customers b USING (zip_code)",
                  engine="trino")
    # an exact role's query goes to Trino as written
    run_query(lake, lake.actor("dana"), "SELECT COUNT(*) FROM customers", engine="trino")
    assert sent == [("dana", "SELECT COUNT(*) FROM customers", None)]
    rules = compile_rules(lake, {("silver", "customers"): pa.schema([("customer_id", pa.string())])})["tables"]
    groups = {r.get("group") for r in rules if r.get("table") == "customers"}
    assert "analyst" not in groups and "data_engineer" in groups  # the private role gets no rows from Trino


def test_private_queries_on_a_real_trino(tmp_path, monkeypatch):
    """Against a real Trino server (skipped when Trino is not installed, as tests/test_trino.py does): a
    private role's query on the Trino engine is released here and matches the truth within the noise,
    while Trino itself refuses the role the table (no exact answer through a direct connection)."""
    import os
    import shutil
    import socket

    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from lakehouse.trino import TrinoDenied, TrinoServer, default_home, install
    from lakehouse.trino import run_query as run_trino

    home = default_home()
    if not (home / "bin" / "launcher").exists():
        if os.environ.get("LAKEWARDEN_REQUIRE_TRINO") != "1":
            pytest.skip("Trino is not installed (run infra/trino/install.sh, or make test)")
        home = install()
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[1] / "policies", tmp_path / "policies")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "lakewarden.yaml").write_text(
        "version: 1\nname: dptrino\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\n"
        f"trino: {{host: 127.0.0.1, port: {port}}}\npolicies: [policies/*.yaml]\n")
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    private_policy(tmp_path)
    ws = Workspace.open(tmp_path / "lakewarden.yaml")
    srv = TrinoServer(ws, home=home)
    try:
        put(ws, customers())
        srv.start()
        srv.sync(ws.actor("dana"))
        sql = "SELECT region, COUNT(*) AS n FROM customers WHERE birth_date >= 1970 GROUP BY region"
        res = run_query(ws, ws.actor("ana"), sql, engine="trino", epsilon=1.0)
        emb = run_query(ws, ws.actor("ann"), sql, epsilon=1.0)
        assert res.private is not None and res.table.column_names == emb.table.column_names
        as_analyst = sql.replace("WHERE", "WHERE region <> 'restricted' AND")  # the analyst's row filter
        exact = {r["region"]: r["n"] for r in run_query(ws, ws.actor("dana"), as_analyst).table.to_pylist()}
        for r in res.table.to_pylist():  # within 20 scales of the truth (P(miss) < 1e-8 per key)
            assert abs(r["n"] - exact.get(r["region"], 0)) <= 20, (r, exact)
        assert PrivacyLedger(ws).status("customers").epsilon_spent == pytest.approx(2.0)
        with pytest.raises(TrinoDenied, match="Cannot select from table"):  # straight to Trino: no exact rows
            run_trino(ws, ws.actor("ana"), "SELECT count(*) FROM customers")
        assert run_trino(ws, ws.actor("dana"), "SELECT count(*) AS n FROM customers").num_rows == 1
    finally:
        srv.stop()
        ws.close()


def test_a_release_opendp_cannot_calibrate_is_a_clear_error_that_spends_nothing(project):
    """At ε = 10 with keys from the data, OpenDP's threshold search fails (its threshold would be 1):
    one line naming ε and δ, no traceback, and the reservation released."""
    from governance.workspace import Workspace

    private_policy(project, per_query=10.0, per_analyst=None, delta_per_query=1e-6)
    with Workspace.open(project / "lakewarden.yaml") as ws:
        put(ws, customers())
        with pytest.raises(SqlError, match=r"OpenDP cannot build the private release of this query at ε=10, δ=1e-06"):
            run_query(ws, ws.actor("ana"), "SELECT zip_code, COUNT(*) AS n FROM customers GROUP BY zip_code")
        st = PrivacyLedger(ws).status("customers")
        assert st.epsilon_spent == 0.0 and st.epsilon_reserved == 0.0


def test_a_subject_with_many_rows_adds_at_most_contributions(project):
    """Transactions: many rows per person (the key is not unique). OpenDP truncates each subject to
    ``contributions`` rows on the subject key before counting; a unique key in silver needs no cut."""
    from datetime import datetime, timezone

    from governance.workspace import Workspace

    path = project / "policies" / "transactions.yaml"
    pol = yaml.safe_load(path.read_text())
    pol["access"]["analyst"]["query"] = "private"
    pol["private_queries"] = {"epsilon_per_query": 1.0, "contributions": 2}
    path.write_text(yaml.safe_dump(pol, sort_keys=False))
    private_policy(project)
    with Workspace.open(project / "lakewarden.yaml") as ws:
        people, each = 100, 5
        n = people * each
        t = pa.table({
            "transaction_id": pa.array([f"T-{i:012d}" for i in range(n)]),
            "customer_id": pa.array([token(i // each) for i in range(n)]),
            "ts": pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
            "amount": pa.array([10.0] * n), "merchant_category": pa.array(["food"] * n),
            "channel": pa.array(["card", "online", "transfer", "card", "online"] * people),
        })
        for c in hashed_columns(ws.policies, "transactions"):
            t = t.append_column(hash_column(c), keyed_hashes(ws.keyring.system_key(MASK_HASH_KEY), t[c]))
        write_deltalake(Catalog(ws.config).uri(TableRef("silver", "transactions")), t)
        from governance.gate import Resource
        from governance.policy import Stage

        d = ws.gate.enforce(Stage.QUERY, ws.actor("ana"), Resource.table("transactions"), {"layer": "silver"})
        sql = "SELECT channel, COUNT(*) AS n FROM transactions GROUP BY channel"
        assert compile_plan(sql, ws, TableRef("silver", "transactions"), d).id_column == "customer_id"
        assert compile_plan("SELECT COUNT(*) AS n FROM customers", ws, TableRef("silver", "customers"),
                            ws.gate.enforce(Stage.QUERY, ws.actor("ana"), Resource.table("customers"),
                                            {"layer": "silver"})).id_column is None  # unique key: no cut
        got = run_query(ws, ws.actor("ana"), sql).table.to_pylist()
        total = sum(r["n"] for r in got)  # 2 of each person's 5 rows: 200, noise of scale 2 on each of 3 keys
        assert abs(total - people * 2) <= 60, got


METERS = """\
kind: dataset
dataset: meters
description: Smart-meter readings, many per household (a dataset the demo did not design).
owner: data_engineer
subject_key: household
columns:
  household: {class: subject_key, type: string, required: true}
  town:      {class: public, type: string, required: true}
  tariff:    {class: public, type: string, allowed: [flat, peak, green]}
  kwh:       {class: public, type: double, required: true, min: 0, max: 50}
purposes:
  planning: {description: Grid planning.}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [planning]}
  analyst: {layers: [silver], purposes: [planning], query: private, masks: {household: hash}}
privacy: {epsilon_per_run: 5.0, epsilon_total: 20.0, delta: 1.0e-5}
private_queries: {epsilon_per_query: 2.0, contributions: 3, delta_per_query: 1.0e-6}
"""


def test_private_queries_over_a_dataset_with_other_names_and_many_rows_per_subject(project):
    """Ingested and built for real: households with six readings each (truncated to three), towns found
    in the data (thresholded: the town of one household never shows), tariffs listed in the policy."""
    import csv

    from governance.gate import Resource
    from governance.policy import Stage
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver

    (project / "policies" / "meters.yaml").write_text(METERS)
    towns = ["Ashby"] * 60 + ["Brill"] * 45 + ["Crail"]
    src = project / "meters.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["household", "town", "tariff", "kwh"])
        for h, town in enumerate(towns):
            for r in range(6):
                w.writerow([f"HH-{h:04d}", town, ["flat", "peak", "green"][(h + r) % 3], f"{(h * 7 + r) % 50}.5"])
    with Workspace.open(project / "lakewarden.yaml") as ws:
        assert ingest(ws, ws.actor("dana"), "meters", [str(src)]).rows_accepted == 636
        build_silver(ws, ws.actor("dana"), "meters")
        ana = ws.actor("ana")
        d = ws.gate.enforce(Stage.QUERY, ana, Resource.table("meters"), {"layer": "silver"})
        plan = compile_plan("SELECT town, COUNT(*) AS n FROM meters GROUP BY town", ws, TableRef("silver", "meters"), d)
        assert plan.id_column == "household" and plan.thresholded  # truncation on the key; keys from the data
        res = run_query(ws, ana, "SELECT town, COUNT(*) AS n FROM meters GROUP BY town")
        # a household moves a count by up to 3 rows in up to 3 towns: noise scale 9/ε = 4.5, threshold 78
        assert res.private.threshold == 78 and res.private.scales == {"n": pytest.approx(4.5)}
        got = {r["town"]: r["n"] for r in res.table.to_pylist()}
        assert set(got) == {"Ashby", "Brill"}, got  # Crail: one household (3 rows), far below the threshold
        assert abs(got["Ashby"] - 180) <= 90 and abs(got["Brill"] - 135) <= 90  # three readings per household
        by_tariff = run_query(ws, ana, "SELECT tariff, AVG(kwh) AS mean_kwh FROM meters GROUP BY tariff ORDER BY tariff")
        assert by_tariff.table["tariff"].to_pylist() == ["flat", "green", "peak"]  # the policy's keys, all of them
        assert all(0 <= v <= 50 for v in by_tariff.table["mean_kwh"].to_pylist())
        with pytest.raises(SqlError, match="subject key column"):
            run_query(ws, ana, "SELECT household, COUNT(*) FROM meters GROUP BY household")
        mine = PrivacyLedger(ws).analyst_status("meters", "ana")
        assert mine.epsilon_spent == pytest.approx(4.0) and mine.delta_spent == pytest.approx(1e-6)
