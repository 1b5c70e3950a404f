"""Where decoder layers come from while the model runs: three tiers and a prefetcher.

Tiers (as in M2Cache):

- device: the first layers that fit the GPU budget, decompressed once and kept resident;
- host:   compressed layer files held in host memory (pinned on CUDA), up to the host budget;
- disk:   the remaining layers, read from the store (memory-mapped) each time they run.

Streamed layers pass through ``prefetch_depth + 1`` slots. A slot owns a device buffer for one
compressed layer file and the dense tensors it decompresses into, so nothing is allocated per
layer per token. While layer i computes, the next d streamed layers (cyclically: after the last
layer come the first streamed layers of the next token) are read by one I/O thread, copied host
to device on a side CUDA stream and decompressed there by the Triton kernel. The compute stream
waits for a layer on a CUDA event, never on the host; a slot is refilled only after an event
recorded when the compute that used it finished.

Where the compressed bytes come from is a *reader*'s business: `StoreReader` holds the host tier
and reads the disk tier of a local store; the Ray service's reader asks shard servers. A reader's
`request` is issued when a fetch is scheduled (so several can be in flight, e.g. over the
network) and `resolve`d on the I/O thread.

On CPU the same slots and thread run; decompression uses the format's torch path.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from endor_ray.errors import ConfigError, EndorError
from endor_ray.format.tensor import EncodedTensor, decode
from endor_ray.store.store import Store, tensors_from_buffer
from endor_ray.engine.tiers import TIERS, TierPlan

class StoreReader:
    """Layer bytes from a local store: the host tier held in memory, the disk tier read on demand."""

    def __init__(self, store: Store, host_layers: tuple[int, ...], pin: bool, verify_disk_reads: bool = True,
                 progress: bool = True):
        self.store, self.verify_disk_reads = store, verify_disk_reads
        self._host: dict[int, torch.Tensor] = {}  # layer -> [nbytes] uint8, verified (pinned on CUDA)
        self._registered: list[torch.Tensor] = []
        for layer_idx in tqdm(host_layers, desc="load", unit="layer", disable=not progress):
            data = self.read(layer_idx, verify=True)
            self._host[layer_idx] = self._pin(data) if pin else data

    def _pin(self, data: torch.Tensor) -> torch.Tensor:
        """Page-lock `data` where it lies. (Tensor.pin_memory() would copy it into the caching host
        allocator, which rounds every block up to a power of two: up to 2x the host budget.)"""
        result = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), 1)  # portable
        if int(result) != 0:  # e.g. registration unsupported: fall back to a pinned copy
            return data.pin_memory()
        self._registered.append(data)
        return data

    def entry(self, layer_idx: int) -> dict:
        return self.store.layer_entry(layer_idx)

    def read(self, layer_idx: int, verify: bool = True) -> torch.Tensor:
        """A layer file from the store: [nbytes] uint8 on the host, checksum-verified if asked."""
        data = torch.from_numpy(self.store.layer_bytes(layer_idx, mmap=not verify))
        if verify:
            tensors_from_buffer(data, self.entry(layer_idx), verify=True)
        return data

    def request(self, layer_idx: int) -> int:
        return layer_idx

    def resolve(self, layer_idx: int) -> tuple[torch.Tensor, str]:
        """(bytes, tier) for a requested layer."""
        if layer_idx in self._host:
            return self._host[layer_idx], "host"
        return self.read(layer_idx, verify=self.verify_disk_reads), "disk"

    def close(self) -> None:
        for data in self._registered:
            torch.cuda.cudart().cudaHostUnregister(data.data_ptr())
        self._registered.clear()
        self._host.clear()


@dataclass
class SourceStats:
    """What the layer source did; times in seconds."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes_to_device: int = 0  # compressed bytes copied host -> device (CUDA), or decoded (CPU)
    read_s: float = 0.0  # obtaining layer bytes on the I/O thread (disk reads, network)
    transfer_s: float = 0.0  # host -> device copies (CUDA events)
    decompress_s: float = 0.0
    compute_s: float = 0.0  # between a layer's acquire and release
    stall_s: float = 0.0  # compute waiting for weights (host wait + GPU-side wait)
    _events: list[tuple[str, object, object]] = field(default_factory=list, repr=False)

    def resolve_events(self) -> None:
        """Fold recorded CUDA event pairs into the totals (call after a synchronize)."""
        for kind, start, end in self._events:
            setattr(self, f"{kind}_s", getattr(self, f"{kind}_s") + start.elapsed_time(end) / 1e3)
        self._events.clear()


