"""The rendered Trino cluster profile, run (issue #17): a coordinator and a worker as local processes
over the governed lake on the session's S3-compatible server, HTTPS with a CA of the test's own,
passwords from Trino's file authenticator, the shared secret in the nodes' environment only; and
the same cluster accepting the session Keycloak realm's access tokens (JWT, issue #19). Who a token
names is decided by Trino (signature, issuer, audience, expiry); what that user may see is still
decided by the rules compiled from policy, with roles from the policy principals' group file
(Trino reads no groups from a token). No password or token is written in this file.

The configuration comes from ``render_cluster``, the renderer of the committed
``infra/trino/cluster/`` files (the first tests check the two stay one). Subject values come
from generated files at run time; none is in this file.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from governance.keys import generate_kek_b64

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


# -- one renderer, production and local ------------------------------------------------------------
def test_the_committed_profile_and_the_local_cluster_differ_only_in_ports_paths_and_sizes(tmp_path: Path):
    """The production files and a local cluster's are the same renderer's: the same properties on
    every node, and only addresses, folders, sizes and reload periods differ."""
    from governance.workspace import Workspace
    from lakehouse.trino import ClusterNode, ClusterSpec, production_cluster, render_cluster, render_profile

    ws = Workspace.open(REPO / "lakewarden.yaml")
    prod = render_profile(ws, "cluster")
    for rel, text in prod.items():  # what test_trino checks for every profile, here for this one
        assert (REPO / "infra" / "trino" / "cluster" / rel).read_text() == text, f"infra/trino/cluster/{rel} is stale"
    local = render_cluster(ws, ClusterSpec(
        discovery_uri="https://127.0.0.1:40001",
        coordinator=ClusterNode(name="coordinator", port=40001, data_dir=str(tmp_path / "c"), node_id="coordinator"),
        workers=(ClusterNode(name="worker", port=40002, data_dir=str(tmp_path / "w"), node_id="worker"),),
        storage_root="s3://lakewarden/t1", environment="lakewarden_x", tls_pem=str(tmp_path / "c.pem"),
        password_file=str(tmp_path / "p.db"), rules_file=str(tmp_path / "r.json"), groups_file=str(tmp_path / "g.txt"),
        heap="1G", refresh_period="1s", query_max_memory="512MB", query_max_memory_per_node="400MB",
        s3_variables=production_cluster(ws).s3_variables,
    ))
    assert set(local) == set(prod) - {"README.md"}
    may_differ = {"discovery.uri", "http-server.https.port", "http-server.https.keystore.path", "node.environment",
                  "node.id", "node.data-dir", "security.config-file", "security.refresh-period", "file.group-file",
                  "file.refresh-period", "file.password-file", "hive.metastore.catalog.dir",
                  "query.max-memory", "query.max-memory-per-node"}
    for rel in local:
        if rel.endswith(".properties"):
            a, b = _props(prod[rel]), _props(local[rel])
            assert set(a) - {"node.id"} == set(b) - {"node.id"} - {"query.max-memory", "query.max-memory-per-node"}, rel
            assert {k for k in set(a) & set(b) if a[k] != b[k]} <= may_differ, rel
        elif rel.endswith("jvm.config"):
            assert prod[rel].replace("-Xmx16G", "-Xmx1G") == local[rel]
        else:  # rules and groups: compiled from policy alone
            assert prod[rel] == local[rel], rel
    coord = _props(local["coordinator/etc/config.properties"])
    worker = _props(local["worker/etc/config.properties"])
    assert coord["node-scheduler.include-coordinator"] == "false" and coord["http-server.authentication.type"] == "PASSWORD"
    for cfg in (coord, worker):
        assert cfg["http-server.http.enabled"] == "false" and cfg["internal-communication.https.required"] == "true"
        assert cfg["internal-communication.shared-secret"] == "${ENV:TRINO_SHARED_SECRET}"
    assert "http-server.https.keystore.path" not in worker  # workers hold no client-facing key
    ws.close()


def test_a_cluster_spec_refuses_plain_http_and_a_local_root():
    from lakehouse.trino import ClusterNode, ClusterSpec

    c, w = ClusterNode(name="coordinator"), ClusterNode(name="worker")
    with pytest.raises(ValueError, match="https"):
        ClusterSpec(discovery_uri="http://10.0.0.1:8080", coordinator=c, workers=(w,), storage_root="s3://b/p")
    with pytest.raises(ValueError, match="object store"):
        ClusterSpec(discovery_uri="https://10.0.0.1:8443", coordinator=c, workers=(w,), storage_root="/srv/lake")
    with pytest.raises(ValueError, match="worker"):
        ClusterSpec(discovery_uri="https://10.0.0.1:8443", coordinator=c, workers=(), storage_root="s3://b/p")


def test_the_password_hash_is_pbkdf2_hmac_sha1_in_trinos_format():
    """Known answer: RFC 6070's PBKDF2-HMAC-SHA1 vector (P="password", S="salt", c=4096) is the first 20
    bytes of the 32 Trino reads; the line is ``iterations:salt:hash`` in lower-case hex."""
    from lakehouse.trino import password_hash

    line = password_hash("password", iterations=4096, salt=b"salt")
    iterations, salt, digest = line.split(":")
    assert (iterations, salt) == ("4096", b"salt".hex())
    assert digest.startswith("4b007901b765489abead49d926f721d065a429c1") and len(digest) == 64
    with pytest.raises(ValueError, match="1000"):
        password_hash("password", iterations=999)


# -- the cluster, run -----------------------------------------------------------------------------
def _project(base: Path, root: str, issuer: str) -> Path:
    proj = base / "proj"
    shutil.copytree(REPO / "policies", proj / "policies")
    (proj / "lakewarden.yaml").write_text(
        "version: 1\nname: cluster\n"
        f"storage: {{root: '{root}'}}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\n"
        f"auth: {{enabled: true, issuer: '{issuer}'}}\n"
        "policies: [policies/*.yaml]\n"
    )
    return proj


@pytest.fixture(scope="module")
def cluster_lake(objectstore, keycloak, tmp_path_factory: pytest.TempPathFactory):
    """A governed lake on the object store and a running cluster (coordinator + 1 worker) over it,
    the tables registered. The nodes start while the lake is being built. The coordinator takes
    passwords (ana, dana and Lakewarden's admin have one) and the session Keycloak's ``lakewarden``
    realm's tokens (JWT): one cluster serves both kinds of tests (a start costs about 40 s)."""
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from lakehouse.trino import default_home, install
    from lakehouse.trino_cluster import TrinoCluster

    home = default_home()
    if not (home / "bin" / "launcher").exists():
        if os.environ.get("LAKEWARDEN_REQUIRE_TRINO") != "1":
            pytest.skip("Trino is not installed (run infra/trino/install.sh, or make test)")
        home = install()
    base = tmp_path_factory.mktemp("trino-cluster")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in objectstore.env().items():
            mp.setenv(k, v)
        mp.setenv("LAKEWARDEN_KEK", generate_kek_b64())
        mp.delenv("LAKEWARDEN_CONFIG", raising=False)
        mp.delenv("LAKEWARDEN_USER", raising=False)
        _, realm, other = keycloak
        proj = _project(base, f"s3://lakewarden/t{uuid.uuid4().hex[:12]}", realm.issuer)
        ws = Workspace.open(proj / "lakewarden.yaml")
        cluster = TrinoCluster(ws, workers=1, home=home, users=["ana", "dana"], auth=ws.config.auth)
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(1) as pool:  # leaving the block waits for the start, whatever happened
                starting = pool.submit(cluster.start)
                res = generate(base / "landing", people=200, transactions_per_person=1, seed=13)
                dana = _verified(ws, realm, "dana")  # auth is on: an actor comes from a token
                ingest(ws, dana, "customers", [res.files["customers"]])
                build_silver(ws, dana, "customers")
                built = time.perf_counter() - t0
            starting.result()
            up = time.perf_counter() - t0
            cluster.sync(dana)
        except BaseException:
            cluster.stop()
            ws.close()
            raise
        print(f"\nlake built in {built:.1f}s; cluster active at {up:.1f}s; synced at {time.perf_counter() - t0:.1f}s")
        try:
            yield ws, cluster, realm, other
        finally:
            cluster.stop()
            ws.close()


def _verified(ws, realm, user: str):
    """``user``'s actor from a token of the realm (the only kind the library makes with auth on)."""
    from governance.authn import Authenticator

    return Authenticator.from_config(ws.config.auth, ws.policies).actor(realm.password_token(user))


@pytest.fixture(scope="module")
def lake(cluster_lake):
    """The workspace and the cluster (the password tests)."""
    return cluster_lake[:2]


@pytest.fixture(scope="module")
def jwt_lake(cluster_lake):
    """The workspace, the cluster, the realm whose tokens it accepts, and another realm (the token tests)."""
    return cluster_lake


@pytest.fixture
def no_ca_bundle_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's ``verify``; the
    ``trino`` client's ``verify=<CA file>`` only holds without them."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def _rows(tbl: pa.Table) -> list[tuple]:
    norm = lambda v: None if isinstance(v, float) and math.isnan(v) else (round(v, 6) if isinstance(v, float) else v)  # noqa: E731
    return sorted((tuple(norm(v) for v in r.values()) for r in tbl.to_pylist()), key=repr)


@pytest.mark.slow
def test_every_node_is_active_and_only_the_worker_runs_tasks(lake):
    _, cluster = lake
    assert cluster.active_nodes() == {"coordinator": True, "worker-1": False}
    conn = cluster.connect("dana")
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM customers")
    assert cur.fetchall()[0][0] > 150
    ran_on = cluster.query("lakewarden", f"SELECT DISTINCT node_id FROM system.runtime.tasks WHERE query_id = '{cur.query_id}'")
    assert ran_on == [["worker-1"]]  # node-scheduler.include-coordinator=false


@pytest.mark.slow
def test_an_analyst_over_https_with_a_password_sees_the_embedded_engines_masked_rows(jwt_lake, no_ca_bundle_override):
    import trino
    from trino.auth import BasicAuthentication

    from lakehouse.sql import run_query as run_embedded

    ws, cluster, realm, _ = jwt_lake
    sql = "SELECT customer_id, birth_date, zip_code, income, region FROM customers"
    conn = trino.dbapi.connect(host=cluster.host, port=cluster.port, user="ana", http_scheme="https",
                               auth=BasicAuthentication("ana", cluster.password("ana")), verify=str(cluster.ca_file),
                               catalog="delta_lake", schema="silver")
    cur = conn.cursor()
    cur.execute(sql)
    names = [d[0] for d in cur.description]
    on_cluster = _rows(pa.Table.from_pylist([dict(zip(names, r)) for r in cur.fetchall()]))
    embedded = _rows(run_embedded(ws, _verified(ws, realm, "ana"), sql).table)
    assert on_cluster == embedded and len(on_cluster) > 150
    tokens = {r[0] for r in cluster.query("dana", "SELECT customer_id FROM customers")}  # no mask for dana
    assert not tokens & {r[0] for r in on_cluster}  # the analyst's customer_id is masked on both engines


@pytest.mark.slow
def test_a_row_filtered_role_sees_only_its_rows(lake):
    _, cluster = lake
    sql = "SELECT count(*) FILTER (WHERE region = 'restricted'), count(*) FROM customers"
    [[restricted, everyone]] = cluster.query("dana", sql)
    assert restricted > 0  # the generated data has some, or the filter proves nothing
    assert cluster.query("ana", sql) == [[0, everyone - restricted]]  # row_filter: region <> 'restricted'


@pytest.mark.slow
def test_a_stranger_to_the_ca_a_wrong_password_and_plain_http_get_nothing(lake):
    import requests

    _, cluster = lake
    session = requests.Session()
    session.trust_env = False
    statement = cluster.url + "/v1/statement"
    ok = session.post(statement, data="SELECT 1", headers={"X-Trino-User": "ana"}, verify=str(cluster.ca_file),
                      auth=("ana", cluster.password("ana")), timeout=30)
    assert ok.status_code == 200
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        session.get(cluster.url + "/v1/info", verify=True, timeout=10)  # the system's CAs do not include ours
    for auth in (("ana", "not-" + cluster.password("ana")), ("ana", cluster.password("dana")), None):
        r = session.post(statement, data="SELECT 1", headers={"X-Trino-User": "ana"}, verify=str(cluster.ca_file),
                         auth=auth, timeout=30)
        assert r.status_code == 401, auth and auth[0]
    for node in cluster.nodes:  # no node speaks plain HTTP: not on its port, and no HTTP port is open
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(f"http://127.0.0.1:{node.port}/v1/info", timeout=10)


@pytest.mark.slow
def test_no_secret_is_in_a_file_a_log_or_a_process_argument(lake, objectstore):
    import subprocess

    ws, cluster = lake
    secret = Path(f"/proc/{cluster.procs['worker-1'].pid}/environ").read_bytes().split(b"\0")
    shared = next(v.split(b"=", 1)[1] for v in secret if v.startswith(b"TRINO_SHARED_SECRET="))
    assert len(shared) > 60  # it reaches the nodes through their environment
    secrets = [shared, cluster.password("ana").encode(), cluster.password("dana").encode(),
               cluster.password("lakewarden").encode(), objectstore.secret_key.encode()]
    private = []
    for p in sorted(ws.config.base_dir.rglob("*")):  # the project: config, workspace, the cluster's files and logs
        if not p.is_file():
            continue
        data = p.read_bytes()
        assert not any(s in data for s in secrets), f"a secret is written in {p}"
        if b"PRIVATE KEY" in data or p.name == "password.db":
            private.append(p.relative_to(cluster.folder).as_posix())
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert private == ["coordinator/etc/password.db", "tls/coordinator.pem"]
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, check=True).stdout
    assert all(str(cluster.folder / n.name / "etc") in ps.decode() for n in cluster.nodes)  # the nodes are listed
    assert not any(s in ps for s in secrets)


