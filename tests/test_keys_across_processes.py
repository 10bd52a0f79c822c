"""Keys across processes (invariant 11): brokers following one key directory,
two-phase rotation reaching a JWKS-URL verifier before the new key signs, and
retirement reaching every broker sharing a store through the store.

The JWKS test runs in this process on a fake clock (deterministic); the
process test runs two broker processes (tests/keys_worker.py) on a real store
with a JWKS-URL verifier reading one of them over loopback HTTP.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker import Broker, KeyRing, Verifier
from jitbroker.cli import main
from jitbroker.errors import UnknownKey
from jitbroker.stores import sqlite as sqlite_module
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_store_conformance import POSTGRES_DSN, REDIS_URL, make

HERE = Path(__file__).parent
ISSUER = "urn:jitbroker:keys-test"  # keys_worker's


@contextmanager
def jwks_server(broker: Broker) -> Iterator[tuple[str, list[float]]]:
    """The broker's JWKS on a loopback HTTP server; the times it was fetched."""
    fetched: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(broker.clock())
            data = json.dumps(broker.jwks()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks", fetched
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("idle", [False, True])
def test_a_jwks_verifier_has_the_new_key_before_its_first_token(
    jitbroker_clock: FakeClock, idle: bool
) -> None:
    """Fetched just before the rotation, with the default cache settings
    (max_age 3600, min_refresh_interval 60): with publish_ahead = max_age the
    verifier refetches (on age) before or at the first new-key token, which
    waits for that fetch: never UnknownKey, whether the verifier was busy or idle."""
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=jitbroker_clock)
    with jwks_server(broker) as (url, fetched):
        verifier = Verifier.from_jwks_url(
            url, allow_http=True, issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock
        )
        source = verifier.source
        assert source is not None
        old = broker.issue("svc:a", "api", ttl=60)
        new = broker.rotate_keys(publish_ahead=source.max_age)
        assert len(fetched) == 1  # before the rotation
        if not idle:  # busy: tokens of the old key all along
            for _ in range(int(source.max_age // 600)):
                jitbroker_clock.advance(600)
                verifier.verify(broker.issue("svc:a", "api", ttl=60).token, audience="api")
        jitbroker_clock.set(old.lease.issued_at + source.max_age)
        first = broker.issue("svc:a", "api", ttl=60)
        assert first.lease.key_id == new.kid  # the very first token of the new key
        assert verifier.verify(first.token, audience="api").key_id == new.kid
        assert len(fetched) == 2  # one refetch, on age, no rate limit in the way


def test_without_publish_ahead_a_jwks_verifier_refuses_the_new_key(
    jitbroker_clock: FakeClock,
) -> None:
    """What two-phase rotation prevents (the issue): the verifier fetched within
    min_refresh_interval, so its refetch on the unknown kid is rate-limited."""
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=jitbroker_clock)
    with jwks_server(broker) as (url, _):
        verifier = Verifier.from_jwks_url(
            url, allow_http=True, issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock
        )
        broker.rotate_keys()  # signs at once
        jitbroker_clock.advance(1)
        with pytest.raises(UnknownKey):
            verifier.verify(broker.issue("svc:a", "api", ttl=60).token, audience="api")


# -- schema upgrades ----------------------------------------------------------------
def test_a_sqlite_store_of_the_previous_version_gains_the_retired_keys_table(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    # As the version before retired keys left a file (the usage columns came after).
    with sqlite3.connect(path) as db:
        for steps in sqlite_module._MIGRATIONS[:-2]:
            for statement in steps:
                db.execute(statement)
        db.execute(f"PRAGMA application_id = {sqlite_module.APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {sqlite_module.SCHEMA_VERSION - 2}")
    store = SQLiteStore(path)
    try:
        assert store.add(make("a"))
        assert store.retired_keys() == {}
        assert store.retire_key("kid-1", 1.0)
        assert store.retired_keys() == {"kid-1": 1.0}
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION


def test_a_postgres_schema_of_the_previous_version_gains_the_retired_keys_table() -> None:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    import psycopg
    from psycopg import sql

    from jitbroker.stores.postgres import SCHEMA_VERSION, PostgresStore

    schema = f"jbtest_{uuid4().hex}"
    store = PostgresStore(POSTGRES_DSN, schema=schema)
    store.add(make("a"))
    store.close()
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        name = sql.Identifier(schema)
        admin.execute(sql.SQL("DROP TABLE {}.retired_keys").format(name))
        version = SCHEMA_VERSION - 2  # before retired keys (the usage columns came after)
        admin.execute(sql.SQL("UPDATE {}.jitbroker_meta SET version = %s").format(name), (version,))
        again = PostgresStore(POSTGRES_DSN, schema=schema)
        try:
            assert again.get("a") == make("a")
            assert again.retire_key("kid-1", 1.0)
            assert again.retired_keys() == {"kid-1": 1.0}
            query = sql.SQL("SELECT version FROM {}.jitbroker_meta").format(name)
            assert admin.execute(query).fetchall() == [(SCHEMA_VERSION,)]
        finally:
            again.close()
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(name))


# -- two broker processes -------------------------------------------------------------
class Worker:
    """A broker process (tests/keys_worker.py) and its HTTP address."""

    def __init__(self, url: str, folder: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "keys_worker.py"), url, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["ready"], line
        self.base = f"http://127.0.0.1:{line[1]}"

    def call(self, path: str, body: str | None = None) -> Any:
        data = None if body is None else body.encode()
        with urllib.request.urlopen(self.base + path, data=data, timeout=10) as answer:  # noqa: S310 - loopback http
            return json.loads(answer.read())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _store_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'leases.db'}"
    if kind == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
        return f"{REDIS_URL}?prefix=jbkeys-{uuid4().hex}"
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    return f"{POSTGRES_DSN}?schema=jbkeys_{uuid4().hex}"


