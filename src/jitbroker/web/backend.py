"""``JitbrokerBackend``: a Starlette ``AuthenticationBackend`` over the same gate.

With Starlette's ``AuthenticationMiddleware`` a request with no token is let
in as anonymous (``request.user.is_authenticated`` is False, and
``@requires(...)`` answers it); a request with a bad token is refused with the
RFC 6750 / RFC 9449 response, given ``on_error=JitbrokerBackend.on_error``.
Behind ``BearerAuth`` it reuses the claims already verified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, Response

from .._drive import arun
from ..errors import InvalidRequest
from ..lease import Claims
from ..verify import Verifier
from .asgi import asgi_view
from .errors import NoCredentials
from .gate import CLAIMS_KEY, GATE_KEY, Gate
from .nonces import DPoPNonces
from .proxies import Network
from .responses import ErrorResponse

__all__ = ["JitbrokerAuthError", "JitbrokerBackend", "JitbrokerUser"]


class JitbrokerUser(BaseUser):
    """The workload behind a verified token, as ``request.user``."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims

    def __repr__(self) -> str:
        return f"<JitbrokerUser subject={self.subject!r} lease_id={self.lease_id!r}>"

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.claims.subject

    @property
    def identity(self) -> str:
        """The token's subject (for a delegated token, the principal at the root)."""
        return self.claims.subject

    @property
    def lease_id(self) -> str:
        return self.claims.lease_id

    @property
    def subject(self) -> str:
        return self.claims.subject

    @property
    def owner(self) -> str | None:
        return self.claims.owner

    @property
    def actor(self) -> str | None:
        """The workload the token was delegated to (RFC 8693 ``act``), or None."""
        return self.claims.actor

    @property
    def delegated_by(self) -> tuple[str, ...]:
        """The lease ids the token was delegated through, nearest first."""
        return self.claims.delegated_by

    @property
    def actors(self) -> tuple[str, ...]:
        """The actor chain's subjects, current actor first (from ``act``; for an
        opaque token, which carries none, just the current actor)."""
        chain: list[str] = []
        act: Any = self.claims.raw.get("act")
        while isinstance(act, dict) and isinstance(act.get("sub"), str):
            chain.append(act["sub"])
            act = act.get("act")
        if not chain and self.claims.actor is not None:
            chain.append(self.claims.actor)
        return tuple(chain)


class JitbrokerAuthError(AuthenticationError):
    """A refused request; ``response`` is the answer ``on_error`` sends."""

    def __init__(self, response: ErrorResponse) -> None:
        super().__init__(f"{response.status} {response.body.decode()}")
        self.response = response


class JitbrokerBackend(AuthenticationBackend):
    """Authenticate requests by their jitbroker token, for ``AuthenticationMiddleware``.

    The arguments are ``BearerAuth``'s (no ``exempt``: an anonymous request
    is let in, unauthenticated). ``request.auth.scopes`` are the token's scopes.
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        audience: str | None = None,
        scopes: Iterable[str] | str = (),
        realm: str | None = None,
        trusted_proxies: Iterable[str | Network] = (),
        public_url: str | None = None,
        dpop_nonces: DPoPNonces | None = None,
        dpop: bool = True,
        retry_after: int = 5,
    ) -> None:
        averify = getattr(verifier, "averify", None)
        if averify is None:
            raise InvalidRequest("JitbrokerBackend needs a Verifier with averify()")
        self.gate = Gate(
            verifier,
            audience=audience,
            scopes=scopes,
            realm=realm,
            trusted_proxies=trusted_proxies,
            public_url=public_url,
            dpop_nonces=dpop_nonces,
            dpop=dpop,
            retry_after=retry_after,
        )
        self._averify = averify

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        scope = conn.scope
        claims = scope.get(CLAIMS_KEY)
        if claims is None:
            outcome = await arun(self.gate.steps(asgi_view(scope)), self._averify)
            if isinstance(outcome.error, NoCredentials):
                scope.setdefault(GATE_KEY, self.gate)
                return None
            if outcome.response is not None:
                raise JitbrokerAuthError(outcome.response)
            assert outcome.claims is not None  # an outcome has one or the other
            claims = scope[CLAIMS_KEY] = outcome.claims
            scope.setdefault(GATE_KEY, self.gate)
        return AuthCredentials(sorted(claims.scopes)), JitbrokerUser(claims)

    @staticmethod
    def on_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
        """``AuthenticationMiddleware(on_error=...)``: the RFC answer for our refusals."""
        if not isinstance(exc, JitbrokerAuthError):
            return PlainTextResponse(str(exc), status_code=400)
        response = Response(exc.response.body, status_code=exc.response.status)
        response.raw_headers = [
            (b"content-length", str(len(exc.response.body)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.response.headers),
        ]
        return response
