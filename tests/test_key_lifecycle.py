"""Key rotation with a grace period, retirement with revocation, and key storage."""

from __future__ import annotations

import asyncio
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from jitbroker import AsyncBroker, Broker, KeyRing, MemoryStore
from jitbroker.cli import main
from jitbroker.errors import InvalidRequest, LeaseNotActive, RenewalDenied, UnknownKey
from jitbroker.keyring import DEFAULT_PUBLISH_AHEAD
from jitbroker.stores import SQLiteStore
from jitbroker.testing import TEST_ISSUER, FakeClock


@pytest.fixture
def broker(jitbroker_clock: FakeClock) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=KeyRing.generate(),
        store=MemoryStore(),
        clock=jitbroker_clock,
        max_ttl=600,
        leeway=5,
    )


# -- rotation ---------------------------------------------------------------
def test_rotate_keys_signs_new_leases_with_the_new_key(broker: Broker) -> None:
    old = broker.keys.active.kid
    new = broker.rotate_keys()
    assert broker.keys.active is new
    assert new.kid != old
    assert broker.issue("svc:a", "api", ttl=60).lease.key_id == new.kid


def test_old_key_keeps_verifying_and_renewing_during_grace(
    broker: Broker, jitbroker_clock: FakeClock
) -> None:
    cred = broker.issue("svc:a", "api", ttl=60)
    old = broker.keys.active.kid
    broker.rotate_keys()
    assert broker.keys.drops_at(old) == jitbroker_clock() + 605  # max_ttl + leeway
    jitbroker_clock.advance(50)
    renewed = broker.renew(cred, ttl=60)
    assert renewed.lease.key_id == old  # re-signed by the key that signed the lease
    assert broker.verify(renewed.token, audience="api").key_id == old


def test_old_key_is_dropped_by_the_sweep_after_grace(
    broker: Broker, jitbroker_clock: FakeClock
) -> None:
    old = broker.keys.active.kid
    broker.rotate_keys()
    jitbroker_clock.advance(604)
    broker.sweep()
    assert old in broker.keys
    jitbroker_clock.advance(1)
    broker.sweep()
    assert old not in broker.keys
    assert old not in {k["kid"] for k in broker.jwks()["keys"]}


def test_no_token_outlives_its_key(broker: Broker, jitbroker_clock: FakeClock) -> None:
    """Every token the old key signed (renewals included) is expired by drop time."""
    cred = broker.issue("svc:a", "api", ttl=60)
    old = broker.keys.active.kid
    broker.rotate_keys()
    drop_at = broker.keys.drops_at(old)
    assert drop_at is not None
    latest = cred
    while True:
        jitbroker_clock.advance(55)
        try:
            latest = broker.renew(latest, ttl=60)
        except (RenewalDenied, LeaseNotActive):
            break
    assert latest.expires_at + broker._core.leeway <= drop_at


def test_rotate_without_grace_keeps_the_old_key(jitbroker_clock: FakeClock) -> None:
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate()
    assert ring.drops_at(old) is None
    assert ring.prune(jitbroker_clock() + 10**9) == []
    assert old in ring


def test_prune_only_drops_due_keys() -> None:
    ring = KeyRing.generate()
    first = ring.active.kid
    ring.rotate(grace=100, now=1000.0)
    second = ring.active.kid
    ring.rotate(grace=100, now=1050.0)
    assert ring.prune(1099.0) == []
    assert ring.prune(1100.0) == [first]
    assert ring.prune(1150.0) == [second]
    assert len(ring) == 1


@pytest.mark.parametrize("grace", [-1, -0.5, math.nan, math.inf, "60", True])
def test_rotate_refuses_a_bad_grace_and_changes_nothing(grace: object) -> None:
    ring = KeyRing.generate()
    active = ring.active.kid
    with pytest.raises(InvalidRequest, match="grace"):
        ring.rotate(grace=grace)  # type: ignore[arg-type]
    assert ring.active.kid == active
    assert len(ring) == 1
    assert ring.drops_at(active) is None


