"""What ``Broker(metrics=Metrics(...))`` costs on issue and verify, per call.

    python benchmarks/metrics.py            # about 20 s
    python benchmarks/metrics.py --quick    # smoke run

Three brokers with the same keys, side by side in one process: metrics off
(the OpenTelemetry SDK is imported in this process, so this is also "the SDK
installed but metrics off": a broker without ``metrics=`` runs no metrics code
at all), metrics on with the SDK's in-memory reader, and metrics on with the
Prometheus exporter's reader. Each figure is the median over repeats of the
per-call time of a batch, the three brokers' batches interleaved so drift hits
them alike; ratios are each batch of "on" over the "off" batch run next to it.
Target (issue 13): on / off <= 1.10 on issue and verify.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from run import measure  # benchmarks/run.py: one timing loop for every benchmark

from jitbroker import Broker, KeyRing
from jitbroker.metrics import Metrics

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read"]
TARGET = 1.10


def brokers(token_format: str) -> dict[str, Broker]:
    keys = KeyRing.generate("EdDSA")
    memory = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    prometheus = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=CollectorRegistry())],
        shutdown_on_exit=False,
    )
    options = {"keys": keys, "token_format": token_format, "max_ttl": 86400}
    return {
        "off": Broker(**options),  # type: ignore[arg-type]
        "on (in-memory reader)": Broker(metrics=Metrics(memory), **options),  # type: ignore[arg-type]
        "on (Prometheus reader)": Broker(metrics=Metrics(prometheus), **options),  # type: ignore[arg-type]
    }


def issuing(broker: Broker) -> Callable[[], object]:
    def one() -> object:
        return broker.issue(SUBJECT, AUDIENCE, SCOPES, 600, task="job-42", owner="alice")

    return one


def verifying(broker: Broker) -> Callable[[], object]:
    token = broker.issue(SUBJECT, AUDIENCE, SCOPES, 3600).token
    return lambda: broker.verify(token, audience=AUDIENCE, scopes=SCOPES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke run)")
    args = parser.parse_args(argv)
    number, repeat = (200, 3) if args.quick else (2000, 15)
    worst = 0.0
    print(f"{'operation':<22} {'broker':<24} {'us/call':>9} {'ratio':>7}")
    for fmt in ("jws", "opaque"):
        for label, make in (("issue", issuing), ("verify", verifying)):
            cases = {name: make(broker) for name, broker in brokers(fmt).items()}
            for name, (seconds, ratio) in measure(cases, number, repeat).items():
                print(f"{label + ' ' + fmt:<22} {name:<24} {seconds * 1e6:>9.2f} {ratio:>6.3f}x")
                worst = max(worst, ratio)
    verdict = "ok" if worst <= TARGET else "OVER TARGET"
    print(f"worst on/off ratio {worst:.3f}x (target <= {TARGET:.2f}x): {verdict}")
    return 0 if args.quick or worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
