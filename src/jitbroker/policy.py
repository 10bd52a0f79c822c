"""Least-privilege rules, evaluated on every issue, renewal and attenuation.

A ``Rule`` names the subjects it applies to (exact or glob) and grants
audiences and scopes (exact, or a trailing ``*`` wildcard such as
``orders:*``), a maximum TTL, and requirements: an owner, a purpose, no
renewal, a quota of active leases (``max_active``), and conditions (plain
callables over the ``AccessRequest``, such as ``hours("08:00-18:00")`` or
``labels(env="prod")``). A request is allowed when one rule grants all of it;
otherwise ``PolicyDenied`` lists every reason. Evaluation does no I/O: a quota
is handed to the store, which counts and inserts in one atomic step.

A service that issues on behalf of an authenticated caller (``broker_app``)
wraps the broker call in ``calling({...})``: the request's ``caller`` then
names who asked (issuer, subject, rule, method, matched claims), and the
``caller(...)`` condition judges it, so a rule can say *who* may obtain a
lease, not only for which subject.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, tzinfo
from types import MappingProxyType
from typing import Any

import attrs

from .clock import seconds
from .errors import InvalidRequest
from .lease import Lease
from .stores.base import Quota

__all__ = [
    "AccessRequest",
    "Condition",
    "Decision",
    "Policy",
    "Rule",
    "caller",
    "calling",
    "covers",
    "glob_match",
    "hours",
    "labels",
    "weekdays",
]


def _frozen_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    # The broker freezes its labels once; every request then shares them.
    return value if isinstance(value, MappingProxyType) else MappingProxyType(dict(value))


_NO_CALLER: Mapping[str, str] = MappingProxyType({})
_CALLER: ContextVar[Mapping[str, str]] = ContextVar("jitbroker_caller", default=_NO_CALLER)


@contextmanager
def calling(who: Mapping[str, str]) -> Iterator[None]:
    """Within the block, every request the policy judges (in this thread or task)
    carries ``who`` as its ``caller``: the authenticated party asking, for
    example ``{"issuer": ..., "subject": ..., "rule": ..., "method": ...}`` plus
    the claims its trust rule matched. Blocks nest; the outer caller returns at
    the end."""
    if not isinstance(who, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in who.items()
    ):
        raise InvalidRequest("calling() takes a mapping of strings to strings")
    token = _CALLER.set(MappingProxyType(dict(who)))
    try:
        yield
    finally:
        _CALLER.reset(token)


@attrs.frozen
class AccessRequest:
    """What a rule judges: the lease that would exist, the operation asking for it
    (``issue``, ``renew`` or ``attenuate``), the broker's clock reading, the
    broker's labels (``Broker(labels={"env": "prod"})``) and the caller (empty
    unless the broker is called inside ``calling(...)``, as ``broker_app`` does)."""

    lease: Lease
    action: str
    now: float
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_labels)
    caller: Mapping[str, str] = attrs.field(factory=_CALLER.get, converter=_frozen_labels)

    @classmethod
    def of(cls, lease: Lease) -> AccessRequest:
        """An ``issue`` request for ``lease`` at its issue time, with no labels."""
        return cls(lease, "issue", lease.issued_at)


#: A condition returns a truthy value to allow; anything else (or an exception) denies.
Condition = Callable[[AccessRequest], object]

_HOURS = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# IANA zone names are Area/Location words ("Europe/Berlin", "Etc/GMT+5"); the
# longest in use is 32 characters. Checked before zoneinfo sees the name: it
# becomes a file path under the zone database (TZPATH, or the tzdata package).
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*")
_MAX_ZONE_NAME = 64


def _zone(tz: tzinfo | str) -> tzinfo:
    """``tz`` itself, or the zone an IANA name names; ``InvalidRequest`` if none."""
    if isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str):
        raise InvalidRequest(f"a time zone is a tzinfo or an IANA name, not {type(tz).__name__}")
    if len(tz) > _MAX_ZONE_NAME or not _ZONE_NAME.fullmatch(tz):
        raise InvalidRequest(f"unknown time zone {tz[:_MAX_ZONE_NAME]!r} (not an IANA name)")
    from zoneinfo import ZoneInfo

    try:
        return ZoneInfo(tz)
    # Whatever loading the file raises means the same: not found, a directory
    # ("Europe"), a name the file system refuses, or a file that is not TZif.
    except Exception as exc:
        raise InvalidRequest(f"unknown time zone {tz!r}") from exc


@attrs.frozen
class _Hours:
    """See ``hours``."""

    window: str
    tz: tzinfo = attrs.field(default=UTC, converter=_zone)
    _span: tuple[int, int] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        match = _HOURS.fullmatch(self.window) if isinstance(self.window, str) else None
        if match is None:
            raise InvalidRequest(f"hours must look like '08:00-18:00', got {self.window!r}")
        h1, m1, h2, m2 = map(int, match.groups())
        object.__setattr__(self, "_span", (h1 * 60 + m1, h2 * 60 + m2))

    def __call__(self, request: AccessRequest) -> bool:
        local = datetime.fromtimestamp(request.now, self.tz)
        minute, (start, end) = local.hour * 60 + local.minute, self._span
        return start <= minute < end if start <= end else minute >= start or minute < end

    def __str__(self) -> str:
        return f"hours {self.window} ({self.tz})"


@attrs.frozen
class _Weekdays:
    """See ``weekdays``."""

    days: tuple[str, ...]
    tz: tzinfo = attrs.field(default=UTC, converter=_zone)

    def __attrs_post_init__(self) -> None:
        bad = [d for d in self.days if d not in _DAYS]
        if not self.days or bad:
            raise InvalidRequest(f"weekdays must be among {', '.join(_DAYS)}; got {bad or 'none'}")

    def __call__(self, request: AccessRequest) -> bool:
        return _DAYS[datetime.fromtimestamp(request.now, self.tz).weekday()] in self.days

    def __str__(self) -> str:
        return f"weekdays {' '.join(self.days)}"


@attrs.frozen
class _Labels:
    """See ``labels``."""

    expected: Mapping[str, str] = attrs.field(converter=_frozen_labels)

    def __attrs_post_init__(self) -> None:
        if not self.expected or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.expected.items()
        ):
            raise InvalidRequest("labels needs one or more name = value strings")

    def __call__(self, request: AccessRequest) -> bool:
        found = request.labels
        for name, value in self.expected.items():  # noqa: SIM110 - a loop, not a generator: hot
            if found.get(name) != value:
                return False
        return True

    def __str__(self) -> str:
        return "labels " + ", ".join(f"{k}={v}" for k, v in sorted(self.expected.items()))


_UNSAFE_VALUE = re.compile(r"[\x00-\x1f\x7f%\\]|(?:^|/)\.\.?(?:/|$)|//|^/|/$")


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(p) or re.escape(p) for p in parts), re.DOTALL)


def glob_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern``, a path-aware glob: ``*`` and ``?``
    match within one ``/`` segment, ``**`` across segments; everything else is
    literal (no ``[...]`` classes). A value that could only match by
    injection is refused whatever the pattern: control characters, ``%`` or
    ``\\`` escapes, ``.`` or ``..`` segments, empty segments (``a//b``) or a
    leading or trailing ``/`` (so ``acme/x/../y`` matches neither ``acme/*`` nor
    ``acme/**``). A pattern without wildcards is compared exactly."""
    if not any(c in pattern for c in "*?"):
        return value == pattern
    if _UNSAFE_VALUE.search(value):
        return False
    return _glob_regex(pattern).fullmatch(value) is not None


