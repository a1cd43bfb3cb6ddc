"""Trino authenticates the identity provider's tokens (issue #19), rendered: the cluster profile
renders ``PASSWORD,JWT`` when ``auth`` is on, with the issuer's JWKS, issuer and Trino's own
audience. The running cluster's token tests (a coordinator and one worker accepting the session
Keycloak realm's tokens) are in tests/test_trino_cluster.py, which starts one cluster for the
password and the token tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
