"""A model of CUDA streams and events on the CPU, for checking the layer source's ordering.

It implements the interface of `endor_ray.engine.device.CudaOps` over CPU tensors. Operations run
at once (the data is real), but each is stamped with a vector clock that says what it is ordered
after under CUDA's rules, whatever the real timing:

- an operation enqueued on stream s happens after the earlier operations on s and after
  everything the host did before enqueuing it;
- `event.record(s)` captures s's clock; `s.wait_event(e)` orders s after it (an event never
  recorded orders nothing, as in CUDA); `e.synchronize()` and `synchronize()` order the host
  after it;
- host threads are one timeline in real order (a GPU operation cannot start before it is
  enqueued, whoever enqueued it).

Every access to a buffer (a tensor storage) is checked against the last write and the reads
since: a read must happen after the last write, a write after the last write and every read
since. Anything else is a race CUDA would allow, and is recorded in `races`.

`drop` names waits to skip, as ``"<event>@<waiter>"`` (waiter: a stream's name, or "host" for
`event.synchronize()`), so a test can remove one synchronisation and see the model catch the
race it guarded against.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict

import torch

from endor_ray.format.cpu_decode import decode_into

HOST = "host"


def _join(a: dict, b: dict) -> dict:
    return {key: max(a.get(key, 0), b.get(key, 0)) for key in a.keys() | b.keys()}


def _before(a: dict, b: dict) -> bool:
    """a happens before (or is) b."""
    return all(value <= b.get(key, 0) for key, value in a.items())


class ModelStream:
    def __init__(self, model: CudaModel, name: str):
        self.model, self.name, self.clock = model, name, {}

    def wait_event(self, event: ModelEvent) -> None:
        with self.model.lock:
            if f"{event.name}@{self.name}" in self.model.drop:
                self.model.dropped[f"{event.name}@{self.name}"] += 1
                return
            self.clock = _join(self.clock, event.clock)

    def synchronize(self) -> None:
        with self.model.lock:
            self.model.host_clock = _join(self.model.host_clock, self.clock)


class ModelEvent:
    def __init__(self, model: CudaModel, name: str):
        self.model, self.name, self.clock, self.recorded = model, name, {}, False

    def record(self, stream: ModelStream | None = None) -> None:
        with self.model.lock:
            stream = stream or self.model.current_stream()
            self.clock, self.recorded = dict(_join(stream.clock, self.model.host_clock)), True

    def synchronize(self) -> None:
        with self.model.lock:
            if f"{self.name}@{HOST}" in self.model.drop:
                self.model.dropped[f"{self.name}@{HOST}"] += 1
                return
            self.model.host_clock = _join(self.model.host_clock, self.clock)

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: ModelEvent) -> float:
        if not (self.recorded and end.recorded):  # CUDA raises on an event never recorded
            raise RuntimeError(f"elapsed_time on an unrecorded event ({self.name} -> {end.name})")
        return 0.0


class CudaModel:
    """Stands in for CudaOps: same calls, CPU tensors, vector clocks, race reports."""

    def __init__(self, drop: set[str] = frozenset()):
        self.lock = threading.RLock()
        self.drop = set(drop)
        self.dropped: dict[str, int] = defaultdict(int)
        self.host_clock: dict = {HOST: 1}
        self.default_stream = ModelStream(self, "compute")
        self._all_streams = [self.default_stream]
        self._current = threading.local()
        self._last_write: dict[int, tuple[dict, str]] = {}
        self._reads: dict[int, list[tuple[dict, str]]] = defaultdict(list)
        self._pinned: set[int] = set()
        self.races: list[str] = []
        self.accesses = 0
        self.events_created = 0

    # -- the CudaOps interface ---------------------------------------------------------------------

    def stream(self, name: str = "") -> ModelStream:
        with self.lock:
            stream = ModelStream(self, name or f"stream{len(self._all_streams)}")
            self._all_streams.append(stream)
            return stream

    def event(self, name: str = "", timing: bool = False) -> ModelEvent:
        self.events_created += 1
        return ModelEvent(self, name)

    def current_stream(self) -> ModelStream:
        return getattr(self._current, "stream", None) or self.default_stream

    @contextlib.contextmanager
    def use(self, stream: ModelStream):
        previous = getattr(self._current, "stream", None)
        self._current.stream = stream
        try:
            yield
        finally:
            self._current.stream = previous

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._device_op("copy", reads=[src], writes=[dst])
        dst.copy_(src)

    def decompress(self, enc, out: torch.Tensor) -> None:
        self._device_op("decompress", reads=list(enc.parts().values()), writes=[out])
        decode_into(enc, out)

    def stage(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.host_access("stage", reads=[src], writes=[dst])
        dst.copy_(src)

    def synchronize(self) -> None:
        with self.lock:
            for stream in self._all_streams:
                self.host_clock = _join(self.host_clock, stream.clock)

    def pinned_empty(self, nbytes: int) -> torch.Tensor:
        from endor_ray.engine.device import aligned_empty

        tensor = aligned_empty(nbytes)
        self._pinned.add(_key(tensor))
        return tensor

    def pin(self, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        self._pinned.add(_key(tensor))
        return tensor, True

    def unpin(self, tensor: torch.Tensor) -> None:
        self._pinned.discard(_key(tensor))

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return _key(tensor) in self._pinned

    # -- accesses ----------------------------------------------------------------------------------

    def compute(self, what: str, reads: list[torch.Tensor]) -> None:
        """The model's compute on the current stream, reading `reads` (a layer's weights)."""
        self._device_op(what, reads=reads, writes=[])

    def host_access(self, what: str, reads: list[torch.Tensor] = (), writes: list[torch.Tensor] = ()) -> None:
        with self.lock:
            self.host_clock = dict(self.host_clock)
            self.host_clock[HOST] += 1
            self._check(what, dict(self.host_clock), reads, writes)

    def _device_op(self, what: str, reads, writes) -> None:
        with self.lock:
            stream = self.current_stream()
            clock = _join(stream.clock, self.host_clock)
            clock[stream.name] = clock.get(stream.name, 0) + 1
            stream.clock = clock
            self._check(f"{what} on {stream.name}", clock, reads, writes)

    def _check(self, what: str, clock: dict, reads, writes) -> None:
        self.accesses += 1
        for tensor in reads:
            key = _key(tensor)
            last = self._last_write.get(key)
            if last is not None and not _before(last[0], clock):
                self.races.append(f"{what} reads a buffer that {last[1]} may still be writing")
            self._reads[key].append((clock, what))
        for tensor in writes:
            key = _key(tensor)
            last = self._last_write.get(key)
            if last is not None and not _before(last[0], clock):
                self.races.append(f"{what} overwrites a buffer that {last[1]} may still be writing")
            for read_clock, reader in self._reads[key]:
                if not _before(read_clock, clock):
                    self.races.append(f"{what} overwrites a buffer that {reader} may still be reading")
                    break
            self._last_write[key], self._reads[key] = (clock, what), []


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
