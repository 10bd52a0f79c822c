"""The values: ``Lease`` (the authority record), ``Credential`` and ``Claims``.

All three are frozen attrs classes; a change makes a new value. Only
``Credential`` holds a secret (the token) and it is kept out of ``repr``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import attrs

from .errors import InvalidRequest

if TYPE_CHECKING:
    from .broker import AsyncBroker, Broker
    from .keepalive import KeepAlive

__all__ = ["Claims", "Credential", "Lease", "Secret"]
T = TypeVar("T", bound=attrs.AttrsInstance)


@attrs.frozen(slots=True, weakref_slot=False)
class Lease:
    """The authority record behind a token; ``id`` is the token's ``jti``.

    Times are POSIX seconds from the broker's clock. A lease is active while it
    is not revoked and ``now < expires_at``; ``max_expires_at`` caps renewal.
    Leases stored before a field existed read it as None.
    """

    id: str
    subject: str
    audience: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    max_expires_at: float
    key_id: str | None = None
    task: str | None = None
    owner: str | None = None
    purpose: str | None = None
    parent: str | None = None
    renewable: bool = True
    revoked_at: float | None = None
    revoke_reason: str | None = None
    holder: str | None = None  # jkt of the key a DPoP proof must be signed with
    #: The ``iss`` of the broker that issued the lease (``revoke_where(issuer=...)``).
    issuer: str | None = None
    #: The run of ``broker.task(...)`` the lease belongs to: unique per ``task()``
    #: call, so a task's exit revokes exactly its own leases, never those of
    #: another run (or another issuer) that uses the same task name.
    task_run: str | None = None
    #: The ``on_expire`` hooks this lease needs, decided by the broker that
    #: created it: their names, sorted and space-separated (see
    #: ``jitbroker.hooks``). None: no hook runs when it expires. Only a broker
    #: that runs every one of them claims the lease once it has expired.
    expire_hooks: str | None = None
    #: The provider (``jitbroker.providers``) holding this lease's backend
    #: credential: the audience named it. Whenever the lease dies, by any path,
    #: the store records the provider's revoke in its outbox in the same step.
    provider: str | None = None

    def is_active(self, now: float) -> bool:
        """True if not revoked and not yet expired at ``now``."""
        return self.revoked_at is None and now < self.expires_at

    def status(self, now: float) -> str:
        """``"active"``, ``"revoked"`` or ``"expired"`` at ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        return "active" if now < self.expires_at else "expired"

    @property
    def scope(self) -> str:
        """The scopes as one space-delimited string, as in the token."""
        return " ".join(self.scopes)


