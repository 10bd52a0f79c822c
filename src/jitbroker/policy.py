"""Least-privilege rules, evaluated on every issue, renewal and attenuation.

A ``Rule`` names the subjects it applies to (exact or glob) and grants
audiences and scopes (exact, or a trailing ``*`` wildcard such as
``orders:*``), a maximum TTL, and requirements. A request is allowed when one
rule grants all of it; otherwise ``PolicyDenied`` lists every reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import attrs

from .clock import seconds
from .errors import InvalidRequest
from .lease import Lease

__all__ = ["Decision", "Policy", "Rule", "covers"]


def covers(pattern: str, value: str) -> bool:
    """True if ``pattern`` grants ``value``: equal, or a trailing-``*`` prefix match."""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


def _strings(value: Iterable[str] | str, name: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(i, str) and i for i in items):
        raise InvalidRequest(f"Rule.{name} must be one or more non-empty strings")
    return items


def _subjects(value: Iterable[str] | str) -> tuple[str, ...]:
    return _strings(value, "subjects")


def _audiences(value: Iterable[str] | str) -> tuple[str, ...]:
    return _strings(value, "audiences")


def _scope_grants(value: Iterable[str] | str) -> tuple[str, ...]:
    # One string is a space-delimited list, never an iterable of characters
    # (a lone "*" among them would grant every scope).
    items = tuple(value.split()) if isinstance(value, str) else tuple(value)
    if not all(isinstance(i, str) and i for i in items):
        raise InvalidRequest("Rule.scopes must be non-empty strings")
    return items


def _rules(value: Iterable[Rule]) -> tuple[Rule, ...]:
    rules = tuple(value)
    if not all(isinstance(r, Rule) for r in rules):
        raise InvalidRequest("Policy rules must be Rule instances")
    return rules


def _ttl(value: object) -> float | None:
    return None if value is None else seconds(value, "Rule.max_ttl")


@attrs.frozen
class Rule:
    """Grants ``audiences`` and ``scopes`` to ``subjects`` (globs such as ``svc:ci-*``)."""

    subjects: tuple[str, ...] = attrs.field(converter=_subjects)
    audiences: tuple[str, ...] = attrs.field(converter=_audiences)
    scopes: tuple[str, ...] = attrs.field(default=(), converter=_scope_grants)
    max_ttl: float | None = attrs.field(default=None, converter=_ttl)
    owner_required: bool = False
    purpose_required: bool = False
    renewable: bool = True
    name: str | None = None

    def label(self) -> str:
        """How reasons name this rule."""
        return self.name or f"rule for {', '.join(self.subjects)}"

    def applies_to(self, subject: str) -> bool:
        """True if this rule's subject patterns match ``subject``."""
        return any(fnmatchcase(subject, p) for p in self.subjects)

    def refusals(self, lease: Lease) -> list[str]:
        """Why this rule does not grant ``lease`` (empty if it does)."""
        out = []
        if not any(covers(a, lease.audience) for a in self.audiences):
            out.append(f"{self.label()} does not grant audience {lease.audience!r}")
        missing = [s for s in lease.scopes if not any(covers(g, s) for g in self.scopes)]
        if missing:
            out.append(f"{self.label()} does not grant scopes {' '.join(missing)!r}")
        # The life granted so far: renewals are evaluated again with their new
        # expiry, so the rule bounds the whole life without forcing max_ttl= on issue.
        ttl = lease.expires_at - lease.issued_at
        # A millisecond of slack: the lifetime is a difference of float epoch times.
        if self.max_ttl is not None and ttl > self.max_ttl + 1e-3:
            out.append(f"{self.label()} allows at most {self.max_ttl:g}s, asked for {ttl:g}s")
        if self.owner_required and not lease.owner:
            out.append(f"{self.label()} requires an owner")
        if self.purpose_required and not lease.purpose:
            out.append(f"{self.label()} requires a purpose")
        if lease.renewable and not self.renewable:
            out.append(f"{self.label()} does not allow renewable leases (pass renewable=False)")
        return out


@attrs.frozen
class Decision:
    """The outcome of evaluating a request: allowed, the granting rule, or every reason."""

    allowed: bool
    rule: Rule | None = None
    reasons: tuple[str, ...] = ()


@attrs.frozen
class Policy:
    """A list of rules. Once a policy is set, anything no rule grants is denied."""

    rules: tuple[Rule, ...] = attrs.field(converter=_rules)

    def evaluate(self, lease: Lease) -> Decision:
        """Decide whether the proposed ``lease`` may exist, with every reason if not."""
        reasons: list[str] = []
        matched = False
        for rule in self.rules:
            if not rule.applies_to(lease.subject):
                continue
            matched = True
            refusals = rule.refusals(lease)
            if not refusals:
                return Decision(True, rule)
            reasons.extend(refusals)
        if not matched:
            reasons.append(f"no rule applies to subject {lease.subject!r}")
        return Decision(False, None, tuple(reasons))
