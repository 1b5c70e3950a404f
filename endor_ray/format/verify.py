"""The counts a verified tensor agrees on, checked on the host before any decoder trusts them.

`validate` (in `tensor`) checks sizes against the metadata; `check_counts` reads the data: block
offsets non-decreasing and each block's count equal to its part of the bitmap's set bits, and,
for quantized tensors, the same of the row offsets and every row's groups within its scales. A
store runs it on every verified read (`endor_ray.store.store.tensors_from_buffer`), so the CPU
decoder and the GPU kernel may take a block's or row's values from the offsets alone. Costs a
per-byte popcount of the bitmap (numpy), about 1/50 of a decode. Dense tensors, GGUF block
tensors among them, have no counts: `validate` already fixed their sizes.

`check_finite` reads the numbers themselves: raw values, int8/int4 scales and llama.cpp blocks
(dequantized) must be finite. A CRC says the bytes are the ones written, not that a NaN was not
written there on purpose. `endor inspect --verify` runs it on every tensor; the per-layer read on
the decode path does not (it would cost a pass over every value per token streamed).
"""

from __future__ import annotations

import numpy as np
import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import dequantize_blocks
from endor_ray.format.tensor import EncodedTensor


def check_counts(enc: EncodedTensor) -> None:
    """Interior block offsets: non-decreasing, and each block's count equal to the set bits of
    its part of the bitmap (so no block's values run into another's or past the end); for a
    quantized tensor the same of the row offsets, and every row's groups within its scales."""
    if enc.layout != "bitmap" or enc.numel == 0:
        return
    if enc.quantized:
        _check_row_counts(enc)
    offsets = enc.block_offsets.numpy()
    counts = np.diff(offsets)
    if (counts < 0).any():
        raise FormatError(f"block offsets decrease at block {int(np.argmax(counts < 0))}")
    bits = np.bitwise_count(enc.bitmap.numpy())  # [ceil(numel / 8)] set bits per byte
    bytes_per_block = enc.block_size // 8
    padded = np.zeros(enc.num_blocks * bytes_per_block, dtype=np.uint8)
    padded[: bits.size] = bits
    per_block = padded.reshape(enc.num_blocks, bytes_per_block).sum(axis=1, dtype=np.int64)
    wrong = np.flatnonzero(per_block != counts)
    if wrong.size:
        block = int(wrong[0])
        raise FormatError(f"block {block} has {int(per_block[block])} set bits but its offsets give "
                          f"{int(counts[block])} values")


def _check_row_counts(enc: EncodedTensor) -> None:
    rows, cols = enc.rows_cols
    counts = np.diff(enc.row_offsets.numpy())
    if (counts < 0).any():
        raise FormatError(f"row offsets decrease at row {int(np.argmax(counts < 0))}")
    if counts.size and int(counts.max()) > enc.groups_per_row * enc.group_size:
        raise FormatError(f"a row has {int(counts.max())} kept elements, more than its "
                          f"{enc.groups_per_row} groups of {enc.group_size} hold")
    if cols % 8 == 0:  # per-byte popcounts, summed per row: cheap (every real model's rows)
        per_row = np.bitwise_count(enc.bitmap.numpy()).reshape(rows, cols // 8).sum(axis=1, dtype=np.int64)
    else:
        per_row = np.unpackbits(enc.bitmap.numpy(), count=enc.numel, bitorder="little").reshape(rows, cols).sum(
            axis=1, dtype=np.int64)
    wrong = np.flatnonzero(per_row != counts)
    if wrong.size:
        row = int(wrong[0])
        raise FormatError(f"row {row} has {int(per_row[row])} set bits but its offsets give {int(counts[row])} values")


def check_finite(enc: EncodedTensor) -> None:
    """FormatError unless every number the tensor decodes from is finite: its raw values, its
    int8/int4 scales, or (GGUF blocks) its dequantized values."""
    if enc.gguf:
        rows, cols = enc.rows_cols
        numbers, what = dequantize_blocks(enc.values, enc.values_encoding, rows, cols), "dequantized values"
    elif enc.quantized:
        numbers, what = enc.scales, "scales"
    else:
        numbers, what = enc.values, "values"
    finite = torch.isfinite(numbers.reshape(-1))
    if not bool(finite.all()):
        first = int(torch.nonzero(~finite)[0])
        raise FormatError(f"{int((~finite).sum())} of its {finite.numel()} {what} are NaN or infinite (the first "
                          f"at index {first}: {float(numbers.reshape(-1)[first])}); re-run endor convert")