@attrs.frozen
class _Caller:
    """See ``caller``."""

    expected: Mapping[str, str] = attrs.field(converter=_frozen_labels)

    def __attrs_post_init__(self) -> None:
        if not self.expected or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.expected.items()
        ):
            raise InvalidRequest("caller needs one or more name = pattern strings")

    def __call__(self, request: AccessRequest) -> bool:
        found = request.caller
        for name, pattern in self.expected.items():
            value = found.get(name)
            if value is None or not glob_match(pattern, value):
                return False
        return True

    def __str__(self) -> str:
        return "caller " + ", ".join(f"{k}={v}" for k, v in sorted(self.expected.items()))


def caller(**expected: str) -> Condition:
    """A condition: allow only when the request comes from a caller (see
    ``calling``) whose fields match these globs (``glob_match``), for example
    ``caller(issuer="https://token.actions.githubusercontent.com", repository="acme/*")``.
    A direct call to the broker (no caller) never matches."""
    return _Caller(expected)


def hours(window: str, tz: tzinfo | str = UTC) -> Condition:
    """A condition: allow only between two wall-clock times, ``"08:00-18:00"``
    (a window wrapping midnight, ``"22:00-06:00"``, works too), in ``tz``
    (a ``tzinfo`` or an IANA name; default UTC)."""
    return _Hours(window, tz)


def weekdays(*days: str, tz: tzinfo | str = UTC) -> Condition:
    """A condition: allow only on these days (``"mon"`` ... ``"sun"``), in ``tz``."""
    return _Weekdays(days, tz)


def labels(**expected: str) -> Condition:
    """A condition: allow only on a broker whose labels include these, for
    example ``labels(env="prod")`` with ``Broker(labels={"env": "prod"})``."""
    return _Labels(expected)


def _condition_name(condition: Condition) -> str:
    if isinstance(condition, _Hours | _Weekdays | _Labels | _Caller):
        return str(condition)
    return getattr(condition, "__name__", None) or type(condition).__name__


