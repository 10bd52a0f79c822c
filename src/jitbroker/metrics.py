"""Metrics (OpenTelemetry, extra ``jitbroker[otel]``) and ``health()`` for probes.

``Broker(..., metrics=Metrics())`` counts what the broker does. Nothing here
costs anything when metrics are off: ``import jitbroker`` never imports
OpenTelemetry, and a broker without ``metrics=`` runs no metrics code.

Why the counters are not OpenTelemetry's synchronous instruments: one
``Counter.add`` of the Python SDK costs 6 to 12 us, more than a whole cached
``verify`` (about 3 us). So the broker keeps plain integer counts, fed by its
audit events (an audit sink: the events exist anyway), and the instruments are
*observable*: the SDK reads the counts when a reader collects (a Prometheus
scrape). The verify latency histogram is the one synchronous instrument; it
records at most ``verify_samples`` verifications per second (every one of them
at lower rates), so a verifier at full speed pays a clock read, not an SDK call.

Attributes are low-cardinality only: audience, provider, a revoke reason from a
known set, a denial kind, a verify outcome (an error class name), a store kind
and operation. Never a subject, owner, lease id or token: each distinct value
is a time series kept forever by Prometheus (cardinality), and several of them
are secrets or personal data. Audiences are capped at ``max_audiences``
distinct values; later ones are counted as ``"other"``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

import attrs

from ._drive import Steps
from .audit import EventType
from .errors import InvalidRequest, InvalidToken, StoreError
from .lease import Lease
from .revocations import RevocationCache

__all__ = [
    "DEFAULT_LEASE_WARNING",
    "KNOWN_REVOKE_REASONS",
    "Health",
    "Metrics",
]

T = TypeVar("T")
#: Active leases above which ``health()`` reports ``degraded``. Vault warns at
#: 256k leases; jitbroker leases are smaller, but a count that high means
#: something issues without ever revoking, and sweeps and reports slow down.
DEFAULT_LEASE_WARNING = 256_000
#: Revoke reasons kept as attribute values (any other reason is ``"other"``:
#: ``revoke(reason=...)`` is free text, and free text is unbounded cardinality).
KNOWN_REVOKE_REASONS = frozenset(
    {
        "revoked",
        "task-ended",
        "task-failed",
        "task-terminated",
        "key-retired",
        "offboarded",
        "orphan",
        "parent-revoked",
        "done",
    }
)
#: The verify latency buckets (seconds): a cached JWS verify is ~3 us, a store
#: round trip ~0.1-1 ms, a slow store tens of ms.
VERIFY_BUCKETS = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
_NONE = "none"
_ISSUED = EventType.ISSUED
Attrs = tuple[tuple[str, str], ...]


def _otel() -> Any:
    try:
        from opentelemetry import metrics as otel_metrics
    except ImportError:  # the extra is not installed
        raise InvalidRequest(
            "jitbroker.metrics needs OpenTelemetry: pip install 'jitbroker[otel]'"
        ) from None
    return otel_metrics


class Metrics:
    """The broker's OpenTelemetry instruments (see the module docstring).

    ``meter_provider``: where the instruments live (default: the global one,
    ``opentelemetry.metrics.get_meter_provider()``). One ``Metrics`` may serve
    several brokers of a process; their counts add up.
    """

    def __init__(
        self,
        meter_provider: Any = None,
        *,
        verify_samples: int = 1000,
        max_audiences: int = 100,
        revoke_reasons: Iterable[str] = (),
    ) -> None:
        otel = _otel()
        for name, value in (("verify_samples", verify_samples), ("max_audiences", max_audiences)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a whole number of at least 1")
        provider = meter_provider if meter_provider is not None else otel.get_meter_provider()
        meter = provider.get_meter("jitbroker")
        self._observation = otel.Observation
        self._lock = threading.Lock()
        self._counts: dict[str, dict[Attrs, int]] = {}
        self._audiences: dict[str, str] = {}
        self._max_audiences = max_audiences
        self._reasons = KNOWN_REVOKE_REASONS | frozenset(revoke_reasons)
        self._interval = 1.0 / verify_samples
        self._next_sample = 0.0
        self._perf = time.perf_counter
        self._observable(meter, "lease.issued", "{lease}", "Leases issued (and attenuated).")
        self._observable(meter, "lease.revoked", "{lease}", "Leases revoked, by reason.")
        self._observable(meter, "lease.expired", "{lease}", "Leases expired by the reaper.")
        self._observable(meter, "lease.denied", "{request}", "Requests the policy refused.")
        self._observable(meter, "hooks.parked", "{job}", "Hook jobs out of retries (parked).")
        self._observable(meter, "store.errors", "{error}", "Store calls that raised StoreError.")
        self._observable(meter, "verify.failed", "{token}", "Rejected tokens, by error class.")
        self._observable(
            meter,
            "lease.active",
            "{lease}",
            "Leases issued minus leases ended, as seen by this process (sum over processes).",
            updown=True,
        )
        self._duration = meter.create_histogram(
            "jitbroker.verify.duration",
            unit="s",
            description="Online verification time, by outcome (sampled; see docs/metrics.md).",
            explicit_bucket_boundaries_advisory=VERIFY_BUCKETS,
        )
        self._outcomes: dict[str, dict[str, str]] = {}
        self._issue_keys: dict[str, Attrs] = {}  # by audience, for leases without provider

    def __repr__(self) -> str:
        return f"<Metrics audiences={len(self._audiences)}>"

    # -- instruments ------------------------------------------------------------
    def _observable(
        self, meter: Any, name: str, unit: str, description: str, updown: bool = False
    ) -> None:
        counts = self._counts.setdefault(name, {})
        observation = self._observation

        def observe(options: object) -> Iterator[Any]:
            if updown:
                items = list(self._active().items())
            else:
                with self._lock:  # a snapshot: the broker's threads keep counting
                    items = list(counts.items())
            for attributes, value in items:
                yield observation(value, dict(attributes))

        create = (
            meter.create_observable_up_down_counter if updown else meter.create_observable_counter
        )
        create(f"jitbroker.{name}", callbacks=[observe], unit=unit, description=description)

    def _add(self, name: str, attributes: Attrs, value: int = 1) -> None:
        counts = self._counts[name]
        with self._lock:
            counts[attributes] = counts.get(attributes, 0) + value

    def value(self, name: str, **attributes: str) -> int:
        """The count of instrument ``jitbroker.<name>`` summed over the series
        matching ``attributes`` (for health and tests; the exporters read the
        instruments)."""
        wanted = set(attributes.items())
        if name == "lease.active":
            return sum(v for k, v in self._active().items() if wanted <= set(k))
        with self._lock:
            return sum(v for k, v in self._counts[name].items() if wanted <= set(k))

    # -- attribute values (bounded) ---------------------------------------------
    def _audience(self, audience: str) -> str:
        known = self._audiences.get(audience)
        if known is None:
            known = audience if len(self._audiences) < self._max_audiences else "other"
            self._audiences[audience] = known
        return known

    def _lease_attrs(self, lease: Lease | None) -> Attrs:
        if lease is None:
            return (("audience", "other"), ("provider", _NONE))
        return (("audience", self._audience(lease.audience)), ("provider", lease.provider or _NONE))

    # -- audit events -----------------------------------------------------------------
    def observer(self) -> Callable[[EventType, Lease | None, dict[str, Any]], None]:
        """The ``Auditor.observer`` that counts each event from its arguments (an
        audit sink would make the auditor build an ``AuditEvent`` per issue: 1 us)."""
        issued, lock, keys = self._counts["lease.issued"], self._lock, self._issue_keys
        observe = self._observe

        def observed(action: EventType, lease: Lease | None, details: dict[str, Any]) -> None:
            if action is _ISSUED and lease is not None:  # the hot path: one increment
                key = keys.get(lease.audience) if lease.provider is None else None
                if key is None:  # a new audience, or a provider's lease (that costs a backend call)
                    key = self._issue_key(lease)
                with lock:
                    issued[key] = issued.get(key, 0) + 1
            else:
                observe(action, lease, details)

        return observed

    def _issue_key(self, lease: Lease) -> Attrs:
        key = (*self._lease_attrs(lease), ("via", "issue"))
        if lease.provider is None:
            self._issue_keys[lease.audience] = key
        return key

    def _observe(self, action: EventType, lease: Lease | None, details: dict[str, Any]) -> None:
        if action is EventType.ATTENUATED:
            self._add("lease.issued", (*self._lease_attrs(lease), ("via", "attenuate")))
        elif action is EventType.REVOKED:
            reason = details.get("reason")
            reason = reason if reason in self._reasons else "other"
            self._add("lease.revoked", (*self._lease_attrs(lease), ("reason", reason)))
        elif action is EventType.EXPIRED:
            self._add("lease.expired", self._lease_attrs(lease))
        elif action is EventType.DENIED:
            reasons = details.get("reasons") or ()
            # A full quota's reason is Quota.exceeded()'s "... at most N active leases for ...".
            quota = any("active leases for" in reason for reason in reasons)
            audience = self._lease_attrs(lease)[0]
            self._add("lease.denied", (audience, ("reason", "quota" if quota else "policy")))
        elif action is EventType.HOOK_PARKED:
            self._add("hooks.parked", (("event", details.get("where") or "unknown"),))
        elif action is EventType.VERIFY_FAILED:
            self._add("verify.failed", (("outcome", details.get("error") or "InvalidToken"),))

    def _active(self) -> dict[Attrs, int]:
        """Leases issued minus leases ended, per (audience, provider): derived from
        the other counts at collection, so issue increments one count, not two."""
        active: dict[Attrs, int] = {}
        with self._lock:
            for name, sign in (("lease.issued", 1), ("lease.revoked", -1), ("lease.expired", -1)):
                for attributes, count in self._counts[name].items():
                    key = attributes[:2]
                    active[key] = active.get(key, 0) + sign * count
        return active

    @staticmethod
    def kind_of(store: Any) -> str:
        """The ``store`` attribute of a store's errors (memory, sqlite, redis...)."""
        return _store_kind(store)

    def store_error(self, kind: str, operation: str, error: StoreError) -> None:
        """Count a store call that raised (the broker's counted store calls this)."""
        self._add(
            "store.errors",
            (("store", kind), ("operation", operation), ("error", type(error).__name__)),
        )

    # -- verify latency -----------------------------------------------------------
    def _sample(self, start: float, outcome: str) -> None:
        end = self._perf()
        if end < self._next_sample:  # over the sample rate: a clock read is all it costs
            return
        self._next_sample = end + self._interval
        attributes = self._outcomes.get(outcome)
        if attributes is None:
            attributes = self._outcomes.setdefault(outcome, {"outcome": outcome})
        self._duration.record(end - start, attributes)

    def verify(self, drive: Callable[[Steps[T], Any], T], steps: Steps[T], store: Any) -> T:
        """Run a broker's verify ``steps`` with ``drive`` on the bare ``store``
        (its errors counted here: no wrapper on the hottest store call), timing it."""
        perf = self._perf
        start = perf()
        try:
            claims = drive(steps, store)
        except InvalidToken as exc:
            self._sample(start, type(exc).__name__)
            raise
        except StoreError as exc:
            self.store_error(_store_kind(store), "verify", exc)
            self._sample(start, type(exc).__name__)
            raise
        if perf() >= self._next_sample:  # one clock read when not sampled
            self._sample(start, "ok")
        return claims

    async def averify(self, pending: Any) -> Any:
        """Await an async broker's verify (the ``arun`` coroutine), timing it."""
        start = self._perf()
        try:
            claims = await pending
        except (InvalidToken, StoreError) as exc:
            self._sample(start, type(exc).__name__)
            raise
        self._sample(start, "ok")
        return claims

    def counted(self, store: Any) -> Any:
        """``store`` with every ``StoreError`` a call raises counted."""
        return _CountedStore(store, self)


