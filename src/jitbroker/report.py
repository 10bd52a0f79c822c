"""The governance report: what is alive, who is accountable for it, and what
looks wrong, at a glance (``broker.report()``, ``jitbroker report``).

Built from a list of leases by a pure function, so the broker, the async broker
and the CLI (which may have no keys and no hooks) share it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from .clock import Duration, seconds
from .errors import InvalidRequest
from .hooks import FailedHook
from .lease import Lease

__all__ = ["NHI_RISKS", "Finding", "Report", "build_report", "lease_summary"]

NO_OWNER = "(no owner)"

#: The OWASP Top 10 Non-Human Identities Risks (2025), by id.
NHI_RISKS: Mapping[str, str] = {
    "NHI1": "Improper Offboarding",
    "NHI2": "Secret Leakage",
    "NHI3": "Vulnerable Third-Party NHI",
    "NHI4": "Insecure Authentication",
    "NHI5": "Overprivileged NHI",
    "NHI6": "Insecure Cloud Deployment Configurations",
    "NHI7": "Long-Lived Secrets",
    "NHI8": "Environment Isolation",
    "NHI9": "NHI Reuse",
    "NHI10": "Human Use of NHI",
}

#: A delegation chain this many links deep (a delegation of a delegation) is a finding.
DEEP_DELEGATION = 2

#: Each finding of the report, the OWASP NHI risk it is an instance of, and its
#: title. The one table both the JSON (``findings``) and the HTML report use;
#: docs/governance.md gives the reasons.
_FINDINGS: tuple[tuple[str, str, str], ...] = (
    ("unowned", "NHI1", "leases with no owner"),
    ("failed_hooks", "NHI1", "parked hook calls and backend revokes (cleanup that never ran)"),
    ("awaiting_hooks", "NHI1", "expired leases whose on_expire cleanup has not run"),
    ("broad", "NHI5", "leases with wildcard scopes or audience"),
    ("long_lived", "NHI7", "leases that may live longer than {long_ttl:g}s"),
    ("retired_key", "NHI7", "active leases signed by a retired key"),
    ("deep_delegation", "NHI9", f"leases delegated {DEEP_DELEGATION} or more links deep"),
    ("no_purpose", "NHI10", "leases with no purpose"),
)


@attrs.frozen
class Finding:
    """One kind of problem the report looks for, and the OWASP NHI risk it is.

    ``count`` is how many leases it concerns (for ``failed_hooks``, parked jobs;
    for ``awaiting_hooks``, expired leases, whose ids the report does not hold),
    None where it is not known here (no key ring given, or the store cannot
    count); ``leases`` the ids concerned."""

    kind: str
    nhi: str
    title: str
    count: int | None
    leases: tuple[str, ...] = ()

    @property
    def risk(self) -> str:
        """The OWASP NHI risk's name, e.g. ``"Improper Offboarding"``."""
        return NHI_RISKS[self.nhi]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: kind, nhi, risk, title, count and lease ids."""
        return {
            "kind": self.kind,
            "nhi": self.nhi,
            "risk": self.risk,
            "title": self.title,
            "count": self.count,
            "leases": list(self.leases),
        }


def lease_summary(lease: Lease, now: float) -> dict[str, Any]:
    """A JSON-ready summary of a lease (it holds no secret)."""
    out = {
        "id": lease.id,
        "status": lease.status(now),
        "subject": lease.subject,
        "audience": lease.audience,
        "scope": lease.scope,
        "owner": lease.owner,
        "purpose": lease.purpose,
        "task": lease.task,
        "parent": lease.parent,
        "key_id": lease.key_id,
        "issued_at": _iso(lease.issued_at),
        "expires_at": _iso(lease.expires_at),
        "revoked_at": None if lease.revoked_at is None else _iso(lease.revoked_at),
        "revoke_reason": lease.revoke_reason,
    }
    return {k: v for k, v in out.items() if v is not None}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _broad(lease: Lease) -> bool:
    return "*" in lease.audience or any("*" in scope for scope in lease.scopes)


def _lifetime(lease: Lease) -> float:
    """How long the lease may live in all, renewals included."""
    end = lease.max_expires_at if lease.renewable else lease.expires_at
    return max(end, lease.expires_at) - lease.issued_at


@attrs.frozen
class Report:
    """A snapshot for an operator. ``to_dict()`` for machines, ``str()`` for people."""

    generated_at: float
    active: tuple[Lease, ...]
    by_owner: Mapping[str, int]
    by_subject: Mapping[str, int]
    by_audience: Mapping[str, int]
    unowned: tuple[Lease, ...]
    no_purpose: tuple[Lease, ...]
    long_lived: tuple[Lease, ...]
    long_ttl: float
    broad: tuple[Lease, ...]
    retired_key: tuple[Lease, ...] | None  # None: the key ring was not given
    oldest: tuple[Lease, ...]
    delegated: Mapping[str, int]  # active delegated lease id -> its depth
    failed_hooks: tuple[FailedHook, ...] | None  # None: not known here (the CLI)
    churn: Mapping[str, int]
    #: Expired leases no broker has claimed because they need ``on_expire`` hooks,
    #: per ``Lease.expire_hooks`` value: they wait for a broker that has those
    #: hooks (and are not purged meanwhile). None: the store cannot count them.
    awaiting_hooks: Mapping[str, int] | None = None
    #: Every lease record the store still holds, live and dead, oldest first:
    #: the history the HTML report's timeline draws (dead records last until
    #: the sweep purges them, ``exp + max(leeway, retention)``).
    leases: tuple[Lease, ...] = attrs.field(default=(), repr=False)

    def findings(self) -> tuple[Finding, ...]:
        """Every kind of finding, in the order of the OWASP NHI risks."""
        return tuple(
            Finding(kind, nhi, title.format(long_ttl=self.long_ttl), *self._found(kind))
            for kind, nhi, title in _FINDINGS
        )

    def _found(self, kind: str) -> tuple[int | None, tuple[str, ...]]:
        if kind == "awaiting_hooks":
            waiting = self.awaiting_hooks
            return (None if waiting is None else sum(waiting.values())), ()
        if kind == "failed_hooks":
            if self.failed_hooks is None:
                return None, ()
            ids = tuple(dict.fromkeys(h.lease.id for h in self.failed_hooks))
            return len(self.failed_hooks), ids
        if kind == "deep_delegation":
            ids = tuple(i for i, depth in self.delegated.items() if depth >= DEEP_DELEGATION)
            return len(ids), ids
        found: tuple[Lease, ...] | None = getattr(self, kind)
        return (None, ()) if found is None else (len(found), tuple(x.id for x in found))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        now = self.generated_at

        def leases(items: Iterable[Lease]) -> list[dict[str, Any]]:
            return [lease_summary(lease, now) for lease in items]

        return {
            "generated_at": _iso(now),
            "active": len(self.active),
            "by_owner": dict(self.by_owner),
            "by_subject": dict(self.by_subject),
            "by_audience": dict(self.by_audience),
            "unowned": leases(self.unowned),
            "no_purpose": leases(self.no_purpose),
            "long_ttl_seconds": self.long_ttl,
            "long_lived": leases(self.long_lived),
            "broad_scopes": leases(self.broad),
            "retired_key": None if self.retired_key is None else leases(self.retired_key),
            "oldest": leases(self.oldest),
            "delegated": dict(self.delegated),
            "failed_hooks": None
            if self.failed_hooks is None
            else [
                {
                    "id": h.id,
                    "event": h.event,
                    "hook": h.hook,
                    "lease": h.lease.id,
                    "attempts": h.attempts,
                    "error": h.error,
                    "at": _iso(h.at),
                }
                for h in self.failed_hooks
            ],
            "churn": dict(self.churn),
            "awaiting_hooks": None if self.awaiting_hooks is None else dict(self.awaiting_hooks),
            "findings": [finding.to_dict() for finding in self.findings()],
        }

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _lines(self) -> Iterable[str]:
        now = self.generated_at
        yield f"jitbroker report at {_iso(now)}: {len(self.active)} active leases"
        for title, counts in (
            ("by owner", self.by_owner),
            ("by subject", self.by_subject),
            ("by audience", self.by_audience),
        ):
            yield from _table(title, counts)
        findings = (
            ("leases with no owner", self.unowned),
            ("leases with no purpose", self.no_purpose),
            (f"leases that may live longer than {self.long_ttl:g}s", self.long_lived),
            ("leases with wildcard scopes or audience", self.broad),
            ("leases signed by a retired key", self.retired_key),
            ("oldest active leases", self.oldest),
        )
        for title, items in findings:
            if items is None:
                yield f"\n{title}: not known (give the key ring: --keys DIR)"
                continue
            yield f"\n{title}: {len(items)}"
            yield from (f"  {_line(lease, now)}" for lease in items)
        if self.delegated:
            deepest = max(self.delegated.values())
            yield f"\ndelegated leases: {len(self.delegated)} (deepest chain: {deepest})"
        yield from self._hook_lines()
        yield "\nchurn: " + ", ".join(f"{k} {v}" for k, v in self.churn.items())

    def _hook_lines(self) -> Iterable[str]:
        if self.awaiting_hooks is None:
            yield "\nexpired leases awaiting their on_expire hooks: not known (store cannot count)"
        else:
            waiting = sum(self.awaiting_hooks.values())
            yield f"\nexpired leases awaiting a broker with their on_expire hooks: {waiting}"
            yield from (f"  {hooks}  {n}" for hooks, n in self.awaiting_hooks.items())
        if self.failed_hooks is None:
            yield "\nfailed hooks: not known here (each broker keeps its own: broker.report())"
            return
        yield f"\nfailed hooks: {len(self.failed_hooks)}"
        for hook in self.failed_hooks:
            yield (
                f"  {hook.event} {hook.hook} lease {hook.lease.id}: "
                f"{hook.attempts} attempts, last error {hook.error}"
            )


def _table(title: str, counts: Mapping[str, int]) -> Iterable[str]:
    yield f"\n{title}:"
    if not counts:
        yield "  (none)"
    width = max((len(k) for k in counts), default=0)
    yield from (f"  {name:<{width}}  {n}" for name, n in counts.items())


def _line(lease: Lease, now: float) -> str:
    owner = lease.owner or NO_OWNER
    return (
        f"{lease.id}  {lease.subject} -> {lease.audience} [{lease.scope}]  owner={owner}  "
        f"issued {_iso(lease.issued_at)}  expires {_iso(lease.expires_at)}"
    )


def _depths(active: Sequence[Lease], everything: Mapping[str, Lease]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lease in active:
        depth, seen, current = 0, set(), lease
        while current.parent is not None and current.id not in seen:
            seen.add(current.id)
            depth += 1
            parent = everything.get(current.parent)
            if parent is None:
                break
            current = parent
        if depth:
            out[lease.id] = depth
    return out


def build_report(
    leases: Iterable[Lease],
    *,
    now: float,
    keys: Collection[str] | None = None,
    failed_hooks: Iterable[FailedHook] | None = None,
    counts: Mapping[str, int] | None = None,
    sink_failures: int | None = None,
    awaiting_hooks: Mapping[str, int] | None = None,
    long_ttl: Duration = 3600,
    oldest: int = 10,
) -> Report:
    """The report over ``leases`` (live and dead, as ``leases(include_inactive=True)``
    gives). ``keys`` is the key ids still held (None: unknown, no retired-key
    finding); ``counts`` the broker's event counts since it started,
    ``sink_failures`` how many audit sink calls raised; ``awaiting_hooks``
    the store's count of expired leases awaiting hooks (``awaiting_hooks(now)``)."""
    threshold = seconds(long_ttl, "long_ttl")
    if isinstance(oldest, bool) or not isinstance(oldest, int) or oldest < 0:
        raise InvalidRequest("oldest must be a whole number, 0 or more")
    everything = {lease.id: lease for lease in leases}
    active = sorted(
        (x for x in everything.values() if x.is_active(now)), key=lambda x: (x.issued_at, x.id)
    )
    churn = {
        "active": len(active),
        "revoked (retained)": sum(1 for x in everything.values() if x.revoked_at is not None),
        "expired (retained)": sum(
            1 for x in everything.values() if x.revoked_at is None and not x.is_active(now)
        ),
    }
    for event in ("issued", "renewed", "attenuated", "revoked", "expired", "denied"):
        if counts is not None:
            churn[f"{event} (this broker)"] = counts.get(event, 0)
    if sink_failures is not None:
        churn["audit sink failures (this broker)"] = sink_failures
    return Report(
        generated_at=now,
        active=tuple(active),
        by_owner=_count(x.owner or NO_OWNER for x in active),
        by_subject=_count(x.subject for x in active),
        by_audience=_count(x.audience for x in active),
        unowned=tuple(x for x in active if not x.owner),
        no_purpose=tuple(x for x in active if not x.purpose),
        long_lived=tuple(x for x in active if _lifetime(x) > threshold),
        long_ttl=threshold,
        broad=tuple(x for x in active if _broad(x)),
        retired_key=None
        if keys is None
        else tuple(x for x in active if x.key_id is not None and x.key_id not in keys),
        oldest=tuple(active[:oldest]),
        delegated=_depths(active, everything),
        failed_hooks=None if failed_hooks is None else tuple(failed_hooks),
        churn=churn,
        awaiting_hooks=None if awaiting_hooks is None else _sorted_counts(awaiting_hooks),
        leases=tuple(sorted(everything.values(), key=lambda x: (x.issued_at, x.id))),
    )


def _sorted_counts(counts: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(Counter(values).most_common())
