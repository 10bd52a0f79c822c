"""What every adapter decides, written once and without I/O.

``Gate.steps`` reads a request (a ``RequestView`` an adapter builds from an
ASGI scope or a WSGI environ), yields the one verification call to make, and
returns an ``Outcome``: the ``Claims``, or the ``ErrorResponse`` to send. The
ASGI adapter drives it with ``await verifier.averify``, the WSGI one with
``verifier.verify`` (``jitbroker._drive``): only the waiting differs.

Every refusal is audited once: the verifier audits the ``InvalidToken`` it
raises; the gate audits what it finds itself (a malformed header, a missing
nonce, a token sent with the wrong scheme) and a store or key source that is
down, which it also logs on ``jitbroker.web``. A request with no credentials
at all is not audited: it presented nothing to reject.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from .._drive import Steps
from ..audit import EventType
from ..errors import (
    InvalidRequest,
    InvalidToken,
    KeySourceError,
    StoreError,
)
from ..lease import Claims
from ..validate import scopes as checked_scopes
from ..verify import Verifier
from .errors import NoCredentials, RequestRejected
from .headers import Presented, presented
from .nonces import DPoPNonces
from .proxies import (
    Network,
    Origin,
    TrustedProxies,
    forwarded_origin,
    parse_public_url,
    request_url,
)
from .responses import ErrorResponse, challenge_param, error_response

__all__ = ["CLAIMS_KEY", "GATE_KEY", "Gate", "Location", "Outcome", "RequestView"]

log = logging.getLogger("jitbroker.web")
#: Where the adapters put the verified ``Claims``: ``scope[...]`` / ``environ[...]``.
CLAIMS_KEY = "jitbroker.claims"
#: Where they put the ``Gate`` itself, so ``require()`` answers in the same terms.
GATE_KEY = "jitbroker.gate"
#: The header names an adapter must collect (lowercase), every value of each.
WANTED = frozenset(
    {"authorization", "dpop", "host", "forwarded", "x-forwarded-proto", "x-forwarded-host"}
)
_NONE: list[str] = []
_NO_HEADERS: tuple[tuple[str, str], ...] = ()


class Location(NamedTuple):
    """Where a request went, for rebuilding its URL (DPoP requests only)."""

    scheme: str  # of the connection: "http" or "https"
    raw_path: str  # percent-encoded, no query
    server: str  # "host:port" the server listens on, for a request with no Host
    peer: str | None  # the direct peer's IP address


class RequestView(NamedTuple):
    """The parts of a request the gate reads. ``headers`` maps each of ``WANTED``
    that is present to all its values, in order; ``locate(source)`` gives the
    ``Location``, computed only when a DPoP proof needs the URL."""

    method: str
    headers: Mapping[str, list[str]]
    source: Any  # the ASGI scope or the WSGI environ
    locate: Callable[[Any], Location]


class Outcome(NamedTuple):
    """Either ``claims`` (and ``headers`` to add to the response), or the
    ``response`` to send instead and the ``error`` it answers."""

    claims: Claims | None
    response: ErrorResponse | None
    headers: tuple[tuple[str, str], ...] = _NO_HEADERS
    error: BaseException | None = None


class Gate:
    """The configuration and decisions shared by ``BearerAuth``, ``WSGIBearer``,
    ``JitbrokerBackend`` and ``require``; see ``BearerAuth`` for the arguments."""

    def __init__(
        self,
        verifier: Verifier,
        *,
        audience: str | None = None,
        scopes: Iterable[str] | str = (),
        realm: str | None = None,
        exempt: Iterable[str] = (),
        trusted_proxies: Iterable[str | Network] = (),
        public_url: str | None = None,
        dpop_nonces: DPoPNonces | None = None,
        dpop: bool = True,
        retry_after: int = 5,
    ) -> None:
        self.verifier = verifier
        self.audience = audience if audience is not None else verifier.audience
        if not isinstance(self.audience, str) or not self.audience:
            raise InvalidRequest("pass audience=... (or give the Verifier a default audience)")
        self.scopes = checked_scopes(scopes) if scopes else ()
        self.realm = realm if realm is not None else self.audience
        challenge_param("realm", self.realm)  # refuse one that cannot be sent, now
        if isinstance(exempt, str):
            exempt = (exempt,)
        exempt = tuple(exempt)
        self._exact = frozenset(p for p in exempt if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in exempt if p.endswith("*"))
        self.proxies = TrustedProxies(trusted_proxies)
        self.public = parse_public_url(public_url)
        if dpop_nonces is not None and not isinstance(dpop_nonces, DPoPNonces):
            raise InvalidRequest("dpop_nonces must be a DPoPNonces (or None for no nonces)")
        if dpop_nonces is not None and not dpop:
            raise InvalidRequest("dpop_nonces needs dpop=True")
        self.nonces = dpop_nonces
        self.dpop = bool(dpop)
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
            raise InvalidRequest("retry_after must be a whole number of seconds >= 1")
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"<Gate audience={self.audience!r} realm={self.realm!r}>"

    def exempt(self, path: str) -> bool:
        """True if ``path`` (as the app's routes see it) needs no credentials."""
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))

    def steps(self, view: RequestView) -> Steps[Outcome]:
        """Decide on ``view``: yields the verification call, returns the outcome."""
        seen: Presented | None = None
        try:
            seen = presented(
                view.headers.get("authorization", _NONE),
                view.headers.get("dpop", _NONE),
                dpop=self.dpop,
            )
            call, headers = self._call(seen, view)
        except (RequestRejected, InvalidToken) as exc:
            return self.refuse(exc, seen, audit=True)
        try:
            claims: Claims = yield call
        except InvalidToken as exc:
            return self.refuse(exc, seen, audit=False)  # the verifier audited it
        except (StoreError, KeySourceError) as exc:
            return self.refuse(exc, seen, audit=True)
        if seen.scheme == "DPoP" and claims.holder is None:
            # RFC 9449 section 7.1: the DPoP scheme is for tokens bound to the proof's key.
            wrong = InvalidToken("a token not bound to a key was sent with the DPoP scheme")
            return self.refuse(wrong, seen, audit=True)
        return Outcome(claims, None, headers)

    def refuse(
        self, error: BaseException, seen: Presented | None, *, audit: bool = True
    ) -> Outcome:
        """The outcome for ``error``, audited (unless the verifier did) and mapped."""
        if audit and not isinstance(error, NoCredentials):
            self._audit(error)
        scheme = seen.scheme if seen is not None else None
        if scheme is None and isinstance(error, InvalidToken):
            scheme = "DPoP"  # only a DPoP request is refused before its scheme is known
        response = error_response(
            error,
            realm=self.realm,
            scheme=scheme,
            dpop=self.dpop,
            scopes=self.scopes,
            retry_after=self.retry_after,
        )
        return Outcome(None, response, _NO_HEADERS, error)

    def response_for(
        self, error: BaseException, scheme: str | None = None, scopes: Iterable[str] = ()
    ) -> ErrorResponse:
        """``error_response`` in this gate's terms (realm, DPoP, retry_after)."""
        return error_response(
            error,
            realm=self.realm,
            scheme=scheme,
            dpop=self.dpop,
            scopes=scopes,
            retry_after=self.retry_after,
        )

    # -- the pieces ---------------------------------------------------------
    def _call(self, seen: Presented, view: RequestView) -> tuple[Any, tuple[tuple[str, str], ...]]:
        token, audience, scopes = seen.token, self.audience, self.scopes
        if seen.scheme == "Bearer":  # no proof: a key-bound token fails as it must
            return (lambda verify: verify(token, audience=audience, scopes=scopes)), _NO_HEADERS
        proof, method, url = seen.proof, view.method, self.url(view)
        headers = _NO_HEADERS
        if self.nonces is not None and proof is not None:
            fresh = self.nonces.check_proof(proof)  # set when the proof's is the previous one
            if fresh is not None:
                headers = (("DPoP-Nonce", fresh),)

        def call(verify: Any) -> Any:
            return verify(
                token, audience=audience, scopes=scopes, proof=proof, method=method, url=url
            )

        return call, headers

    def url(self, view: RequestView) -> str:
        """The request's URL as the client called it, for the proof's ``htu``."""
        where = view.locate(view.source)
        if self.public is not None:
            return request_url(self.public, where.raw_path)
        hosts = view.headers.get("host", _NONE)
        # Two Host headers name no one URL: the empty host makes every proof fail.
        host = hosts[0] if len(hosts) == 1 else ("" if hosts else where.server)
        origin = Origin(where.scheme, host.strip(" \t"))
        if where.peer in self.proxies:
            get = view.headers.get
            origin = forwarded_origin(
                origin,
                self.proxies,
                get("forwarded", _NONE),
                get("x-forwarded-proto", _NONE),
                get("x-forwarded-host", _NONE),
            )
        return request_url(origin, where.raw_path)

    def _audit(self, error: BaseException) -> None:
        if isinstance(error, StoreError | KeySourceError):
            log.warning("could not verify a request: %s", type(error).__name__, exc_info=error)
        auditor = self.verifier.audit
        if auditor is None:
            return
        # Our own messages are fixed texts (never a header's content), so they
        # can go to the audit trail; a store's or key source's may name hosts.
        mine = isinstance(error, RequestRejected | InvalidToken)
        auditor.emit(
            EventType.VERIFY_FAILED,
            self.verifier.clock(),
            error=type(error).__name__,
            reason=str(error) if mine else None,
        )
