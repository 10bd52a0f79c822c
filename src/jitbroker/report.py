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
from .policy import Policy, Rule, covers
from .usage import Usage

__all__ = ["NHI_RISKS", "BlastRadius", "Finding", "Report", "build_report", "lease_summary"]

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

#: A subject that reaches more audiences than this (or any wildcard audience or
#: scope) through its active leases is overprivileged (NHI5); ``build_report(wide_audiences=)``.
WIDE_AUDIENCES = 5

#: Each finding of the report, the OWASP NHI risk it is an instance of, and its
#: title. The one table both the JSON (``findings``) and the HTML report use;
#: docs/governance.md gives the reasons.
_FINDINGS: tuple[tuple[str, str, str], ...] = (
    ("unowned", "NHI1", "leases with no owner"),
    ("failed_hooks", "NHI1", "parked hook calls and backend revokes (cleanup that never ran)"),
    ("awaiting_hooks", "NHI1", "expired leases whose on_expire cleanup has not run"),
    # Usage (jitbroker.usage): a credential nobody uses should not exist (NHI1,
    # offboarding); one verified for an audience it was not issued for is a
    # credential reused across services (NHI9), and should be impossible.
    ("never_used", "NHI1", "active leases issued more than {unused_grace:g}s ago, never used"),
    ("unused", "NHI1", "active leases unused for {unused_days:g} days"),
    ("broad", "NHI5", "leases with wildcard scopes or audience"),
    (
        "overprivileged",
        "NHI5",
        "subjects reaching a wildcard or more than {wide_audiences} audiences (blast radius)",
    ),
    ("long_lived", "NHI7", "leases that may live longer than {long_ttl:g}s"),
    ("retired_key", "NHI7", "active leases signed by a retired key"),
    ("deep_delegation", "NHI9", f"leases delegated {DEEP_DELEGATION} or more links deep"),
    ("foreign_audience", "NHI9", "leases used by audiences they were not issued for"),
    ("no_purpose", "NHI10", "leases with no purpose"),
)


@attrs.frozen
class Finding:
    """One kind of problem the report looks for, and the OWASP NHI risk it is.

    ``count`` is how many leases it concerns (for ``failed_hooks``, parked jobs;
    for ``awaiting_hooks``, expired leases, whose ids the report does not hold;
    for ``overprivileged``, subjects, with their active leases' ids in ``leases``),
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


Pair = tuple[str, str]


def _wild(value: str) -> bool:
    return "*" in value


@attrs.frozen
class BlastRadius:
    """What one subject reaches right now: the (audience, scope) pairs of its
    active leases, its own and those delegated to it (wildcards kept as written).

    A lease with no scope reaches its audience only: it counts in ``audiences``,
    not in ``pairs``. ``depth`` is the deepest delegation chain the subject is
    part of, as actor or principal (0: none). ``remaining`` is the seconds until
    its last active lease expires, renewals not counted. With a policy given,
    ``grantable`` is what its rules would let it get at most (their audiences x
    scopes, as written) and ``outside_policy`` the reached pairs no rule for it
    covers (a lease that outlived a policy change); None without a policy."""

    subject: str
    pairs: tuple[Pair, ...]
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    leases: tuple[str, ...]
    depth: int
    remaining: float
    grantable: tuple[Pair, ...] | None = None
    grantable_audiences: tuple[str, ...] | None = None
    outside_policy: tuple[Pair, ...] | None = None

    @property
    def size(self) -> int:
        """How many (audience, scope) pairs it reaches."""
        return len(self.pairs)

    @property
    def wildcards(self) -> tuple[str, ...]:
        """The wildcard audiences and scopes it reaches, as written."""
        return tuple(x for x in (*self.audiences, *self.scopes) if _wild(x))

    def wide(self, audiences: int) -> bool:
        """True if it reaches a wildcard or more than ``audiences`` audiences."""
        return bool(self.wildcards) or len(self.audiences) > audiences

    def to_dict(self, now: float) -> dict[str, Any]:
        """JSON-ready (it holds no secret)."""
        grant = None
        if self.grantable is not None:
            grant = {
                "audiences": list(self.grantable_audiences or ()),
                "scopes": sorted({scope for _, scope in self.grantable}),
                "pairs": [list(pair) for pair in self.grantable],
            }
        return {
            "subject": self.subject,
            "size": self.size,
            "audience_count": len(self.audiences),
            "scope_count": len(self.scopes),
            "pairs": [list(pair) for pair in self.pairs],
            "audiences": list(self.audiences),
            "scopes": list(self.scopes),
            "wildcards": list(self.wildcards),
            "delegation_depth": self.depth,
            "active_leases": len(self.leases),
            "lease_ids": list(self.leases),
            "longest_remaining_seconds": round(self.remaining, 3),
            "expires_at": _iso(now + self.remaining),
            "grantable": grant,
            "outside_policy": None
            if self.outside_policy is None
            else [list(pair) for pair in self.outside_policy],
        }


def _blast_radius(
    active: Sequence[Lease], everything: Mapping[str, Lease], now: float, policy: Policy | None
) -> list[BlastRadius]:
    """Every subject with an active lease, widest first (pairs, then leases)."""
    by_subject: dict[str, list[Lease]] = {}
    for lease in active:  # a delegated child's subject is its actor: it reaches the child
        by_subject.setdefault(lease.subject, []).append(lease)
    depths = _subject_depths(active, everything)
    out = [
        _radius(subject, leases, depths.get(subject, 0), now, policy)
        for subject, leases in by_subject.items()
    ]
    out.sort(key=lambda r: (-r.size, -len(r.leases), -len(r.audiences), r.subject))
    return out


def _subject_depths(active: Sequence[Lease], everything: Mapping[str, Lease]) -> dict[str, int]:
    """Per subject, the deepest delegation chain it is in: every subject on the
    way from an active delegated lease up to its root gets that chain's depth."""
    out: dict[str, int] = {}
    for lease_id, depth in _depths(active, everything).items():
        current: Lease | None = everything[lease_id]
        seen: set[str] = set()
        while current is not None and current.id not in seen:
            seen.add(current.id)
            out[current.subject] = max(out.get(current.subject, 0), depth)
            current = None if current.parent is None else everything.get(current.parent)
    return out


