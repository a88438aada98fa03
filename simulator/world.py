"""The simulated world: APNs, FCM (+OAuth), HMS (+OAuth) and a Web Push service behind one dispatch.

`Simulator.handle` maps one request (method, path, headers, body) to one `SimResponse`; the fronts
(fast.py, strict.py) only move bytes and honour `delay` and `drop`. The providers share one state
(core.py), so one admin API counts every send, whichever provider it went to.

The send paths are hot (the fast front must sustain >20k req/s on two cores shared with the
client): verified JWTs and VAPID headers are cached by their exact string, so each distinct
credential costs one signature check, and a request is otherwise a handful of dict operations.
"""

from __future__ import annotations

from simulator.apns import Apns, ClientCert
from simulator.core import TEXT, Headers, SimResponse
from simulator.fcm import Fcm
from simulator.hms import Hms
from simulator.webpush import WebPush


class Simulator(Apns, Fcm, Hms, WebPush):
    """One provider world: APNs, FCM (+OAuth), HMS (+OAuth) and a Web Push service."""

    def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        scheme: str,
        authority: str,
        client_cert: ClientCert | None = None,
    ) -> SimResponse:
        if path.startswith("/3/device/"):
            self.requests += 1
            if client_cert is not None and not headers.get("authorization"):
                return self._apns_certificate(method, path[10:], headers, body, client_cert)
            return self._apns(method, path[10:], headers, body)
        if path.startswith("/v1/"):
            self.requests += 1
            if path.startswith("/v1/projects/"):
                return self._fcm(method, path, headers, body)
            return self._hms(method, path, headers, body)
        if path.startswith("/wp/"):
            self.requests += 1
            return self._webpush(method, path[4:], headers, body, scheme, authority)
        if path == "/token":
            self.requests += 1
            return self._fcm_oauth(method, body, scheme, authority)
        if path == "/oauth2/v3/token":
            self.requests += 1
            return self._hms_oauth(method, body)
        if path.startswith("/_sim/"):
            return self._admin(method, path[6:], query, body)
        return SimResponse(404, TEXT, b"not found\n")
