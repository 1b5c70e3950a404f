"""Concurrent requests share passes over the weights: they are grouped into batches.

Offloaded inference pays for every pass over the weights, so the server never runs requests one
by one: a request that arrives while a batch is running waits for the next one, and every request
that arrives within `window_s` of the first joins the same batch (up to `max_batch_size`). One
batch runs at a time, on a thread, through a blocking `run_batch(prompts, params)` that yields
token events ``{"index", "token_id", "text"}`` and then ``{"completions", "stats"}`` (the engine's
and the Ray service's `stream`). Each request gets its own events back on an asyncio queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from endor_ray.engine.sampling import SamplingParams

RunBatch = Callable[[list[str], list[SamplingParams]], Iterator[dict]]


@dataclass
class _Request:
    prompt: str
    params: SamplingParams
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Batcher:
    """Runs submitted requests in batches; `submit` yields that request's events."""

    def __init__(self, run_batch: RunBatch, max_batch_size: int = 16, window_s: float = 0.02):
        self.run_batch, self.max_batch_size, self.window_s = run_batch, max_batch_size, window_s
        self._waiting: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-batch")
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # sequences served by each recent batch

    async def submit(self, prompt: str, params: SamplingParams) -> AsyncIterator[dict]:
        """Token events {"text", "token_id"}, then {"final": True, "completion", "batch_size"}."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        request = _Request(prompt, params)
        self._waiting.append(request)
        self._wake.set()
        while True:
            item = await request.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.get("final"):
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.window_s)  # let requests sent together arrive together
            batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size:]
            if not self._waiting:
                self._wake.clear()
            if batch:
                self.batch_sizes.append(len(batch))
                await loop.run_in_executor(self._thread, self._run, batch, loop)

    def _run(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        def send(request: _Request, item) -> None:
            loop.call_soon_threadsafe(request.events.put_nowait, item)

        try:
            for event in self.run_batch([r.prompt for r in batch], [r.params for r in batch]):
                if "completions" in event:
                    for request, completion in zip(batch, event["completions"]):
                        send(request, {"final": True, "completion": completion, "batch_size": len(batch)})
                else:
                    send(batch[event["index"]], {"text": event["text"], "token_id": event["token_id"]})
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            for request in batch:
                send(request, exc)

    def stats(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"batches": len(sizes), "sequences": sum(sizes),
                "mean_sequences_per_pass": sum(sizes) / len(sizes) if sizes else 0.0,
                "recent_batch_sizes": sizes[-20:]}

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