def _wait_until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_rotate_and_retire_while_two_brokers_and_a_jwks_verifier_run(
    kind: str, tmp_path: Path
) -> None:
    folder = tmp_path / "keys"
    assert main(["keys", "generate", str(folder)]) == 0
    old = KeyRing.from_dir(folder).active.kid
    url = _store_url(kind, tmp_path)
    if kind == "sqlite":
        SQLiteStore(tmp_path / "leases.db").close()  # create it before two processes race
    workers = [Worker(url, folder), Worker(url, folder)]
    try:
        verifier = Verifier.from_jwks_url(
            workers[0].base + "/jwks",
            allow_http=True,
            issuer=ISSUER,
            offline=True,
            max_age=1.0,  # the verifier's JWKS cache age, which publish_ahead must cover
            min_refresh_interval=1.0,
        )
        tokens: list[tuple[str, str]] = []  # (token, kid)
        unknown: list[str] = []  # UnknownKey for a token whose key was never retired

        def round_trip(retired: set[str]) -> None:
            for issuer in workers:
                minted = issuer.call("/issue", "")
                tokens.append((minted["token"], minted["kid"]))
            for token, kid in tokens[-4:]:
                outcomes = [w.call("/verify", token)["outcome"] for w in workers]
                try:
                    verifier.verify(token, audience="api")
                    outcomes.append("ok")
                except UnknownKey:
                    outcomes.append("UnknownKey")
                if kid not in retired:
                    unknown.extend(o for o in outcomes if o == "UnknownKey")

        start = time.monotonic()
        while time.monotonic() - start < 0.3:
            round_trip(set())
        # > the verifier's max_age (1 s) + its refetch + the followers' poll (50 ms),
        # with room for a loaded machine
        ahead = 2.5
        assert main(["keys", "rotate", str(folder), f"--publish-ahead={ahead}"]) == 0
        new = next(k.kid for k in KeyRing.from_dir(folder) if k.kid != old)
        rotated = time.monotonic()
        while time.monotonic() - rotated < ahead + 1.5:  # across the switch
            round_trip(set())
        assert {kid for _, kid in tokens[-4:]} == {new}  # both sign with the new key
        assert unknown == []  # no verifier ever saw a token before its key
        old_tokens = [token for token, kid in tokens if kid == old]
        assert old_tokens
        assert main(["keys", "retire", str(folder), "--store", url, "--", old]) == 0
        # The delivery signal: each broker reports the key gone (at its next sweep).
        for worker in workers:
            _wait_until(lambda w=worker: old not in w.call("/state")["keys"], "retirement")
        for token in old_tokens[-5:]:
            assert [w.call("/verify", token)["outcome"] for w in workers] == ["UnknownKey"] * 2
        for _ in range(20):
            round_trip({old})
        assert unknown == []
        assert {kid for _, kid in tokens[-40:]} == {new}  # nothing signed by it since
        # The JWKS verifier drops it once its cache age (1 s) is past: the first
        # verify after that starts a background refetch (and still answers from
        # the keys it holds), so the rejection comes within about one more second.

        def refused() -> bool:
            try:
                verifier.verify(old_tokens[-1], audience="api")
            except UnknownKey:
                return True
            return False

        _wait_until(refused, "the JWKS verifier to drop the retired key")
    finally:
        for worker in workers:
            worker.close()
