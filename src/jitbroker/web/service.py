"""``broker_app``: the broker as an OAuth 2.0 authorization server (an ASGI app).

::

    POST /token                                  RFC 6749 4.4 client_credentials, RFC 8693
                                                 token exchange; DPoP binding (RFC 9449 5)
    POST /revoke                                 RFC 7009 (+ ``owner=`` offboarding)
    POST /introspect                             RFC 7662, for configured resource servers
    POST /renew                                  the token's own lease, a fresh token
    GET  /jwks.json                              the broker's public keys
    GET  /.well-known/oauth-authorization-server RFC 8414 metadata

Callers authenticate by a ``Trust`` (``jitbroker.web.trust``); every decision
is audited with the caller's identity (``service_audit``). Errors are RFC 6749
section 5.2 JSON with fixed descriptions: never an internal (invariant 12),
and a store that is down is a 503 with ``Retry-After``, never a token (the
lease is stored before a token leaves ``issue``: invariant 1). See
docs/service.md for every parameter.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..broker import AsyncBroker, Broker
from ..clock import Duration, seconds
from ..errors import (
    InvalidProof,
    InvalidRequest,
    InvalidToken,
    KeySourceError,
    LeaseError,
    PolicyDenied,
    StoreError,
)
from ..lease import Claims, Credential
from .errors import InvalidClient, NonceRequired, RequestRejected
from .headers import presented
from .nonces import DPoPNonces
from .responses import ErrorResponse, challenge_param, error_response
from .service_audit import ServiceAudit
from .service_calls import BrokerCalls
from .service_dpop import Binding, TokenProofs
from .service_forms import Form, OAuthError, json_body, read_form
from .service_grants import (
    ACCESS_TOKEN,
    CLIENT_CREDENTIALS,
    TOKEN_EXCHANGE,
    Authenticate,
    Bind,
    Grant,
    client_credentials,
    granted,
    token_exchange,
    ttl_of,
)
from .service_manage import NO_STORE, introspect, metadata, offboard, revoke_token
from .service_tokens import Presented
from .trust import Caller, ClientKey, ClientSecret, Trust, TrustRule

__all__ = ["BrokerService", "broker_app", "check_base_url"]

log = logging.getLogger("jitbroker.web")
_GRANTS = {CLIENT_CREDENTIALS: client_credentials, TOKEN_EXCHANGE: token_exchange}
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
Handler = Callable[[Request, Form, "_Seen"], Awaitable[Response]]


class _Seen:
    """What a request was found to be, as far as it got: for its audit event."""

    def __init__(self) -> None:
        self.caller: Caller | None = None
        self.grant: str | None = None


def check_base_url(value: object) -> str:
    """``base_url`` checked (see ``broker_app``), without a trailing slash."""
    if not isinstance(value, str):
        raise InvalidRequest(
            "base_url must be the service's public URL, e.g. https://broker.example"
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError unless a number in 0..65535
    except ValueError:
        raise InvalidRequest("base_url is not a valid URL") from None
    secure = parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK)
    if not secure or not parts.hostname or parts.query or parts.fragment or "@" in parts.netloc:
        raise InvalidRequest(
            "base_url must be an https URL with no query or fragment (http only on a "
            "loopback host): RFC 8414 makes it the issuer identifier"
        )
    try:
        challenge_param("realm", value)  # it is the realm of the Basic and Bearer challenges
    except InvalidRequest:
        raise InvalidRequest(
            "base_url must be printable ASCII with no quote or backslash"
        ) from None
    return value.rstrip("/")


def _base_url(base_url: str | None, issuer: str) -> str:
    if base_url is not None:
        return check_base_url(base_url)
    try:
        return check_base_url(issuer)
    except InvalidRequest:
        raise InvalidRequest(
            "base_url is required: the broker's issuer is not the service's https URL"
            ' (e.g. base_url="https://jitbroker.internal")'
        ) from None


class BrokerService:
    """The endpoints of ``broker_app`` (see its arguments); ``routes()`` for Starlette."""

    def __init__(
        self,
        broker: Broker | AsyncBroker,
        trust: Trust | Iterable[TrustRule | ClientKey | ClientSecret],
        *,
        base_url: str | None = None,
        resource_servers: Iterable[str] = (),
        offboarders: Iterable[str] = (),
        default_ttl: Duration = 300,
        max_body: int = 65536,
        retry_after: int = 5,
        dpop: bool = True,
        dpop_nonces: DPoPNonces | None = None,
        allow_any_access: bool = False,
    ) -> None:
        if broker.policy is None and allow_any_access is not True:
            raise InvalidRequest(
                "the broker has no policy: every caller a trust rule accepts could get any"
                " audience and scope; give the broker a Policy (Policy.from_toml), or pass"
                " allow_any_access=True (tests, or callers limited in another way)"
            )
        self.calls = BrokerCalls(broker)
        self.clock = broker.clock
        self.issuer = broker.issuer
        self.base_url = _base_url(base_url, broker.issuer)
        self.token_url = self.base_url + "/token"
        self.renew_url = self.base_url + "/renew"
        self.default_ttl = min(seconds(default_ttl, "default_ttl"), self.calls.max_ttl)
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1024:
            raise InvalidRequest("max_body must be a whole number of bytes, at least 1024")
        self.max_body = max_body
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
            raise InvalidRequest("retry_after must be a whole number of seconds >= 1")
        self.retry_after = retry_after
        self.resource_servers = _names(resource_servers, "resource_servers")
        self.offboarders = _names(offboarders, "offboarders")
        self.dpop = bool(dpop)
        if dpop_nonces is not None and not isinstance(dpop_nonces, DPoPNonces):
            raise InvalidRequest("dpop_nonces must be a DPoPNonces (or None for no nonces)")
        if dpop_nonces is not None and not self.dpop:
            raise InvalidRequest("dpop_nonces needs dpop=True")
        self.nonces = dpop_nonces
        self.owns_trust = not isinstance(trust, Trust)
        rules = () if isinstance(trust, Trust) else tuple(trust)
        self.trust = (
            trust
            if isinstance(trust, Trust)
            else Trust(rules, token_endpoint=self.token_url, clock=self.clock)
        )
        secrets = any(isinstance(r, ClientSecret) for r in getattr(self.trust, "rules", rules))
        self.auth_methods = ["private_key_jwt"] + (
            ["client_secret_basic", "client_secret_post"] if secrets else []
        )
        self.presented = Presented(
            broker.keys,
            issuer=broker.issuer,
            store=broker.store,
            lookup=self.calls.lease,
            clock=self.clock,
            leeway=self.calls.leeway,
            max_ttl=self.calls.max_ttl,
        )
        self.proofs = TokenProofs(clock=self.clock, leeway=self.calls.leeway)
        self.audit = ServiceAudit(self.calls.auditor, self.clock)

    def __repr__(self) -> str:
        return f"<BrokerService {self.base_url!r} issuer={self.issuer!r}>"

    def routes(self) -> list[Route]:
        """The Starlette routes (a GET on a POST endpoint is a 405, by Starlette)."""
        post = ["POST"]
        return [
            Route("/token", self.token, methods=post),
            Route("/revoke", self.revoke, methods=post),
            Route("/introspect", self.introspect, methods=post),
            Route("/renew", self.renew, methods=post),
            Route("/jwks.json", self.jwks, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", self.metadata, methods=["GET"]),
        ]

    # -- the shared frame of the POST endpoints ---------------------------------------
    async def _post(self, request: Request, endpoint: str, handler: Handler) -> Response:
        seen = _Seen()
        try:
            form = await read_form(
                request.stream(),
                content_type=request.headers.get("content-type"),
                content_length=request.headers.get("content-length"),
                query=request.scope.get("query_string", b""),
                max_body=self.max_body,
                optional=endpoint == "/renew",  # its credentials are in the headers
            )
            return await handler(request, form, seen)
        except OAuthError as exc:
            refusal = exc
        except (StoreError, KeySourceError) as exc:  # their messages may name hosts: class only
            log.warning("%s could not be answered: %s", endpoint, type(exc).__name__, exc_info=exc)
            refusal = OAuthError(
                "temporarily_unavailable",
                "the broker cannot answer right now; try again later",
                status=503,
                reason=type(exc).__name__,
                retry_after=self.retry_after,
            )
        except Exception as exc:  # a bug of ours: logged in full, never sent
            log.exception("%s failed", endpoint)
            refusal = OAuthError(
                "server_error", "the broker failed to answer", status=500, reason=type(exc).__name__
            )
        self.audit.decided(
            endpoint,
            "denied",
            seen.caller,
            grant=seen.grant,
            error=refusal.code,
            reason=refusal.reason,
        )
        return Response(
            refusal.body(),
            refusal.status,
            refusal.headers(self.base_url),
            media_type="application/json",
        )

    def _authenticator(self, request: Request, form: Form, seen: _Seen) -> Authenticate:
        """Client authentication for this request, to run in a worker thread (a
        JWKS refresh or a client secret's scrypt must not hold the event loop)."""
        values = request.headers.getlist("authorization")
        if len(values) > 1:
            raise OAuthError(
                "invalid_request", "the request has more than one Authorization header"
            )
        authorization = values[0] if values else None
        basic = authorization is not None and authorization[:6].lower() == "basic "

        def authenticate() -> Caller:
            try:
                caller = seen.caller = self.trust.authenticate_client(form, authorization)
            except InvalidClient as exc:
                raise OAuthError(
                    "invalid_client",
                    "client authentication failed",
                    status=401,
                    reason=exc.reason,
                    basic=basic,
                ) from None
            return caller

        return authenticate

    async def _authenticate(self, request: Request, form: Form, seen: _Seen) -> Caller:
        return await self.calls.authenticate(self._authenticator(request, form, seen))

    # -- POST /token ---------------------------------------------------------------
    async def token(self, request: Request) -> Response:
        """RFC 6749 section 4.4 and RFC 8693 (see ``service_grants``)."""
        return await self._post(request, "/token", self._token)

    async def _token(self, request: Request, form: Form, seen: _Seen) -> Response:
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise OAuthError("invalid_request", "grant_type is required")
        grant = _GRANTS.get(grant_type)
        if grant is None:
            raise OAuthError("unsupported_grant_type", "the grant_type is not supported here")
        seen.grant = "token-exchange" if grant_type == TOKEN_EXCHANGE else grant_type
        self._check_nonce(request)  # before authentication: a retry must find its assertion unspent
        authenticate = self._authenticator(request, form, seen)
        done: Grant = await grant(self, form, authenticate, self._binder(request))
        self.audit.decided(
            "/token", done.decision, done.caller, grant=seen.grant, lease=done.cred.lease
        )
        return self._credential(done.cred, done.issued_token_type, request)

    def _binder(self, request: Request) -> Bind:
        """The check of the request's DPoP proof, if any: what the new token is
        bound to. Called once the caller is authenticated, so an anonymous
        flood of proofs cannot fill the replay cache that callers' proofs need."""
        proofs = request.headers.getlist("dpop")

        def bind() -> Binding | None:
            if not self.dpop or not proofs:
                return None
            try:
                if len(proofs) > 1:
                    raise InvalidProof("the request has more than one DPoP header")
                return self.proofs.check(proofs[0].strip(" \t"), method="POST", url=self.token_url)
            except InvalidProof as exc:  # RFC 9449 section 5
                raise OAuthError(
                    "invalid_dpop_proof", "the DPoP proof is missing or invalid", reason=str(exc)
                ) from None

        return bind

    def _check_nonce(self, request: Request) -> None:
        """RFC 9449 section 8: a DPoP proof without the current nonce is answered
        ``use_dpop_nonce`` before anything is spent (the proof's ``jti``, a
        single-use client assertion), so the client's retry with the nonce works."""
        proofs = request.headers.getlist("dpop")
        if self.nonces is None or len(proofs) != 1:  # none, or two: bind() refuses those
            return
        try:
            self.nonces.check_proof(proofs[0].strip(" \t"))
        except NonceRequired as exc:
            raise OAuthError(
                "use_dpop_nonce",
                "the authorization server requires a nonce in the DPoP proof",
                reason=str(exc),
                nonce=exc.nonce,
            ) from None

    def _credential(self, cred: Credential, issued_type: str, request: Request) -> Response:
        lease = cred.lease
        body: dict[str, Any] = {
            "access_token": cred.token,
            "token_type": "DPoP" if lease.holder is not None else "Bearer",
            "expires_in": max(0, round(lease.expires_at - self.clock())),
            "issued_token_type": issued_type,
            "lease_id": lease.id,
            "expires_at": math.floor(lease.expires_at),
        }
        if lease.scopes:
            body["scope"] = lease.scope
        headers = NO_STORE
        if self.nonces is not None and "dpop" in request.headers:  # the next proof's nonce
            headers = {**NO_STORE, "DPoP-Nonce": self.nonces.current()}
        return Response(json_body(body), 200, headers, media_type="application/json")

    # -- POST /revoke --------------------------------------------------------------
    async def revoke(self, request: Request) -> Response:
        """RFC 7009, and ``owner=`` to offboard an owner's leases."""
        return await self._post(request, "/revoke", self._revoke)

    async def _revoke(self, request: Request, form: Form, seen: _Seen) -> Response:
        token, owner = form.get("token"), form.get("owner")
        if (token is None) == (owner is None):
            raise OAuthError("invalid_request", "send either token (RFC 7009) or owner")
        if token is not None and _by_possession(request, form):
            return await self._revoke_held(request, token)
        caller = await self._authenticate(request, form, seen)
        if owner is not None:
            return await offboard(self, caller, owner)
        return await revoke_token(self, caller, form["token"])

    async def _revoke_held(self, request: Request, token: str) -> Response:
        """Revocation by the token's holder, the token itself as the credential
        (``Authorization: Bearer`` or ``DPoP`` with a proof for ``/revoke``): what a
        job whose identity token was single-use, or is gone, can still do. Only
        that token's lease; a token that is not active is a 200 (RFC 7009 2.2)."""
        get = request.headers.getlist
        try:
            seen_token = presented(get("authorization"), get("dpop"), dpop=self.dpop)
            if seen_token.token != token:
                raise OAuthError(
                    "invalid_request", "the Authorization header must carry the token revoked"
                )
            if self.nonces is not None and seen_token.proof is not None:
                self.nonces.check_proof(seen_token.proof)
            claims = await self.presented.check(
                token, proof=seen_token.proof, method="POST", url=self.base_url + "/revoke"
            )
        except InvalidProof as exc:  # a bound token needs its key, to revoke as to use
            answer = error_response(exc, realm=self.base_url, scheme="DPoP", dpop=self.dpop)
            self.audit.decided("/revoke", "denied", None, error=type(exc).__name__, reason=str(exc))
            return _answer(answer)
        except (RequestRejected, InvalidToken, LeaseError, InvalidRequest) as exc:
            self.audit.decided(
                "/revoke", "revoked", None, reason=f"not active: {type(exc).__name__}"
            )
            return Response(b"", 200, NO_STORE)
        holder = self._holder(claims, seen_token.scheme)
        await self.calls.revoke(claims.lease_id, by=f"{seen_token.scheme}:{holder.subject}")
        self.audit.decided("/revoke", "revoked", holder, reason="by its holder")
        return Response(b"", 200, NO_STORE)

    # -- POST /introspect ---------------------------------------------------------
    async def introspect(self, request: Request) -> Response:
        """RFC 7662: for the callers named in ``resource_servers`` only."""
        return await self._post(request, "/introspect", self._introspect)

    async def _introspect(self, request: Request, form: Form, seen: _Seen) -> Response:
        token = form.get("token")
        if token is None:
            raise OAuthError("invalid_request", "token is required")
        caller = await self._authenticate(request, form, seen)
        return await introspect(self, caller, token)

    # -- POST /renew -------------------------------------------------------------------
    async def renew(self, request: Request) -> Response:
        """The presented token's lease, renewed (capped as ``Broker.renew`` caps it)."""
        return await self._post(request, "/renew", self._renew)

    async def _renew(self, request: Request, form: Form, seen: _Seen) -> Response:
        get = request.headers.getlist
        try:
            seen_token = presented(get("authorization"), get("dpop"), dpop=self.dpop)
            if self.nonces is not None and seen_token.proof is not None:
                self.nonces.check_proof(seen_token.proof)
            claims = await self.presented.check(
                seen_token.token, proof=seen_token.proof, method="POST", url=self.renew_url
            )
        except (RequestRejected, InvalidToken) as exc:
            scheme = (
                None if isinstance(exc, RequestRejected) else "DPoP" if get("dpop") else "Bearer"
            )
            answer = error_response(exc, realm=self.base_url, scheme=scheme, dpop=self.dpop)
            self.audit.decided("/renew", "denied", None, error=type(exc).__name__, reason=str(exc))
            return _answer(answer)
        holder = seen.caller = self._holder(claims, seen_token.scheme)
        try:
            cred = await self.calls.renew(holder.fields(), claims.lease_id, ttl_of(form))
        except (PolicyDenied, LeaseError, InvalidRequest) as exc:
            raise granted(exc) from None
        self.audit.decided("/renew", "renewed", holder, lease=cred.lease)
        return self._credential(cred, ACCESS_TOKEN, request)

    def _holder(self, claims: Claims, scheme: str) -> Caller:
        """The caller a presented token of ours proves: its holder (the policy's
        ``caller`` and the audit event's, for /renew and /revoke by the token)."""
        holder = claims.actor if claims.actor is not None else claims.subject
        return Caller(
            subject=holder,
            owner=claims.owner or holder,
            rule="access_token",
            method=scheme,
            issuer=self.issuer,
            assertion_subject=holder,
            max_ttl=self.calls.max_ttl,
            expires_at=claims.expires_at,
        )

    # -- GET endpoints ---------------------------------------------------------------
    async def jwks(self, request: Request) -> Response:
        """The public keys, for offline verifiers (rotation publishes a key first)."""
        return JSONResponse(
            self.calls.broker.jwks(), headers={"Cache-Control": "public, max-age=60"}
        )

    async def metadata(self, request: Request) -> Response:
        """RFC 8414 section 2 (plus the token types of RFC 8693, as extensions)."""
        return JSONResponse(
            self.metadata_document(), headers={"Cache-Control": "public, max-age=300"}
        )

    def metadata_document(self) -> dict[str, Any]:
        """The metadata, as served."""
        return metadata(self)

    def close(self) -> None:
        """Close the ``Trust`` this service built from rules (not one passed in)."""
        if self.owns_trust:
            self.trust.close()


def _by_possession(request: Request, form: Form) -> bool:
    """A revocation that authenticates by the token itself: an ``Authorization``
    of a token scheme and no client authentication in the form."""
    authorization = request.headers.get("authorization", "")
    scheme = authorization.lstrip(" \t")[:6].lower()
    client = ("client_assertion", "client_assertion_type", "client_secret", "client_id")
    return scheme.startswith(("bearer", "dpop ")) and not any(name in form for name in client)


def _answer(answer: ErrorResponse) -> Response:
    """A Starlette response of ``error_response``'s, every header kept (there are
    two ``WWW-Authenticate``, which a dict of headers would fold into one)."""
    response = Response(answer.body, answer.status)
    response.raw_headers = [
        *(h for h in response.raw_headers if h[0] == b"content-length"),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers),
    ]
    return response


