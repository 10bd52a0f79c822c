"""Checks of caller input, done before anything is signed or stored.

Each check returns the normalized value or raises ``InvalidRequest`` with a
message that says what to fix. None of them does I/O.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from .errors import InvalidRequest

MAX_TEXT = 256
MAX_PURPOSE = 1024
MAX_SCOPES = 64
MAX_SCOPE_LEN = 128
# The longest space-delimited scope string that can pass: MAX_SCOPES scopes of
# MAX_SCOPE_LEN characters and the spaces between them. Refused on len() alone,
# before split() turns a huge string into a huge list.
MAX_SCOPE_CHARS = MAX_SCOPES * (MAX_SCOPE_LEN + 1) - 1
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

# The memos below are keyed by caller input, so they keep only small inputs:
# at most _MEMO_MAX entries of at most _MEMO_CHARS characters (and _MEMO_ITEMS
# scopes) each, a few MiB in the worst case however hostile the callers. The
# common case (a short subject, a few short scopes) is always small.
_MEMO_MAX = 4096
_MEMO_CHARS = 128
_MEMO_ITEMS = 8
# Normalized scope tuples, memoized by input: validation runs once per distinct
# scope list and leases with equal scopes share one tuple (less memory per lease).
_scope_memo: dict[tuple[object, ...], tuple[str, ...]] = {}
# Strings that passed ``text`` with the default limit, keyed by themselves: the
# same subject, audience and owner come back on every issue. A hit returns the
# stored str, never the caller's object (a str subclass cannot lie its way in).
_text_memo: dict[str, str] = {}


def text(value: object, name: str, *, limit: int = MAX_TEXT) -> str:
    """A required, printable, non-blank string of at most ``limit`` characters."""
    if limit >= MAX_TEXT:
        try:
            return _text_memo[value]  # type: ignore[index]
        except (KeyError, TypeError):
            pass
    # One compound test on the hot path; the checks below only word the error.
    ok = isinstance(value, str) and 0 < len(value) <= limit
    if ok and value.isprintable() and not value.isspace():  # type: ignore[attr-defined]
        if type(value) is str and len(value) <= _MEMO_CHARS:
            if len(_text_memo) >= _MEMO_MAX:
                _text_memo.clear()
            _text_memo[value] = value
        return value  # type: ignore[return-value]
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {type(value).__name__}")
    if not value or value.isspace():
        raise InvalidRequest(f"{name} must not be empty")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {limit}")
    if not value.isprintable():
        raise InvalidRequest(f"{name} must not contain control or non-printable characters")
    return value


def optional_text(value: object, name: str, *, limit: int = MAX_TEXT) -> str | None:
    """Like ``text`` but None passes through."""
    return None if value is None else text(value, name, limit=limit)


def scopes(value: object) -> tuple[str, ...]:
    """Scopes from an iterable of strings or one space-delimited string: sorted, unique.

    At most ``MAX_SCOPES`` scopes, counting repeats: the raw input is bounded
    before it is copied, split, hashed or remembered.
    """
    raw: tuple[object, ...]
    if isinstance(value, list | tuple):  # the common case, before the slow ABC check
        if len(value) > MAX_SCOPES:
            raise _too_many(len(value))
        raw = tuple(value)
    elif isinstance(value, str):
        if len(value) > MAX_SCOPE_CHARS:
            raise InvalidRequest(
                f"scopes is {len(value)} characters; the limit is {MAX_SCOPE_CHARS} "
                f"({MAX_SCOPES} scopes of at most {MAX_SCOPE_LEN} characters)"
            )
        raw = tuple(value.split(" ")) if value else ()
        if len(raw) > MAX_SCOPES:
            raise _too_many(len(raw))
    elif isinstance(value, Iterable) and not isinstance(value, bytes | bytearray | dict):
        # One past the limit is enough to refuse: never drain a huge (or endless) iterator.
        raw = tuple(itertools.islice(value, MAX_SCOPES + 1))
        if len(raw) > MAX_SCOPES:
            raise _too_many(None)
    else:
        raise InvalidRequest(
            f"scopes must be a list of strings or one space-delimited string, "
            f"not {type(value).__name__}"
        )
    try:
        return _scope_memo[raw]
    except (KeyError, TypeError):
        pass
    result = tuple(sorted({_scope(s) for s in raw}))
    if _small(raw):
        if len(_scope_memo) >= _MEMO_MAX:
            _scope_memo.clear()
        _scope_memo[raw] = result
    return result


def _too_many(count: int | None) -> InvalidRequest:
    given = f"more than {MAX_SCOPES}" if count is None else str(count)
    return InvalidRequest(f"{given} scopes given (repeats count); the limit is {MAX_SCOPES}")


def _small(raw: tuple[object, ...]) -> bool:
    """True if validated scopes ``raw`` may be memoized: few, short, and plain
    ``str`` (a subclass could make its key equal to another caller's scopes)."""
    if len(raw) > _MEMO_ITEMS:
        return False
    total = 0
    for scope in raw:
        if type(scope) is not str:
            return False
        total += len(scope)
    return total <= _MEMO_CHARS


def _scope(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"each scope must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidRequest("empty scope (check for doubled or trailing spaces)")
    if len(value) > MAX_SCOPE_LEN:
        raise InvalidRequest(f"a scope is {len(value)} characters; the limit is {MAX_SCOPE_LEN}")
    if not _SCOPE_TOKEN.fullmatch(value):
        raise InvalidRequest(
            f"scope {value!r} is invalid: use printable ASCII without spaces, quotes "
            f"or backslashes (RFC 6749 scope-token)"
        )
    return value
