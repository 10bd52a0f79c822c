"""Audit events of the broker service: one per endpoint decision, with the caller.

The broker audits what happens to leases (``issued``, ``attenuated``,
``renewed``, ``revoked``, ``denied``); the service adds one
``token_endpoint`` event per request it decides, through the broker's own
auditor (the same ``jitbroker.audit`` logger and sinks), saying which endpoint
decided what for whom:

- ``where``: ``endpoint=/token decision=issued grant=client_credentials`` and
  the caller's proven identity: ``caller_issuer``, ``caller_subject`` (the
  assertion's ``sub``), ``caller_rule``, ``caller_method``;
- ``actor``: the jitbroker subject the caller maps to (None if unauthenticated);
- ``error``: the RFC 6749 error code of a refusal; ``reason``: its full
  reason (our own fixed texts and codes: never a token, an assertion, a
  secret or an input echoed);
- ``lease``: the lease issued, renewed, revoked or introspected, when there is one.

Decisions: ``issued``, ``exchanged``, ``renewed``, ``revoked``, ``offboarded``,
``introspected`` (active or not: ``reason`` says ``active``/``inactive``) and
``denied``.
"""

from __future__ import annotations

from ..audit import Auditor, EventType
from ..clock import Clock
from ..lease import Lease
from .trust import Caller

__all__ = ["ENDPOINT_EVENT", "ServiceAudit"]

ENDPOINT_EVENT = EventType.TOKEN_ENDPOINT


def _quoted(value: str) -> str:
    return repr(value[:256])


class ServiceAudit:
    """Emits the service's ``token_endpoint`` events on the broker's auditor."""

    def __init__(self, auditor: Auditor, clock: Clock) -> None:
        self.auditor = auditor
        self.clock = clock

    def decided(
        self,
        endpoint: str,
        decision: str,
        caller: Caller | None,
        *,
        grant: str | None = None,
        lease: Lease | None = None,
        error: str | None = None,
        reason: str | None = None,
        count: int | None = None,
    ) -> None:
        """Audit one decision of ``endpoint`` about ``caller``'s request."""
        where = [f"endpoint={endpoint}", f"decision={decision}"]
        if grant is not None:
            where.append(f"grant={grant}")
        if caller is not None:
            where += [
                f"caller_issuer={_quoted(caller.issuer)}",
                f"caller_subject={_quoted(caller.assertion_subject)}",
                f"caller_rule={_quoted(caller.rule)}",
                f"caller_method={caller.method}",
            ]
        self.auditor.emit(
            ENDPOINT_EVENT,
            self.clock(),
            lease,
            where=" ".join(where),
            actor=None if caller is None else caller.subject,
            error=error,
            reason=reason,
            count=count,
        )
