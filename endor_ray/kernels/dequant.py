"""Quantized values on the GPU: INT8/INT4 codes with group scales -> the dequantized dense tensor.

Two kernels, one per layout (`endor_ray.format.quant` holds the spec):

- `dequantize_kernel`, layout "bitmap": one program per format block, walked in CHUNKs as in
  `endor_ray.kernels.bitmap`; a kept element's code is `values[block_offsets[b] + slot]`, its row
  comes from its position and its group from the value's rank in its row
  (`value_idx - row_offsets[row]`);
- `dequantize_dense_kernel`, layout "dense" (no bitmap, every element kept): element e's code is
  `values[e]`, its group `row * groups_per_row + col // group_size`.

Both multiply the code by its group's scale in float32 (exact: a code has at most 8 bits) and
round once to the output dtype; for bfloat16 the rounding is done with integer operations, so
the interpreter and a GPU agree bit for bit with the torch reference (`endor_ray.format.decode`).

Why chunks of 512 with one element per thread: dequantizing needs more live values per element
(code, row, group, scale) than a raw expansion. At chunks of 1024 (2 per thread) under the
32-register cap `dequantize_kernel` spills 96-108 bytes and `dequantize_dense_kernel` 8-28 (block
4096, sm_80 and sm_90; the single kernel before the split: 112-124); at 512 both fit in 32
registers without spills, at 100% occupancy (`tests/test_kernel_aot.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from endor_ray.errors import FormatError
from endor_ray.format.quant import QUANTIZED_ENCODINGS
from endor_ray.format.tensor import EncodedTensor, decode
from endor_ray.kernels.bitmap import block_run, chunk_slots
from endor_ray.kernels.launch import MAX_REGISTERS, checked_output

MAX_CHUNK = 512  # elements per chunk
ELEMENTS_PER_THREAD = 1  # per chunk: 16 warps for a chunk of 512


@triton.jit
def load_codes(values_ptr, value_idx, kept, QUANT: tl.constexpr):
    """The codes of values `value_idx` (0 where not kept) as float32; QUANT 8: int8, 4: int4 pairs."""
    if QUANT == 8:
        code = tl.load(values_ptr + value_idx, mask=kept, other=0).to(tl.float32)
    else:
        pair = tl.load(values_ptr + value_idx // 2, mask=kept, other=0).to(tl.int32)
        nibble = (pair >> ((value_idx & 1) * 4).to(tl.int32)) & 0xF  # even value: low nibble
        code = ((nibble ^ 8) - 8).to(tl.float32)  # 4-bit two's complement
    return code


@triton.jit
def scaled(code, scale, out_ptr, OUT_BF16: tl.constexpr):
    """code * scale in float32, rounded once to out's dtype (bfloat16: its bits as int16)."""
    product = code * scale.to(tl.float32)  # exact: a code has at most 8 bits
    if OUT_BF16:  # round to nearest even by integer ops, the same under the interpreter and on a GPU
        word = product.to(tl.int32, bitcast=True)
        rounded = (word + 0x7FFF + ((word >> 16) & 1)) >> 16
        rounded = tl.where(product != product, 0x7FC0, rounded & 0xFFFF)  # NaN: only from damaged scales
        vals = ((rounded ^ 0x8000) - 0x8000).to(tl.int16)  # the bf16 bits, into an int16 view
    else:
        vals = product.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even; fp32: itself
    return vals


@triton.jit
def dequantize_kernel(
    bitmap_ptr,  # [ceil(numel / 8)] uint8, LSB first
    block_offsets_ptr,  # [num_blocks + 1] int64
    row_offsets_ptr,  # [rows + 1] int64: index of each row's first value
    values_ptr,  # [nnz] int8 codes (QUANT 8) | [ceil(nnz / 2)] uint8 nibble pairs (QUANT 4)
    scales_ptr,  # [num_scales] out's dtype (bfloat16: as stored)
    out_ptr,  # [numel] float16 | int16 (bfloat16 bits) | float32
    numel,
    cols,  # elements per row
    groups_per_row,  # scale slots per row
    group_size,  # kept elements per group
    num_scales,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    QUANT: tl.constexpr,  # 8: int8 codes; 4: int4 codes
    OUT_BF16: tl.constexpr,
):
    block_start, chunk_first, remaining = block_run(block_offsets_ptr, BLOCK)
    for chunk_start in tl.range(0, BLOCK, CHUNK):
        elem_idx, value_idx, kept, chunk_count = chunk_slots(bitmap_ptr, numel, block_start + chunk_start,
                                                             chunk_first, remaining, CHUNK)
        code = load_codes(values_ptr, value_idx, kept, QUANT)
        row = elem_idx // cols
        row_start = tl.load(row_offsets_ptr + row, mask=kept, other=0)
        group = row * groups_per_row + (value_idx - row_start) // group_size
        # lying row offsets (a damaged tensor) give scale 0, never a read outside the scales
        scale = tl.load(scales_ptr + group, mask=kept & (group >= 0) & (group < num_scales), other=0)
        tl.store(out_ptr + elem_idx, scaled(code, scale, out_ptr, OUT_BF16), mask=elem_idx < numel)
        chunk_first += chunk_count  # value index of the next chunk's first value
        remaining -= chunk_count  # values of this block not yet used


