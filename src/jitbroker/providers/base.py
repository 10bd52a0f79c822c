"""The ``Provider`` protocol: what a backend must offer to mint per-lease credentials."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..lease import Lease, Secret
from ..outbox import check_provider_name

__all__ = ["Provider", "check_provider_name"]


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
