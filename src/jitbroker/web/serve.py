"""``jitbroker serve``: ``broker_app`` under uvicorn, from a ``jitbroker.toml``.

Loopback (``127.0.0.1``) by default. A non-loopback address is refused
without TLS (``tls_cert`` + ``tls_key``) unless ``insecure_http`` is set, for
a service that sits behind a TLS-terminating proxy: tokens and assertions
cross this socket. ``tls_ca`` requires client certificates signed by that CA.

One worker runs the app in this process, with the broker's reaper thread.
With ``workers > 1`` uvicorn starts that many processes, each building its own
broker from the same config (``app_factory``): the store must be shared
(SQLite on one host, Redis or PostgreSQL), and the DPoP and assertion replay
caches are per process (see docs/service.md). With ``dpop_nonces`` the
workers share one nonce secret: ``$JITBROKER_DPOP_NONCE_SECRET`` if set (set
it on every replica of a service behind one name), else a random one made by
``serve`` and handed to its workers.

``[serve] metrics = true`` adds ``GET /metrics`` (Prometheus text, through
OpenTelemetry's Prometheus exporter on a registry of this app's own; needs
``jitbroker[otel]``) and ``health = true`` adds ``GET /healthz`` (the broker's
``health()`` as JSON: 200 when ok or degraded, 503 when down). Both are for
the operator's network: put them behind the proxy's access rules (see
docs/metrics.md). With several workers each has its own counts: scrape each.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..broker import Broker
from ..config import load_config
from ..errors import InvalidRequest
from .config import ServeSettings, clients_from, serve_settings, trust_rules
from .nonces import DPoPNonces
from .service import BrokerService
from .trust import Trust

__all__ = ["app_factory", "build", "check_binding", "serve"]

log = logging.getLogger("jitbroker.web")
#: Where ``app_factory`` (one per worker process) finds the config.
CONFIG_VAR = "JITBROKER_SERVE_CONFIG"
#: The DPoP nonce secret every worker and replica must share (>= 16 bytes of text).
NONCE_SECRET_VAR = "JITBROKER_DPOP_NONCE_SECRET"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(settings: ServeSettings) -> None:
    """Refuse a non-loopback address without TLS (unless ``insecure_http``)."""
    if is_loopback(settings.host) or settings.tls_cert is not None or settings.insecure_http:
        return
    raise InvalidRequest(
        f"refusing to serve on {settings.host} over plain HTTP: set [serve] tls_cert and "
        "tls_key, or pass --insecure-http (only behind a proxy that terminates TLS)"
    )


def build(config_path: str | os.PathLike[str]) -> tuple[Broker, Starlette, ServeSettings]:
    """The broker, the app and the settings a config file describes."""
    config = load_config(config_path)
    settings = serve_settings(config)
    rules = [*trust_rules(config), *clients_from(config)]
    if not rules:
        raise InvalidRequest(f"{config.path}: no [[trust]] or [[clients]]: nobody could call")
    exporter = _exporter(settings)  # before the store opens: a missing extra opens nothing
    closing: list[Any] = [] if exporter is None else [exporter.provider]
    try:
        broker = config.open_broker(
            metrics=None if exporter is None else exporter.metrics,
            lease_warning_threshold=settings.lease_warning_threshold,
        )
    except BaseException:
        _shut_down(closing)
        raise
    if broker.issuer.rstrip("/") != settings.base_url:
        log.warning(
            "[broker] issuer %r is not [serve] base_url %r: RFC 9068 verifiers that read"
            " the metadata expect the tokens' iss to be the authorization server's issuer",
            broker.issuer,
            settings.base_url,
        )
    try:
        trust = Trust(rules, token_endpoint=settings.base_url + "/token", clock=broker.clock)
        nonces = _nonces(settings, broker)
        service = BrokerService(broker, trust, dpop_nonces=nonces, **settings.app_options())
    except BaseException:
        broker.close()
        _shut_down(closing)
        raise
    routes = _operations(settings, broker, exporter)
    app = Starlette(routes=[*service.routes(), *routes], lifespan=_lifespan(broker, trust, closing))
    app.state.service = service
    return broker, app, settings


def _nonces(settings: ServeSettings, broker: Broker) -> DPoPNonces | None:
    if not settings.dpop_nonces:
        return None
    shared = os.environ.get(NONCE_SECRET_VAR)
    if shared is not None and len(shared.encode()) < 16:
        raise InvalidRequest(f"{NONCE_SECRET_VAR} must hold at least 16 bytes")
    return DPoPNonces(secret=None if shared is None else shared.encode(), clock=broker.clock)


@attrs.frozen
class _Exporter:
    """``[serve] metrics``: a meter provider of the app's own whose Prometheus
    reader writes to a registry of its own (not prometheus_client's global one:
    two apps in a process must not mix their series), and the broker's Metrics."""

    provider: Any
    registry: Any
    metrics: Any