@dataclass
class _Slot:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # dense, on the compute device
    compressed: torch.Tensor | None = None  # [max layer nbytes] uint8 on the GPU (CUDA only)
    staging: torch.Tensor | None = None  # [max layer nbytes] pinned uint8 for pageable sources, on first use
    ready: torch.cuda.Event | None = None  # decompressed (copy stream)
    free: torch.cuda.Event | None = None  # compute finished reading `weights`
    staged: torch.cuda.Event | None = None  # the copy out of `staging` finished


@dataclass
class _Fetch:
    slot: _Slot
    future: Future  # result: the tier the layer came from
    acquired_at: float = 0.0
    compute_start: object = None


class LayerSource:
    """Serves each decoder layer's dense weights on the compute device, prefetching ahead."""

    def __init__(
        self,
        reader,
        plan: TierPlan,
        device: torch.device,
        prefetch_depth: int = 2,
        timeout_s: float = 600.0,
        progress: bool = True,
    ):
        if prefetch_depth < 0:
            raise ConfigError(f"prefetch depth must be >= 0, got {prefetch_depth}")
        self.reader, self.plan, self.device = reader, plan, device
        self.cuda = device.type == "cuda"
        self.timeout_s = timeout_s
        self.prefetch_depth = prefetch_depth
        self.stats = SourceStats()
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        for layer_idx in tqdm(plan.device, desc="resident", unit="layer", disable=not progress or not plan.device):
            data, _ = reader.resolve(reader.request(layer_idx))
            self.resident[layer_idx] = self._decompress_all(data.to(device), layer_idx)

        self._streamed = plan.streamed
        self._position = {layer_idx: position for position, layer_idx in enumerate(self._streamed)}
        self._max_nbytes = max((reader.entry(i)["nbytes"] for i in self._streamed), default=0)
        self._free_slots: deque[_Slot] = deque(
            self._new_slot(self._max_nbytes) for _ in range(min(prefetch_depth + 1, len(self._streamed)))
        )
        self._in_flight: dict[int, _Fetch] = {}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-io") if self._streamed else None
        self._copy_stream = torch.cuda.Stream(device) if self.cuda and self._streamed else None

    # -- loading ---------------------------------------------------------------------------------

    def _decompress_all(self, data: torch.Tensor, layer_idx: int, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Dense weights of a layer from its file bytes (on the compute device), into `out` if given."""
        out = {} if out is None else out
        for name, enc in tensors_from_buffer(data, self.reader.entry(layer_idx), verify=False).items():
            buffer = out.get(name)
            if buffer is None or buffer.shape != torch.Size(enc.shape) or buffer.dtype != enc.dtype:
                buffer = out[name] = torch.empty(enc.shape, dtype=enc.dtype, device=self.device)
            _decompress(enc, buffer)
        return out

    def _new_slot(self, max_nbytes: int) -> _Slot:
        if not self.cuda:
            return _Slot()
        return _Slot(
            compressed=torch.empty(max_nbytes, dtype=torch.uint8, device=self.device),
            ready=torch.cuda.Event(enable_timing=False), free=torch.cuda.Event(), staged=torch.cuda.Event(),
        )

    # -- the I/O thread ----------------------------------------------------------------------------

    def _fetch(self, layer_idx: int, request, slot: _Slot) -> str:
        """Bring one streamed layer into `slot` (runs on the I/O thread); return its tier."""
        started = time.perf_counter()
        source, tier = self.reader.resolve(request)
        self.stats.read_s += time.perf_counter() - started
        nbytes = source.numel()
        self.stats.bytes_to_device += nbytes
        if not self.cuda:
            started = time.perf_counter()
            self._decompress_all(source, layer_idx, slot.weights)
            self.stats.decompress_s += time.perf_counter() - started
            return tier
        staged = not source.is_pinned()
        if staged:  # pageable memory (disk, network): through the slot's pinned staging buffer
            if slot.staging is None:
                slot.staging = torch.empty(self._max_nbytes, dtype=torch.uint8, pin_memory=True)
            slot.staged.synchronize()  # the previous copy out of it is done
            source = slot.staging[:nbytes].copy_(source)
        copied, started_event, done = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(slot.free)  # compute is done with the slot's last layer
            started_event.record()
            slot.compressed[:nbytes].copy_(source, non_blocking=True)
            copied.record()
            if staged:
                slot.staged.record()
            self._decompress_all(slot.compressed[:nbytes], layer_idx, slot.weights)
            done.record()
            slot.ready.record()
        self.stats._events += [("transfer", started_event, copied), ("decompress", copied, done)]
        return tier

    def _schedule(self, layer_idx: int) -> _Fetch:
        slot = self._free_slots.popleft()
        request = self.reader.request(layer_idx)  # issued now: several can be in flight
        fetch = _Fetch(slot, self._io.submit(self._fetch, layer_idx, request, slot))
        self._in_flight[layer_idx] = fetch
        return fetch

    def _drain(self) -> None:
        """Forget prefetches (asked for out of order, or after an error). Slots go back to the free
        list after their fetch ended: safe because one I/O thread runs fetches in order."""
        self.wait_idle()
        for fetch in self._in_flight.values():
            self._free_slots.append(fetch.slot)
        self._in_flight.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- the compute side --------------------------------------------------------------------------

    def acquire(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The layer's dense weights, ready for the compute stream; prefetches what follows."""
        if layer_idx in self.resident:
            return self.resident[layer_idx]
        fetch = self._in_flight.get(layer_idx)
        if fetch is None:
            self._drain()
            fetch = self._schedule(layer_idx)
        waited = time.perf_counter()
        try:
            tier = fetch.future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._drain()
            raise EndorError(
                f"layer {layer_idx} did not arrive within {self.timeout_s:.0f} s; check the store's "
                "storage (a slow or hung disk, object store or shard server)"
            ) from None
        except BaseException:
            self._drain()  # forget the failed fetch: the next request for the layer reads it anew
            raise
        self.stats.stall_s += time.perf_counter() - waited
        self.stats.hits[tier] += 1
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            wait_start = torch.cuda.Event(enable_timing=True)
            wait_start.record(stream)
            stream.wait_event(fetch.slot.ready)
            fetch.compute_start = torch.cuda.Event(enable_timing=True)
            fetch.compute_start.record(stream)
            self.stats._events.append(("stall", wait_start, fetch.compute_start))
        fetch.acquired_at = time.perf_counter()
        self._prefetch_after(layer_idx)
        return fetch.slot.weights

    def _prefetch_after(self, layer_idx: int) -> None:
        position = self._position[layer_idx]
        for ahead in range(1, self.prefetch_depth + 1):
            upcoming = self._streamed[(position + ahead) % len(self._streamed)]
            if upcoming in self._in_flight:
                continue
            if not self._free_slots:
                break
            self._schedule(upcoming)

    def release(self, layer_idx: int) -> None:
        """The compute that used the layer's weights has been issued; its slot may be refilled."""
        if layer_idx in self.resident:
            return
        fetch = self._in_flight.pop(layer_idx)
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            fetch.slot.free.record(stream)
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            self.stats._events.append(("compute", fetch.compute_start, end))
        else:
            self.stats.compute_s += time.perf_counter() - fetch.acquired_at
        self._free_slots.append(fetch.slot)

    def wait_idle(self) -> None:
        """Wait until every scheduled fetch has been issued (their stats are then complete)."""
        for fetch in list(self._in_flight.values()):
            try:
                fetch.future.result(timeout=self.timeout_s)
            except Exception:  # noqa: BLE001 - a failed prefetch reports itself when acquired
                pass

    def reset_stats(self) -> SourceStats:
        """Return the stats so far (CUDA events resolved) and start new ones."""
        self.wait_idle()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.stats.resolve_events()
        stats, self.stats = self.stats, SourceStats()
        return stats

    def close(self) -> None:
        """Stop the I/O thread (waiting for the fetch it runs) and drop the buffers."""
        if self._io is not None:
            self._io.shutdown(wait=True, cancel_futures=True)
            self._io = None
        if self.cuda:  # prefetches may still be copying into the buffers released below
            torch.cuda.synchronize(self.device)
        self._in_flight.clear()
        self.reader.close()
        self.resident.clear()


def _decompress(enc: EncodedTensor, out: torch.Tensor) -> None:
    if out.device.type == "cuda":
        from endor_ray.kernels.decompress import decompress

        decompress(enc, out=out)
    else:
        decode(enc, out=out)