# -- the identity provider's tokens (issue #19) --------------------------------------------------
def _statement(cluster, token: str | None):
    """POST a query to the coordinator with ``token`` as bearer (or none); the response."""
    from lakehouse.trino import http_session

    headers = {"X-Trino-User": "ana"} | ({"Authorization": f"Bearer {token}"} if token is not None else {})
    return http_session(str(cluster.ca_file)).post(cluster.url + "/v1/statement", data="SELECT 1", headers=headers,
                                                    timeout=30)


@pytest.mark.slow
def test_the_coordinator_runs_with_the_realms_jwks_and_passwords_only_for_those_given_one(jwt_lake):
    _, cluster, realm, _ = jwt_lake
    assert cluster.jwt.key_file == f"{realm.issuer}/protocol/openid-connect/certs"  # from discovery, plain http on loopback
    props = _props((cluster.etc / "config.properties").read_text())
    assert props["http-server.authentication.type"] == "PASSWORD,JWT"
    users = [line.split(":", 1)[0] for line in (cluster.etc / "password.db").read_text().splitlines()]
    assert {u.split("@")[0] for u in users} == {"ana", "dana", "lakewarden"}  # (as user@role too) mel, pipeline: tokens only


@pytest.mark.slow
def test_an_analysts_token_sees_the_embedded_engines_masked_rows(jwt_lake):
    import trino
    from trino.auth import JWTAuthentication

    from lakehouse.sql import run_query as run_embedded
    from lakehouse.trino import http_session

    ws, cluster, realm, _ = jwt_lake
    token = realm.password_token("ana")
    sql = "SELECT customer_id, birth_date, zip_code, income, region FROM customers"
    conn = trino.dbapi.connect(host=cluster.host, port=cluster.port, user="ana", http_scheme="https",
                               auth=JWTAuthentication(token), http_session=http_session(str(cluster.ca_file)),
                               catalog="delta_lake", schema="silver")
    cur = conn.cursor()
    cur.execute("SELECT current_user")
    assert cur.fetchall() == [["ana"]]  # preferred_username is the principal
    cur.execute(sql)
    names = [d[0] for d in cur.description]
    on_cluster = _rows(pa.Table.from_pylist([dict(zip(names, r)) for r in cur.fetchall()]))
    embedded = _rows(run_embedded(ws, _verified(ws, realm, "ana"), sql).table)
    assert on_cluster == embedded and len(on_cluster) > 150
    assert all(r[-1] != "restricted" for r in on_cluster)  # the analyst's row filter holds too


