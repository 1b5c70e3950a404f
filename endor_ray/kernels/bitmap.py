"""The bitmap layout in Triton: jit helpers the bitmap kernels share (`expand`, `dequant`).

A format block of BLOCK elements owns one contiguous run of values,
`values[block_offsets[b] : block_offsets[b + 1]]`; its kernel walks the block in CHUNKs and, per
chunk, turns CHUNK/8 bitmap bytes (LSB first) into CHUNK bits and each element's slot: the set
bits before it in the chunk (an exclusive cumulative sum). The chunk's kept values are then
`values[chunk_first + slot]` where a bit is set, `chunk_first` being the run's start plus the set
bits of the block's earlier chunks, so the gathers of a block read one contiguous run.

A program reads only its block's run: a bitmap with more set bits than its block's count yields
wrong values, never a read out of bounds (the store checks offsets and counts when it verifies a
layer). Store format version 2 aligns every part to 64 bytes, so in a slot buffer all pointers
are 16-byte aligned.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_run(block_offsets_ptr, BLOCK: tl.constexpr):
    """(first element, first value index, value count) of this program's block: its run in `values`."""
    block_idx = tl.program_id(0).to(tl.int64)
    # Load the start first: its latency then hides behind the bitmap loads that follow.
    values_start = tl.load(block_offsets_ptr + block_idx)
    block_count = (tl.load(block_offsets_ptr + block_idx + 1) - values_start).to(tl.int32)
    return block_idx * BLOCK, values_start, block_count


@triton.jit
def chunk_slots(bitmap_ptr, numel, chunk_start, chunk_first, remaining, CHUNK: tl.constexpr):
    """(element index, value index, kept, set bits) of the CHUNK elements from `chunk_start`, whose
    first kept value is `chunk_first` with `remaining` values left in the block: each element's
    index [CHUNK] int64, its index into `values` [CHUNK] int64, whether it takes that value
    [CHUNK] bool, and the chunk's count of set bits (int32)."""
    byte_idx = chunk_start // 8 + tl.arange(0, CHUNK // 8)
    num_bytes = (numel.to(tl.int64) + 7) // 8  # int64: numel may come specialised as int32
    packed = tl.load(bitmap_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
    bits = (packed[:, None] >> tl.arange(0, 8)[None, :]) & 1  # [CHUNK // 8, 8]
    bits = tl.reshape(bits, (CHUNK,))  # row-major: element = byte * 8 + bit, LSB first
    slot = tl.cumsum(bits, axis=0) - bits  # exclusive: set bits of this chunk before the element
    # never past the block's own values, whatever the bitmap says (a verified store agrees anyway)
    kept = (bits != 0) & (slot < remaining)
    return chunk_start + tl.arange(0, CHUNK), chunk_first + slot, kept, tl.sum(bits, axis=0)
