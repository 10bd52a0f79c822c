"""``RevocationCache``: verify online without a store round trip, safely.

A shared store (Redis, PostgreSQL) numbers every revocation, in the same
atomic step, in a log it keeps. A ``RevocationCache`` whose feed follows that
log holds the ids of recently revoked leases, so a ``Verifier`` can check a JWS
token against local memory instead of asking the store. That is only sound
while the cache is known to be current, so:

- the feed registers the cache in the store first, then loads every recent
  revocation from the store (a full resync) and follows the log from there,
  so nothing revoked in between is missed; it does the same after every
  reconnect;
- the cache is *fresh* only while the feed is connected and its knowledge was
  confirmed current (an authoritative read of the store's revocation log, or a
  heartbeat answer) within ``max_staleness`` seconds, counted from when that
  confirming request was *sent*; a stale cache makes the verifier ask the
  store again (and reject if the store is down);
- messages are hints, never the authority: a PostgreSQL NOTIFY (which any
  role may send) only wakes the feed, which then reads the ids revoked since
  the last one it applied from the leases table; the Redis feed reads a stream
  kept in the store itself, whose entries carry consecutive numbers, so a
  missing one ends the session (resync) instead of being skipped;
- revocation is *strict* by default: each live cache registers in the store
  and acknowledges the number of the last revocation it applied; ``revoke``
  returns only once every live cache acknowledged it, or once the cache that
  did not can no longer be fresh (its last confirmation plus its
  ``max_staleness`` have passed, by the store's clock). So when ``revoke``
  returns, no cache in any process still vouches for the revoked lease
  (invariant 3), at the price of the feed's latency (milliseconds) in
  ``revoke`` while caches are live, and at most ``max_staleness`` while one of
  them is cut off;
- an id is remembered for ``window`` seconds (at least the longest token
  lifetime plus leeway: after that its tokens are expired anyway) and never
  evicted early; if more than ``max_entries`` are held, the cache stops
  claiming to be fresh rather than forget one;
- a retired signing key travels the same way (invariant 11): the store records
  the retirement and numbers it in the revocation log in the same atomic step
  (a log entry of its own kind, see ``parse_entry``), so a cache applies it in
  order with the revocations and a strict ``retire_key`` waits for every live
  cache as ``revoke`` does. The cache hands each newly retired kid to its
  listeners (``on_retired``: a ``Broker`` drops the key from its ring) before
  it acknowledges, and every resync re-reads every retired kid, so one
  retired while the feed was down is not missed;
- a store that loses its data (a Redis restart without persistence, a
  truncated table) forgets leases and revocations alike, and a cache resynced
  from it would accept tokens whose leases are gone. So each store keeps an
  *epoch*, the time its data began, written once into an empty store; the feed
  reads it with every resync and heartbeat, and the cache vouches only for
  tokens issued after it (``vouches_for``): older ones go to the store, where a
  lost lease is ``UnknownLease``. If the epoch changes under a live feed, the
  feed ends its session and resyncs.

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

from ._drive import Step, Steps
from .clock import Duration, seconds
from .errors import StoreError

__all__ = [
    "ACK_MARGIN",
    "RevocationCache",
    "acknowledged",
    "parse_entry",
    "parse_ids",
    "sleep",
    "start_feed",
]

log = logging.getLogger("jitbroker")
#: A resync loads revocations of leases that expired up to this long ago: tokens
#: verify until exp plus leeway, and leeway is at most 60 s.
RESYNC_MARGIN = 60.0
#: A strict revoke that gave up on a silent cache waits this much past the end
#: of the cache's freshness (by the store's clock), for clock rate differences
#: between hosts and the time the cache's own check takes.
ACK_MARGIN = 0.05
#: One connection's life: subscribe, resync, follow; returns or raises when it ends.
Session = Callable[["RevocationCache", threading.Event], None]
#: Told the kids newly retired (``RevocationCache.on_retired``).
RetiredListener = Callable[[list[str]], object]


class RevocationCache:
    """Recently revoked lease ids, and whether that knowledge is current.

    A feed (``RedisStore.revocations()``, ``PostgresStore.revocations()``) calls
    ``resync``, ``add``, ``check_epoch``, ``alive`` and ``down``; verifiers call
    ``vouches_for`` and ``revoked``. ``close()`` stops the feed.
    """

    #: The store's epoch (POSIX seconds, the store's clock) as of the last
    #: resync: the cache vouches only for tokens issued after it. None until a
    #: resync, or while the store has none (nothing stored since it was emptied).
    epoch: float | None

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
        #: The last ``alive`` (never reset by ``down``): did a session get going?
        self.confirmed_at: float | None = None
        self.epoch = None
        self._stop: Callable[[], None] | None = None
        self._retired: frozenset[str] = frozenset()  # kids, from the feed (few)
        self._listeners: list[RetiredListener] = []

    def __repr__(self) -> str:
        state = "fresh" if self.fresh() else "stale"
        return f"<RevocationCache {state} ids={len(self._ids)} retired={len(self._retired)}>"

    # -- for verifiers -------------------------------------------------------
    def fresh(self) -> bool:
        """True if the cache may stand in for the store right now."""
        live = self._live_at
        return (
            live is not None
            and self.clock() - live <= self.max_staleness
            and len(self._ids) <= self.max_entries
        )

    def vouches_for(self, issued_at: float, leeway: float) -> bool:
        """True if the cache may stand in for the store for a token issued at
        ``issued_at``: it is fresh, and the token was issued at least ``leeway``
        (the verifier's allowance for clock skew) after the store's epoch, so its
        lease was stored in the data the feed follows, not in data since lost."""
        epoch = self.epoch
        return epoch is not None and issued_at >= epoch + leeway and self.fresh()

    def revoked(self, lease_id: str) -> bool:
        """True if ``lease_id`` was revoked within the window."""
        return lease_id in self._ids

    @property
    def retired_keys(self) -> frozenset[str]:
        """The kids of the signing keys the feed reported retired."""
        return self._retired

    def on_retired(self, listener: RetiredListener) -> None:
        """Call ``listener(kids)`` with every kid the feed reports newly retired,
        in the feed's thread, before the cache acknowledges the retirement (so
        a strict ``retire_key`` returns only once the listener ran). It is
        called at once with the kids already known."""
        with self._lock:
            self._listeners.append(listener)
            known = sorted(self._retired)
        if known:
            self._tell(listener, known)

    # -- for feeds -------------------------------------------------------------
    def resync(
        self,
        ids: Iterable[str],
        *,
        epoch: float | None,
        since: float | None = None,
        retired: Iterable[str] = (),
    ) -> None:
        """After (re)subscribing: add every recent revocation and every retired
        kid and take the store's ``epoch`` (read with them, in one snapshot),
        then count as live from ``since`` (see ``alive``)."""
        self.add(ids)
        self.retire(retired)
        self.epoch = epoch
        self.alive(since)

    def check_epoch(self, epoch: float | None) -> None:
        """At a heartbeat: raise ``StoreError`` (ending the feed's session, which
        then resyncs) if the store's epoch is no longer the one of the last resync."""
        if epoch != self.epoch:
            self.down()
            raise StoreError(
                "the store's epoch changed (it lost its data or was emptied): resyncing"
            )

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

    def retire(self, kids: Iterable[str]) -> None:
        """Signing keys retired (from a log entry or a resync): tell the
        listeners the kids not known before."""
        with self._lock:
            new = sorted(set(kids) - self._retired)
            if not new:
                return
            self._retired = self._retired | set(new)
            listeners = list(self._listeners)
        for listener in listeners:
            self._tell(listener, new)

    @staticmethod
    def _tell(listener: RetiredListener, kids: list[str]) -> None:
        try:
            listener(kids)
        except Exception:  # one broker's failure must not stop the feed for others
            log.exception("a listener for retired keys failed")

    def alive(self, since: float | None = None) -> None:
        """The feed is connected, and knew every revocation as of ``since`` (the
        cache's clock when it sent the request whose answer proved it; default
        now). Freshness counts from then: an answer may come late, but the
        store's state it reflects is no older than the request."""
        live_at = self.clock() if since is None else since
        self._live_at = self.confirmed_at = live_at
        with self._lock:
            self._expire(live_at)

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
            began = cache.clock()
            try:
                session(cache, stop)
            except Exception as exc:
                log.warning("revocation feed interrupted, verifying against the store: %s", exc)
            finally:
                cache.down()
                # A session that got going reconnects at once; one that never
                # did backs off, up to 5 s.
                confirmed = cache.confirmed_at
                pause = 0.1 if confirmed is not None and confirmed >= began else min(pause * 2, 5.0)
            stop.wait(pause)

    thread = threading.Thread(target=loop, name="jitbroker-revocations", daemon=True)

    def halt() -> None:
        stop.set()
        thread.join(timeout=heartbeat + 10)

    cache.attach(halt)
    thread.start()
    return cache


