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

Quantized values (`values_encoding` "int8"/"int4", see `endor_ray.format.quant`) decode in the
same pass: the gathered code is multiplied by its group's scale (the row from the element's
position, the group from the value's rank in its row) and rounded once to the output dtype; for
bfloat16 the rounding is done with integer operations, so the interpreter and a GPU agree bit
for bit with the torch reference. A "dense" quantized tensor (no bitmap) runs the same kernel
with every element kept (DENSE).

Raw values travel as same-width integers (int16 for fp16/bf16, int32 for fp32): the kernel only moves
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
from endor_ray.format.tensor import BITS_DTYPES, EncodedTensor, decode, validate, validate_contents

MAX_CHUNK = 1024  # elements per chunk (2 per thread with 16 warps)
MAX_REGISTERS = 32  # per thread: 65536 registers / 2048 threads, i.e. 100% occupancy


@triton.jit
def decompress_kernel(
    bitmap_ptr,  # [ceil(numel / 8)] uint8, LSB first (unused when DENSE)
    block_offsets_ptr,  # [num_blocks + 1] int64 (unused when DENSE)
    values_ptr,  # raw: [nnz] int16 | int32 (the values' bits); QUANT 8: int8 codes; QUANT 4: uint8 nibble pairs
    out_ptr,  # [numel]: raw: same dtype as values; quantized: float16 | bfloat16 | float32
    numel,
    scales_ptr,  # quantized: [num_scales] out's dtype (unused for raw)
    row_offsets_ptr,  # quantized "bitmap": [rows + 1] int64 (unused for raw and DENSE)
    cols,  # quantized: elements per row
    groups_per_row,  # quantized: scale slots per row
    group_size,  # quantized: kept elements per group
    num_scales,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    QUANT: tl.constexpr,  # 0: raw bits; 8: int8 codes; 4: int4 codes
    DENSE: tl.constexpr,  # quantized "dense" layout: every element is kept, no bitmap
    OUT_BF16: tl.constexpr,  # quantized bfloat16 output, written as int16 bits
):
    block_idx = tl.program_id(0).to(tl.int64)
    numel = numel.to(tl.int64)
    block_start = block_idx * BLOCK
    if DENSE:
        values_start = block_start
        block_count = tl.minimum(numel - block_start, BLOCK).to(tl.int32)
    else:
        values_start = tl.load(block_offsets_ptr + block_idx)  # first: its latency hides behind the bitmap loads
        block_count = (tl.load(block_offsets_ptr + block_idx + 1) - values_start).to(tl.int32)
    num_bytes = (numel + 7) // 8
    chunk_first = values_start  # value index of the current chunk's first value
    remaining = block_count  # values of this block not yet used by earlier chunks
    for chunk_start in tl.range(0, BLOCK, CHUNK):
        elem_idx = block_start + chunk_start + tl.arange(0, CHUNK)
        if DENSE:
            bits = (elem_idx < numel).to(tl.int32)
            slot = tl.arange(0, CHUNK)
        else:
            byte_idx = (block_start + chunk_start) // 8 + tl.arange(0, CHUNK // 8)
            packed = tl.load(bitmap_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
            bits = (packed[:, None] >> tl.arange(0, 8)[None, :]) & 1  # [CHUNK // 8, 8]
            bits = tl.reshape(bits, (CHUNK,))  # row-major: element = byte * 8 + bit, LSB first
            slot = tl.cumsum(bits, axis=0) - bits  # exclusive: non-zeros of this chunk before the element
        # never past the block's own values, whatever the bitmap says (a verified store agrees anyway)
        kept = (bits != 0) & (slot < remaining)
        value_idx = chunk_first + slot
        if QUANT == 0:
            vals = tl.load(values_ptr + value_idx, mask=kept, other=0)
        else:
            if QUANT == 8:
                code = tl.load(values_ptr + value_idx, mask=kept, other=0).to(tl.float32)
            else:
                pair = tl.load(values_ptr + value_idx // 2, mask=kept, other=0).to(tl.int32)
                nibble = (pair >> ((value_idx & 1) * 4).to(tl.int32)) & 0xF
                code = ((nibble ^ 8) - 8).to(tl.float32)  # 4-bit two's complement
            row = elem_idx // cols
            if DENSE:
                row_start = row * cols
            else:
                row_start = tl.load(row_offsets_ptr + row, mask=kept, other=0)
            group = row * groups_per_row + (value_idx - row_start) // group_size
            scale = tl.load(scales_ptr + group, mask=kept & (group >= 0) & (group < num_scales), other=0)
            product = code * scale.to(tl.float32)  # exact: a code has at most 8 bits
            if OUT_BF16:  # round to nearest even by integer ops, the same under the interpreter and on a GPU
                word = product.to(tl.int32, bitcast=True)
                rounded = (word + 0x7FFF + ((word >> 16) & 1)) >> 16
                rounded = tl.where(product != product, 0x7FC0, rounded & 0xFFFF)  # NaN: only from damaged scales
                vals = ((rounded ^ 0x8000) - 0x8000).to(tl.int16)  # the bf16 bits, into an int16 view
            else:
                vals = product.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even; fp32: itself
        tl.store(out_ptr + elem_idx, vals, mask=elem_idx < numel)
        chunk_count = tl.sum(bits, axis=0)
        chunk_first += chunk_count
        remaining -= chunk_count


def launch_config(block_size: int, quantized: bool = False) -> dict[str, int]:
    """Compile-time sizes and launch options for a format block size (what the AOT test compiles).

    Dequantizing needs more live values per element (code, row, group, scale), so quantized
    tensors walk chunks of 512 with one element per thread: 32 registers without spills.
    """
    per_thread = 1 if quantized else 2
    chunk = min(block_size, MAX_CHUNK // (2 // per_thread))
    return {"CHUNK": chunk, "num_warps": max(1, min(16, chunk // (32 * per_thread))), "maxnreg": MAX_REGISTERS}


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
    if enc.layout == "dense" and not enc.quantized:
        return out.copy_(enc.values.view(enc.shape))
    if enc.numel == 0:
        return out
    grid = (enc.num_blocks,)
    if enc.quantized:
        cols = enc.rows_cols[1]
        dense = enc.layout == "dense"
        bitmap = enc.values if dense else enc.bitmap  # DENSE never reads these two
        block_offsets = enc.scales if dense else enc.block_offsets
        row_offsets = enc.scales if dense else enc.row_offsets
        values = enc.values
        quantized_args = (enc.scales, row_offsets, cols, enc.groups_per_row, enc.group_size, enc.scales.numel())
        out_bf16 = enc.dtype == torch.bfloat16
        target = out.view(-1).view(torch.int16) if out_bf16 else out.view(-1)
        quant_bits = 8 if enc.values_encoding == "int8" else 4
    else:
        bits_dtype = BITS_DTYPES[enc.dtype]
        bitmap, block_offsets, values = enc.bitmap, enc.block_offsets, enc.values.view(bits_dtype)
        target = out.view(-1).view(bits_dtype)
        quantized_args = (values, values, 1, 0, 1, 0)  # unused when QUANT == 0
        quant_bits, dense, out_bf16 = 0, False, False
    decompress_kernel[grid](
        bitmap, block_offsets, values, target, enc.numel, *quantized_args,
        BLOCK=enc.block_size, QUANT=quant_bits, DENSE=dense, OUT_BF16=out_bf16,
        **launch_config(enc.block_size, quantized=quant_bits != 0),
    )
    return out


def decompress_reference(enc: EncodedTensor) -> torch.Tensor:
    """What the kernel computes, block by block, in torch: the slot of each bit by cumsum, then a gather.

    Quantized tensors: the format's own reference decode (`endor_ray.format.decode`), which
    defines the dequantized values the kernel must reproduce bit for bit.
    """
    if enc.quantized:
        return decode(enc)
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
