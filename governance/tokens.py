"""The command line's own identity when ``auth.enabled``: ``lakewarden login``, its token cache, refresh.

With authentication on, the acting user of a ``lakewarden`` command is the user of a verified
access token, never a claim (``--as``, ``LAKEWARDEN_USER``). The token comes from the OAuth 2.0
device authorization grant (RFC 8628) of the issuer named by ``auth.issuer``:

* :func:`device_login` asks the issuer's ``device_authorization_endpoint`` (from its discovery
  document) for a user code for the public client :func:`cli_client_id` names
  (``$LAKEWARDEN_AUTH_CLIENT``, else ``auth.cli_client``, else ``lakewarden-cli``), hands the verification
  address and the code to a callback (the CLI prints them), and polls the token endpoint at the
  server's interval (``slow_down`` adds 5 s) until the user approves, denies, or the code expires
  — never longer than ``timeout`` seconds;
* :class:`TokenCache` keeps the tokens of one user for one workspace in
  ``~/.cache/lakewarden/tokens/<workspace id>.json``: the folder 0700, the file 0600 (written to a
  temporary file of that mode, then renamed), refused when others may read it;
* :class:`CliIdentity` turns the cache into the :class:`~governance.authn.VerifiedActor` a command
  acts as: the access token is verified (:class:`~governance.authn.Authenticator`, the configured
  ``auth.audience``, and an ``azp`` naming the CLI's client); an expired one is exchanged for a
  new one with the refresh token and the cache rewritten — under an exclusive lock beside the
  cache (:meth:`TokenCache.lock`), the cache read again once the lock is held, so that two commands
  started together spend the refresh token once; when that fails, :class:`LoginRequired` says to
  run ``lakewarden login``.

The verbs :func:`login`, :func:`logout` and :func:`acting_user` take the workspace and audit
themselves (resource ``system:auth``):

* ``auth.login`` — outcome ``ok`` with the verified user as actor; ``deny`` (denied in the
  browser, code expired, client refused, a token that does not verify here) or ``error`` (issuer
  unreachable, timed out) with actor :data:`UNVERIFIED` and ``reason``;
* ``auth.refresh`` — a command renewed the login: the renewed token's user;
* ``auth.logout`` — the cache was deleted: its token's user, verified as of the token's expiry
  (:data:`UNVERIFIED` and ``reason`` when it does not verify, e.g. offline);
* ``auth.refused`` — a cached login that does not verify when a command runs (tampered, foreign
  signature, another client, expired and not renewable): actor :data:`UNVERIFIED`, ``reason``,
  and the user the token *claims* (``claimed_user``, unverified). No login at all is not recorded.

Their details name ``issuer``, ``subject``, ``roles``, ``expires``, ``client`` and ``token_ref``:
``jti_`` + 16 hex digits of the SHA-256 of the token's ``jti`` (``tok_`` + those of the token
itself when it has none), so that the events of one token can be tied together. Never a token,
a refresh token, a device code or a user code.

Tokens are never printed, logged or passed as arguments. HTTP goes through one seam (``post``,
``fetch``) that tests may replace.

Errors::

    LakewardenError
    ├── AuthenticationError (governance.authn)
    │   └── LoginRequired       no usable token for this workspace: run `lakewarden login`
    ├── LoginError              the device flow failed: denied, expired, timed out, refused
    ├── TokenCacheBusy          another command held the cache's lock too long (renewing the login)
    └── ClaimRefused            --as / LAKEWARDEN_USER while auth.enabled

Example::

    actor, path = login(ws, on_code=lambda c: print(c.verification_uri, c.user_code))   # audited
    actor = acting_user(ws)        # VerifiedActor("mel", ("ml_engineer",)); refreshes when expired
    logout(ws)                     # the cache file's path, or None
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.authn import AuthenticationError, Authenticator, TokenVerifier, VerifiedActor
from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.audit import AuditLog
    from governance.config import AuthConfig, ProjectConfig
    from governance.policy import PolicySet
    from governance.workspace import Workspace

CLI_CLIENT = "lakewarden-cli"
CLIENT_ENV = "LAKEWARDEN_AUTH_CLIENT"  # the CLI's OAuth client id: overrides auth.cli_client
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
LOGIN_HINT = "run `lakewarden login`"
LOCK_TIMEOUT = 30.0  # seconds a command waits for another one renewing the same login
# The audit actor of an authentication that named no verified user (a failed login, a refused
# cache). Parentheses: like authn.NO_ROLE, never a user name a token's verified claims give here.
UNVERIFIED = "(unverified)"
AUTH_RESOURCE = "system:auth"


class LoginRequired(AuthenticationError):
    """No token for this workspace, or one that neither verifies nor refreshes (exit 2).

    ``token_ref`` is the refused token's reference (:func:`token_ref`) and ``claimed_user`` the user
    name it claims (unverified: for the audit log's count of failed authentications), when known."""

    def __init__(self, reason: str, message: str, *, token_ref: str | None = None,
                 claimed_user: str | None = None) -> None:
        super().__init__(reason, message)
        self.hint = LOGIN_HINT
        self.token_ref = token_ref
        self.claimed_user = claimed_user


class LoginError(LakewardenError):
    """The device flow did not end with tokens (exit 2). ``reason`` is a short code: ``denied``,
    ``expired``, ``refused`` (the issuer said no: audited as ``deny``); ``unreachable``,
    ``discovery``, ``no-device-flow``, ``timeout``, ``malformed`` (audited as ``error``); ``off``."""

    exit_code = 2
    DENIALS = frozenset({"denied", "expired", "refused"})

    def __init__(self, message: str, *, reason: str = "error", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason

    @property
    def outcome(self) -> str:
        return "deny" if self.reason in self.DENIALS else "error"


class TokenCacheBusy(LakewardenError):
    """Another command held this workspace's token-cache lock longer than the wait allowed."""

    def __init__(self, path: Path, waited: float) -> None:
        super().__init__(f"another lakewarden command has been renewing your login for more than {waited:.0f} s "
                         f"(it holds {path})", hint="try again when it has finished")
        self.path = path


def cli_client_id(auth: "AuthConfig | None" = None) -> str:
    """The CLI's OAuth client: ``$LAKEWARDEN_AUTH_CLIENT``, else ``auth.cli_client``, else ``lakewarden-cli``."""
    return os.environ.get(CLIENT_ENV) or (auth.cli_client if auth is not None else None) or CLI_CLIENT


def token_ref(token: str | None, jti: Any = None) -> str | None:
    """A short reference that ties the audit events of one token together, never the token:
    ``jti_`` + the first 16 hex digits of SHA-256(``jti``), or ``tok_`` + those of SHA-256(token)
    when there is no ``jti``. (The ``_`` keeps the digits from ever reading as a phone or card
    number to the audit's redaction.)

    >>> token_ref("a.b.c", "j1")
    'jti_08243666f926aa4e'
    """
    if isinstance(jti, str) and jti:
        return "jti_" + hashlib.sha256(jti.encode()).hexdigest()[:16]
    if not token:
        return None
    return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _unverified_claims(token: str | None) -> dict[str, Any]:
    """The token's claims read without any check: only ever to describe a refused token."""
    import jwt

    try:
        claims = jwt.decode(token or "", options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


# -- HTTP seam ----------------------------------------------------------------------------
def _post_form(url: str, form: dict[str, str], timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                 headers={"accept": "application/json",
                                          "content-type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - https, or http on loopback (config)
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"{}")
        except ValueError:
            body = {}
        return e.code, body if isinstance(body, dict) else {}


def _get_json(url: str, timeout: float = 15.0) -> Any:
    req = urllib.request.Request(url, headers={"accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - https, or http on loopback (config)
        return json.loads(r.read())


def discover(issuer: str, *, fetch: Callable[[str], Any] = _get_json) -> dict[str, Any]:
    """The issuer's OIDC discovery document; :class:`LoginError` when unreachable or of another issuer."""
    try:
        doc = fetch(f"{issuer.rstrip('/')}/.well-known/openid-configuration")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LoginError(f"cannot reach the identity provider {issuer}: {exc}", reason="unreachable") from None
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        raise LoginError(f"the discovery document of {issuer} names another issuer", reason="discovery")
    return doc


# -- tokens and their cache ------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TokenSet:
    """What the token endpoint answered, as cached. ``expires_at`` is the access token's expiry
    (seconds since the epoch, from ``expires_in``), a hint only: the token's own ``exp`` decides."""

    issuer: str
    client_id: str
    access_token: str
    refresh_token: str | None = None
    expires_at: float = 0.0

    def __repr__(self) -> str:  # never the tokens themselves
        return f"TokenSet(issuer={self.issuer!r}, client_id={self.client_id!r}, expires_at={self.expires_at})"

    @classmethod
    def from_response(cls, issuer: str, client_id: str, body: dict[str, Any], *, now: float,
                      previous_refresh: str | None = None) -> "TokenSet":
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise LoginError("the identity provider answered without an access token", reason="malformed")
        return cls(issuer=issuer, client_id=client_id, access_token=access,
                   refresh_token=body.get("refresh_token") or previous_refresh,
                   expires_at=now + float(body.get("expires_in") or 0))


def token_dir() -> Path:
    """``~/.cache/lakewarden/tokens`` of the user running the command (``HOME`` decides)."""
    return Path.home() / ".cache" / "lakewarden" / "tokens"


class TokenCache:
    """The tokens of this user for one workspace: one JSON file, 0600, in a 0700 folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_workspace(cls, config: "ProjectConfig") -> "TokenCache":
        from governance.identity import workspace_id

        return cls(token_dir() / f"{workspace_id(config)}.json")

    def load(self) -> TokenSet | None:
        """The cached tokens, ``None`` when there are none; :class:`LoginRequired` for a file others
        may read or write, or one that is not a token cache."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise LoginRequired("cache", f"the token cache {self.path} is readable by others or not yours: "
                                         "delete it (`lakewarden logout`)")
        try:
            d = json.loads(self.path.read_text())
            return TokenSet(issuer=str(d["issuer"]), client_id=str(d["client_id"]),
                            access_token=str(d["access_token"]), refresh_token=d.get("refresh_token"),
                            expires_at=float(d.get("expires_at", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            raise LoginRequired("cache", f"the token cache {self.path} cannot be read") from None

    def save(self, tokens: TokenSet) -> Path:
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        tmp = folder / f".{self.path.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(tokens), f)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path

    def delete(self) -> bool:
        """Remove the cache; ``True`` when there was one."""
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False

    @property
    def lock_path(self) -> Path:
        """The lock file beside the cache (``<workspace id>.json.lock``, 0600): it holds nothing."""
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def lock(self, *, timeout: float = LOCK_TIMEOUT, poll: float = 0.05) -> Iterator[None]:
        """Hold an exclusive ``flock`` on :attr:`lock_path` for the ``with`` block: what a command
        reads, renews and writes back inside it no other command of this user interleaves with.
        Waits at most ``timeout`` seconds, then raises :class:`TokenCacheBusy`. The lock goes with
        the process that held it (a crashed command leaves nothing to clean up); the file stays."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TokenCacheBusy(self.lock_path, timeout) from None
                    time.sleep(poll)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# -- the device flow ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DeviceCode:
    """What the user needs to approve the login in a browser (no secret: the device code stays here)."""

    verification_uri: str
    verification_uri_complete: str | None
    user_code: str
    expires_in: float
    interval: float


def device_login(
    issuer: str,
    *,
    client_id: str | None = None,
    on_code: Callable[[DeviceCode], None],
    timeout: float = 600.0,
    scope: str = "openid",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock: Callable[[], float] = time.time,
    post: Callable[[str, dict[str, str]], tuple[int, dict[str, Any]]] = _post_form,
    fetch: Callable[[str], Any] = _get_json,
) -> TokenSet:
    """Run the device authorization grant for ``client_id`` and return the tokens.

    Raises :class:`LoginError` when the issuer has no device endpoint or refuses the client, the
    user denies, the code expires, or ``timeout`` seconds pass first.
    """
    client_id = client_id or cli_client_id()
    doc = discover(issuer, fetch=fetch)
    endpoint = doc.get("device_authorization_endpoint")
    if not endpoint:
        raise LoginError(f"{issuer} offers no device authorization endpoint (RFC 8628)", reason="no-device-flow")
    try:
        code, body = post(str(endpoint), {"client_id": client_id, "scope": scope})
    except OSError as exc:
        raise LoginError(f"cannot reach {endpoint}: {exc}", reason="unreachable") from None
    if code != 200 or "device_code" not in body or "user_code" not in body:
        raise LoginError(f"{issuer} refused a device login for client {client_id}: "
                         f"{body.get('error_description') or body.get('error') or f'HTTP {code}'}", reason="refused")
    dc = DeviceCode(verification_uri=str(body.get("verification_uri") or body.get("verification_url") or ""),
                    verification_uri_complete=body.get("verification_uri_complete"), user_code=str(body["user_code"]),
                    expires_in=float(body.get("expires_in") or 600), interval=float(body.get("interval") or 5))
    on_code(dc)
    start = clock()
    deadline = start + min(timeout, dc.expires_in)
    interval = max(dc.interval, 1.0)
    form = {"grant_type": DEVICE_GRANT, "device_code": str(body["device_code"]), "client_id": client_id}
    while True:
        if clock() + interval > deadline:
            expired = dc.expires_in <= timeout
            what = "the code expired" if expired else f"no approval within {timeout:.0f} s"
            raise LoginError(f"login not completed: {what}", reason="expired" if expired else "timeout")
        sleep(interval)
        try:
            code, out = post(str(doc["token_endpoint"]), form)
        except OSError as exc:
            raise LoginError(f"cannot reach the token endpoint of {issuer}: {exc}", reason="unreachable") from None
        if code == 200:
            return TokenSet.from_response(issuer, client_id, out, now=wall_clock())
        error = out.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        if error == "access_denied":
            raise LoginError("login denied in the browser", reason="denied")
        if error == "expired_token":
            raise LoginError("login not completed: the code expired", reason="expired")
        raise LoginError(f"login refused by {issuer}: {out.get('error_description') or error or f'HTTP {code}'}",
                         reason="refused")


def refresh(tokens: TokenSet, *, now: float, client_id: str | None = None,
            post: Callable[[str, dict[str, str]], tuple[int, dict[str, Any]]] = _post_form,
            fetch: Callable[[str], Any] = _get_json) -> TokenSet:
    """New tokens for the cached refresh token, asked for as ``client_id`` (default: the cached
    tokens' client); :class:`LoginRequired` when the issuer refuses."""
    if not tokens.refresh_token:
        raise LoginRequired("expired", "your login has expired and there is no refresh token")
    client_id = client_id or tokens.client_id
    try:
        doc = discover(tokens.issuer, fetch=fetch)
        code, out = post(str(doc["token_endpoint"]), {"grant_type": "refresh_token", "client_id": client_id,
                                                      "refresh_token": tokens.refresh_token})
    except (LoginError, OSError, KeyError) as exc:
        raise LoginRequired("refresh", f"your login has expired and cannot be renewed: {exc}") from None
    if code != 200:
        why = out.get("error_description") or out.get("error") or f"HTTP {code}"
        raise LoginRequired("refresh", f"your login has expired and cannot be renewed ({why})")
    try:
        return TokenSet.from_response(tokens.issuer, client_id, out, now=now,
                                      previous_refresh=tokens.refresh_token)
    except LoginError as exc:
        raise LoginRequired("refresh", f"your login has expired and cannot be renewed: {exc.message}") from None


# -- the acting user --------------------------------------------------------------------------
def _ref_of(token: str | None) -> str | None:
    """:func:`token_ref` of a token that has not (or not yet) been verified."""
    return token_ref(token, _unverified_claims(token).get("jti"))


class CliIdentity:
    """The verified actor of the cached login for one workspace.

    Args:
        auth: the workspace's ``auth:`` configuration (issuer, audience, claims, leeway, cli_client).
        policies: the role catalog (a token's groups count as roles only when defined there).
        cache: where the tokens are.
        clock: seconds since the epoch (injectable); used for verification and refresh.
        post, fetch: the HTTP seam for the refresh.
        client_id: the CLI's OAuth client (default :func:`cli_client_id`): a token's ``azp`` must
            name it, and a refresh asks as it.
        lock_timeout: seconds to wait for another command renewing the same login.

    After :meth:`actor`, ``refreshed`` is the :func:`token_ref` of the access token this call
    replaced (``None`` when it renewed nothing: the token was valid, or another command had
    renewed it while this one waited for the lock).
    """

    def __init__(self, auth: "AuthConfig", policies: "PolicySet", cache: TokenCache, *,
                 clock: Callable[[], float] | None = None, post: Callable[..., Any] | None = None,
                 fetch: Callable[[str], Any] | None = None, client_id: str | None = None,
                 lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.auth = auth
        self.policies = policies
        self.cache = cache
        self.clock = clock or time.time
        self.client_id = client_id or cli_client_id(auth)
        self.lock_timeout = lock_timeout
        self.refreshed: str | None = None
        self._post = post or _post_form
        self._fetch = fetch or _get_json
        self._fetch_kw: dict[str, Any] = {"fetch": fetch} if fetch is not None else {}
        self.authenticator = self._authenticator(self.clock)

    def _authenticator(self, clock: Callable[[], float]) -> Authenticator:
        verifier = TokenVerifier.from_config(self.auth, clock=clock, authorized_party=self.client_id, **self._fetch_kw)
        return Authenticator(verifier, self.policies, groups_claim=self.auth.groups_claim,
                             username_claim=self.auth.username_claim)

    def refusal(self, reason: str, message: str, token: str | None) -> LoginRequired:
        """A :class:`LoginRequired` naming the refused ``token`` by reference and claimed user only."""
        claims = _unverified_claims(token)
        claimed = claims.get(self.auth.username_claim)
        return LoginRequired(reason, message, token_ref=token_ref(token, claims.get("jti")),
                             claimed_user=claimed if isinstance(claimed, str) else None)

    def _load(self) -> TokenSet:
        tokens = self.cache.load()
        if tokens is None:
            raise LoginRequired("missing", "you are not logged in to this workspace (auth.enabled is on)")
        if tokens.issuer != self.auth.issuer:
            raise self.refusal("issuer", f"your login is for {tokens.issuer}, this workspace trusts {self.auth.issuer}",
                                tokens.access_token)
        return tokens

    def _check(self, tokens: TokenSet) -> VerifiedActor | None:
        """The access token's actor; ``None`` when it has expired (and only that)."""
        try:
            return self.authenticator.actor(tokens.access_token)
        except AuthenticationError as exc:
            if exc.reason == "expired":
                return None
            raise self.refusal(exc.reason, f"your cached login does not verify: {exc.message}",
                                tokens.access_token) from None

    def actor(self) -> VerifiedActor:
        """The verified actor; refreshes (and rewrites the cache) when the access token has expired.

        The renewal runs under :meth:`TokenCache.lock`, reading the cache again once the lock is
        held: a command that waited uses what the one before it renewed, and the refresh token is
        spent once.

        Raises :class:`LoginRequired` when there is no login, it was made against another issuer,
        or its token neither verifies nor refreshes (``token_ref`` names the refused token);
        :class:`TokenCacheBusy` when another command holds the lock past ``lock_timeout``."""
        self.refreshed = None
        tokens = self._load()
        actor = self._check(tokens)
        if actor is not None:
            return actor
        with self.cache.lock(timeout=self.lock_timeout):
            current = self._load()
            if current.access_token != tokens.access_token:  # renewed by another command meanwhile
                actor = self._check(current)
                if actor is not None:
                    return actor
            try:
                fresh = refresh(current, now=self.clock(), client_id=self.client_id, post=self._post,
                                fetch=self._fetch)
            except LoginRequired as exc:
                raise self.refusal(exc.reason, exc.message, current.access_token) from None
            try:
                actor = self.authenticator.actor(fresh.access_token)
            except AuthenticationError as exc:
                raise self.refusal(exc.reason, f"the renewed login does not verify: {exc.message}",
                                    fresh.access_token) from None
            self.cache.save(fresh)
        self.refreshed = _ref_of(current.access_token)
        return actor

    def identify(self, tokens: TokenSet) -> VerifiedActor:
        """The user of ``tokens``' access token, verified as of ``min(now, its exp)``: signature,
        issuer, audience and client are checked, an expiry is not held against it (what
        :func:`logout` names in the audit log). Raises :class:`~governance.authn.AuthenticationError`."""
        exp = _unverified_claims(tokens.access_token).get("exp")
        now = self.clock()
        at = min(now, float(exp)) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else now
        return self._authenticator(lambda: at).actor(tokens.access_token)


class ClaimRefused(LakewardenError):
    """``--as`` or ``LAKEWARDEN_USER`` while ``auth.enabled``: the acting user is not a claim (exit 2)."""

    exit_code = 2


# -- the verbs: audited --------------------------------------------------------------------------
@contextlib.contextmanager
def _audit(target: "Workspace | ProjectConfig") -> Iterator["AuditLog"]:
    """The audit log of ``target``, flushed after the block. A bare configuration (the older
    ``acting_user(config, policies)`` call) opens a workspace of its own for the event."""
    from governance.config import ProjectConfig

    if isinstance(target, ProjectConfig):
        from governance.workspace import Workspace

        with Workspace(target) as ws:
            yield ws.audit
        return
    yield target.audit
    target.audit.flush()


def _record(target: "Workspace | ProjectConfig", action: str, *, actor: str, outcome: str,
            details: dict[str, Any]) -> None:
    with _audit(target) as audit:
        audit.record(action, actor=actor, outcome=outcome, resource=AUTH_RESOURCE, details=details)


def _verified_details(actor: VerifiedActor, client: str) -> dict[str, Any]:
    """Who vouched for whom, until when, in which roles; the token only as :func:`token_ref`."""
    return {"issuer": actor.issuer, "subject": actor.subject, "roles": list(actor.roles),
            "expires": int(actor.expires), "client": client, "token_ref": token_ref(actor.bearer, actor.token_id)}


def _failure_details(issuer: str | None, client: str, exc: LakewardenError) -> dict[str, Any]:
    return {"issuer": issuer, "client": client, "reason": getattr(exc, "reason", "error"),
            "token_ref": getattr(exc, "token_ref", None), "claimed_user": getattr(exc, "claimed_user", None)}


def _refuse_claim(config: "ProjectConfig", claimed: str | None, claimed_by: str) -> None:
    if claimed:
        what = f"{claimed_by}={claimed}" if claimed_by == "LAKEWARDEN_USER" else f"{claimed_by} {claimed}"
        raise ClaimRefused(f"{what} is refused: auth.enabled is on in {config.source or 'lakewarden.yaml'}, "
                           "so the acting user is the one you logged in as, never a name given on the command line "
                           "or in LAKEWARDEN_USER", hint="unset LAKEWARDEN_USER, drop --as; `lakewarden login` as the "
                                                         "user you want to act as")


def acting_user(ws: "Workspace | ProjectConfig", policies: "PolicySet | None" = None, *, claimed: str | None = None,
                claimed_by: str = "--as", clock: Callable[[], float] | None = None,
                post: Callable[..., Any] | None = None, fetch: Callable[[str], Any] | None = None) -> VerifiedActor:
    """The CLI's actor with ``auth.enabled``: the cached login's verified user, and only that.

    Args:
        ws: the workspace (its audit log records ``auth.refresh`` and ``auth.refused``). The older
            call ``acting_user(config, policies)`` works too: a workspace is then opened only to
            record such an event.
        claimed: a user name the command line or the environment asked for (``claimed_by`` says
            which, for the message): with authentication on it is refused, whoever it names.
        clock, post, fetch: as for :class:`CliIdentity`.

    Audits ``auth.refresh`` when the access token was renewed, ``auth.refused`` (outcome ``deny``,
    actor :data:`UNVERIFIED`, the reason) when the cached login does not verify or renew. No login
    at all (reason ``missing``) and a refused claim are not authentications and are not recorded.

    Raises :class:`ClaimRefused` for a claim, :class:`LoginRequired` when there is no usable login,
    :class:`TokenCacheBusy` when another command renewing it holds the lock too long.
    """
    from governance.config import ProjectConfig

    config = ws if isinstance(ws, ProjectConfig) else ws.config
    _refuse_claim(config, claimed, claimed_by)
    if policies is None:
        if isinstance(ws, ProjectConfig):
            raise TypeError("acting_user(config, policies): the policies are required with a bare configuration")
        policies = ws.policies
    ident = CliIdentity(config.auth, policies, TokenCache.for_workspace(config), clock=clock, post=post, fetch=fetch)
    try:
        actor = ident.actor()
    except LoginRequired as exc:
        if exc.reason != "missing":
            _record(ws, "auth.refused", actor=UNVERIFIED, outcome="deny",
                    details=_failure_details(config.auth.issuer, ident.client_id, exc))
        raise
    if ident.refreshed is not None:
        _record(ws, "auth.refresh", actor=actor.name, outcome="ok",
                details={**_verified_details(actor, ident.client_id), "previous_token_ref": ident.refreshed})
    return actor


def login(ws: "Workspace", *, on_code: Callable[[DeviceCode], None], timeout: float = 600.0,
          client_id: str | None = None, claimed: str | None = None, claimed_by: str = "--as",
          **kw: Any) -> tuple[VerifiedActor, Path]:
    """Log in to this workspace's issuer by the device flow, verify the token, cache it; audited.

    Args:
        ws: the workspace (``auth`` configuration, role catalog, audit log).
        on_code: shown the verification address and the user code (the CLI prints them).
        timeout: give up after this many seconds.
        client_id: the OAuth client (default :func:`cli_client_id`).
        claimed, claimed_by: a user name asked for by ``--as``/``LAKEWARDEN_USER``: refused.
        **kw: passed to :func:`device_login` (``post``, ``fetch``, ``clock``, ``sleep``,
            ``wall_clock``; ``wall_clock`` and ``fetch`` also verify the token).

    Returns the verified actor and the cache file. Records ``auth.login``: ``ok`` with the verified
    user, or ``deny``/``error`` with actor :data:`UNVERIFIED` and the reason (then nothing is
    cached) — never a token, a device code or a user code.

    Raises :class:`LoginError` when ``auth`` is off or the flow fails, :class:`LoginRequired` when
    the token the issuer gave does not verify here (e.g. it lacks ``auth.audience``, or names
    another client), :class:`ClaimRefused` for a claim.
    """
    config = ws.config
    if not config.auth.enabled or not config.auth.issuer:
        raise LoginError("auth.enabled is off in lakewarden.yaml: there is nothing to log in to "
                         "(the acting user is --as or LAKEWARDEN_USER)", reason="off")
    _refuse_claim(config, claimed, claimed_by)
    ws.audit  # noqa: B018 - opened before the flow: a workspace that cannot audit fails before the browser
    client = client_id or cli_client_id(config.auth)
    cache = TokenCache.for_workspace(config)
    ident = CliIdentity(config.auth, ws.policies, cache, clock=kw.get("wall_clock"), fetch=kw.get("fetch"),
                        client_id=client)
    try:
        tokens = device_login(config.auth.issuer, client_id=client, on_code=on_code, timeout=timeout, **kw)
        try:
            actor = ident.authenticator.actor(tokens.access_token)
        except AuthenticationError as exc:
            raise ident.refusal(exc.reason, f"the identity provider's token is not accepted here: {exc.message}",
                                tokens.access_token) from None
    except (LoginError, LoginRequired) as exc:
        outcome = exc.outcome if isinstance(exc, LoginError) else "deny"
        _record(ws, "auth.login", actor=UNVERIFIED, outcome=outcome,
                details=_failure_details(config.auth.issuer, client, exc))
        raise
    # Recorded before the token is usable: there is no login the audit log does not show.
    _record(ws, "auth.login", actor=actor.name, outcome="ok", details=_verified_details(actor, client))
    with cache.lock():
        path = cache.save(tokens)
    return actor, path


def logout(ws: "Workspace", *, clock: Callable[[], float] | None = None,
           fetch: Callable[[str], Any] | None = None) -> Path | None:
    """Delete this workspace's token cache; its path, or ``None`` when there was none.

    The file goes first (a logout never waits on the audit log, nor on the network), then
    ``auth.logout`` is recorded: actor the token's user verified as of its expiry
    (:meth:`CliIdentity.identify`), or :data:`UNVERIFIED` with the reason when that fails (offline,
    a cache that could not be read). Nothing is recorded when there was no cache.
    """
    config = ws.config
    cache = TokenCache.for_workspace(config)
    with cache.lock():
        try:
            tokens = cache.load()
        except LoginRequired:
            tokens = None  # unreadable, or others may read it: deleted all the same
        if not cache.delete():
            return None
    client = cli_client_id(config.auth)
    details: dict[str, Any] = {"issuer": tokens.issuer if tokens else None, "client": client, "reason": "cache",
                               "token_ref": _ref_of(tokens.access_token) if tokens else None}
    name = UNVERIFIED
    if tokens is not None and config.auth.issuer and tokens.issuer == config.auth.issuer:
        try:
            actor = CliIdentity(config.auth, ws.policies, cache, clock=clock, fetch=fetch,
                                client_id=client).identify(tokens)
            name, details = actor.name, _verified_details(actor, client)
        except AuthenticationError as exc:
            details["reason"] = exc.reason
    elif tokens is not None:
        details["reason"] = "issuer"
    _record(ws, "auth.logout", actor=name, outcome="ok", details=details)
    return cache.path


__all__ = ["AUTH_RESOURCE", "CLI_CLIENT", "CLIENT_ENV", "ClaimRefused", "CliIdentity", "DeviceCode", "LoginError",
           "LoginRequired", "TokenCache", "TokenCacheBusy", "TokenSet", "UNVERIFIED", "acting_user", "cli_client_id",
           "device_login", "discover", "login", "logout", "refresh", "token_dir", "token_ref"]
