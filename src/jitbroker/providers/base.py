"""The ``Provider`` protocol: what a backend must offer to mint per-lease credentials."""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from ..errors import InvalidRequest
from ..lease import Lease, Secret

__all__ = ["Provider", "check_provider_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@runtime_checkable
class Provider(Protocol):
    """A backend that makes one principal per lease. Every method is sync (an
    ``AsyncBroker`` calls them in a worker thread) and raises on failure; the
    broker wraps what they raise in ``ProviderError``, never echoing it."""

    #: The audience that selects this provider (``check_provider_name``).
    name: str

    def check(self, lease: Lease) -> None:
        """Refuse (``InvalidRequest``) what this backend cannot grant, before
        anything is stored: a scope that maps to nothing, say."""
        ...

    def create(self, lease: Lease) -> Secret:
        """Make the principal of ``lease``; its credential. Called once per lease
        by the issuing broker; a create that was interrupted is undone by
        ``revoke``, never retried."""
        ...

    def revoke(self, lease: Lease) -> None:
        """Remove the principal of ``lease``. Idempotent: a principal that is not
        there is success. May get a stand-in lease where only ``id`` and
        ``audience`` mean anything (reconciling a principal whose lease is gone)."""
        ...

    def renew(self, lease: Lease) -> None:
        """Move the principal's backend expiry to ``lease.expires_at`` (a no-op
        for a backend without one)."""
        ...

    def managed(self) -> list[str]:
        """The lease ids of every principal this provider owns in the backend."""
        ...


def check_provider_name(name: object) -> str:
    """``name`` if it can name a provider (1 to 64 of ``A-Za-z0-9._:-``, starting
    with a letter or digit); ``InvalidRequest`` otherwise."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise InvalidRequest(
        "a provider name is 1 to 64 letters, digits or '._:-', starting with a letter or digit"
    )
