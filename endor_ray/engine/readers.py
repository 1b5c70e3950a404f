"""Readers: where a streamed layer's compressed bytes come from.

A reader has three calls. `request(layer_idx)` is made when a fetch is scheduled, on the compute
thread, so several can be in flight (the Ray reader sends its request to a shard server there).
`resolve(request, buffer)` runs on the layer source's I/O thread and returns ``(bytes, tier)``:
``bytes`` is a [nbytes] uint8 host tensor, either `buffer[:nbytes]` (the reader read into the
buffer the layer source lent it, which is reused for every layer: nothing is allocated per
layer per token) or memory the reader owns and keeps unchanged (the host tier, an object-store
buffer). `close()` releases what the reader holds.

`StoreReader` serves a store on this machine or in object storage: the host tier is read and
checksum-verified once at start (page-locked in place on CUDA), the disk tier is read on demand
into the lent buffer and verified each time with the vectorised CRC (about 30 GB/s, so it does
not show next to a disk read; pass ``verify_disk_reads=False`` to trust the disk).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from endor_ray.engine.device import CudaOps, aligned_empty
from endor_ray.store.files import direct_capacity
from endor_ray.store.store import Store, tensors_from_buffer


class StoreReader:
    """Layer bytes from a store: the host tier held in memory, the disk tier read on demand."""

    def __init__(self, store: Store, host_layers: tuple[int, ...], ops: CudaOps | None = None,
                 verify_disk_reads: bool = True, direct_io: bool = False, progress: bool = True,
                 keep_cache: bool = False):
        """`ops` page-locks the host tier (CUDA); `direct_io` reads the disk tier with O_DIRECT; buffered
        reads drop the pages they read from the page cache unless `keep_cache`."""
        self.store, self.ops, self.keep_cache = store, ops, keep_cache
        self.verify_disk_reads, self.direct_io = verify_disk_reads, direct_io
        self._host: dict[int, torch.Tensor] = {}  # layer -> [nbytes] uint8, verified (page-locked on CUDA)
        self._registered: list[torch.Tensor] = []  # registered in place: unregister on close
        try:
            for layer_idx in tqdm(host_layers, desc="load host tier", unit="layer", disable=not progress):
                nbytes = self.entry(layer_idx)["nbytes"]
                data = self._read(layer_idx, aligned_empty(self.buffer_nbytes(layer_idx)), verify=True)
                if ops is not None:
                    data, registered = ops.pin(data)
                    if registered:
                        self._registered.append(data)
                self._host[layer_idx] = data[:nbytes]
        except BaseException:
            self.close()  # a failure at layer k leaves layers 0..k-1 neither pinned nor held
            raise

    def entry(self, layer_idx: int) -> dict:
        return self.store.layer_entry(layer_idx)

    def buffer_nbytes(self, layer_idx: int) -> int:
        """How large a buffer lent for this layer must be (a direct read rounds the size up)."""
        return direct_capacity(self.entry(layer_idx)["nbytes"])

    def _read(self, layer_idx: int, buffer: torch.Tensor, verify: bool) -> torch.Tensor:
        entry = self.entry(layer_idx)
        self.store.read_into(entry["file"], buffer, entry["nbytes"], direct=self.direct_io,
                             drop_cache=not self.keep_cache)
        data = buffer[:entry["nbytes"]]
        if verify:
            tensors_from_buffer(data, entry, verify=True, version=self.store.version)
        return data

    def request(self, layer_idx: int) -> int:
        return layer_idx

    def resolve(self, layer_idx: int, buffer: torch.Tensor) -> tuple[torch.Tensor, str]:
        """(bytes, tier): the host tier's own memory, or the layer read into `buffer`."""
        if layer_idx in self._host:
            return self._host[layer_idx], "host"
        return self._read(layer_idx, buffer, verify=self.verify_disk_reads), "disk"

    def close(self) -> None:
        errors = []
        for data in self._registered:
            try:
                self.ops.unpin(data)
            except Exception as exc:  # noqa: BLE001 - unpin the rest, then report
                errors.append(exc)
        self._registered.clear()
        self._host.clear()
        if errors:
            raise errors[0]
