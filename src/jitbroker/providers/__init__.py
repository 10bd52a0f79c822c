"""Providers: backend credentials that live and die with a lease.

A broker given ``providers=[...]`` gives a lease whose audience names a
provider a backend credential of its own (``cred.secret``), made by the
provider's ``create`` and removed by its ``revoke`` whenever the lease dies,
by any path: the store records the revoke in its outbox with the death (see
``jitbroker.outbox``). ``Provider`` is the protocol; ``PostgresRoles`` (a login
role per lease), ``RedisUsers`` (an ACL user per lease), ``WebhookProvider``
(a service in any language, over signed HTTP) and ``CallbackProvider`` (plain
callables) implement it. Importing this package imports no backend driver:
each provider's module is loaded when its name is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import Provider, check_provider_name
from .callback import CallbackProvider

if TYPE_CHECKING:
    from .postgres import PostgresRoles
    from .redis import RedisUsers
    from .webhook import WebhookProvider, sign_webhook, verify_webhook

__all__ = [
    "CallbackProvider",
    "PostgresRoles",
    "Provider",
    "RedisUsers",
    "WebhookProvider",
    "check_provider_name",
    "sign_webhook",
    "verify_webhook",
]

_LAZY = {
    "PostgresRoles": "postgres",
    "RedisUsers": "redis",
    "WebhookProvider": "webhook",
    "sign_webhook": "webhook",
    "verify_webhook": "webhook",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