def test_rotate_with_zero_grace_drops_the_old_key_at_the_next_prune() -> None:
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate(grace=0, now=1000.0)
    assert ring.drops_at(old) == 1000.0
    assert ring.prune(1000.0) == [old]


# -- retirement ---------------------------------------------------------------
def test_retire_key_revokes_the_leases_it_signed(broker: Broker) -> None:
    old_creds = [broker.issue("svc:a", "api", ttl=60) for _ in range(3)]
    old = broker.keys.active.kid
    broker.rotate_keys()
    kept = broker.issue("svc:a", "api", ttl=60)
    assert broker.retire_key(old) == 3
    assert old not in broker.keys
    for cred in old_creds:
        with pytest.raises(UnknownKey):
            broker.verify(cred.token, audience="api")
        lease = broker.lease(cred.lease_id)
        assert lease is not None
        assert lease.revoke_reason == "key-retired"
    assert broker.verify(kept.token, audience="api").key_id == kept.lease.key_id


def test_retire_key_without_revoke_leaves_leases(broker: Broker) -> None:
    cred = broker.issue("svc:a", "api", ttl=60)
    old = broker.keys.active.kid
    broker.rotate_keys()
    assert broker.retire_key(old, revoke=False) == 0
    lease = broker.lease(cred.lease_id)
    assert lease is not None
    assert lease.revoked_at is None


def test_retire_key_refuses_the_active_key(broker: Broker) -> None:
    cred = broker.issue("svc:a", "api", ttl=60)
    with pytest.raises(InvalidRequest, match="active"):
        broker.retire_key(broker.keys.active.kid)
    assert broker.verify(cred.token, audience="api")


def test_retired_key_opaque_leases_are_untouched(jitbroker_clock: FakeClock) -> None:
    broker = Broker(issuer=TEST_ISSUER, token_format="opaque", clock=jitbroker_clock)
    cred = broker.issue("svc:a", "api", ttl=60)
    old = broker.keys.active.kid
    broker.rotate_keys()
    assert broker.retire_key(old) == 0  # opaque leases are signed by no key
    assert broker.verify(cred.token, audience="api").lease_id == cred.lease_id


def test_async_broker_retire_key(jitbroker_clock: FakeClock) -> None:
    async def scenario() -> None:
        broker = AsyncBroker(issuer=TEST_ISSUER, clock=jitbroker_clock)
        cred = await broker.issue("svc:a", "api", ttl=60)
        old = broker.keys.active.kid
        broker.rotate_keys()
        assert await broker.retire_key(old) == 1
        lease = await broker.lease(cred.lease_id)
        assert lease is not None
        assert lease.revoke_reason == "key-retired"
        with pytest.raises(UnknownKey):
            await broker.verify(cred.token, audience="api")

    asyncio.run(scenario())


# -- storage ------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_save_dir_round_trips(tmp_path: Path, alg: str) -> None:
    ring = KeyRing.generate(alg)
    ring.rotate(grace=60, now=1000.0)
    password = None if alg == "HS256" else b"correct horse"  # HMAC keys cannot be encrypted
    ring.save_dir(tmp_path / "keys", password=password)
    loaded = KeyRing.from_dir(tmp_path / "keys", password=password)
    assert {k.kid for k in loaded} == {k.kid for k in ring}
    assert loaded.active.kid == ring.active.kid
    assert loaded._drop_at == ring._drop_at
    data = b"payload"
    assert ring.active.verify(loaded.active.sign(data), data)


def test_save_dir_files_are_private(tmp_path: Path) -> None:
    KeyRing.generate().save_dir(tmp_path / "keys")
    folder = tmp_path / "keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_save_dir_refuses_a_password_for_hmac_keys(tmp_path: Path) -> None:
    """An HMAC key is a JWK file in the clear: a password would be a false promise."""
    ring = KeyRing.generate("HS256")
    with pytest.raises(InvalidRequest, match=r"HMAC keys .* cannot be encrypted"):
        ring.save_dir(tmp_path / "keys", password=b"correct horse")
    assert not (tmp_path / "keys").exists()  # refused before anything is written


