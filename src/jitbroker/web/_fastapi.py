"""``require`` as a FastAPI security dependency; imported only when FastAPI is there.

No ``from __future__ import annotations`` here: FastAPI reads ``__call__``'s
annotations at run time to know what to inject, and an instance has no
``__globals__`` to resolve string annotations against.
"""

from collections.abc import Iterable

from fastapi.security import HTTPBearer, SecurityScopes
from starlette.requests import HTTPConnection

from ..lease import Claims
from .requirements import Requirement

__all__ = ["FastAPIRequirement"]

_NONE = SecurityScopes()  # a Starlette endpoint's call: `await requirement(request)`


class FastAPIRequirement(Requirement, HTTPBearer):
    """A ``Requirement`` that FastAPI also lists as the ``jitbroker`` bearer
    scheme in OpenAPI; ``Security(req, scopes=[...])`` adds required scopes."""

    def __init__(self, scopes: Iterable[str] | str = (), audience: str | None = None) -> None:
        Requirement.__init__(self, scopes, audience)
        HTTPBearer.__init__(
            self,
            bearerFormat="JWT",
            scheme_name="jitbroker",
            description="A jitbroker access token (Bearer, or DPoP for key-bound tokens).",
        )

    async def __call__(  # type: ignore[override]
        self, request: HTTPConnection, security_scopes: SecurityScopes = _NONE
    ) -> Claims:
        return self.check(request.scope, security_scopes.scopes)
