"""Endor decompression on the GPU: bitmap + packed values -> dense tensor (see endor_ray.format).

One program per format block of BLOCK elements, walked in CHUNKs. The program first loads the
block's offset into `values` (its latency then hides behind the bitmap loads), and for each chunk
loads CHUNK/8 bitmap bytes, expands them to CHUNK bits, turns the bits into slots with an
exclusive cumulative sum plus the non-zeros already seen in the block, gathers
`values[block_offsets[b] + slot]` where a bit is set and writes the dense chunk. Non-zeros of a
block are contiguous in `values`, so the gathers read one contiguous run per block.

Why chunks: a whole 4096-element block per program needs 39-63 registers per thread (75% / 50%
occupancy on sm_90 for fp16 / fp32). Chunks of 1024 with 16 warps (2 elements per thread per
chunk) fit in 32 registers without spilling at every block size (chunks of 2048 spill once the
loop runs more than twice), so `launch_config` caps registers at 32 and every dtype runs at
100% occupancy on sm_80 and sm_90. `tests/test_kernel_aot.py` compiles the kernel
ahead of time for both targets and checks registers, spills and occupancy, without a GPU.

A program reads only its block's run `values[block_offsets[b] : block_offsets[b+1]]`: a bitmap
with more set bits than its block's count yields wrong values, never a read out of bounds (the
store checks offsets and counts when it verifies a layer).

Values travel as same-width integers (int16 for fp16/bf16, int32 for fp32): the kernel only moves
bits, so the output is bit-identical to the input, NaN payloads and -0.0 included. Store format
version 2 aligns every part to 64 bytes, so in a slot buffer all pointers are 16-byte aligned.

On a machine without a GPU the kernel runs under TRITON_INTERPRET=1 (set before this module is
imported), slowly; the CPU path of the engine uses `endor_ray.format.cpu_decode` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from endor_ray.errors import FormatError
from endor_ray.format.tensor import BITS_DTYPES, EncodedTensor, validate, validate_contents

MAX_CHUNK = 1024  # elements per chunk (2 per thread with 16 warps)
MAX_REGISTERS = 32  # per thread: 65536 registers / 2048 threads, i.e. 100% occupancy


@triton.jit
def decompress_kernel(
    bitmap_ptr,  # [ceil(numel / 8)] uint8, LSB first
    block_offsets_ptr,  # [num_blocks + 1] int64
    values_ptr,  # [nnz] int16 | int32 (the values' bits)
    out_ptr,  # [numel] same dtype as values
    numel,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    block_idx = tl.program_id(0).to(tl.int64)
    values_start = tl.load(block_offsets_ptr + block_idx)  # first: its latency hides behind the bitmap loads
    block_count = (tl.load(block_offsets_ptr + block_idx + 1) - values_start).to(tl.int32)
    numel = numel.to(tl.int64)
    num_bytes = (numel + 7) // 8
    block_start = block_idx * BLOCK
    chunk_values_ptr = values_ptr + values_start  # the first value of the current chunk
    remaining = block_count  # values of this block not yet used by earlier chunks
    for chunk_start in tl.range(0, BLOCK, CHUNK):
        byte_idx = (block_start + chunk_start) // 8 + tl.arange(0, CHUNK // 8)
        packed = tl.load(bitmap_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
        bits = (packed[:, None] >> tl.arange(0, 8)[None, :]) & 1  # [CHUNK // 8, 8]
        bits = tl.reshape(bits, (CHUNK,))  # row-major: element = byte * 8 + bit, LSB first
        slot = tl.cumsum(bits, axis=0) - bits  # exclusive: non-zeros of this chunk before the element
        # never past the block's own values, whatever the bitmap says (a verified store agrees anyway)
        vals = tl.load(chunk_values_ptr + slot, mask=(bits != 0) & (slot < remaining), other=0)
        elem_idx = block_start + chunk_start + tl.arange(0, CHUNK)
        tl.store(out_ptr + elem_idx, vals, mask=elem_idx < numel)
        chunk_count = tl.sum(bits, axis=0)
        chunk_values_ptr += chunk_count
        remaining -= chunk_count


def launch_config(block_size: int) -> dict[str, int]:
    """Compile-time sizes and launch options for a format block size (what the AOT test compiles)."""
    chunk = min(block_size, MAX_CHUNK)
    return {"CHUNK": chunk, "num_warps": max(1, min(16, chunk // 64)), "maxnreg": MAX_REGISTERS}


def decompress(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode `enc` (arrays on the GPU, or on CPU under TRITON_INTERPRET=1) into `out` or a new tensor.

    Checks sizes only, never the data (that would stall the GPU): the bitmap and offsets are
    trusted, as the store verified their checksums when it loaded them.
    """
    validate(enc)
    device = enc.values.device
    for name, part in enc.parts().items():
        if part.device != device or not part.is_contiguous():
            raise FormatError(f"{name} must be contiguous on {device}, got {part.device}")
    if out is None:
        out = torch.empty(enc.shape, dtype=enc.dtype, device=device)
    elif out.shape != torch.Size(enc.shape) or out.dtype != enc.dtype or out.device != device:
        raise FormatError(
            f"output buffer is {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"need {enc.shape} {enc.dtype} on {device}"
        )
    elif not out.is_contiguous():
        raise FormatError("output buffer must be contiguous")
    if enc.layout == "dense":
        return out.copy_(enc.values.view(enc.shape))
    if enc.numel == 0:
        return out

    bits_dtype = BITS_DTYPES[enc.dtype]
    grid = (enc.num_blocks,)
    decompress_kernel[grid](
        enc.bitmap,
        enc.block_offsets,
        enc.values.view(bits_dtype),
        out.view(-1).view(bits_dtype),
        enc.numel,
        BLOCK=enc.block_size,
        **launch_config(enc.block_size),
    )
    return out


def decompress_reference(enc: EncodedTensor) -> torch.Tensor:
    """What the kernel computes, block by block, in torch: the slot of each bit by cumsum, then a gather."""
    validate_contents(enc)
    if enc.layout == "dense":
        return enc.values.clone().view(enc.shape)
    bits_dtype = BITS_DTYPES[enc.dtype]
    padded_numel = enc.num_blocks * enc.block_size
    shifts = torch.arange(8, dtype=torch.uint8, device=enc.bitmap.device)
    padded_bitmap = torch.zeros(padded_numel // 8, dtype=torch.uint8, device=enc.bitmap.device)
    padded_bitmap[: enc.bitmap.numel()] = enc.bitmap
    bits = ((padded_bitmap.view(-1, 1) >> shifts) & 1).view(enc.num_blocks, enc.block_size).long()
    slot = torch.cumsum(bits, dim=1) - bits + enc.block_offsets[:-1, None]  # [num_blocks, BLOCK]
    values = enc.values.view(bits_dtype)
    if enc.nnz == 0:
        gathered = torch.zeros(padded_numel, dtype=bits_dtype, device=values.device)
    else:
        gathered = values[slot.clamp(max=enc.nnz - 1).view(-1)]
        gathered = torch.where(bits.view(-1) != 0, gathered, torch.zeros_like(gathered))
    return gathered[: enc.numel].view(enc.dtype).view(enc.shape)
