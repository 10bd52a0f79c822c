"""``jitbroker exec -- CMD``: the child sees its credential, a long child sees it
renewed, signals reach it, and the lease dies when it exits, whatever the path."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from jitbroker.stores import LeaseFilter, SQLiteStore
from test_cli_shell import AUD, Home, Remote, one_line
from test_cli_shell import remote as remote  # the fixture, used here too

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# The child: a Python script, so the tests do not depend on a shell's quirks.
REPORT = """
import json, os, stat, sys
path = os.environ["JITBROKER_TOKEN_FILE"]
info = {k: v for k, v in os.environ.items() if k.startswith("JITBROKER_")}
info["file_mode"] = stat.S_IMODE(os.stat(path).st_mode)
info["dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
info["file_token"] = open(path).read()
json.dump(info, open(sys.argv[1], "w"))
sys.exit(int(sys.argv[2]))
"""

POLL = """
import json, os, sys, time
path = os.environ["JITBROKER_TOKEN_FILE"]
first = open(path).read()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    now = open(path).read()
    if now != first:
        break
    time.sleep(0.05)
json.dump({"first": first, "later": now}, open(sys.argv[1], "w"))
"""

TRAP = """
import os, signal, sys, time
out = sys.argv[1]
def stop(signum, frame):
    open(out, "a").write(f"got {signum}\\n")
    sys.exit(int(sys.argv[2]))
if sys.argv[2] != "die":
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
open(out + ".ready", "w").write(os.environ["JITBROKER_LEASE_ID"])
time.sleep(60)
"""


def leases(home: Home) -> list[Any]:
    store = SQLiteStore(home.db)
    try:
        return list(store.find(LeaseFilter()))
    finally:
        store.close()


def exec_args(home: Home, *extra: str) -> list[str]:
    return [
        "exec", "--config", str(home.config), "--subject", "svc:job", "--audience", AUD,
        "--scope", "orders:read", *extra, "--",
    ]  # fmt: skip


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


def test_the_child_sees_env_and_a_private_token_file_and_its_status_is_ours(
    home: Home, tmp_path: Path
) -> None:
    out = tmp_path / "child.json"
    done = home.run(*exec_args(home), sys.executable, "-c", REPORT, str(out), "7")
    assert done.returncode == 7, done.stderr
    info = json.loads(out.read_text())
    assert info["file_mode"] == 0o600
    assert info["dir_mode"] == 0o700
    assert info["file_token"] == info["JITBROKER_TOKEN"]
    assert info["JITBROKER_TOKEN"].count(".") == 2
    lease = home.lease(info["JITBROKER_LEASE_ID"])
    assert int(info["JITBROKER_EXPIRES_AT"]) == int(lease.expires_at)
    # The default TTL is short: a SIGKILLed jitbroker leaves at most that window.
    assert lease.expires_at - lease.issued_at == pytest.approx(300, abs=1)
    # After exit: revoked, the token file and its directory gone.
    assert lease.revoked_at is not None
    assert lease.revoke_reason == "exec-failed"
    assert not Path(info["JITBROKER_TOKEN_FILE"]).parent.exists()
    assert info["JITBROKER_TOKEN"] not in done.stderr + done.stdout


def test_a_zero_exit_is_ours_and_the_lease_ends(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "child.json"
    done = home.run(
        *exec_args(home, "--token-file-dir", str(tmp_path)),
        sys.executable, "-c", REPORT, str(out), "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(out.read_text())
    assert Path(info["JITBROKER_TOKEN_FILE"]).parent.parent == tmp_path
    assert home.lease(info["JITBROKER_LEASE_ID"]).revoke_reason == "exec-ended"


def test_a_long_child_sees_the_token_file_replaced_after_renewal(
    home: Home, tmp_path: Path
) -> None:
    out = tmp_path / "poll.json"
    argv = exec_args(home, "--ttl", "3", "--renew-every", "0.5")
    done = home.run(*argv, sys.executable, "-c", POLL, str(out))
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["later"] != seen["first"]
    assert seen["later"].count(".") == 2
    # The new token is a live one of the same lease, which outlived its first expiry.
    cfg = ("--config", str(home.config))
    first = json.loads(home.run("inspect", "--json", "-", input=seen["first"]).stdout)["claims"]
    later = json.loads(home.run("inspect", "--json", "-", input=seen["later"]).stdout)["claims"]
    assert later["jti"] == first["jti"]
    assert later["exp"] >= first["exp"]
    assert home.lease(first["jti"]).revoked_at is not None
    dead = home.run("verify", "-", *cfg, "--audience", AUD, input=seen["later"])
    assert dead.returncode == 1
    assert "TokenRevoked" in dead.stdout


def _start(home: Home, tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path, str]:
    out = tmp_path / "trap.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITBROKER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jitbroker.cli", *exec_args(home), sys.executable, "-c", TRAP,
         str(out), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    ready = Path(str(out) + ".ready")
    deadline = time.monotonic() + 30
    while not ready.exists() or not ready.read_text():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.02)
    return proc, out, ready.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_forwarded_waited_for_and_then_the_lease_revoked(
    home: Home, tmp_path: Path, signum: signal.Signals
) -> None:
    proc, out, lease_id = _start(home, tmp_path, "3")
    assert home.lease(lease_id).revoked_at is None
    proc.send_signal(signum)
    _stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3, stderr  # the child's own exit status
    assert out.read_text() == f"got {int(signum)}\n"  # delivered once
    lease = home.lease(lease_id)
    assert lease.revoked_at is not None
    assert lease.revoke_reason == "exec-terminated"


def test_a_child_killed_by_a_signal_gives_128_plus_n(home: Home, tmp_path: Path) -> None:
    proc, _, lease_id = _start(home, tmp_path, "die")
    proc.send_signal(signal.SIGHUP)  # forwarded; the child does not trap SIGHUP
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + int(signal.SIGHUP)
    assert home.lease(lease_id).revoked_at is not None
    killed = home.run(*exec_args(home), sys.executable, "-c", "import os; os.kill(os.getpid(), 9)")
    assert killed.returncode == 137, killed.stderr


def test_command_not_found_is_127_and_not_executable_is_126_lease_revoked(
    home: Home, tmp_path: Path
) -> None:
    missing = home.run(*exec_args(home), "no-such-command-jitbroker")
    assert missing.returncode == 127
    assert "no-such-command-jitbroker: command not found" in one_line(missing.stderr)
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)  # not executable
    denied = home.run(*exec_args(home), str(script))
    assert denied.returncode == 126
    assert "cannot execute" in one_line(denied.stderr)
    found = leases(home)
    assert len(found) == 2
    assert all(lease.revoked_at is not None for lease in found)


def test_exec_needs_the_double_dash_and_a_command(home: Home) -> None:
    argv = exec_args(home)[:-1]
    no_dash = home.run(*argv, "true")
    assert no_dash.returncode == 2
    assert "`--`" in one_line(no_dash.stderr)
    nothing = home.run(*argv, "--")
    assert nothing.returncode == 2
    assert "needs a command" in one_line(nothing.stderr)
    assert leases(home) == [] or all(lease.revoked_at for lease in leases(home))


def test_a_renew_interval_not_shorter_than_the_ttl_is_refused_and_revoked(home: Home) -> None:
    done = home.run(*exec_args(home, "--ttl", "2", "--renew-every", "5"), "true")
    assert done.returncode == 2
    assert "--renew-every" in one_line(done.stderr)
    assert all(lease.revoked_at is not None for lease in leases(home))


def test_exec_help_works_without_the_double_dash(home: Home) -> None:
    done = home.run("exec", "--help")
    assert done.returncode == 0
    assert "--renew-every" in done.stdout
    assert "--token-file-dir" in done.stdout


def test_remote_exec_renews_and_revokes_at_the_service(
    remote: Remote, home: Home, tmp_path: Path
) -> None:
    from oidc_issuer import AUDIENCE

    identity = tmp_path / "identity.jwt"
    identity.write_text(remote.issuer.mint(aud=AUDIENCE))
    out = tmp_path / "poll.json"
    argv = [
        "exec", "--broker", remote.base, "--identity-token-file", str(identity),
        "--audience", AUD, "--ttl", "3", "--renew-every", "0.5", "--",
    ]  # fmt: skip
    done = home.run(*argv, sys.executable, "-c", POLL, str(out))
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["later"] != seen["first"]
    claims = json.loads(home.run("inspect", "--json", "-", input=seen["later"]).stdout)["claims"]
    lease = remote.lease(claims["jti"])
    assert lease.subject == "svc:ci:acme/app"
    assert lease.revoked_at is not None


def test_the_startup_benchmark_runs() -> None:
    """Not a timing test: the script must run; its figures are read by people."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "exec_startup.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "exec start-up:" in done.stdout


def test_a_signal_to_the_whole_group_still_gives_the_childs_status(
    home: Home, tmp_path: Path
) -> None:
    """A supervisor stopping the job's process group (jitbroker and CMD alike):
    CMD may see the signal twice (from the group and forwarded, see docs/cli.md),
    and jitbroker still exits with CMD's status once the lease is revoked."""
    ready = tmp_path / "ready"
    script = (
        f'trap "exit 5" TERM; echo "$JITBROKER_LEASE_ID" > {ready}; while :; do sleep 0.05; done'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITBROKER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jitbroker.cli", *exec_args(home), "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists() or not ready.read_text().strip():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 5, stderr
    assert home.lease(ready.read_text().strip()).revoked_at is not None
