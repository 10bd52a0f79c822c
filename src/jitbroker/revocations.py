"""``RevocationCache``: verify online without a store round trip, safely.

A shared store (Redis, PostgreSQL) announces every revocation on a channel. A
``RevocationCache`` subscribed to it holds the ids of recently revoked leases,
so a ``Verifier`` can check a JWS token against local memory instead of asking
the store. That is only sound while the cache is known to be current, so:

- the feed subscribes first and then loads every recent revocation from the
  store (a full resync), so nothing revoked in between is missed; it does the
  same after every reconnect;
- the cache is *fresh* only while the feed is connected and was confirmed live
  (a message or a heartbeat answer) within ``max_staleness`` seconds; a stale
  cache makes the verifier ask the store again (and reject if the store is
  down): a revocation is honoured within ``max_staleness`` at worst;
- an id is remembered for ``window`` seconds (at least the longest token
  lifetime plus leeway: after that its tokens are expired anyway) and never
  evicted early; if more than ``max_entries`` are held, the cache stops
  claiming to be fresh rather than forget one.

Opaque tokens always need their lease (their claims live there), so they keep
one round trip.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

from .clock import Duration, seconds

__all__ = ["RevocationCache", "parse_ids", "start_feed"]

log = logging.getLogger("jitbroker")
#: A resync loads revocations of leases that expired up to this long ago: tokens
#: verify until exp plus leeway, and leeway is at most 60 s.
RESYNC_MARGIN = 60.0
#: One connection's life: subscribe, resync, follow; returns or raises when it ends.
Session = Callable[["RevocationCache", threading.Event], None]


class RevocationCache:
    """Recently revoked lease ids, and whether that knowledge is current.

    A feed (``RedisStore.revocations()``, ``PostgresStore.revocations()``) calls
    ``resync``, ``add``, ``alive`` and ``down``; verifiers call ``fresh`` and
    ``revoked``. ``close()`` stops the feed.
    """

    def __init__(
        self,
        *,
        window: Duration,
        max_staleness: Duration = 5,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = seconds(window, "window")
        self.max_staleness = seconds(max_staleness, "max_staleness")
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._ids: dict[str, float] = {}  # lease id -> when it may be forgotten
        self._order: list[tuple[float, str]] = []
        self._live_at: float | None = None  # None: not connected / never synced
        self._stop: Callable[[], None] | None = None

    def __repr__(self) -> str:
        state = "fresh" if self.fresh() else "stale"
        return f"<RevocationCache {state} ids={len(self._ids)}>"

    # -- for verifiers -------------------------------------------------------
    def fresh(self) -> bool:
        """True if the cache may stand in for the store right now."""
        live = self._live_at
        return (
            live is not None
            and self.clock() - live <= self.max_staleness
            and len(self._ids) <= self.max_entries
        )

    def revoked(self, lease_id: str) -> bool:
        """True if ``lease_id`` was revoked within the window."""
        return lease_id in self._ids

    # -- for feeds -------------------------------------------------------------
    def resync(self, ids: Iterable[str]) -> None:
        """After (re)subscribing: add every recent revocation, then count as live."""
        self.add(ids)
        self.alive()

    def add(self, ids: Iterable[str]) -> None:
        """Remember revoked lease ids (from a message or a resync)."""
        now = self.clock()
        forget_at = now + self.window
        with self._lock:
            for lease_id in ids:
                if lease_id not in self._ids:
                    self._ids[lease_id] = forget_at
                    heapq.heappush(self._order, (forget_at, lease_id))
            self._expire(now)

    def alive(self) -> None:
        """The feed is connected and just heard from the server."""
        self._live_at = self.clock()
        with self._lock:
            self._expire(self._live_at)

    def down(self) -> None:
        """The feed lost its connection: stop standing in for the store."""
        self._live_at = None

    def attach(self, stop: Callable[[], None]) -> None:
        """Give the cache the function that stops its feed (used by ``close``)."""
        self._stop = stop

    def close(self) -> None:
        """Stop the feed; the cache is stale from now on. Idempotent."""
        self.down()
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def _expire(self, now: float) -> None:
        order = self._order
        while order and order[0][0] <= now:
            _, lease_id = heapq.heappop(order)
            self._ids.pop(lease_id, None)


def start_feed(cache: RevocationCache, session: Session, *, heartbeat: float) -> RevocationCache:
    """Run ``session`` in a daemon thread until ``cache.close()``: whenever it ends
    (a lost connection, a bad message), mark the cache down and start a new one,
    backing off up to 5 s. Each session must subscribe before it resyncs."""
    stop = threading.Event()

    def loop() -> None:
        pause = 0.1
        while not stop.is_set():
            try:
                session(cache, stop)
            except Exception as exc:
                log.warning("revocation feed interrupted, verifying against the store: %s", exc)
            finally:
                pause = 0.1 if cache.fresh() else min(pause * 2, 5.0)
                cache.down()
            stop.wait(pause)

    thread = threading.Thread(target=loop, name="jitbroker-revocations", daemon=True)

    def halt() -> None:
        stop.set()
        thread.join(timeout=heartbeat + 10)

    cache.attach(halt)
    thread.start()
    return cache


def parse_ids(payload: str | bytes) -> list[str]:
    """The lease ids of one revocation message (a JSON list of strings); a
    ``ValueError`` for anything else, which ends the session: resync, never skip."""
    ids = json.loads(payload)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError("unexpected revocation message")
    return ids
