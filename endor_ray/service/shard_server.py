"""Weight-shard server: owns some layers of a store and serves their compressed, verified bytes.

A plain class: the Ray actor in `endor_ray.service.actors` wraps it and puts each memory-tier layer into
the object store once. Memory-tier layers are read and checksum-verified at start; disk-tier
layers are read (and verified) from the store, local or object storage, each time one is asked
for, into one buffer reused for every read (the actor copies it into the object store at once).
An MoE layer's experts are served one at a time, from the tier of their layer.
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
    expert_hits: int = 0  # single experts served (MoE layers), counted in hits and bytes_served too
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
        # An MoE layer's experts live in the tier of their layer, each served alone (`expert`)
        self.expert_memory: dict[tuple[int, int], Any] = {
            (idx, expert_idx): self._read_expert(idx, expert_idx)
            for idx in memory_layers for expert_idx in range(self.store.num_experts(idx))}
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

    def _read_expert(self, layer_idx: int, expert_idx: int) -> np.ndarray:
        """One expert's verified bytes, in a new array (experts are small; each read is handed on)."""
        entry = self.store.expert_entry(layer_idx, expert_idx)
        data = np.empty(entry["nbytes"], dtype=np.uint8)
        self.store.read_into(entry["file"], data, entry["nbytes"])
        tensors_from_buffer(torch.from_numpy(data), {**entry, "index": layer_idx}, verify=True,
                            version=self.store.version)
        return data

    def expert(self, layer_idx: int, expert_idx: int) -> tuple[Any, str]:
        """(verified bytes, tier) of one expert of a layer this server owns (its layer's tier)."""
        if (layer_idx, expert_idx) in self.expert_memory:
            data, tier = self.expert_memory[layer_idx, expert_idx], "memory"
        elif layer_idx in self.disk_layers:
            started = time.perf_counter()
            data, tier = self._read_expert(layer_idx, expert_idx), "disk"
            self.stats.disk_read_s += time.perf_counter() - started
        else:
            raise StoreError(f"layer {layer_idx} expert {expert_idx} is not served by this shard server (it has "
                             f"layers {self.layers})")
        self.stats.hits[tier] += 1
        self.stats.expert_hits += 1
        self.stats.bytes_served += self.store.expert_entry(layer_idx, expert_idx)["nbytes"]
        return data, tier

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