def test_save_dir_files_are_0600_whatever_was_there(tmp_path: Path) -> None:
    ring = KeyRing.generate()
    name = f"{ring.active.kid}.key.pem"
    tmp_path.chmod(0o700)
    for leftover in (name, name + ".tmp", "keyring.json.tmp"):
        (tmp_path / leftover).write_bytes(b"old")
        (tmp_path / leftover).chmod(0o644)
    old_umask = os.umask(0)
    try:
        ring.save_dir(tmp_path)
    finally:
        os.umask(old_umask)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert KeyRing.from_dir(tmp_path).active.kid == ring.active.kid


def test_save_dir_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    ring = KeyRing.generate()
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    (folder / f"{ring.active.kid}.key.pem.tmp").symlink_to(outside)
    ring.save_dir(folder)
    assert outside.read_bytes() == b"untouched"
    assert not (folder / f"{ring.active.kid}.key.pem").is_symlink()


def test_save_dir_removes_files_of_dropped_keys(tmp_path: Path) -> None:
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate()
    ring.save_dir(tmp_path)
    ring.retire(old)
    ring.save_dir(tmp_path)
    assert not any(old in p.name for p in tmp_path.iterdir())


def test_from_dir_with_a_wrong_password(tmp_path: Path) -> None:
    KeyRing.generate().save_dir(tmp_path, password=b"right password")
    with pytest.raises(InvalidRequest, match="password"):
        KeyRing.from_dir(tmp_path, password=b"wrong password")


@pytest.mark.parametrize("manifest", [None, "not json", "[]", '{"keys": []}'])
def test_from_dir_refuses_what_is_not_a_key_directory(tmp_path: Path, manifest: str | None) -> None:
    if manifest is not None:
        (tmp_path / "keyring.json").write_text(manifest)
    with pytest.raises(InvalidRequest, match=r"key directory|manifest"):
        KeyRing.from_dir(tmp_path)


def saved_ring(folder: Path) -> tuple[KeyRing, dict[str, Any]]:
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate(grace=60, now=1000.0)
    ring.save_dir(folder)
    manifest = json.loads((folder / "keyring.json").read_text())
    assert old in manifest["drop_at"]
    return ring, manifest


