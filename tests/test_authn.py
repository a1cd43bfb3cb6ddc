"""Bearer tokens: the verifier on locally minted keys (fast), then a real Keycloak and the predictor behind it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

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


# -- the predictor behind it -----------------------------------------------------------------
FEATURES = ["customer_profile:income", "customer_profile:income_log", "customer_profile:region"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, token: str | None = None) -> tuple[int, dict, dict]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


@pytest.fixture(scope="module")
def guarded(keycloak, tmp_path_factory: pytest.TempPathFactory):
    """A model trained for credit scoring, served (as mel) with auth on against the session's Keycloak."""
    import shutil

    from features.store import Features
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from training.flow import train_model
    from training.trainer import TrainOptions

    kc, realm, other = keycloak
    d = tmp_path_factory.mktemp("authserve")
    shutil.copytree(REPO / "policies", d / "policies")
    (d / "lakewarden.yaml").write_text(
        "version: 1\nname: authtest\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: AUTHN_TEST_KEK}}\n"
        f"auth: {{enabled: true, issuer: '{realm.issuer}', audience: {AUD}, leeway_seconds: 0}}\n"
        "policies: [policies/*.yaml]\n")
    os.environ["AUTHN_TEST_KEK"] = generate_kek_b64()
    res = generate(d / "landing", people=300, transactions_per_person=0, seed=4, bias=0.3)
    ws = Workspace.open(d / "lakewarden.yaml")
    ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
    build_silver(ws, ws.actor("dana"), "customers")
    fs = Features(ws)
    fs.apply(ws.actor("pipeline"))
    fs.materialize(ws.actor("pipeline"))
    out = train_model(ws, ws.actor("sam"), name="credit", features=FEATURES, label="defaulted", purpose="credit_scoring",
                      options=TrainOptions(epochs=1, target_epsilon=2.0, accountant="rdp"), mitigate=False)
    ws.audit.flush()
    port = _free_port()
    env = {**os.environ, "LAKEWARDEN_CONFIG": str(d / "lakewarden.yaml"), "LAKEWARDEN_USER": "mel"}
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(out.ref), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/credit/ready", timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the predictor did not start: " + (d / "server.log").read_text()[-2000:])
    if proc.poll() is not None:
        pytest.fail("the predictor exited: " + (d / "server.log").read_text()[-2000:])
    tokens = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
    yield ws, url, out.ref, tokens, realm, other
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    ws.close()


@pytest.mark.slow
def test_the_predictor_answers_only_a_verified_caller_whose_roles_may_serve(guarded):
    from serving.model import GovernedPredictor

    ws, url, ref, tokens, realm, other = guarded
    sample = tokens[:10]
    v1 = f"{url}/v1/models/credit:predict"
    v2 = f"{url}/v2/models/credit/infer"
    body1 = {"instances": sample}
    body2 = {"inputs": [{"name": "customer_id", "shape": [len(sample)], "datatype": "BYTES", "data": sample}]}
    short = realm.password_token("mel", client_id="lakewarden-test-short")  # a 1-second token
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
            code, out, headers = post(endpoint, body, tok)
            assert code == want, (what, endpoint, code, out)
            if want == 401:
                assert headers.get("www-authenticate", headers.get("WWW-Authenticate", "")).startswith("Bearer")
    direct = GovernedPredictor(ws, ref, ws.actor("mel"), log_requests=False).score_tokens(sample)
    code, out1, _ = post(v1, body1, mel)
    assert code == 200 and np.allclose(out1["predictions"], direct, atol=1e-6)
    code, out2, _ = post(v2, body2, mel)
    assert code == 200 and np.allclose(out2["outputs"][0]["data"], direct, atol=1e-6)
    with urllib.request.urlopen(f"{url}/v2/models/credit/ready", timeout=5) as r:  # health stays open
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
