"""The broker as the service calls it: the same coroutines for ``Broker`` and ``AsyncBroker``.

A ``Broker`` blocks (its store may be SQLite or PostgreSQL), so each call runs
in a worker thread; an ``AsyncBroker`` is awaited. Every call that issues,
renews or attenuates runs inside ``policy.calling(caller)``, so the policy
judges *who* asks (``AccessRequest.caller``), not only for which subject. The
context is entered inside the worker thread itself, so it holds whatever the
thread pool does with context variables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from ..audit import Auditor
from ..broker import AsyncBroker, Broker
from ..errors import InvalidRequest
from ..lease import Credential, Lease
from ..policy import calling
from .trust_sources import WouldBlock, without_waiting

__all__ = ["BrokerCalls"]

T = TypeVar("T")
_NOBODY: Mapping[str, str] = {}


class BrokerCalls:
    """Async calls on ``broker``, each judged with the caller's identity."""

    def __init__(self, broker: Broker | AsyncBroker) -> None:
        if not isinstance(broker, Broker | AsyncBroker):
            raise InvalidRequest("broker_app needs a Broker or an AsyncBroker")
        self.broker = broker
        self.is_async = isinstance(broker, AsyncBroker)
        #: A Broker whose calls never wait (a MemoryStore, no hooks or providers)
        #: is called on the event loop: a worker-thread hop costs more than an issue.
        self.inline = isinstance(broker, Broker) and not broker.blocking
        self.max_ttl: float = broker.max_ttl
        self.leeway: float = broker.leeway
        self.auditor: Auditor = broker.auditor

    async def _call(self, who: Mapping[str, str], method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.broker, method)
        if self.is_async:
            with calling(who):
                return await fn(*args, **kwargs)

        def call() -> Any:
            with calling(who):
                return fn(*args, **kwargs)

        return await run_in_threadpool(call)

    async def issue_for(
        self, authenticate: Callable[[], Any], plan: Callable[[Any], dict[str, Any]]
    ) -> tuple[Any, Credential]:
        """Authenticate the caller, then ``broker.issue(**plan(caller))`` as it:
        for a ``Broker``, both in one worker-thread hop (each hop costs more
        than the issue itself)."""
        broker = self.broker
        if isinstance(broker, AsyncBroker):
            caller = await self.authenticate(authenticate)
            with calling(caller.fields()):
                return caller, await broker.issue(**plan(caller))
        if self.inline:
            try:
                with without_waiting():
                    caller = authenticate()
            except WouldBlock:
                pass  # a fetch or a scrypt is due: all of it in a worker thread
            else:
                with calling(caller.fields()):
                    return caller, broker.issue(**plan(caller))

        def work() -> tuple[Any, Credential]:
            caller = authenticate()
            with calling(caller.fields()):
                return caller, broker.issue(**plan(caller))

        result: tuple[Any, Credential] = await run_in_threadpool(work)
        return result

    async def attenuate(self, who: Mapping[str, str], parent: str, **kwargs: Any) -> Credential:
        """``broker.attenuate(parent, **kwargs)`` as ``who``."""
        cred: Credential = await self._call(who, "attenuate", parent, **kwargs)
        return cred

    async def renew(self, who: Mapping[str, str], lease_id: str, ttl: float | None) -> Credential:
        """``broker.renew(lease_id, ttl)`` as ``who``."""
        cred: Credential = await self._call(who, "renew", lease_id, ttl)
        return cred

    async def revoke(self, lease_id: str, *, by: str) -> bool:
        """``broker.revoke(lease_id)``, recorded as done by ``by``."""
        done: bool = await self._call(_NOBODY, "revoke", lease_id, reason="revoked", by=by)
        return done

    async def revoke_where(self, *, owner: str, by: str) -> int:
        """``broker.revoke_where(owner=owner)``, recorded as done by ``by``."""
        count: int = await self._call(
            _NOBODY, "revoke_where", owner=owner, reason="offboarded", by=by
        )
        return count

    async def lease(self, lease_id: str) -> Lease:
        """``broker.lease(lease_id)`` (``LeaseNotFound`` when unknown)."""
        lease: Lease = await self._call(_NOBODY, "lease", lease_id)
        return lease

    async def authenticate(self, fn: Callable[[], T]) -> T:
        """Client authentication ``fn``: on the event loop while it does not wait
        (a signature check of keys held), else in a worker thread."""
        try:
            with without_waiting():
                return fn()
        except WouldBlock:
            return await run_in_threadpool(fn)

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run a blocking ``fn`` (client authentication: a JWKS refresh, a
        secret's scrypt) in a worker thread."""
        return await run_in_threadpool(fn)
