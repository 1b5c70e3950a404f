"""Endor decompression on the GPU: bitmap + packed values -> dense tensor (see endor_ray.format).

One program per format block of BLOCK elements. It loads the block's BLOCK/8 bitmap bytes,
expands them to BLOCK bits, turns the bits into slots with an exclusive cumulative sum, gathers
`values[block_offsets[b] + slot]` where a bit is set and writes the dense block. Non-zeros of a
block are contiguous in `values`, so the gather reads one contiguous run per block.

Values travel as same-width integers (int16 for fp16/bf16, int32 for fp32): the kernel only moves
bits, so the output is bit-identical to the input, NaN payloads and -0.0 included.

On a machine without a GPU the kernel runs under TRITON_INTERPRET=1 (set before this module is
imported), slowly; the CPU path of the engine uses `endor_ray.format.decode` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from endor_ray.errors import FormatError
from endor_ray.format.tensor import BITS_DTYPES, EncodedTensor, validate, validate_contents


@triton.jit
def decompress_kernel(
    bitmap_ptr,  # [ceil(numel / 8)] uint8, LSB first
    block_offsets_ptr,  # [num_blocks + 1] int64
    values_ptr,  # [nnz] int16 | int32 (the values' bits)
    out_ptr,  # [numel] same dtype as values
    numel,
    BLOCK: tl.constexpr,
):
    block_idx = tl.program_id(0).to(tl.int64)
    block_start = block_idx * BLOCK

    byte_idx = block_start // 8 + tl.arange(0, BLOCK // 8)
    num_bytes = (numel + 7) // 8
    bitmap_bytes = tl.load(bitmap_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
    bit_idx = tl.arange(0, 8)
    bits = (bitmap_bytes[:, None] >> bit_idx[None, :]) & 1  # [BLOCK // 8, 8]
    bits = tl.reshape(bits, (BLOCK,))  # row-major: element = byte * 8 + bit, LSB first

    slot = tl.cumsum(bits, axis=0) - bits  # exclusive: non-zeros before this element
    values_start = tl.load(block_offsets_ptr + block_idx)
    vals = tl.load(values_ptr + values_start + slot, mask=bits != 0, other=0)

    elem_idx = block_start + tl.arange(0, BLOCK)
    tl.store(out_ptr + elem_idx, vals, mask=elem_idx < numel)


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
        num_warps=8 if enc.block_size >= 4096 else 4,
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