def acknowledged(
    seq: int,
    waiting: tuple[int, float],
    look: Callable[[int], Step],
    pause: Callable[[float], Step],
) -> Steps[None]:
    """A strict revoke's wait, as steps (``jitbroker._drive``): until every live
    cache has applied revocation ``seq``, or can no longer vouch without having
    done so. ``waiting`` and each ``look(seq)`` step's result are (how many live
    caches have not applied it, seconds until the last of them can no longer
    vouch, by the store's clock, ACK_MARGIN included); ``pause(s)`` sleeps.

    The revocation is already durable when this starts. If the store cannot be
    asked meanwhile (``StoreError``), the rest of the wait is slept out
    instead, which is just as safe. Each look may push the deadline out: a cache
    can confirm, after the revocation, knowledge from just before it (its next
    read then brings the revocation at once). A cache that kept doing so would
    be broken; the cap bounds what it can cost.
    """
    pending, longest = waiting
    start = time.monotonic()
    cap, deadline = start + 2 * longest + 1, start + longest
    delay = 0.0005  # a live feed answers within a millisecond or two; then at most 10 ms
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        yield pause(min(delay, remaining))
        delay = min(delay * 2, 0.01)
        try:
            pending, longest = yield look(seq)
        except StoreError:
            yield pause(max(0.0, deadline - time.monotonic()))
            return
        deadline = min(cap, time.monotonic() + longest)


