"""``jitbroker exec [issue options] -- CMD ARGS``: run a command with a credential
that dies with it.

1. Issue a credential (default TTL 5 minutes), locally or at ``--broker``.
2. Write its token to ``$JITBROKER_TOKEN_FILE`` (mode 0600, in a fresh 0700
   directory) and start CMD with ``JITBROKER_TOKEN``, ``JITBROKER_LEASE_ID``,
   ``JITBROKER_EXPIRES_AT`` (POSIX seconds) and ``JITBROKER_TOKEN_FILE`` set.
3. Renew in the background every ``--renew-every`` (default: a third of the
   TTL), replacing the token file atomically (a temporary file, then
   ``os.replace``): a reader sees the old token or the new one, never half.
4. Take every catchable signal that would kill jitbroker, so that none can
   skip step 5. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are
   forwarded to CMD as themselves (programs give them meanings of their own);
   every other one (SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU, SIGIO, SIGPWR,
   SIGSTKFLT, SIGABRT, the realtime signals) means "stop": CMD gets SIGTERM.
   A ^C or ^\\ from the terminal already reached CMD, which shares jitbroker's
   process group: it is not sent twice (nor a hang-up's SIGHUP, unless it went
   to jitbroker alone as the terminal's controlling process). One that a
   process sends to the whole group reaches CMD twice (directly and
   forwarded): nothing tells it apart from one sent to jitbroker alone.
   Signals jitbroker ignores stay ignored (SIGPIPE and SIGXFSZ, which Python
   ignores: a write fails instead; SIGHUP under ``nohup``), and CMD inherits
   that (but for SIGPIPE and SIGXFSZ, reset to their defaults).
5. When CMD exits, for any reason: stop renewing, remove the token file, revoke
   the lease, and exit with CMD's status (128+N if a signal N killed it).
   127 when CMD is not found, 126 when it cannot be executed; the lease is
   revoked then too. A signal taken before CMD started: CMD is not started,
   and the status is 128+N.

Signals are blocked in every thread and taken with ``sigtimedwait`` in the
main thread, so none can interrupt issuing or revoking half-way, and the
child starts (``posix_spawn``) with them unblocked. Nothing revokes if
jitbroker dies by SIGKILL, or by a signal that reports a fault of its own
(SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS: the kernel delivers those
even when blocked): the lease dies at its TTL, which is why the default TTL is
short; the child keeps running with a token that stops verifying by then.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from .cli_shell import (
    Issued,
    Session,
    add_config,
    add_issue_options,
    add_remote,
    duration,
    iso,
    session,
)
from .errors import InvalidRequest, JitBrokerError, LeaseError, PolicyDenied

__all__ = ["DEFAULT_TTL", "add_parser", "run"]

#: The default TTL of an exec credential: the window a SIGKILLed jitbroker leaves.
DEFAULT_TTL = 300.0


def _signals(*names: str) -> tuple[int, ...]:
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


#: Forwarded to CMD as themselves: programs give them meanings of their own
#: (stop, hang up, quit with a core dump, reopen logs...).
FORWARDED = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
)  # fmt: skip
#: The other catchable signals whose default action kills: to jitbroker they
#: mean "stop", so CMD gets SIGTERM. Not here: SIGSEGV, SIGBUS, SIGILL, SIGFPE,
#: SIGTRAP (a debugger's) and SIGSYS (a seccomp filter's) report a fault of
#: jitbroker's own, and the kernel delivers them even when blocked.
STOPPING = (
    *_signals(
        "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGXCPU", "SIGXFSZ", "SIGPIPE", "SIGIO", "SIGPWR",
        "SIGSTKFLT", "SIGABRT", "SIGEMT", "SIGLOST",
    ),
    *range(getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1) + 1),
)  # fmt: skip
# Forwarded without asking CMD to stop: the lease's revoke reason stays CMD's own.
_NOT_STOPPING = frozenset({signal.SIGUSR1, signal.SIGUSR2})
# What a terminal sends its foreground process group (^C, ^\, a hang-up).
_FROM_TERMINAL = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGHUP})
# Reset in the child as subprocess does (Python ignores SIGPIPE for itself).
_DEFAULTED = _signals("SIGPIPE", "SIGXFSZ")
TOKEN_FILE = "token"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``exec``."""
    cmd = sub.add_parser(
        "exec",
        help="run CMD with a credential that is renewed while it runs and revoked when it exits",
        usage="jitbroker exec [options] -- CMD [ARGS...]",
        description="Run CMD with $JITBROKER_TOKEN, $JITBROKER_TOKEN_FILE (replaced on each"
        " renewal), $JITBROKER_LEASE_ID and $JITBROKER_EXPIRES_AT; revoke when it exits; exit"
        " with its status. `--` is required before CMD. Example: jitbroker exec --config"
        " jitbroker.toml --subject svc:export --audience orders-db --scope orders:read --"
        " ./export.sh",
    )
    add_config(cmd)
    add_remote(cmd)
    add_issue_options(cmd, "5m, renewed while CMD runs")
    cmd.add_argument(
        "--renew-every",
        type=duration,
        metavar="DURATION",
        help="renew this often (default: a third of the TTL); e.g. --renew-every 1m",
    )
    cmd.add_argument(
        "--token-file-dir",
        metavar="DIR",
        help="create the private directory holding the token file here (default: $TMPDIR);"
        " e.g. --token-file-dir /dev/shm",
    )


