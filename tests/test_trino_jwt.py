"""Trino authenticates the identity provider's tokens (issue #19): the cluster profile renders
``PASSWORD,JWT`` when ``auth`` is on, and a local cluster (a coordinator and one worker over the
session's object store) accepts access tokens of the session's Keycloak realm, fetching the realm's
JWKS over plain HTTP on loopback.

Who a token names is decided by Trino (signature, issuer, audience, expiry); what that user may see
is still decided by the rules compiled from policy, with roles from the policy principals' group
file (Trino reads no groups from a token). No password or token is written in this file.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from governance.keys import generate_kek_b64

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")
ISSUER = "https://idp.example/realms/lakewarden"


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def _spec(tmp_path: Path, **kw):
    from lakehouse.trino import ClusterNode, ClusterSpec

    return ClusterSpec(
        discovery_uri="https://127.0.0.1:40001",
        coordinator=ClusterNode(name="coordinator", port=40001, data_dir=str(tmp_path / "c")),
        workers=(ClusterNode(name="worker", port=40002, data_dir=str(tmp_path / "w")),),
        storage_root="s3://lakewarden/t1", tls_pem=str(tmp_path / "c.pem"), rules_file=str(tmp_path / "r.json"),
        groups_file=str(tmp_path / "g.txt"), **kw,
    )


# -- rendering, no server ----------------------------------------------------------------------
def test_the_coordinator_renders_jwt_beside_passwords_and_workers_know_nothing_of_it(tmp_path: Path):
    from governance.workspace import Workspace
    from lakehouse.trino import JwtAuth, render_cluster

    ws = Workspace.open(REPO / "lakewarden.yaml")
    jwt = JwtAuth(issuer=ISSUER, key_file=f"{ISSUER}/protocol/openid-connect/certs")
    both = render_cluster(ws, _spec(tmp_path, password_file=str(tmp_path / "p.db"), jwt=jwt))
    coord = _props(both["coordinator/etc/config.properties"])
    assert coord["http-server.authentication.type"] == "PASSWORD,JWT"
    assert {k: v for k, v in coord.items() if k.startswith("http-server.authentication.jwt.")} == {
        "http-server.authentication.jwt.key-file": f"{ISSUER}/protocol/openid-connect/certs",
        "http-server.authentication.jwt.required-issuer": ISSUER,
        "http-server.authentication.jwt.required-audience": "lakewarden-trino",
        "http-server.authentication.jwt.principal-field": "preferred_username",
    }
    assert "coordinator/etc/password-authenticator.properties" in both
    assert not any("jwt" in text for rel, text in both.items() if rel.startswith("worker/"))
    only = render_cluster(ws, _spec(tmp_path, password_file=None, jwt=jwt))
    assert _props(only["coordinator/etc/config.properties"])["http-server.authentication.type"] == "JWT"
    assert "coordinator/etc/password-authenticator.properties" not in only
    ws.close()


def test_jwt_settings_refuse_plain_http_off_loopback_and_a_cluster_without_any_authentication(tmp_path: Path):
    from lakehouse.trino import JwtAuth

    with pytest.raises(ValueError, match="issuer must be https"):
        JwtAuth(issuer="http://idp.example/realms/x", key_file="/etc/trino/jwt.pem")
    with pytest.raises(ValueError, match="JWKS URL must be https"):
        JwtAuth(issuer=ISSUER, key_file="http://idp.example/certs")
    with pytest.raises(ValueError, match="absolute path"):
        JwtAuth(issuer=ISSUER, key_file="jwt.pem")
    JwtAuth(issuer="http://127.0.0.1:8080/realms/x", key_file="http://127.0.0.1:8080/realms/x/certs")  # loopback
    with pytest.raises(ValueError, match="needs an authentication"):
        _spec(tmp_path, password_file=None)


def test_jwt_auth_takes_the_jwks_from_discovery_and_refuses_a_document_of_another_issuer():
    from governance.config import AuthConfig
    from lakehouse.trino import TrinoError, jwt_auth

    auth = AuthConfig(enabled=True, issuer=ISSUER, username_claim="email")
    seen: list[str] = []

    def fetch(url: str) -> dict:
        seen.append(url)
        return {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/keys"}

    j = jwt_auth(auth, fetch=fetch)
    assert (j.issuer, j.key_file, j.audience, j.principal_field) == (ISSUER, f"{ISSUER}/keys", "lakewarden-trino", "email")
    assert seen == [f"{ISSUER}/.well-known/openid-configuration"]
    configured = AuthConfig(enabled=True, issuer=ISSUER, jwks_url="https://keys.example/jwks")
    assert jwt_auth(configured, fetch=lambda u: pytest.fail("fetched")).key_file == "https://keys.example/jwks"
    with pytest.raises(TrinoError, match="names issuer 'https://evil.example'"):
        jwt_auth(auth, fetch=lambda u: {"issuer": "https://evil.example", "jwks_uri": "https://evil.example/k"})
    with pytest.raises(TrinoError, match="not enabled"):
        jwt_auth(AuthConfig())


def test_the_cluster_profile_renders_jwt_when_auth_is_on(tmp_path: Path):
    """``auth:`` in lakewarden.yaml with a ``jwks_url``: rendered without asking the issuer."""
    from governance.workspace import Workspace
    from lakehouse.trino import render_profile

    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "lakewarden.yaml").write_text(
        (REPO / "lakewarden.yaml").read_text()
        + f"auth: {{enabled: true, issuer: '{ISSUER}', jwks_url: '{ISSUER}/certs', username_claim: email}}\n"
    )
    ws = Workspace.open(tmp_path / "lakewarden.yaml")
    coord = _props(render_profile(ws, "cluster")["coordinator/etc/config.properties"])
    assert coord["http-server.authentication.type"] == "PASSWORD,JWT"
    assert coord["http-server.authentication.jwt.key-file"] == f"{ISSUER}/certs"
    assert coord["http-server.authentication.jwt.principal-field"] == "email"
    assert coord["http-server.authentication.jwt.required-audience"] == "lakewarden-trino"  # not auth.audience
    ws.close()


def test_a_principal_may_act_as_itself_in_one_of_its_roles_and_as_nobody_else():
    """The impersonation rules a token's principal needs for ``user@role`` (Java regexes, full match)."""
    import re

    from governance.workspace import Workspace
    from lakehouse.trino import compile_rules

    ws = Workspace.open(REPO / "lakewarden.yaml")
    rules = compile_rules(ws, {})["impersonation"]
    ws.close()

    def may(original: str, new: str) -> bool:
        return any(re.fullmatch(r["original_user"], original) and re.fullmatch(r["new_user"], new) and r["allow"]
                   for r in rules)

    assert may("ana", "ana@analyst") and may("pipeline", "pipeline@ml_engineer")
    assert not may("ana", "ana@data_engineer") and not may("ana", "dana") and not may("ana", "dana@data_engineer")
    assert not may("anax", "anax@analyst") and not may("lakewarden", "ana")


