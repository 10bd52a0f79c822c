"""``RedisUsers`` in a broker, against a real Redis: a lease's ACL user can do what
its scopes map to and nothing else, dies with the lease by every path, is
retried and parked through an outage, is reconciled; hostile rules are refused.

Most tests use a private ``redis-server`` (``redis_server``); the first two also
run against the shared one at 127.0.0.1:6379 (skipped locally when absent, a
failure under ``CI=true``), where every user made is deleted at the end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from uuid import uuid4

import attrs
import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from conftest import server_or_skip
from jitbroker import Broker, Credential, Lease, Secret
from jitbroker.errors import InvalidRequest, JitBrokerError, ProviderError
from jitbroker.providers import Provider
from jitbroker.providers.redis import RedisUsers
from jitbroker.testing import FakeClock
from redis_server import RedisServer, command, free_port, poll, start_or_skip

SHARED = "redis://127.0.0.1:6379/0"
RULES = {
    "cache:read": "%R~cache:* +get +mget +ping",
    "cache:write": ["%W~cache:*", "+set", "+del"],
    "events": "&events:* +publish",
}
Build = Callable[..., RedisUsers]


def admin_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))


def users_of(admin: redis.Redis) -> set[str]:
    names = command(admin, "ACL USERS")
    return {name.decode() if isinstance(name, bytes) else name for name in names}


def holder(secret: Secret) -> redis.Redis:
    return redis.Redis.from_url(secret["url"], socket_timeout=1.0, retry=Retry(NoBackoff(), 0))


def open_connection(secret: Secret) -> redis.Connection:
    """One raw authenticated connection, never reconnected behind our back."""
    host, port = secret["url"].rsplit("@", 1)[1].split("/")[0].split(":")
    conn = redis.Connection(  # type: ignore[no-untyped-call]
        host=host,
        port=int(port),
        username=secret["user"],
        password=secret["password"],
        socket_timeout=1.0,
    )
    conn.connect()  # type: ignore[no-untyped-call]
    return conn


def ask(conn: redis.Connection, *args: str) -> object:
    conn.send_command(*args)  # type: ignore[no-untyped-call]
    return conn.read_response()


def lease_for(lease_id: str, *scopes: str) -> Lease:
    return Lease(
        id=lease_id,
        subject="svc:test",
        audience="redis",
        scopes=scopes,
        issued_at=0.0,
        expires_at=math.inf,
        max_expires_at=math.inf,
        provider="redis",
    )


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private server of this test's own, to freeze or kill."""
    server = start_or_skip(tmp_path_factory.mktemp("redis-outage"))
    yield server
    server.kill()


