"""The Redis revocation feed: one session of a ``RevocationCache`` following a
``RedisStore``'s revocation log (see ``jitbroker.revocations`` for what a cache
promises, and ``jitbroker.stores.redis`` for the keys and scripts).

Not public API: ``RedisStore.revocations()`` / ``AsyncRedisStore.revocations()``
start it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from .._drive import Steps, run
from ..clock import Clock
from ..errors import StoreError
from ..revocations import RESYNC_MARGIN, RevocationCache, parse_entry
from .redis import (
    _ACK,
    _CACHES,
    _LEAVE,
    _PRELUDE,
    _RUNS_OOM,
    RedisLeases,
    _epoch,
    _text,
    _translated,
)

__all__ = ["Feed", "LogPosition"]

log = logging.getLogger("jitbroker")


class Feed:
    """One session of a Redis revocation feed: resync, then follow the log.

    Each round is a blocking XREAD of the log from the last entry applied, then
    the cache's acknowledgement (which also reads the epoch and the last
    revocation's number): only once the store has recorded that, is the cache
    counted live, from the moment the XREAD was sent (``RevocationCache.alive``).
    A revocation numbered past what the log gave (written between the read and
    the acknowledgement) is read at once; one that the log does not have ends
    the session, and the next one resyncs.
    """

    def __init__(
        self,
        store: RedisLeases[Any],
        client: redis.Redis,
        cache: RevocationCache,
        heartbeat: float,
    ) -> None:
        self.store, self.client, self.cache = store, client, cache
        self.log = store._base + "revlog"
        self.id = uuid.uuid4().hex
        self.staleness_ms = max(1, round(cache.max_staleness * 1000))
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        block = heartbeat if timeout is None else min(heartbeat, float(timeout) / 2)
        self.block_ms = max(1, round(block * 1000))
        self.log_pos = LogPosition(0, "0-0")
        # On the feed's own (sync) client, whichever store made it.
        self.ack = client.register_script(_RUNS_OOM + _PRELUDE + _CACHES + _ACK)
        self.leave = client.register_script(_RUNS_OOM + _PRELUDE + _CACHES + _LEAVE)

    def follow(self, stop: threading.Event, clock: Clock) -> None:
        cache, store = self.cache, self.store
        try:
            sent = cache.clock()
            # Registered (as having applied nothing) before the snapshot: a
            # revoke that commits after it waits for this cache; one before it
            # is in the snapshot. Registering after would leave a gap.
            self.acknowledge()
            epoch, seq, ids, last_id, retired = run(
                store._resync_steps(clock() - RESYNC_MARGIN), self.client
            )
            self.log_pos = LogPosition(seq, last_id)
            cache.resync(ids, epoch=epoch, since=sent, retired=retired)
            # Acknowledged once the cache applied the snapshot (its retired
            # keys dropped by the listeners): a strict retire waits for that.
            self.acknowledge()
            while not stop.is_set():
                sent = cache.clock()
                self.read(block=self.block_ms)
                epoch, latest = self.acknowledge()
                if latest > self.log_pos.applied:  # revoked since our read began
                    while latest > self.log_pos.applied:
                        if not self.read(block=None):
                            raise StoreError(
                                f"the revocation log lacks revocation {self.log_pos.applied + 1}"
                                " (trimmed or deleted): resyncing"
                            )
                    epoch, latest = self.acknowledge()
                cache.check_epoch(epoch)
                cache.alive(sent)
        finally:
            # Stale first, then leave: once the row is gone no revoke waits
            # for this cache, so it must not vouch any more.
            cache.down()
            with contextlib.suppress(redis.RedisError, OSError, StoreError):
                run(self._step(self.leave, self.id), self.client)

    def read(self, *, block: int | None) -> bool:
        """Apply what the log holds after our position; False if it held nothing."""
        with _translated("follow the revocation log"):
            reply: Any = self.client.xread(
                {self.log: self.log_pos.last_id}, count=1000, block=block
            )
        # RESP2 gives [[stream, entries]], RESP3 {stream: entries}.
        streams = reply.values() if isinstance(reply, dict) else [s for _, s in reply or ()]
        entries = [entry for stream_entries in streams for entry in stream_entries]
        ids, kids = self.log_pos.take(entries)
        self.cache.add(ids)
        self.cache.retire(kids)  # before the acknowledgement that follows
        return bool(entries)

    def acknowledge(self) -> tuple[float | None, int]:
        """Record in the store what this cache applied; the epoch and the number
        of the last revocation."""
        epoch, latest = run(self._step(self.ack, self.id, self.log_pos.applied), self.client)
        return _epoch(epoch), int(latest)

    def _step(self, script: Any, *args: Any) -> Steps[Any]:
        with _translated("acknowledge revocations"):
            return (yield self.store._script(script, *args, self.staleness_ms))


class LogPosition:
    """Where a feed is in the revocation log: the number of the last revocation
    applied and the id of the last entry read. No I/O."""

    def __init__(self, applied: int, last_id: str) -> None:
        self.applied, self.last_id = applied, last_id

    def take(self, entries: Sequence[tuple[Any, Mapping[Any, Any]]]) -> tuple[list[str], list[str]]:
        """The lease ids to add and the kids retired, from ``entries`` (in log
        order; see ``parse_entry``). An entry that is not ours (no number) is
        skipped with a warning; a gap in the numbers, or one of ours that
        cannot be read, raises ``StoreError``: the session ends and the next
        one resyncs from the leases themselves, never skipping one."""
        ids: list[str] = []
        kids: list[str] = []
        for entry_id, fields in entries:
            self.last_id = _text(entry_id)
            number = _number(fields.get(b"n", fields.get("n")))
            if number is None:
                log.warning("ignored an entry of the revocation log that jitbroker did not write")
                continue
            if number <= self.applied:
                continue
            if number != self.applied + 1:
                raise StoreError(
                    f"the revocation log went from {self.applied} to {number}: resyncing"
                )
            try:
                revoked, retired = parse_entry(
                    fields.get(b"ids", fields.get("ids")) or b"",
                    fields.get(b"keys", fields.get("keys")),
                )
            except ValueError as exc:
                raise StoreError(
                    f"revocation {number} in the log is unreadable: resyncing"
                ) from exc
            ids += revoked
            kids += retired
            self.applied = number
        return ids, kids


def _number(value: Any) -> int | None:
    """A log entry's revocation number, or None if it has none."""
    text = _text(value) if value is not None else ""
    return int(text) if text.isdigit() and len(text) < 20 else None
