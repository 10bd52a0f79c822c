"""The one clock, and conversions of durations given by callers.

Every decision about time asks a ``Clock`` (a callable returning POSIX seconds).
The default reads ``time.time()`` at call time, so freezegun can move it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta

from .errors import InvalidRequest

Clock = Callable[[], float]
Duration = int | float | timedelta
_EXACT = 2**53  # ints below this convert to float exactly


def system_clock() -> float:
    """Return ``time.time()``, looked up on every call so that freezegun can patch it."""
    return time.time()


def seconds(value: object, name: str, *, allow_zero: bool = False) -> float:
    """Convert a caller's duration (seconds or ``timedelta``) to float seconds, or refuse it."""
    if type(value) is int and 0 < value < _EXACT:  # the common case, checked first
        return float(value)
    if isinstance(value, timedelta):
        value = value.total_seconds()
    # bool is an int subclass; ttl=True is a bug in the caller, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(
            f"{name} must be a number of seconds or a timedelta, not {type(value).__name__}"
        )
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {value!r}")
    if result < 0 or (result == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise InvalidRequest(f"{name} must be {bound} seconds, got {value!r}")
    return result
