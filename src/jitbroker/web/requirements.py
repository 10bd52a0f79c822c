"""``require``: per-route scope checks on the claims ``BearerAuth`` verified.

``require(scopes=...)`` is a FastAPI dependency (``Depends`` or ``Security``;
with FastAPI installed it is also an OpenAPI ``http``/``bearer`` security
scheme named ``jitbroker``) and, without FastAPI, an awaitable check for
Starlette endpoints. It does not verify: ``BearerAuth`` (or
``JitbrokerBackend``) did, once per request; it checks the claims it left in
``scope["jitbroker.claims"]``. Neither FastAPI nor Starlette is imported
until a requirement is made or fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InsufficientScope, InvalidRequest, WrongAudience
from ..lease import Claims
from ..validate import optional_text
from ..validate import scopes as checked_scopes
from .errors import NoCredentials
from .gate import CLAIMS_KEY, GATE_KEY, Gate

__all__ = ["Requirement", "authorize", "require"]


def authorize(
    claims: Claims, *, scopes: Iterable[str] | str = (), audience: str | None = None
) -> Claims:
    """Check claims that were already verified: for ``audience`` (when given) and
    holding every one of ``scopes``; raise ``WrongAudience`` or
    ``InsufficientScope`` if not. For per-view checks in any framework."""
    if audience is not None and claims.audience != audience:
        raise WrongAudience(f"token is for audience {claims.audience[:128]!r}, not {audience!r}")
    need = checked_scopes(scopes) if scopes else ()
    if need and not claims.scopes.issuperset(need):
        missing = set(need) - claims.scopes
        raise InsufficientScope(
            f"token lacks scopes {' '.join(sorted(missing))!r}", missing=missing
        )
    return claims


class Requirement:
    """What ``require`` returns: ``await requirement(request)`` gives the ``Claims``
    or raises Starlette's ``HTTPException`` with the RFC 6750 status and challenge."""

    def __init__(self, scopes: Iterable[str] | str = (), audience: str | None = None) -> None:
        self.scopes = checked_scopes(scopes) if scopes else ()
        self.audience = optional_text(audience, "audience")

    def __repr__(self) -> str:
        return f"require(scopes={list(self.scopes)!r}, audience={self.audience!r})"

    async def __call__(self, conn: Any) -> Claims:
        return self.check(conn.scope)

    def check(self, scope: Mapping[str, Any], extra_scopes: Iterable[str] = ()) -> Claims:
        """The claims in this ASGI ``scope``, if they meet the requirement."""
        gate = scope.get(GATE_KEY)
        if not isinstance(gate, Gate):
            raise InvalidRequest(
                "require() checks the claims BearerAuth (or JitbrokerBackend) verified: "
                "add that middleware in front of this app"
            )
        need = sorted({*self.scopes, *extra_scopes})
        claims = scope.get(CLAIMS_KEY)
        try:
            if claims is None:  # an exempt path, or the backend let an anonymous request in
                raise NoCredentials("this route requires an access token")
            return authorize(claims, scopes=need, audience=self.audience)
        except (NoCredentials, InsufficientScope, WrongAudience) as exc:
            raise _http_error(gate, exc, need) from None


def require(scopes: Iterable[str] | str = (), audience: str | None = None) -> Requirement:
    """A dependency that returns the request's ``Claims`` if they hold ``scopes``
    (and are for ``audience``): ``Security(require(scopes=["orders:read"]))``.

    Scopes given through ``Security(..., scopes=[...])`` are required too.
    Fails with 401 (no token on this route), 403 ``insufficient_scope``, or 401
    ``invalid_token`` (another audience), each with its ``WWW-Authenticate``.
    """
    try:
        from ._fastapi import FastAPIRequirement
    except ImportError:  # no FastAPI: a plain awaitable check
        return Requirement(scopes, audience)
    return FastAPIRequirement(scopes, audience)


def _http_error(gate: Gate, error: Exception, scopes: list[str]) -> Exception:
    from starlette.exceptions import HTTPException

    response = gate.response_for(error, scopes=scopes)
    # HTTPException headers are a mapping: the challenges share one header,
    # comma-separated, as RFC 9110 section 11.6.1 allows.
    challenges = [v for k, v in response.headers if k == "WWW-Authenticate"]
    detail = json.loads(response.body)["error_description"]
    return HTTPException(
        response.status, detail=detail, headers={"WWW-Authenticate": ", ".join(challenges)}
    )
