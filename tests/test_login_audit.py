"""`lakewarden login` audited (issue #19): auth.login / auth.logout / auth.refresh / auth.refused events
that name the token only by reference; the lock that makes two commands spend a refresh token once;
the CLI token's authorized party (``azp``); ``auth.cli_client``.

Fast: tokens minted with local keys (tests/test_authn.py's helpers), a scripted issuer; the lock test
runs two real ``lakewarden`` processes against a small local issuer that counts its token requests.
The device flow through a real Keycloak is in tests/test_login.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from test_authn import AUD, ISSUER, KEY, NOW, OTHER_KEY, FakeIdP, mint
from test_login import _auth_project

from governance.authn import AuthenticationError, TokenVerifier
from governance.tokens import (UNVERIFIED, LoginError, LoginRequired, TokenCache, TokenCacheBusy,
                               TokenSet, acting_user, cli_client_id, login, logout, token_ref)

DEVICE = {"device_authorization_endpoint": f"{ISSUER}/device", "token_endpoint": f"{ISSUER}/token"}
GATE = ("gate", "check", "ingest", "--dataset", "customers")


def cli_token(**claims) -> str:
    """An access token of the CLI's client for mel (ml_engineer), valid at NOW."""
    return mint(**{"azp": "lakewarden-cli", **claims})


class Issuer:
    """ISSUER's discovery (with device and token endpoints) and keys, a device endpoint, and a token
    endpoint answering ``answers`` in turn; every request kept."""

    def __init__(self, *answers: tuple[int, dict]) -> None:
        self.keys = FakeIdP((KEY, "k1"))
        self.answers = list(answers)
        self.posts: list[tuple[str, dict]] = []

    def fetch(self, url: str) -> dict:
        doc = self.keys(url)
        return {**doc, **DEVICE} if url.endswith("openid-configuration") else doc

    def post(self, url: str, form: dict) -> tuple[int, dict]:
        self.posts.append((url, dict(form)))
        if url == DEVICE["device_authorization_endpoint"]:
            return 200, {"device_code": "dev-code-secret-1", "user_code": "WXYZ-QRST", "expires_in": 60, "interval": 5,
                         "verification_uri": f"{ISSUER}/device",
                         "verification_uri_complete": f"{ISSUER}/device?user_code=WXYZ-QRST"}
        return self.answers.pop(0)


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A workspace with auth on for ISSUER, a KEK, and a home (token cache) of its own."""
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace

    proj = _auth_project(tmp_path / "proj", ISSUER)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAKEWARDEN_AUTH_CLIENT", raising=False)
    w = Workspace.open(proj / "lakewarden.yaml")
    yield w
    w.close()


def run_login(ws, idp: Issuer, **kw):
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    return login(ws, on_code=lambda dc: None, clock=lambda: now[0], sleep=sleep, wall_clock=lambda: NOW,
                 post=idp.post, fetch=idp.fetch, **kw)


def auth_events(ws) -> list[dict]:
    ws.audit.flush()
    return [e for e in ws.audit.query().to_pylist() if e["action"].startswith("auth.")]


def details(e: dict) -> dict:
    return json.loads(e["details"] or "{}")


def assert_no_secret(events: list[dict], *secrets: str) -> None:
    """No field of any event holds a secret, nor a token's signature part."""
    text = json.dumps(events, default=str)
    for s in secrets:
        assert s not in text
        if s.count(".") == 2:
            assert s.split(".")[2] not in text


# -- the verifier's authorized party -------------------------------------------------------------
def verifier(**kw) -> TokenVerifier:
    return TokenVerifier(ISSUER, audience=AUD, leeway=30, clock=lambda: NOW, fetch=FakeIdP((KEY, "k1")), **kw)


