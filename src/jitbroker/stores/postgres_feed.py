"""The PostgreSQL revocation feed: one session of a ``RevocationCache``
following a ``PostgresStore``'s numbered revocations (see
``jitbroker.revocations`` for what a cache promises, and
``jitbroker.stores.postgres`` for the schema and statements).

Not public API: ``PostgresStore.revocations()`` starts it.
"""

from __future__ import annotations

import contextlib
import select
import threading
import uuid
from typing import TYPE_CHECKING, Any

import psycopg

from ..clock import Clock
from ..errors import StoreError
from ..revocations import RESYNC_MARGIN, RevocationCache
from .postgres_pool import deadline

if TYPE_CHECKING:
    from .postgres import Cursor, PostgresStore

__all__ = ["Feed"]


class Feed:
    """One session of a PostgreSQL revocation feed, on a LISTENing connection.

    Each round is one statement (``_CATCH_UP``): it acknowledges what the cache
    applied and reads what was revoked (and which keys were retired) since,
    with the epoch and whether the connection still listens. Only then is the
    cache counted live, from the moment that statement was sent
    (``RevocationCache.alive``). Between rounds the feed waits for the socket
    to become readable (a notification) or for ``heartbeat`` seconds.
    Notifications are never parsed, so a forged NOTIFY (any role may send one)
    costs one round, nothing more; one that arrives while a statement runs is
    seen by the handler and brings another round at once. The notification
    generator (``Connection.notifies``) is not used at all: its behaviour
    around queries changed across psycopg 3.2 releases.
    """

    def __init__(
        self,
        store: PostgresStore,
        conn: psycopg.Connection[Any],
        cur: Cursor,
        cache: RevocationCache,
        heartbeat: float,
    ) -> None:
        self.store, self.conn, self.cur, self.cache = store, conn, cur, cache
        self.heartbeat = heartbeat
        self.woken = threading.Event()
        self.params: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "acked": 0,
            "staleness": cache.max_staleness,
            "channel": store.channel,
        }

    def follow(self, stop: threading.Event, clock: Clock) -> None:
        cache, conn = self.cache, self.conn
        conn.add_notify_handler(self._wake)
        try:
            sent = cache.clock()
            # Registered (as having applied nothing) before the snapshot, in a
            # statement of its own: a revoke that commits after the snapshot
            # waits for this cache; one before it is in the snapshot. In one
            # statement the row would commit after the snapshot: a gap.
            self.execute(self.store._sql.register, self.params)
            row = self.execute(self.store._sql.resync, (clock() - RESYNC_MARGIN,))
            if row is None:
                raise StoreError("the lease schema has no meta row: resyncing")
            epoch, self.params["acked"], ids, kids = row
            cache.add(str(i) for i in ids)
            cache.retire(str(k) for k in kids)  # before round() acknowledges them
            self.round()  # registers the cache before it counts as live
            cache.resync((), epoch=epoch, since=sent)
            while not stop.is_set():
                if not self.woken.is_set():
                    self.wait()
                sent = cache.clock()
                cache.check_epoch(self.round())
                cache.alive(sent)
        finally:
            # Stale first, then leave: once the row is gone no revoke waits
            # for this cache, so it must not vouch any more.
            cache.down()
            conn.remove_notify_handler(self._wake)
            with contextlib.suppress(psycopg.Error):
                self.execute(self.store._sql.leave, self.params)

    def round(self) -> float | None:
        """Acknowledge and catch up until nothing new comes; the epoch."""
        while True:
            self.woken.clear()
            row = self.execute(self.store._sql.catch_up, self.params)
            if row is None:
                raise StoreError("the lease schema has no meta row: resyncing")
            listening, epoch, latest, ids, kids = row
            if not listening:
                raise StoreError(
                    f"not listening on {self.store.channel!r}: the connection lost its LISTEN"
                )
            if int(latest) == self.params["acked"]:
                return None if epoch is None else float(epoch)
            self.cache.add(str(i) for i in ids)
            self.cache.retire(str(k) for k in kids)  # retired keys, numbered alike
            self.params["acked"] = int(latest)  # acknowledged by the next statement

    def execute(self, query: bytes, params: Any) -> Any:
        """Run one statement within the store's ``timeout`` (a frozen server ends
        the session, and the cache goes stale, instead of hanging the feed)."""
        with deadline(self.conn, self.store.timeout):
            cur = self.cur.execute(query, params)
            return None if cur.description is None else cur.fetchone()

    def wait(self) -> None:
        """Until the server sends something (a notification) or ``heartbeat``."""
        readable, _, _ = select.select([self.conn.fileno()], [], [], self.heartbeat)
        if readable:
            pgconn = self.conn.pgconn
            pgconn.consume_input()  # raises if the connection was lost
            while pgconn.notifies() is not None:  # read here: a round follows anyway
                pass

    def _wake(self, _: psycopg.Notify) -> None:
        self.woken.set()
