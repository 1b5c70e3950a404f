"""The running batch: which sequences share the passes, their KV cache, masks and positions.

Sequences join and leave at every pass over the weights. The cache is transformers' own
`DynamicCache`, [rows, heads, columns, head_dim] per layer, with a [rows, columns] padding mask:
row r's real entries are the columns where mask[r] is 1, in order, and everything else is
masked out. Positions are explicit (row r's next token sits at position `mask[r].sum()`), so
rotary embeddings (and OPT's learned positions) never see the padding.

A pass that admits newcomers is one forward over a [rows, L] block, L the longest newcomer
prompt: a running row contributes its last token at the right end (left-padded), a newcomer its
prompt (left-padded). So the newcomers' prefill shares the pass, and the load of every layer,
with the running rows' decode; the padded positions cost compute, not weight traffic, and
`SchedulerConfig.max_prefill_tokens` bounds them. Newcomers' rows get masked zeros for the columns
already in the cache.

Padding left in the cache (by newcomers' blocks, by prompts of different lengths, by rows that
left) is squeezed out by `realign`: each row's real columns are gathered, right-aligned, into a
cache as long as the longest row. Keys carry their rotary phase already, and attention depends
only on which columns are unmasked, so moving columns changes no result. It runs when more than a
quarter of the cache is padding, so no step keeps paying for a long prompt that has left.
"""

from __future__ import annotations

import torch

from endor_ray.engine.sequence import Sequence

REALIGN_WASTE = 0.25  # realign when more than this fraction of the cache's entries is padding


class RunningBatch:
    """The sequences of the current passes and their cache (on the compute device)."""

    def __init__(self, device: torch.device, pad_id: int, new_cache):
        self.device, self.pad_id, self._new_cache = device, pad_id, new_cache
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # [rows, columns]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def cached_tokens(self) -> int:
        """Real tokens held in the cache over all rows (what the KV budget counts)."""
        return int(self.mask.sum())

    def inputs(self, newcomers: list[Sequence]) -> dict[str, torch.Tensor]:
        """Model inputs for the next pass: every running row's last token and every newcomer's
        prompt (`Sequence.prefill_ids`), as one left-padded block; the cache grows rows for the newcomers."""
        block = max([len(seq.prefill_ids) for seq in newcomers], default=1)
        rows = len(self.rows) + len(newcomers)
        input_ids = torch.full((rows, block), self.pad_id, dtype=torch.long)
        block_mask = torch.zeros((rows, block), dtype=torch.long)
        position_ids = torch.zeros((rows, block), dtype=torch.long)
        lengths = self.mask.sum(dim=1).tolist()  # real tokens cached per running row
        for row, seq in enumerate(self.rows):
            input_ids[row, -1] = seq.output_ids[-1]
            block_mask[row, -1] = 1
            position_ids[row, -1] = lengths[row]
        for offset, seq in enumerate(newcomers):
            prefill = seq.prefill_ids  # its prompt (and, preempted before, what it generated)
            row, length = len(self.rows) + offset, len(prefill)
            input_ids[row, block - length:] = torch.tensor(prefill)
            block_mask[row, block - length:] = 1
            position_ids[row, block - length:] = torch.arange(length)
        if newcomers and self.rows:
            self._grow_rows(len(newcomers))
        self.rows.extend(newcomers)
        past = self.mask if len(self.mask) == rows else torch.zeros((rows, self.columns), dtype=torch.long,
                                                                   device=self.device)
        if past is not self.mask:
            past[: len(self.mask)] = self.mask
        self.mask = torch.cat([past, block_mask.to(self.device)], dim=1)
        if self.cache is None:
            self.cache = self._new_cache()
        return {"input_ids": input_ids.to(self.device), "attention_mask": self.mask,
                "position_ids": position_ids.to(self.device)}

    def _grow_rows(self, count: int) -> None:
        """Masked zero rows in every layer's cache for `count` newcomers."""
        for layer in _cache_layers(self.cache):
            shape = list(layer.keys.shape)
            shape[0] = count
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(shape)], dim=0)
            shape = list(layer.values.shape)
            shape[0] = count
            layer.values = torch.cat([layer.values, layer.values.new_zeros(shape)], dim=0)

    def remove(self, leaving: list[Sequence]) -> None:
        """Drop finished or cancelled rows (their cache with them)."""
        if not leaving:
            return
        gone = {id(seq) for seq in leaving}
        keep = [row for row, seq in enumerate(self.rows) if id(seq) not in gone]
        self.rows = [self.rows[row] for row in keep]
        if not self.rows:
            self.cache, self.mask = None, torch.zeros((0, 0), dtype=torch.long, device=self.device)
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in _cache_layers(self.cache):
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)

    def realign(self, force: bool = False) -> bool:
        """Squeeze padding out of the cache if more than REALIGN_WASTE of it is padding."""
        if self.cache is None or not self.columns:
            return False
        lengths = self.mask.sum(dim=1)  # [rows]
        longest = int(lengths.max())
        waste = 1.0 - float(lengths.sum()) / (len(self.rows) * self.columns)
        if not force and waste <= REALIGN_WASTE:
            return False
        # Row r's j-th real column goes to column (longest - lengths[r] + j): a stable sort of the
        # mask puts padding first and real columns after it, in their order.
        order = torch.sort(self.mask, dim=1, stable=True).indices[:, -longest:]  # [rows, longest]
        for layer in _cache_layers(self.cache):
            gather = order[:, None, :, None]  # [rows, 1, longest, 1] -> broadcast over heads and dims
            layer.keys = torch.gather(layer.keys, 2, gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = torch.gather(layer.values, 2,
                                        gather.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
        self.mask = (torch.arange(longest, device=self.device)[None, :] >= (longest - lengths)[:, None]).long()
        return True


def _cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's DynamicCache has no .layers; endor-ray needs transformers >= 4.56")
    return [layer for layer in layers if getattr(layer, "keys", None) is not None]