def sleep(seconds: float) -> Step:
    """A step that sleeps (see ``acknowledged``)."""
    return lambda _: time.sleep(seconds)


def parse_ids(payload: str | bytes) -> list[str]:
    """The lease ids of one revocation log entry (a JSON list of strings); a
    ``ValueError`` for anything else (the feed then resyncs, never skips)."""
    ids = json.loads(payload)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError("unexpected revocation message")
    return ids


def parse_entry(
    ids: str | bytes | None, keys: str | bytes | None = None
) -> tuple[list[str], list[str]]:
    """(lease ids, retired kids) of one numbered log entry, from its ``ids``
    and ``keys`` fields; a ``ValueError`` for anything else.

    A revocation's entry has ``ids`` only. A key retirement's has ``keys`` (a
    JSON list of kids) and ``ids`` set to ``[]``: a feed of a version that
    knows nothing of ``keys`` reads it as a revocation of no lease (it
    advances past the number, never takes a kid for a lease id), and a kid is
    only ever read from ``keys``. An entry with both, or with neither, is not
    one jitbroker writes.
    """
    lease_ids = parse_ids(ids if ids is not None else b"")
    if keys is None:
        return lease_ids, []
    kids = parse_ids(keys)
    if lease_ids or not kids:
        raise ValueError("unexpected key retirement message")
    return [], kids
