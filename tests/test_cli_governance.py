"""``jitbroker report|leases|revoke|policy check`` end to end on a SQLite file,
``open_store`` URLs, and the pytest plugin's leak detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker import Broker, Credential, KeyRing
from jitbroker.cli import main
from jitbroker.errors import InvalidRequest
from jitbroker.stores import SQLiteStore, open_store
from jitbroker.testing import TEST_ISSUER, FakeClock, assert_no_leaks

POLICY = """
[[rule]]
name = "ci"
subjects = ["svc:ci-*"]
audiences = ["db:orders"]
scopes = ["orders:read"]
max_ttl = 600
owner_required = true
labels = { env = "prod" }
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "leases.db"


@pytest.fixture
def broker(db: Path) -> Broker:
    return Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), store=SQLiteStore(db))


def issue(broker: Broker, subject: str, owner: str | None, **extra: object) -> Credential:
    return broker.issue(subject, "db:orders", ["orders:read"], 600, owner=owner, **extra)  # type: ignore[arg-type]


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the installed `jitbroker` command in a subprocess: what an operator types."""
    run = subprocess.run(
        [sys.executable, "-m", "jitbroker.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "JITBROKER_STORE": ""},
    )
    return run.returncode, run.stdout, run.stderr


def test_report_lists_what_is_alive_and_what_looks_wrong(broker: Broker, db: Path) -> None:
    issue(broker, "svc:a", "alice@example.com", purpose="export")
    issue(broker, "svc:b", None)
    code, out, err = cli("report", "--store", str(db))
    assert code == 0, err
    assert "2 active leases" in out
    assert "alice@example.com" in out
    assert "(no owner)" in out
    assert "leases with no owner: 1" in out
    code, out, err = cli("report", "--store", f"sqlite:///{db}", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["active"] == 2
    assert data["by_owner"] == {"alice@example.com": 1, "(no owner)": 1}
    assert [x["subject"] for x in data["unowned"]] == ["svc:b"]


def test_report_flags_leases_of_a_retired_key(broker: Broker, db: Path, tmp_path: Path) -> None:
    old = issue(broker, "svc:a", "alice")
    broker.rotate_keys()
    broker.retire_key(old.lease.key_id or "", revoke=False)
    issue(broker, "svc:a", "alice")
    broker.keys.save_dir(tmp_path / "keys")
    code, out, err = cli("report", "--store", str(db), "--keys", str(tmp_path / "keys"), "--json")
    assert code == 0, err
    assert [x["id"] for x in json.loads(out)["retired_key"]] == [old.lease_id]


def test_leases_filters_and_all(broker: Broker, db: Path) -> None:
    a = issue(broker, "svc:a", "alice", task="t1")
    issue(broker, "svc:b", "bob", task="t2")
    broker.revoke(a)
    code, out, _ = cli("leases", "--store", str(db))
    assert code == 0
    assert "1 lease(s)" in out
    assert "svc:b" in out
    assert "svc:a" not in out
    code, out, _ = cli("leases", "--store", str(db), "--all", "--owner", "alice", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["id"], r["status"]) for r in rows] == [(a.lease_id, "revoked")]


def test_revoke_by_owner_is_durable_audited_and_counted(
    broker: Broker, db: Path, tmp_path: Path
) -> None:
    a1 = issue(broker, "svc:a", "alice")
    child = broker.attenuate(a1, ttl=60)
    a2 = issue(broker, "svc:b", "alice")
    bob = issue(broker, "svc:a", "bob")
    log = tmp_path / "audit.jsonl"
    code, out, err = cli(
        "revoke", "--store", str(db), "--owner", "alice", "--by", "ops", "--audit-log", str(log)
    )
    assert code == 0, err
    assert "revoked 3 lease(s)" in out
    for cred in (a1, child, a2):
        assert broker.lease(cred).revoke_reason == "revoked-by-operator"
    assert broker.lease(bob).revoked_at is None
    events = [json.loads(line) for line in log.read_text().splitlines()]
    summary = [e for e in events if e["action"] == "revoked_where"]
    assert summary == [
        {
            "action": "revoked_where",
            "actor": "ops",
            "at": summary[0]["at"],
            "count": 3,
            "reason": "revoked-by-operator",
            "where": "owner='alice'",
        }
    ]
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_revoke_combined_filters_and_one_lease(broker: Broker, db: Path) -> None:
    x = issue(broker, "svc:a", "alice")
    y = issue(broker, "svc:b", "alice")
    code, out, _ = cli("revoke", "--store", str(db), "--owner", "alice", "--subject", "svc:b")
    assert code == 0
    assert "revoked 1 lease(s)" in out
    assert broker.lease(y).revoked_at is not None
    assert broker.lease(x).revoked_at is None
    assert cli("revoke", "--store", str(db), "--lease", x.lease_id)[0] == 0
    code, out, _ = cli("revoke", "--store", str(db), "--lease", x.lease_id)
    assert code == 1
    assert "was not active" in out


def test_revoke_refuses_tokens_no_filter_and_mixed_requests(broker: Broker, db: Path) -> None:
    cred = issue(broker, "svc:a", "alice")
    code, out, err = cli("revoke", "--store", str(db), "--lease", cred.token)
    assert code == 2
    assert "never a token" in err
    assert cred.token not in out + err
    code, _, err = cli("revoke", "--store", str(db))
    assert code == 2
    assert "say what to revoke" in err
    code, _, err = cli("revoke", "--store", str(db), "--lease", cred.lease_id, "--owner", "x")
    assert code == 2
    assert "do not combine" in err
    assert broker.lease(cred).revoked_at is None


def test_revoke_by_filter_that_takes_nothing_exits_1(broker: Broker, db: Path) -> None:
    cred = issue(broker, "svc:a", "alice")
    code, out, _ = cli("revoke", "--store", str(db), "--owner", "alcie")  # a typo
    assert code == 1
    assert "revoked 0 lease(s)" in out
    assert broker.lease(cred).revoked_at is None


@pytest.mark.parametrize("command", [["report"], ["leases"], ["revoke", "--owner", "alice"]])
def test_the_cli_never_creates_a_store(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "typo.db"
    for store in (str(missing), f"sqlite:///{missing}", f"sqlite:{missing}"):
        code, out, err = cli(*command, "--store", store)
        assert code == 2
        assert "no SQLite store at that path" in err
        assert str(missing) not in out + err  # it may be a DSN with a password
    assert list(tmp_path.iterdir()) == []


def test_a_libpq_dsn_is_refused_not_made_a_file(tmp_path: Path) -> None:
    dsn = "host=127.0.0.1 dbname=test user=postgres password=S3cretPW"
    run = subprocess.run(
        [sys.executable, "-m", "jitbroker.cli", "revoke", "--store", dsn, "--owner", "bob"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "JITBROKER_STORE": ""},
    )
    assert run.returncode == 2
    assert "postgresql://" in run.stderr
    assert "S3cretPW" not in run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidRequest, match="key=value") as info:
        open_store(dsn)  # the library refuses it too, without echoing it
    assert "S3cretPW" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure", [KeyError("getpwuid(): uid not found: 54321"), OSError("no login"), ImportError]
)
def test_revoke_without_a_login_name_still_revokes(
    broker: Broker, db: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    # A container's arbitrary UID: no passwd entry, no $USER.
    def getuser() -> str:
        raise failure

    monkeypatch.setattr("getpass.getuser", getuser)
    cred = issue(broker, "svc:a", "alice")
    log = db.parent / "audit.jsonl"
    assert main(["revoke", "--store", str(db), "--owner", "alice", "--audit-log", str(log)]) == 0
    assert broker.lease(cred).revoked_at is not None
    actors = {json.loads(line)["actor"] for line in log.read_text().splitlines()}
    assert actors == {f"cli:uid-{os.getuid()}"}


def test_a_store_is_required_and_bad_urls_are_clear() -> None:
    code, _, err = cli("report")
    assert code == 2
    assert "--store" in err
    code, _, err = cli("report", "--store", "ftp://user:secret@host/x")
    assert code == 2
    assert "unknown store URL scheme 'ftp'" in err
    assert "secret" not in err


def test_policy_check_validates_and_explains(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    code, out, err = cli("policy", "check", str(path))
    assert (code, out.strip()) == (0, f"{path}: valid, 1 rule(s)"), err
    allowed = ("--subject", "svc:ci-x", "--audience", "db:orders", "--scopes", "orders:read")
    code, out, _ = cli(
        "policy", "check", str(path), *allowed, "--ttl", "60", "--owner", "a", "--label", "env=prod"
    )
    assert code == 0
    assert "ALLOWED" in out
    assert "granted by: ci" in out
    code, out, _ = cli("policy", "check", str(path), *allowed, "--ttl", "6000")
    assert code == 1
    assert "DENIED" in out
    for reason in ("at most 600s", "requires an owner", "condition labels env=prod is not met"):
        assert reason in out


def test_policy_check_names_the_file_rule_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(POLICY.replace("max_ttl = 600", 'max_ttl = "soon"'))
    code, _, err = cli("policy", "check", str(path))
    assert code == 2
    assert str(path) in err
    assert "rule 1 (ci)" in err
    assert "max_ttl" in err


def test_main_returns_the_exit_status(broker: Broker, db: Path) -> None:
    issue(broker, "svc:a", "alice")
    assert main(["leases", "--store", str(db)]) == 0
    assert main(["revoke", "--store", str(db), "--lease", "0" * 32]) == 1


# -- open_store ---------------------------------------------------------------------
@pytest.mark.parametrize("form", ["{p}", "sqlite:///{p}", "sqlite:{p}"])
def test_open_store_sqlite_forms(tmp_path: Path, form: str) -> None:
    path = tmp_path / "x.db"
    store = open_store(form.format(p=path))
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(path)
    finally:
        store.close()


def test_open_store_redis_and_postgres_take_prefix_and_schema() -> None:
    server_or_skip("Redis", "127.0.0.1", 6379)
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    prefix, schema = f"jbcli-{uuid4().hex}", f"jbcli_{uuid4().hex}"
    redis_store = open_store(f"redis://127.0.0.1:6379/0?prefix={prefix}")
    pg_store = open_store(f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}")
    try:
        assert getattr(redis_store, "prefix", None) == prefix
        assert getattr(pg_store, "schema", None) == schema
    finally:
        redis_store.close()
        getattr(pg_store, "clear", lambda: None)()
        pg_store.close()


def test_the_cli_refuses_a_mistyped_postgres_schema_or_redis_prefix() -> None:
    """An operator's typo must be an error, never DDL in a production database or
    a report that says nothing is active."""
    server_or_skip("Redis", "127.0.0.1", 6379)
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    schema = f"jbcli_{uuid4().hex}"
    code, _, err = cli("report", "--store", f"postgresql://postgres@127.0.0.1/test?schema={schema}")
    assert code == 2
    assert f"no jitbroker lease schema {schema!r}" in err
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1/test") as conn:
        found = conn.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,)
        ).fetchone()
    assert found is None  # nothing was created
    prefix = f"jbcli-{uuid4().hex}"
    code, _, err = cli("leases", "--store", f"redis://127.0.0.1:6379/0?prefix={prefix}")
    assert code == 2
    assert "no jitbroker store under the Redis prefix" in err


@pytest.mark.parametrize(
    "url", ["", "ftp://h/x", "redis://h/0?prefix=a&prefix=b", "host=h dbname=d", " dbname = d"]
)
def test_open_store_refuses(url: str) -> None:
    with pytest.raises(InvalidRequest):
        open_store(url)


def test_open_store_create_false_needs_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a=b" / "x.db"  # an '=' inside a path is still a path
    path.parent.mkdir()
    with pytest.raises(InvalidRequest, match="no SQLite store at that path"):
        open_store(str(path), create=False)
    assert not path.exists()
    open_store(str(path)).close()  # the library default creates it
    store = open_store(f"sqlite:{path}", create=False)
    store.close()
    with pytest.raises(InvalidRequest, match="no SQLite store"):
        open_store(str(tmp_path), create=False)  # a directory is no store either


# -- leak detection -------------------------------------------------------------------
def test_assert_no_leaks_lists_the_leaked_leases() -> None:
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=FakeClock())
    assert_no_leaks(broker)
    cred = broker.issue("svc:a", "api", ["read"], 60, task="job-1", owner="alice")
    with pytest.raises(AssertionError) as info:
        assert_no_leaks(broker)
    assert cred.lease_id in str(info.value)
    assert "job-1" in str(info.value)
    assert cred.token not in str(info.value)
    broker.revoke(cred)
    assert_no_leaks(broker)


LEAKY = """
import pytest

