"""A broker in another OS process, driven by tests/test_keys_across_processes.py.

    python tests/keys_worker.py STORE_URL KEY_DIR

runs a ``Broker`` on the store STORE_URL whose ring follows KEY_DIR (polled
every 50 ms, reaper every 50 ms), behind a loopback HTTP server, and prints
``ready PORT``. Routes: ``GET /jwks``, ``GET /state`` (the kids held and the
signer), ``POST /issue`` (a token), ``POST /verify`` (the token as the body:
``ok`` or the error class). It runs until stdin closes.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jitbroker import Broker, KeyRing
from jitbroker.errors import InvalidToken
from jitbroker.stores import open_store

ISSUER = "urn:jitbroker:keys-test"


def main(url: str, folder: str) -> None:
    keys = KeyRing.from_dir(folder, follow=True, poll_interval=0.05)
    broker = Broker(issuer=ISSUER, keys=keys, store=open_store(url), reap_interval=0.05)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/jwks":
                self.answer(broker.jwks())
            else:
                self.answer({"keys": sorted(k.kid for k in keys), "active": keys._active})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"] or 0)).decode()
            if self.path == "/issue":
                cred = broker.issue("svc:a", "api", ttl=60)
                self.answer({"token": cred.token, "kid": cred.lease.key_id})
                return
            try:
                broker.verify(body, audience="api")
            except InvalidToken as exc:
                self.answer({"outcome": type(exc).__name__})
            else:
                self.answer({"outcome": "ok"})

        def answer(self, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with broker:
        print(f"ready {server.server_address[1]}", flush=True)
        sys.stdin.read()  # until the test closes it
    server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