def _radius(
    subject: str, leases: Sequence[Lease], depth: int, now: float, policy: Policy | None
) -> BlastRadius:
    pairs = sorted({(x.audience, scope) for x in leases for scope in x.scopes})
    radius = BlastRadius(
        subject=subject,
        pairs=tuple(pairs),
        audiences=tuple(sorted({x.audience for x in leases})),
        scopes=tuple(sorted({scope for x in leases for scope in x.scopes})),
        leases=tuple(x.id for x in leases),
        depth=depth,
        remaining=max(x.expires_at for x in leases) - now,
    )
    if policy is None:
        return radius
    rules = [rule for rule in policy.rules if rule.applies_to(subject)]
    return attrs.evolve(
        radius,
        grantable=tuple(sorted({(a, s) for r in rules for a in r.audiences for s in r.scopes})),
        grantable_audiences=tuple(sorted({a for r in rules for a in r.audiences})),
        outside_policy=tuple(pair for pair in pairs if not _granted(rules, pair)),
    )


def _granted(rules: Iterable[Rule], pair: Pair) -> bool:
    audience, scope = pair
    return any(
        any(covers(a, audience) for a in rule.audiences)
        and any(covers(s, scope) for s in rule.scopes)
        for rule in rules
    )


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
    #: Per subject, what its active leases reach: the ``top`` widest of them.
    blast_radius: tuple[BlastRadius, ...] = ()
    #: Over every subject: ``subjects``, ``shown``, ``pairs`` (distinct across
    #: subjects), ``wildcard_subjects``, ``overprivileged``.
    blast_totals: Mapping[str, int] = attrs.field(factory=dict)
    #: Every overprivileged subject (not only the top ones) -> its active lease ids.
    overprivileged: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    wide_audiences: int = WIDE_AUDIENCES
    #: Lease id -> its usage, for the active leases ever used; None: not known
    #: (the store does not record usage, or the CLI read a store without it).
    usage: Mapping[str, Usage] | None = None
    never_used: tuple[Lease, ...] | None = None
    unused: tuple[Lease, ...] | None = None
    foreign_audience: tuple[Lease, ...] | None = None
    unused_days: float = 30.0
    unused_grace: float = 300.0

    def findings(self) -> tuple[Finding, ...]:
        """Every kind of finding, in the order of the OWASP NHI risks."""
        return tuple(
            Finding(
                kind,
                nhi,
                title.format(
                    long_ttl=self.long_ttl,
                    wide_audiences=self.wide_audiences,
                    unused_days=self.unused_days,
                    unused_grace=self.unused_grace,
                ),
                *self._found(kind),
            )
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
        if kind == "overprivileged":
            ids = tuple(i for leases in self.overprivileged.values() for i in leases)
            return len(self.overprivileged), ids
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
            "blast_radius": [radius.to_dict(now) for radius in self.blast_radius],
            "blast_radius_totals": {
                **self.blast_totals,
                "wide_audiences": self.wide_audiences,
                "overprivileged_subjects": list(self.overprivileged),
            },
            "usage": self._usage_dict(),
            "findings": [finding.to_dict() for finding in self.findings()],
        }

    def _usage_dict(self) -> dict[str, Any] | None:
        if self.usage is None:
            return None
        now = self.generated_at
        return {
            "unused_days": self.unused_days,
            "unused_grace_seconds": self.unused_grace,
            "used": len(self.usage),
            "leases": {
                lease_id: {
                    "last_used_at": None if u.last_used_at is None else _iso(u.last_used_at),
                    "use_count": u.use_count,
                    "used_by": list(u.used_by),
                }
                for lease_id, u in self.usage.items()
            },
            "never_used": [lease_summary(x, now) for x in self.never_used or ()],
            "unused": [lease_summary(x, now) for x in self.unused or ()],
            "foreign_audience": [
                {**lease_summary(x, now), "used_by": list(self.usage[x.id].used_by)}
                for x in self.foreign_audience or ()
            ],
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
        yield from self._blast_lines()
        yield from self._usage_lines()
        yield from self._hook_lines()
        yield "\nchurn: " + ", ".join(f"{k} {v}" for k, v in self.churn.items())

    def _blast_lines(self) -> Iterable[str]:
        totals = self.blast_totals
        yield (
            f"\nblast radius (top {totals.get('shown', 0)} of {totals.get('subjects', 0)}"
            f" subjects; {totals.get('pairs', 0)} distinct audience x scope pairs reachable):"
        )
        if not self.blast_radius:
            yield "  (none)"
        for r in self.blast_radius:
            flags = [f"depth {r.depth}", f"longest {r.remaining:.0f}s left"]
            if r.wildcards:
                flags.append("WILDCARD " + " ".join(r.wildcards))
            if r.subject in self.overprivileged:
                flags.append("OVERPRIVILEGED")
            if r.grantable is not None and r.outside_policy is not None:
                flags.append(f"policy grants {len(r.grantable)} pairs")
                flags.append(f"{len(r.outside_policy)} reached outside it")
            yield (
                f"  {r.subject}  {r.size} pairs ({len(r.audiences)} audiences x"
                f" {len(r.scopes)} scopes)  {len(r.leases)} leases  " + "  ".join(flags)
            )
            for audience in r.audiences[:_AUDIENCE_LINES]:
                scopes = [scope for aud, scope in r.pairs if aud == audience]
                yield f"    {audience}: {' '.join(scopes) or '(no scope)'}"
            if len(r.audiences) > _AUDIENCE_LINES:
                yield f"    ... and {len(r.audiences) - _AUDIENCE_LINES} more audiences (--json)"

    def _usage_lines(self) -> Iterable[str]:
        if self.usage is None:
            yield "\nlease usage: not known (the store does not record usage)"
            return
        now, usage = self.generated_at, self.usage
        yield f"\nlease usage: {len(usage)} of {len(self.active)} active leases used"
        sections = (
            (f"issued more than {self.unused_grace:g}s ago, never used", self.never_used),
            (f"unused for {self.unused_days:g} days", self.unused),
        )
        for title, items in sections:
            yield f"  {title}: {len(items or ())}"
            yield from (f"    {_line(lease, now)}" for lease in items or ())
        foreign = self.foreign_audience or ()
        if foreign:  # should be impossible: say so loudly
            yield f"  !! USED BY AUDIENCES IT WAS NOT ISSUED FOR: {len(foreign)} (investigate)"
        for lease in foreign:
            yield f"    {_line(lease, now)}  used by {' '.join(usage[lease.id].used_by)}"

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


#: Audiences the text report lists per subject of the blast radius (JSON lists all).
_AUDIENCE_LINES = 5


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
    policy: Policy | None = None,
    top: int = 10,
    wide_audiences: int = WIDE_AUDIENCES,
    usage: Mapping[str, Usage] | None = None,
    unused_days: float = 30.0,
    unused_grace: Duration = 300.0,
) -> Report:
    """The report over ``leases`` (live and dead, as ``leases(include_inactive=True)``
    gives). ``keys`` is the key ids still held (None: unknown, no retired-key
    finding); ``counts`` the broker's event counts since it started,
    ``sink_failures`` how many audit sink calls raised; ``awaiting_hooks``
    the store's count of expired leases awaiting hooks (``awaiting_hooks(now)``).
    The blast radius lists the ``top`` widest subjects; with ``policy``, what
    it would grant each; a subject reaching a wildcard or more than
    ``wide_audiences`` audiences is an ``overprivileged`` finding. ``usage``
    is the store's ``lease_usage`` of the active leases (None: not known): an
    active lease issued over ``unused_grace`` seconds ago and never used, one
    last used over ``unused_days`` days ago, and one used by an audience it
    was not issued for are findings."""
    threshold = seconds(long_ttl, "long_ttl")
    if isinstance(oldest, bool) or not isinstance(oldest, int) or oldest < 0:
        raise InvalidRequest("oldest must be a whole number, 0 or more")
    for name, value in (("top", top), ("wide_audiences", wide_audiences)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"{name} must be a whole number, 0 or more, got {value!r}")
    if policy is not None and not isinstance(policy, Policy):
        raise InvalidRequest(f"policy must be a Policy, not {type(policy).__name__}")
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
    days, grace = _unused_limits(unused_days, unused_grace)
    radii = _blast_radius(active, everything, now, policy)
    wide = {r.subject: r.leases for r in radii if r.wide(wide_audiences)}
    blast_totals = {
        "subjects": len(radii),
        "shown": min(top, len(radii)),
        "pairs": len({pair for r in radii for pair in r.pairs}),
        "wildcard_subjects": sum(1 for r in radii if r.wildcards),
        "overprivileged": len(wide),
    }
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
        blast_radius=tuple(radii[:top]),
        blast_totals=blast_totals,
        overprivileged=wide,
        wide_audiences=wide_audiences,
        **_usage_findings(active, usage, now, days, grace),
    )