@pytest.mark.jitbroker_no_leaks
def test_leaks(jitbroker_broker):
    jitbroker_broker.issue("svc:leaky", "api", ["read"], 60, task="t-leak")

@pytest.mark.jitbroker_no_leaks
def test_cleans_up(jitbroker_broker):
    with jitbroker_broker.task("t-ok", subject="svc:tidy", audience="api", ttl=60):
        pass

def test_unmarked_leak_is_allowed(jitbroker_broker):
    jitbroker_broker.issue("svc:leaky", "api", ["read"], 60)

@pytest.mark.jitbroker_no_leaks
def test_expired_is_not_a_leak(jitbroker_broker, jitbroker_clock):
    jitbroker_broker.issue("svc:x", "api", ["read"], 60)
    jitbroker_clock.advance(61)
"""


def test_leak_detection_marker_fails_only_leaking_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # A leak is found when the broker fixture is torn down: an error at teardown.
    result.assert_outcomes(passed=4, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_leaks*", "*1 lease(s) still active*", "*t-leak*"]
    )


def test_leak_detection_ini_option_covers_every_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY)
    pytester.makeini("[pytest]\njitbroker_no_leaks = true\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines_random(
        ["*ERROR at teardown of test_leaks*", "*ERROR at teardown of test_unmarked_leak*"]
    )


SCOPED_BY_FIXTURES = """
import pytest
from jitbroker import Broker

