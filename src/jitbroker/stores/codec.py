"""A ``Lease`` as plain values, for stores that keep leases outside this process.

One row layout for every external store: ``COLUMNS`` in order, scopes as one
space-delimited string (scope tokens never contain a space), times as floats,
``renewable`` as a bool (or 0/1). ``from_row`` checks what it reads: a record
that is not a lease of ours is a ``StoreError``, never a half-built value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..errors import StoreError
from ..lease import Lease

__all__ = ["COLUMNS", "from_mapping", "from_row", "to_mapping", "to_row"]

COLUMNS: tuple[str, ...] = tuple(f.name for f in attrs.fields(Lease))
_TEXT = frozenset({"id", "subject", "audience"})
_NULLABLE = frozenset(
    {
        "key_id",
        "task",
        "owner",
        "purpose",
        "parent",
        "revoke_reason",
        "revoked_at",
        "holder",
        # Added later: a record written before them lacks them (None).
        "issuer",
        "task_run",
        "expire_hooks",
        "provider",
    }
)
_TIMES = frozenset({"issued_at", "expires_at", "max_expires_at", "revoked_at"})
_BOOLS: dict[Any, bool] = {True: True, False: False, "1": True, "0": False}


def to_row(lease: Lease) -> tuple[Any, ...]:
    """The lease's values in ``COLUMNS`` order (scopes joined by spaces)."""
    return tuple(
        " ".join(lease.scopes) if name == "scopes" else getattr(lease, name) for name in COLUMNS
    )


def to_mapping(lease: Lease) -> dict[str, Any]:
    """The lease as ``{column: value}``."""
    return dict(zip(COLUMNS, to_row(lease), strict=True))


def from_row(row: Sequence[Any]) -> Lease:
    """The lease stored as ``row`` (values in ``COLUMNS`` order)."""
    if len(row) != len(COLUMNS):
        raise StoreError(f"a lease record has {len(row)} fields, expected {len(COLUMNS)}")
    return from_mapping(dict(zip(COLUMNS, row, strict=True)))


def from_mapping(record: Mapping[str, Any]) -> Lease:
    """The lease stored as ``{column: value}``; missing optional fields are None."""
    values: dict[str, Any] = {}
    for name in COLUMNS:
        values[name] = _field(name, record.get(name))
    return Lease(**values)


def _field(name: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None and name in _NULLABLE:
        return None
    if name in _TEXT or name in _NULLABLE - {"revoked_at"}:
        # Only the identifying fields must be non-empty; the rest round-trip as given.
        if isinstance(value, str) and (value or name not in _TEXT):
            return value
    elif name == "scopes":
        if isinstance(value, str):
            return tuple(value.split(" ")) if value else ()
    elif name in _TIMES:
        number = _finite(value)
        if number is not None:
            return number
    elif name == "renewable" and value in _BOOLS:
        return _BOOLS[value]
    raise StoreError(f"corrupt lease record: field {name!r} holds an unexpected value")


def _finite(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