def covers(pattern: str, value: str) -> bool:
    """True if ``pattern`` grants ``value``: equal, or a trailing-``*`` prefix match."""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


# The quota memo is keyed by caller input, so it keeps only small keys: at
# most _QUOTA_MEMO_MAX entries of _QUOTA_MEMO_CHARS characters, whatever
# subjects and owners callers send (a Lease built by hand is not length-checked).
_QUOTA_MEMO_MAX = 4096
_QUOTA_MEMO_CHARS = 256


def _small_key(subject: str, owner: str | None) -> bool:
    return (
        type(subject) is str
        and (owner is None or type(owner) is str)
        and len(subject) + len(owner or "") <= _QUOTA_MEMO_CHARS
    )


class _Grants:
    """Patterns as ``covers`` reads them, split for speed: exact values in a set,
    trailing-``*`` ones as a tuple of prefixes for one ``str.startswith`` call."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def covers(self, value: str) -> bool:
        return value in self.exact or value.startswith(self.prefixes)


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


def _count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"Rule.{name} must be a whole number of leases, 1 or more")
    return value


def _max_active(value: object) -> int | None:
    return _count(value, "max_active")


def _max_per_owner(value: object) -> int | None:
    return _count(value, "max_active_per_owner")


def _conditions(value: Iterable[Condition]) -> tuple[Condition, ...]:
    items = (value,) if callable(value) else tuple(value)
    if not all(callable(c) for c in items):
        raise InvalidRequest("Rule.conditions must be callables taking an AccessRequest")
    return items


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
    #: At most this many active leases per subject (counted atomically by the store).
    max_active: int | None = attrs.field(default=None, converter=_max_active)
    #: At most this many active leases per subject and owner (leases with no owner
    #: are not counted here: use ``owner_required`` to insist on one).
    max_active_per_owner: int | None = attrs.field(default=None, converter=_max_per_owner)
    conditions: tuple[Condition, ...] = attrs.field(default=(), converter=_conditions)
    # Precomputed once, used on every request: the subject globs as one compiled
    # pattern, and each grant list as (exact values, prefixes of trailing-* ones).
    _subject_match: Callable[[str], object] = attrs.field(
        init=False, eq=False, repr=False, hash=False
    )
    _audience_grants: _Grants = attrs.field(init=False, eq=False, repr=False, hash=False)
    _scope_grants: _Grants = attrs.field(init=False, eq=False, repr=False, hash=False)
    _quota_memo: dict[tuple[str, str | None], tuple[Quota, ...]] = attrs.field(
        init=False, eq=False, repr=False, hash=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        pattern = "|".join(f"(?:{fnmatch.translate(p)})" for p in self.subjects)
        object.__setattr__(self, "_subject_match", re.compile(pattern).match)
        object.__setattr__(self, "_audience_grants", _Grants(self.audiences))
        object.__setattr__(self, "_scope_grants", _Grants(self.scopes))

    def label(self) -> str:
        """How reasons name this rule."""
        return self.name or f"rule for {', '.join(self.subjects)}"

    def applies_to(self, subject: str) -> bool:
        """True if this rule's subject patterns match ``subject``."""
        return self._subject_match(subject) is not None

    def refusals(self, request: AccessRequest | Lease) -> list[str]:
        """Why this rule does not grant the request (empty if it does)."""
        if isinstance(request, Lease):
            request = AccessRequest.of(request)
        lease = request.lease
        out = []
        if not self._audience_grants.covers(lease.audience):
            out.append(f"{self.label()} does not grant audience {lease.audience!r}")
        covered = self._scope_grants.covers
        missing = [s for s in lease.scopes if not covered(s)]
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
        if self.conditions:
            out.extend(self._unmet(request))
        return out

    def _unmet(self, request: AccessRequest) -> Iterable[str]:
        for condition in self.conditions:
            try:
                met = condition(request)
            except Exception as exc:  # a broken condition denies: fail closed
                name = _condition_name(condition)
                yield f"{self.label()}: condition {name} failed ({type(exc).__name__})"
                continue
            if not met:
                yield f"{self.label()}: condition {_condition_name(condition)} is not met"

    def quotas(self, lease: Lease) -> tuple[Quota, ...]:
        """The quotas ``lease`` counts against under this rule."""
        if self.max_active is None and self.max_active_per_owner is None:
            return ()
        key = (lease.subject, lease.owner)
        found = self._quota_memo.get(key)
        if found is None:  # the same subjects and owners come back on every issue
            found = self._new_quotas(lease)
            if _small_key(*key):
                if len(self._quota_memo) >= _QUOTA_MEMO_MAX:
                    self._quota_memo.clear()
                self._quota_memo[key] = found
        return found

    def _new_quotas(self, lease: Lease) -> tuple[Quota, ...]:
        out = []
        if self.max_active is not None:
            out.append(Quota(lease.subject, None, self.max_active, self.label()))
        if self.max_active_per_owner is not None and lease.owner is not None:
            out.append(Quota(lease.subject, lease.owner, self.max_active_per_owner, self.label()))
        return tuple(out)


