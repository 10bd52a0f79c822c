"""The CLI as a newcomer meets it (issue 13, "CLI polish"): help that says what
and shows how, store URL mistakes named, ``report`` with a JWKS or an encrypted
key directory, ``policy check --json``, and ``| head`` that is no error."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jitbroker import Broker, KeyRing
from jitbroker.cli import build_parser, main
from jitbroker.errors import InvalidRequest
from jitbroker.stores import SQLiteStore, open_store

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "docs" / "examples" / "policy.toml"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                path = f"{prefix} {name}".strip()
                yield path, child
                yield from _commands(child, path)


ALL = dict(_commands(build_parser()))
LEAVES = sorted(
    name
    for name, p in ALL.items()
    if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
)


def _param(name: str) -> Any:
    return pytest.param(name, id=name)


@pytest.mark.parametrize("command", [_param(n) for n in LEAVES])
def test_every_option_has_help_with_an_example(command: str) -> None:
    parser = ALL[command]
    for action in parser._actions:
        if action.dest == "help" or isinstance(action, argparse._VersionAction):
            continue
        what = f"{command} {action.option_strings or action.dest}"
        assert action.help, f"{what} has no help"
        assert "e.g." in action.help, f"{what}: no example in {action.help!r}"


@pytest.mark.parametrize("command", [_param(n) for n in sorted(ALL)])
def test_every_command_shows_an_example(command: str) -> None:
    text = ALL[command].format_help()
    assert "e.g." in text.replace("\n", " ").lower() or "Example:" in text, command


def test_the_top_help_names_no_internal_module() -> None:
    texts = [build_parser().format_help(), *(p.format_help() for p in ALL.values())]
    for text in texts:
        assert "jitbroker." not in text.replace("jitbroker.toml", "").replace(
            "jitbroker.internal", ""
        ).replace("jitbroker.acme", ""), text
        assert "cli_" not in text
        assert ".py" not in text
    done = subprocess.run(
        [sys.executable, "-m", "jitbroker", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "jitbroker.cli" not in done.stdout
    assert "__main__" not in done.stdout


def run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitbroker", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


# -- store URLs --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("redis://127.0.0.1:6379/0?prefx=jitbroker", "prefx"),
        ("rediss://127.0.0.1:6379/0?socket_timout=2", "socket_timout"),
        ("postgresql://postgres@127.0.0.1:5432/test?schem=jitbroker", "schem"),
        ("postgresql://postgres@127.0.0.1:5432/test?timeuot=2", "timeuot"),
    ],
)
def test_a_typo_in_a_store_urls_query_is_exit_2_naming_it(url: str, name: str) -> None:
    done = run("leases", "--store", url)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "TypeError" not in done.stderr
    line = done.stderr.strip()
    assert "\n" not in line
    assert repr(name) in line
    with pytest.raises(InvalidRequest, match=name):
        open_store(url)


def test_known_driver_parameters_still_pass() -> None:
    open_store("redis://127.0.0.1:6379/0?socket_timeout=2&prefix=jb-polish").close()
    open_store(
        "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable&connect_timeout=3"
        "&schema=jb_polish&timeout=2"
    ).close()


def test_a_sqlite_url_error_explains_and_shows_the_resolved_path(tmp_path: Path) -> None:
    two = subprocess.run(
        [sys.executable, "-m", "jitbroker", "leases", "--store", "sqlite://leases.db"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert two.returncode == 2
    assert "sqlite:///relative" in two.stderr
    assert "sqlite:////absolute" in two.stderr
    assert str(tmp_path / "leases.db") in two.stderr
    for url in ("sqlite:///typo.db", "sqlite:typo.db", "typo.db"):
        done = subprocess.run(
            [sys.executable, "-m", "jitbroker", "report", "--store", url],
            capture_output=True, text=True, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert done.returncode == 2
        assert str(tmp_path / "typo.db") in done.stderr, done.stderr
        assert "relative to the current directory" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created
    secret = run("leases", "--store", "user:S3cret@db/x")
    assert secret.returncode == 2
    assert "S3cret" not in secret.stderr


# -- report --keys --password-env, report --jwks -------------------------------------
@pytest.fixture
def retired(tmp_path: Path) -> tuple[Path, KeyRing, str]:
    """A store with one lease of a key the ring no longer holds, and that ring."""
    old = KeyRing.generate()
    db = tmp_path / "leases.db"
    store = SQLiteStore(db)
    broker = Broker(keys=old, store=store)
    broker.issue("svc:a", "api", ["read"], ttl=600, owner="alice")
    store.close()
    return db, KeyRing.generate(), old.active.kid


def _retired_count(stdout: str) -> int:
    return len(json.loads(stdout)["retired_key"])


def test_report_keys_takes_password_env(tmp_path: Path, retired: tuple[Path, KeyRing, str]) -> None:
    db, ring, _ = retired
    ring.save_dir(tmp_path / "keys", "correct horse")  # a str password: UTF-8
    env = {"JB_PW": "correct horse"}
    done = run("report", "--store", str(db), "--keys", str(tmp_path / "keys"),
               "--password-env", "JB_PW", "--json", **env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _retired_count(done.stdout) == 1
    missing = run("report", "--store", str(db), "--keys", str(tmp_path / "keys"))
    assert missing.returncode == 2
    assert "password" in missing.stderr
    assert "correct horse" not in missing.stderr
    unset = run("report", "--store", str(db), "--keys", str(tmp_path / "keys"),
                "--password-env", "JB_UNSET")  # fmt: skip
    assert unset.returncode == 2
    assert "JB_UNSET" in unset.stderr


def test_report_takes_a_jwks_file_or_url(
    tmp_path: Path, retired: tuple[Path, KeyRing, str]
) -> None:
    db, ring, _ = retired
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(ring.jwks()))
    done = run("report", "--store", str(db), "--jwks", str(jwks), "--json")
    assert done.returncode == 0, done.stderr
    assert _retired_count(done.stdout) == 1
    body = json.dumps(ring.jwks()).encode()

    class JWKS(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        remote = run("report", "--store", str(db), "--jwks", url, "--json")
        assert remote.returncode == 0, remote.stderr
        assert _retired_count(remote.stdout) == 1
    finally:
        server.shutdown()
        server.server_close()
    plain = run("report", "--store", str(db), "--jwks", "http://example.com/jwks.json")
    assert plain.returncode == 2
    assert "https" in plain.stderr
    both = run("report", "--store", str(db), "--jwks", str(jwks), "--keys", str(tmp_path))
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


# -- policy check --json -------------------------------------------------------------
def test_policy_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(POLICY), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(POLICY), "valid": True, "rules": 2}
    args = ["--subject", "svc:ci-deploy", "--audience", "db:orders", "--scopes", "orders:write"]
    assert main(["policy", "check", str(POLICY), "--json", *args]) == 1
    denied = json.loads(capsys.readouterr().out)
    assert denied["allowed"] is False
    assert denied["granted_by"] is None
    assert denied["matched"] == ["ci deploys"]
    assert "ci deploys requires an owner" in denied["reasons"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rules]]\nsubjects = 3\n")
    assert main(["policy", "check", str(bad), "--json"]) == 2
    broken = json.loads(capsys.readouterr().out)
    assert broken["valid"] is False
    assert "rule 1" in broken["error"]


# -- | head ---------------------------------------------------------------------------
@pytest.fixture
def busy(tmp_path: Path) -> Path:
    db = tmp_path / "leases.db"
    store = SQLiteStore(db)
    broker = Broker(keys=KeyRing.generate(), store=store)
    for i in range(400):  # more than a pipe buffer of output
        broker.issue(f"svc:w{i}", "api", ["read"], ttl=600, owner=f"owner{i}@example.com")
    store.close()
    return db


@pytest.mark.parametrize(
    "argv",
    [
        ["leases", "--store", "{db}"],
        ["leases", "--store", "{db}", "--json"],
        ["report", "--store", "{db}", "--oldest", "400"],
        ["report", "--store", "{db}", "--json"],
        ["report", "--store", "{db}", "--html", "-"],
        ["outbox", "list", "--store", "{db}", "--all"],
        ["policy", "check", str(POLICY)],
        ["--help"],
    ],
    ids=lambda argv: " ".join(a for a in argv if not a.startswith("{") and "/" not in a),
)
def test_a_closed_pipe_is_not_an_error(busy: Path, argv: list[str]) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash for `set -o pipefail`")
    words = " ".join(f"'{a.format(db=busy)}'" for a in argv)
    line = f'set -o pipefail; "{sys.executable}" -m jitbroker {words} | head -1'
    done = subprocess.run([bash, "-c", line], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count("\n") == 1


# -- password= takes a str (UTF-8) as well as bytes ------------------------------------
def test_a_key_password_may_be_str_encoded_utf8(tmp_path: Path) -> None:
    ring = KeyRing.generate("ES256")
    ring.save_dir(tmp_path / "keys", "pässwörd")
    assert KeyRing.from_dir(tmp_path / "keys", "pässwörd".encode()).active.kid == ring.active.kid
    assert KeyRing.from_dir(tmp_path / "keys", "pässwörd").active.kid == ring.active.kid
    pem = ring.active.to_pem("pässwörd")
    assert KeyRing.from_pem(pem, "pässwörd".encode()).active.kid == ring.active.kid
    with pytest.raises(InvalidRequest, match="bytes or str"):
        KeyRing.from_pem(pem, 1234)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="password"):
        KeyRing.from_dir(tmp_path / "keys", "wrong")