@pytest.mark.slow
def test_no_token_an_expired_one_another_realms_and_a_forged_one_get_401(jwt_lake):
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from governance.idp import SHORT_TEST_CLIENT

    _, cluster, realm, other = jwt_lake
    good = realm.password_token("ana")
    assert _statement(cluster, good).status_code == 200  # the control: the same request with a valid token
    short = realm.password_token("ana", client_id=SHORT_TEST_CLIENT)
    claims = pyjwt.decode(good, options={"verify_signature": False})
    header = pyjwt.get_unverified_header(good)
    forged = pyjwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                          headers={"kid": header["kid"]})
    foreign = other.password_token("ana")
    assert pyjwt.decode(foreign, options={"verify_signature": False})["preferred_username"] == "ana"
    wait = pyjwt.decode(short, options={"verify_signature": False})["exp"] + 1 - time.time()
    assert wait < 8, "the short-lived client's tokens should last about five seconds"
    time.sleep(max(0.0, wait))
    for name, token in (("none", None), ("expired", short), ("other realm", foreign), ("forged", forged),
                        ("garbage", "not.a.jwt")):
        r = _statement(cluster, token)
        assert r.status_code == 401, name
        assert "Bearer" in r.headers.get("WWW-Authenticate", ""), name


@pytest.mark.slow
def test_a_valid_token_of_a_role_that_may_not_read_is_denied_by_the_rules(jwt_lake):
    from trino.exceptions import TrinoUserError

    _, cluster, realm, _ = jwt_lake
    token = realm.password_token("mel")  # ml_engineer: no query stage, so no table rule
    conn = cluster.connect("mel", token=token)
    cur = conn.cursor()
    cur.execute("SELECT current_user")
    assert cur.fetchall() == [["mel"]]  # authenticated ...
    with pytest.raises(TrinoUserError) as e:
        cur.execute("SELECT count(*) FROM customers")  # ... and denied by policy
    assert e.value.error_name == "PERMISSION_DENIED"
    assert "Cannot select from table delta_lake.silver.customers" in e.value.message


