"""SIGTERM ends open ``task()`` blocks the way an exception does.

One guard per process (a signal handler is process-wide): the first task block
opened in the main thread installs its handler, the last one to close puts the
previous handler back. A SIGTERM then unwinds the main thread's open blocks (a
sync block by raising ``Terminated``, an async block by cancelling the asyncio
task it runs in), so each block's own exit revokes its leases, reason
``task-terminated``, with its retries and hooks, outside the signal handler.
The signal then goes on: to the previous Python handler, or, for ``SIG_DFL``,
re-sent once the handler is restored, so the process still dies of SIGTERM.

A block that is issuing or revoking is not interrupted (that would leave a
lease stored but not revoked): the signal waits until it is done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["GUARD", "Terminated"]


class Terminated(SystemExit):
    """Raised in the main thread to unwind open task blocks on SIGTERM. A
    ``SystemExit``: ``except Exception`` in the job does not swallow it."""


class Guard:
    """The process's SIGTERM handler while main-thread task blocks are open.

    Each block calls ``enter`` (critical: it is issuing), ``body`` (its job runs),
    ``ending`` (critical: it is revoking) and ``leave``. Blocks are guarded only
    in the main thread, where the handler runs too, so plain counters suffice.
    """

    def __init__(self) -> None:
        self.depth = 0  # open guarded blocks
        self.critical = 0  # of those, how many are issuing or revoking
        self.tasks: list[asyncio.Task[Any]] = []  # the asyncio tasks of async blocks
        self.previous: Any = signal.SIG_DFL
        self.pending = False  # a SIGTERM not yet passed on
        self.signalled = False  # a SIGTERM arrived since the first block opened
        self.frame: FrameType | None = None

    def enter(self, task: asyncio.Task[Any] | None = None) -> bool:
        """Open a block; False (not guarded) outside the main thread, or when
        SIGTERM is ignored or has a handler Python cannot restore."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self.depth == 0:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is None or previous == signal.SIG_IGN:
                return False  # installed outside Python / ignored: nothing to chain
            if previous != self._handle:  # not still ours from a block left elsewhere
                signal.signal(signal.SIGTERM, self._handle)
                self.previous = previous
            self.pending = self.signalled = False
        self.depth += 1
        self.critical += 1
        if task is not None:
            self.tasks.append(task)
        return True

    def body(self) -> None:
        """The block's lease is issued: a SIGTERM that waited for it acts now."""
        self.critical -= 1
        if self.pending and not self.critical:
            self._deliver()

    def ending(self) -> None:
        """The block is revoking: do not interrupt it."""
        self.critical += 1

    def leave(self, task: asyncio.Task[Any] | None, failing: bool) -> None:
        """Close a block; the last one restores the previous handler, then passes
        on a SIGTERM that arrived (for ``SIG_DFL``: the process dies here)."""
        self.critical -= 1
        self.depth -= 1
        if task is not None:
            self.tasks.remove(task)
        if self.depth == 0:
            # Unless replaced since, or (a generator closed elsewhere) left in a
            # thread that may not touch signals: then the next block reuses it.
            main = threading.current_thread() is threading.main_thread()
            if main and signal.getsignal(signal.SIGTERM) == self._handle:
                signal.signal(signal.SIGTERM, self.previous)
            if self.pending:
                self._pass_on()
        elif self.pending and not failing and not self.critical:
            self._deliver()  # an inner block ended normally: unwind the outer ones

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.pending = self.signalled = True
        self.frame = frame
        if not self.critical:
            self._deliver()

    def _deliver(self) -> None:
        if callable(self.previous) or not self.depth:  # the application's handler decides
            self._pass_on()
            return
        for task in self.tasks:
            task.get_loop().call_soon_threadsafe(task.cancel)  # also wakes the loop
        if self.depth > len(self.tasks):  # a sync block is open in this thread
            raise Terminated(128 + signal.SIGTERM)

    def _pass_on(self) -> None:
        self.pending = False
        if callable(self.previous):
            self.previous(signal.SIGTERM, self.frame)
        elif self.depth == 0:  # SIG_DFL: restored, terminate with the signal
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


#: The one guard of this process.
GUARD = Guard()
