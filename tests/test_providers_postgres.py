"""``PostgresRoles`` against a private cluster that enforces passwords
(``pg_cluster``): every check logs in with the minted credential over a real
connection, and every death of a lease (revoke, task end, expiry, outage then
retry, reconcile) is seen from the server's side."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from jitbroker import Broker, Credential, Lease
from jitbroker.errors import InvalidRequest, ProviderError
from jitbroker.providers import Provider
from jitbroker.providers.postgres import PostgresRoles
from jitbroker.testing import FakeClock
from pg_cluster import Cluster, pg_cluster

__all__ = ["pg_cluster"]  # the fixture, imported for pytest to find

READ = {"orders:read": "orders_reader", "orders:write": ["orders_reader", "orders_writer"]}
#: A real role whose name would end a statement and drop a table, if it were ever
#: pasted into SQL instead of quoted as an identifier.
WEIRD = "we\"ird'; DROP TABLE orders; --"
Admin = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture(scope="session")
def cluster(pg_cluster: Cluster) -> Cluster:
    """The private cluster with the tables and template roles the tests use."""
    with psycopg.connect(pg_cluster.dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE orders(id int); INSERT INTO orders VALUES (1), (2);"
            " CREATE TABLE secrets_table(id int); INSERT INTO secrets_table VALUES (42);"
            " CREATE ROLE orders_reader NOLOGIN; GRANT SELECT ON orders TO orders_reader;"
            " CREATE ROLE orders_writer NOLOGIN; GRANT INSERT ON orders TO orders_writer;"
            " CREATE ROLE too_strong NOLOGIN CREATEROLE;"
            " CREATE ROLE sneaky NOLOGIN; GRANT postgres TO sneaky;"
            " CREATE ROLE shell_runner NOLOGIN; GRANT pg_execute_server_program TO shell_runner"
        )
        weird = sql.Identifier(WEIRD)
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(weird))
        conn.execute(sql.SQL("GRANT SELECT ON orders TO {}").format(weird))
    return pg_cluster


@pytest.fixture
def admin(cluster: Cluster) -> Iterator[Admin]:
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_provider(cluster: Cluster) -> Iterator[Callable[..., PostgresRoles]]:
    """``PostgresRoles`` on the cluster; each one's connection closed at the end."""
    made: list[PostgresRoles] = []

    def make(**options: Any) -> PostgresRoles:
        made.append(PostgresRoles(admin_dsn=cluster.dsn, **{"roles": READ, **options}))
        return made[-1]

    yield make
    for roles in made:
        roles.close()


@pytest.fixture
def provider(make_provider: Callable[..., PostgresRoles]) -> PostgresRoles:
    return make_provider()


def role_of(admin: Admin, user: str) -> tuple[Any, ...] | None:
    """``(rolcanlogin, rolvaliduntil)`` of role ``user``, or None if it is gone."""
    return admin.execute(
        "SELECT rolcanlogin, rolvaliduntil FROM pg_roles WHERE rolname = %s", (user,)
    ).fetchone()


def secret_of(cred: Credential) -> dict[str, str]:
    assert cred.secret is not None
    return dict(cred.secret)


def login(secret: dict[str, str]) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(secret["dsn"], autocommit=True, connect_timeout=5)


def make_lease(expires_at: float, scopes: tuple[str, ...] = ("orders:read",)) -> Lease:
    now = time.time()
    return Lease(
        id=secrets.token_hex(16),
        subject="svc:test",
        audience="postgres",
        scopes=scopes,
        issued_at=now,
        expires_at=expires_at,
        max_expires_at=expires_at + 3600,
        provider="postgres",
    )


def assert_hidden(exc: BaseException, *values: str) -> None:
    """No message of ``exc`` or of any error chained to it shows one of ``values``."""
    seen: BaseException | None = exc
    while seen is not None:
        for value in values:
            assert value not in str(seen)
            assert value not in repr(seen)
        seen = seen.__cause__ or seen.__context__


def assert_dead(admin: Admin, secret: dict[str, str], held: psycopg.Connection[Any]) -> None:
    """The role is gone: its open session was ended, and it cannot log in again."""
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        login(secret)
    assert role_of(admin, secret["user"]) is None