# -- the cluster, run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake(objectstore, keycloak, tmp_path_factory: pytest.TempPathFactory):
    """A governed lake on the object store and a coordinator + 1 worker over it that accept the
    ``lakewarden`` realm's tokens (and passwords, which only Lakewarden's admin user has)."""
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
    _, realm, other = keycloak
    base = tmp_path_factory.mktemp("trino-jwt")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in objectstore.env().items():
            mp.setenv(k, v)
        mp.setenv("LAKEWARDEN_KEK", generate_kek_b64())
        mp.delenv("LAKEWARDEN_CONFIG", raising=False)
        mp.delenv("LAKEWARDEN_USER", raising=False)
        proj = base / "proj"
        shutil.copytree(REPO / "policies", proj / "policies")
        (proj / "lakewarden.yaml").write_text(
            "version: 1\nname: jwt\n"
            f"storage: {{root: 's3://lakewarden/t{uuid.uuid4().hex[:12]}'}}\n"
            "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\n"
            f"auth: {{enabled: true, issuer: '{realm.issuer}'}}\n"
            "policies: [policies/*.yaml]\n"
        )
        ws = Workspace.open(proj / "lakewarden.yaml")
        cluster = TrinoCluster(ws, workers=1, home=home, auth=ws.config.auth)
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(1) as pool:
                starting = pool.submit(cluster.start)
                res = generate(base / "landing", people=200, transactions_per_person=1, seed=13)
                dana = ws.actor("dana")
                ingest(ws, dana, "customers", [res.files["customers"]])
                build_silver(ws, dana, "customers")
            starting.result()
            up = time.perf_counter() - t0
            cluster.sync(dana)
        except BaseException:
            cluster.stop()
            ws.close()
            raise
        print(f"\ncluster with JWT active at {up:.1f}s; synced at {time.perf_counter() - t0:.1f}s")
        try:
            yield ws, cluster, realm, other
        finally:
            cluster.stop()
            ws.close()


def _rows(tbl: pa.Table) -> list[tuple]:
    norm = lambda v: None if isinstance(v, float) and math.isnan(v) else (round(v, 6) if isinstance(v, float) else v)  # noqa: E731
    return sorted((tuple(norm(v) for v in r.values()) for r in tbl.to_pylist()), key=repr)


def _statement(cluster, token: str | None):
    """POST a query to the coordinator with ``token`` as bearer (or none); the response."""
    from lakehouse.trino import http_session

    headers = {"X-Trino-User": "ana"} | ({"Authorization": f"Bearer {token}"} if token is not None else {})
    return http_session(str(cluster.ca_file)).post(cluster.url + "/v1/statement", data="SELECT 1", headers=headers,
                                                    timeout=30)