def _unused_limits(days: object, grace: Duration) -> tuple[float, float]:
    ok = isinstance(days, int | float) and not isinstance(days, bool) and 0 < days < 1e6
    if not ok:
        raise InvalidRequest(f"unused_days must be a number of days above 0, got {days!r}")
    return float(days), seconds(grace, "unused_grace", allow_zero=True)  # type: ignore[arg-type]


def _usage_findings(
    active: Sequence[Lease],
    usage: Mapping[str, Usage] | None,
    now: float,
    days: float,
    grace: float,
) -> dict[str, Any]:
    """The report's usage fields: never used, unused for ``days``, foreign audiences."""
    out: dict[str, Any] = {"unused_days": days, "unused_grace": grace}
    if usage is None:
        return out
    used = {x.id: usage[x.id] for x in active if x.id in usage and usage[x.id].use_count}
    stale = now - days * 86_400
    out.update(
        usage=used,
        never_used=tuple(x for x in active if x.id not in used and x.issued_at < now - grace),
        unused=tuple(x for x in active if x.id in used and (used[x.id].last_used_at or 0) < stale),
        foreign_audience=tuple(
            x for x in active if x.id in used and _foreign(x.audience, used[x.id].used_by)
        ),
    )
    return out


def _foreign(audience: str, used_by: Iterable[str]) -> bool:
    return any(not covers(audience, by) for by in used_by)


def _sorted_counts(counts: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(Counter(values).most_common())
