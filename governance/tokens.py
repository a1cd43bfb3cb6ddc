"""The command line's own identity when ``auth.enabled``: ``lakewarden login``, its token cache, refresh.

With authentication on, the acting user of a ``lakewarden`` command is the user of a verified
access token, never a claim (``--as``, ``LAKEWARDEN_USER``). The token comes from the OAuth 2.0
device authorization grant (RFC 8628) of the issuer named by ``auth.issuer``:

* :func:`device_login` asks the issuer's ``device_authorization_endpoint`` (from its discovery
  document) for a user code for the public client ``lakewarden-cli``, hands the verification
  address and the code to a callback (the CLI prints them), and polls the token endpoint at the
  server's interval (``slow_down`` adds 5 s) until the user approves, denies, or the code expires
  — never longer than ``timeout`` seconds;
* :class:`TokenCache` keeps the tokens of one user for one workspace in
  ``~/.cache/lakewarden/tokens/<workspace id>.json``: the folder 0700, the file 0600 (written to a
  temporary file of that mode, then renamed), refused when others may read it;
* :class:`CliIdentity` turns the cache into the :class:`~governance.authn.VerifiedActor` a command
  acts as: the access token is verified (:class:`~governance.authn.Authenticator`, the configured
  ``auth.audience``); an expired one is exchanged for a new one with the refresh token and the
  cache rewritten; when that fails, :class:`LoginRequired` says to run ``lakewarden login``.

Tokens are never printed, logged or passed as arguments. HTTP goes through one seam (``post``,
``fetch``) that tests may replace.

Errors::

    LakewardenError
    ├── AuthenticationError (governance.authn)
    │   └── LoginRequired       no usable token for this workspace: run `lakewarden login`
    ├── LoginError              the device flow failed: denied, expired, timed out, refused
    └── ClaimRefused            --as / LAKEWARDEN_USER while auth.enabled

Example::

    cache = TokenCache.for_workspace(ws.config)
    tokens = device_login(ws.config.auth.issuer, on_code=lambda c: print(c.verification_uri, c.user_code))
    cache.save(tokens)
    actor = CliIdentity(ws.config.auth, ws.policies, cache).actor()   # VerifiedActor("mel", ("ml_engineer",))
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.authn import AuthenticationError, Authenticator, TokenVerifier, VerifiedActor
from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.config import AuthConfig, ProjectConfig
    from governance.policy import PolicySet

CLI_CLIENT = "lakewarden-cli"
CLIENT_ENV = "LAKEWARDEN_AUTH_CLIENT"  # the CLI's OAuth client id, when the issuer names it otherwise
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
LOGIN_HINT = "run `lakewarden login`"


class LoginRequired(AuthenticationError):
    """No token for this workspace, or one that neither verifies nor refreshes (exit 2)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.hint = LOGIN_HINT


class LoginError(LakewardenError):
    """The device flow did not end with tokens: denied, expired, timed out, or refused (exit 2)."""

    exit_code = 2


