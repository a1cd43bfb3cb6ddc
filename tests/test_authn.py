"""Bearer tokens: the verifier on locally minted keys (fast), then a real Keycloak and the predictor behind it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from serving_helpers import approved_copy, free_port, issue_tls, start_predictor, trained_workspace

from governance.authn import NO_ROLE, AuthenticationError, Authenticator, TokenVerifier, VerifiedActor
from governance.gate import Gate, Resource
from governance.policy import load_policies

REPO = Path(__file__).resolve().parents[1]
ISSUER = "https://idp.example/realms/lakewarden"
AUD = "lakewarden-predictor"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def policies():
    return load_policies(sorted((REPO / "policies").glob("*.yaml")))


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY, OTHER_KEY = _key(), _key()


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict:
    d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**d, "kid": kid, "use": "sig", "alg": "RS256"}


class FakeIdP:
    """The discovery document and JWKS of ISSUER, counting fetches."""

    def __init__(self, *keys: tuple[rsa.RSAPrivateKey, str], issuer: str = ISSUER) -> None:
        self.keys = list(keys)
        self.issuer = issuer
        self.fetches: list[str] = []

    def __call__(self, url: str) -> dict:
        self.fetches.append(url)
        if url.endswith("/.well-known/openid-configuration"):
            return {"issuer": self.issuer, "jwks_uri": f"{ISSUER}/protocol/openid-connect/certs"}
        return {"keys": [_jwk(k, kid) for k, kid in self.keys]}


def mint(key=KEY, kid="k1", *, alg="RS256", **claims) -> str:
    body = {"iss": ISSUER, "aud": [AUD, "account"], "sub": "uuid-mel", "preferred_username": "mel",
            "groups": ["ml_engineer"], "iat": NOW - 10, "exp": NOW + 300, "typ": "Bearer", "jti": "j1", **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def verifier(idp: FakeIdP, *, now: float = NOW, **kw) -> TokenVerifier:
    return TokenVerifier(ISSUER, audience=AUD, leeway=30, clock=lambda: now, fetch=idp, **kw)


def reason(v: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as e:
        v.verify(token)
    return e.value.reason


# -- the verifier, no server --------------------------------------------------------------
def test_a_valid_token_becomes_an_actor_with_the_policy_roles_of_its_groups(policies):
    idp = FakeIdP((KEY, "k1"))
    auth = Authenticator(verifier(idp), policies)
    actor = auth.actor(mint(groups=["/ml_engineer", "analyst", "not_a_role"]))
    assert isinstance(actor, VerifiedActor)
    assert (actor.name, actor.roles, actor.issuer, actor.subject) == ("mel", ("ml_engineer", "analyst"), ISSUER, "uuid-mel")
    assert auth.from_header(f"Bearer {mint()}").roles == ("ml_engineer",)
    assert len(idp.fetches) == 2  # discovery and keys, once: the keys are cached


@pytest.mark.parametrize("token,why", [
    (lambda: mint(iss="https://evil.example/realms/lakewarden"), "issuer"),
    (lambda: mint(aud="lakewarden-trino"), "audience"),
    (lambda: mint(OTHER_KEY), "signature"),            # a key of our own, the issuer's kid and claims
    (lambda: mint(exp=NOW - 31), "expired"),            # past the 30 s leeway
    (lambda: mint(iat=NOW + 120), "not-yet-valid"),
    (lambda: mint(exp=None), "malformed"),              # no expiry: refused
    (lambda: mint(typ="ID"), "token-type"),             # an ID token is not an access token
    (lambda: mint(key="s" * 32, alg="HS256"), "malformed"),  # no algorithm confusion
    (lambda: "not.a.jwt", "malformed"),
    (lambda: jwt.encode({"iss": ISSUER}, None, algorithm="none", headers={"kid": "k1"}), "malformed"),
])
def test_tokens_that_do_not_verify_are_refused_with_a_reason(token, why):
    assert reason(verifier(FakeIdP((KEY, "k1"))), token()) == why


def test_expiry_and_leeway_follow_the_injected_clock():
    idp = FakeIdP((KEY, "k1"))
    tok = mint()
    assert verifier(idp, now=NOW + 300 + 29).verify(tok)["sub"] == "uuid-mel"  # within the leeway
    assert reason(verifier(idp, now=NOW + 300 + 31), tok) == "expired"


def test_an_unknown_key_id_fetches_the_keys_again_at_most_once_per_interval():
    idp = FakeIdP((KEY, "k1"))
    now = [NOW]
    v = TokenVerifier(ISSUER, audience=AUD, clock=lambda: now[0], fetch=idp, min_refresh=10)
    v.verify(mint())
    idp.keys.append((OTHER_KEY, "k2"))  # the issuer rotates in a new key
    assert reason(v, mint(OTHER_KEY, "k2")) == "unknown-key"  # within the interval: not fetched again
    n = len(idp.fetches)
    now[0] += 10
    assert v.verify(mint(OTHER_KEY, "k2"))["sub"] == "uuid-mel"  # an unknown kid after it: fetched again
    assert len(idp.fetches) == n + 1
    assert reason(v, mint(OTHER_KEY, "k3")) == "unknown-key" and len(idp.fetches) == n + 1


def test_a_verified_token_is_remembered_but_its_times_and_key_are_checked_every_time(monkeypatch):
    """The second use of a token skips the decoding and signature (PyJWT is not called), yet it still
    expires with the clock, and a key the issuer withdrew (seen at the next key refresh) ends it."""
    idp = FakeIdP((KEY, "k1"))
    now = [NOW]
    v = TokenVerifier(ISSUER, audience=AUD, leeway=30, clock=lambda: now[0], fetch=idp, min_refresh=10)
    tok = mint()
    assert v.verify(tok)["sub"] == "uuid-mel"
    calls = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert v.verify(tok)["sub"] == "uuid-mel" and calls == []  # remembered
    claims = v.verify(tok)
    claims["sub"] = "someone-else"  # a caller changing its copy changes nothing remembered
    assert v.verify(tok)["sub"] == "uuid-mel"
    assert reason(v, mint(OTHER_KEY)) == "signature" and len(calls) == 1  # a new token is verified in full
    now[0] = NOW + 300 + 31
    assert reason(v, tok) == "expired"  # the clock, on every call
    now[0] = NOW + 20
    idp.keys = [(OTHER_KEY, "k2")]  # the issuer withdraws k1; a token of k2 makes the verifier refresh
    assert v.verify(mint(OTHER_KEY, "k2"))["sub"] == "uuid-mel"
    assert reason(v, tok) == "unknown-key"  # the remembered token of the withdrawn key is refused


def test_a_discovery_document_naming_another_issuer_is_refused():
    assert reason(verifier(FakeIdP((KEY, "k1"), issuer="https://evil.example")), mint()) == "jwks"


def test_a_token_without_policy_roles_never_gets_the_principals_roles_of_its_name(policies):
    """`principals:` says mel is an ml_engineer; a verified token for "mel" with no policy group gets
    nothing from it: the gate denies serve by roles/stages/serve."""
    actor = Authenticator(verifier(FakeIdP((KEY, "k1"))), policies).actor(mint(groups=["staff"]))
    assert actor.roles == (NO_ROLE,)
    d = Gate(policies).decide("serve", actor, Resource.dataset("customers"), {"purpose": "credit_scoring"})
    assert not d.allowed and d.rule_ids == ("roles/stages/serve",)


def test_a_verified_actor_is_made_only_from_a_token():
    with pytest.raises(TypeError, match="only from a verified token"):
        VerifiedActor("carla", ("compliance_officer",), issuer=ISSUER, subject="x")


@pytest.mark.parametrize("header", [None, "", "Basic bWVsOnB3", "Bearer ", "bearer"])
def test_a_missing_bearer_header_is_refused(policies, header):
    with pytest.raises(AuthenticationError) as e:
        Authenticator(verifier(FakeIdP((KEY, "k1"))), policies).from_header(header)
    assert e.value.reason == "missing"


def test_the_auth_config_is_off_by_default_and_needs_https_off_loopback():
    from pydantic import ValidationError

    from governance.config import ProjectConfig

    assert ProjectConfig().auth.enabled is False
    with pytest.raises(ValidationError, match="needs auth.issuer"):
        ProjectConfig.model_validate({"auth": {"enabled": True}})
    with pytest.raises(ValidationError, match="must be https"):
        ProjectConfig.model_validate({"auth": {"enabled": True, "issuer": "http://idp.example/realms/x"}})
    ok = ProjectConfig.model_validate({"auth": {"enabled": True, "issuer": "http://127.0.0.1:8443/realms/x"}})
    assert ok.auth.groups_claim == "groups" and ok.auth.audience == AUD


# -- a real Keycloak ------------------------------------------------------------------------
def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def forge(token: str) -> str:
    """The same header (kid) and claims, signed by a key of our own."""
    kid = jwt.get_unverified_header(token)["kid"]
    return jwt.encode(_claims(token), OTHER_KEY, algorithm="RS256", headers={"kid": kid})


@pytest.mark.slow
def test_keycloak_tokens_carry_the_policy_groups_and_verify(keycloak, policies):
    kc, realm, other = keycloak
    auth = Authenticator(TokenVerifier(realm.issuer, audience=AUD), policies)
    for user, roles in policies.roles.principals.items():
        actor = auth.actor(realm.password_token(user))
        assert (actor.name, sorted(actor.roles)) == (user, sorted(roles))
        assert actor.issuer == realm.issuer
    mel = realm.password_token("mel")
    assert AUD in _claims(mel)["aud"] and _claims(mel)["groups"] == ["ml_engineer"]
    with pytest.raises(AuthenticationError) as e:
        auth.actor(other.password_token("mel"))  # another realm: another issuer, other keys
    assert e.value.reason in ("unknown-key", "issuer")
    with pytest.raises(AuthenticationError) as e:
        auth.actor(forge(mel))
    assert e.value.reason == "signature"
    later = TokenVerifier(realm.issuer, audience=AUD, leeway=0, clock=lambda: _claims(mel)["exp"] + 1)
    with pytest.raises(AuthenticationError) as e:
        later.verify(mel)
    assert e.value.reason == "expired"


@pytest.mark.slow
def test_the_realm_has_the_cli_device_client_and_no_secret_in_the_server_arguments(keycloak):
    kc, realm, _ = keycloak
    _, clients, _ = kc.admin("GET", f"/{realm.name}/clients?clientId=lakewarden-cli")
    cli = clients[0]
    assert cli["publicClient"] and cli["attributes"]["oauth2.device.authorization.grant.enabled"] == "true"
    assert not cli["directAccessGrantsEnabled"] and not cli["standardFlowEnabled"]
    args = Path(f"/proc/{kc.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert kc._admin_password not in args
    assert all(pw not in (kc.data_dir / "keycloak.log").read_text(errors="replace") for pw in realm.passwords.values())


# -- the predictor behind it, over HTTPS ------------------------------------------------------
def post(url: str, body: dict, token: str | None = None, *, context=None) -> tuple[int, dict, dict]:  # noqa: ANN001
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


@pytest.fixture(scope="module")
def guarded(keycloak, tmp_path_factory: pytest.TempPathFactory):
    """A model trained for credit scoring, served (as mel) with auth on against the session's Keycloak,
    over HTTPS with a certificate of a local CA: (ws, predictor, ref, tokens, realm, other)."""
    from lakehouse.catalog import Catalog, TableRef

    kc, realm, other = keycloak
    d = tmp_path_factory.mktemp("authserve")
    tls = issue_tls(d / "tls")
    ws, ref = trained_workspace(d, name="authtest", kek_var="AUTHN_TEST_KEK", people=300, extra_yaml=(
        f"auth: {{enabled: true, issuer: '{realm.issuer}', audience: {AUD}, leeway_seconds: 0}}\n" + tls.yaml()))
    server = start_predictor(ws.config.source, ref, tls=tls)
    tokens = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
    yield ws, server, ref, tokens, realm, other
    server.stop()
    ws.close()


@pytest.mark.slow
def test_the_predictor_answers_only_a_verified_caller_whose_roles_may_serve(guarded):
    from serving.model import GovernedPredictor

    ws, server, ref, tokens, realm, other = guarded
    url, ctx = server.url, server.context
    assert url.startswith("https://")
    sample = tokens[:10]
    v1 = f"{url}/v1/models/credit:predict"
    v2 = f"{url}/v2/models/credit/infer"
    body1 = {"instances": sample}
    body2 = {"inputs": [{"name": "customer_id", "shape": [len(sample)], "datatype": "BYTES", "data": sample}]}
    short = realm.password_token("mel", client_id="lakewarden-test-short")  # a 5-second token
    mel = realm.password_token("mel")
    time.sleep(max(0.0, _claims(short)["exp"] + 1.1 - time.time()))
    cases = {
        "no token": (None, 401),
        "expired": (short, 401),
        "another issuer": (other.password_token("mel"), 401),
        "forged signature": (forge(mel), 401),
        "analyst (no serve)": (realm.password_token("ana"), 403),
    }
    for what, (tok, want) in cases.items():
        for endpoint, body in ((v1, body1), (v2, body2)):
            code, out, headers = post(endpoint, body, tok, context=ctx)
            assert code == want, (what, endpoint, code, out)
            if want == 401:
                assert headers.get("www-authenticate", headers.get("WWW-Authenticate", "")).startswith("Bearer")
    direct = GovernedPredictor(ws, ref, ws.service_actor("mel"), log_requests=False).score_tokens(sample)
    code, out1, _ = post(v1, body1, mel, context=ctx)
    assert code == 200 and np.allclose(out1["predictions"], direct, atol=1e-6)
    code, out2, _ = post(v2, body2, mel, context=ctx)
    assert code == 200 and np.allclose(out2["outputs"][0]["data"], direct, atol=1e-6)
    with urllib.request.urlopen(f"{url}/v2/models/credit/ready", timeout=5, context=ctx) as r:  # health stays open
        assert r.status == 200

    # audited with the verified subject: the analyst's token and the gate's deny for it
    ana_sub = _claims(realm.password_token("ana"))["sub"]
    events = ws.audit.query().to_pylist()
    auth_ev = [e for e in events if e["action"] == "serve.authenticated" and e["actor"] == "ana"]
    assert auth_ev, [e["action"] for e in events][-10:]
    details = auth_ev[-1]["details"]
    details = json.loads(details) if isinstance(details, str) else details
    assert details["subject"] == ana_sub and details["issuer"] == realm.issuer and details["roles"] == ["analyst"]
    deny = [e for e in events if e["action"] == "gate.decide" and e["actor"] == "ana" and e["stage"] == "serve"]
    assert deny and deny[-1]["outcome"] == "deny" and deny[-1]["rule_ids"] == "roles/stages/serve"
    tokens_in_audit = json.dumps(events, default=str)
    assert mel not in tokens_in_audit and mel.split(".")[2] not in tokens_in_audit  # never the token itself


def _metric(text: str, reason: str) -> float:
    m = re.search(r'^lakewarden_authn_failures_total\{reason="%s"\} (\S+)$' % re.escape(reason), text, re.M)
    return float(m.group(1)) if m else 0.0


def _metrics(server) -> str:  # noqa: ANN001
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10, context=server.context) as r:
        return r.read().decode()


def _unauthenticated(ws) -> list[dict]:  # noqa: ANN001
    out = []
    for e in ws.audit.query(action="serve.unauthenticated").to_pylist():
        d = e["details"]
        out.append({**e, "details": json.loads(d) if isinstance(d, str) else d})
    return out


@pytest.mark.slow
def test_a_client_that_does_not_trust_the_ca_and_plain_http_are_refused(guarded):
    ws, server, ref, tokens, realm, other = guarded
    with pytest.raises(urllib.error.URLError) as e:  # the system's trust store knows nothing of our CA
        urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=10, context=ssl.create_default_context())
    assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
    mel = realm.password_token("mel")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # plain HTTP to the TLS port
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("POST", "/v1/models/credit:predict", body=json.dumps({"instances": tokens[:1]}),
                     headers={"content-type": "application/json", "authorization": f"Bearer {mel}"})
        conn.getresponse().read()
    conn.close()
    assert server.proc.poll() is None  # and it keeps serving
    code, _, _ = post(f"{server.url}/v1/models/credit:predict", {"instances": tokens[:1]}, mel, context=server.context)
    assert code == 200


@pytest.mark.slow
def test_failed_authentications_are_counted_by_reason_and_audited_without_the_token(guarded):
    ws, server, ref, tokens, realm, other = guarded
    v1 = f"{server.url}/v1/models/credit:predict"
    before = _metrics(server)
    forged = forge(realm.password_token("mel"))
    for tok, n in ((None, 3), ("not.a.jwt", 2), (forged, 2)):
        for _ in range(n):
            assert post(v1, {"instances": tokens[:1]}, tok, context=server.context)[0] == 401
    after = _metrics(server)
    for reason, n in (("missing", 3), ("malformed", 2), ("signature", 2)):
        assert _metric(after, reason) - _metric(before, reason) == n, reason
    assert 'lakewarden_authn_failures_total{reason="audience"} 0.0' in after  # every reason has a series
    deadline = time.time() + 30  # the server's audit buffer is written within audit.flush_interval (5 s)
    while time.time() < deadline:
        events = _unauthenticated(ws)
        if {"missing", "malformed", "signature"} <= {e["details"]["reason"] for e in events}:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no serve.unauthenticated records for every reason: {events}")
    for e in events:
        assert (e["outcome"], e["stage"], e["actor"], e["resource"]) == ("deny", "serve", "(unauthenticated)", f"model:{ref}")
        assert e["details"]["failures"] >= 1 and e["details"]["clients"] == ["127.0.0.1"], e
        assert set(e["details"]) <= {"reason", "failures", "clients", "clients_omitted", "window_s"}
    everything = json.dumps(ws.audit.query().to_pylist(), default=str)
    for part in (forged, *forged.split(".")):  # the token, its header, claims and signature: none of them
        assert part not in everything


@pytest.mark.slow
def test_a_local_deploy_serves_https_and_reports_the_https_url(guarded):
    """deploy --target local with TLS configured: the health probe and the identity check go over https,
    trusting serving.tls_ca; the URL reported and recorded is https; list and stop reach it the same way."""
    from serving.deploy import deploy, list_deployments, stop_deployments

    ws, server, ref, tokens, realm, other = guarded
    fair = approved_copy(ws, ref)
    port = free_port()
    res = deploy(ws, ws.service_actor("mel"), fair, target="local", port=port)
    try:
        assert res.url == f"https://127.0.0.1:{port}" and res.where == res.url
        code, out, _ = post(f"{res.url}/v1/models/credit:predict", {"instances": tokens[:2]}, realm.password_token("mel"),
                            context=server.context)
        assert code == 200 and len(out["predictions"]) == 2
        st = {s.deployment.port: s for s in list_deployments(ws)}[port]
        assert st.alive and st.deployment.url == res.url
        assert [s.state for s in stop_deployments(ws, ws.service_actor("mel"), str(fair))] == ["running"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(res.pid, signal.SIGTERM)
    ws.audit.flush()
    ev = [e for e in ws.audit.query(action="deploy").to_pylist() if e["resource"] == f"model:{fair}"]
    assert ev and json.loads(ev[-1]["details"])["url"] == res.url


@pytest.mark.slow
def test_zz_what_the_predictor_counted_is_audited_when_it_stops(guarded):
    """Last in the module: it stops the fixture's predictor. Coalesced failures are not lost: the stop
    records every count still open, and the records add up to the counter on /metrics."""
    ws, server, ref, tokens, realm, other = guarded
    assert post(f"{server.url}/v1/models/credit:predict", {"instances": tokens[:1]}, "x.y.z", context=server.context)[0] == 401
    counted = {r: _metric(_metrics(server), r) for r in ("missing", "malformed", "signature", "expired")}
    assert counted["malformed"] >= 1
    server.stop()
    recorded: dict[str, int] = {}
    for e in _unauthenticated(ws):
        recorded[e["details"]["reason"]] = recorded.get(e["details"]["reason"], 0) + e["details"]["failures"]
    for reason, n in counted.items():
        assert recorded.get(reason, 0) == n, (reason, recorded, counted, server.log.read_text()[-2000:])
