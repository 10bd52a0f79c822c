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
    from .errors import (
        InvalidClient,
        MalformedRequest,
        NoCredentials,
        NonceRequired,
        RequestRejected,
    )
    from .nonces import DPoPNonces
    from .proxies import TrustedProxies
    from .requirements import Requirement, authorize, require
    from .responses import ErrorResponse, error_response
    from .service import broker_app
    from .sources import AsyncTokenSource, Grant, TokenSource
    from .trust import Caller, ClientKey, ClientSecret, Trust, TrustRule, hash_client_secret
    from .wsgi import WSGIBearer

_EXPORTS = {
    "AsyncTokenSource": ".sources",
    "BearerAuth": ".asgi",
    "BrokerAuth": ".client",
    "Caller": ".trust",
    "ClientKey": ".trust",
    "ClientSecret": ".trust",
    "DPoPNonces": ".nonces",
    "ErrorResponse": ".responses",
    "Grant": ".sources",
    "InvalidClient": ".errors",
    "JitbrokerBackend": ".backend",
    "JitbrokerUser": ".backend",
    "MalformedRequest": ".errors",
    "NoCredentials": ".errors",
    "NonceRequired": ".errors",
    "RequestRejected": ".errors",
    "Requirement": ".requirements",
    "TokenSource": ".sources",
    "Trust": ".trust",
    "TrustRule": ".trust",
    "TrustedProxies": ".proxies",
    "WSGIBearer": ".wsgi",
    "authorize": ".requirements",
    "broker_app": ".service",
    "error_response": ".responses",
    "hash_client_secret": ".trust",
    "require": ".requirements",
}

__all__ = [
    "AsyncTokenSource",
    "BearerAuth",
    "BrokerAuth",
    "Caller",
    "ClientKey",
    "ClientSecret",
    "DPoPNonces",
    "ErrorResponse",
    "Grant",
    "InvalidClient",
    "JitbrokerBackend",
    "JitbrokerUser",
    "MalformedRequest",
    "NoCredentials",
    "NonceRequired",
    "RequestRejected",
    "Requirement",
    "TokenSource",
    "Trust",
    "TrustRule",
    "TrustedProxies",
    "WSGIBearer",
    "authorize",
    "broker_app",
    "error_response",
    "hash_client_secret",
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