def cli_client_id() -> str:
    """The CLI's OAuth client: ``$LAKEWARDEN_AUTH_CLIENT``, else ``lakewarden-cli``."""
    return os.environ.get(CLIENT_ENV) or CLI_CLIENT


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
        raise LoginError(f"cannot reach the identity provider {issuer}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        raise LoginError(f"the discovery document of {issuer} names another issuer")
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
            raise LoginError("the identity provider answered without an access token")
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
        raise LoginError(f"{issuer} offers no device authorization endpoint (RFC 8628)")
    try:
        code, body = post(str(endpoint), {"client_id": client_id, "scope": scope})
    except OSError as exc:
        raise LoginError(f"cannot reach {endpoint}: {exc}") from None
    if code != 200 or "device_code" not in body or "user_code" not in body:
        raise LoginError(f"{issuer} refused a device login for client {client_id}: "
                         f"{body.get('error_description') or body.get('error') or f'HTTP {code}'}")
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
            what = "the code expired" if dc.expires_in <= timeout else f"no approval within {timeout:.0f} s"
            raise LoginError(f"login not completed: {what}")
        sleep(interval)
        try:
            code, out = post(str(doc["token_endpoint"]), form)
        except OSError as exc:
            raise LoginError(f"cannot reach the token endpoint of {issuer}: {exc}") from None
        if code == 200:
            return TokenSet.from_response(issuer, client_id, out, now=wall_clock())
        error = out.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        if error == "access_denied":
            raise LoginError("login denied in the browser")
        if error == "expired_token":
            raise LoginError("login not completed: the code expired")
        raise LoginError(f"login refused by {issuer}: {out.get('error_description') or error or f'HTTP {code}'}")


def refresh(tokens: TokenSet, *, now: float, post: Callable[[str, dict[str, str]], tuple[int, dict[str, Any]]] = _post_form,
            fetch: Callable[[str], Any] = _get_json) -> TokenSet:
    """New tokens for the cached refresh token; :class:`LoginRequired` when the issuer refuses."""
    if not tokens.refresh_token:
        raise LoginRequired("expired", "your login has expired and there is no refresh token")
    try:
        doc = discover(tokens.issuer, fetch=fetch)
        code, out = post(str(doc["token_endpoint"]), {"grant_type": "refresh_token", "client_id": tokens.client_id,
                                                      "refresh_token": tokens.refresh_token})
    except (LoginError, OSError, KeyError) as exc:
        raise LoginRequired("refresh", f"your login has expired and cannot be renewed: {exc}") from None
    if code != 200:
        why = out.get("error_description") or out.get("error") or f"HTTP {code}"
        raise LoginRequired("refresh", f"your login has expired and cannot be renewed ({why})")
    try:
        return TokenSet.from_response(tokens.issuer, tokens.client_id, out, now=now,
                                      previous_refresh=tokens.refresh_token)
    except LoginError as exc:
        raise LoginRequired("refresh", f"your login has expired and cannot be renewed: {exc.message}") from None


# -- the acting user --------------------------------------------------------------------------
class CliIdentity:
    """The verified actor of the cached login for one workspace.

    Args:
        auth: the workspace's ``auth:`` configuration (issuer, audience, claims, leeway).
        policies: the role catalog (a token's groups count as roles only when defined there).
        cache: where the tokens are.
        clock: seconds since the epoch (injectable); used for verification and refresh.
        post, fetch: the HTTP seam for the refresh.
    """

    def __init__(self, auth: "AuthConfig", policies: "PolicySet", cache: TokenCache, *,
                 clock: Callable[[], float] | None = None, post: Callable[..., Any] = _post_form,
                 fetch: Callable[[str], Any] | None = None) -> None:
        self.auth = auth
        self.cache = cache
        self.clock = clock or time.time
        self._post = post
        self._fetch = fetch or _get_json
        kw: dict[str, Any] = {"clock": self.clock}
        if fetch is not None:
            kw["fetch"] = fetch
        self.authenticator = Authenticator(TokenVerifier.from_config(auth, **kw), policies,
                                           groups_claim=auth.groups_claim, username_claim=auth.username_claim)

    def actor(self) -> VerifiedActor:
        """The verified actor; refreshes (and rewrites the cache) when the access token has expired.

        Raises :class:`LoginRequired` when there is no login, it was made against another issuer,
        or its token neither verifies nor refreshes."""
        tokens = self.cache.load()
        if tokens is None:
            raise LoginRequired("missing", "you are not logged in to this workspace (auth.enabled is on)")
        if tokens.issuer != self.auth.issuer:
            raise LoginRequired("issuer", f"your login is for {tokens.issuer}, this workspace trusts {self.auth.issuer}")
        try:
            return self.authenticator.actor(tokens.access_token)
        except AuthenticationError as exc:
            if exc.reason != "expired":
                raise LoginRequired(exc.reason, f"your cached login does not verify: {exc.message}") from None
        fresh = refresh(tokens, now=self.clock(), post=self._post, fetch=self._fetch)
        try:
            actor = self.authenticator.actor(fresh.access_token)
        except AuthenticationError as exc:
            raise LoginRequired(exc.reason, f"the renewed login does not verify: {exc.message}") from None
        self.cache.save(fresh)
        return actor


class ClaimRefused(LakewardenError):
    """``--as`` or ``LAKEWARDEN_USER`` while ``auth.enabled``: the acting user is not a claim (exit 2)."""

    exit_code = 2


def acting_user(config: "ProjectConfig", policies: "PolicySet", *, claimed: str | None = None,
                claimed_by: str = "--as", clock: Callable[[], float] | None = None) -> VerifiedActor:
    """The CLI's actor with ``auth.enabled``: the cached login's verified user, and only that.

    ``claimed`` is a user name the command line or the environment asked for (``claimed_by`` says
    which, for the message): with authentication on it is refused, whoever it names.

    Raises :class:`ClaimRefused` for a claim, :class:`LoginRequired` when there is no usable login.
    """
    if claimed:
        what = f"{claimed_by}={claimed}" if claimed_by == "LAKEWARDEN_USER" else f"{claimed_by} {claimed}"
        raise ClaimRefused(f"{what} is refused: auth.enabled is on in {config.source or 'lakewarden.yaml'}, "
                           "so the acting user is the one you logged in as, never a name given on the command line "
                           "or in LAKEWARDEN_USER", hint="unset LAKEWARDEN_USER, drop --as; `lakewarden login` as the "
                                                         "user you want to act as")
    return CliIdentity(config.auth, policies, TokenCache.for_workspace(config), clock=clock).actor()


def login(config: "ProjectConfig", policies: "PolicySet", *, on_code: Callable[[DeviceCode], None],
          timeout: float = 600.0, client_id: str | None = None, **kw: Any) -> tuple[VerifiedActor, Path]:
    """Log in to this workspace's issuer by the device flow, verify the token, cache it.

    Returns the verified actor and the cache file. Raises :class:`LoginError` when ``auth`` is off or
    the flow fails, :class:`LoginRequired` when the token the issuer gave does not verify here
    (e.g. it lacks ``auth.audience``): nothing is cached then."""
    if not config.auth.enabled or not config.auth.issuer:
        raise LoginError("auth.enabled is off in lakewarden.yaml: there is nothing to log in to "
                         "(the acting user is --as or LAKEWARDEN_USER)")
    tokens = device_login(config.auth.issuer, client_id=client_id, on_code=on_code, timeout=timeout, **kw)
    cache = TokenCache.for_workspace(config)
    ident = CliIdentity(config.auth, policies, cache)
    try:
        actor = ident.authenticator.actor(tokens.access_token)
    except AuthenticationError as exc:
        raise LoginRequired(exc.reason, f"the identity provider's token is not accepted here: {exc.message}") from None
    return actor, cache.save(tokens)


def logout(config: "ProjectConfig") -> Path | None:
    """Delete this workspace's token cache; its path, or ``None`` when there was none."""
    cache = TokenCache.for_workspace(config)
    return cache.path if cache.delete() else None


__all__ = ["CLI_CLIENT", "CLIENT_ENV", "ClaimRefused", "CliIdentity", "DeviceCode", "LoginError", "LoginRequired", "TokenCache",
           "TokenSet", "acting_user", "cli_client_id", "device_login", "discover", "login", "logout", "refresh",
           "token_dir"]
