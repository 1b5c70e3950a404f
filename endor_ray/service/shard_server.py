"""Weight-shard server: owns some layers of a store and serves their compressed, verified bytes.

A plain class: the Ray actor in `endor_ray.service.actors` wraps it and puts each memory-tier layer into
the object store once. Memory-tier layers are read and checksum-verified at start; disk-tier
layers are read (and verified) from the store, local or object storage, each time one is asked
for, into one buffer reused for every read (the actor copies it into the object store at once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from endor_ray.errors import StoreError
from endor_ray.store.store import Store, tensors_from_buffer


@dataclass
class ShardStats:
    bytes_served: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"memory": 0, "disk": 0})
    disk_read_s: float = 0.0
    load_s: float = 0.0


class ShardServer:
    """Holds `memory_layers` of the store in host memory and reads `disk_layers` on demand."""

    def __init__(self, store_location: str, memory_layers: list[int], disk_layers: list[int] = ()):
        started = time.perf_counter()
        self.store = Store(store_location)
        self.disk_layers = frozenset(disk_layers)
        self.stats = ShardStats()
        self.memory: dict[int, Any] = {idx: self._read(idx) for idx in memory_layers}  # [nbytes] uint8
        self._disk_buffer = np.empty(max((self._nbytes(idx) for idx in disk_layers), default=0), dtype=np.uint8)
        self.stats.load_s = time.perf_counter() - started

    def _nbytes(self, layer_idx: int) -> int:
        return self.store.layer_entry(layer_idx)["nbytes"]

    def _read(self, layer_idx: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """The layer's verified bytes, in `buffer` if given, else in a new array."""
        nbytes = self._nbytes(layer_idx)
        buffer = np.empty(nbytes, dtype=np.uint8) if buffer is None else buffer
        self.store.read_into(self.store.layer_entry(layer_idx)["file"], buffer, nbytes)
        data = buffer[:nbytes]
        tensors_from_buffer(torch.from_numpy(data), self.store.layer_entry(layer_idx), verify=True,
                            version=self.store.version)
        return data

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.memory) | self.disk_layers)

    def layer(self, layer_idx: int) -> tuple[Any, str]:
        """(verified bytes, tier) of a layer this server owns. The memory tier holds whatever was
        put there: numpy buffers, or (in the Ray actor) object refs to them. A disk-tier layer's
        bytes live in the server's read buffer: valid until the next call."""
        if layer_idx in self.memory:
            data, tier = self.memory[layer_idx], "memory"
        elif layer_idx in self.disk_layers:
            started = time.perf_counter()
            data, tier = self._read(layer_idx, self._disk_buffer), "disk"
            self.stats.disk_read_s += time.perf_counter() - started
        else:
            raise StoreError(f"layer {layer_idx} is not served by this shard server (it has {self.layers})")
        self.stats.hits[tier] += 1
        self.stats.bytes_served += self.store.layer_entry(layer_idx)["nbytes"]
        return data, tier