# -- 1. a lease's role can do what its scopes say, and nothing more --------------
def test_a_lease_role_reads_orders_and_nothing_else(
    cluster: Cluster, admin: Admin, provider: PostgresRoles
) -> None:
    assert isinstance(provider, Provider)
    broker = Broker(providers=[provider])
    cred = broker.issue("svc:export", "postgres", scopes=["orders:read"], ttl=60)
    secret = secret_of(cred)
    assert secret["user"] == "jit_" + cred.lease_id
    with login(secret) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (secret["user"],)
        assert conn.execute("SELECT id FROM orders ORDER BY id").fetchall() == [(1,), (2,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO orders VALUES (3)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT id FROM secrets_table")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE escalated")
    can_login, valid_until = role_of(admin, secret["user"]) or (None, None)
    assert can_login is True
    assert abs(valid_until.timestamp() - cred.expires_at) < 0.001
    # The cluster enforces passwords: the same user with another one is refused.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(make_conninfo(secret["dsn"], password="not-it"), connect_timeout=5)
    assert broker.revoke(cred)
    assert role_of(admin, secret["user"]) is None


def test_a_scope_can_join_several_templates(admin: Admin, provider: PostgresRoles) -> None:
    broker = Broker(providers=[provider])
    with (
        broker.task("load", subject="svc:load", audience="postgres", scopes="orders:write") as cred,
        login(secret_of(cred)) as conn,
    ):
        conn.execute("INSERT INTO orders VALUES (3)")
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
    admin.execute("DELETE FROM orders WHERE id = 3")


# -- 2. every way a lease dies ends its sessions and drops its role -----------
@pytest.mark.parametrize("death", ["revoke", "task", "expiry"])
def test_the_role_dies_with_its_lease(admin: Admin, provider: PostgresRoles, death: str) -> None:
    clock = FakeClock(time.time())  # the server's time: VALID UNTIL must lie ahead
    broker = Broker(providers=[provider], clock=clock)
    ask: dict[str, Any] = {"subject": "svc:job", "audience": "postgres", "scopes": ["orders:read"]}
    if death == "task":
        with broker.task("job-7", ttl=60, **ask) as cred:
            secret = secret_of(cred)
            held = login(secret)
            assert held.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    else:
        cred = broker.issue(ttl=60, **ask)
        secret = secret_of(cred)
        held = login(secret)
        assert held.execute("SELECT count(*) FROM orders").fetchone() == (2,)
        if death == "revoke":
            assert broker.revoke(cred)
        else:
            clock.advance(61)
            assert [lease.id for lease in broker.sweep()] == [cred.lease_id]
    try:
        assert_dead(admin, secret, held)
    finally:
        held.close()
    assert provider.managed() == []
    assert broker.failed_hooks() == []


# -- 3. the server enforces VALID UNTIL by itself; renew moves it -------------
def test_valid_until_is_enforced_by_the_server_and_renew_moves_it(
    admin: Admin, provider: PostgresRoles
) -> None:
    broker = Broker(providers=[provider])
    cred = broker.issue("svc:a", "postgres", scopes=["orders:read"], ttl=60)
    past = attrs.evolve(cred.lease, id=secrets.token_hex(16), expires_at=time.time() - 1)
    secret = dict(provider.create(past))
    assert role_of(admin, secret["user"]) is not None
    with pytest.raises(psycopg.OperationalError):
        login(secret)  # the role exists, but its VALID UNTIL has passed
    later = attrs.evolve(past, expires_at=time.time() + 600)
    provider.renew(later)
    _, valid_until = role_of(admin, secret["user"]) or (None, None)
    assert abs(valid_until.timestamp() - later.expires_at) < 0.001
    login(secret).close()
    provider.revoke(later)
    provider.revoke(later)  # twice: still success
    provider.renew(later)  # a missing role: no error
    assert role_of(admin, secret["user"]) is None

    renewed = broker.renew(cred, ttl=600)
    _, valid_until = role_of(admin, secret_of(cred)["user"]) or (None, None)
    assert abs(valid_until.timestamp() - renewed.expires_at) < 0.001
    broker.revoke(cred)


# -- 4. an outage: revokes wait in the outbox, issues fail cleanly ------------
def test_an_outage_parks_the_revoke_until_the_server_is_back(
    cluster: Cluster, provider: PostgresRoles, make_provider: Callable[..., PostgresRoles]
) -> None:
    clock = FakeClock(time.time())
    broker = Broker(providers=[provider], clock=clock, hook_retries=2, hook_backoff=1)
    cred = broker.issue("svc:a", "postgres", scopes=["orders:read"], ttl=60)
    user = secret_of(cred)["user"]
    hidden = (cluster.password, secret_of(cred)["password"])
    cold = make_provider(name="cold")  # has vetted no template
    cold_broker = Broker(providers=[cold])
    cluster.stop()
    try:
        assert broker.revoke(cred) is True  # recorded, although the backend is down
        for _ in range(5):  # each sweep past the backoff retries once, until it is parked
            if broker.failed_hooks():
                break
            clock.advance(10)
            broker.sweep()
        parked = broker.failed_hooks()
        assert [(h.event, h.lease.id) for h in parked] == [("revoke", cred.lease_id)]
        assert parked[0].attempts == 3
        assert all(value not in parked[0].error for value in hidden)

        # Down at issue, with the templates vetted (create fails) or not (check fails).
        for down, audience in ((broker, "postgres"), (cold_broker, "cold")):
            with pytest.raises(ProviderError) as caught:
                down.issue("svc:b", audience, scopes=["orders:read"], ttl=60)
            assert_hidden(caught.value, *hidden)
            assert list(down.leases()) == []  # no lease stays active
    finally:
        cluster.start()
    with psycopg.connect(cluster.dsn, autocommit=True) as admin:  # the old one died
        assert role_of(admin, user) is not None
        assert broker.retry_failed_hooks() == 0
        assert role_of(admin, user) is None
    assert broker.failed_hooks() == []
    assert provider.managed() == []


# -- 5. reconcile: orphans are revoked, hand-made roles left, losses flagged --
def test_reconcile_revokes_orphans_and_flags_missing_roles(
    admin: Admin, provider: PostgresRoles
) -> None:
    broker = Broker(providers=[provider])
    kept = broker.issue("svc:a", "postgres", scopes=["orders:read"], ttl=60)
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(secret_of(kept)["user"])))
    orphan = make_lease(time.time() + 60)
    orphan_user = provider.create(orphan)["user"]
    by_hand = "jit_" + secrets.token_hex(16)
    other = "jit_" + secrets.token_hex(16)
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(by_hand)))
    admin.execute(
        sql.SQL("CREATE ROLE {0} LOGIN; COMMENT ON ROLE {0} IS 'jitbroker:other'").format(
            sql.Identifier(other)
        )
    )
    try:
        assert provider.managed() == [orphan.id]
        found = broker.reconcile()
        assert found.revoked == (orphan.id,)
        assert [lease.id for lease in found.missing] == [kept.lease_id]
        assert found.failed == ()
        assert role_of(admin, orphan_user) is None
        assert role_of(admin, by_hand) is not None
        assert role_of(admin, other) is not None
    finally:
        for name in (by_hand, other):
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    broker.revoke(kept)  # its role is already gone: the revoke is still success
    assert broker.failed_hooks() == []


