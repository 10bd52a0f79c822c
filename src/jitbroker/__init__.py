"""jitbroker: just-in-time, task-scoped credentials that die with their task.

Mint a short-lived signed token for one task, record it as a lease, and make
sure the lease dies: when the task ends, when its TTL runs out, when its parent
is revoked, or when its key is retired. See ``Broker``.
"""

from .audit import AuditEvent
from .broker import AsyncBroker, Broker
from .errors import (
    InvalidRequest,
    InvalidToken,
    JitBrokerError,
    LeaseError,
    PolicyDenied,
    StoreError,
)
from .keyring import KeyRing
from .lease import Claims, Credential, Lease, Secret
from .policy import Policy, Rule
from .stores import LeaseFilter, LeaseStore, MemoryStore
from .verify import Verifier

__all__ = [
    "AsyncBroker",
    "AuditEvent",
    "Broker",
    "Claims",
    "Credential",
    "InvalidRequest",
    "InvalidToken",
    "JitBrokerError",
    "KeyRing",
    "Lease",
    "LeaseError",
    "LeaseFilter",
    "LeaseStore",
    "MemoryStore",
    "Policy",
    "PolicyDenied",
    "Rule",
    "Secret",
    "StoreError",
    "Verifier",
]

__version__ = "0.1.0"
