"""Token sources: where a ``BrokerAuth`` gets, renews and revokes its tokens.

A source does the I/O and nothing else; every decision (when to renew, what to
fall back on) is ``BrokerAuth``'s. Two small protocols, one per way of waiting:
``TokenSource`` for synchronous clients, ``AsyncTokenSource`` for asyncio. Here
are the in-process sources, over a ``Broker`` or an ``AsyncBroker``; a broker
reached over HTTP is another implementation of the same protocols.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import attrs

from ..broker import AsyncBroker, Broker
from ..clock import Clock, Duration
from ..errors import InvalidRequest
from ..keys import Key
from ..lease import Credential

__all__ = [
    "REVOKE_REASON",
    "AsyncBrokerSource",
    "AsyncTokenSource",
    "BrokerSource",
    "Grant",
    "IssueArgs",
    "ThreadedSource",
    "TokenSource",
    "is_async",
    "source_for",
]

#: The revocation reason of a lease whose client was closed (in the audit trail).
REVOKE_REASON = "client-closed"


@runtime_checkable
class Grant(Protocol):
    """What a source hands out: a ``Credential``, or any value with these three."""

    @property
    def token(self) -> str: ...

    @property
    def lease_id(self) -> str: ...

    @property
    def expires_at(self) -> float: ...


class TokenSource(Protocol):
    """A source of tokens for synchronous clients."""

    @property
    def clock(self) -> Clock: ...

    def issue(self) -> Grant: ...

    def renew(self, grant: Grant) -> Grant: ...

    def revoke(self, grant: Grant) -> object: ...


class AsyncTokenSource(Protocol):
    """A source of tokens for asyncio clients."""

    @property
    def clock(self) -> Clock: ...

    async def issue(self) -> Grant: ...

    async def renew(self, grant: Grant) -> Grant: ...

    async def revoke(self, grant: Grant) -> object: ...


@attrs.frozen
class IssueArgs:
    """What every ``issue`` (and, for ``ttl``, every ``renew``) of one client asks for."""

    subject: str
    audience: str
    scopes: tuple[str, ...] | str = ()
    ttl: Duration | None = None
    task: str | None = None
    owner: str | None = None
    purpose: str | None = None
    holder_key: Key | None = None  # public: the broker binds the token to it

    @classmethod
    def of(cls, scopes: Iterable[str] | str, **args: Any) -> IssueArgs:
        """Arguments with ``scopes`` frozen into a tuple (a str stays as given)."""
        return cls(scopes=scopes if isinstance(scopes, str) else tuple(scopes), **args)


def _ref(grant: Grant) -> Any:
    # A Credential renews an opaque token too; a lease id is enough for a JWS.
    return grant if isinstance(grant, Credential) else grant.lease_id


class BrokerSource:
    """``TokenSource`` over a ``Broker`` in this process."""

    def __init__(self, broker: Broker, args: IssueArgs) -> None:
        self._broker, self._args = broker, args
        self.clock = broker.clock

    def issue(self) -> Grant:
        a = self._args
        return self._broker.issue(
            a.subject, a.audience, a.scopes, a.ttl,
            task=a.task, owner=a.owner, purpose=a.purpose, holder_key=a.holder_key,
        )  # fmt: skip

    def renew(self, grant: Grant) -> Grant:
        return self._broker.renew(_ref(grant), self._args.ttl)

    def revoke(self, grant: Grant) -> bool:
        return self._broker.revoke(_ref(grant), REVOKE_REASON)

    def __repr__(self) -> str:
        return f"<BrokerSource {self._broker!r}>"


class AsyncBrokerSource:
    """``AsyncTokenSource`` over an ``AsyncBroker`` in this process."""

    def __init__(self, broker: AsyncBroker, args: IssueArgs) -> None:
        self._broker, self._args = broker, args
        self.clock = broker.clock

    async def issue(self) -> Grant:
        a = self._args
        return await self._broker.issue(
            a.subject, a.audience, a.scopes, a.ttl,
            task=a.task, owner=a.owner, purpose=a.purpose, holder_key=a.holder_key,
        )  # fmt: skip

    async def renew(self, grant: Grant) -> Grant:
        return await self._broker.renew(_ref(grant), self._args.ttl)

    async def revoke(self, grant: Grant) -> bool:
        return await self._broker.revoke(_ref(grant), REVOKE_REASON)

    def __repr__(self) -> str:
        return f"<AsyncBrokerSource {self._broker!r}>"


class ThreadedSource:
    """A synchronous source used from asyncio code: each call runs in a thread, so
    a store that blocks (SQLite, PostgreSQL) never blocks the event loop."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source
        self.clock = source.clock

    async def issue(self) -> Grant:
        return await asyncio.to_thread(self._source.issue)

    async def renew(self, grant: Grant) -> Grant:
        return await asyncio.to_thread(self._source.renew, grant)

    async def revoke(self, grant: Grant) -> object:
        return await asyncio.to_thread(self._source.revoke, grant)


def source_for(broker: object, args: IssueArgs) -> BrokerSource | AsyncBrokerSource:
    """The in-process source over ``broker`` (a ``Broker`` or an ``AsyncBroker``)."""
    if isinstance(broker, Broker):
        return BrokerSource(broker, args)
    if isinstance(broker, AsyncBroker):
        return AsyncBrokerSource(broker, args)
    raise InvalidRequest(
        "BrokerAuth needs a Broker or an AsyncBroker (or a token source: BrokerAuth.from_source)"
    )


def is_async(source: TokenSource | AsyncTokenSource) -> bool:
    """True for an ``AsyncTokenSource`` (its ``issue`` is a coroutine function)."""
    return inspect.iscoroutinefunction(source.issue)