@pytest.mark.slow
def test_the_coordinator_runs_with_the_realms_jwks_and_no_analyst_password(lake):
    _, cluster, realm, _ = lake
    assert cluster.jwt.key_file == f"{realm.issuer}/protocol/openid-connect/certs"  # from discovery, plain http on loopback
    props = _props((cluster.etc / "config.properties").read_text())
    assert props["http-server.authentication.type"] == "PASSWORD,JWT"
    users = [line.split(":", 1)[0] for line in (cluster.etc / "password.db").read_text().splitlines()]
    assert users == ["lakewarden"]  # analysts have tokens, not passwords


@pytest.mark.slow
def test_an_analysts_token_sees_the_embedded_engines_masked_rows(lake):
    import trino
    from trino.auth import JWTAuthentication

    from lakehouse.sql import run_query as run_embedded
    from lakehouse.trino import http_session

    ws, cluster, realm, _ = lake
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
    embedded = _rows(run_embedded(ws, ws.actor("ana"), sql).table)
    assert on_cluster == embedded and len(on_cluster) > 150
    assert all(r[-1] != "restricted" for r in on_cluster)  # the analyst's row filter holds too


@pytest.mark.slow
def test_no_token_an_expired_one_another_realms_and_a_forged_one_get_401(lake):
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from governance.idp import SHORT_TEST_CLIENT

    _, cluster, realm, other = lake
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
    assert wait < 5, "the short-lived client's tokens should last about a second"
    time.sleep(max(0.0, wait))
    for name, token in (("none", None), ("expired", short), ("other realm", foreign), ("forged", forged),
                        ("garbage", "not.a.jwt")):
        r = _statement(cluster, token)
        assert r.status_code == 401, name
        assert "Bearer" in r.headers.get("WWW-Authenticate", ""), name


@pytest.mark.slow
def test_a_valid_token_of_a_role_that_may_not_read_is_denied_by_the_rules(lake):
    from trino.exceptions import TrinoUserError

    _, cluster, realm, _ = lake
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
def test_a_token_cannot_name_another_user(lake):
    """The token's principal is the user: asking for another (here dana's rows) is refused."""
    from trino.exceptions import TrinoUserError

    _, cluster, realm, _ = lake
    conn = cluster.connect("dana", token=realm.password_token("ana"))
    with pytest.raises(TrinoUserError) as e:
        conn.cursor().execute("SELECT count(*) FROM customers")
    assert e.value.error_name == "PERMISSION_DENIED"
    assert "impersonate" in e.value.message.lower()


@pytest.mark.slow
def test_a_token_acts_in_one_of_its_principals_roles_only(lake):
    from trino.exceptions import TrinoUserError

    _, cluster, realm, _ = lake
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
def test_lakewarden_sql_on_trino_presents_the_verified_callers_token_over_https_only(lake, monkeypatch):
    """``run_query(engine="trino")`` with auth on: the verified actor's own token goes to the
    coordinator (which then names the user), never a bare name, and never over plain HTTP."""
    from governance.authn import AuthenticationError, Authenticator
    from governance.config import TrinoConfig
    from governance.tls import PlaintextRefused
    from lakehouse.sql import run_query
    from lakehouse.trino import TrinoServer

    ws, cluster, realm, _ = lake
    https = TrinoConfig(host=cluster.host, port=cluster.port, http_scheme="https", verify=str(cluster.ca_file))
    monkeypatch.setattr(ws, "config", ws.config.model_copy(update={"trino": https}))
    ana = Authenticator.from_config(ws.config.auth, ws.policies).actor(realm.password_token("ana"))
    sql = "SELECT count(*) AS n FROM customers"
    on_trino = run_query(ws, ana, sql, engine="trino").table.to_pylist()
    assert on_trino == run_query(ws, ana, sql).table.to_pylist() and on_trino[0]["n"] > 150
    ws.audit.flush()
    last = ws.audit.query(action="sql.query", actor="ana").to_pylist()[-2]  # the Trino query, then the embedded one
    assert last["outcome"] == "ok" and '"engine":"trino"' in last["details"]

    with pytest.raises(AuthenticationError, match="verified access token"):
        run_query(ws, ws.actor("ana"), sql, engine="trino")  # a name is not a token
    plain = TrinoConfig(host=cluster.host, port=cluster.port, http_scheme="http")
    monkeypatch.setattr(ws, "config", ws.config.model_copy(update={"trino": plain}))
    with pytest.raises(PlaintextRefused, match="Trino at .* without TLS"):
        run_query(ws, ana, sql, engine="trino")
    with pytest.raises(PlaintextRefused, match="single-node Trino"):
        TrinoServer(ws).start()  # the unauthenticated local profile does not start with auth on