@pytest.fixture(params=["private", "shared"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "shared":
        server_or_skip("Redis", "127.0.0.1", 6379)
        return SHARED
    server: RedisServer = request.getfixturevalue("private")
    return server.url


@pytest.fixture
def build() -> Iterator[Build]:
    """Builds providers under fresh prefixes; deletes every user of each at the end."""
    made: list[tuple[str, RedisUsers]] = []

    def make(url: str, **options: object) -> RedisUsers:
        options.setdefault("prefix", f"jt{uuid4().hex[:10]}_")
        options.setdefault("rules", RULES)
        provider = RedisUsers(admin_url=url, **options)  # type: ignore[arg-type]
        made.append((url, provider))
        return provider

    yield make
    for url, provider in made:
        provider.close()
        with contextlib.suppress(redis.RedisError):
            admin = admin_for(url)
            for name in users_of(admin):
                if name.startswith(provider.prefix):
                    command(admin, "ACL DELUSER", name)
            admin.close()


@pytest.fixture
def key(url: str) -> Iterator[str]:
    """A key under ``cache:``, unique to the test, holding "hello"."""
    name = f"cache:{uuid4().hex}"
    admin = admin_for(url)
    admin.set(name, "hello")
    yield name
    admin.delete(name)
    admin.close()


# -- 1. what a lease's user may do ---------------------------------------------
def test_a_lease_gets_a_user_that_can_do_its_scopes_and_nothing_else(
    url: str, build: Build, key: str
) -> None:
    provider = build(url)
    assert isinstance(provider, Provider)
    broker = Broker(providers=[provider], clock=FakeClock())  # its sweep is due once, now
    cred = broker.issue("svc:a", "redis", ["cache:read"], ttl=60)
    secret = cred.secret
    assert secret is not None
    assert set(secret) == {"user", "password", "url"}
    assert secret["user"] == provider.prefix + cred.lease_id
    shown = repr(cred) + str(cred) + repr(secret) + repr(provider) + repr(cred.lease)
    assert secret["password"] not in shown

    client = holder(secret)
    assert client.get(key) == b"hello"
    assert client.mget([key, "cache:none"]) == [b"hello", None]
    refused: list[Callable[[], object]] = [
        lambda: client.set(key, "changed"),  # read-only key pattern
        lambda: client.get("other:x"),  # outside the namespace
        lambda: client.get("jitbroker:anything"),  # the broker's store
        lambda: client.get("{jitbroker}:lease:" + cred.lease_id),
        lambda: client.publish("events:a", "x"),  # a scope it does not have
        lambda: client.flushall(),
        lambda: client.keys("*"),
        lambda: command(client, "ACL", "WHOAMI"),
    ]
    for call in refused:
        with pytest.raises(NoPermissionError):
            call()
    assert admin_for(url).get(key) == b"hello"

    before = provider.round_trips
    both = broker.issue("svc:b", "redis", ["cache:read", "cache:write", "events"], ttl=60)
    assert provider.round_trips == before + 1  # categories cached: one ACL SETUSER
    assert both.secret is not None
    writer = holder(both.secret)
    assert writer.set(key, "written") is True
    assert writer.publish("events:a", "x") == 0
    with pytest.raises(NoPermissionError):
        writer.publish("other:a", "x")

    before = provider.round_trips
    broker.revoke(cred)
    assert provider.round_trips == before + 1  # CLIENT KILL and ACL DELUSER, pipelined
    assert secret["user"] not in users_of(admin_for(url))
    assert both.secret["user"] in users_of(admin_for(url))
    broker.revoke(both)
    client.close()
    writer.close()


def test_the_holder_url_is_connect_url_with_the_lease_user(
    private: RedisServer, build: Build
) -> None:
    connect = f"redis://someone:hunter2@127.0.0.1:{private.port}/1?password=hunter2"
    rules = {"cache:write": "%W~cache:* +set +select"}  # a db other than 0 needs SELECT
    provider = build(private.url, connect_url=connect, rules=rules)
    broker = Broker(providers=[provider])
    cred = broker.issue("svc:a", "redis", ["cache:write"], ttl=60)
    assert cred.secret is not None
    assert "hunter2" not in cred.secret["url"]
    assert "someone" not in cred.secret["url"]
    client = holder(cred.secret)
    assert client.set("cache:in-db-1", "x") is True
    assert client.connection_pool.connection_kwargs["db"] == 1
    assert private.admin.get("cache:in-db-1") is None  # db 0 of the admin
    broker.revoke(cred)
    client.close()


# -- 2. every death removes the user -----------------------------------------------
DEATHS = ["revoke", "task-end", "ttl-sweep", "parent-revoke", "revoke-where"]


@pytest.mark.parametrize("death", DEATHS)
def test_the_user_dies_with_its_lease(url: str, build: Build, key: str, death: str) -> None:
    provider = build(url)
    clock = FakeClock()
    broker = Broker(providers=[provider], clock=clock)
    subject = f"svc:{uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        if death == "task-end":
            cred = stack.enter_context(
                broker.task("job", subject=subject, audience="redis", scopes=["cache:read"])
            )
        else:
            cred = broker.issue(subject, "redis", ["cache:read"], ttl=60)
        creds = [cred]
        if death == "parent-revoke":
            creds.append(broker.attenuate(cred, scopes=["cache:read"], ttl=30))
        secrets = [c.secret for c in creds if c.secret is not None]
        assert len(secrets) == len(creds)
        connections = [open_connection(secret) for secret in secrets]
        assert [ask(conn, "GET", key) for conn in connections] == [b"hello"] * len(creds)
        die(death, broker, clock, cred, subject)
        if death == "task-end":
            stack.close()

    admin = admin_for(url)
    for secret, conn in zip(secrets, connections, strict=True):
        with pytest.raises(redis.ConnectionError):  # the open connection was cut
            ask(conn, "GET", key)
        with pytest.raises(redis.AuthenticationError):  # and the password is dead
            holder(secret).ping()
        assert secret["user"] not in users_of(admin)
    assert broker.failed_hooks() == []
    assert provider.managed() == []


def die(death: str, broker: Broker, clock: FakeClock, cred: Credential, subject: str) -> None:
    if death in {"revoke", "parent-revoke"}:
        assert broker.revoke(cred) is True
    elif death == "ttl-sweep":
        clock.advance(61)
        assert [lease.id for lease in broker.sweep()] == [cred.lease_id]
    elif death == "revoke-where":
        assert broker.revoke_where(subject=subject) == 1


def test_revoke_is_idempotent_and_renew_does_nothing(private: RedisServer, build: Build) -> None:
    provider = build(private.url)
    lease = lease_for(uuid4().hex, "cache:read")
    provider.revoke(lease)  # never made: success
    provider.create(lease)
    assert provider.managed() == [lease.id]
    before = provider.round_trips
    provider.renew(lease)
    assert provider.round_trips == before
    provider.revoke(lease)
    provider.revoke(lease)
    assert provider.managed() == []
    with pytest.raises(InvalidRequest):  # a user name is only ever prefix + 32 hex
        provider.revoke(attrs.evolve(lease, id="x y"))


# -- 3. outages -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_revoke_while_redis_is_down_is_retried_parked_then_done(outage: RedisServer) -> None:
    provider = RedisUsers(admin_url=outage.url, rules=RULES, socket_timeout=0.5)
    clock = FakeClock()
    broker = Broker(providers=[provider], clock=clock, hook_retries=2, hook_backoff=0.001)
    cred = broker.issue("svc:a", "redis", ["cache:read"], ttl=600)
    assert cred.secret is not None
    user, password = cred.secret["user"], cred.secret["password"]
    # Persist the ACL so that the restarted server has the user again: only a
    # revoke may remove it.
    command(outage.admin, "ACL SAVE")
    outage.kill()

    assert broker.revoke(cred) is True  # the lease dies at once; the revoke is owed
    for _ in range(5):
        if broker.failed_hooks():
            break
        clock.advance(1)
        assert broker.sweep() == []
    parked = broker.failed_hooks()
    assert [(hook.lease.id, hook.attempts) for hook in parked] == [(cred.lease_id, 3)]
    assert password not in parked[0].error

    outage.start()
    assert user in outage.users()  # nothing removed it while Redis was down
    assert broker.retry_failed_hooks() == 0
    assert user not in outage.users()
    assert broker.failed_hooks() == []
    provider.close()


@pytest.mark.slow
def test_a_hung_redis_fails_the_issue_and_leaves_no_active_lease(outage: RedisServer) -> None:
    provider = RedisUsers(admin_url=outage.url, rules=RULES, socket_timeout=0.2)
    clock = FakeClock()
    broker = Broker(providers=[provider], clock=clock, hook_retries=2, hook_backoff=0.001)
    with outage.frozen(), pytest.raises(ProviderError) as cold:
        broker.issue("svc:a", "redis", ["cache:read"], ttl=60)  # first check asks the server
    assert isinstance(cold.value, JitBrokerError)
    assert isinstance(cold.value.__cause__, redis.RedisError)
    assert list(broker.leases(include_inactive=True)) == []  # refused before anything stored

    broker.revoke(broker.issue("svc:a", "redis", ["cache:read"], ttl=60))  # categories known
    with outage.frozen(), pytest.raises(ProviderError) as warm:
        broker.issue("svc:a", "redis", ["cache:read"], ttl=60)  # now ACL SETUSER times out
    assert list(broker.leases()) == []
    assert broker.lease(warm.value.lease_id or "").revoke_reason == "provider-failed"

    # The thawed server may still run the ACL SETUSER it had queued: the owed
    # revoke (a sweep) or else reconciliation removes what it made.
    def converged() -> bool:
        clock.advance(1)
        broker.sweep()
        broker.reconcile()
        return provider.managed() == []

    assert poll(converged, limit=2.0)
    assert broker.failed_hooks() == []
    provider.close()


def test_an_admin_without_acl_rights_fails_without_echoing_its_password(
    private: RedisServer, build: Build
) -> None:
    name = f"limited{uuid4().hex[:8]}"
    command(private.admin, "ACL SETUSER", name, "on", ">hunter2", "~*", "+@read")
    try:
        provider = build(f"redis://{name}:hunter2@127.0.0.1:{private.port}/0")
        broker = Broker(providers=[provider])
        with pytest.raises(ProviderError) as caught:
            broker.issue("svc:a", "redis", ["cache:read"], ttl=60)
        assert isinstance(caught.value.__cause__, NoPermissionError)
        for text in (str(caught.value), repr(caught.value), str(caught.value.__cause__)):
            assert "hunter2" not in text
        assert list(broker.leases(include_inactive=True)) == []
    finally:
        command(private.admin, "ACL DELUSER", name)


# -- 4. reconciliation ------------------------------------------------------------------
def test_reconcile_revokes_orphans_and_flags_missing_users(
    private: RedisServer, build: Build
) -> None:
    provider = build(private.url)
    broker = Broker(providers=[provider], clock=FakeClock())  # no sweep after the first issue
    kept = broker.issue("svc:a", "redis", ["cache:read"], ttl=60)
    lost = broker.issue("svc:b", "redis", ["cache:read"], ttl=60)
    assert lost.secret is not None
    stranger = lease_for(uuid4().hex, "cache:read")  # a lease this broker never issued
    provider.create(stranger)
    not_ours = [provider.prefix + "nothex", provider.prefix + "a" * 31, provider.prefix + "A" * 32]
    for name in not_ours:
        command(private.admin, "ACL SETUSER", name, "off")
    command(private.admin, "ACL DELUSER", lost.secret["user"])

    found = broker.reconcile()
    assert found.revoked == (stranger.id,)
    assert [lease.id for lease in found.missing] == [lost.lease_id]
    assert found.failed == ()
    users = private.users()
    assert provider.prefix + stranger.id not in users
    assert set(not_ours) <= users  # prefix but not 32 lowercase hex: not ours
    assert provider.prefix + kept.lease_id in users
    assert provider.managed() == [kept.lease_id]


# -- 5. hostile input -------------------------------------------------------------------
REFUSED_RULES = [
    *("allkeys", "allchannels", "allcommands", "nocommands", "nopass", "on", "off"),
    *("reset", "resetkeys", "resetchannels", "resetpass", "clearselectors"),
    *(">hunter2", "<hunter2", "#" + "a" * 64, "!" + "a" * 64, "(~a:*"),
    *("~*", "&*", "%RW~*", "%R~*", "~*:x", "~jit*", "~:x", "~a", "%r~a:*", "%X~a:*"),
    *("~jitbroker:*", "~{jitbroker}:*", "~jitbroker-x:*", "&jitbroker:*", "~ji[t]:*"),
    *("+@all", "+@ALL", "+@admin", "+@dangerous"),
    *("+acl", "+config", "+config|set", "+CONFIG|GET", "+module", "+debug", "+shutdown"),
    *("+flushall", "+FLUSHALL", "+flushdb", "+keys", "+scan", "+randomkey"),
    *("+get\x00", "~a:*\u00e9", "+"),
]


@pytest.mark.parametrize("rule", REFUSED_RULES)
def test_a_rule_off_the_whitelist_is_refused_at_construction(rule: str) -> None:
    for rules in ({"s": rule}, {"s": ["~a:*", rule]}):
        with pytest.raises(InvalidRequest) as caught:
            RedisUsers(admin_url=SHARED, rules=rules)
        assert "hunter2" not in str(caught.value)
        assert "a" * 64 not in str(caught.value)


@pytest.mark.parametrize(
    "element", ["~a:* allkeys", "~a:*\tallkeys", "+get\n+flushall", "~a:* >hunter2", " ~a:*"]
)
def test_rules_smuggled_in_one_element_are_refused(element: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        RedisUsers(admin_url=SHARED, rules={"s": [element]})
    assert "hunter2" not in str(caught.value)


def test_protected_prefixes_are_the_store_and_its_hash_tag() -> None:
    protect = ("app:secret",)
    for pattern in ("~app:*", "~app:secret:x", "~{app:secret}:x", "&app:*"):
        with pytest.raises(InvalidRequest):
            RedisUsers(admin_url=SHARED, rules={"s": pattern}, protect=protect)
    RedisUsers(admin_url=SHARED, rules={"s": "~app:public:* ~jitbroker:*"}, protect=protect)
    RedisUsers(admin_url=SHARED, rules={"s": "~jit:* &jit:* %RW~cache:a?b"})  # not the broker's own


SERVER_REFUSED = [
    *("+sort", "+info", "+client", "+cluster", "+slowlog|get", "+client|kill"),
    *("+@keyspace", "+@read", "+@write", "+@connection", "+@hyperloglog"),
    *("+nosuchcommand", "+get|nosuch", "-@nosuchcategory", "+@nosuchcategory"),
]


@pytest.mark.parametrize("rule", SERVER_REFUSED)
def test_a_rule_the_server_calls_admin_or_dangerous_is_refused_at_issue(
    private: RedisServer, build: Build, rule: str
) -> None:
    provider = build(private.url, rules={"ok": "~a:* +get +client|setname -@admin", "bad": rule})
    broker = Broker(providers=[provider])
    with pytest.raises(InvalidRequest, match="'bad'"):
        broker.issue("svc:a", "redis", ["ok", "bad"], ttl=60)
    assert list(broker.leases(include_inactive=True)) == []
    assert provider.managed() == []
    broker.revoke(broker.issue("svc:a", "redis", ["ok"], ttl=60))  # the other scope works


def test_the_servers_own_dangerous_commands_are_refused(private: RedisServer, build: Build) -> None:
    names = command(private.admin, "ACL CAT", "dangerous")
    dangerous = {name.decode() if isinstance(name, bytes) else name for name in names}
    assert "keys" in dangerous  # as in Redis 7.0
    static = {"acl", "config", "module", "debug", "shutdown", "flushall", "flushdb", "keys"}
    commands = sorted(name for name in dangerous if "|" not in name and name not in static)
    rules = {f"s{i}": f"+{command}" for i, command in enumerate(commands)}
    provider = build(private.url, rules={"ok": "~a:* +get", **rules})
    broker = Broker(providers=[provider])
    for scope in rules:
        with pytest.raises(InvalidRequest, match=f"'{scope}'"):
            broker.issue("svc:a", "redis", [scope], ttl=60)
    assert provider.round_trips == 1  # asked once, cached
    assert provider.managed() == []


def test_an_unmapped_scope_is_refused_with_no_user_made(private: RedisServer, build: Build) -> None:
    provider = build(private.url)
    broker = Broker(providers=[provider])
    with pytest.raises(InvalidRequest, match="'admin'"):
        broker.issue("svc:a", "redis", ["cache:read", "admin"], ttl=60)
    assert provider.round_trips == 0  # refused before asking the server anything
    assert provider.managed() == []
    assert list(broker.leases(include_inactive=True)) == []


@pytest.mark.parametrize("prefix", ["", "1jit", "jit-", "jit:", "a b", "x" * 33, "é", 3, None])
def test_a_bad_prefix_is_refused(prefix: object) -> None:
    with pytest.raises(InvalidRequest):
        RedisUsers(admin_url=SHARED, rules=RULES, prefix=prefix)  # type: ignore[arg-type]


BAD_OPTIONS: list[dict[str, object]] = [
    {"rules": {}},
    {"rules": {"s": []}},
    {"rules": {"s": ""}},
    {"rules": {"s": 3}},
    {"rules": {"": "~a:*"}},
    {"rules": {"s": ["~a:*", 3]}},
    {"rules": "~a:*"},
    {"protect": "jitbroker"},
    {"protect": [""]},
    {"protect": [3]},
    {"name": "a/b"},
    {"socket_timeout": 0},
    {"socket_timeout": -1},
    {"socket_timeout": True},
    {"socket_timeout": "5"},
    {"socket_timeout": math.inf},
    {"socket_timeout": math.nan},
]


@pytest.mark.parametrize("options", BAD_OPTIONS)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    options.setdefault("rules", RULES)
    with pytest.raises(InvalidRequest):
        RedisUsers(admin_url=SHARED, **options)  # type: ignore[arg-type]


BAD_URLS = [
    "http://user:hunter2@127.0.0.1:6379/0",
    "redis://user:hunter2@127.0.0.1:abc/0",
    "redis://user:hunter2@127.0.0.1:99999/0",
    "redis://user:hunter2@127.0.0.1:6379/0?socket_timeout=abc",
    "",
    b"redis://user:hunter2@127.0.0.1:6379/0",
]


@pytest.mark.parametrize("bad", [*BAD_URLS, None])
def test_a_bad_url_is_refused_without_echoing_it(bad: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        RedisUsers(admin_url=bad, rules=RULES)  # type: ignore[arg-type]
    assert "hunter2" not in str(caught.value)
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("bad", BAD_URLS)
def test_a_bad_connect_url_is_refused_without_echoing_it(bad: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        RedisUsers(admin_url=SHARED, rules=RULES, connect_url=bad)  # type: ignore[arg-type]
    assert "hunter2" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_repr_shows_no_password_and_construction_does_no_io() -> None:
    provider = RedisUsers(admin_url=f"redis://admin:hunter2@127.0.0.1:{free_port()}/0", rules=RULES)
    assert repr(provider) == "<RedisUsers 'redis' prefix='jit_'>"
    assert provider.round_trips == 0  # nothing listens there, and nothing was tried