def run(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Carry out ``exec``; CMD's exit status."""
    if not command:
        raise InvalidRequest("exec needs a command after `--`: jitbroker exec [options] -- CMD")
    if not hasattr(signal, "sigtimedwait"):
        raise InvalidRequest("jitbroker exec needs sigtimedwait (Linux or another POSIX system)")
    waited = _waited()
    with _signals_blocked(waited), session(args, create=True) as shell:
        issued = shell.issue(args, DEFAULT_TTL)
        ttl = args.ttl if args.ttl is not None else DEFAULT_TTL
        job = _Exec(shell, issued, ttl, args.renew_every, args.token_file_dir, waited)
        return job.run(command)


def _waited() -> frozenset[int]:
    """SIGCHLD and every signal of FORWARDED and STOPPING that would kill us now.

    One we ignore cannot kill us and stays ignored, as CMD inherits it (SIGPIPE
    and SIGXFSZ, which Python ignores; SIGHUP under nohup): blocked, it would
    be queued instead of dropped. One with a handler keeps its handler.
    """
    default = (signal.SIG_DFL, signal.default_int_handler)
    fatal = {signo for signo in (*FORWARDED, *STOPPING) if signal.getsignal(signo) in default}
    return frozenset({*fatal, signal.SIGCHLD})


@contextmanager
def _signals_blocked(waited: frozenset[int]) -> Iterator[None]:
    # Blocked before any thread starts (a store, the renewer): they inherit the
    # mask, so every such signal waits for the main thread's sigtimedwait.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        yield
    finally:
        # A signal that came while cleaning up was seen (or forwarded) already, and
        # CMD is done: taken here, it cannot kill us on unblocking and replace
        # CMD's exit status with its own.
        while signal.sigtimedwait(waited, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Exec:
    def __init__(
        self,
        shell: Session,
        issued: Issued,
        ttl: float,
        every: float | None,
        directory: str | None,
        waited: frozenset[int],
    ) -> None:
        self.shell = shell
        self.current = issued
        self.ttl = ttl
        life = max(issued.expires_at - time.time(), 0.001)
        self.every = life / 3 if every is None else every
        if self.every >= life:
            self.revoke("exec-refused")
            raise InvalidRequest(
                f"--renew-every {self.every:g}s must be shorter than the TTL ({life:g}s left)"
            )
        self.directory = directory
        self.waited = waited
        self.stop = threading.Event()
        self.signalled: int | None = None
        self.spawn_status = 127

    def run(self, command: Sequence[str]) -> int:
        """Spawn, wait, clean up; the exit status."""
        folder = None
        renewer = None
        status = 2
        try:
            folder = tempfile.mkdtemp(prefix="jitbroker-", dir=self.directory)  # mode 0700
            path = os.path.join(folder, TOKEN_FILE)
            _write_token(folder, self.current.token)
            pending = signal.sigpending() & (self.waited - {signal.SIGCHLD})
            if pending:  # signalled before CMD started: do not start it
                status = 128 + int(min(pending))
                self.signalled = int(min(pending))
                return status
            pid = self._spawn(command, path)
            if pid is None:
                status = self.spawn_status
                return status
            renewer = threading.Thread(
                target=self._renew, args=(folder,), name="jitbroker-exec-renew", daemon=True
            )
            renewer.start()
            status = self._wait(pid)
            return status
        finally:
            self.stop.set()
            if renewer is not None:
                renewer.join()
            # The token file first: revoking may wait on a store or the network.
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            self.revoke(_reason(status, self.signalled))

    def _spawn(self, command: Sequence[str], path: str) -> int | None:
        env = dict(os.environ)
        env.update(
            JITBROKER_TOKEN=self.current.token,
            JITBROKER_TOKEN_FILE=path,
            JITBROKER_LEASE_ID=self.current.lease_id or "",
            JITBROKER_EXPIRES_AT=str(int(self.current.expires_at)),
        )
        try:
            return os.posix_spawnp(
                command[0], list(command), env, setsigmask=(), setsigdef=_DEFAULTED
            )
        except FileNotFoundError:
            _warn(f"{command[0]}: command not found")
            self.spawn_status = 127
        except OSError as exc:  # EACCES, ENOEXEC, EISDIR...: found but not runnable
            _warn(f"{command[0]}: cannot execute: {exc.strerror}")
            self.spawn_status = 126
        return None

    def _wait(self, pid: int) -> int:
        while True:
            info = signal.sigtimedwait(self.waited, 1.0)
            if info is not None and info.si_signo != signal.SIGCHLD:
                if info.si_signo not in _NOT_STOPPING:
                    self.signalled = info.si_signo
                send = _for_cmd(info.si_signo, reached=_reached_cmd(info, pid))
                if send is not None:
                    _kill(pid, send)
                continue
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(wait_status)
                return 128 - code if code < 0 else code

    def _renew(self, folder: str) -> None:
        while not self.stop.wait(self.every):
            try:
                renewed = self.shell.renew(self.current, self.ttl)
            except (LeaseError, PolicyDenied) as exc:  # dead, at its cap, or refused
                _warn(
                    f"lease {self.current.lease_id} no longer renews ({type(exc).__name__});"
                    f" its token stops verifying at {iso(self.current.expires_at)}"
                )
                return
            except (JitBrokerError, OSError) as exc:  # a blip: the next tick retries
                _warn(f"renewing lease {self.current.lease_id} failed ({exc}); retrying")
                continue
            if self.stop.is_set():
                return
            try:
                _write_token(folder, renewed.token)
            except OSError as exc:
                _warn(f"could not replace the token file: {exc.strerror}")
            self.current = renewed

    def revoke(self, reason: str) -> None:
        try:
            self.shell.revoke(self.current, reason)
        except (JitBrokerError, OSError) as exc:
            _warn(
                f"could not revoke lease {self.current.lease_id} ({type(exc).__name__}: {exc});"
                f" it dies at its TTL, {iso(self.current.expires_at)}"
            )


def _write_token(folder: str, token: str) -> None:
    """Replace ``folder/token`` atomically: a reader never sees a partial token."""
    fd, tmp = tempfile.mkstemp(prefix=".token-", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token)
        os.replace(tmp, os.path.join(folder, TOKEN_FILE))
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _for_cmd(signo: int, *, reached: bool) -> int | None:
    """The signal CMD gets for one jitbroker took: the same, SIGTERM, or none
    when the kernel sent it to CMD as well."""
    if signo not in FORWARDED:
        return signal.SIGTERM
    return None if reached else signo


def _reached_cmd(info: signal.struct_siginfo, pid: int) -> bool:
    """Whether the kernel sent CMD this signal too (a terminal's ^C, ^\\ or
    hang-up to its foreground process group, which CMD shares unless it left)."""
    if info.si_code <= 0 or info.si_signo not in _FROM_TERMINAL:
        return False  # kill(2), sigqueue(3), a timer, a limit: to jitbroker alone
    if info.si_signo == signal.SIGHUP and os.getsid(0) == os.getpid():
        # A hang-up goes to the terminal's controlling process alone, and that
        # is us (e.g. `ssh -t host jitbroker exec ...`): CMD has not seen it.
        return False
    try:
        return os.getpgid(pid) == os.getpgrp()
    except OSError:  # CMD is gone already
        return True


def _kill(pid: int, signum: int) -> None:
    with suppress(OSError):  # it may have exited already
        os.kill(pid, signum)


def _reason(status: int, signalled: int | None) -> str:
    if signalled is not None:
        return "exec-terminated"
    return "exec-ended" if status == 0 else "exec-failed"


def _warn(text: str) -> None:
    # stderr may be a pipe whose reader left (Python ignores SIGPIPE: the write
    # fails): a warning lost must not skip the clean-up after it, nor turn into
    # main()'s "closed pipe, exit 0" in place of CMD's status.
    with suppress(OSError, ValueError):
        print(f"jitbroker: {text}", file=sys.stderr, flush=True)
