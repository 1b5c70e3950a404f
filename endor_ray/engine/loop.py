"""Many requests, one engine: a thread steps the engine while requests come and go.

`EngineLoop.submit(prompts, params)` checks the request (a ConfigError or QueueFull at once, in
the caller's thread), queues its sequences, and returns a `Request` whose events arrive as the
passes produce them:

    {"index", "token_id", "text"[, "logprob"]}    text of sequence `index` that became final
    {"index", "completion": {...}}                sequence `index` finished (text, token ids, reason)
    {"completions": [...], "stats": {...}}        the whole request finished (last event)
    {"error": "..."}                              the engine failed; the request is over

(the first two from `results.sequence_events`, as `Engine.stream_data` sends them).

Events go to the request's `sink`, a callable run on the stepping thread (an asyncio consumer
passes `loop.call_soon_threadsafe` wrapped around its queue's put), or by default into a
thread-safe queue read with `Request.events()`. `cancel(request)` lets its sequences go at the
next pass. The loop sleeps while there is nothing to do. Used by the Ray GPU worker and by any
in-process server; plain threads, no Ray.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from endor_ray.engine.engine import Engine
from endor_ray.engine.results import RequestTracker, sequence_events
from endor_ray.engine.sampling import SamplingParams
from endor_ray.engine.sequence import Sequence
from endor_ray.errors import EndorError

Sink = Callable[[dict[str, Any]], None]


class Request:
    """One submitted request: its sequences, where its events go, its stats."""

    _ids = itertools.count()

    def __init__(self, sequences: list[Sequence], sink: Sink | None):
        self.id = next(self._ids)
        self.sequences = sequences
        self.index = {id(seq): position for position, seq in enumerate(sequences)}
        self._queue: queue.SimpleQueue | None = None if sink is not None else queue.SimpleQueue()
        self.sink: Sink = sink if sink is not None else self._queue.put
        self.tracker: RequestTracker | None = None
        self.done = False

    def events(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """The events, until the last one (only without a sink)."""
        while True:
            try:
                event = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                raise EndorError(f"no event from the engine within {timeout_s:.0f} s") from None
            yield event
            if "completions" in event or "error" in event:
                return


class EngineLoop:
    """Steps `engine` on a thread of its own while any request has work."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._requests: dict[int, Request] = {}
        self._owner: dict[int, Request] = {}  # id(sequence) -> its request
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="endor-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
               sink: Sink | None = None) -> Request:
        """Queue a request (ConfigError, QueueFull: raised here, nothing queued)."""
        if self._closed:
            raise EndorError("the engine is shut down")
        sequences = self.engine.new_sequences(prompts, params)
        request = Request(sequences, sink)
        with self._lock:
            self.engine.add(sequences)
            self._requests[request.id] = request
            for seq in sequences:
                self._owner[id(seq)] = request
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        """The request's sequences leave at the next pass (its last event still comes)."""
        self.engine.cancel(request.sequences)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        return engine.metrics.to_dict(waiting=len(engine.scheduler), running=len(engine.batch.rows))

    def _run(self) -> None:
        while not self._closed:
            if not self.engine.has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            with self._lock:
                for request in self._requests.values():
                    if request.tracker is None:
                        request.tracker = RequestTracker(self.engine, request.sequences)
            try:
                events = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - the engine itself failed: every request learns it
                self._fail_all(f"generation failed: {exc}")
                continue
            self._deliver(events)

    def _deliver(self, events: list) -> None:
        touched = {}
        for seq, token_id, text in events:
            request = self._owner.get(id(seq))
            if request is None:
                continue
            for event in sequence_events(seq, request.index[id(seq)], token_id, text):
                self._send(request, event)
            touched[request.id] = request
        for request in touched.values():
            if request.tracker is not None:
                request.tracker.stepped()
            if all(seq.finished for seq in request.sequences):
                self._complete(request)

    def _send(self, request: Request, event: dict[str, Any]) -> None:
        try:
            request.sink(event)
        except Exception:  # noqa: BLE001 - its consumer is gone (a closed event loop): stop its work
            self.engine.cancel(request.sequences)

    def _complete(self, request: Request) -> None:
        request.done = True
        self._send(request, request.tracker.result().to_dict())
        with self._lock:
            self._requests.pop(request.id, None)
            for seq in request.sequences:
                self._owner.pop(id(seq), None)

    def _fail_all(self, message: str) -> None:
        """After an engine failure: every request ends with the error; the batch starts afresh."""
        from endor_ray.engine.kv_batch import RunningBatch

        with self._lock:
            requests = list(self._requests.values())
            self._requests.clear()
            self._owner.clear()
        for request in requests:
            self.engine.cancel(request.sequences)
            request.done = True
            self._send(request, {"error": message})
        self.engine.scheduler.take_cancelled()
        engine = self.engine
        engine.batch = RunningBatch(engine.device, engine.pad_id, engine.model_runner.new_cache)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=60)