def _store_kind(store: Any) -> str:
    name = type(store).__name__.lower()
    for kind in ("memory", "sqlite", "redis", "postgres"):
        if kind in name:
            return kind
    return "other"


class _CountedStore:
    """A store whose calls count their ``StoreError`` s; everything else passes
    through. Methods are wrapped on first use and then cached on the instance."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        inner = getattr(store, "sync", None)  # as_async's wrapper: name the real store
        self._kind = _store_kind(store if inner is None else inner)
        self._inner = store
        self._metrics = metrics

    def __repr__(self) -> str:
        return repr(self._inner)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name.startswith("_") or not callable(value):
            return value
        wrapped = self._wrap(name, value)
        setattr(self, name, wrapped)
        return wrapped

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        import inspect

        count, kind = self._metrics.store_error, self._kind
        if inspect.iscoroutinefunction(fn):

            async def acall(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except StoreError as exc:
                    count(kind, name, exc)
                    raise

            return acall

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except StoreError as exc:
                count(kind, name, exc)
                raise

        return call


# -- health ---------------------------------------------------------------------
Status = Literal["ok", "degraded", "down"]
#: A lease id no lease has (32 hex characters): the probe's ``get``.
_PROBE_ID = "0" * 32
#: ``jobs(parked=True)`` is asked for at most this many: the probe stays cheap.
PARKED_LIMIT = 1000
#: A store count that took longer than this (seconds) is reused by later probes
#: for ``COUNT_REUSE`` seconds: a count is O(leases) in SQL stores (PostgreSQL
#: takes ~60 ms at 1M), and a probe every few seconds from every replica must
#: not keep the database counting. Faster counts (Redis always, SQL stores up to
#: about 250k live leases) are taken fresh by every probe.
SLOW_COUNT = 0.010
COUNT_REUSE = 30.0


@attrs.frozen
class Health:
    """What ``broker.health()`` found. ``status`` is ``ok``, ``degraded`` (it
    works; someone should look: ``reasons`` say why) or ``down`` (the store
    cannot be reached: issue, renew, revoke and online verify fail closed)."""

    status: Status
    reasons: tuple[str, ...]
    store_reachable: bool
    store_latency: float | None  # seconds, the probe's round trip
    revocation_feed: Literal["live", "stale", "none"]
    feed_lag: float | None  # seconds since the feed last confirmed it was current
    key_id: str | None
    key_age: float | None  # seconds this process has seen ``key_id`` signing
    parked: int | None  # parked jobs (at most PARKED_LIMIT counted); None: unknown
    active_leases: int | None
    active_leases_source: Literal["store", "process", "unknown"]
    lease_warning_threshold: int
    checked_at: float
    #: Seconds since the store counted ``active_leases`` (0.0: by this probe; more:
    #: a slow count reused, see ``COUNT_REUSE``); None unless the source is the store.
    active_leases_age: float | None = None

    @property
    def ok(self) -> bool:
        """True unless the broker is down (what a readiness probe wants)."""
        return self.status != "down"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``/healthz`` body)."""
        out = attrs.asdict(self)
        out["reasons"] = list(self.reasons)
        return out


