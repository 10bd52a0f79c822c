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
from collections.abc import Iterator, Sequence
from contextlib import suppress
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


# --- Every catchable signal that would kill jitbroker ends in a revoke -------------

# The child records each signal it traps, then exits with status argv[2]. Its
# ready file (JSON) names its lease, its token file and whether it inherited
# SIGHUP ignored. It also exits once jitbroker is gone (a failed test leaves no
# orphan holding the test's pipes).
RECORD = """
import json, os, signal, sys, time
out, code, trapped = sys.argv[1], sys.argv[2], sys.argv[3:]
def record(signum, frame):
    open(out, "a").write(f"got {signum}\\n")
    sys.exit(int(code))
for signum in trapped:
    signal.signal(int(signum), record)
ready = {
    "lease": os.environ["JITBROKER_LEASE_ID"],
    "file": os.environ["JITBROKER_TOKEN_FILE"],
    "hup_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
}
json.dump(ready, open(out + ".tmp", "w"))
os.replace(out + ".tmp", out + ".ready")
parent, deadline = os.getppid(), time.monotonic() + 60
while os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.05)
"""

# jitbroker started with some signals ignored, as `nohup` or a shell's background job does.
IGNORING = """
import os, signal, sys
for signum in sys.argv[1].split(","):
    signal.signal(int(signum), signal.SIG_IGN)
os.execv(sys.executable, [sys.executable, "-m", "jitbroker.cli", *sys.argv[2:]])
"""

# jitbroker as a session leader whose controlling terminal is argv[1], as on a
# terminal `ssh -t host jitbroker exec ...` gives it.
ON_A_TERMINAL = """
import fcntl, os, sys, termios
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
os.dup2(fd, 0)
os.close(fd)
os.execv(sys.executable, [sys.executable, "-m", "jitbroker.cli", *sys.argv[2:]])
"""

RT = signal.SIGRTMIN + 3
# What the child traps: anything jitbroker might forward, and what it might
# wrongly pass on as itself (SIGALRM, a realtime signal).
TRAPPED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM, RT,
)  # fmt: skip


class Job:
    """``jitbroker exec -- RECORD`` running, its child ready."""

    def __init__(
        self, home: Home, tmp_path: Path, code: str, trapped: Sequence[int], prefix: Sequence[str]
    ) -> None:
        self.out = tmp_path / "signals.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JITBROKER_")}
        child = [sys.executable, "-c", RECORD, str(self.out), code, *map(str, map(int, trapped))]
        self.proc = subprocess.Popen(
            [*prefix, *exec_args(home), *child],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        ready = Path(str(self.out) + ".ready")
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.02)
        self.ready: dict[str, Any] = json.loads(ready.read_text())
        self.home = home

    def finish(self) -> tuple[int, Any]:
        """jitbroker's exit status and the lease, once it exited."""
        _stdout, stderr = self.proc.communicate(timeout=30)
        assert "Traceback" not in stderr, stderr
        # Cleaned up: the token file's private directory is gone.
        assert not Path(self.ready["file"]).parent.exists()
        return self.proc.returncode, self.home.lease(self.ready["lease"])

    def received(self) -> list[int]:
        text = self.out.read_text() if self.out.exists() else ""
        return [int(line.split()[1]) for line in text.splitlines()]


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    """Where tests put their jobs: one still running at teardown is stopped."""
    started: list[Job] = []
    yield started
    for job in started:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.communicate()


def _exec_job(
    jobs: list[Job], home: Home, tmp_path: Path, code: str = "3",
    trapped: Sequence[int] = TRAPPED, *,
    prefix: Sequence[str] = (sys.executable, "-m", "jitbroker.cli"),
) -> Job:  # fmt: skip
    job = Job(home, tmp_path, code, trapped, prefix)
    jobs.append(job)
    return job


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        (signal.SIGQUIT, signal.SIGQUIT),  # Ctrl-\ by kill: passed on as itself
        (signal.SIGALRM, signal.SIGTERM),  # the rest mean "stop": CMD gets SIGTERM
        (signal.SIGPROF, signal.SIGTERM),
        (signal.SIGVTALRM, signal.SIGTERM),
        (signal.SIGXCPU, signal.SIGTERM),
        (signal.SIGABRT, signal.SIGTERM),
        (RT, signal.SIGTERM),
        (signal.SIGRTMAX, signal.SIGTERM),
    ],
    ids=["QUIT", "ALRM", "PROF", "VTALRM", "XCPU", "ABRT", "RTMIN+3", "RTMAX"],
)
def test_a_signal_that_would_kill_jitbroker_reaches_the_child_and_the_lease_is_revoked(
    home: Home, tmp_path: Path, jobs: list[Job], sent: int, forwarded: int
) -> None:
    job = _exec_job(jobs, home, tmp_path)
    assert home.lease(job.ready["lease"]).revoked_at is None
    os.kill(job.proc.pid, sent)
    status, lease = job.finish()
    assert job.received() == [forwarded]  # once, and as documented
    assert status == 3  # the child's own status
    assert lease.revoked_at is not None
    assert lease.revoke_reason == "exec-terminated"


