"""The token a client holds, and the one renewal in flight however many requests run.

``Renewal`` decides (without I/O) when a token is due, what to ask the source
for and what to fall back on; ``get`` and ``aget`` only differ in how they wait.
The decision is made under a ``threading.Lock`` held for a few instructions and
never across I/O, and a renewal's outcome travels in a
``concurrent.futures.Future``: threads wait on it directly, asyncio tasks (of
any loop) through ``asyncio.wrap_future``. So an auth shared by several threads,
several event loops, or both, still runs one renewal at a time.

While a renewal is in flight, the other requests keep the current token if it
is still usable; only a token that is not (none yet, or about to expire) makes
them wait, all for that one renewal.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from concurrent.futures import Future
from operator import methodcaller

import attrs

from .._drive import Steps, arun, run
from ..clock import Clock
from ..dpop import token_hash
from ..errors import (
    InvalidRequest,
    JitBrokerError,
    LeaseNotActive,
    LeaseNotFound,
    PolicyDenied,
    RenewalDenied,
)
from .sources import AsyncTokenSource, Grant, ThreadedSource, TokenSource, is_async

__all__ = ["EXPIRY_MARGIN", "RETRY_AFTER", "Held", "Renewal"]

log = logging.getLogger("jitbroker.web.client")

#: After a failed renewal, how long to keep using the still-valid token before
#: trying again (seconds; never past the token's usable time).
RETRY_AFTER = 1.0
#: A token is not sent in its last second (at most): it could expire on the way.
EXPIRY_MARGIN = 1.0
# Renewal refused: issue a fresh credential instead. The last two also say the
# lease is dead, so its token is no fallback if the fresh issue fails.
_REFUSED = (RenewalDenied, PolicyDenied, LeaseNotActive, LeaseNotFound)
_DEAD = (LeaseNotActive, LeaseNotFound)
_ISSUE = methodcaller("issue")


@attrs.frozen
class Held:
    """The token in use and the times that decide what to do with it."""

    grant: Grant = attrs.field(repr=False)
    header: str = attrs.field(repr=False)  # the Authorization value, built once
    ath: str | None = attrs.field(repr=False)  # the token's hash, for DPoP proofs
    renew_after: float
    usable_until: float


class Renewal:
    """Holds one client's token; renews it at ``renew_at`` of its life.

    ``held`` is read without the lock on the hot path: it is replaced whole,
    never changed in place, so a reader sees one consistent value.
    """

    def __init__(
        self,
        source: TokenSource | AsyncTokenSource,
        *,
        renew_at: float,
        clock: Clock | None,
        scheme: str,
        bound: bool,
    ) -> None:
        # Below 1: a token renewed only when it expires could not be renewed at all.
        if isinstance(renew_at, bool) or not isinstance(renew_at, int | float):
            raise InvalidRequest("renew_at must be a fraction of a token's life, 0 < renew_at < 1")
        if not 0 < renew_at < 1:
            raise InvalidRequest(f"renew_at must be more than 0 and less than 1, got {renew_at!r}")
        asynchronous = is_async(source)
        self._source = None if asynchronous else source
        self._asource: AsyncTokenSource = (
            source if asynchronous else ThreadedSource(source)  # type: ignore[assignment,arg-type]
        )
        self.clock: Clock = clock if clock is not None else source.clock
        self._renew_at = float(renew_at)
        self._scheme, self._bound = scheme, bound
        self._lock = threading.Lock()
        self.held: Held | None = None
        self._inflight: Future[Held | None] | None = None
        self._retired: dict[str, Grant] = {}  # replaced, not yet expired: revoked on close
        self.closed = False

    # -- deciding (no I/O) -----------------------------------------------------
    def _hold(self, grant: Grant, now: float) -> Held:
        if not isinstance(grant, Grant):
            raise InvalidRequest("a token source must return a Credential (or a Grant)")
        life = grant.expires_at - now
        usable = grant.expires_at - min(EXPIRY_MARGIN, life * (1 - self._renew_at) / 2)
        if usable <= now:
            raise LeaseNotActive(
                f"lease {grant.lease_id} expires before it could be used", lease_id=grant.lease_id
            )
        ath = token_hash(grant.token) if self._bound else None
        renew_after = now + life * self._renew_at
        log.debug("lease %s: token good until %.0f, renewed after %.0f", grant.lease_id,
                  grant.expires_at, renew_after)  # fmt: skip
        return Held(grant, self._scheme + grant.token, ath, renew_after, usable)

    def _refresh(self, held: Held | None) -> Steps[Held]:
        """Renew ``held`` (a fresh issue if renewal is refused). When the source
        fails and ``held`` is still usable, keep it and try again a bit later."""
        now = self.clock()
        fallback = held if held is not None and now < held.usable_until else None
        try:
            if held is not None:
                try:
                    return self._hold((yield methodcaller("renew", held.grant)), now)
                except _REFUSED as exc:
                    log.info("lease %s: renewal refused (%s); issuing a new one",
                             held.grant.lease_id, type(exc).__name__)  # fmt: skip
                    if isinstance(exc, _DEAD):
                        fallback = None
                    else:
                        self._retire(held.grant, now)
            return self._hold((yield _ISSUE), now)
        except Exception as exc:
            if fallback is None:
                raise
            log.warning("lease %s: could not renew (%s); keeping its token for now",
                        fallback.grant.lease_id, type(exc).__name__)  # fmt: skip
            retry = min(now + RETRY_AFTER, (now + fallback.usable_until) / 2)
            return attrs.evolve(fallback, renew_after=retry)

    def _retire(self, grant: Grant, now: float) -> None:
        with self._lock:
            for lease_id, old in list(self._retired.items()):
                if old.expires_at <= now:  # dead anyway: forget it
                    del self._retired[lease_id]
            self._retired[grant.lease_id] = grant

    def stale(self, held: Held) -> None:
        """The server refused ``held``'s token: renew it before the next request."""
        with self._lock:
            if self.held is held:
                self.held = attrs.evolve(held, renew_after=-math.inf)
                log.info("lease %s: the server refused its token; renewing", held.grant.lease_id)

    def _claim(self) -> tuple[Future[Held | None] | None, bool, Held | None]:
        """Under the lock: the current token if it needs no renewal, else the
        renewal in flight and whether the caller must run it (is its owner)."""
        with self._lock:
            if self.closed:
                raise InvalidRequest("this BrokerAuth is closed; make a new one")
            held = self.held
            if held is not None and self.clock() < held.renew_after:
                return None, False, held
            if self._inflight is None:
                self._inflight = Future()
                return self._inflight, True, held
            return self._inflight, False, held

    def _settle(self, future: Future[Held | None], held: Held | None) -> bool:
        """Publish a renewal's outcome (None: abandoned, a waiter takes over) and
        wake its waiters; False if the client was closed meanwhile."""
        with self._lock:
            self._inflight = None
            closed = self.closed
            if held is not None and not closed:
                self.held = held
        future.set_result(None if closed else held)
        return not closed

    def _fail(self, future: Future[Held | None], exc: BaseException) -> None:
        if not isinstance(exc, Exception):  # cancelled, interrupted: a waiter retries
            self._settle(future, None)
            return
        with self._lock:
            self._inflight = None
        future.set_exception(exc)

    def _usable(self, held: Held | None) -> bool:
        return held is not None and self.clock() < held.usable_until

    # -- waiting -----------------------------------------------------------------
    def get(self) -> Held:
        """The token to send now, renewed first if due (blocking)."""
        source = self.sync_source()
        while True:
            future, owner, held = self._claim()
            if future is None or (not owner and self._usable(held)):
                return held  # type: ignore[return-value]
            if not owner:
                result = future.result()
            else:
                try:
                    result = run(self._refresh(held), source)
                except BaseException as exc:
                    self._fail(future, exc)
                    raise
                if not self._settle(future, result):  # closed meanwhile: it dies too
                    source.revoke(result.grant)
                    result = None
            if result is not None:
                return result

    async def aget(self) -> Held:
        """The token to send now, renewed first if due (awaiting)."""
        source = self._asource
        while True:
            future, owner, held = self._claim()
            if future is None or (not owner and self._usable(held)):
                return held  # type: ignore[return-value]
            if not owner:
                # Shielded: a waiter that is cancelled must not cancel the renewal.
                result = await asyncio.shield(asyncio.wrap_future(future))
            else:
                try:
                    result = await arun(self._refresh(held), source)
                except BaseException as exc:
                    self._fail(future, exc)
                    raise
                if not self._settle(future, result):
                    await source.revoke(result.grant)
                    result = None
            if result is not None:
                return result

    def sync_source(self) -> TokenSource:
        """The synchronous source, or ``InvalidRequest`` for an async one."""
        if self._source is None:
            raise InvalidRequest(
                "this BrokerAuth gets its tokens from an AsyncBroker: use it with "
                "httpx.AsyncClient and close it with `await auth.aclose()`"
            )
        return self._source  # type: ignore[return-value]

    # -- closing -----------------------------------------------------------------
    def _take_all(self) -> list[Grant]:
        with self._lock:
            self.closed = True
            grants = list(self._retired.values())
            if self.held is not None:
                grants.append(self.held.grant)
            self.held, self._retired = None, {}
        return grants

    def close(self) -> None:
        """Revoke every lease obtained; refuse to renew from now on."""
        source = self.sync_source()
        failed: list[tuple[Grant, JitBrokerError]] = []
        for grant in self._take_all():
            try:
                source.revoke(grant)
            except JitBrokerError as exc:
                failed.append((grant, exc))
        self._finish(failed)

    async def aclose(self) -> None:
        """``close()`` awaiting the source."""
        failed: list[tuple[Grant, JitBrokerError]] = []
        for grant in self._take_all():
            try:
                await self._asource.revoke(grant)
            except JitBrokerError as exc:
                failed.append((grant, exc))
        self._finish(failed)

    def _finish(self, failed: list[tuple[Grant, JitBrokerError]]) -> None:
        if not failed:
            return
        with self._lock:  # kept: a second close() tries these again
            self._retired.update((grant.lease_id, grant) for grant, _ in failed)
        error = failed[0][1]
        log.warning("could not revoke %d lease(s) on close (%s)", len(failed),
                    type(error).__name__)  # fmt: skip
        raise error
