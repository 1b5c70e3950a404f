"""The expert cache: decompressed experts kept in device memory, least recently used evicted first.

Keys are (layer, expert); values the expert's weights on the compute device: dense, or on the CPU
`BlockWeight`s over the expert's stored blocks, counted at those bytes (an INT8 expert holds about half
of its bf16 decode, so the same budget keeps about twice as many). Why LRU: the
experts a layer picks for one token are, far more often than chance, picked again for the next
few tokens (Mixtral-offloading, arXiv 2312.17238, measured LRU hit rates well above a static
choice on Mixtral), and within a layer every expert has the same size, so recency is the whole
decision; a frequency count would need a decay to follow a prompt's change of topic, and LRU is
O(1) per lookup with no tuning. An expert larger than the whole budget is never kept (budget 0:
no cache; None: no limit).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from endor_ray.engine.block_weight import BlockWeight

ExpertKey = tuple[int, int]  # (layer_idx, expert_idx)


def held_nbytes(weights: dict[str, torch.Tensor]) -> int:
    """The memory an expert's weights hold: a BlockWeight its stored blocks, a dense tensor its elements."""
    return sum(tensor.blocks.nbytes if isinstance(tensor, BlockWeight) else tensor.numel() * tensor.element_size()
               for tensor in weights.values())


class ExpertCache:
    """(layer, expert) -> weights on the device, within `budget_bytes` (None: no limit)."""

    def __init__(self, budget_bytes: int | None):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[ExpertKey, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self.nbytes = 0  # held now

    def get(self, key: ExpertKey) -> dict[str, torch.Tensor] | None:
        """The expert's weights (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: ExpertKey, weights: dict[str, torch.Tensor]) -> None:
        """Keep the expert, evicting the least recently used ones until it fits (or not at all)."""
        nbytes = held_nbytes(weights)
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            return
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        while self.budget_bytes is not None and self.nbytes + nbytes > self.budget_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.nbytes -= evicted
        self._entries[key] = (weights, nbytes)
        self.nbytes += nbytes

    def put_if_room(self, key: ExpertKey, weights: dict[str, torch.Tensor]) -> bool:
        """Keep the expert only where it fits without evicting anything, as the least recently used
        (a wrong prefetch guess: the first to go)."""
        nbytes = held_nbytes(weights)
        if key in self._entries or (self.budget_bytes is not None and self.nbytes + nbytes > self.budget_bytes):
            return False
        self._entries[key] = (weights, nbytes)
        self._entries.move_to_end(key, last=False)
        self.nbytes += nbytes
        return True

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