def reason(v: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as e:
        v.verify(token)
    return e.value.reason


def test_authorized_party_refuses_tokens_of_other_clients_and_none_accepts_any():
    v = verifier(authorized_party="lakewarden-cli")
    assert v.verify(cli_token())["azp"] == "lakewarden-cli"
    assert reason(v, mint(azp="grafana")) == "client"
    assert reason(v, mint()) == "client"  # no azp at all
    assert reason(v, mint(azp=["lakewarden-cli"])) == "client"  # not a string
    assert reason(v, mint(azp="grafana", exp=NOW - 3600)) == "client"  # said before "expired": not refreshed
    assert reason(v, mint(OTHER_KEY, azp="lakewarden-cli")) == "signature"  # the signature still comes first
    assert verifier(authorized_party=("a", "grafana")).verify(mint(azp="grafana"))["sub"] == "uuid-mel"
    assert verifier().verify(mint(azp="grafana"))["sub"] == "uuid-mel"  # None: the predictor's behaviour
    with pytest.raises(ValueError):
        verifier(authorized_party=())


def test_token_ref_is_a_short_hash_of_the_jti_else_of_the_token():
    assert token_ref("a.b.c", "j1") == token_ref("x.y.z", "j1") == "jti_08243666f926aa4e"
    assert token_ref("a.b.c").startswith("tok_") and len(token_ref("a.b.c")) == 20
    assert token_ref(None) is None


# -- login / logout / refresh / refused, audited ---------------------------------------------------
def test_a_login_is_audited_with_the_verified_user_and_never_a_secret(ws):
    access, refresh_tok = cli_token(jti="jti-login-1"), "refresh-secret-1"
    idp = Issuer((400, {"error": "authorization_pending"}),
                 (200, {"access_token": access, "refresh_token": refresh_tok, "expires_in": 300}))
    actor, path = run_login(ws, idp)
    assert (actor.name, actor.roles) == ("mel", ("ml_engineer",)) and path.exists()
    [e] = auth_events(ws)
    assert (e["action"], e["actor"], e["outcome"], e["resource"]) == ("auth.login", "mel", "ok", "system:auth")
    assert details(e) == {"issuer": ISSUER, "subject": "uuid-mel", "roles": ["ml_engineer"], "expires": int(NOW + 300),
                          "client": "lakewarden-cli", "token_ref": token_ref(access, "jti-login-1")}
    assert_no_secret([e], access, refresh_tok, "dev-code-secret-1", "WXYZ-QRST")


@pytest.mark.parametrize("answer,why,outcome", [
    ((400, {"error": "access_denied"}), "denied", "deny"),
    ((400, {"error": "expired_token"}), "expired", "deny"),
    ((400, {"error": "invalid_client"}), "refused", "deny"),
    ((200, {"access_token": mint(azp="grafana", jti="j-foreign")}), "client", "deny"),   # another application's token
    ((200, {"access_token": cli_token(aud="lakewarden-trino")}), "audience", "deny"),
    ((200, {"access_token": cli_token(key=OTHER_KEY)}), "signature", "deny"),
    ((200, {"token_type": "bearer"}), "malformed", "error"),
])
def test_a_failed_login_is_audited_with_its_reason_and_caches_nothing(ws, answer, why, outcome):
    with pytest.raises((LoginError, LoginRequired)) as e:
        run_login(ws, Issuer(answer))
    assert e.value.reason == why
    [ev] = auth_events(ws)
    assert (ev["action"], ev["actor"], ev["outcome"]) == ("auth.login", UNVERIFIED, outcome)
    d = details(ev)
    assert (d["reason"], d["issuer"], d["client"]) == (why, ISSUER, "lakewarden-cli")
    token = answer[1].get("access_token")
    assert d["token_ref"] == (token_ref(token, jwt.decode(token, options={"verify_signature": False}).get("jti"))
                              if token and why != "malformed" else None)
    assert_no_secret([ev], "dev-code-secret-1", "WXYZ-QRST", *([token] if token else []))
    assert TokenCache.for_workspace(ws.config).load() is None


def test_a_login_that_times_out_is_an_error_event(ws):
    idp = Issuer(*[(400, {"error": "authorization_pending"})] * 10)
    with pytest.raises(LoginError, match="no approval within 12 s"):
        run_login(ws, idp, timeout=12)
    [ev] = auth_events(ws)
    assert (ev["outcome"], details(ev)["reason"]) == ("error", "timeout")


def _seed(ws, access: str, refresh_tok: str | None = "refresh-secret-2") -> TokenCache:
    cache = TokenCache.for_workspace(ws.config)
    cache.save(TokenSet(issuer=ISSUER, client_id="lakewarden-cli", access_token=access, refresh_token=refresh_tok))
    return cache


def test_an_expired_login_is_renewed_once_and_audited_as_a_refresh(ws):
    old = cli_token(jti="j-old", exp=NOW - 3600, iat=NOW - 3900)
    new = cli_token(jti="j-new")
    cache = _seed(ws, old)
    idp = Issuer((200, {"access_token": new, "refresh_token": "refresh-secret-3", "expires_in": 300}))
    actor = acting_user(ws, clock=lambda: NOW, post=idp.post, fetch=idp.fetch)
    assert actor.name == "mel" and cache.load().access_token == new
    assert [f for _, f in idp.posts] == [{"grant_type": "refresh_token", "client_id": "lakewarden-cli",
                                          "refresh_token": "refresh-secret-2"}]
    assert acting_user(ws, clock=lambda: NOW, post=idp.post, fetch=idp.fetch).name == "mel"  # valid: no refresh
    [ev] = auth_events(ws)
    assert (ev["action"], ev["actor"], ev["outcome"]) == ("auth.refresh", "mel", "ok")
    assert details(ev)["token_ref"] == token_ref(new, "j-new")
    assert details(ev)["previous_token_ref"] == token_ref(old, "j-old")
    assert_no_secret([ev], old, new, "refresh-secret-2", "refresh-secret-3")


@pytest.mark.parametrize("make,why", [
    (lambda: ".".join([cli_token().split(".")[0],
                       jwt.utils.base64url_encode(json.dumps({**jwt.decode(cli_token(), options={"verify_signature": False}),
                                                              "preferred_username": "carla"}).encode()).decode(),
                       cli_token().split(".")[2]]), "signature"),                     # tampered: "carla"
    (lambda: cli_token(key=OTHER_KEY, preferred_username="carla"), "signature"),     # a foreign signature
    (lambda: mint(azp="grafana", preferred_username="carla"), "client"),             # another application's token
])
def test_a_cached_token_that_does_not_verify_is_audited_as_refused(ws, make, why):
    bad = make()
    _seed(ws, bad)
    idp = Issuer()
    with pytest.raises(LoginRequired) as e:
        acting_user(ws, clock=lambda: NOW, post=idp.post, fetch=idp.fetch)
    assert e.value.reason == why and idp.posts == []  # nothing renewed on its behalf
    [ev] = auth_events(ws)
    assert (ev["action"], ev["actor"], ev["outcome"]) == ("auth.refused", UNVERIFIED, "deny")
    d = details(ev)
    assert (d["reason"], d["claimed_user"], d["token_ref"]) == (why, "carla", token_ref(bad, "j1"))
    assert_no_secret([ev], bad, "refresh-secret-2")


def test_an_expired_login_whose_renewal_fails_is_refused_and_no_login_is_not_an_event(ws):
    _seed(ws, cli_token(exp=NOW - 3600, iat=NOW - 3900))
    idp = Issuer((400, {"error": "invalid_grant", "error_description": "Token is not active"}))
    with pytest.raises(LoginRequired, match="cannot be renewed") as e:
        acting_user(ws, clock=lambda: NOW, post=idp.post, fetch=idp.fetch)
    assert e.value.reason == "refresh"
    TokenCache.for_workspace(ws.config).delete()
    with pytest.raises(LoginRequired, match="not logged in"):
        acting_user(ws, clock=lambda: NOW, post=idp.post, fetch=idp.fetch)
    assert [(ev["action"], details(ev)["reason"]) for ev in auth_events(ws)] == [("auth.refused", "refresh")]


def test_the_older_call_with_a_configuration_still_audits(ws):
    _seed(ws, cli_token(key=OTHER_KEY))
    idp = Issuer()
    with pytest.raises(LoginRequired):
        acting_user(ws.config, ws.policies, clock=lambda: NOW, fetch=idp.fetch)
    assert [ev["action"] for ev in auth_events(ws)] == ["auth.refused"]


def test_logout_is_audited_with_the_user_of_the_token_even_expired_and_unverified_offline(ws):
    expired = cli_token(jti="j-out", exp=NOW - 3600, iat=NOW - 3900)
    cache = _seed(ws, expired)
    idp = Issuer()
    assert logout(ws, clock=lambda: NOW, fetch=idp.fetch) == cache.path and not cache.path.exists()
    assert logout(ws, clock=lambda: NOW, fetch=idp.fetch) is None  # nothing to delete: no event

    def offline(url: str):
        raise OSError("unreachable")

    _seed(ws, cli_token(jti="j-off"))
    assert logout(ws, clock=lambda: NOW, fetch=offline) is not None
    first, second = auth_events(ws)
    assert (first["action"], first["actor"], first["outcome"]) == ("auth.logout", "mel", "ok")
    assert details(first)["token_ref"] == token_ref(expired, "j-out")
    assert (second["actor"], details(second)["reason"], details(second)["token_ref"]) == (
        UNVERIFIED, "jwks", token_ref(None, "j-off"))
    assert_no_secret([first, second], expired, "refresh-secret-2")


# -- auth.cli_client ---------------------------------------------------------------------------------
def test_cli_client_comes_from_the_environment_else_the_configuration(ws, monkeypatch: pytest.MonkeyPatch):
    from governance.config import AuthConfig

    assert AuthConfig().cli_client == "lakewarden-cli" and cli_client_id(None) == "lakewarden-cli"
    auth = ws.config.auth.model_copy(update={"cli_client": "acme-cli"})
    assert cli_client_id(auth) == "acme-cli"
    monkeypatch.setenv("LAKEWARDEN_AUTH_CLIENT", "env-cli")
    assert cli_client_id(auth) == "env-cli"


def test_login_and_refresh_use_the_configured_cli_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from governance.config import load_config
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace

    proj = _auth_project(tmp_path / "proj", ISSUER)
    cfg = proj / "lakewarden.yaml"
    cfg.write_text(cfg.read_text().replace("leeway_seconds: 0}", "leeway_seconds: 0, cli_client: acme-cli}"))
    assert load_config(cfg).auth.cli_client == "acme-cli"
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAKEWARDEN_AUTH_CLIENT", raising=False)
    with Workspace.open(cfg) as w:
        idp = Issuer((200, {"access_token": mint(azp="acme-cli", exp=NOW - 3600, iat=NOW - 3900),
                            "refresh_token": "refresh-secret-4"}))
        with pytest.raises(LoginRequired):  # the flow asked as acme-cli; the token is checked, expired
            run_login(w, idp)
        assert [f["client_id"] for _, f in idp.posts] == ["acme-cli", "acme-cli"]
        cache = TokenCache.for_workspace(w.config)
        cache.save(TokenSet(issuer=ISSUER, client_id="acme-cli", access_token=mint(azp="acme-cli", exp=NOW - 3600,
                                                                                   iat=NOW - 3900),
                            refresh_token="refresh-secret-4"))
        idp = Issuer((200, {"access_token": mint(azp="acme-cli"), "expires_in": 300}))
        assert acting_user(w, clock=lambda: NOW, post=idp.post, fetch=idp.fetch).name == "mel"
        assert [f["client_id"] for _, f in idp.posts] == ["acme-cli"]
        _seed(w, cli_token())  # a token of lakewarden-cli is another client's here
        with pytest.raises(LoginRequired) as e:
            acting_user(w, clock=lambda: NOW, fetch=idp.fetch)
        assert e.value.reason == "client"


# -- the lock around refresh ---------------------------------------------------------------------------
def test_the_cache_lock_is_0600_beside_the_cache_and_bounded(tmp_path: Path):
    import stat

    cache = TokenCache(tmp_path / "tokens" / "wsX.json")
    with cache.lock():
        assert stat.S_IMODE(cache.lock_path.stat().st_mode) == 0o600 and cache.lock_path.parent == cache.path.parent
        t0 = time.monotonic()
        with pytest.raises(TokenCacheBusy, match="renewing your login") as e, cache.lock(timeout=0.3):
            pass
        assert 0.3 <= time.monotonic() - t0 < 30 and e.value.path == cache.lock_path  # gave up; did not hang
    with cache.lock(timeout=0.1):  # released
        pass


class _LocalIssuer(BaseHTTPRequestHandler):
    """An OIDC issuer on loopback: discovery, keys (fetches counted), and a token endpoint that
    counts refresh requests and takes its time, so that a second command would overlap it."""

    server: "_Server"

    def log_message(self, *a) -> None:  # quiet, and never a token in a log
        pass

    def _json(self, body: dict, code: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        s = self.server
        if self.path.endswith("/.well-known/openid-configuration"):
            return self._json({"issuer": s.issuer, "jwks_uri": f"{s.issuer}/certs", "token_endpoint": f"{s.issuer}/token"})
        with s.lock:
            s.key_fetches += 1
        jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k1", "use": "sig"}
        return self._json({"keys": [jwk]})

    def do_POST(self) -> None:  # noqa: N802
        s = self.server
        form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["content-length"])).decode()))
        with s.lock:
            s.refreshes.append(form.get("refresh_token") == s.refresh_token and form.get("client_id"))
        time.sleep(1.0)
        now = time.time()
        self._json({"access_token": s.token(now + 300, "j-renewed"), "refresh_token": "refresh-rotated",
                    "expires_in": 300})


