"""`lakewarden login`: the device flow, the token cache, refresh, and the CLI's actor from a verified token.

First the flow's logic on a scripted issuer (fast, no server); then a real Keycloak (the session's
``keycloak`` fixture): the login is approved by driving Keycloak's device verification pages with
``requests`` as a browser would, and the command line then acts as the verified user only.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
from cli_helpers import lw_in
from cryptography.hazmat.primitives.asymmetric import rsa

from governance.tokens import (DEVICE_GRANT, ClaimRefused, CliIdentity, LoginError, LoginRequired, TokenCache,
                               TokenSet, device_login, token_ref)

REPO = Path(__file__).resolve().parents[1]
ISSUER = "https://idp.example/realms/lakewarden"
DOC = {"issuer": ISSUER, "device_authorization_endpoint": f"{ISSUER}/device", "token_endpoint": f"{ISSUER}/token",
       "jwks_uri": f"{ISSUER}/certs"}


class ScriptedIssuer:
    """The discovery document, a device endpoint, and a token endpoint answering ``answers`` in turn."""

    def __init__(self, *answers: tuple[int, dict]) -> None:
        self.answers = list(answers)
        self.posts: list[tuple[str, dict]] = []

    def fetch(self, url: str) -> dict:
        assert url == f"{ISSUER}/.well-known/openid-configuration"
        return DOC

    def post(self, url: str, form: dict) -> tuple[int, dict]:
        self.posts.append((url, dict(form)))
        if url == DOC["device_authorization_endpoint"]:
            return 200, {"device_code": "dev-secret", "user_code": "ABCD-EFGH", "verification_uri": f"{ISSUER}/device",
                         "verification_uri_complete": f"{ISSUER}/device?user_code=ABCD-EFGH", "expires_in": 60,
                         "interval": 5}
        return self.answers.pop(0)


def run_flow(idp: ScriptedIssuer, **kw):
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    shown = []
    out = device_login(ISSUER, on_code=shown.append, clock=lambda: now[0], sleep=sleep, wall_clock=lambda: 1000.0,
                       post=idp.post, fetch=idp.fetch, **kw)
    return out, shown, slept


def test_the_device_flow_polls_at_the_servers_interval_and_slows_down_when_told():
    idp = ScriptedIssuer((400, {"error": "authorization_pending"}), (400, {"error": "slow_down"}),
                         (400, {"error": "authorization_pending"}),
                         (200, {"access_token": "acc-tok-1", "refresh_token": "ref-tok-1", "expires_in": 300}))
    tokens, shown, slept = run_flow(idp)
    assert (tokens.access_token, tokens.refresh_token, tokens.expires_at, tokens.client_id) == ("acc-tok-1", "ref-tok-1", 1300.0,
                                                                                                 "lakewarden-cli")
    assert [d.user_code for d in shown] == ["ABCD-EFGH"] and "dev-secret" not in repr(shown)
    assert slept == [5, 5, 10, 10]
    assert idp.posts[1][1] == {"grant_type": DEVICE_GRANT, "device_code": "dev-secret", "client_id": "lakewarden-cli"}
    assert "acc-tok-1" not in repr(tokens) and "ref-tok-1" not in repr(tokens)


@pytest.mark.parametrize("answer,message", [
    ((400, {"error": "access_denied"}), "login denied in the browser"),
    ((400, {"error": "expired_token"}), "login not completed: the code expired"),
    ((401, {"error": "unauthorized_client", "error_description": "no device grant"}), "no device grant"),
])
def test_a_denied_or_expired_device_login_is_a_login_error(answer, message):
    with pytest.raises(LoginError, match=message):
        run_flow(ScriptedIssuer(answer))


def test_the_device_flow_gives_up_after_its_timeout():
    idp = ScriptedIssuer(*[(400, {"error": "authorization_pending"})] * 100)
    with pytest.raises(LoginError, match="no approval within 12 s"):
        run_flow(idp, timeout=12)
    assert len(idp.posts) == 1 + 2  # the device request, then polls at 5 and 10 s: none after the deadline


def test_the_cache_is_0600_in_a_0700_folder_and_refused_when_others_may_read_it(tmp_path: Path):
    cache = TokenCache(tmp_path / "home" / ".cache" / "lakewarden" / "tokens" / "wsX.json")
    t = TokenSet(issuer=ISSUER, client_id="lakewarden-cli", access_token="a.b.c", refresh_token="r", expires_at=5.0)
    path = cache.save(t)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert cache.load() == t
    os.chmod(path, 0o644)
    with pytest.raises(LoginRequired, match="readable by others"):
        cache.load()
    assert cache.delete() and not path.exists() and cache.load() is None and not cache.delete()


# -- the command line, auth on, no server -----------------------------------------------------------
def _auth_project(folder: Path, issuer: str) -> Path:
    shutil.copytree(REPO / "policies", folder / "policies")
    (folder / "lakewarden.yaml").write_text(
        "version: 1\nname: logintest\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\n"
        f"auth: {{enabled: true, issuer: '{issuer}', audience: lakewarden-predictor, leeway_seconds: 0}}\n"
        "policies: [policies/*.yaml]\n")
    return folder


@pytest.fixture
def offline(tmp_path: Path):
    """A project with auth on (an issuer that is never reached), a KEK and a home of its own."""
    from governance.keys import generate_kek_b64

    proj = _auth_project(tmp_path / "proj", "http://127.0.0.1:9/realms/lakewarden")
    return proj, {"LAKEWARDEN_KEK": generate_kek_b64(), "HOME": str(tmp_path / "home")}


GATE = ("gate", "check", "ingest", "--dataset", "customers")


def test_with_auth_on_a_claimed_user_is_refused_and_no_login_says_to_log_in(offline):
    proj, env = offline
    p = lw_in(proj, "--as", "carla", *GATE, env=env)
    assert p.returncode == 2 and "--as carla is refused: auth.enabled is on" in p.stderr
    p = lw_in(proj, *GATE, user="carla", env=env)
    assert p.returncode == 2 and "LAKEWARDEN_USER=carla is refused: auth.enabled is on" in p.stderr
    p = lw_in(proj, *GATE, env=env)
    assert p.returncode == 2 and "you are not logged in to this workspace" in p.stderr
    assert "lakewarden login" in p.stderr
    p = lw_in(proj, "logout", env=env)
    assert p.returncode == 0 and "not logged in" in p.stdout
    p = lw_in(proj, "--as", "carla", "serve", "--model", "credit@1", env=env)  # a server takes no --as either
    assert p.returncode == 2 and "--as carla is refused" in p.stderr
    p = lw_in(proj, "--as", "carla", "login", env=env)
    assert p.returncode == 2 and "--as carla is refused" in p.stderr


def test_with_auth_off_the_claim_still_decides(project: Path, tmp_path: Path):
    p = lw_in(project, "--as", "dana", *GATE, env={"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"],
                                                   "HOME": str(tmp_path / "home")})
    assert p.returncode == 0 and "ALLOW ingest by dana" in p.stdout
    p = lw_in(project, "login", env={"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"], "HOME": str(tmp_path / "home")})
    assert p.returncode == 2 and "auth.enabled is off" in p.stderr


def test_a_token_signed_by_another_key_is_refused_offline(offline, monkeypatch: pytest.MonkeyPatch):
    """A cached token claiming carla, signed by a key of our own under the issuer's key id: refused."""
    from governance.config import load_config
    from governance.policy import load_policies

    proj, env = offline
    monkeypatch.setenv("HOME", env["HOME"])
    cfg = load_config(proj / "lakewarden.yaml")
    forged = jwt.encode({"iss": cfg.auth.issuer, "aud": "lakewarden-predictor", "sub": "x", "typ": "Bearer",
                         "preferred_username": "carla", "groups": ["compliance_officer"], "exp": time.time() + 300},
                        rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                        headers={"kid": "k1"})
    published = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    keys = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(published)), "kid": "k1", "use": "sig"}]}
    cache = TokenCache.for_workspace(cfg)
    cache.save(TokenSet(issuer=cfg.auth.issuer, client_id="lakewarden-cli", access_token=forged))
    ident = CliIdentity(cfg.auth, load_policies(cfg.policy_files()), cache,
                        fetch=lambda url: {**DOC, "issuer": cfg.auth.issuer} if "well-known" in url else keys)
    with pytest.raises(LoginRequired, match="does not verify") as e:
        ident.actor()
    assert e.value.reason == "signature" and e.value.hint == "run `lakewarden login`"


