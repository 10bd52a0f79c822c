"""jitbroker over HTTP (extra ``jitbroker[web]``): services that verify tokens,
clients that carry them.

Resource servers: ``BearerAuth`` (pure ASGI middleware), ``WSGIBearer`` (the
same for WSGI: Flask, Django), ``require`` (a FastAPI/Starlette dependency for
per-route scopes), ``JitbrokerBackend`` (a Starlette ``AuthenticationBackend``)
and ``error_response`` (verification failure -> status, headers, body, for any
other framework). Clients: ``BrokerAuth`` (an ``httpx.Auth``, with a ``requests``
twin), and ``TokenSource`` / ``AsyncTokenSource`` / ``Grant``, the protocols a
token source implements for ``BrokerAuth.from_source``.

Every name loads on first use (PEP 562), so ``from jitbroker.web import
WSGIBearer`` imports neither Starlette nor httpx, and ``import jitbroker``
never imports this package at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .asgi import BearerAuth
    from .backend import JitbrokerBackend, JitbrokerUser
    from .client import BrokerAuth
    from .errors import MalformedRequest, NoCredentials, NonceRequired, RequestRejected
    from .nonces import DPoPNonces
    from .proxies import TrustedProxies
    from .requirements import Requirement, authorize, require
    from .responses import ErrorResponse, error_response
    from .sources import AsyncTokenSource, Grant, TokenSource
    from .wsgi import WSGIBearer

_EXPORTS = {
    "AsyncTokenSource": ".sources",
    "BearerAuth": ".asgi",
    "BrokerAuth": ".client",
    "DPoPNonces": ".nonces",
    "ErrorResponse": ".responses",
    "Grant": ".sources",
    "JitbrokerBackend": ".backend",
    "JitbrokerUser": ".backend",
    "MalformedRequest": ".errors",
    "NoCredentials": ".errors",
    "NonceRequired": ".errors",
    "RequestRejected": ".errors",
    "Requirement": ".requirements",
    "TokenSource": ".sources",
    "TrustedProxies": ".proxies",
    "WSGIBearer": ".wsgi",
    "authorize": ".requirements",
    "error_response": ".responses",
    "require": ".requirements",
}

__all__ = [
    "AsyncTokenSource",
    "BearerAuth",
    "BrokerAuth",
    "DPoPNonces",
    "ErrorResponse",
    "Grant",
    "JitbrokerBackend",
    "JitbrokerUser",
    "MalformedRequest",
    "NoCredentials",
    "NonceRequired",
    "RequestRejected",
    "Requirement",
    "TokenSource",
    "TrustedProxies",
    "WSGIBearer",
    "authorize",
    "error_response",
    "require",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
