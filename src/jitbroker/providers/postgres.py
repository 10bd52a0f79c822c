"""``PostgresRoles``: a PostgreSQL login role per lease, made a member of the
template roles its scopes map to, dropped when the lease dies.

Each lease gets the role ``<prefix><lease id>`` with a random password, a
``VALID UNTIL`` at the lease's expiry (so the server refuses logins after it
even if no broker is running) and the comment ``jitbroker:<name>``, the marker
``managed()`` looks for: a role made by hand that shares the prefix is never
touched. Brokers on different stores that share a cluster need different
names (or prefixes): reconciling revokes every marked role its store has no
lease for. The password travels as a SCRAM verifier computed by libpq, never
in plain text, so no server log holds it.

What the admin role (``admin_dsn``) needs: CREATEROLE; on PostgreSQL 16 and later,
ADMIN OPTION on every template role (to grant membership) and membership in
the roles it creates (``createrole_self_grant = 'set, inherit'``) for REASSIGN
and DROP OWNED; and ``pg_signal_backend`` (or superuser) to end the sessions of
a revoked role. PostgreSQL 14 or later (``pg_terminate_backend`` with a wait).

``REASSIGN OWNED`` and ``DROP OWNED`` act in the admin connection's database
only: a role that owns objects in another database cannot be dropped, so its
revoke fails (the role is already NOLOGIN) and is retried, then parked.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from ..errors import InvalidRequest, ProviderError
from ..lease import Lease, Secret
from .base import check_provider_name

__all__ = ["PostgresRoles"]

_PREFIX = re.compile(r"[a-z_][a-z0-9_]*")
_LEASE_ID = re.compile(r"[0-9a-f]{32}")
_NAMEDATALEN = 63  # longer identifiers are silently truncated by the server
#: What a template, or any role it is a member of, must not have: each lets a
#: lease's role make itself more than its scopes say.
_ATTRIBUTES = ("SUPERUSER", "CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS")
#: Predefined roles that run programs or read and write files as the server.
_UNSAFE_ROLES = frozenset(
    {"pg_execute_server_program", "pg_read_server_files", "pg_write_server_files"}
)
#: Connection settings the lease holder must not inherit from the admin DSN.
_ADMIN_ONLY = ("user", "password", "passfile", "sslpassword", "sslcert", "sslkey")

# Every role a template reaches by membership, with the attributes that matter.
_VET = """
WITH RECURSIVE reach(template, member) AS (
    SELECT rolname::text, oid FROM pg_roles WHERE rolname = ANY(%s)
  UNION
    SELECT reach.template, m.roleid FROM reach JOIN pg_auth_members m ON m.member = reach.member
)
SELECT reach.template, r.rolname::text, r.rolsuper, r.rolcreaterole, r.rolcreatedb,
       r.rolreplication, r.rolbypassrls
FROM reach JOIN pg_roles r ON r.oid = reach.member
"""

# NOLOGIN is committed before the sessions are ended, so no login can slip in
# between; the wait makes the sessions gone when revoke returns.
_REVOKE = """
DECLARE r text := {role};
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
        RETURN;
    END IF;
    EXECUTE format('ALTER ROLE %I NOLOGIN', r);
    COMMIT;
    PERFORM pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = r;
    EXECUTE format('REASSIGN OWNED BY %I TO CURRENT_USER', r);
    EXECUTE format('DROP OWNED BY %I', r);
    EXECUTE format('DROP ROLE %I', r);