@pytest.mark.parametrize(
    "text",
    [
        '{"active": "k", "keys": [], "drop_at": {}, "drop_at": {}}',
        '{"active": "k", "keys": [], "drop_at": {"k": NaN}}',
        '{"active": "k", "keys": [], "drop_at": {"k": Infinity}}',
    ],
    ids=["duplicate", "nan", "infinity"],
)
def test_from_dir_parses_the_manifest_strictly(tmp_path: Path, text: str) -> None:
    saved_ring(tmp_path)
    (tmp_path / "keyring.json").write_text(text)
    with pytest.raises(InvalidRequest, match="manifest"):
        KeyRing.from_dir(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "../outside.key.pem",
        "/etc/passwd",
        "sub/key.key.pem",
        "..",
        "a.key.pem/../../x.key.pem",
        "key.pem",
        "k\\..\\x.key.pem",
        7,
    ],
)
def test_from_dir_opens_only_the_names_save_dir_writes(tmp_path: Path, name: object) -> None:
    folder = tmp_path / "keys"
    ring, manifest = saved_ring(folder)
    (tmp_path / "outside.key.pem").write_bytes(ring.active.to_pem())
    manifest["keys"].append(name)
    (folder / "keyring.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequest, match="names a key file"):
        KeyRing.from_dir(folder)


def test_from_dir_refuses_a_key_file_holding_another_key(tmp_path: Path) -> None:
    ring, _ = saved_ring(tmp_path)
    active = f"{ring.active.kid}.key.pem"
    stranger = KeyRing.generate().active
    (tmp_path / active).write_bytes(stranger.to_pem())
    with pytest.raises(InvalidRequest, match="not the key it is named for"):
        KeyRing.from_dir(tmp_path)


@pytest.mark.parametrize(
    "drop_at",
    [{"unknown-kid": 1.0}, {"OLD": 1e999}, {"OLD": "1000"}, {"OLD": True}],
    ids=["unknown-kid", "overflows-to-inf", "string", "bool"],
)
def test_from_dir_refuses_bad_drop_times(tmp_path: Path, drop_at: dict[str, object]) -> None:
    _, manifest = saved_ring(tmp_path)
    (old,) = manifest["drop_at"]
    manifest["drop_at"] = {old if k == "OLD" else k: v for k, v in drop_at.items()}
    text = json.dumps(manifest).replace("Infinity", "1e999")
    (tmp_path / "keyring.json").write_text(text)
    with pytest.raises(InvalidRequest, match="drop time"):
        KeyRing.from_dir(tmp_path)


def test_from_file_pem_and_jwk(tmp_path: Path) -> None:
    key = KeyRing.generate("ES256").active
    (tmp_path / "k.pem").write_bytes(key.to_pem(b"pw"))
    (tmp_path / "k.jwk").write_text(json.dumps(key.to_jwk(private=True)))
    assert KeyRing.from_file(tmp_path / "k.pem", password=b"pw").active.kid == key.kid
    assert KeyRing.from_file(tmp_path / "k.jwk").active.kid == key.kid


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nxx\n"])
def test_from_file_refuses_bad_content(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "k").write_bytes(content)
    with pytest.raises(InvalidRequest, match="key file"):
        KeyRing.from_file(tmp_path / "k")


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="could not read"):
        KeyRing.from_file(tmp_path / "absent.pem")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    key = KeyRing.generate().active
    monkeypatch.setenv("JB_TEST_KEY", key.to_pem().decode())
    assert KeyRing.from_env("JB_TEST_KEY").active.kid == key.kid
    monkeypatch.setenv("JB_TEST_KEY", "not a key")
    with pytest.raises(InvalidRequest, match="JB_TEST_KEY") as info:
        KeyRing.from_env("JB_TEST_KEY")
    assert "not a key" not in str(info.value)  # the value is never echoed
    monkeypatch.delenv("JB_TEST_KEY")
    with pytest.raises(InvalidRequest, match="not set"):
        KeyRing.from_env("JB_TEST_KEY")


def test_from_env_with_an_encrypted_pem(monkeypatch: pytest.MonkeyPatch) -> None:
    key = KeyRing.generate("ES256").active
    pem = key.to_pem(b"a long passphrase")
    assert b"ENCRYPTED" in pem
    monkeypatch.setenv("JB_TEST_KEY", pem.decode())
    assert KeyRing.from_env("JB_TEST_KEY", password=b"a long passphrase").active.kid == key.kid
    for password in (None, b"the wrong passphrase"):
        with pytest.raises(InvalidRequest, match="JB_TEST_KEY") as info:
            KeyRing.from_env("JB_TEST_KEY", password=password)
        assert "passphrase" not in str(info.value)  # neither the password nor the key
        assert "BEGIN" not in str(info.value)


