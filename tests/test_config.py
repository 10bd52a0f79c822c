"""``jitbroker.toml`` (``jitbroker.config``): what loads, what is refused and how."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jitbroker import KeyRing
from jitbroker.config import Config, load_config, parse_duration
from jitbroker.errors import InvalidRequest, JitBrokerError
from jitbroker.stores import SQLiteStore

BASE = """
[broker]
issuer = "urn:test:config"
keys = "keys"
store = "leases.db"
"""


def write(folder: Path, text: str, name: str = "jitbroker.toml", mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    KeyRing.generate("EdDSA").save_dir(tmp_path / "keys")
    return tmp_path


def test_a_full_config_loads_with_paths_resolved_against_its_directory(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(home, '[[rule]]\nsubjects = ["svc:*"]\naudiences = ["db"]\n', "policy.toml")
    path = write(
        home,
        BASE
        + """policy = "policy.toml"
default_ttl = "5m"
max_ttl = "1h30m"
leeway = 2
audit_log = "audit.jsonl"
labels = { env = "prod" }

[serve]
port = 8471

[[trust]]
issuer = "https://token.actions.githubusercontent.com"
""",
    )
    monkeypatch.chdir("/")  # relative paths must not depend on the working directory
    config = load_config(os.path.relpath(path, "/"))
    assert config.keys == home / "keys"
    assert config.store == str(home / "leases.db")
    assert config.policy == home / "policy.toml"
    assert config.audit_log == home / "audit.jsonl"
    assert (config.default_ttl, config.max_ttl, config.leeway) == (300, 5400, 2)
    assert dict(config.labels) == {"env": "prod"}
    assert config.sections["serve"] == {"port": 8471}
    assert config.sections["trust"][0]["issuer"].startswith("https://")
    broker = config.open_broker()
    try:
        cred = broker.issue("svc:a", "db", ttl=60)
        assert broker.verify(cred.token, audience="db").subject == "svc:a"
        assert isinstance(broker.store, SQLiteStore)
    finally:
        broker.close()
    assert (home / "audit.jsonl").read_text().count("\n") >= 1


def test_the_broker_of_a_config_follows_its_key_directory(home: Path) -> None:
    """`jitbroker keys rotate` on the directory reaches a running broker (serve)."""
    broker = load_config(write(home, BASE)).open_broker()
    try:
        before = broker.issue("svc:a", "db", ttl=60).lease.key_id
        ring = KeyRing.from_dir(home / "keys")
        new = ring.rotate(grace=3660, publish_ahead=0)
        ring.save_dir(home / "keys")
        broker.keys.poll(force=True)  # what the next look, within a second, does
        cred = broker.issue("svc:a", "db", ttl=60)
        assert cred.lease.key_id == new.kid != before
        assert broker.verify(cred.token, audience="db").subject == "svc:a"
    finally:
        broker.close()


def test_the_default_path_is_jitbroker_config(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(home, BASE)
    monkeypatch.setenv("JITBROKER_CONFIG", str(path))
    assert load_config().issuer == "urn:test:config"
    monkeypatch.delenv("JITBROKER_CONFIG")
    with pytest.raises(InvalidRequest, match="JITBROKER_CONFIG"):
        load_config()


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("leases.db", "{home}/leases.db"),
        ("sqlite:leases.db", "sqlite:{home}/leases.db"),
        ("sqlite:///leases.db", "sqlite:///{home}/leases.db"),
        ("sqlite:////var/lib/jb.db", "sqlite:////var/lib/jb.db"),
        ("/var/lib/jb.db", "/var/lib/jb.db"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("postgresql://u:pw@db/jb", "postgresql://u:pw@db/jb"),
    ],
)
def test_store_paths_resolve_and_urls_pass_through(home: Path, store: str, expected: str) -> None:
    path = write(home, BASE.replace('"leases.db"', f'"{store}"'))
    assert load_config(path).store == expected.format(home=home).replace("///" + "/", "////")


def test_a_store_url_with_a_password_stays_out_of_repr(home: Path) -> None:
    path = write(home, BASE.replace('"leases.db"', '"postgresql://u:hunter2@db/jb"'))
    config = load_config(path)
    assert "hunter2" not in repr(config)
    assert isinstance(config, Config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is = not [toml", "not valid TOML"),
        ("\xff\xfe", "not valid TOML"),
        (BASE + "[brokr]\nx = 1\n", "unknown table.*brokr"),
        (BASE + "colour = 'red'\n", r"unknown key\(s\) in \[broker\]: colour"),
        (BASE + "default_ttl = 'soon'\n", r"\[broker\] default_ttl"),
        (BASE + "max_ttl = -5\n", r"\[broker\] max_ttl"),
        (BASE + "max_ttl = true\n", r"\[broker\] max_ttl"),
        (BASE + "labels = 'env=prod'\n", r"\[broker\] labels must be a table"),
        (BASE + "labels = { env = 1 }\n", r"labels must map names to strings"),
        (BASE + "token_format = 'jwe'\n", "token_format"),
        (BASE.replace('issuer = "urn:test:config"', "issuer = 42"), r"\[broker\] issuer must be"),
        (BASE.replace('keys = "keys"', "keys = ['a']"), r"\[broker\] keys must be a string"),
        (BASE.replace('store = "leases.db"', ""), r"\[broker\] needs 'store'"),
        ("[serve]\nport = 1\n", r"needs a \[broker\] table"),
        ("broker = 3\n", r"needs a \[broker\] table"),
    ],
)
def test_hostile_or_mistaken_files_are_refused_naming_the_problem(
    home: Path, text: str, message: str
) -> None:
    path = home / "jitbroker.toml"
    path.write_bytes(text.encode("latin-1"))
    path.chmod(0o600)
    with pytest.raises(InvalidRequest, match=message):
        load_config(path)


def test_a_key_file_where_a_directory_is_expected_is_refused(home: Path) -> None:
    key_file = home / "keys" / "one.pem"
    key_file.write_text("not a directory")
    key_file.chmod(0o600)
    path = write(home, BASE.replace('"keys"', '"keys/one.pem"'))
    with pytest.raises(JitBrokerError, match=r"one\.pem"):
        load_config(path).open_broker()


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_config_others_can_write_is_refused(home: Path, mode: int) -> None:
    path = write(home, BASE, mode=mode)
    with pytest.raises(InvalidRequest, match="chmod go-w"):
        load_config(path)


def test_a_policy_file_others_can_write_is_refused(home: Path) -> None:
    write(home, '[[rule]]\nsubjects = ["*"]\naudiences = ["*"]\n', "policy.toml", mode=0o666)
    path = write(home, BASE + 'policy = "policy.toml"\n')
    with pytest.raises(InvalidRequest, match="policy file is writable"):
        load_config(path).open_broker()


def test_not_a_regular_file_and_a_missing_file(home: Path) -> None:
    with pytest.raises(InvalidRequest, match="regular file"):
        load_config(home)
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_config(home / "missing.toml")
    big = write(home, "#" * (2 << 20))
    with pytest.raises(InvalidRequest, match="larger than"):
        load_config(big)


def test_a_missing_store_is_an_error_when_it_must_exist(home: Path) -> None:
    config = load_config(write(home, BASE))
    with pytest.raises(InvalidRequest, match="no SQLite store"):
        config.open_broker(create_store=False)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(600, 600), ("600", 600), ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("1.5s", 1.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "1x", "0", "-1", "1h1h", "nan", True, None, 0])
def test_bad_durations(value: object) -> None:
    with pytest.raises(InvalidRequest, match="ttl"):
        parse_duration(value, "ttl")
