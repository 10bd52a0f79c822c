"""Lease stores: ``MemoryStore`` (default), ``RedisStore`` (and ``AsyncRedisStore`` for
asyncio) and ``PostgresStore`` (loaded on first use: they need the `jitbroker[redis]` /
`jitbroker[postgres]` extras); all behind the one protocol in ``base``. ``open_store(url)``
opens one from a path or URL."""

from typing import TYPE_CHECKING, Any

from .base import AsyncLeaseStore, LeaseFilter, LeaseStore, as_async
from .memory import MemoryStore
from .sqlite import SQLiteStore
from .url import open_store

if TYPE_CHECKING:
    from .postgres import PostgresStore as PostgresStore
    from .redis import RedisStore as RedisStore
    from .redis_async import AsyncRedisStore as AsyncRedisStore

__all__ = [
    "AsyncLeaseStore",
    "LeaseFilter",
    "LeaseStore",
    "MemoryStore",
    "SQLiteStore",
    "as_async",
    "open_store",
]


def __getattr__(name: str) -> Any:
    # Stores with a driver are imported on first use, so `import jitbroker` works
    # without the driver installed. Kept out of __all__: `import *` stays safe too.
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "AsyncRedisStore":
        from .redis_async import AsyncRedisStore

        return AsyncRedisStore
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
