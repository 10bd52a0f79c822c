"""A client of the broker service (``jitbroker.web.broker_app``), for the CLI's
``--broker URL`` mode: ``issue``, ``renew``, ``revoke`` and ``verify`` over HTTP.

The caller proves who it is with a workload identity token (an OIDC JWT),
sent as an RFC 7523 client assertion: ``IdentityToken.from_file`` reads one
from a file on every request (Kubernetes projected tokens rotate), and
``IdentityToken.github_actions`` fetches one from GitHub's
``$ACTIONS_ID_TOKEN_REQUEST_URL`` with ``&audience=``. No static secret.

- ``POST /token``: RFC 6749 client credentials, ``client_assertion_type=
  urn:ietf:params:oauth:client-assertion-type:jwt-bearer``, ``audience``,
  ``scope``, ``ttl``;
- ``POST /renew``: ``Authorization: Bearer <token>``, ``ttl``;
- ``POST /revoke``: RFC 7009 ``token=`` with the same client assertion;
- ``POST /introspect``: RFC 7662 ``token=`` with the same client assertion, for
  callers the service names in ``resource_servers``.

Errors are jitbroker's: a refusal is ``PolicyDenied`` (``access_denied``,
``invalid_scope``...), ``InvalidClient`` (the assertion was refused; at
``/introspect``, any 401 or 403, such as a caller that is not a resource
server), ``LeaseNotActive`` / ``InvalidToken`` (renewing a dead token), and
anything the client cannot reach or read is ``BrokerUnavailable``. No message quotes a
token, an assertion or a response body; a server's ``error_description`` is
shown cut short and stripped of control characters.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
import httpx

from ..errors import InvalidRequest, InvalidToken, LeaseNotActive, PolicyDenied, StoreUnavailable
from .errors import InvalidClient

__all__ = [
    "ASSERTION_TYPE",
    "BrokerUnavailable",
    "IdentityToken",
    "RemoteBroker",
    "RemoteCredential",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MAX_RESPONSE = 1 << 20  # a token response is a few KB; more is not one of ours
_MAX_IDENTITY = 64 * 1024  # an OIDC JWT is a few KB (the service refuses far less)
_DENIED = {"access_denied", "invalid_scope", "invalid_target", "unauthorized_client"}


class BrokerUnavailable(StoreUnavailable):
    """The broker service could not be reached, or did not answer as one."""


@attrs.frozen(slots=True, weakref_slot=False)
class RemoteCredential:
    """What the service issued: the token (never in ``repr``) and its lease."""

    token: str = attrs.field(repr=False)
    lease_id: str | None
    expires_at: float
    scope: str
    token_type: str = "Bearer"


class IdentityToken:
    """Where the client assertion comes from; called once per request."""

    def __init__(self, read: Callable[[], str], source: str) -> None:
        self._read = read
        #: Where it comes from, for messages (never the token itself).
        self.source = source

    def __call__(self) -> str:
        value = self._read().strip()
        if not value or len(value) > _MAX_IDENTITY or value.count(".") != 2:
            raise InvalidRequest(f"the identity token from {self.source} is not a JWT")
        return value

    def __repr__(self) -> str:
        return f"<IdentityToken from {self.source}>"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> IdentityToken:
        """Read the token from ``path`` on every request (it may be rotated)."""
        file = Path(path)

        def read() -> str:
            try:
                with open(file, "rb") as fh:
                    return fh.read(_MAX_IDENTITY + 1).decode("ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"cannot read the identity token file {file}") from exc

        return cls(read, str(file))

    @classmethod
    def github_actions(
        cls, audience: str, environ: Mapping[str, str] | None = None, *, timeout: float = 10.0
    ) -> IdentityToken:
        """Fetch a GitHub Actions OIDC token for ``audience`` (the job needs
        ``permissions: id-token: write``), freshly for each request."""
        env = os.environ if environ is None else environ

        def read() -> str:  # the variables are read when a request needs them
            url = env.get("ACTIONS_ID_TOKEN_REQUEST_URL")
            bearer = env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
            if not url or not bearer:
                raise InvalidRequest(
                    "no identity: give --identity-token-file, or run in GitHub Actions with"
                    " `permissions: id-token: write` (ACTIONS_ID_TOKEN_REQUEST_URL is not set)"
                )
            full = f"{url}{'&' if '?' in url else '?'}audience={quote(audience, safe='')}"
            data = _json(_send("GET", full, {"Authorization": f"bearer {bearer}"}, None, timeout))
            value = data.get("value")
            if not isinstance(value, str):
                raise BrokerUnavailable("GitHub's OIDC endpoint answered without a token")
            return value

        return cls(read, "GitHub Actions OIDC")

    @classmethod
    def discover(
        cls,
        file: str | os.PathLike[str] | None,
        audience: str,
        environ: Mapping[str, str] | None = None,
    ) -> IdentityToken:
        """``from_file(file)`` when given, else GitHub Actions' when present."""
        return cls.from_file(file) if file is not None else cls.github_actions(audience, environ)


