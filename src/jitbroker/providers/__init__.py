"""Providers: backend credentials that live and die with a lease.

A broker given ``providers=[...]`` gives a lease whose audience names a
provider a backend credential of its own (``cred.secret``), made by the
provider's ``create`` and removed by its ``revoke`` whenever the lease dies,
by any path: the store records the revoke in its outbox with the death (see
``jitbroker.outbox``). ``Provider`` is the protocol; ``CallbackProvider`` plugs
plain callables in. Importing this package imports no backend driver.
"""

from .base import Provider, check_provider_name
from .callback import CallbackProvider

__all__ = ["CallbackProvider", "Provider", "check_provider_name"]
