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
``sqlite:PATH``). Neither error repeats the string: it may hold a password
(a missing SQLite file's error shows where a *relative* path resolved). A
query parameter neither jitbroker nor the driver knows (``?prefx=``) is an
``InvalidRequest`` naming it.
"""

from __future__ import annotations

import inspect
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
        _check_names(bare, _redis_params(scheme), "prefix")
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
        _check_names(bare, _libpq_params(), "schema, timeout")
        return PostgresStore(
            bare, schema=schema, timeout=_seconds("timeout", timeout), create=create
        )
    if scheme == "sqlite":
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            if not path.startswith("///"):
                raise InvalidRequest(
                    "a sqlite URL is sqlite:///relative/path (from the current directory),"
                    " sqlite:////absolute/path or sqlite:PATH, not two slashes"
                    + (
                        f" (sqlite:///{path[2:]} is {where!r})"
                        if (where := _resolved(path[2:]))
                        else ""
                    )
                )
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


def _check_names(url: str, known: frozenset[str], ours: str) -> None:
    """Refuse a query parameter the driver does not know (``?prefx=``) by name,
    before the driver turns it into a ``TypeError`` or a bare "invalid"."""
    for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name not in known:
            raise InvalidRequest(
                f"unknown store URL parameter {name!r} (jitbroker's own: {ours}; the rest"
                " go to the driver, which does not know this one either)"
            )


def _redis_params(scheme: str) -> frozenset[str]:
    """What redis-py's ``from_url`` takes from a query: its parsed arguments and
    any keyword of the connection class the scheme picks."""
    import redis.connection as rc

    kind = {"rediss": rc.SSLConnection, "unix": rc.UnixDomainSocketConnection}
    names = set(rc.URL_QUERY_ARGUMENT_PARSERS)
    for cls in kind.get(scheme, rc.Connection).__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return frozenset(names - {"self", "args", "kwargs"})


def _libpq_params() -> frozenset[str]:
    """The connection parameters of the libpq psycopg runs on (and ``ssl``, the
    JDBC spelling libpq accepts in a URI)."""
    from psycopg import pq

    return frozenset({o.keyword.decode() for o in pq.Conninfo.get_defaults()} | {"ssl"})


def _sqlite(path: str, create: bool) -> SQLiteStore:
    if not create and not os.path.isfile(path):
        raise InvalidRequest(
            f"no SQLite store at that path{_at(path)} (a store is a path, sqlite:///relative"
            " from the current directory, sqlite:////absolute, sqlite:PATH, redis:// or"
            " postgresql://)"
        )
    return SQLiteStore(path)


def _at(path: str) -> str:
    where = _resolved(path)
    return "" if where is None else f", {where!r} (relative to the current directory)"


def _resolved(path: str) -> str | None:
    """Where a relative path lands, for the error. Never the path as given (the
    caller typed that; repeated, a mistyped DSN's password would reach a log),
    and nothing for what may be a URL or DSN (``user:secret@host``, ``password=``)."""
    if os.path.isabs(path) or re.search(r"[@=]|://", path):
        return None
    return os.path.abspath(path)
