"""Lease stores: ``MemoryStore`` (default); shared stores arrive behind the same protocol."""

from .base import AsyncLeaseStore, LeaseFilter, LeaseStore, as_async
from .memory import MemoryStore

__all__ = ["AsyncLeaseStore", "LeaseFilter", "LeaseStore", "MemoryStore", "as_async"]