# -- the command line -----------------------------------------------------------
def test_cli_generate_rotate_retire_show_public(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "keys"
    monkeypatch.setenv("JB_PASS", "a long passphrase")
    pw = ["--password-env", "JB_PASS"]
    assert main(["keys", "generate", str(folder), "--alg", "ES256", *pw]) == 0
    first = KeyRing.from_dir(folder, b"a long passphrase").active.kid
    assert main(["keys", "rotate", str(folder), "--grace", "60", "--publish-ahead=0", *pw]) == 0
    ring = KeyRing.from_dir(folder, b"a long passphrase")
    assert ring.active.kid != first
    assert ring.drops_at(first) is not None
    capsys.readouterr()
    assert main(["keys", "show-public", str(folder), *pw]) == 0
    jwks = json.loads(capsys.readouterr().out)
    assert {k["kid"] for k in jwks["keys"]} == {first, ring.active.kid}
    assert all("d" not in k for k in jwks["keys"])
    assert main(["keys", "retire", str(folder), *pw, "--", first]) == 0
    assert first not in KeyRing.from_dir(folder, b"a long passphrase")
    for path in folder.iterdir():
        assert b"PRIVATE KEY-----\nMI" not in path.read_bytes() or b"ENCRYPTED" in path.read_bytes()


def test_cli_retires_a_kid_that_starts_with_a_dash(tmp_path: Path) -> None:
    """A kid is base64url: one in 64 starts with '-', which argparse would take
    for an option; after `--` it is the kid."""
    folder = tmp_path / "keys"
    ring = next(
        r for r in (KeyRing.generate("EdDSA") for _ in range(20_000)) if r.active.kid[0] == "-"
    )
    dashed = ring.active
    ring.rotate(grace=3660, publish_ahead=0)
    ring.save_dir(folder)
    assert main(["keys", "retire", str(folder), "--", dashed.kid]) == 0
    assert dashed.kid not in KeyRing.from_dir(folder)


def test_cli_refuses_a_password_for_hmac_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JB_PASS", "a long passphrase")
    folder = tmp_path / "keys"
    assert (
        main(["keys", "generate", str(folder), "--alg", "HS256", "--password-env", "JB_PASS"]) == 2
    )
    assert "cannot be encrypted" in capsys.readouterr().err
    assert not folder.exists()
    assert main(["keys", "generate", str(folder), "--alg", "HS256"]) == 0
    assert main(["keys", "rotate", str(folder), "--password-env", "JB_PASS"]) == 2
    assert len(KeyRing.from_dir(folder)) == 1  # nothing was rotated on disk


def test_cli_rotate_default_grace_is_max_ttl_plus_max_leeway(tmp_path: Path) -> None:
    # Counted from when the old key stops signing: after the default publish_ahead.
    assert main(["keys", "generate", str(tmp_path / "k")]) == 0
    old = KeyRing.from_dir(tmp_path / "k").active.kid
    before = time.time()
    assert main(["keys", "rotate", str(tmp_path / "k")]) == 0
    ring = KeyRing.from_dir(tmp_path / "k")
    drops_at = ring.drops_at(old)
    assert drops_at is not None
    ahead = DEFAULT_PUBLISH_AHEAD
    assert before + ahead + 3600 + 60 <= drops_at <= time.time() + ahead + 3600 + 60
    (new,) = (key.kid for key in ring if key.kid != old)
    signs = ring.activates_at(new)
    assert signs is not None
    assert before + ahead <= signs <= time.time() + ahead
    assert ring.active.kid == old  # still signing: the new key is only published


@pytest.mark.parametrize("grace", ["nan", "inf", "-1", "soon"])
def test_cli_rotate_refuses_a_bad_grace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], grace: str
) -> None:
    assert main(["keys", "generate", str(tmp_path / "k")]) == 0
    with pytest.raises(SystemExit) as exited:
        main(["keys", "rotate", str(tmp_path / "k"), f"--grace={grace}"])
    assert exited.value.code == 2
    assert "seconds >= 0" in capsys.readouterr().err
    assert len(KeyRing.from_dir(tmp_path / "k")) == 1


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", str(tmp_path / "k")]) == 0
    assert main(["keys", "generate", str(tmp_path / "k")]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["keys", "show-public", str(tmp_path / "nothing")]) == 2
    assert main(["keys", "rotate", str(tmp_path / "k"), "--password-env", "JB_UNSET_VAR"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "JB_UNSET_VAR" in err
    assert os.environ.get("JB_UNSET_VAR") is None


# -- two-phase rotation ------------------------------------------------------------
def test_a_published_key_is_in_the_jwks_at_once_and_signs_only_at_its_time() -> None:
    ring = KeyRing.generate()
    old = ring.active.kid
    new = ring.rotate(publish_ahead=100, now=1000.0, grace=50)
    assert {k["kid"] for k in ring.jwks()["keys"]} == {old, new.kid}
    assert ring.activates_at(new.kid) == 1100.0
    assert ring.signer(1099.9).kid == old
    assert ring.drops_at(old) == 1150.0  # grace counts from when it stops signing
    assert ring.signer(1100.0).kid == new.kid
    assert ring.activates_at(new.kid) is None
    assert ring.prune(1149.0) == []
    assert ring.prune(1150.0) == [old]


def test_a_bad_publish_ahead_changes_nothing() -> None:
    ring = KeyRing.generate()
    for ahead in (-1, math.nan, math.inf, "soon"):
        with pytest.raises(InvalidRequest, match="publish_ahead"):
            ring.rotate(publish_ahead=ahead)  # type: ignore[arg-type]
    assert len(ring) == 1


def test_broker_signs_with_the_published_key_only_once_it_is_due(
    broker: Broker, jitbroker_clock: FakeClock
) -> None:
    old = broker.keys.active.kid
    new = broker.rotate_keys(publish_ahead=60)
    assert new.kid in {k["kid"] for k in broker.jwks()["keys"]}
    assert broker.issue("svc:a", "api", ttl=30).lease.key_id == old
    jitbroker_clock.advance(60)
    assert broker.issue("svc:a", "api", ttl=30).lease.key_id == new.kid


def test_pending_activation_survives_the_directory(tmp_path: Path) -> None:
    ring = KeyRing.generate()
    new = ring.rotate(publish_ahead=100, now=1000.0)
    ring.save_dir(tmp_path / "k")
    loaded = KeyRing.from_dir(tmp_path / "k")
    assert loaded.activates_at(new.kid) == 1100.0
    assert loaded.signer(1100.0).kid == new.kid


# -- following a key directory ------------------------------------------------------
def test_a_following_ring_reloads_when_the_directory_changes(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    KeyRing.generate().save_dir(folder)
    ring = KeyRing.from_dir(folder, follow=True, poll_interval=0)
    assert ring.following == str(folder)
    assert not ring.poll()  # nothing changed
    other = KeyRing.from_dir(folder)
    new = other.rotate(publish_ahead=0)
    other.save_dir(folder)
    assert ring.poll()
    assert ring.active.kid == new.kid
    assert not ring.poll()


def test_a_following_ring_looks_at_most_every_poll_interval(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    KeyRing.generate().save_dir(folder)
    ring = KeyRing.from_dir(folder, follow=True, poll_interval=3600)
    other = KeyRing.from_dir(folder)
    other.rotate()
    other.save_dir(folder)
    assert not ring.poll()  # not yet time to look
    assert ring.poll(force=True)


def test_a_following_ring_keeps_its_keys_when_the_manifest_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "k"
    KeyRing.generate().save_dir(folder)
    ring = KeyRing.from_dir(folder, follow=True, poll_interval=0)
    kid = ring.active.kid
    manifest = folder / "keyring.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])  # a half-written manifest, in place
    for _ in range(3):
        assert not ring.poll()
    assert ring.active.kid == kid
    assert sum("not reloaded" in r.getMessage() for r in caplog.records) == 1  # logged once
    manifest.write_text(text)
    os.utime(manifest, ns=(1, 1))  # another version than the broken one
    assert ring.poll()
    assert ring.active.kid == kid


def test_a_broker_on_a_following_ring_signs_with_the_directory_key(
    tmp_path: Path, jitbroker_clock: FakeClock
) -> None:
    folder = tmp_path / "k"
    KeyRing.generate().save_dir(folder)
    broker = Broker(
        issuer=TEST_ISSUER,
        keys=KeyRing.from_dir(folder, follow=True, poll_interval=0),
        clock=jitbroker_clock,
    )
    old_cred = broker.issue("svc:a", "api", ttl=30)
    other = KeyRing.from_dir(folder)
    new = other.rotate(publish_ahead=10, now=jitbroker_clock())
    other.save_dir(folder)
    assert new.kid in {k["kid"] for k in broker.jwks()["keys"]}  # published at once
    assert broker.issue("svc:a", "api", ttl=30).lease.key_id == old_cred.lease.key_id
    jitbroker_clock.advance(10)
    assert broker.issue("svc:a", "api", ttl=30).lease.key_id == new.kid
    other.promote(jitbroker_clock())
    other.retire(str(old_cred.lease.key_id))
    other.save_dir(folder)
    broker.sweep()  # the reaper's tick polls the directory too
    with pytest.raises(UnknownKey):
        broker.verify(old_cred.token, audience="api")


# -- retirement through the store ---------------------------------------------------
def _pair(store: Any, clock: FakeClock) -> tuple[Broker, Broker]:
    """Two brokers on one store, each with its own ring holding the same key."""
    ring = KeyRing.generate()
    first = Broker(issuer=TEST_ISSUER, keys=ring, store=store, clock=clock)
    twin = KeyRing([*ring], active=ring.active.kid)
    return first, Broker(issuer=TEST_ISSUER, keys=twin, store=store, clock=clock)


@pytest.mark.parametrize("revoke", [False, True])
def test_a_key_retired_by_one_broker_is_retired_by_every_broker_sharing_the_store(
    tmp_path: Path, jitbroker_clock: FakeClock, revoke: bool
) -> None:
    store = SQLiteStore(tmp_path / "leases.db")
    one, two = _pair(store, jitbroker_clock)
    old = one.issue("svc:a", "api", ttl=60)
    new = one.rotate_keys()
    two.keys.add(new, activate=True)
    assert two.verify(old.token, audience="api")
    assert one.retire_key(str(old.lease.key_id), revoke=revoke) == (1 if revoke else 0)
    assert store.retired_keys().keys() == {old.lease.key_id}
    two.sweep()  # its reaper's tick reads the retired keys
    assert old.lease.key_id not in two.keys
    with pytest.raises(UnknownKey):
        two.verify(old.token, audience="api")
    assert two.issue("svc:a", "api", ttl=30).lease.key_id == new.kid
    # A retry, or the same retirement from the other broker, is accepted.
    assert two.retire_key(str(old.lease.key_id), revoke=False) == 0
    with pytest.raises(InvalidRequest, match="no key"):
        two.retire_key("never-a-key", revoke=False)


def test_a_ring_never_takes_back_a_key_retired_through_the_store(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate()
    ring.save_dir(folder)
    follower = KeyRing.from_dir(folder, follow=True, poll_interval=0)
    assert follower.exclude([old]) == [old]
    os.utime(folder / "keyring.json", ns=(1, 1))  # the same manifest, seen anew
    assert follower.poll()
    assert old not in follower


def test_retiring_the_active_key_elsewhere_stops_this_ring_signing() -> None:
    ring = KeyRing.generate()
    kid = ring.active.kid
    assert ring.exclude([kid]) == [kid]
    with pytest.raises(InvalidRequest, match="cannot sign"):
        ring.signer(0.0)


def test_cli_retire_with_a_store_records_it_and_revokes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], jitbroker_clock: FakeClock
) -> None:
    folder, db = tmp_path / "k", tmp_path / "leases.db"
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate()
    ring.save_dir(folder)
    store = SQLiteStore(db)
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.from_dir(folder), store=store)
    ring2 = broker.keys
    ring2.activate(old)
    cred = broker.issue("svc:a", "api", ttl=60)
    ring2.activate(next(k.kid for k in ring2 if k.kid != old))
    capsys.readouterr()
    assert main(["keys", "retire", str(folder), "--revoke", "--", old]) == 2
    assert "--revoke needs --store" in capsys.readouterr().err
    assert (
        main(["keys", "retire", str(folder), "--store", f"sqlite:{db}", "--revoke", "--", old]) == 0
    )
    out = capsys.readouterr().out
    assert "every broker sharing it" in out
    assert "revoked 1 leases" in out
    assert old not in KeyRing.from_dir(folder)
    assert old in store.retired_keys()
    assert broker.lease(cred).revoked_at is not None
    broker.sweep()
    assert old not in broker.keys


def test_cli_retire_without_a_store_says_who_sees_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "k"
    ring = KeyRing.generate()
    old = ring.active.kid
    ring.rotate()
    ring.save_dir(folder)
    assert main(["keys", "retire", str(folder), "--", old]) == 0
    out = capsys.readouterr().out
    assert "following that directory" in out
    assert "no longer verify" not in out
