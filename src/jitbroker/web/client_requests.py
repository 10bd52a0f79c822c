"""``BrokerAuth`` for ``requests``: ``session.auth = auth.requests()``.

Imported only by ``BrokerAuth.requests()``, so ``requests`` stays optional. The
twin shares its ``BrokerAuth``'s token, renewals, nonces and ``close()``; only
the plumbing differs: headers go on the ``PreparedRequest``, and a response
hook answers a ``use_dpop_nonce`` challenge by sending the request once more
(as ``requests``' own digest auth does).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import requests
import requests.auth

if TYPE_CHECKING:
    from .client import BrokerAuth
    from .renewal import Held

__all__ = ["RequestsBrokerAuth"]


class RequestsBrokerAuth(requests.auth.AuthBase):
    """A ``requests`` auth over a ``BrokerAuth``; made by ``BrokerAuth.requests()``."""

    def __init__(self, auth: BrokerAuth) -> None:
        self.auth = auth

    def __repr__(self) -> str:
        return f"<RequestsBrokerAuth {self.auth!r}>"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        held = self.auth.held()
        origin, sent = self._authorize(r, held, None)
        r.hooks["response"].append(
            functools.partial(self._answered, held=held, origin=origin, sent=sent)
        )
        return r

    def _authorize(
        self, r: requests.PreparedRequest, held: Held, nonce: str | None
    ) -> tuple[str | None, str | None]:
        r.headers["Authorization"] = held.header
        if self.auth._prover is None:
            return None, None
        proof, origin, sent = self.auth.proof(r.method or "", r.url or "", held, nonce)
        r.headers["DPoP"] = proof
        return origin, sent

    def _answered(
        self,
        response: requests.Response,
        *,
        held: Held,
        origin: str | None,
        sent: str | None,
        **send: Any,
    ) -> requests.Response:
        auth = self.auth
        retry = auth.answered(held, origin, response.status_code, response.headers, sent)
        body = response.request.body
        if retry is None or not (body is None or isinstance(body, bytes | str)):
            return response  # no challenge, or a streamed body that cannot be sent twice
        response.content  # noqa: B018 - read to the end, so the connection is reused
        response.close()
        again = response.request.copy()
        self._authorize(again, held, retry)
        # The adapter sends without running hooks: this one is not called again.
        second: requests.Response = response.connection.send(again, **send)
        second.history.append(response)
        second.request = again
        auth.answered(held, origin, second.status_code, second.headers, retry, last=True)
        return second