def _names(values: Iterable[str], option: str) -> frozenset[str]:
    items = (values,) if isinstance(values, str) else tuple(values)
    if not all(isinstance(v, str) and v for v in items):
        raise InvalidRequest(f"{option} must be rule or client names (non-empty strings)")
    return frozenset(items)


def broker_app(
    broker: Broker | AsyncBroker,
    trust: Trust | Iterable[TrustRule | ClientKey | ClientSecret],
    *,
    base_url: str | None = None,
    resource_servers: Iterable[str] = (),
    offboarders: Iterable[str] = (),
    default_ttl: Duration = 300,
    max_body: int = 65536,
    retry_after: int = 5,
    dpop: bool = True,
    dpop_nonces: DPoPNonces | None = None,
    allow_any_access: bool = False,
) -> Starlette:
    """The broker as an ASGI app: an OAuth 2.0 authorization server for its callers.

    Args:
        broker: a ``Broker`` (its calls run in worker threads) or ``AsyncBroker``.
        trust: a ``Trust``, or the rules to build one from (its
            ``token_endpoint`` is then ``base_url + "/token"``).
        base_url: the public URL clients call, ``https://...`` (http only on a
            loopback host): the metadata's ``issuer``, the base of every endpoint
            URL, and the ``htu`` DPoP proofs must name. Default: the broker's
            ``issuer``, when that is such a URL (as RFC 9068 verifiers expect).
        resource_servers: the rule names (``TrustRule.name``) or client ids
            allowed to call ``/introspect``. None by default.
        offboarders: rule names or client ids that may revoke any owner's leases
            (``/revoke`` with ``owner=``); any caller may revoke its own owner's.
        default_ttl: the lease TTL when a request names none (seconds, default
            300), always capped at the caller's ``max_ttl`` and the broker's.
        max_body: the largest request body, in bytes (default 65536): larger is a 413.
        retry_after: the ``Retry-After`` of a 503 (seconds, default 5).
        dpop: accept DPoP proofs (RFC 9449) to bind tokens (default True).
        dpop_nonces: a ``DPoPNonces`` to require server nonces in the DPoP proofs
            sent to ``/token`` and ``/renew`` (RFC 9449 section 8): a proof
            without a current one is ``400 use_dpop_nonce`` (``/renew``: ``401``)
            with the nonce in ``DPoP-Nonce``. Default None: no nonces.
        allow_any_access: serve a broker that has no policy (refused by default:
            any caller a trust rule accepts could then get any audience and scope).

    The app's ``state.service`` is the ``BrokerService``; its lifespan closes a
    ``Trust`` built from rules.
    """
    service = BrokerService(
        broker,
        trust,
        base_url=base_url,
        resource_servers=resource_servers,
        offboarders=offboarders,
        default_ttl=default_ttl,
        max_body=max_body,
        retry_after=retry_after,
        dpop=dpop,
        dpop_nonces=dpop_nonces,
        allow_any_access=allow_any_access,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()

    app = Starlette(routes=service.routes(), lifespan=lifespan)
    app.router.redirect_slashes = False  # "/token/" is not found, never a redirect
    app.state.service = service
    return app
