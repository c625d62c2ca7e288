"""The edge's one hop to the payments actor (``actors.payments.actor``).

The front checks a payments request's token and scope, then hands the request to
``PaymentsLink``, which forwards it over the data-plane channel (``actors.channel``) and
returns the payments actor's answer unchanged. The front does no payments work beyond
copying bytes, and knows nothing of the engine.

While the payments actor is down or starting, a call fails within ``connect_timeout_s``
with ``Unavailable`` (the edge answers 503 with ``Retry-After``). A call whose connection
breaks mid-way is answered the same: whether it ran is unknown, and the client's retry with
the same Idempotency-Key either replays its answer or finds it in progress.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from actors.channel import ChannelBroken, ChannelClient
from actors.names import NAMESPACE
from actors.payments import PAYMENTS_ACTOR_NAME
from processor.errors import LedgerError, Unavailable

__all__ = ["PaymentsLink"]

CONNECT_TIMEOUT_S = 1.0
# Far above any payment's own deadlines (provider calls, the ledger lanes); a bound on a
# payments actor that hangs without dying.
CALL_TIMEOUT_S = 120.0


class PaymentsLink:
    """Calls the payments actor's ``call`` and ``webhook`` (``PaymentsEndpoint``)."""

    def __init__(self, channel_key: bytes, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._handle: Any = None
        self._connect_timeout_s = connect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._channel = ChannelClient(self._resolve, channel_key,
                                      connect_timeout_s=connect_timeout_s)

    async def call(self, principal: str, operation: str, key: str, subject_id: str,
                   body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        return await self._forward("call", principal, operation, key, subject_id, body,
                                   headers)

    async def webhook(self, provider: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, bytes, dict[str, str]]:
        return await self._forward("webhook", provider, headers, body)

    def close(self) -> None:
        self._channel.close()

    async def _forward(self, method: str, *args: Any) -> tuple[int, bytes, dict[str, str]]:
        try:
            await self._channel.connect(self._connect_timeout_s)
            status, body, headers = await asyncio.wait_for(
                self._channel.call(method, *args), self._call_timeout_s)
        except LedgerError:
            raise  # the payments actor's own: starting, or the ledger or database away
        except (ChannelBroken, TimeoutError) as exc:
            raise Unavailable("payments are unavailable; send the request again",
                              retry_after_s=1.0) from exc
        return int(status), bytes(body), dict(headers)

    async def _resolve(self) -> tuple[str, int]:
        try:
            if self._handle is None:
                self._handle = ray.get_actor(PAYMENTS_ACTOR_NAME, namespace=NAMESPACE)
            host, port = await self._handle.endpoint.remote()
        except Exception as exc:  # no such actor, or it died: ask again next time
            self._handle = None
            raise ChannelBroken(f"the payments actor cannot be reached: {exc!r}") from exc
        return str(host), int(port)