_RULE_FIELDS = {
    "subjects",
    "audiences",
    "scopes",
    "max_ttl",
    "owner_required",
    "purpose_required",
    "renewable",
    "name",
    "max_active",
    "max_active_per_owner",
    "hours",
    "weekdays",
    "labels",
    "caller",
    "timezone",
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
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not _finite(ttl) or ttl <= 0
    ):
        raise InvalidRequest(f"{where}: field 'max_ttl' must be a positive number of seconds")
    for flag in ("owner_required", "purpose_required", "renewable"):
        if flag in entry and not isinstance(entry[flag], bool):
            raise InvalidRequest(f"{where}: field {flag!r} must be true or false")
    for count in ("max_active", "max_active_per_owner"):
        value = entry.get(count)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"{where}: field {count!r} must be a whole number, 1 or more")
    fields = {k: v for k, v in entry.items() if k not in _CONDITION_FIELDS}
    conditions = _conditions_from(entry, where)  # its errors name the rule already
    try:
        return Rule(**fields, conditions=conditions)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: {exc}") from exc


def _finite(number: int | float) -> bool:
    """``math.isfinite``, but False (not ``OverflowError``) for an int too big for a float."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


_CONDITION_FIELDS = {"hours", "weekdays", "labels", "caller", "timezone"}


def _conditions_from(entry: Mapping[str, Any], where: str) -> list[Condition]:
    """The conditions a policy file can spell: ``hours``, ``weekdays`` (both in
    ``timezone``, default UTC), ``labels`` and ``caller``; errors name the rule
    and field."""
    field = "timezone"
    try:
        tz = entry.get("timezone", "UTC")
        if not isinstance(tz, str):
            raise InvalidRequest("must be an IANA name such as 'UTC'")
        _zone(tz)  # checked even when no condition uses it: a misspelt zone is a mistake
        out: list[Condition] = []
        field = "hours"
        if "hours" in entry:
            if not isinstance(entry["hours"], str):
                raise InvalidRequest("must be a string like '08:00-18:00'")
            out.append(hours(entry["hours"], tz))
        field = "weekdays"
        if "weekdays" in entry:
            days = entry["weekdays"]
            days = [days] if isinstance(days, str) else days
            if not isinstance(days, list) or not all(isinstance(d, str) for d in days):
                raise InvalidRequest("must be a list of day names such as 'mon'")
            out.append(weekdays(*days, tz=tz))
        for field, make, shape in (("labels", labels, "value"), ("caller", caller, "glob")):
            if field in entry:
                found = entry[field]
                if not isinstance(found, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in found.items()
                ):
                    raise InvalidRequest(f'must be a table of name = "{shape}"')
                out.append(make(**found))
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: field {field!r}: {exc}") from exc
    return out


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
    """The outcome of evaluating a request: allowed and the granting rule, or every
    reason; ``matched`` lists every rule whose subjects matched, and ``quotas``
    what the granting rule counts (checked by the store when the lease is added)."""

    allowed: bool
    rule: Rule | None = None
    reasons: tuple[str, ...] = ()
    matched: tuple[Rule, ...] = ()
    quotas: tuple[Quota, ...] = ()


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
        # Not an int either: open() would read that file descriptor (0 is stdin).
        if not isinstance(path, str | bytes | os.PathLike):
            raise InvalidRequest(f"Policy.from_toml takes a file path, not {type(path).__name__}")
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise InvalidRequest(f"{path}: cannot read the policy file ({exc.strerror})") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"{path}: not valid TOML: {exc}") from exc
        except ValueError as exc:  # a path with a NUL byte in it
            raise InvalidRequest(f"{path!r}: not a usable file path ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    def evaluate(self, request: AccessRequest | Lease) -> Decision:
        """Decide whether the proposed lease may exist, with every reason if not.

        The first rule that grants everything wins; rules are not merged (a
        request is never granted by combining what two rules allow).
        """
        if isinstance(request, Lease):
            request = AccessRequest.of(request)
        subject = request.lease.subject
        matched = tuple(rule for rule in self.rules if rule.applies_to(subject))
        reasons: list[str] = []
        for rule in matched:
            refusals = rule.refusals(request)
            if not refusals:
                return Decision(True, rule, (), matched, rule.quotas(request.lease))
            reasons.extend(refusals)
        if not matched:
            reasons.append(f"no rule applies to subject {subject!r}")
        return Decision(False, None, tuple(reasons), matched)