@pytest.fixture
def cred(jitbroker_broker):
    # Revoked when this fixture is torn down, after the test body.
    with jitbroker_broker.task("t", subject="svc:a", audience="api", scopes=["r"], ttl=60) as c:
        yield c

@pytest.fixture
def leaky(jitbroker_broker):
    yield jitbroker_broker.issue("svc:b", "api", ["r"], 60, task="t-fixture-leak")

@pytest.mark.jitbroker_no_leaks
def test_a_yield_fixture_around_a_task_is_not_a_leak(cred, jitbroker_broker):
    assert jitbroker_broker.verify(cred.token, audience="api")

@pytest.mark.jitbroker_no_leaks
def test_a_fixture_that_leaks_is_caught(leaky):
    pass

@pytest.fixture
def jitbroker_broker(jitbroker_keys, jitbroker_store, jitbroker_clock):
    # An override: checked too, before its own teardown closes the broker.
    broker = Broker(keys=jitbroker_keys, store=jitbroker_store, clock=jitbroker_clock)
    yield broker
    broker.close()
"""


def test_leak_detection_runs_after_the_fixtures_that_use_the_broker(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(SCOPED_BY_FIXTURES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_a_fixture_that_leaks_is_caught*", "*t-fixture-leak*"]
    )
    result.stdout.no_fnmatch_line("*teardown of test_a_yield_fixture*")


def test_outbox_lists_retries_and_forgets_parked_work(db: Path, tmp_path: Path) -> None:
    def failing(lease: object) -> None:
        raise RuntimeError("backend down")

    clock = FakeClock()
    broker = Broker(
        issuer=TEST_ISSUER,
        store=SQLiteStore(db),
        clock=clock,
        on_revoke={"drop": failing},
        hook_retries=0,
    )
    cred = issue(broker, "svc:ci-a", "alice")
    broker.revoke(cred)
    [parked] = broker.failed_hooks()
    code, out, _ = cli("outbox", "list", "--store", str(db), "--json")
    assert code == 0
    row = json.loads(out)
    assert (row["id"], row["event"], row["name"], row["parked"]) == (
        parked.id,
        "on_revoke",
        "drop",
        True,
    )
    assert cred.token not in out
    code, out, _ = cli("report", "--store", str(db))
    assert "failed hooks: 1" in out
    code, _, err = cli("outbox", "forget", parked.id, "--store", str(db))
    assert code == 2
    assert "force" in err
    code, out, _ = cli("outbox", "retry", "--store", str(db))
    assert (code, out.split()[0]) == (0, "1")
    code, out, _ = cli("outbox", "list", "--store", str(db), "--all")
    assert "parked=False" in out
    log = tmp_path / "audit.jsonl"
    code, out, _ = cli(
        "outbox",
        "forget",
        parked.id,
        "--force",
        "--by",
        "ops:bob",
        "--store",
        str(db),
        "--audit-log",
        str(log),
    )
    assert (code, out.strip()) == (0, "forgot 1 job(s)")
    [event] = [json.loads(line) for line in log.read_text().splitlines()]
    assert (event["action"], event["actor"], event["where"]) == (
        "hook_forgotten",
        "ops:bob",
        parked.id,
    )
    assert broker.failed_hooks() == []
