"""``CallbackProvider``: a provider made of plain callables (sync or ``async def``),
for an API-key service, a cloud IAM call, anything with a create and a delete."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import InvalidRequest
from ..lease import Lease, Secret
from .base import check_provider_name

__all__ = ["CallbackProvider"]


class CallbackProvider:
    """A ``Provider`` from callables taking the ``Lease``: ``create`` returns the
    credential (a ``Secret`` or a mapping of strings), ``revoke`` removes it
    (idempotently), ``managed`` lists the lease ids it holds (for
    reconciliation; without it, reconciliation finds no orphans), ``renew`` and
    ``check`` are optional. An ``async def`` callable runs on an event loop of
    its own (the broker calls providers from a thread without one)."""

    def __init__(
        self,
        name: str,
        *,
        create: Callable[[Lease], Any],
        revoke: Callable[[Lease], Any],
        managed: Callable[[], Iterable[str]] | None = None,
        renew: Callable[[Lease], Any] | None = None,
        check: Callable[[Lease], Any] | None = None,
    ) -> None:
        self.name = check_provider_name(name)
        for label, fn in (("create", create), ("revoke", revoke)):
            if not callable(fn):
                raise InvalidRequest(f"CallbackProvider {label} must be callable")
        self._create, self._revoke = create, revoke
        self._managed, self._renew, self._check = managed, renew, check

    def __repr__(self) -> str:
        return f"<CallbackProvider {self.name!r}>"

    def check(self, lease: Lease) -> None:
        if self._check is not None:
            _finished(self._check(lease))

    def create(self, lease: Lease) -> Secret:
        made = _finished(self._create(lease))
        if isinstance(made, Secret):
            return made
        if isinstance(made, Mapping):
            return Secret(made)
        raise InvalidRequest(f"provider {self.name!r}: create must return a mapping of strings")

    def revoke(self, lease: Lease) -> None:
        _finished(self._revoke(lease))

    def renew(self, lease: Lease) -> None:
        if self._renew is not None:
            _finished(self._renew(lease))

    def managed(self) -> list[str]:
        if self._managed is None:
            return []
        return [str(lease_id) for lease_id in _finished(self._managed())]


def _finished(result: Any) -> Any:
    """``result``, awaited on a loop of its own if it is awaitable."""
    if not inspect.isawaitable(result):
        return result

    async def wait() -> Any:
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    close = getattr(result, "close", None)
    if callable(close):
        close()
    raise InvalidRequest(
        "an async provider callable was called from a thread running an event loop;"
        " the broker calls providers from worker threads"
    )