@pytest.mark.slow
def test_a_token_cannot_name_another_user(jwt_lake):
    """The token's principal is the user: asking for another (here dana's rows) is refused."""
    from trino.exceptions import TrinoUserError

    _, cluster, realm, _ = jwt_lake
    conn = cluster.connect("dana", token=realm.password_token("ana"))
    with pytest.raises(TrinoUserError) as e:
        conn.cursor().execute("SELECT count(*) FROM customers")
    assert e.value.error_name == "PERMISSION_DENIED"
    assert "impersonate" in e.value.message.lower()


@pytest.mark.slow
def test_a_token_acts_in_one_of_its_principals_roles_only(jwt_lake):
    from trino.exceptions import TrinoUserError

    _, cluster, realm, _ = jwt_lake
    token = realm.password_token("pipeline")  # data_engineer, data_scientist, ml_engineer
    sql = "SELECT count(*) FROM customers"
    assert cluster.connect("pipeline@data_engineer", token=token).cursor().execute(sql).fetchall()[0][0] > 150
    with pytest.raises(TrinoUserError) as e:
        cluster.connect("pipeline@ml_engineer", token=token).cursor().execute(sql)  # a role that may not query
    assert "Cannot select from table" in e.value.message
    with pytest.raises(TrinoUserError) as e:
        cluster.connect("pipeline@analyst", token=token).cursor().execute(sql)  # not pipeline's role
    assert "impersonate" in e.value.message.lower()