@pytest.mark.parametrize("sent", [signal.SIGUSR1, signal.SIGUSR2], ids=["USR1", "USR2"])
def test_sigusr_is_passed_on_without_asking_to_stop_the_reason_is_the_childs(
    home: Home, tmp_path: Path, jobs: list[Job], sent: int
) -> None:
    job = _exec_job(jobs, home, tmp_path, "0")  # the child takes it as "finish now, fine"
    os.kill(job.proc.pid, sent)
    status, lease = job.finish()
    assert job.received() == [sent]
    assert status == 0
    assert lease.revoke_reason == "exec-ended"


@pytest.mark.parametrize(
    ("sent", "killed_by"),
    [(signal.SIGALRM, signal.SIGTERM), (RT, signal.SIGTERM), (signal.SIGUSR1, signal.SIGUSR1)],
    ids=["ALRM", "RTMIN+3", "USR1"],
)
def test_a_child_that_does_not_trap_it_dies_and_the_status_is_128_plus_n(
    home: Home, tmp_path: Path, jobs: list[Job], sent: int, killed_by: int
) -> None:
    job = _exec_job(jobs, home, tmp_path, trapped=())
    os.kill(job.proc.pid, sent)
    status, lease = job.finish()
    assert status == 128 + killed_by
    assert lease.revoked_at is not None


def test_signals_jitbroker_ignores_stay_ignored_and_are_not_passed_on(
    home: Home, tmp_path: Path, jobs: list[Job]
) -> None:
    """Started ignoring SIGHUP and SIGALRM (as under nohup); Python ignores SIGPIPE
    and SIGXFSZ (a write fails instead): none of them kills jitbroker or stops the
    child, which inherits SIGHUP ignored. The SIGUSR1 after them shows both alive."""
    ignored = f"{int(signal.SIGHUP)},{int(signal.SIGALRM)}"
    prefix = (sys.executable, "-c", IGNORING, ignored)
    job = _exec_job(jobs, home, tmp_path, "0", [signal.SIGUSR1], prefix=prefix)
    assert job.ready["hup_ignored"] is True
    for signum in (signal.SIGHUP, signal.SIGALRM, signal.SIGPIPE, signal.SIGXFSZ):
        os.kill(job.proc.pid, signum)  # an ignored signal is dropped when sent
    os.kill(job.proc.pid, signal.SIGUSR1)
    status, lease = job.finish()
    assert job.received() == [signal.SIGUSR1]
    assert status == 0
    assert lease.revoke_reason == "exec-ended"


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: its master end and the name of its slave end."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    try:
        yield master, name
    finally:
        with suppress(OSError):
            os.close(master)


def test_ctrl_backslash_on_the_terminal_reaches_the_child_once(
    home: Home, tmp_path: Path, jobs: list[Job], terminal: tuple[int, str]
) -> None:
    """The terminal sends SIGQUIT to its foreground process group: the child got
    it directly, so jitbroker does not send it again; it waits and revokes."""
    master, name = terminal
    job = _exec_job(jobs, home, tmp_path, prefix=(sys.executable, "-c", ON_A_TERMINAL, name))
    os.write(master, b"\x1c")  # ^\ (VQUIT)
    status, lease = job.finish()
    assert job.received() == [signal.SIGQUIT]
    assert status == 3
    assert lease.revoke_reason == "exec-terminated"


def test_a_hang_up_of_the_terminal_jitbroker_controls_is_passed_on(
    home: Home, tmp_path: Path, jobs: list[Job], terminal: tuple[int, str]
) -> None:
    """A hang-up's SIGHUP goes to the terminal's controlling process alone (here
    jitbroker, the session leader): the child has not seen it, so it is forwarded."""
    master, name = terminal
    job = _exec_job(jobs, home, tmp_path, prefix=(sys.executable, "-c", ON_A_TERMINAL, name))
    os.close(master)  # the terminal hangs up
    status, lease = job.finish()
    assert job.received() == [signal.SIGHUP]
    assert status == 3
    assert lease.revoke_reason == "exec-terminated"


def test_every_catchable_signal_that_kills_by_default_is_waited_for() -> None:
    """signal(7): the default action of these is to terminate (or dump core). Not
    waited for: SIGPIPE and SIGXFSZ (Python ignores them), and the signals that
    report a fault of jitbroker's own, which the kernel delivers even when blocked."""
    code = "from jitbroker.cli_exec import _waited; print(sorted(map(int, _waited())))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fatal = {
        signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
        signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGXCPU,
        signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT, signal.SIGABRT,
        *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
    }  # fmt: skip
    assert set(json.loads(done.stdout)) == {*fatal, signal.SIGCHLD}


def test_a_closed_stderr_neither_kills_jitbroker_nor_replaces_the_status(home: Home) -> None:
    """Python ignores SIGPIPE: a warning written to a pipe nobody reads fails, and
    that failure must not skip the clean-up or become the "closed pipe, exit 0"
    of other commands."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITBROKER_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jitbroker.cli", *exec_args(home), "no-such-command-jitbroker"],
            stdout=subprocess.DEVNULL, stderr=write, env=env, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 127
    [lease] = leases(home)
    assert lease.revoked_at is not None
