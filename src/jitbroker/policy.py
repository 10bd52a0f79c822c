"""Least-privilege rules, evaluated on every issue, renewal and attenuation.

A ``Rule`` names the subjects it applies to (exact or glob) and grants
audiences and scopes (exact, or a trailing ``*`` wildcard such as
``orders:*``), a maximum TTL, and requirements. A request is allowed when one
rule grants all of it; otherwise ``PolicyDenied`` lists every reason.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

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


_RULE_FIELDS = {
    "subjects",
    "audiences",
    "scopes",
    "max_ttl",
    "owner_required",
    "purpose_required",
    "renewable",
    "name",
}


def _rule_from(entry: object, where: str) -> Rule:
    """One rule from plain data, every field checked before ``Rule`` sees it."""
    if not isinstance(entry, Mapping):
        raise InvalidRequest(f"{where}: a rule must be a table of fields")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidRequest(f"{where}: field 'name' must be a non-empty string")
    if name:
        where = f"{where} ({name})"
    unknown = sorted(str(k) for k in entry if k not in _RULE_FIELDS)
    if unknown:
        raise InvalidRequest(f"{where}: unknown fields {unknown}")
    for field in ("subjects", "audiences"):
        if field not in entry:
            raise InvalidRequest(f"{where}: field {field!r} is required")
        _check_strings(entry[field], where, field, allow_empty=False)
    _check_strings(entry.get("scopes", []), where, "scopes", allow_empty=True)
    ttl = entry.get("max_ttl")
    if ttl is not None and (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not math.isfinite(ttl)
        or ttl <= 0
    ):
        raise InvalidRequest(f"{where}: field 'max_ttl' must be a positive number of seconds")
    for flag in ("owner_required", "purpose_required", "renewable"):
        if flag in entry and not isinstance(entry[flag], bool):
            raise InvalidRequest(f"{where}: field {flag!r} must be true or false")
    try:
        return Rule(**entry)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: {exc}") from exc


def _check_strings(value: object, where: str, field: str, *, allow_empty: bool) -> None:
    items = value.split() if isinstance(value, str) and field == "scopes" else value
    if isinstance(items, str):
        items = [items]
    if (
        not isinstance(items, list)
        or not all(isinstance(i, str) and i and i.isprintable() for i in items)
        or (not items and not allow_empty)
    ):
        raise InvalidRequest(f"{where}: field {field!r} must be a list of non-empty strings")


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        """A policy from plain data: ``{"rules": [{"subjects": [...], ...}, ...]}``
        (``rule`` is accepted too, as TOML's ``[[rule]]`` tables give). Errors name
        ``source``, the rule and the field."""
        if not isinstance(data, Mapping):
            raise InvalidRequest(f"{source}: expected a table with a list of rules")
        extra = set(data) - {"rules", "rule"}
        if extra:
            raise InvalidRequest(f"{source}: unknown top-level keys {sorted(map(str, extra))}")
        rules = data.get("rules", data.get("rule"))
        if len(set(data) & {"rules", "rule"}) != 1 or not isinstance(rules, list) or not rules:
            raise InvalidRequest(f"{source}: expected one non-empty list of rules under 'rules'")
        return cls([_rule_from(entry, f"{source}: rule {i + 1}") for i, entry in enumerate(rules)])

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Policy:
        """A policy from a TOML file of ``[[rule]]`` tables (see ``from_dict``)."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise InvalidRequest(f"{path}: cannot read the policy file ({exc.strerror})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

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
