"""Run an async store through the sync conformance suite.

``SyncOverAsync(factory)`` starts an event loop in a thread, builds the async
store on it, and exposes the ``LeaseStore`` methods as blocking calls that run
the coroutines on that loop. Several test threads may call at once (the loop
interleaves them), which is what the suite's concurrency tests need.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class SyncOverAsync:
    """A blocking facade over an async store living on its own event loop."""

    blocking = True

    def __init__(self, factory: Callable[[], Awaitable[Any]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store: Any = self._call(_awaited(factory))
        # The loop outlives close(): like a sync store, a closed one may be used
        # again (the conformance fixture clears a store its test has closed).
        self._stop = weakref.finalize(self, _stop_loop, self._loop, self._thread)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(method(*args, **kwargs))

        return call

    def add(self, lease: Any, quotas: Sequence[Any] = (), **outbox: Any) -> bool:
        return bool(self._call(self.store.add(lease, quotas, **outbox)))

    def get(self, lease_id: str) -> Any:
        return self._call(self.store.get(lease_id))

    def revoke(self, lease_id: str, *, at: float, reason: str, **outbox: Any) -> Any:
        return self._call(self.store.revoke(lease_id, at=at, reason=reason, **outbox))

    def revoke_where(self, where: Any, *, at: float, reason: str, **outbox: Any) -> Any:
        return self._call(self.store.revoke_where(where, at=at, reason=reason, **outbox))

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Any:
        return self._call(self.store.extend(lease_id, expires_at=expires_at, at=at))

    def find(self, where: Any) -> Any:
        return self._call(self.store.find(where))

    def claim_expired(
        self, now: float, limit: int = 1000, expire_hooks: Any = (), **outbox: Any
    ) -> Any:
        return self._call(self.store.claim_expired(now, limit, expire_hooks, **outbox))

    def purge(self, before: float) -> int:
        return int(self._call(self.store.purge(before)))

    def close(self) -> None:
        """Close the store (idempotent); the loop stops once the facade is gone."""
        self._call(self.store.close())


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


async def _awaited(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()