# -- a real Keycloak ----------------------------------------------------------------------------------
_FORM = re.compile(r"<form[^>]*\baction=\"([^\"]+)\"[^>]*>(.*?)</form>", re.S | re.I)
_INPUT = re.compile(r"<input[^>]*>", re.I)
_ATTR = re.compile(r"(\w[\w-]*)=\"([^\"]*)\"")


def _forms(page: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(action, hidden and filled inputs, names of the submit buttons) of each form of a page."""
    out = []
    for action, body in _FORM.findall(page):
        fields, buttons = {}, []
        for tag in _INPUT.findall(body) + re.findall(r"<button[^>]*>", body, re.I):
            a = dict(_ATTR.findall(tag))
            if "name" not in a:
                continue
            if a.get("type") == "submit" or tag.lower().startswith("<button"):
                buttons.append(a["name"])
            else:
                fields[a["name"]] = html.unescape(a.get("value", ""))
        out.append((html.unescape(action), fields, buttons))
    return out


class _Browser:
    """A ``requests`` session that follows redirects itself and sends Keycloak's ``Secure`` cookies
    to http://127.0.0.1, as browsers do for loopback (``http.cookiejar`` would withhold them)."""

    def __init__(self) -> None:
        import requests

        self.s = requests.Session()

    def go(self, method: str, url: str, **kw):
        for _ in range(10):
            r = self.s.request(method, url, allow_redirects=False, timeout=30, **kw)
            for c in self.s.cookies:
                c.secure = False
            if r.status_code not in (301, 302, 303, 307, 308):
                return r
            url = _urljoin(r.url, r.headers["location"])
            method, kw = ("GET", {}) if r.status_code in (301, 302, 303) else (method, kw)
        raise AssertionError(f"too many redirects at {url}")


def _urljoin(base: str, ref: str) -> str:
    from urllib.parse import urljoin

    return urljoin(base, ref)


def approve(verification_uri_complete: str, user: str, password: str, *, accept: bool = True) -> str:
    """Do in Keycloak's pages what a person does in a browser: open the link, log in, grant. Returns
    the last page's text."""
    b = _Browser()
    page = b.go("GET", verification_uri_complete)
    for _ in range(6):
        text = page.text
        if re.search(r"device login successful|login successful|you may close", text, re.I):
            return text
        forms = _forms(text)
        if not forms:
            return text
        action, fields, buttons = forms[0]
        if "username" in fields:
            fields.update({"username": user, "password": password})
        elif "device_user_code" in fields:  # the page asking for the code (a link without it)
            code = re.search(r"user_code=([A-Z0-9-]+)", verification_uri_complete)
            fields["device_user_code"] = code.group(1) if code else ""
        elif "accept" in buttons or "cancel" in buttons:
            fields["accept" if accept else "cancel"] = "Yes" if accept else "No"
        page = b.go("POST", _urljoin(page.url, action), data=fields)
    return page.text


def _home_env(proj_env: dict[str, str], home: Path, proj: Path) -> dict[str, str]:
    return {**proj_env, "HOME": str(home), "LAKEWARDEN_CONFIG": str(proj / "lakewarden.yaml")}


@pytest.fixture(scope="module")
def kc_project(keycloak, tmp_path_factory: pytest.TempPathFactory):
    from governance.keys import generate_kek_b64

    kc, realm, other = keycloak
    d = tmp_path_factory.mktemp("login")
    proj = _auth_project(d / "proj", realm.issuer)
    return proj, {"LAKEWARDEN_KEK": generate_kek_b64()}, realm, d


def _login(proj: Path, env: dict[str, str], realm, user: str, *, accept: bool = True):
    """``lakewarden login`` in a subprocess, approved (or denied) in Keycloak's pages as ``user``."""
    p = subprocess.Popen([sys.executable, "-m", "lakewarden", "login", "--timeout", "120"], cwd=proj, text=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_")}, **env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    link = None
    deadline = time.time() + 90
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"\(or open (\S+)\)", line)
        if m:
            link = m.group(1)
            break
    assert link, ("".join(lines), p.stderr.read() if p.poll() is not None else "")
    page = {}
    t = threading.Thread(target=lambda: page.setdefault("text", approve(link, user, realm.passwords[user],
                                                                        accept=accept)))
    t.start()
    out, err = p.communicate(timeout=150)
    t.join(60)
    return p.returncode, "".join(lines) + out, err, page.get("text", "")


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def _events(proj: Path, kek: dict[str, str], action: str | None = None) -> list[dict]:
    """The project's audit events (of ``action`` when given), details parsed."""
    from governance.workspace import Workspace

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAKEWARDEN_KEK", kek["LAKEWARDEN_KEK"])
        with Workspace.open(proj / "lakewarden.yaml") as ws:
            events = ws.audit.query(action=action).to_pylist()
    return [{**e, "details": json.loads(e["details"] or "{}")} for e in events]


def _secret_free(events: list[dict], *secrets: str) -> None:
    """No field of any event holds a secret (nor a token's signature part)."""
    text = json.dumps(events, default=str)
    for s in secrets:
        assert s not in text and (s.count(".") != 2 or s.split(".")[2] not in text)


@pytest.mark.slow
def test_login_by_device_code_then_the_cli_acts_as_the_verified_user_only(kc_project):
    from governance.workspace import Workspace

    proj, kek, realm, d = kc_project
    home = d / "home-dana"
    env = _home_env(kek, home, proj)
    code, out, err, page = _login(proj, env, realm, "dana")
    assert code == 0, (out, err, page[-2000:])
    assert "To log in, open http://127.0.0.1:" in out and "logged in as dana (data_engineer)" in out
    user_code = re.search(r"enter the code (\S+)", out).group(1)
    [cache] = (home / ".cache" / "lakewarden" / "tokens").glob("ws*.json")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    cached = json.loads(cache.read_text())
    assert _claims(cached["access_token"])["azp"] == "lakewarden-cli"
    for secret in (cached["access_token"], cached["refresh_token"]):
        assert secret not in out + err and secret.split(".")[-1] not in out + err  # never printed

    p = lw_in(proj, *GATE, env=env)
    assert p.returncode == 0 and "ALLOW ingest by dana (data_engineer)" in p.stdout, p.stderr
    p = lw_in(proj, "--as", "carla", *GATE, env=env)  # logged in or not, a claim is refused
    assert p.returncode == 2 and "--as carla is refused: auth.enabled is on" in p.stderr
    p = lw_in(proj, *GATE, user="carla", env=env)
    assert p.returncode == 2 and "LAKEWARDEN_USER=carla is refused" in p.stderr

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAKEWARDEN_KEK", kek["LAKEWARDEN_KEK"])
        with Workspace.open(proj / "lakewarden.yaml") as ws:
            events = ws.audit.query().to_pylist()
    decisions = [e for e in events if e["action"] == "gate.decide"]
    assert [e["actor"] for e in decisions] == ["dana"], decisions  # the refused claims decided nothing
    assert cached["access_token"] not in json.dumps(events, default=str)
    claims = _claims(cached["access_token"])
    [ev] = [e for e in _events(proj, kek, "auth.login") if e["actor"] == "dana"]
    assert (ev["outcome"], ev["resource"]) == ("ok", "system:auth")
    assert ev["details"] == {"issuer": realm.issuer, "subject": claims["sub"], "roles": ["data_engineer"],
                             "expires": claims["exp"], "client": "lakewarden-cli",
                             "token_ref": token_ref(cached["access_token"], claims.get("jti"))}

    p = lw_in(proj, "logout", env=env)
    assert p.returncode == 0 and "logged out" in p.stdout and not cache.exists()
    p = lw_in(proj, *GATE, env=env)
    assert p.returncode == 2 and "not logged in" in p.stderr
    [out_ev] = [e for e in _events(proj, kek, "auth.logout") if e["details"].get("token_ref") == ev["details"]["token_ref"]]
    assert (out_ev["actor"], out_ev["outcome"]) == ("dana", "ok")
    _secret_free(_events(proj, kek), cached["access_token"], cached["refresh_token"], user_code)


@pytest.mark.slow
def test_a_login_denied_in_the_browser_caches_nothing(kc_project):
    proj, kek, realm, d = kc_project
    home = d / "home-denied"
    before = len(_events(proj, kek, "auth.login"))
    code, out, err, page = _login(proj, _home_env(kek, home, proj), realm, "ana", accept=False)
    assert code == 2 and "login denied in the browser" in err, (out, err, page[-1500:])
    assert not list((home / ".cache" / "lakewarden").glob("tokens/*.json"))
    [ev] = _events(proj, kek, "auth.login")[before:]
    assert (ev["actor"], ev["outcome"], ev["details"]["reason"]) == ("(unverified)", "deny", "denied")
    _secret_free([ev], re.search(r"enter the code (\S+)", out).group(1))


def _password_tokens(realm, user: str, client_id: str) -> dict:
    import requests

    r = requests.post(f"{realm.issuer}/protocol/openid-connect/token", timeout=30, data={
        "grant_type": "password", "client_id": client_id, "scope": "openid", "username": user,
        "password": realm.passwords[user]})
    assert r.status_code == 200, r.text
    return r.json()


def _seed(proj: Path, home: Path, tokens: TokenSet) -> Path:
    """Write ``tokens`` into the cache ``lakewarden`` finds for ``proj`` under ``home``."""
    from governance.config import load_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        return TokenCache.for_workspace(load_config(proj / "lakewarden.yaml")).save(tokens)


@pytest.mark.slow
def test_an_expired_access_token_is_refreshed_and_a_dead_refresh_says_to_log_in(kc_project):
    """Tokens of the 5-second test client (password grant: no browser) in the cache: the CLI finds
    the access token expired, renews it with the refresh token and rewrites the cache; with a
    refresh token the issuer refuses, it says to log in again."""
    proj, kek, realm, d = kc_project
    home = d / "home-refresh"
    env = {**_home_env(kek, home, proj), "LAKEWARDEN_AUTH_CLIENT": "lakewarden-test-short"}  # its tokens' azp
    body = _password_tokens(realm, "sam", "lakewarden-test-short")
    old = TokenSet.from_response(realm.issuer, "lakewarden-test-short", body, now=time.time())
    path = _seed(proj, home, old)
    time.sleep(max(0.0, _claims(old.access_token)["exp"] + 1.2 - time.time()))
    p = lw_in(proj, *GATE, env=env)
    assert "sam (data_scientist) may not run stage 'ingest'" in p.stderr, p.stderr  # decided for sam, verified
    new = json.loads(path.read_text())
    assert new["access_token"] != old.access_token and stat.S_IMODE(path.stat().st_mode) == 0o600
    [ev] = [e for e in _events(proj, kek, "auth.refresh")
            if e["details"]["previous_token_ref"] == token_ref(old.access_token, _claims(old.access_token).get("jti"))]
    assert (ev["actor"], ev["details"]["client"]) == ("sam", "lakewarden-test-short")
    assert ev["details"]["token_ref"] == token_ref(new["access_token"], _claims(new["access_token"]).get("jti"))
    _secret_free([ev], old.access_token, old.refresh_token, new["access_token"], new["refresh_token"])

    _seed(proj, home, TokenSet(issuer=realm.issuer, client_id="lakewarden-test-short",
                               access_token=old.access_token, refresh_token="not-a-refresh-token"))
    p = lw_in(proj, *GATE, env=env)
    assert p.returncode == 2 and "your login has expired and cannot be renewed" in p.stderr, p.stderr
    assert "hint: run `lakewarden login`" in p.stderr
    refused = _events(proj, kek, "auth.refused")[-1]
    assert (refused["actor"], refused["details"]["reason"], refused["details"]["claimed_user"]) == (
        "(unverified)", "refresh", "sam")


@pytest.mark.slow
def test_refresh_follows_an_injected_clock(kc_project):
    """The verifier's clock says the 5-minute access token has expired: the identity renews it (two
    seconds later in real time, so that the renewed token's expiry is past the injected now)."""
    from governance.config import load_config
    from governance.policy import load_policies

    proj, kek, realm, d = kc_project
    home = d / "home-clock"
    body = _password_tokens(realm, "mel", "lakewarden-test")
    old = TokenSet.from_response(realm.issuer, "lakewarden-test", body, now=time.time())
    path = _seed(proj, home, old)
    cfg = load_config(proj / "lakewarden.yaml")
    exp = _claims(old.access_token)["exp"]
    time.sleep(2.1)
    auth = cfg.auth.model_copy(update={"cli_client": "lakewarden-test"})  # auth.cli_client: its tokens' azp
    actor = CliIdentity(auth, load_policies(cfg.policy_files()), TokenCache(path), clock=lambda: exp + 1).actor()
    assert (actor.name, actor.roles) == ("mel", ("ml_engineer",))
    assert json.loads(path.read_text())["access_token"] != old.access_token


@pytest.mark.slow
def test_a_tampered_or_forged_cached_token_is_refused(kc_project):
    proj, kek, realm, d = kc_project
    home = d / "home-forged"
    env = {**_home_env(kek, home, proj), "LAKEWARDEN_AUTH_CLIENT": "lakewarden-test"}
    body = _password_tokens(realm, "ana", "lakewarden-test")
    tok = body["access_token"]
    head, payload, sig = tok.split(".")
    claims = {**_claims(tok), "preferred_username": "carla", "groups": ["compliance_officer"]}
    tampered = ".".join([head, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), sig])
    kid = jwt.get_unverified_header(tok)["kid"]
    forged = jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                        headers={"kid": kid})
    for bad in (tampered, forged):
        _seed(proj, home, TokenSet(issuer=realm.issuer, client_id="lakewarden-test", access_token=bad,
                                   refresh_token=body["refresh_token"]))
        p = lw_in(proj, *GATE, env=env)
        assert p.returncode == 2 and "your cached login does not verify" in p.stderr, p.stderr
        assert "carla" not in p.stdout
        ev = _events(proj, kek, "auth.refused")[-1]
        assert (ev["actor"], ev["outcome"], ev["details"]["reason"], ev["details"]["claimed_user"]) == (
            "(unverified)", "deny", "signature", "carla")
        assert ev["details"]["token_ref"] == token_ref(bad, claims.get("jti"))
        _secret_free([ev], bad, body["refresh_token"])
    # A genuine token of another client of the issuer (here the test client) is not the CLI's.
    _seed(proj, home, TokenSet(issuer=realm.issuer, client_id="lakewarden-cli", access_token=tok,
                               refresh_token=body["refresh_token"]))
    p = lw_in(proj, *GATE, env={k: v for k, v in env.items() if k != "LAKEWARDEN_AUTH_CLIENT"})
    assert p.returncode == 2 and "issued to another client" in p.stderr, p.stderr
    ev = _events(proj, kek, "auth.refused")[-1]
    assert (ev["details"]["reason"], ev["details"]["claimed_user"]) == ("client", "ana")


def test_claim_refused_is_a_user_error():
    assert ClaimRefused.exit_code == 2 and LoginRequired("missing", "x").exit_code == 2
