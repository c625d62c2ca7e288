"""Webhook delivery for the simulated providers: signed, retried, duplicated or reordered
on request.

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


@dataclass(slots=True)
class _Delivery:
    event_id: str
    body: bytes
    attempt: int = 0


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
                 timeout_s: float = 5.0, tls: ssl.SSLContext | None = None) -> None:
        if not (attempts_max >= 1 and queue_max >= 1 and retries_max >= 1):
            raise ValueError("webhook limits must be positive")
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
                    for delivery in batch:
                        copies = 2 if self._faults.duplicate_webhook() else 1
                        self.counts.duplicated += copies - 1
                        for _ in range(copies):
                            await self._attempt(_Delivery(delivery.event_id, delivery.body))
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
        deadline = time.monotonic() + self._faults.faults.webhook_reorder_hold_ms / 1000.0
        while len(batch) < window:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        if len(batch) > 1:
            self.counts.reordered_batches += 1
        batch.reverse()
        return batch

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
            self.counts.delivered += 1
            return
        self.counts.attempts_failed += 1
        if delivery.attempt >= self._attempts_max or len(self._retries) >= self._retries_max:
            self.counts.dead += 1
            log.warning("webhook %s dead after %d attempts", delivery.event_id, delivery.attempt)
            return
        task = asyncio.get_running_loop().create_task(self._retry_later(delivery))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry_later(self, delivery: _Delivery) -> None:
        await asyncio.sleep(self._backoff_s * 2 ** (delivery.attempt - 1))
        await self._attempt(delivery)