class Secret(Mapping[str, str]):
    """A backend credential a provider minted for a lease (user, password, DSN...).

    A read-only mapping whose values never show: ``repr`` and ``str`` list the
    field names only, and it refuses to be pickled or copied into a log by
    accident (``__reduce__`` raises). Read a value by its key.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str]) -> None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
            raise InvalidRequest("a provider's secret maps names to strings")
        self._values = dict(values)

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<Secret {', '.join(self._values)} (values hidden)>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._values == self._values

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret is not picklable: it holds a backend credential")


@attrs.frozen(slots=True, weakref_slot=False)
class Credential:
    """What ``issue`` returns: the token and its lease. ``repr`` never shows the token.

    Usable as a context manager: the lease is revoked (reason ``"done"``) on exit.
    """

    token: str = attrs.field(repr=False)
    lease: Lease
    _broker: Broker | AsyncBroker | None = attrs.field(
        default=None, repr=False, eq=False, alias="broker"
    )
    #: The backend credential, for a lease whose audience names a provider
    #: (``jitbroker.providers``); None otherwise. Never in a repr or a pickle.
    secret: Secret | None = attrs.field(default=None, repr=False)

    @property
    def lease_id(self) -> str:
        """The lease id, which is also the token's ``jti``."""
        return self.lease.id

    @property
    def expires_at(self) -> float:
        """When the lease expires (POSIX seconds)."""
        return self.lease.expires_at

    def revoke(self, reason: str = "done") -> bool:
        """Revoke this credential's lease (and its descendants); True if it was active."""
        from .broker import Broker

        if not isinstance(self._broker, Broker):
            raise InvalidRequest(
                "this credential was issued by an AsyncBroker (use `await cred.arevoke()`)"
                if self._broker is not None
                else "this credential is not bound to a broker; call broker.revoke(cred)"
            )
        return self._broker.revoke(self, reason=reason)

    async def arevoke(self, reason: str = "done") -> bool:
        """Revoke through an ``AsyncBroker`` (or a ``Broker``) from async code."""
        from .broker import AsyncBroker

        if isinstance(self._broker, AsyncBroker):
            return await self._broker.revoke(self, reason=reason)
        return self.revoke(reason)

    def keep_alive(
        self, every: float | None = None, ttl: float | None = None, *, children: bool = False
    ) -> KeepAlive:
        """Renew this credential in the background while a block runs:
        ``with cred.keep_alive() as live:`` (a ``Broker``'s credential) or
        ``async with`` (either broker); ``live.token`` is the current token.
        Every ``every`` seconds (a third of the TTL by default) the lease is
        renewed for ``ttl`` more (its TTL by default), never past its cap;
        with ``children``, its delegated leases too."""
        from .keepalive import KeepAlive

        return KeepAlive(self, every, ttl, children)

    def __enter__(self) -> Credential:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.revoke("done" if exc_type is None else "failed")

    async def __aenter__(self) -> Credential:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.arevoke("done" if exc_type is None else "failed")


@attrs.frozen(slots=True, weakref_slot=False)
class Claims:
    """What ``verify`` returns: the checked claims as typed fields, plus ``raw``.

    Times are the token's integer NumericDates. For an opaque token the claims
    come from the lease and ``raw`` is empty.
    """

    lease_id: str
    issuer: str
    subject: str
    audience: str
    scopes: frozenset[str]
    issued_at: int
    not_before: int
    expires_at: int
    key_id: str | None = None
    task: str | None = None
    owner: str | None = None
    purpose: str | None = None
    parent: str | None = None
    holder: str | None = None
    #: Delegation (RFC 8693 ``act``): ``subject`` is then the principal at the root
    #: of the chain, ``actor`` the workload the token was delegated to (its lease's
    #: subject), and ``delegated_by`` the ids of the leases it was delegated
    #: through, nearest first. ``actor`` is None for a token that was not delegated.
    actor: str | None = None
    delegated_by: tuple[str, ...] = ()
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def scope(self) -> str:
        """The scopes as one space-delimited string (sorted)."""
        return " ".join(sorted(self.scopes))


def _builder(cls: type[T]) -> Callable[..., T]:
    """A positional constructor of the frozen attrs class ``cls``, for hot paths.

    A frozen ``__init__`` sets each field through ``object.__setattr__`` (~45 ns a
    field: 0.7 us for a Lease, a sixth of an opaque ``issue``). This fills a
    mutable twin with the same slots by plain assignment, then relabels it as
    ``cls``. CPython only allows that ``__class__`` assignment between identical
    slot layouts, so if the twin ever drifted from ``cls`` it would raise, never
    build a malformed value. Neither constructor validates, so both give equal
    values.
    """
    relabel = object.__setattr__

    def __attrs_post_init__(self: object) -> None:
        relabel(self, "__class__", cls)

    fields = {f.name: attrs.field(default=f.default) for f in attrs.fields(cls)}
    return attrs.make_class(
        f"_{cls.__name__}Builder",
        fields,
        class_body={"__attrs_post_init__": __attrs_post_init__},
        slots=True,
        weakref_slot=False,
        eq=False,
    )


new_lease = _builder(Lease)
new_credential = _builder(Credential)
