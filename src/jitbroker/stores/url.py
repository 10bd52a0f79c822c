"""Open a lease store from one string: what the CLI's ``--store`` takes.

==========================================  ===============================
``leases.db``, ``./leases.db``              ``SQLiteStore`` at that path
``sqlite:///leases.db``                     ``SQLiteStore`` (relative path)
``sqlite:////var/lib/jb/leases.db``         ``SQLiteStore`` (absolute path)
``sqlite:leases.db``                        ``SQLiteStore`` (a path, as given)
``redis://host:6379/0?prefix=jitbroker``    ``RedisStore`` (``rediss://`` too)
``postgresql://u@host/db?schema=jitbroker`` ``PostgresStore`` (``postgres://`` too)
==========================================  ===============================

The ``sqlite:///`` forms follow SQLAlchemy's: three slashes, then the path.
``prefix`` and ``schema`` are taken out of the URL before it reaches the
driver, and so is PostgreSQL's ``timeout`` (``?timeout=2``: seconds one call
waits for the server, ``PostgresStore(timeout=...)``); the other query
parameters are the driver's.

A libpq ``key=value`` connection string (``host=db user=app password=...``) is
refused rather than taken for a SQLite file name: give PostgreSQL as a
``postgresql://`` URL (and a SQLite path with ``key=`` at its start as
``sqlite:PATH``). Neither error repeats the string: it may hold a password.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import InvalidRequest
from .base import LeaseStore
from .sqlite import SQLiteStore

__all__ = ["open_store"]


def _pop_param(url: str, name: str, default: str) -> tuple[str, str]:
    """``url`` without its ``name`` query parameter, and that parameter's value."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in query if k == name]
    if len(values) > 1:
        raise InvalidRequest(f"the store URL gives {name!r} more than once")
    rest = urlencode([(k, v) for k, v in query if k != name])
    return urlunsplit(parts._replace(query=rest)), values[0] if values else default


# What a libpq keyword/value connection string starts with: "host=", "dbname = ".
_LIBPQ_DSN = re.compile(r"\s*[A-Za-z_]+\s*=")


def open_store(url: str, *, create: bool = True) -> LeaseStore:
    """The store ``url`` names (see the table in this module's docstring).

    With ``create=False`` (what the CLI passes) the store must exist already (a
    SQLite file, a PostgreSQL schema, a Redis prefix that ever held a lease): an
    operator's typo is an error, never a new empty store or a report of nothing.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest("a store URL or SQLite path is required")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        bare, prefix = _pop_param(url, "prefix", "jitbroker")
        redis_store = RedisStore(bare, prefix=prefix)
        try:
            missing = not create and not redis_store.holds_data()
        except BaseException:
            redis_store.close()
            raise
        if missing:
            redis_store.close()
            raise InvalidRequest(
                f"no jitbroker store under the Redis prefix {prefix!r} (check the URL's"
                " prefix= and database)"
            )
        return redis_store
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore
        from .postgres_pool import DEFAULT_TIMEOUT

        bare, schema = _pop_param(url, "schema", "jitbroker")
        bare, timeout = _pop_param(bare, "timeout", str(DEFAULT_TIMEOUT))
        return PostgresStore(
            bare, schema=schema, timeout=_seconds("timeout", timeout), create=create
        )
    if scheme == "sqlite":
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            if not path.startswith("///"):
                raise InvalidRequest("a sqlite URL is sqlite:///relative or sqlite:////absolute")
            path = path[3:]
        return _sqlite(path, create)
    if _LIBPQ_DSN.match(url):
        raise InvalidRequest(
            "the store looks like a libpq key=value connection string: give PostgreSQL as a"
            " postgresql://user@host/dbname URL (a SQLite path like that: sqlite:PATH)"
        )
    if len(scheme) > 1 and "://" in url:  # a URL of a kind we do not know; not a path
        raise InvalidRequest(
            f"unknown store URL scheme {scheme!r}: use a SQLite path, sqlite:, redis:// "
            "or postgresql://"
        )
    return _sqlite(url, create)


def _seconds(name: str, value: str) -> float:
    """A URL parameter as positive, finite seconds (the store checks the range)."""
    try:
        return float(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number of seconds, got {value!r}") from None


def _sqlite(path: str, create: bool) -> SQLiteStore:
    if not create and not os.path.isfile(path):
        # Not the path itself: it may be a mistyped DSN with a password in it.
        raise InvalidRequest(
            "no SQLite store at that path (a store URL is sqlite:, redis:// or postgresql://)"
        )
    return SQLiteStore(path)
