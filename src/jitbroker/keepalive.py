"""``cred.keep_alive()``: renew a credential in the background while a block runs.

A long job that cannot know its duration takes a short TTL and keeps it alive:
the lease stays short-lived (a crashed job's lease dies within one TTL) while
the job runs as long as it needs. ``with cred.keep_alive() as live:`` on a
``Broker`` (a daemon thread), ``async with`` on either broker (a task). Read
the current token as ``live.token``: each renewal re-signs it. With
``children=True`` each renewal extends the leases it delegated too
(``broker.renew(..., children=True)``).

Renewal stops quietly when the lease reaches its maximum lifetime, dies
(revoked, expired), or the policy no longer allows it; a store error is logged
and retried at the next tick, so a blip shorter than the remaining lifetime
costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from .clock import Duration, seconds
from .errors import InvalidRequest, JitBrokerError, LeaseError, PolicyDenied

if TYPE_CHECKING:
    from .lease import Credential, Lease

__all__ = ["KeepAlive"]

log = logging.getLogger("jitbroker.keepalive")
#: Renewal errors that another try cannot fix: renewal stops.
_FINAL = (LeaseError, PolicyDenied)


class KeepAlive:
    """Renews ``credential`` every ``every`` seconds (default: a third of its
    TTL) for ``ttl`` more seconds each time (default: its TTL) until the block
    ends; ``credential`` is then the last one issued."""

    def __init__(
        self,
        credential: Credential,
        every: Duration | None = None,
        ttl: Duration | None = None,
        children: bool = False,
    ) -> None:
        if not isinstance(children, bool):
            raise InvalidRequest("keep_alive children must be True or False")
        lease = credential.lease
        life = max(lease.expires_at - lease.issued_at, 0.001)
        self.ttl = life if ttl is None else seconds(ttl, "ttl")
        self.every = self.ttl / 3 if every is None else seconds(every, "every")
        if self.every >= self.ttl:
            raise InvalidRequest(
                f"keep_alive every={self.every:g}s must be shorter than the ttl {self.ttl:g}s,"
                " or the lease expires between renewals"
            )
        self.credential = credential
        #: Whether each renewal extends the lease's descendants too.
        self.children = children
        self.renewals = 0
        #: Why renewal stopped early (the lease died, hit its cap, or the policy
        #: refused it), or None.
        self.stopped: JitBrokerError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def token(self) -> str:
        """The current token."""
        return self.credential.token

    @property
    def lease(self) -> Lease:
        """The current lease (its ``expires_at`` moves with each renewal)."""
        return self.credential.lease

    def __repr__(self) -> str:
        return f"<KeepAlive lease={self.lease.id} renewals={self.renewals}>"

    # -- sync ---------------------------------------------------------------
    def __enter__(self) -> KeepAlive:
        from .broker import Broker

        if not isinstance(self.credential._broker, Broker):
            raise InvalidRequest(
                "with cred.keep_alive() needs a credential of a Broker; on an AsyncBroker"
                " use `async with cred.keep_alive()`"
            )
        self._thread = threading.Thread(target=self._loop, name="jitbroker-keep-alive", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        broker = self.credential._broker
        while not self._stop.wait(self.every):
            try:
                self.credential = broker.renew(  # type: ignore[union-attr,assignment]
                    self.credential, self.ttl, children=self.children
                )
            except _FINAL as exc:  # dead, at its cap, or refused: nothing more to do
                self._ended(exc)
                return
            except Exception:  # a store blip: the next tick retries
                log.warning("keep_alive: renewing lease %s failed", self.lease.id, exc_info=True)
            else:
                self.renewals += 1

    # -- async --------------------------------------------------------------
    async def __aenter__(self) -> KeepAlive:
        if self.credential._broker is None:
            raise InvalidRequest("this credential is not bound to a broker")
        self._task = asyncio.create_task(self._aloop(), name="jitbroker-keep-alive")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our own block is being cancelled: let it be

    async def _aloop(self) -> None:
        from .broker import AsyncBroker

        broker = self.credential._broker
        while True:
            await asyncio.sleep(self.every)
            try:
                if isinstance(broker, AsyncBroker):
                    renewed = await broker.renew(self.credential, self.ttl, children=self.children)
                else:  # a sync Broker's store may block: keep it off the loop
                    renewed = await asyncio.to_thread(broker.renew, self.credential, self.ttl)  # type: ignore[union-attr]
            except _FINAL as exc:
                self._ended(exc)
                return
            except Exception:
                log.warning("keep_alive: renewing lease %s failed", self.lease.id, exc_info=True)
            else:
                self.credential = renewed
                self.renewals += 1

    def _ended(self, error: JitBrokerError) -> None:
        self.stopped = error
        log.info("keep_alive: lease %s no longer renews: %s", self.lease.id, error)