@attrs.define
class _Probe:
    """What the store said to a probe."""

    reachable: bool = False
    latency: float | None = None
    parked: int | None = None
    active: int | None = None
    error: str | None = None
    count_time: float | None = None  # seconds the store took to count


def probe_steps(now: float, count: bool = True) -> Iterator[Callable[[Any], Any]]:
    """The store calls of a probe, as step functions (each cheap: one get, a
    bounded job listing, and, unless ``count`` is False (a slow count reused),
    a count where the store has ``count_active``)."""
    yield lambda store: store.get(_PROBE_ID)
    yield (
        lambda store: (
            store.jobs(parked=True, limit=PARKED_LIMIT) if hasattr(store, "jobs") else None
        )
    )
    if count:
        yield lambda store: store.count_active(now) if hasattr(store, "count_active") else None
    else:
        yield lambda store: None  # a slow count is reused (see SLOW_COUNT)


def check_threshold(value: object) -> int:
    """``lease_warning_threshold`` checked."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest("lease_warning_threshold must be a whole number of at least 1")
    return value


class HealthState:
    """The part of ``health()`` that is the same for both brokers."""

    def __init__(self, threshold: int) -> None:
        self.threshold = check_threshold(threshold)
        self._seen: dict[str, float] = {}  # kid -> when this process first saw it sign
        self._count: tuple[int, float] | None = None  # a slow count, and when it was taken
        #: Ages (key, reused count) are measured on this clock (tests replace it).
        self.monotonic: Callable[[], float] = time.monotonic

    def wants_count(self) -> bool:
        """False while a slow store count is fresh enough to reuse."""
        kept = self._count
        return kept is None or self.monotonic() - kept[1] >= COUNT_REUSE

    def _active(self, probe: _Probe) -> tuple[int | None, float | None]:
        """The store's count (this probe's, or a slow one reused) and its age."""
        if probe.active is not None:
            slow = probe.count_time is not None and probe.count_time > SLOW_COUNT
            self._count = (probe.active, self.monotonic()) if slow else None
            return probe.active, 0.0
        kept = self._count
        if probe.reachable and kept is not None:
            return kept[0], self.monotonic() - kept[1]
        return None, None

    def key(self, active_kid: str | None) -> tuple[str | None, float | None]:
        if active_kid is None:
            return None, None
        now = self.monotonic()
        first = self._seen.setdefault(active_kid, now)
        return active_kid, now - first

    def judge(
        self,
        probe: _Probe,
        cache: RevocationCache | None,
        active_kid: str | None,
        metrics: Metrics | None,
        now: float,
    ) -> Health:
        reasons: list[str] = []
        status: Status = "ok"
        if not probe.reachable:
            status = "down"
            reasons.append(f"store unreachable: {probe.error}")
        feed: Literal["live", "stale", "none"] = "none"
        lag = None
        if cache is not None:
            feed = "live" if cache.fresh() else "stale"
            if cache.confirmed_at is not None:
                lag = max(0.0, cache.clock() - cache.confirmed_at)
            if feed == "stale":
                reasons.append("revocation feed stale: verify asks the store for every token")
        active, count_age = self._active(probe)
        source = "store"
        if active is None and metrics is not None:
            active, source = metrics.value("lease.active"), "process"
        elif active is None:
            source = "unknown"
        if active is not None and active >= self.threshold:
            reasons.append(f"{active} active leases (warning threshold {self.threshold})")
        if probe.parked:
            more = "+" if probe.parked >= PARKED_LIMIT else ""
            reasons.append(f"{probe.parked}{more} parked jobs need an operator (failed_hooks())")
        if active_kid is None:
            reasons.append("no active signing key")
        if status == "ok" and reasons:
            status = "degraded"
        kid, age = self.key(active_kid)
        return Health(
            status=status,
            reasons=tuple(reasons),
            store_reachable=probe.reachable,
            store_latency=probe.latency,
            revocation_feed=feed,
            feed_lag=lag,
            key_id=kid,
            key_age=age,
            parked=probe.parked,
            active_leases=active,
            active_leases_source=source,  # type: ignore[arg-type]
            lease_warning_threshold=self.threshold,
            checked_at=now,
            active_leases_age=count_age if source == "store" else None,
        )


def run_probe(store: Any, now: float, timeout: float, count: bool = True) -> _Probe:
    """Probe a sync store in a daemon thread, waiting at most ``timeout`` seconds
    (a store that hangs must not hang the readiness probe)."""
    probe = _Probe()

    def work() -> None:
        perf = time.perf_counter
        start = perf()
        results, times = [], []
        try:
            for step in probe_steps(now, count):
                results.append(step(store))
                times.append(perf())
        except Exception as exc:  # any failure of the store is "down", with its class
            probe.error = _describe(exc)
            return
        _fill(probe, results, times[1] - start, times[2] - times[1])

    thread = threading.Thread(target=work, name="jitbroker-health", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _Probe(error=f"no answer within {timeout:g}s")
    return probe


async def arun_probe(store: Any, now: float, timeout: float, count: bool = True) -> _Probe:
    """``run_probe`` for an async store."""
    import asyncio

    probe = _Probe()
    perf = time.perf_counter
    times: list[float] = []

    async def work() -> list[Any]:
        results = []
        for step in probe_steps(now, count):
            result = step(store)
            results.append(await result if asyncio.iscoroutine(result) else result)
            times.append(perf())
        return results

    start = perf()
    try:
        results = await asyncio.wait_for(work(), timeout)
    except TimeoutError:
        return _Probe(error=f"no answer within {timeout:g}s")
    except Exception as exc:  # any failure of the store is "down", with its class
        return _Probe(error=_describe(exc))
    _fill(probe, results, times[1] - start, times[2] - times[1])
    return probe


def _fill(probe: _Probe, results: list[Any], latency: float, count_time: float) -> None:
    # ``latency`` is the get and the job listing: a count of 1M leases is slow
    # by nature (see SLOW_COUNT) and must not read as a slow store.
    probe.reachable = True
    probe.latency = latency
    _, parked, active = results
    probe.parked = None if parked is None else len(parked)
    probe.active = active if isinstance(active, int) else None
    probe.count_time = count_time if probe.active is not None else None


def _describe(exc: BaseException) -> str:
    # StoreError messages are ours and carry no secret (a URL's password never
    # reaches them); anything else is named by its class only.
    if isinstance(exc, StoreError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def attributes_of(metrics: Metrics) -> Mapping[str, dict[Attrs, int]]:
    """Every count by instrument and attributes (a snapshot, for tests and debugging)."""
    with metrics._lock:
        return {name: dict(counts) for name, counts in metrics._counts.items()}
