"""Audit events and where they go.

Every lease transition, every denial and every failed verification becomes an
``AuditEvent`` of one ``EventType``, carrying a snapshot of the lease (which
holds no secret: never the token, never a key). Events go to the
``jitbroker.audit`` logger (with the event as structured ``extra``) and to any
sinks passed as ``audit=``: a callable, or a ``JsonLinesSink`` file. A failing
sink is logged, counted, and never breaks the operation that emitted the event.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from .lease import Lease

__all__ = ["AuditEvent", "Auditor", "EventType", "JsonLinesSink", "Sink", "verify_failed"]

log = logging.getLogger("jitbroker.audit")
Sink = Callable[["AuditEvent"], object]


class EventType(enum.StrEnum):
    """What happened. A ``str``: ``event.action == "issued"`` works too."""

    ISSUED = "issued"
    RENEWED = "renewed"
    ATTENUATED = "attenuated"
    REVOKED = "revoked"  # one per lease that transitioned, reason and actor set
    REVOKED_WHERE = "revoked_where"  # one summary per bulk revocation: count and filter
    EXPIRED = "expired"
    DENIED = "denied"  # the policy refused: reasons set, the refused lease as snapshot
    VERIFY_FAILED = "verify_failed"  # error is the exception class, never the token
    KEY_ROTATED = "key_rotated"
    KEY_RETIRED = "key_retired"
    KEY_DROPPED = "key_dropped"
    HOOK_FAILED = "hook_failed"  # a lifecycle hook raised; it will be retried
    HOOK_PARKED = "hook_parked"  # out of retries: see failed hooks in the report
    HOOK_FORGOTTEN = "hook_forgotten"  # parked work dropped by force; ``where`` names it
    # Reconciliation: a backend principal with no live lease was revoked, or a
    # live lease's principal is missing from the backend (``where`` the provider).
    PRINCIPAL_ORPHANED = "principal_orphaned"
    PRINCIPAL_MISSING = "principal_missing"
    # A task's exit revoke failed after its retries: the leases live until their
    # TTL. ``where`` names the run, ``error`` the exception class; never a token.
    TASK_REVOKE_FAILED = "task_revoke_failed"
    # A decision of the broker service's token endpoints (``broker_app``): ``where``
    # names the endpoint, the decision and the caller (issuer, subject, rule,
    # method); ``error`` the RFC 6749 code of a refusal. Never a token or assertion.
    TOKEN_ENDPOINT = "token_endpoint"


@attrs.frozen
class AuditEvent:
    """One thing that happened to a lease (or, for bulk revocation, to many)."""

    action: EventType
    at: float
    lease: Lease | None = None
    reason: str | None = None
    count: int | None = None
    where: str | None = None
    actor: str | None = None  # who revoked (``revoke(..., by=...)``); "reaper" for expiry
    reasons: tuple[str, ...] | None = None  # every reason of a denial
    error: str | None = None  # the error class of a failed verification or hook

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the event (fields that are not set are left out)."""
        out = attrs.asdict(self, recurse=True)
        out["action"] = str(self.action)
        return {k: v for k, v in out.items() if v is not None}


class JsonLinesSink:
    """Appends each event as one JSON object per line to ``path`` (created 0600).

    Each line is written and flushed under a lock, so lines from threads never
    interleave; use one sink per file per process (``O_APPEND`` keeps lines from
    several processes whole on a local filesystem). Close it when done (or use it
    as a context manager): it holds the file open.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent) -> None:
        line = json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            self._file.close()

    def __enter__(self) -> JsonLinesSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<JsonLinesSink path={self.path!r}>"


def verify_failed(auditor: Auditor, error: BaseException, at: float) -> None:
    """Emit ``verify_failed``: the error class, and the lease id when the error
    names one (a lease id is not a secret); never the token."""
    lease_id = getattr(error, "lease_id", None)
    auditor.emit(
        EventType.VERIFY_FAILED,
        at,
        error=type(error).__name__,
        where=f"lease_id={lease_id!r}" if lease_id else None,
    )


class Auditor:
    """Fans events out to the audit logger and the configured sinks, and counts them."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks = tuple(sinks)
        if not all(callable(sink) for sink in self.sinks):
            from .errors import InvalidRequest

            raise InvalidRequest("audit sinks must be callables taking an AuditEvent")
        #: Events emitted per type since this broker started (the report's churn).
        self.counts: dict[str, int] = {}
        #: Sink calls that raised (each one is also logged on ``jitbroker.audit``).
        self.sink_failures = 0
        #: Called with ``(action, lease, details)`` on every event before the
        #: sinks (``jitbroker.metrics`` counts from it: no event object is built).
        self.observer: Callable[[EventType, Lease | None, dict[str, Any]], None] | None = None

    def emit(
        self, action: EventType, at: float, lease: Lease | None = None, **details: Any
    ) -> None:
        """Emit one event; only counts it (cheaply) when nobody listens."""
        counts = self.counts  # a plain dict: Counter's += costs twice as much here
        counts[action] = counts.get(action, 0) + 1
        observer = self.observer
        if observer is not None:
            observer(action, lease, details)
        logged = log.isEnabledFor(logging.INFO)
        if not self.sinks and not logged:
            return
        event = AuditEvent(action, at, lease, **details)
        if logged:
            who = f" lease={lease.id} subject={lease.subject}" if lease is not None else ""
            log.info("%s%s", action, who, extra={"jitbroker": event.to_dict()})
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:
                self.sink_failures += 1
                log.exception("audit sink %r failed on a %s event", sink, action)