# -- 6. hostile input ------------------------------------------------------------
def test_unmapped_or_missing_scopes_are_refused_before_anything_exists(
    admin: Admin, provider: PostgresRoles
) -> None:
    broker = Broker(providers=[provider])
    before = admin.execute("SELECT count(*) FROM pg_roles").fetchone()
    for scopes in (["orders:drop"], ["orders:read", "orders:drop"], []):
        with pytest.raises(InvalidRequest, match="scope"):
            broker.issue("svc:a", "postgres", scopes=scopes, ttl=60)
    assert admin.execute("SELECT count(*) FROM pg_roles").fetchone() == before
    assert list(broker.leases()) == []


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("too_strong", "has CREATEROLE"),
        ("sneaky", "through its membership in 'postgres'"),
        ("shell_runner", "pg_execute_server_program"),
        ("no_such_role", "does not exist"),
        ('x"; DROP TABLE orders; --', "does not exist"),
    ],
)
def test_a_missing_or_too_strong_template_is_refused(
    cluster: Cluster,
    admin: Admin,
    make_provider: Callable[..., PostgresRoles],
    template: str,
    why: str,
) -> None:
    provider = make_provider(roles={"any": template})
    broker = Broker(providers=[provider])
    before = admin.execute("SELECT count(*) FROM pg_roles").fetchone()
    with pytest.raises(InvalidRequest, match="scope 'any'") as caught:
        broker.issue("svc:a", "postgres", scopes=["any"], ttl=60)
    assert why in str(caught.value)
    assert_hidden(caught.value, cluster.password)
    with pytest.raises(InvalidRequest, match="scope 'any'"):  # create checks for itself
        provider.create(make_lease(time.time() + 60, scopes=("any",)))
    assert admin.execute("SELECT count(*) FROM pg_roles").fetchone() == before
    assert admin.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    assert list(broker.leases()) == []