class RemoteBroker:
    """The broker service at ``url``, called as the workload ``identity`` proves."""

    def __init__(self, url: str, identity: IdentityToken, *, timeout: float = 10.0) -> None:
        self.url = _base_url(url)
        self.identity = identity
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<RemoteBroker {self.url} identity={self.identity!r}>"

    def _assertion(self) -> dict[str, str]:
        return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": self.identity()}

    def issue(
        self,
        audience: str,
        scopes: Iterable[str] = (),
        ttl: float | None = None,
        *,
        task: str | None = None,
        owner: str | None = None,
        purpose: str | None = None,
    ) -> RemoteCredential:
        """``POST /token``: a credential for the caller's own subject."""
        form = {"grant_type": "client_credentials", "audience": audience, **self._assertion()}
        extra = {"scope": " ".join(scopes), "ttl": _ttl(ttl), "task": task}
        form.update({k: v for k, v in {**extra, "owner": owner, "purpose": purpose}.items() if v})
        return self._credential(self._post("/token", form, {}), None)

    def renew(self, token: str, ttl: float | None = None) -> RemoteCredential:
        """``POST /renew``: the same lease, a fresh token."""
        form = {} if ttl is None else {"ttl": _ttl(ttl)}
        data = self._post("/renew", form, {"Authorization": f"Bearer {token}"})
        return self._credential(data, token)

    def revoke(self, token: str) -> None:
        """``POST /revoke`` (RFC 7009) by the token's holder, the token itself the
        credential: no identity token is spent (a single-use one is already, and
        a file may be gone by the end of a job). The service answers 200 even
        for a token it does not know, so this cannot tell whether anything was
        revoked."""
        form = {"token": token, "token_type_hint": "access_token"}
        self._post("/revoke", form, {"Authorization": f"Bearer {token}"}, expect_json=False)

    def introspect(self, token: str) -> dict[str, Any]:
        """``POST /introspect`` (RFC 7662): ``{"active": False}`` for anything not
        active, else the token's claims (``sub``, ``aud``, ``scope``, ``exp``,
        ``jti``, ``owner``, ``task``...), each checked for its type. Only a caller
        the service names in ``resource_servers`` may ask: any other is refused
        with ``InvalidClient``."""
        form = {"token": token, "token_type_hint": "access_token", **self._assertion()}
        response = _send("POST", self.url + "/introspect", {}, form, self.timeout, _not_allowed)
        return _introspection(_json(response), self.url)

    def _post(
        self, path: str, form: dict[str, str], headers: dict[str, str], *, expect_json: bool = True
    ) -> dict[str, Any]:
        response = _send("POST", self.url + path, headers, form, self.timeout)
        return _json(response) if expect_json else {}

    def _credential(self, data: dict[str, Any], previous: str | None) -> RemoteCredential:
        token = data.get("access_token")
        expires_in = data.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires_in, int | float):
            raise BrokerUnavailable(f"{self.url} answered without a token and its expiry")
        lease_id = data.get("lease_id")
        scope = data.get("scope")
        return RemoteCredential(
            token=token,
            lease_id=lease_id if isinstance(lease_id, str) else None,
            expires_at=time.time() + float(expires_in),
            scope=scope if isinstance(scope, str) else "",
            token_type=str(data.get("token_type", "Bearer")),
        )


def _ttl(ttl: float | None) -> str:
    # The service takes whole seconds: 1.5 s becomes 2 (never 0, which it refuses).
    return "" if ttl is None else str(max(1, math.ceil(ttl)))


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidRequest("--broker takes an https:// URL of the broker service")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # The identity token and the credential would cross the network in clear.
        raise InvalidRequest("--broker must be https:// (plain http only to a loopback address)")
    if parts.query or parts.fragment or parts.username:
        raise InvalidRequest("--broker takes a base URL: no query, fragment or user name")
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Refusal = Callable[[httpx.Response, str | None], Exception]


