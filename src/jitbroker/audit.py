"""Audit events and where they go.

Every lease transition becomes an ``AuditEvent`` carrying a snapshot of the
lease (which holds no secret: never the token, never a key). Events go to the
``jitbroker.audit`` logger (with the event as structured ``extra``) and to any
callables passed as sinks. A failing sink is logged and never breaks the
operation that emitted the event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from .lease import Lease

__all__ = ["AuditEvent", "Auditor", "Sink"]

log = logging.getLogger("jitbroker.audit")
Sink = Callable[["AuditEvent"], object]


@attrs.frozen
class AuditEvent:
    """One thing that happened to a lease (or, for bulk revocation, to many)."""

    action: str  # issued, renewed, attenuated, revoked, expired
    at: float
    lease: Lease | None = None
    reason: str | None = None
    count: int | None = None
    where: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the event."""
        out = attrs.asdict(self, recurse=True)
        return {k: v for k, v in out.items() if v is not None}


class Auditor:
    """Fans events out to the audit logger and the configured sinks."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks = tuple(sinks)

    def emit(self, action: str, at: float, lease: Lease | None = None, **details: Any) -> None:
        """Emit one event; does nothing (cheaply) when nobody listens."""
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
                log.exception("audit sink %r failed on a %s event", sink, action)