END
"""

#: A statement built on the admin connection (its password verifier needs libpq).
_Compose = Callable[[psycopg.Connection[Any]], sql.Composed]

_MANAGED = """
SELECT rolname::text FROM pg_roles
WHERE substr(rolname, 1, %s) = %s AND shobj_description(oid, 'pg_authid') = %s
"""


class PostgresRoles:
    """A ``Provider`` of PostgreSQL login roles, one per lease.

    ``admin_dsn`` connects as the admin role (see the module docstring for what it
    needs); ``roles`` maps each scope to the template role (or roles) a lease
    with that scope joins; ``connect_dsn`` is what the lease holder gets, with
    its own user and password added (by default ``admin_dsn`` without the admin's
    user, password and client certificate). ``connect_timeout`` is in whole
    seconds, at least 2 (libpq's rule). One admin connection, opened on first
    use and reopened after a connection error; ``round_trips`` counts the
    statements sent to it.
    """

    def __init__(
        self,
        name: str = "postgres",
        *,
        admin_dsn: str,
        roles: Mapping[str, str | Sequence[str]],
        prefix: str = "jit_",
        connect_dsn: str | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.name = check_provider_name(name)
        self.prefix = _checked_prefix(prefix)
        self._roles = _checked_roles(roles)
        admin = _parsed(admin_dsn, "admin_dsn")
        self._dsn = admin_dsn
        self._connect_dsn = _connect_dsn(admin, connect_dsn)
        self._timeout = _checked_timeout(connect_timeout)
        self._marker = f"jitbroker:{self.name}"
        self._where = " ".join(
            f"{key}={admin[key]}" for key in ("host", "port", "dbname") if admin.get(key)
        )
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._vetted: set[str] = set()  # templates found safe: checked once each
        #: Statements sent to the server (a failed attempt counts too).
        self.round_trips = 0

    def __repr__(self) -> str:
        return f"<PostgresRoles {self.name!r} prefix={self.prefix!r} {self._where}>"

    # -- the Provider protocol ------------------------------------------------
    def check(self, lease: Lease) -> None:
        """Refuse a lease with no scope, a scope mapped to nothing, or a template
        role that is missing or too strong (``InvalidRequest``); ``ProviderError``
        if the server cannot be asked. A template found safe is not asked again;
        one refused is, so a fixed template works without a restart."""
        wanted = self._templates(lease)
        unvetted = sorted({t for t in wanted if t not in self._vetted})
        if not unvetted:
            return
        try:
            rows = self._execute(sql.SQL(_VET), (unvetted,))
        except psycopg.Error as exc:
            raise ProviderError(
                f"provider {self.name!r} could not check the template roles of lease"
                f" {lease.id} ({type(exc).__name__})",
                provider=self.name,
                lease_id=lease.id,
            ) from exc
        refusals = _refusals(unvetted, rows)
        for template in unvetted:
            if template in refusals:
                scope = next(s for s in lease.scopes if template in self._roles[s])
                raise InvalidRequest(
                    f"provider {self.name!r}: template role {template!r} of scope {scope!r}"
                    f" {refusals[template]}"
                )
        self._vetted.update(unvetted)

    def create(self, lease: Lease) -> Secret:
        """Make the lease's login role, in one statement batch (one transaction):
        ``CREATE ROLE ... IN ROLE <templates>`` and the ownership comment."""
        self.check(lease)  # no round trip once the templates are vetted
        role = self._role(lease.id)
        templates = sql.SQL(", ").join(map(sql.Identifier, self._templates(lease)))
        until = sql.Literal(_timestamp(lease.expires_at))
        password = secrets.token_urlsafe(24)

        def statement(conn: psycopg.Connection[Any]) -> sql.Composed:
            verifier = conn.pgconn.encrypt_password(
                password.encode(), role.encode(), b"scram-sha-256"
            )
            return sql.SQL(
                "CREATE ROLE {role} LOGIN PASSWORD {verifier} VALID UNTIL {until}"
                " IN ROLE {templates}; COMMENT ON ROLE {role} IS {marker}"
            ).format(
                role=sql.Identifier(role),
                verifier=sql.Literal(verifier.decode()),
                until=until,
                templates=templates,
                marker=sql.Literal(self._marker),
            )

        self._execute(statement)
        dsn = make_conninfo(self._connect_dsn, user=role, password=password)
        return Secret({"user": role, "password": password, "dsn": dsn})

    def revoke(self, lease: Lease) -> None:
        """Drop the lease's role, in one statement: NOLOGIN (committed), its
        sessions ended, what it owns here reassigned to the admin and its grants
        dropped, then the role. A role that is not there is success."""
        body = sql.SQL(_REVOKE).format(role=sql.Literal(self._role(lease.id)))
        # DO takes its body as a string: the role is a literal inside a literal.
        self._execute(sql.SQL("DO {}").format(sql.Literal(body.as_string(None))))

    def renew(self, lease: Lease) -> None:
        """Move the role's ``VALID UNTIL`` to the lease's expiry; a missing role
        is no error (its lease is dying, and its revoke is on the way)."""
        statement = sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(
            sql.Identifier(self._role(lease.id)), sql.Literal(_timestamp(lease.expires_at))
        )
        try:
            self._execute(statement)
        except psycopg.errors.UndefinedObject:
            return

    def managed(self) -> list[str]:
        """The lease ids of the roles this provider made: named prefix + 32 hex
        and commented with this provider's marker."""
        params = (len(self.prefix), self.prefix, self._marker)
        rows = self._execute(sql.SQL(_MANAGED), params)
        ids = (str(row[0])[len(self.prefix) :] for row in rows)
        return sorted(i for i in ids if _LEASE_ID.fullmatch(i))

    def close(self) -> None:
        """Close the admin connection (the next call opens a new one)."""
        with self._lock:
            self._discard()

    # -- helpers ---------------------------------------------------------------
    def _templates(self, lease: Lease) -> list[str]:
        """The template roles of ``lease``'s scopes, in order, each once."""
        if not lease.scopes:
            raise InvalidRequest(
                f"provider {self.name!r} grants roles by scope: ask for at least one of"
                f" {sorted(self._roles)}"
            )
        unmapped = [s for s in lease.scopes if s not in self._roles]
        if unmapped:
            raise InvalidRequest(
                f"provider {self.name!r} maps no role to scope(s) {unmapped}; it knows"
                f" {sorted(self._roles)}"
            )
        return list(dict.fromkeys(t for s in lease.scopes for t in self._roles[s]))

    def _role(self, lease_id: str) -> str:
        if not _LEASE_ID.fullmatch(lease_id):
            raise InvalidRequest("a lease id is 32 lowercase hex digits")
        return self.prefix + lease_id

    def _execute(
        self,
        query: sql.SQL | sql.Composed | _Compose,
        params: Sequence[Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Send one statement (batch) on the admin connection; its rows. A reused
        connection found broken is replaced and the statement sent once more:
        the server restarted since, and the statement never reached it (or, for
        a create, it raises "already exists" and the broker undoes the lease)."""
        with self._lock:
            while True:
                conn, fresh = self._connection()
                try:
                    self.round_trips += 1
                    cursor = conn.execute(query(conn) if callable(query) else query, params)
                    return cursor.fetchall() if cursor.description is not None else []
                except psycopg.Error:
                    broken = conn.broken or conn.closed
                    if broken or conn.info.transaction_status == TransactionStatus.INERROR:
                        self._discard()  # never reused broken, or in a failed transaction
                    if fresh or not broken:
                        raise

    def _connection(self) -> tuple[psycopg.Connection[tuple[Any, ...]], bool]:
        """The admin connection, and whether it was opened just now."""
        if self._conn is not None and not self._conn.closed:
            return self._conn, False
        self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._timeout)
        return self._conn, True

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _refusals(templates: Iterable[str], rows: Iterable[tuple[Any, ...]]) -> dict[str, str]:
    """Why each refused template is refused: missing, or reaching (itself or by
    membership) a role with one of ``_ATTRIBUTES`` or an unsafe predefined role."""
    reached: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        reached.setdefault(row[0], []).append(row[1:])
    refusals: dict[str, str] = {}
    for template in templates:
        if template not in reached:
            refusals[template] = "does not exist"
            continue
        for rolname, *flags in reached[template]:
            via = "" if rolname == template else f" through its membership in {rolname!r}"
            strong = [attr for attr, on in zip(_ATTRIBUTES, flags, strict=True) if on]
            if strong:
                refusals[template] = f"has {', '.join(strong)}{via}; a lease's role must not"
            elif rolname in _UNSAFE_ROLES:
                refusals[template] = f"is a member of {rolname!r}; a lease's role must not"
            if template in refusals:
                break
    return refusals


def _checked_prefix(prefix: object) -> str:
    if (
        not isinstance(prefix, str)
        or not _PREFIX.fullmatch(prefix)
        or len(prefix) + 32 > _NAMEDATALEN
        or prefix.startswith("pg_")  # reserved by PostgreSQL
    ):
        raise InvalidRequest(
            "a PostgresRoles prefix is 1 to 31 of a-z, 0-9 and '_', not starting with a"
            " digit or 'pg_'"
        )
    return prefix


def _checked_roles(roles: object) -> dict[str, tuple[str, ...]]:
    """``{scope: (template, ...)}``; a template name is only ever an identifier."""
    if not isinstance(roles, Mapping) or not roles:
        raise InvalidRequest("PostgresRoles roles maps each scope to one or more template roles")
    checked: dict[str, tuple[str, ...]] = {}
    for scope, value in roles.items():
        if not isinstance(scope, str) or not scope:
            raise InvalidRequest("PostgresRoles roles: every scope is a non-empty string")
        names = (value,) if isinstance(value, str) else value
        if not isinstance(names, Sequence) or not names or not all(map(_role_name, names)):
            raise InvalidRequest(
                f"PostgresRoles roles[{scope!r}]: a role name, or a non-empty list of them"
                f" (each 1 to {_NAMEDATALEN} bytes, no NUL)"
            )
        checked[scope] = tuple(names)
    return checked


def _role_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name.encode()) <= _NAMEDATALEN and "\0" not in name


def _checked_timeout(timeout: object) -> int:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidRequest("PostgresRoles connect_timeout is a positive number of seconds")
    return max(2, math.ceil(timeout))


def _parsed(dsn: object, label: str) -> dict[str, Any]:
    """The parameters of a connection string. Its parse error is not chained:
    libpq's message quotes the string, password included."""
    if not isinstance(dsn, str):
        raise InvalidRequest(f"PostgresRoles {label} is a connection string or URL")
    try:
        return conninfo_to_dict(dsn)
    except psycopg.Error:
        pass
    raise InvalidRequest(f"PostgresRoles {label} is not a valid PostgreSQL connection string")


def _connect_dsn(admin: Mapping[str, Any], connect_dsn: str | None) -> str:
    """What the lease holder connects with, before its user and password."""
    if connect_dsn is None:
        return make_conninfo("", **{k: v for k, v in admin.items() if k not in _ADMIN_ONLY})
    given = _parsed(connect_dsn, "connect_dsn")
    if "user" in given or "password" in given:
        raise InvalidRequest(
            "PostgresRoles connect_dsn names no user or password: each lease gets its own"
        )
    return make_conninfo("", **given)


def _timestamp(when: float) -> str:
    """``when`` (POSIX seconds) as an ISO 8601 UTC timestamp for ``VALID UNTIL``."""
    try:
        return datetime.fromtimestamp(when, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        raise InvalidRequest(f"a lease expiry of {when!r} is not a time") from None
