"""Who a request comes from, proven: OIDC bearer tokens verified against the issuer's keys.

Without authentication the acting user is a claim (``--as carla``). With ``auth.enabled`` in
lakewarden.yaml, a service (the predictor first) takes its caller only from a signed token:

* :class:`TokenVerifier` checks an RS256 JWT against the issuer's published keys (the JWKS named
  by the issuer's OIDC discovery document, or ``auth.jwks_url``), cached and fetched again when
  a token names a key id not seen yet (key rotation), at most once per ``min_refresh`` seconds.
  It requires the configured issuer, the audience, an expiry, and checks ``exp``/``nbf``/``iat``
  on an injectable clock with a small leeway. Any OIDC provider works: production points
  ``auth.issuer`` at the organisation's own; the tests use a local Keycloak (governance/idp.py).
* :class:`Authenticator` maps a verified token to a :class:`VerifiedActor`: its name is the
  token's user name (``preferred_username``), its roles are the token's groups (``groups``
  claim) that name roles of the policy catalog. Nothing else: ``principals:`` in roles.yaml are
  never consulted for a verified actor (they are what the provisioning puts into the identity
  provider), and a token naming no policy role gets the role :data:`NO_ROLE`, which grants
  nothing — never the principals' roles of a user of the same name.

Errors::

    LakewardenError
    └── AuthenticationError   no token, or one that is not valid (HTTP 401); ``reason`` is a
                              short code (missing, malformed, signature, unknown-key, issuer,
                              audience, expired, not-yet-valid, token-type, jwks; client: an
                              ``azp`` other than the one a verifier was told to accept)

Example::

    verifier = TokenVerifier("https://idp.example/realms/lakewarden", audience="lakewarden-predictor")
    actor = Authenticator(verifier, ws.policies).actor(bearer)   # VerifiedActor("mel", ("ml_engineer",))
    ws.gate.enforce(Stage.SERVE, actor, Resource.dataset("customers"), {"purpose": "credit_scoring"})
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from governance.errors import LakewardenError
from governance.gate import Actor

if TYPE_CHECKING:
    from governance.config import AuthConfig
    from governance.policy import PolicySet

ALGORITHMS = ("RS256",)
# Role names are lower_snake_case (policy.IDENT): this one can never be defined, and grants nothing.
NO_ROLE = "(none)"
_PROOF = object()  # held only by this module: the one way to make a VerifiedActor


class AuthenticationError(LakewardenError):
    """No bearer token, or one that does not verify (HTTP 401). ``reason`` is a short code."""

    exit_code = 2

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifiedActor(Actor):
    """An :class:`Actor` taken from a verified token: ``issuer`` and ``subject`` (``sub``) say who
    vouched for it. Made only by :meth:`Authenticator.actor`; constructing one elsewhere raises."""

    issuer: str = ""
    subject: str = ""
    token_id: str | None = field(default=None, compare=False)
    expires: float = field(default=0.0, compare=False)
    # The token itself, kept in memory only so that a verb can present it onward (Trino's JWT
    # authentication); never in repr, never compared, never written.
    bearer: str | None = field(default=None, repr=False, compare=False)
    _proof: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._proof is not _PROOF:
            raise TypeError("a VerifiedActor is made only from a verified token (Authenticator.actor)")


@dataclass(frozen=True, slots=True)
class ServiceActor(Actor):
    """With ``auth.enabled``: the identity a process was started with by its operator (a deployed
    predictor, a pipeline runner: ``LAKEWARDEN_USER`` in its environment, set by a Kubernetes
    manifest or ``deploy``), where nobody logs in. Its roles come from ``principals:``. Made only by
    :meth:`governance.workspace.Workspace.service_actor`; whoever controls the process's environment
    vouches for it, so in production it names a service principal (people log in)."""

    _proof: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._proof is not _PROOF:
            raise TypeError("a ServiceActor is made only by Workspace.service_actor")


def service_actor(name: str, roles: tuple[str, ...]) -> ServiceActor:
    """A :class:`ServiceActor` (for :meth:`Workspace.service_actor`, which decides when one may be made)."""
    return ServiceActor(name, roles, _proof=_PROOF)


def _fetch_json(url: str, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers={"accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - https, or http on loopback (config)
        return json.loads(r.read())


class TokenVerifier:
    """Verifies RS256 JWTs of one issuer for one audience.

    Args:
        issuer: the required ``iss``; its discovery document is ``<issuer>/.well-known/openid-configuration``.
        audience: the required ``aud`` (one of them, when the token names several).
        jwks_url: where the keys are; default: the discovery document's ``jwks_uri``.
        leeway: seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        clock: seconds since the epoch (injectable for tests); default ``time.time``.
        fetch: ``url -> parsed JSON`` (injectable for tests); default an HTTP GET.
        min_refresh: at most one key fetch per this many seconds (on ``clock``) for unknown key ids:
            a new key of the issuer is found within that time, and a flood of made-up key ids
            costs the issuer one request per interval.
        authorized_party: the OAuth client(s) a token must have been issued to (its ``azp``); a
            token naming another client, or none, is refused with reason ``client``. ``None``
            (the default, the predictor's) accepts any client: the audience decides there. The
            CLI's login passes its own client, so that a token minted for another application
            of the issuer cannot be dropped into its cache.

    Raises (from :meth:`verify`): :class:`AuthenticationError` (reasons as in the module
    docstring, plus ``client`` for an ``azp`` other than ``authorized_party``).
    """

    def __init__(
        self,
        issuer: str,
        *,
        audience: str,
        jwks_url: str | None = None,
        leeway: float = 30.0,
        clock: Callable[[], float] | None = None,
        fetch: Callable[[str], Any] | None = None,
        min_refresh: float = 10.0,
        authorized_party: str | Collection[str] | None = None,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("an issuer and an audience are required")
        if isinstance(authorized_party, str):
            authorized_party = (authorized_party,)
        self.authorized_party: frozenset[str] | None = (
            None if authorized_party is None else frozenset(authorized_party))
        if self.authorized_party is not None and not self.authorized_party:
            raise ValueError("authorized_party names no client (None accepts any)")
        self.issuer = issuer  # compared exactly with iss (some issuers end with "/")
        self.audience = audience
        self.leeway = float(leeway)
        self.clock = clock or time.time
        self.min_refresh = min_refresh
        self._fetch = fetch or _fetch_json
        self._jwks_url = jwks_url
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._lock = threading.Lock()
        # Tokens whose signature, issuer, audience, client and type verified: SHA-256 of the token ->
        # (key id, claims). A repeat skips the decoding and the signature (about 0.1 ms of PyJWT);
        # its times, and that its key is still published, are checked again on every call.
        self._verified: "OrderedDict[bytes, tuple[str, dict[str, Any]]]" = OrderedDict()
        self._verified_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: "AuthConfig", **kw: Any) -> "TokenVerifier":
        if not cfg.issuer:
            raise ValueError("auth.issuer is not set")
        return cls(cfg.issuer, audience=cfg.audience, jwks_url=cfg.jwks_url, leeway=cfg.leeway_seconds, **kw)

    # -- keys ---------------------------------------------------------------------------
    def _jwks_uri(self) -> str:
        if self._jwks_url is None:
            doc = self._fetch(f"{self.issuer.rstrip('/')}/.well-known/openid-configuration")
            if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
                raise AuthenticationError("jwks", f"the discovery document of {self.issuer} names another issuer")
            self._jwks_url = str(doc["jwks_uri"])
        return self._jwks_url

    def refresh_keys(self) -> None:
        """Fetch the issuer's signing keys now (RSA keys meant for signatures only)."""
        from jwt import PyJWK
        from jwt.exceptions import PyJWKError

        try:
            jwks = self._fetch(self._jwks_uri())
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            raise AuthenticationError("jwks", f"cannot fetch the keys of {self.issuer}: {exc}") from None
        keys: dict[str, Any] = {}
        for jwk in jwks.get("keys", []) if isinstance(jwks, dict) else []:
            if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig" or "kid" not in jwk:
                continue
            try:
                keys[jwk["kid"]] = PyJWK(jwk, algorithm=jwk.get("alg", "RS256")).key
            except PyJWKError:
                continue
        self._keys = keys
        self._fetched_at = self.clock()

    def _key(self, kid: str) -> Any:
        with self._lock:
            if kid not in self._keys:
                due = self._fetched_at is None or abs(self.clock() - self._fetched_at) >= self.min_refresh
                if due:
                    self.refresh_keys()
            key = self._keys.get(kid)
        if key is None:
            raise AuthenticationError("unknown-key", "the token is signed by a key the issuer does not publish")
        return key

    # -- tokens -------------------------------------------------------------------------
    VERIFIED_CACHE = 4096  # verified tokens remembered (least recently used dropped first)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, once its signature, issuer, audience and times are checked.

        A token verified before is not decoded again: its key must still be published (a key the
        issuer withdrew, seen at the next key refresh, ends its tokens) and its times are checked
        against the clock on every call, as for a new token."""
        if not isinstance(token, str) or not token:
            raise AuthenticationError("missing", "a bearer token is required")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        with self._verified_lock:
            hit = self._verified.get(digest)
            if hit is not None:
                self._verified.move_to_end(digest)
        if hit is not None and hit[0] in self._keys:
            claims = dict(hit[1])
            self._check_times(claims)
            return claims
        claims, kid = self._verify_new(token)
        with self._verified_lock:
            self._verified[digest] = (kid, dict(claims))
            while len(self._verified) > self.VERIFIED_CACHE:
                self._verified.popitem(last=False)
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self.clock()
        try:
            exp, nbf, iat = float(claims["exp"]), float(claims.get("nbf", 0)), float(claims.get("iat", 0))
        except (TypeError, ValueError):
            raise AuthenticationError("malformed", "the token's times are not numbers") from None
        if now > exp + self.leeway:
            raise AuthenticationError("expired", "the token has expired")
        if now + self.leeway < max(nbf, iat):
            raise AuthenticationError("not-yet-valid", "the token is not valid yet")

    def _verify_new(self, token: str) -> tuple[dict[str, Any], str]:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed", "the bearer token is not a JWT") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthenticationError("malformed", f"tokens must be signed with {', '.join(ALGORITHMS)}")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationError("malformed", "the token names no key id (kid)")
        key = self._key(kid)
        try:
            claims = jwt.decode(
                token, key, algorithms=list(ALGORITHMS), audience=self.audience, issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise AuthenticationError("signature", "the token's signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("issuer", f"the token was not issued by {self.issuer}") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("audience", f"the token is not meant for {self.audience}") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError("malformed", f"the bearer token is not valid: {exc}") from None
        # Before the times: a token of another client is refused as such even when expired, so
        # that its refresh token is never spent on its behalf.
        azp = claims.get("azp")
        if self.authorized_party is not None and (not isinstance(azp, str) or azp not in self.authorized_party):
            raise AuthenticationError("client", f"the token was issued to another client (azp {azp!r}, "
                                                f"expected {' or '.join(sorted(self.authorized_party))})")
        self._check_times(claims)
        if str(claims.get("typ", "Bearer")).lower() not in ("bearer", "at+jwt"):
            raise AuthenticationError("token-type", "only access tokens are accepted (not ID or refresh tokens)")
        return claims, kid


class Authenticator:
    """Turns a bearer token into the :class:`VerifiedActor` the gate decides for.

    Args:
        verifier: checks the token.
        policies: the role catalog; a group counts as a role only when the catalog defines it.
        groups_claim: the claim listing the caller's groups (Keycloak: a group membership mapper;
            a leading ``/`` of a full group path is dropped).
        username_claim: the claim naming the caller; ``sub`` when the token has none.
    """

    def __init__(self, verifier: TokenVerifier, policies: "PolicySet", *, groups_claim: str = "groups",
                 username_claim: str = "preferred_username") -> None:
        self.verifier = verifier
        self.policies = policies
        self.groups_claim = groups_claim
        self.username_claim = username_claim

    @classmethod
    def from_config(cls, cfg: "AuthConfig", policies: "PolicySet", **kw: Any) -> "Authenticator":
        return cls(TokenVerifier.from_config(cfg, **kw), policies, groups_claim=cfg.groups_claim,
                   username_claim=cfg.username_claim)

    def roles(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        groups = claims.get(self.groups_claim) or ()
        if isinstance(groups, str):
            groups = (groups,)
        known = self.policies.roles.roles
        out = []
        for g in groups:
            name = str(g).rsplit("/", 1)[-1]
            if name in known and name not in out:
                out.append(name)
        return tuple(out) or (NO_ROLE,)

    def actor(self, token: str) -> VerifiedActor:
        """Verify ``token`` and return its actor; :class:`AuthenticationError` when it does not verify."""
        claims = self.verifier.verify(token)
        name = claims.get(self.username_claim) or claims["sub"]
        if not isinstance(name, str) or not name.strip():
            raise AuthenticationError("malformed", "the token names no user")
        return VerifiedActor(name, self.roles(claims), issuer=str(claims["iss"]), subject=str(claims["sub"]),
                             token_id=claims.get("jti"), expires=float(claims["exp"]), bearer=token, _proof=_PROOF)

    def from_header(self, authorization: str | None) -> VerifiedActor:
        """The actor of an ``Authorization: Bearer <token>`` header value."""
        if not authorization:
            raise AuthenticationError("missing", "a bearer token is required (Authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing", "a bearer token is required (Authorization: Bearer <token>)")
        return self.actor(token.strip())


__all__ = ["ALGORITHMS", "NO_ROLE", "AuthenticationError", "Authenticator", "ServiceActor", "TokenVerifier", "VerifiedActor",
           "service_actor"]
