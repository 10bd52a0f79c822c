"""``WSGIBearer``: the same gate as ``BearerAuth``, for WSGI apps (Flask, Django, ...).

It imports no framework: Flask wraps ``app.wsgi_app``, Django wraps the
``application`` of its ``wsgi.py``. Verification is the synchronous
``verifier.verify``, on the server's worker thread.

A WSGI server joins repeated headers into one value with commas (PEP 3333
follows CGI), so two ``Authorization`` headers arrive as one that is not a
``b64token``: still a 400, as over ASGI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from .._drive import run
from ..verify import Verifier
from .gate import CLAIMS_KEY, GATE_KEY, Gate, Location, RequestView
from .nonces import DPoPNonces
from .proxies import Network, quoted_path

__all__ = ["WSGIBearer", "wsgi_location", "wsgi_view"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

_KEYS = (
    ("HTTP_AUTHORIZATION", "authorization"),
    ("HTTP_DPOP", "dpop"),
    ("HTTP_HOST", "host"),
    ("HTTP_FORWARDED", "forwarded"),
    ("HTTP_X_FORWARDED_PROTO", "x-forwarded-proto"),
    ("HTTP_X_FORWARDED_HOST", "x-forwarded-host"),
)


class WSGIBearer:
    """Verify the access token of every request to a WSGI app.

    The verified ``Claims`` go in ``environ["jitbroker.claims"]`` (Flask:
    ``request.environ``, Django: ``request.META``). The arguments are
    ``BearerAuth``'s; ``exempt`` paths are matched against ``PATH_INFO``.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        verifier: Verifier,
        audience: str | None = None,
        scopes: Iterable[str] | str = (),
        realm: str | None = None,
        exempt: Iterable[str] = (),
        trusted_proxies: Iterable[str | Network] = (),
        public_url: str | None = None,
        dpop_nonces: DPoPNonces | None = None,
        dpop: bool = True,
        retry_after: int = 5,
    ) -> None:
        self.app = app
        self.gate = Gate(
            verifier,
            audience=audience,
            scopes=scopes,
            realm=realm,
            exempt=exempt,
            trusted_proxies=trusted_proxies,
            public_url=public_url,
            dpop_nonces=dpop_nonces,
            dpop=dpop,
            retry_after=retry_after,
        )
        self._verify = verifier.verify

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        gate = self.gate
        environ[GATE_KEY] = gate
        if gate.exempt(environ.get("PATH_INFO") or "/"):
            return self.app(environ, start_response)
        outcome = run(gate.steps(wsgi_view(environ)), self._verify)
        response = outcome.response
        if response is not None:
            status = f"{response.status} {HTTPStatus(response.status).phrase}"
            start_response(status, [*response.headers, ("Content-Length", str(len(response.body)))])
            return [response.body]
        environ[CLAIMS_KEY] = outcome.claims
        if outcome.headers:
            start_response = _adding(start_response, list(outcome.headers))
        return self.app(environ, start_response)


def wsgi_view(environ: Environ) -> RequestView:
    """The ``RequestView`` of a WSGI environ."""
    headers = {name: [environ[key]] for key, name in _KEYS if key in environ}
    return RequestView(environ.get("REQUEST_METHOD", "GET"), headers, environ, wsgi_location)


def wsgi_location(environ: Environ) -> Location:
    """Where a WSGI request went."""
    # The raw request target, when the server keeps it (werkzeug, gunicorn, uWSGI).
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    path = raw.partition("?")[0]
    if not path.startswith("/"):
        path = quoted_path(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
    return Location(
        "https" if environ.get("wsgi.url_scheme") == "https" else "http",
        path,
        f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}".rstrip(":"),
        environ.get("REMOTE_ADDR"),
    )


def _adding(start_response: StartResponse, extra: list[tuple[str, str]]) -> StartResponse:
    def starting(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
        return start_response(status, [*headers, *extra], *args)

    return starting