def _exporter(settings: ServeSettings) -> _Exporter | None:
    if not settings.metrics:
        return None
    from ..metrics import Metrics

    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise InvalidRequest(
            "[serve] metrics = true needs the OpenTelemetry SDK and Prometheus exporter:"
            " pip install 'jitbroker[otel]'"
        ) from None
    registry = CollectorRegistry()
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)], shutdown_on_exit=False
    )
    return _Exporter(provider, registry, Metrics(provider))


def _shut_down(providers: list[Any]) -> None:
    for provider in providers:
        provider.shutdown()


def _operations(settings: ServeSettings, broker: Broker, exporter: _Exporter | None) -> list[Route]:
    """The ``/metrics`` and ``/healthz`` routes the settings ask for."""
    routes: list[Route] = []
    if exporter is not None:
        routes.append(Route("/metrics", _prometheus(exporter.registry), methods=["GET"]))
    if settings.health:

        async def healthz(request: Request) -> Response:
            health = await run_in_threadpool(broker.health)  # the probe may block
            status = 503 if health.status == "down" else 200
            headers = {"Cache-Control": "no-store"}
            return JSONResponse(health.to_dict(), status_code=status, headers=headers)

        routes.append(Route("/healthz", healthz, methods=["GET"]))
    return routes


def _prometheus(registry: Any) -> Any:
    """The ``/metrics`` endpoint: ``registry`` in Prometheus's text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics


def _lifespan(broker: Broker, trust: Trust, closing: list[Any]) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        broker.start()  # the reaper: leases expire on time, hooks run
        try:
            yield
        finally:
            broker.stop()
            trust.close()
            _shut_down(closing)

    return lifespan


def app_factory() -> Starlette:
    """The app of one worker process (``uvicorn --factory``), from ``$JITBROKER_SERVE_CONFIG``."""
    path = os.environ.get(CONFIG_VAR)
    if not path:
        raise InvalidRequest(f"{CONFIG_VAR} is not set")
    return build(path)[1]


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn's settings: TLS passed through, no proxy headers believed (the
    service's URLs come from ``base_url``), no server banner."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # Off by default: a client that puts a secret in a URL (refused, but
        # only once the line is logged) must not leave it in the access log.
        "access_log": settings.access_log,
        "proxy_headers": False,
        "server_header": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    if settings.tls_cert is not None:
        options["ssl_certfile"] = str(settings.tls_cert)
        options["ssl_keyfile"] = str(settings.tls_key)
    if settings.tls_ca is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal
    again for the handler it found. Found here: one that does nothing, so the
    store is closed after it and the process exits 0 (a clean stop for systemd
    and container runtimes alike)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _stopped) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(sig: int, frame: object) -> None:
    log.info("stopped by signal %d", sig)


@contextlib.contextmanager
def _closing(broker: Broker) -> Iterator[None]:
    try:
        yield
    finally:
        broker.close()


def serve(
    config_path: str | os.PathLike[str],
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    insecure_http: bool = False,
) -> bool:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown), then close the
    store; False if the server could not start (the port is taken, say).

    ``host``, ``port`` and ``workers`` override the ``[serve]`` table. The
    binding is checked before anything is opened.
    """
    import uvicorn

    path = Path(config_path).absolute()
    settings = serve_settings(load_config(path))
    changes: dict[str, Any] = {"insecure_http": settings.insecure_http or insecure_http}
    for name, value in (("host", host), ("port", port), ("workers", workers)):
        if value is not None:
            changes[name] = value
    settings = attrs.evolve(settings, **changes)
    check_binding(settings)
    options = uvicorn_options(settings)
    if settings.workers > 1:
        log.warning(
            "%d workers: replay caches (DPoP proofs, assertions) are per process",
            settings.workers,
        )
        os.environ[CONFIG_VAR] = str(path)
        if settings.dpop_nonces:  # one secret for all workers, or none accepts another's
            os.environ.setdefault(NONCE_SECRET_VAR, os.urandom(32).hex())
        uvicorn.run(
            "jitbroker.web.serve:app_factory", factory=True, workers=settings.workers, **options
        )
        return True
    broker, app, _ = build(path)
    with _closing(broker):
        server = uvicorn.Server(uvicorn.Config(app, **options))
        try:
            with _stopped_by_signals():
                server.run()
        except SystemExit:  # uvicorn's own exit when it cannot bind (it logged why)
            return False
        return bool(server.started)