def test_a_template_name_is_only_ever_an_identifier(
    admin: Admin, make_provider: Callable[..., PostgresRoles]
) -> None:
    provider = make_provider(roles={"weird": WEIRD}, prefix="jb_weird_")
    broker = Broker(providers=[provider])
    ask: dict[str, Any] = {"subject": "svc:w", "audience": "postgres", "scopes": ["weird"]}
    with broker.task("w", **ask) as cred, login(secret_of(cred)) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    assert role_of(admin, WEIRD) is not None


@pytest.mark.parametrize("prefix", ["Jit_", "1x", "a-b", "x" * 40, "", "pg_x", "jit_;"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidRequest, match="prefix"):
        PostgresRoles(admin_dsn="host=127.0.0.1", roles=READ, prefix=prefix)
    assert PostgresRoles(admin_dsn="host=127.0.0.1", roles=READ, prefix="x" * 31).prefix == "x" * 31


@pytest.mark.parametrize(
    "options",
    [
        {"roles": {}},
        {"roles": ["orders_reader"]},
        {"roles": {"": "orders_reader"}},
        {"roles": {"read": ""}},
        {"roles": {"read": []}},
        {"roles": {"read": [b"orders_reader"]}},
        {"roles": {"read": "x" * 64}},
        {"roles": {"read": "nul\0byte"}},
        {"roles": READ, "name": "has space"},
        {"roles": READ, "connect_timeout": 0},
        {"roles": READ, "connect_timeout": float("nan")},
        {"roles": READ, "connect_timeout": True},
        {"roles": READ, "connect_dsn": "host=db user=admin"},
        {"roles": READ, "connect_dsn": "host=db password=hunter2-admin"},
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        PostgresRoles(admin_dsn="postgresql://admin:hunter2-admin@db/app", **options)
    assert_hidden(caught.value, "hunter2-admin")


def test_a_bad_dsn_is_refused_without_echoing_it() -> None:
    for dsn in ("host=db password=hunter2-admin junk", "postgresql://u:hunter2-admin%zz@db/x"):
        with pytest.raises(InvalidRequest, match="not a valid") as caught:
            PostgresRoles(admin_dsn=dsn, roles=READ)
        assert_hidden(caught.value, "hunter2-admin")
        assert caught.value.__cause__ is None
        assert caught.value.__context__ is None


def test_no_password_shows_in_a_repr(cluster: Cluster, provider: PostgresRoles) -> None:
    assert cluster.password not in repr(provider)
    assert f"port={cluster.port}" in repr(provider)
    broker = Broker(providers=[provider])
    with broker.task("t", subject="svc:a", audience="postgres", scopes=["orders:read"]) as cred:
        password = secret_of(cred)["password"]
        assert cluster.password not in secret_of(cred)["dsn"]  # the admin's stays home
        for shown in (repr(cred), str(cred), repr(cred.secret), str(cred.secret)):
            assert password not in shown
            assert cluster.password not in shown


# -- the admin connection ---------------------------------------------------
def test_each_call_is_one_round_trip(admin: Admin, provider: PostgresRoles) -> None:
    lease = make_lease(time.time() + 60)
    provider.check(lease)  # vets the template once
    start = provider.round_trips
    provider.check(lease)
    user = provider.create(lease)["user"]
    assert provider.round_trips - start == 1
    for call in (provider.renew, provider.revoke, provider.revoke):
        call(lease)
    assert provider.managed() == []
    assert provider.round_trips - start == 5
    assert role_of(admin, user) is None


def test_a_broken_admin_connection_is_replaced(admin: Admin, provider: PostgresRoles) -> None:
    assert provider.managed() == []  # opens the admin connection
    admin.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
        " WHERE usename = 'postgres' AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'"
    )
    start = provider.round_trips
    assert provider.managed() == []  # the dead connection is replaced, the call retried
    assert provider.round_trips - start == 2
    lease = make_lease(time.time() + 60)
    with login(dict(provider.create(lease))) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    provider.revoke(lease)


def test_the_docs_example_runs(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "providers.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "PostgresRoles(" in b]
    documented = "postgresql://jit_admin:...@db.internal/orders"
    assert documented in block
    monkeypatch.chdir(tmp_path)  # the example's leases.db
    scope: dict[str, Any] = {"__name__": "__main__"}
    code = compile(block.replace(documented, cluster.dsn), "docs/providers.md", "exec")
    exec(code, scope)  # noqa: S102 - our own docs, against the private cluster
    role = "jit_" + scope["cred"].lease_id
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        left = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    assert left is None