@pytest.mark.slow
def test_lakewarden_sql_on_trino_presents_the_verified_callers_token_over_https_only(jwt_lake, monkeypatch):
    """``run_query(engine="trino")`` with auth on: the verified actor's own token goes to the
    coordinator (which then names the user), never a bare name, and never over plain HTTP."""
    from governance.authn import AuthenticationError, Authenticator
    from governance.config import TrinoConfig
    from governance.gate import Actor
    from governance.tls import PlaintextRefused
    from governance.tokens import ClaimRefused
    from lakehouse.sql import run_query
    from lakehouse.trino import TrinoServer

    ws, cluster, realm, _ = jwt_lake
    https = TrinoConfig(host=cluster.host, port=cluster.port, http_scheme="https", verify=str(cluster.ca_file))
    monkeypatch.setattr(ws, "config", ws.config.model_copy(update={"trino": https}))
    ana = Authenticator.from_config(ws.config.auth, ws.policies).actor(realm.password_token("ana"))
    sql = "SELECT count(*) AS n FROM customers"
    on_trino = run_query(ws, ana, sql, engine="trino").table.to_pylist()
    assert on_trino == run_query(ws, ana, sql).table.to_pylist() and on_trino[0]["n"] > 150
    ws.audit.flush()
    last = ws.audit.query(action="sql.query", actor="ana").to_pylist()[-2]  # the Trino query, then the embedded one
    assert last["outcome"] == "ok" and '"engine":"trino"' in last["details"]

    with pytest.raises(ClaimRefused, match="not made from a name"):
        ws.actor("ana")  # the library makes no actor from a name when auth is on
    with pytest.raises(AuthenticationError, match="verified access token"):
        run_query(ws, Actor("ana", ("analyst",)), sql, engine="trino")  # code that builds one anyway: a name is not a token
    plain = TrinoConfig(host=cluster.host, port=cluster.port, http_scheme="http")
    monkeypatch.setattr(ws, "config", ws.config.model_copy(update={"trino": plain}))
    with pytest.raises(PlaintextRefused, match="Trino at .* without TLS"):
        run_query(ws, ana, sql, engine="trino")
    with pytest.raises(PlaintextRefused, match="single-node Trino"):
        TrinoServer(ws).start()  # the unauthenticated local profile does not start with auth on


@pytest.mark.slow
def test_stop_ends_every_node(lake):
    import socket

    _, cluster = lake
    pids = [p.pid for p in cluster.procs.values()]
    t0 = time.perf_counter()
    cluster.stop()
    print(f"\nstopped in {time.perf_counter() - t0:.1f}s")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    for node in cluster.nodes:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", node.port), timeout=1).close()
