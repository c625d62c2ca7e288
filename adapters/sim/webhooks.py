"""Webhook delivery for the simulated providers: signed, retried, duplicated or reordered
on request, and batched when events queue up.

With ``batch_max`` above 1, the events waiting when a delivery starts, and those that
arrive within ``batch_linger_s`` of the first, go together in one request, up to
``batch_max`` (the provider's ``batch_body`` wraps them: acme a list object, globex an
``events`` array), as some providers send their notifications; one event alone goes as
before. A batch is signed and retried as one delivery, and its events are counted
delivered, or dead, together.

Sent with aiohttp over kept-alive connections: a provider sends an event for nearly every
operation, and with httpx the dispatcher spent about 1.5 ms of CPU per event, on the same
cores as the processor it was simulating for (the payments actor's provider client made
the same move: docs/design.md §14)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from adapters.sim.faults import FaultModel

__all__ = ["WebhookCounts", "WebhookDispatcher"]

log = logging.getLogger(__name__)

@dataclass(slots=True)
class WebhookCounts:
    emitted: int = 0
    delivered: int = 0
    attempts_failed: int = 0
    dead: int = 0  # gave up after attempts_max
    duplicated: int = 0
    reordered_batches: int = 0
    dropped: int = 0  # the queue was full
    batches: int = 0  # deliveries of more than one event


@dataclass(slots=True)
class _Delivery:
    event_id: str  # a batch's: its first event's, with the count
    body: bytes
    attempt: int = 0
    events: int = 1


class WebhookDispatcher:
    """Delivers signed events to one URL, in order unless told to reorder, with retries.

    ``sign(body, now_s)`` gives the provider's signature headers; it is called for every
    attempt, so a retried event carries a fresh timestamp (as real providers do). A failed
    attempt (no answer or a non-2xx answer) is retried after ``backoff_s``, doubling, up to
    ``attempts_max`` attempts in all; then the event is dead and counted.
    """

    def __init__(self, *, url: str, sign: Callable[[bytes, float], dict[str, str]],
                 faults: FaultModel, clock_s: Callable[[], float], attempts_max: int = 5,
                 backoff_s: float = 0.5, queue_max: int = 10_000, retries_max: int = 1_000,
                 timeout_s: float = 5.0, tls: ssl.SSLContext | None = None,
                 batch_max: int = 1,
                 batch_body: Callable[[list[bytes]], bytes] | None = None,
                 batch_linger_s: float = 0.0) -> None:
        if not (attempts_max >= 1 and queue_max >= 1 and retries_max >= 1 and batch_max >= 1):
            raise ValueError("webhook limits must be positive")
        if batch_max > 1 and batch_body is None:
            raise ValueError("batches need the provider's batch_body")
        self.url = url
        self._sign = sign
        # For an https URL: the receiver's CA, and a client certificate if it wants one.
        self._verify: ssl.SSLContext | bool = True if tls is None else tls
        self._faults = faults
        self._clock_s = clock_s
        self._attempts_max = attempts_max
        self._backoff_s = backoff_s
        self._retries_max = retries_max
        self._timeout_s = timeout_s
        self._batch_max = batch_max
        self._batch_body = batch_body
        self._batch_linger_s = batch_linger_s
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_max)
        self._retries: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None
        self.counts = WebhookCounts()

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def emit(self, event_id: str, body: bytes) -> None:
        if not self.enabled:
            return
        self.counts.emitted += 1
        try:
            self._queue.put_nowait(_Delivery(event_id, body))
        except asyncio.QueueFull:
            self.counts.dropped += 1
            log.warning("webhook queue full: event dropped")

    def pending(self) -> int:
        return self._queue.qsize() + len(self._retries)

    def reset(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        for task in list(self._retries):
            task.cancel()
        self.counts = WebhookCounts()

    async def run(self) -> None:
        """Deliver until cancelled."""
        if not self.enabled:
            return
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(ssl=self._verify)) as client:
            self._client = client
            try:
                while True:
                    batch = await self._next_batch()
                    await self._gather(batch, self._batch_max, self._batch_linger_s)
                    sends = []
                    for delivery in batch:
                        copies = 2 if self._faults.duplicate_webhook() else 1
                        self.counts.duplicated += copies - 1
                        sends += [_Delivery(delivery.event_id, delivery.body)] * copies
                    for group in self._grouped(sends):
                        await self._attempt(group)
            finally:
                for task in list(self._retries):
                    task.cancel()
                self._client = None

    async def _next_batch(self) -> list[_Delivery]:
        """The next event, or with reordering on, up to ``window`` events (or what arrived
        within the hold time) newest first."""
        first = await self._queue.get()
        window = self._faults.faults.webhook_reorder_window
        if window < 2:
            return [first]
        batch = [first]
        await self._gather(batch, window, self._faults.faults.webhook_reorder_hold_ms / 1000.0)
        if len(batch) > 1:
            self.counts.reordered_batches += 1
        batch.reverse()
        return batch

    async def _gather(self, batch: list[_Delivery], limit: int, hold_s: float) -> None:
        """Add to ``batch`` the events waiting, and those arriving within ``hold_s``, until
        it holds ``limit``."""
        deadline = time.monotonic() + hold_s
        while len(batch) < limit:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                return

    def _grouped(self, sends: list[_Delivery]) -> list[_Delivery]:
        """``sends`` as deliveries: one each, or in batches of up to ``batch_max``."""
        if self._batch_max == 1 or self._batch_body is None:
            return [_Delivery(d.event_id, d.body) for d in sends]
        out = []
        for at in range(0, len(sends), self._batch_max):
            part = sends[at:at + self._batch_max]
            out.append(_Delivery(part[0].event_id, part[0].body) if len(part) == 1 else
                       _Delivery(f"{part[0].event_id} (+{len(part) - 1})",
                                 self._batch_body([d.body for d in part]), events=len(part)))
        return out

    async def _attempt(self, delivery: _Delivery) -> None:
        client = self._client
        if client is None:
            return
        delivery.attempt += 1
        headers = {"content-type": "application/json",
                   **self._sign(delivery.body, self._clock_s())}
        try:
            async with client.post(self.url, data=delivery.body, headers=headers) as answer:
                await answer.read()
                ok = 200 <= answer.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            self.counts.delivered += delivery.events
            if delivery.events > 1:
                self.counts.batches += 1
            return
        self.counts.attempts_failed += 1
        if delivery.attempt >= self._attempts_max or len(self._retries) >= self._retries_max:
            self.counts.dead += delivery.events
            log.warning("webhook %s dead after %d attempts", delivery.event_id, delivery.attempt)
            return
        task = asyncio.get_running_loop().create_task(self._retry_later(delivery))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry_later(self, delivery: _Delivery) -> None:
        await asyncio.sleep(self._backoff_s * 2 ** (delivery.attempt - 1))
        await self._attempt(delivery)