def _send(
    method: str,
    url: str,
    headers: dict[str, str],
    form: dict[str, str] | None,
    timeout: float,
    refusal: Refusal | None = None,
) -> httpx.Response:
    host = urlsplit(url).hostname
    try:
        response = httpx.request(
            method, url, headers=headers, data=form, timeout=timeout, follow_redirects=False
        )
    except httpx.HTTPError as exc:
        raise BrokerUnavailable(f"could not reach {host}: {type(exc).__name__}") from exc
    if response.status_code >= 400:
        raise (refusal or _refusal)(response, host)
    if response.status_code >= 300:
        raise BrokerUnavailable(f"{host} answered {response.status_code}, not an answer")
    return response


def _refusal(response: httpx.Response, host: str | None) -> Exception:
    status = response.status_code
    code, what = _refused(response, host)
    if status >= 500 or (code is None and status not in (401, 403)):
        return BrokerUnavailable(what)
    if code == "invalid_client":
        return InvalidClient(what, reason="invalid_client")
    if code in _DENIED or status == 403:
        return PolicyDenied([what])
    if code == "invalid_grant":
        return LeaseNotActive(what)
    if code == "invalid_token" or status == 401:
        return InvalidToken(what)
    return InvalidRequest(what)


def _not_allowed(response: httpx.Response, host: str | None) -> Exception:
    """``/introspect``'s refusals: its verdict on a token is always a 200, so a
    401 or 403 refuses the caller (``InvalidClient``), never the token."""
    status = response.status_code
    if status not in (401, 403):
        return _refusal(response, host)
    code, what = _refused(response, host)
    if status == 401:
        return InvalidClient(what, reason=code or "invalid_client")
    hint = "only the callers named in the broker's resource_servers may introspect"
    return InvalidClient(f"{what}: {hint}", reason="not_resource_server")


def _refused(response: httpx.Response, host: str | None) -> tuple[str | None, str]:
    """The RFC 6749 error code of a refusal, and a line saying it."""
    try:
        body = _json(response)
    except BrokerUnavailable:
        body = {}
    code = body.get("error") if isinstance(body.get("error"), str) else None
    description = _clean(body.get("error_description"))
    what = f"{host} refused: {code or response.status_code}"
    return code, what + (f" ({description})" if description else "")


def _introspection(data: dict[str, Any], url: str) -> dict[str, Any]:
    """An RFC 7662 answer checked for shape; ``BrokerUnavailable`` if it is not one."""
    active = data.get("active")
    if not isinstance(active, bool):
        raise BrokerUnavailable(f"{url} answered /introspect without an RFC 7662 'active'")
    if not active:  # section 2.2: nothing else of an inactive token is worth reading
        return {"active": False}
    for name, value in data.items():
        check = _MEMBERS.get(name)
        if value is not None and check is not None and not check(value):
            raise BrokerUnavailable(f"{url} answered /introspect with a malformed {name!r}")
    return data


def _is_time(value: object) -> bool:
    # json.loads reads NaN and Infinity; neither is a time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _is_audience(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(a, str) for a in value)
    )


# RFC 7662 section 2.2 members, the extensions broker_app adds, and the type
# each must have when present (aud may be a list, as RFC 7519 allows).
_TEXT = ("scope", "client_id", "username", "token_type", "sub", "iss", "jti")
_TEXT_EXTRA = ("owner", "task", "purpose")
_MEMBERS: dict[str, Callable[[object], bool]] = {
    **dict.fromkeys((*_TEXT, *_TEXT_EXTRA), lambda v: isinstance(v, str)),
    **dict.fromkeys(("exp", "iat", "nbf"), _is_time),
    "aud": _is_audience,
    "cnf": lambda v: isinstance(v, dict),
    "act": lambda v: isinstance(v, dict),
}


def _clean(value: object) -> str:
    if not isinstance(value, str):
        return ""
    text = "".join(ch for ch in value if ch.isprintable())
    return text[:200]


def _json(response: httpx.Response) -> dict[str, Any]:
    content = response.content
    if len(content) > _MAX_RESPONSE:
        raise BrokerUnavailable("the broker's answer is too large to be one")
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        raise BrokerUnavailable("the broker did not answer with JSON") from None
    if not isinstance(data, dict):
        raise BrokerUnavailable("the broker did not answer with a JSON object")
    return data
