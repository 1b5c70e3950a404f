"""Raw expansion on the GPU: bitmap + packed raw values -> the dense tensor, bit for bit.

One program per format block of BLOCK elements, walked in CHUNKs (`endor_ray.kernels.bitmap`
turns a chunk's bitmap bytes into bits and slots); a kept element gathers
`values[block_offsets[b] + slot]`, the others are +0.0, and the dense chunk is written.

Why chunks: a whole 4096-element block per program needs 39-63 registers per thread (75% / 50%
occupancy on sm_90 for fp16 / fp32). Chunks of 1024 with 16 warps (2 elements per thread per
chunk) fit in 32 registers without spilling at every block size (chunks of 2048 spill once the
loop runs more than twice), so `launch_config` caps registers at 32 and every dtype runs at
100% occupancy on sm_80 and sm_90. `tests/test_kernel_aot.py` compiles the kernel ahead of time
for both targets and checks registers, spills and occupancy, without a GPU.

Raw values travel as same-width integers (int16 for fp16/bf16, int32 for fp32): the kernel only
moves bits, so the output is bit-identical to the input, NaN payloads and -0.0 included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from endor_ray.errors import FormatError
from endor_ray.format.tensor import BITS_DTYPES, EncodedTensor, validate_contents
from endor_ray.kernels.bitmap import block_run, chunk_slots
from endor_ray.kernels.launch import MAX_REGISTERS, checked_output

MAX_CHUNK = 1024  # elements per chunk
ELEMENTS_PER_THREAD = 2  # per chunk: 16 warps for a chunk of 1024


@triton.jit
def expand_kernel(
    bitmap_ptr,  # [ceil(numel / 8)] uint8, LSB first
    block_offsets_ptr,  # [num_blocks + 1] int64
    values_ptr,  # [nnz] int16 | int32: the kept values' bits
    out_ptr,  # [numel] values' dtype
    numel,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    block_start, chunk_first, remaining = block_run(block_offsets_ptr, BLOCK)
    for chunk_start in tl.range(0, BLOCK, CHUNK):
        elem_idx, value_idx, kept, chunk_count = chunk_slots(bitmap_ptr, numel, block_start + chunk_start,
                                                             chunk_first, remaining, CHUNK)
        vals = tl.load(values_ptr + value_idx, mask=kept, other=0)
        tl.store(out_ptr + elem_idx, vals, mask=elem_idx < numel)
        chunk_first += chunk_count  # value index of the next chunk's first value
        remaining -= chunk_count  # values of this block not yet used


def launch_config(block_size: int) -> dict[str, int]:
    """Compile-time sizes and launch options for a format block size (what the AOT test compiles)."""
    chunk = min(block_size, MAX_CHUNK)
    return {"CHUNK": chunk, "num_warps": max(1, min(16, chunk // (32 * ELEMENTS_PER_THREAD))),
            "maxnreg": MAX_REGISTERS}


def expand(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a raw "bitmap" tensor `enc` (arrays on the GPU, or on CPU under TRITON_INTERPRET=1)
    into `out` or a new tensor."""
    if enc.layout != "bitmap" or enc.quantized:
        raise FormatError(f"expand decodes raw bitmap tensors, got a {enc.layout} {enc.values_encoding} one: "
                          "use endor_ray.kernels.decompress")
    out = checked_output(enc, out)
    if enc.numel == 0:
        return out
    bits_dtype = BITS_DTYPES[enc.dtype]
    expand_kernel[(enc.num_blocks,)](
        enc.bitmap, enc.block_offsets, enc.values.view(bits_dtype), out.view(-1).view(bits_dtype), enc.numel,
        BLOCK=enc.block_size, **launch_config(enc.block_size),
    )
    return out


def expand_reference(enc: EncodedTensor) -> torch.Tensor:
    """What the kernel computes, block by block, in torch: the slot of each bit by cumsum, then a gather."""
    validate_contents(enc)
    if enc.layout != "bitmap" or enc.quantized:
        raise FormatError(f"expand_reference decodes raw bitmap tensors, got a {enc.layout} {enc.values_encoding} one")
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
