"""Signing requests to txproc's HTTP API with a client key: an ``httpx.Auth``.

A client that was given a client key (``txproc keys create-client`` prints it as JSON)
hands this to its httpx client, and every state-changing request is signed as the server
expects (processor/identity/signatures.py; docs/security.md, "Signed requests"): a fresh
``created`` and ``nonce`` each time the request is sent, so a retry is a new signature,
not a replay. The bearer token is set as usual; the signature covers it::

    auth = ClientKeyAuth.from_json(key_json)
    async with httpx.AsyncClient(base_url="https://txproc:8080", auth=auth,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        await http.post("/v1/transfers", json=transfer)

The binary RPC (processor.client) is not signed: its connection authenticates once with
the token's Hello and is protected in transit by TLS.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable, Generator, Iterable

import httpx

from processor.identity import CLIENT_SECRET_BYTES, sign_request

__all__ = ["SIGNED_METHODS", "ClientKeyAuth"]

# The methods of the API's state-changing routes; reads are not signed.
SIGNED_METHODS = frozenset({"POST"})
# 24 random bytes in URL-safe base64: 32 characters, within the server's nonce limits.
_NONCE_BYTES = 24


def _random_nonce() -> str:
    return secrets.token_urlsafe(_NONCE_BYTES)


class ClientKeyAuth(httpx.Auth):
    """Signs each request whose method is in ``methods`` with the client key ``key_id`` /
    ``secret``. ``clock_s`` gives seconds since the Unix epoch; ``nonce`` a fresh nonce."""

    requires_request_body = True

    def __init__(self, key_id: str, secret: bytes, *,
                 clock_s: Callable[[], float] = time.time,
                 nonce: Callable[[], str] = _random_nonce,
                 methods: Iterable[str] = SIGNED_METHODS) -> None:
        if len(secret) != CLIENT_SECRET_BYTES:
            raise ValueError(f"a client key's secret is {CLIENT_SECRET_BYTES} bytes")
        self._key_id = key_id
        self._secret = secret
        self._clock_s = clock_s
        self._nonce = nonce
        self._methods = frozenset(m.upper() for m in methods)

    @classmethod
    def from_json(cls, text: str) -> ClientKeyAuth:
        """The key as ``txproc keys create-client`` prints it (``key_id``, base64
        ``secret``). Raises ``ValueError`` for anything else."""
        try:
            fields = json.loads(text)
            return cls(fields["key_id"], base64.b64decode(fields["secret"], validate=True))
        except (KeyError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
            raise ValueError("not a client key: expected key_id and a base64 secret") from exc

    def __repr__(self) -> str:
        return f"ClientKeyAuth(key_id={self._key_id!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if request.method in self._methods:
            request.headers.update(sign_request(
                request.method, str(request.url), request.headers, request.content,
                key_id=self._key_id, secret=self._secret, created_s=int(self._clock_s()),
                nonce=self._nonce()))
        yield request