class _Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LocalIssuer)
        self.issuer = f"http://127.0.0.1:{self.server_address[1]}/realms/lw"
        self.lock = threading.Lock()
        self.key_fetches = 0
        self.refreshes: list = []
        self.refresh_token = "refresh-secret-5"

    def token(self, exp: float, jti: str) -> str:
        return jwt.encode({"iss": self.issuer, "aud": AUD, "azp": "lakewarden-cli", "sub": "uuid-dana", "typ": "Bearer",
                           "preferred_username": "dana", "groups": ["data_engineer"], "iat": exp - 310, "exp": exp,
                           "jti": jti}, KEY, algorithm="RS256", headers={"kid": "k1"})


def test_two_commands_with_an_expired_login_spend_the_refresh_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two `lakewarden gate check` processes start while this test holds the cache's lock; both
    have verified the cached token's signature (each fetched the keys) and found it expired when
    the lock is let go: one renews it, the other reads the renewed token. One refresh request,
    one auth.refresh event, both commands decided for dana."""
    from governance.config import load_config
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace

    srv = _Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        proj = _auth_project(tmp_path / "proj", srv.issuer)
        home = tmp_path / "home"
        kek = generate_kek_b64()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_")},
               "LAKEWARDEN_KEK": kek, "HOME": str(home)}
        monkeypatch.setenv("HOME", str(home))
        cache = TokenCache.for_workspace(load_config(proj / "lakewarden.yaml"))
        expired = srv.token(time.time() - 60, "j-expired")
        cache.save(TokenSet(issuer=srv.issuer, client_id="lakewarden-cli", access_token=expired,
                            refresh_token=srv.refresh_token))
        with cache.lock():
            procs = [subprocess.Popen([sys.executable, "-m", "lakewarden", *GATE], cwd=proj, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
            deadline = time.time() + 120
            while srv.key_fetches < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
                time.sleep(0.05)
            assert srv.key_fetches == 2, [p.communicate() for p in procs]
            time.sleep(0.5)  # both are past the verification, waiting for the lock
            assert srv.refreshes == []
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and "ALLOW ingest by dana (data_engineer)" in out, (out, err)
        assert srv.refreshes == ["lakewarden-cli"]  # one request, with the cached refresh token
        renewed = cache.load()
        assert renewed.refresh_token == "refresh-rotated" and jwt.decode(
            renewed.access_token, options={"verify_signature": False})["jti"] == "j-renewed"
        monkeypatch.setenv("LAKEWARDEN_KEK", kek)
        with Workspace.open(proj / "lakewarden.yaml") as w:
            events = w.audit.query().to_pylist()
        refreshes = [e for e in events if e["action"] == "auth.refresh"]
        assert [(e["actor"], details(e)["previous_token_ref"]) for e in refreshes] == [
            ("dana", token_ref(expired, "j-expired"))]
        assert [e["actor"] for e in events if e["action"] == "gate.decide"] == ["dana", "dana"]
        assert_no_secret(events, expired, renewed.access_token, srv.refresh_token, "refresh-rotated")
    finally:
        srv.shutdown()
        srv.server_close()