@triton.jit
def dequantize_dense_kernel(
    values_ptr,  # [numel] int8 codes (QUANT 8) | [ceil(numel / 2)] uint8 nibble pairs (QUANT 4)
    scales_ptr,  # [rows * groups_per_row] out's dtype (bfloat16: as stored)
    out_ptr,  # [numel] float16 | int16 (bfloat16 bits) | float32
    numel,
    cols,  # elements per row
    groups_per_row,  # ceil(cols / group_size)
    group_size,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    QUANT: tl.constexpr,  # 8: int8 codes; 4: int4 codes
    OUT_BF16: tl.constexpr,
):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    numel = numel.to(tl.int64)
    for chunk_start in tl.range(0, BLOCK, CHUNK):
        elem_idx = block_start + chunk_start + tl.arange(0, CHUNK)
        kept = elem_idx < numel
        code = load_codes(values_ptr, elem_idx, kept, QUANT)
        row = elem_idx // cols
        group = row * groups_per_row + (elem_idx - row * cols) // group_size  # < rows * groups_per_row
        scale = tl.load(scales_ptr + group, mask=kept, other=0)
        tl.store(out_ptr + elem_idx, scaled(code, scale, out_ptr, OUT_BF16), mask=kept)


def launch_config(block_size: int) -> dict[str, int]:
    """Compile-time sizes and launch options for a format block size (what the AOT test compiles)."""
    chunk = min(block_size, MAX_CHUNK)
    return {"CHUNK": chunk, "num_warps": max(1, min(16, chunk // (32 * ELEMENTS_PER_THREAD))),
            "maxnreg": MAX_REGISTERS}


def dequantize(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a quantized tensor `enc`, either layout (arrays on the GPU, or on CPU under
    TRITON_INTERPRET=1), into `out` or a new tensor."""
    if enc.values_encoding not in QUANTIZED_ENCODINGS:
        raise FormatError(f"dequantize decodes int8/int4 tensors, got a {enc.values_encoding} one: "
                          "use endor_ray.kernels.decompress")
    out = checked_output(enc, out)
    if enc.numel == 0:
        return out
    out_bf16 = enc.dtype == torch.bfloat16
    target = out.view(-1).view(torch.int16) if out_bf16 else out.view(-1)  # [numel]
    constexprs = {"BLOCK": enc.block_size, "QUANT": 8 if enc.values_encoding == "int8" else 4, "OUT_BF16": out_bf16,
                  **launch_config(enc.block_size)}
    sizes = (enc.numel, enc.rows_cols[1], enc.groups_per_row, enc.group_size)
    grid = (enc.num_blocks,)
    if enc.layout == "dense":
        dequantize_dense_kernel[grid](enc.values, enc.scales, target, *sizes, **constexprs)
    else:
        dequantize_kernel[grid](enc.bitmap, enc.block_offsets, enc.row_offsets, enc.values, enc.scales, target,
                                *sizes, enc.scales.numel(), **constexprs)
    return out


def dequantize_reference(enc: EncodedTensor) -> torch.Tensor:
    """What both kernels compute: the format's own reference decode (`endor_ray.format.decode`),
    which defines the dequantized values they must reproduce bit for bit."""
    if enc.values_encoding not in QUANTIZED_ENCODINGS:
        raise FormatError(f"dequantize_reference decodes int8/int4 tensors, got a {enc.values_encoding} one")
    return decode(enc)
