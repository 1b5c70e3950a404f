"""Where decoder layers come from while the model runs: three tiers and a two-stage prefetcher.

Tiers (as in M2Cache):

- device: the first layers that fit the GPU budget, decompressed once and kept resident;
- host:   compressed layer files held in host memory (page-locked on CUDA), up to the host budget;
- disk:   the remaining layers, read from the store each time they run.

Streamed layers pass through ``prefetch_depth + 1`` slots. A slot owns everything one layer
needs on its way in, allocated once and reused: a host buffer the reader reads into (pinned on
CUDA), on CUDA a device buffer for the compressed file, and the dense weights. While layer i
computes, the next d streamed layers (cyclically: after the last come the first streamed layers
of the next token) move through two stages, each on its own thread:

1. read (I/O thread): the reader fills the slot's host buffer (disk, network) or hands over
   memory it holds (host tier);
2. transfer (transfer thread): on CPU the fast decoder expands the layer into the slot's dense
   weights (a dense INT8/INT4/Q8_0/Q4/Q5 tensor stays in its blocks, handed out as a
   `block_weight.BlockWeight` that small batches multiply from: `EngineConfig.cpu_matvec`); on
   CUDA the layer is copied host to device on the *copy* stream and decompressed by the Triton
   kernel on the *decompress* stream, so the copy engine moves layer i+1 while the SMs
   decompress layer i.

So a disk read, a decode and the compute of three different layers overlap. On CUDA nothing
waits on the host except the reuse of a slot's host buffer; the order is kept by events:

    copy stream:        wait ready(prev use)  -> copy host->compressed -> record copied, host_free
    decompress stream:  wait copied, wait free -> decompress -> record ready
    compute stream:     wait ready -> run the layer -> record free          (engine, via hooks)
    I/O thread:         host_free.synchronize() before the reader writes the host buffer again

Which layers are in flight and which come next is `utils.prefetch.Prefetcher`'s bookkeeping (the
calibration passes' prefetcher shares it): a layer asked for out of order drops the guesses.
`tests/test_stream_order.py` runs this code under a model of CUDA's streams and events and
checks every slot access against happens-before.
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from endor_ray.engine.block_weight import BlockWeight
from endor_ray.engine.config import EngineConfig
from endor_ray.engine.device import CudaOps, aligned_empty
from endor_ray.engine.source_stats import SlotTiming, SourceStats
from endor_ray.engine.tiers import TierPlan
from endor_ray.errors import EndorError
from endor_ray.format.cpu_decode import decode_into
from endor_ray.format.cpu_matvec import has_matvec
from endor_ray.store.store import tensors_from_buffer
from endor_ray.utils.prefetch import Prefetcher


@dataclass
class _Slot:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # dense, on the compute device
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # decoded in the store's dtype, to widen
    host: torch.Tensor | None = None  # [buffer nbytes] uint8 host buffer for reads, pinned on CUDA
    compressed: torch.Tensor | None = None  # [max layer nbytes] uint8 on the GPU (CUDA only)
    copied: object = None  # CUDA events: the compressed file is on the device (copy stream)
    ready: object = None  # the dense weights are written (decompress stream)
    free: object = None  # the compute reading the weights finished (compute stream)
    host_free: object = None  # the copy out of `host` finished (copy stream)
    timing: SlotTiming | None = None


@dataclass
class _Fetch:
    slot: _Slot
    done: Future  # result: the tier the layer came from
    acquired_at: float = 0.0


class LayerSource:
    """Serves each decoder layer's dense weights on the compute device, prefetching ahead."""

    def __init__(self, reader, plan: TierPlan, device: torch.device, config: EngineConfig | None = None, *,
                 ops: CudaOps | None = None, progress: bool = True):
        """`config` (default: EngineConfig()) gives the prefetch depth, the fetch timeout, the CPU
        decode's threads and the dtype of the dense weights handed out (converted after decoding;
        None: the store's); `ops` replaces the CUDA operations (tests pass a model of CUDA)."""
        config = config or EngineConfig()
        self.reader, self.plan, self.device = reader, plan, device
        self.ops = ops if ops is not None else CudaOps(device) if device.type == "cuda" else None
        self.timeout_s, self.prefetch_depth = config.fetch_timeout_s, config.prefetch_depth
        self.compute_dtype = getattr(torch, config.compute_dtype) if config.compute_dtype else None
        self.decode_threads = config.decode_threads or os.cpu_count() or 1
        self.keep_blocks = self.ops is None and config.cpu_matvec  # CPU: products from the blocks (block_weight)
        self.stats = SourceStats()
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        self._streamed = plan.streamed
        # The streamed layers in flight (read, transferred, or in use until released)
        self._prefetcher: Prefetcher[_Fetch] = Prefetcher(self._streamed, self.prefetch_depth, self._schedule,
                                                          self._forget)
        self._free_slots: deque[_Slot] = deque()
        self._io = self._transfer = None
        try:
            for layer_idx in tqdm(plan.device, desc="resident", unit="layer", disable=not progress or not plan.device):
                self.resident[layer_idx] = self._load_resident(layer_idx)
            self._buffer_nbytes = max((reader.buffer_nbytes(i) for i in self._streamed), default=0)
            self._free_slots.extend(self._new_slot() for _ in range(min(self.prefetch_depth + 1, len(self._streamed))))
            if self._streamed:
                self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-read")
                self._transfer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-transfer")
                if self.ops is not None:
                    self._copy_stream, self._decompress_stream = self.ops.stream("copy"), self.ops.stream("decompress")
        except BaseException:
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------------------------

    def _load_resident(self, layer_idx: int) -> dict[str, torch.Tensor]:
        data, _ = self.reader.resolve(self.reader.request(layer_idx), aligned_empty(self.reader.buffer_nbytes(layer_idx)))
        weights: dict[str, torch.Tensor] = {}
        if self.ops is None:
            self._decode(data, layer_idx, weights)
            return weights
        compressed = torch.empty(data.numel(), dtype=torch.uint8, device=self.device)
        self.ops.copy(compressed, data)
        self._decode(compressed, layer_idx, weights)
        self.ops.synchronize()  # `data` may be a buffer that is gone after this call
        return weights

    def _new_slot(self) -> _Slot:
        if self.ops is None:
            return _Slot()
        max_nbytes = max(self.reader.entry(i)["nbytes"] for i in self._streamed)
        return _Slot(compressed=torch.empty(max_nbytes, dtype=torch.uint8, device=self.device),
                     copied=self.ops.event("copied"), ready=self.ops.event("ready"), free=self.ops.event("free"),
                     host_free=self.ops.event("host_free"), timing=SlotTiming(self.ops))

    def _decode(self, data: torch.Tensor, layer_idx: int, out: dict[str, torch.Tensor],
                stored: dict[str, torch.Tensor] | None = None) -> None:
        """Dense weights of a layer from its file bytes (on the compute device) into `out`; with
        a compute dtype other than the store's, decoded into `stored` first and widened."""
        for name, enc in tensors_from_buffer(data, self.reader.entry(layer_idx), verify=False).items():
            dtype = self.compute_dtype or enc.dtype
            if self.keep_blocks and has_matvec(enc):  # nothing to decode: small batches multiply from the blocks
                out[name] = BlockWeight(enc, dtype, self.decode_threads)
                continue
            buffer = out.get(name)
            if buffer is None or buffer.shape != torch.Size(enc.shape) or buffer.dtype != dtype:
                buffer = out[name] = torch.empty(enc.shape, dtype=dtype, device=self.device)
            target = buffer
            if dtype != enc.dtype:  # decode in the stored dtype, then widen (exact for fp16/bf16 -> fp32)
                stored = {} if stored is None else stored
                target = stored.get(name)
                if target is None or target.shape != torch.Size(enc.shape) or target.dtype != enc.dtype:
                    target = stored[name] = torch.empty(enc.shape, dtype=enc.dtype, device=self.device)
            if self.ops is None:
                decode_into(enc, target, threads=self.decode_threads)
            else:
                self.ops.decompress(enc, target)
            if target is not buffer:
                buffer.copy_(target)

    # -- the two stages ------------------------------------------------------------------------------

    def _read(self, layer_idx: int, request, fetch: _Fetch) -> None:
        """Stage 1, on the I/O thread: the layer's bytes, then hand over to the transfer stage."""
        try:
            slot = fetch.slot
            if slot.host is None:
                slot.host = self.ops.pinned_empty(self._buffer_nbytes) if self.ops else aligned_empty(self._buffer_nbytes)
            elif self.ops is not None:
                slot.host_free.synchronize()  # the last copy out of the host buffer is done
            started = time.perf_counter()
            data, tier = self.reader.resolve(request, slot.host)
            self.stats.read_s += time.perf_counter() - started
            self._transfer.submit(self._transfer_stage, layer_idx, data, tier, fetch)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever acquires the layer
            fetch.done.set_exception(exc)

    def _transfer_stage(self, layer_idx: int, data: torch.Tensor, tier: str, fetch: _Fetch) -> None:
        """Stage 2, on the transfer thread: decode (CPU), or copy and decompress (CUDA streams)."""
        try:
            slot, nbytes = fetch.slot, data.numel()
            self.stats.bytes_to_device += nbytes
            if self.ops is None:
                started = time.perf_counter()
                self._decode(data, layer_idx, slot.weights, slot.stored)
                self.stats.decompress_s += time.perf_counter() - started
            else:
                self._issue_copy_and_decompress(layer_idx, data, slot)
            fetch.done.set_result(tier)
        except BaseException as exc:  # noqa: BLE001
            fetch.done.set_exception(exc)

    def _issue_copy_and_decompress(self, layer_idx: int, data: torch.Tensor, slot: _Slot) -> None:
        nbytes, ops = data.numel(), self.ops
        staged = data.data_ptr() != slot.host.data_ptr() and not ops.is_pinned(data)
        if staged:  # pageable memory the reader owns (an object-store buffer): through the pinned buffer
            slot.host_free.synchronize()
            ops.stage(slot.host[:nbytes], data)
            data = slot.host[:nbytes]
        events = slot.timing.current
        with ops.use(self._copy_stream):
            self._copy_stream.wait_event(slot.ready)  # the last decompression read `compressed`
            events["copy_start"].record(self._copy_stream)
            ops.copy(slot.compressed[:nbytes], data)
            events["copy_end"].record(self._copy_stream)
            slot.copied.record(self._copy_stream)
            if data.data_ptr() == slot.host.data_ptr():
                slot.host_free.record(self._copy_stream)
        with ops.use(self._decompress_stream):
            self._decompress_stream.wait_event(slot.copied)
            self._decompress_stream.wait_event(slot.free)  # the compute is done with the last weights
            events["decompress_start"].record(self._decompress_stream)
            self._decode(slot.compressed[:nbytes], layer_idx, slot.weights, slot.stored)
            events["decompress_end"].record(self._decompress_stream)
            slot.ready.record(self._decompress_stream)

    def _schedule(self, layer_idx: int) -> _Fetch | None:
        """Start fetching the layer into a free slot (None: every slot is taken)."""
        if not self._free_slots:
            return None
        fetch = _Fetch(self._free_slots.popleft(), Future())
        if fetch.slot.timing is not None:  # on this thread: only the compute thread touches those stats
            fetch.slot.timing.begin_use(self.stats)
        request = self.reader.request(layer_idx)  # issued now: several can be in flight
        self._io.submit(self._read, layer_idx, request, fetch)
        return fetch

    def _forget(self, fetches: list[_Fetch]) -> None:
        """Dropped prefetches (asked for out of order, or after an error): their slots go back to the
        free list once their fetch ended (the stages run fetches in order, so none is still writing)."""
        self._wait(fetches)
        self._free_slots.extend(fetch.slot for fetch in fetches)
        if self.ops is not None:
            self.ops.synchronize()

    # -- the compute side ------------------------------------------------------------------------------

    def acquire(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The layer's dense weights, ready for the compute stream; prefetches what follows."""
        if layer_idx in self.resident:
            return self.resident[layer_idx]
        fetch = self._prefetcher.claim(layer_idx)
        if fetch is None:  # not guessed: the guesses were dropped, so a slot is free
            fetch = self._prefetcher.start(layer_idx)
        waited = time.perf_counter()
        try:
            tier = fetch.done.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._prefetcher.drop()
            raise EndorError(
                f"layer {layer_idx} did not arrive within {self.timeout_s:.0f} s; check the store's "
                "storage (a slow or hung disk, object store or shard server)"
            ) from None
        except BaseException:
            self._prefetcher.drop()  # forget the failed fetch: the next request for the layer reads it anew
            raise
        self.stats.stall_s += time.perf_counter() - waited
        self.stats.hits[tier] += 1
        if self.ops is not None:
            stream, events = self.ops.current_stream(), fetch.slot.timing.current
            events["stall_start"].record(stream)
            stream.wait_event(fetch.slot.ready)
            events["compute_start"].record(stream)
        fetch.acquired_at = time.perf_counter()
        self._prefetcher.ahead(layer_idx)
        return fetch.slot.weights

    def release(self, layer_idx: int) -> None:
        """The compute that used the layer's weights has been issued; its slot may be refilled."""
        if layer_idx in self.resident:
            return
        fetch = self._prefetcher.finish(layer_idx)
        if self.ops is not None:
            stream, slot = self.ops.current_stream(), fetch.slot
            slot.free.record(stream)
            slot.timing.current["compute_end"].record(stream)
            slot.timing.end_use()
        else:
            self.stats.compute_s += time.perf_counter() - fetch.acquired_at
        self._free_slots.append(fetch.slot)

    def wait_idle(self) -> None:
        """Wait (within one timeout in all) until every scheduled fetch has been issued."""
        self._wait(list(self._prefetcher.in_flight.values()))

    def _wait(self, fetches: list[_Fetch]) -> None:
        deadline = time.monotonic() + self.timeout_s
        for fetch in fetches:
            try:
                fetch.done.result(timeout=max(deadline - time.monotonic(), 0.0))
            except Exception:  # noqa: BLE001 - a failed prefetch reports itself when acquired
                pass

    def snapshot(self) -> SourceStats:
        """A copy of the stats so far (CUDA timings folded in: a device synchronisation)."""
        if self.ops is not None:
            self.ops.synchronize()
            for slot in list(self._free_slots) + [fetch.slot for fetch in self._prefetcher.in_flight.values()]:
                slot.timing.fold_all(self.stats)
        return copy.deepcopy(self.stats)

    def reset_stats(self) -> SourceStats:
        """Return the stats so far (CUDA timings folded in) and start new ones."""
        self.wait_idle()
        if self.ops is not None:
            self.ops.synchronize()
            for slot in list(self._free_slots) + [fetch.slot for fetch in self._prefetcher.in_flight.values()]:
                slot.timing.fold_all(self.stats)
        stats, self.stats = self.stats, SourceStats()
        return stats

    def close(self) -> None:
        """Stop both stages (waiting for the fetches they run) and free every buffer."""
        for pool in (self._io, self._transfer):  # in stage order: a read may still submit a transfer
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._io = self._transfer = None
        if self.ops is not None:  # prefetches may still be copying into the buffers released below
            self.ops.synchronize()
        self._prefetcher.in_flight.clear()
        self._free_slots.clear()  # the slots' device buffers, pinned buffers and dense weights
        self.resident.clear()
        self.reader.close()
