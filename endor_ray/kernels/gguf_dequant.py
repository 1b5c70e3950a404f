"""GGUF block dequantization on the GPU: llama.cpp's blocks (Q8_0 ... Q6_K, Q3_K, Q2_K, IQ4_NL) -> dense rows.

A tensor with ``values_encoding`` one of ``GGUF_ENCODINGS`` (layout "dense", see
`endor_ray.format.gguf_blocks` for the spec) stores only ``values``: uint8 blocks of the flattened
tensor in order (a GGUF file's bytes where every row holds whole blocks; a super-block type may also
span rows, e.g. q4_k on 576 columns). So the tensor is a plain run of ``numel // BLOCK_ELEMS``
blocks: element ``e`` is element ``e % BLOCK_ELEMS`` of block ``e // BLOCK_ELEMS``, and rows play no
part in the decode.

One program per CHUNK of elements, a multiple of every block size: a chunk is a [blocks,
BLOCK_ELEMS] tile starting on a block boundary (the int64 part of each address is one scalar per
program). A block's own scalars (its fp16 scales) load as a [blocks, 1] column, once per thread for
the elements it holds of that block; each element loads the few other bytes it needs (its nibble,
its high bit(s), its 6-bit packed sub-block scale and minimum) and computes its float32 value with
exactly gguf-py's float32 operations, in gguf-py's order (`gguf.quants`, the oracle of the
tests; `dequantize_blocks` is the format's torch reference of the same); the launch passes
``enable_fp_fusion=False`` so a GPU never contracts a multiply and an add into an FMA where the
reference rounds twice (every product here is exact in float32, so an FMA would round the same
today: the flag keeps that from resting on it). The value is then rounded once to the output
dtype: fp16 by the conversion (round to nearest even), bf16 by integer operations as in
`endor_ray.kernels.dequant` (so the interpreter and a GPU agree bit for bit), fp32 as it is.

Sizes for the GPU: chunks of 2048 with 16 warps, 4 consecutive elements per thread, capped at 32
registers (15-26 used, no spills, 100% occupancy on sm_80 and sm_90). Compiled for sm_90, that is
14-42 SASS instructions (fp16 output 16-36; bf16's integer rounding adds 6) and 0.8-1.8 global
loads per element, against 48-104 and 3-9 (fp16) with one element per thread loading every field
byte by byte (estimated, not measured: at an H200's 4.3 TB/s and ~2.5 bytes per element an
SM has ~17 instruction slots per element, so instructions, not bytes, bound this kernel); 8
per thread reach the 32-register cap. `tests/test_gguf_kernel_aot.py` compiles every block type x
output dtype ahead of time and checks registers, spills and occupancy without a GPU.

A program reads only bytes of its own blocks, and the wrapper checks that ``values`` holds exactly
the blocks the shape calls for: any bytes decode without a read out of bounds (non-finite fp16
scales give NaN/inf, which no file written by llama.cpp holds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import IQ4_NL_VALUES, block_type, dequantize_blocks
from endor_ray.format.tensor import EncodedTensor
from endor_ray.kernels.launch import MAX_REGISTERS, checked_output

CHUNK = 2048  # elements per program: 4 per thread with 16 warps, a multiple of every block size
NUM_WARPS = 16


def _codebook_word(first: int) -> int:
    """IQ4_NL levels first .. first + 3, each + 128 (so 1..241), as the bytes of one signed int32."""
    word = sum((IQ4_NL_VALUES[first + byte] + 128) << (8 * byte) for byte in range(4))
    return word - (1 << 32) if word >= 1 << 31 else word


# The 16-level codebook in four int32 words (Triton has no constant arrays): 3 selects and a shift per element
_IQ4_NL_WORD_0, _IQ4_NL_WORD_1 = tl.constexpr(_codebook_word(0)), tl.constexpr(_codebook_word(4))
_IQ4_NL_WORD_2, _IQ4_NL_WORD_3 = tl.constexpr(_codebook_word(8)), tl.constexpr(_codebook_word(12))


@triton.jit
def _byte(block_ptr, offset, mask):
    """Byte `offset` of each element's block, as int32 in [0, 255]."""
    return tl.load(block_ptr + offset, mask=mask, other=0).to(tl.int32)


@triton.jit
def _fp16(block_ptr, offset, mask):
    """The fp16 at (even) byte `offset` of each element's block, as float32 (one 2-byte load: every
    block type's size and fp16 offsets are even, and the wrapper checks the blocks are 2-aligned)."""
    return tl.load((block_ptr + offset).to(tl.pointer_type(tl.float16)), mask=mask, other=0).to(tl.float32)


@triton.jit
def _nibble(block_ptr, offset, index, mask):
    """The 4-bit code of element `index` in 32-element groups of 16 bytes (low nibbles first)."""
    return (_byte(block_ptr, offset + index % 16, mask) >> (index // 16 * 4)) & 0xF


@triton.jit
def _q8_0(block_ptr, index, mask):  # d: fp16, qs: int8[32]
    d = _fp16(block_ptr, 0, mask)
    x = tl.load(block_ptr + 2 + index, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return x * d


@triton.jit
def _q4_0(block_ptr, index, mask):  # d: fp16, qs: 16 bytes of nibbles
    d = _fp16(block_ptr, 0, mask)
    return d * (_nibble(block_ptr, 2, index, mask) - 8).to(tl.float32)


@triton.jit
def _q4_1(block_ptr, index, mask):  # d, m: fp16, qs: 16 bytes of nibbles
    d = _fp16(block_ptr, 0, mask)
    m = _fp16(block_ptr, 2, mask)
    return (d * _nibble(block_ptr, 4, index, mask).to(tl.float32)) + m


@triton.jit
def _q5_code(block_ptr, qh_offset, qs_offset, index, mask):
    """The 5-bit code of element `index`: its nibble plus bit `index` of the little-endian uint32 qh."""
    high = (_byte(block_ptr, qh_offset + index // 8, mask) >> (index % 8)) & 1
    return _nibble(block_ptr, qs_offset, index, mask) | (high << 4)


@triton.jit
def _q5_0(block_ptr, index, mask):  # d: fp16, qh: uint32, qs: 16 bytes of nibbles
    d = _fp16(block_ptr, 0, mask)
    return d * (_q5_code(block_ptr, 2, 6, index, mask) - 16).to(tl.float32)


@triton.jit
def _q5_1(block_ptr, index, mask):  # d, m: fp16, qh: uint32, qs: 16 bytes of nibbles
    d = _fp16(block_ptr, 0, mask)
    m = _fp16(block_ptr, 2, mask)
    return (d * _q5_code(block_ptr, 4, 8, index, mask).to(tl.float32)) + m


@triton.jit
def _k_scale_min(block_ptr, sub, mask):
    """Sub-block `sub`'s 6-bit scale and minimum from the 12 packed bytes at offset 4 (ggml's
    get_scale_min_k4): sub < 4 in the low 6 bits of bytes sub and sub + 4; sub >= 4 in the
    nibbles of byte sub + 4 and the top 2 bits of bytes sub - 4 (scale) and sub (minimum)."""
    low = sub < 4
    first = _byte(block_ptr, 4 + sub, mask)  # sub < 4: scale; else: high bits of the minimum
    second = _byte(block_ptr, 8 + sub, mask)  # sub < 4: minimum; else: both nibbles
    top = _byte(block_ptr, 4 + sub % 4, mask)  # sub >= 4: high bits of the scale
    scale = tl.where(low, first & 63, (second & 0xF) | ((top >> 2) & 0x30))
    minimum = tl.where(low, second & 63, (second >> 4) | ((first >> 2) & 0x30))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _q4_k(block_ptr, index, mask):  # d, dmin: fp16, scales: 12 bytes, qs: 128 bytes
    sub = index // 32  # 8 sub-blocks of 32; bytes 32*(sub // 2) hold pair sub // 2, low nibbles first
    scale, minimum = _k_scale_min(block_ptr, sub, mask)
    d = _fp16(block_ptr, 0, mask) * scale
    dm = _fp16(block_ptr, 2, mask) * minimum
    code = (_byte(block_ptr, 16 + index // 64 * 32 + index % 32, mask) >> (sub % 2 * 4)) & 0xF
    return d * code.to(tl.float32) - dm


@triton.jit
def _q5_k(block_ptr, index, mask):  # d, dmin: fp16, scales: 12 bytes, qh: 32 bytes, qs: 128 bytes
    sub = index // 32
    scale, minimum = _k_scale_min(block_ptr, sub, mask)
    d = _fp16(block_ptr, 0, mask) * scale
    dm = _fp16(block_ptr, 2, mask) * minimum
    low = (_byte(block_ptr, 48 + index // 64 * 32 + index % 32, mask) >> (sub % 2 * 4)) & 0xF
    high = (_byte(block_ptr, 16 + index % 32, mask) >> sub) & 1  # bit sub of byte index % 32
    return d * (low | (high << 4)).to(tl.float32) - dm


@triton.jit
def _q6_k(block_ptr, index, mask):  # ql: 128 bytes, qh: 64 bytes, scales: int8[16], d: fp16
    half = index // 128  # each half: 64 ql bytes (two nibble rows of 64), 32 qh bytes (four 2-bit rows)
    low = (_byte(block_ptr, half * 64 + index % 64, mask) >> (index // 64 % 2 * 4)) & 0xF
    high = (_byte(block_ptr, 128 + half * 32 + index % 32, mask) >> (index // 32 % 4 * 2)) & 3
    scale = tl.load(block_ptr + 192 + index // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
    d = _fp16(block_ptr, 208, mask) * scale.to(tl.float32)
    return d * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _q3_k(block_ptr, index, mask):  # hmask: 32 bytes, qs: 64 bytes, scales: 12 bytes, d: fp16 @108
    sub = index // 16  # 16 sub-blocks of 16, each with a signed 6-bit scale
    low = (_byte(block_ptr, 32 + index // 128 * 32 + index % 32, mask) >> (index // 32 % 4 * 2)) & 3
    high = (_byte(block_ptr, index % 32, mask) >> (index // 32)) & 1  # set: no offset of -4
    scale_low = (_byte(block_ptr, 96 + sub % 8, mask) >> (sub // 8 * 4)) & 0xF
    scale_high = (_byte(block_ptr, 104 + sub % 4, mask) >> (sub // 4 * 2)) & 3
    d = _fp16(block_ptr, 108, mask) * ((scale_low | (scale_high << 4)) - 32).to(tl.float32)
    return d * (low - 4 + high * 4).to(tl.float32)


@triton.jit
def _q2_k(block_ptr, index, mask):  # scales: 16 bytes (scale | min << 4), qs: 64 bytes, d, dmin: fp16 @80
    packed = _byte(block_ptr, index // 16, mask)
    d = _fp16(block_ptr, 80, mask) * (packed & 0xF).to(tl.float32)
    dm = _fp16(block_ptr, 82, mask) * (packed >> 4).to(tl.float32)
    code = (_byte(block_ptr, 16 + index // 128 * 32 + index % 32, mask) >> (index // 32 % 4 * 2)) & 3
    return d * code.to(tl.float32) - dm


@triton.jit
def _iq4_nl(block_ptr, index, mask):  # d: fp16, qs: 16 bytes of nibbles indexing the codebook
    d = _fp16(block_ptr, 0, mask)
    nibble = _nibble(block_ptr, 2, index, mask)
    word = tl.where(nibble < 8, tl.where(nibble < 4, _IQ4_NL_WORD_0, _IQ4_NL_WORD_1),
                    tl.where(nibble < 12, _IQ4_NL_WORD_2, _IQ4_NL_WORD_3))
    level = ((word >> (nibble % 4 * 8)) & 0xFF) - 128
    return d * level.to(tl.float32)


@triton.jit
def gguf_dequant_kernel(
    blocks_ptr,  # [numel // BLOCK_ELEMS * TYPE_SIZE] uint8: the blocks in order
    out_ptr,  # [numel] float16 | float32 | int16 (bfloat16 bits)
    numel,
    ENCODING: tl.constexpr,  # a GGUF_ENCODINGS name
    BLOCK_ELEMS: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    chunk_idx = tl.program_id(0).to(tl.int64)
    block_in_chunk = tl.arange(0, CHUNK // BLOCK_ELEMS)[:, None]  # [blocks, 1]: per-block bytes load once
    index = tl.arange(0, BLOCK_ELEMS)[None, :]  # [1, BLOCK_ELEMS]: the element within its block
    elem_idx = chunk_idx * CHUNK + block_in_chunk * BLOCK_ELEMS + index  # [blocks, BLOCK_ELEMS]
    mask = chunk_idx * CHUNK + block_in_chunk * BLOCK_ELEMS < numel  # [blocks, 1]: whole blocks
    block_ptr = blocks_ptr + chunk_idx * (CHUNK // BLOCK_ELEMS * TYPE_SIZE) + block_in_chunk * TYPE_SIZE
    if ENCODING == "q8_0":
        value = _q8_0(block_ptr, index, mask)
    elif ENCODING == "q4_0":
        value = _q4_0(block_ptr, index, mask)
    elif ENCODING == "q4_1":
        value = _q4_1(block_ptr, index, mask)
    elif ENCODING == "q5_0":
        value = _q5_0(block_ptr, index, mask)
    elif ENCODING == "q5_1":
        value = _q5_1(block_ptr, index, mask)
    elif ENCODING == "q4_k":
        value = _q4_k(block_ptr, index, mask)
    elif ENCODING == "q5_k":
        value = _q5_k(block_ptr, index, mask)
    elif ENCODING == "q6_k":
        value = _q6_k(block_ptr, index, mask)
    elif ENCODING == "q3_k":
        value = _q3_k(block_ptr, index, mask)
    elif ENCODING == "q2_k":
        value = _q2_k(block_ptr, index, mask)
    else:
        tl.static_assert(ENCODING == "iq4_nl")
        value = _iq4_nl(block_ptr, index, mask)
    if OUT_BF16:  # round to nearest even by integer ops, the same under the interpreter and on a GPU
        word = value.to(tl.int32, bitcast=True)
        rounded = (word + 0x7FFF + ((word >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded & 0xFFFF)  # NaN: only from non-finite scales
        out = ((rounded ^ 0x8000) - 0x8000).to(tl.int16)  # the bf16 bits, into an int16 view
    else:
        out = value.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even; fp32: itself
    tl.store(out_ptr + elem_idx, out, mask=mask)


def launch_config(encoding: str, out_dtype: torch.dtype) -> dict:
    """Compile-time constants and launch options of one variant (what the AOT test compiles)."""
    block = block_type(encoding)
    return {"ENCODING": encoding, "BLOCK_ELEMS": block.block_elems, "TYPE_SIZE": block.type_size, "CHUNK": CHUNK,
            "OUT_BF16": out_dtype == torch.bfloat16, "num_warps": NUM_WARPS, "maxnreg": MAX_REGISTERS,
            "enable_fp_fusion": False}


def dequantize_gguf(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a GGUF block tensor (arrays on the GPU, or on CPU under TRITON_INTERPRET=1) into `out`
    or a new tensor of enc's shape and dtype. Checks sizes only, never the data (a GPU sync)."""
    out = checked_output(enc, out)  # validates enc: dense, values alone, exactly its blocks' bytes
    if not enc.gguf:
        raise FormatError(f"dequantize_gguf decodes GGUF block tensors, got a {enc.values_encoding} tensor")
    if enc.values.data_ptr() % 2:  # fp16 scales load as 2-byte words (a store aligns every part to 64)
        raise FormatError(f"{enc.values_encoding} values must start at an even address, "
                          f"got {enc.values.data_ptr():#x}")
    if enc.numel == 0:
        return out
    target = out.view(-1).view(torch.int16) if enc.dtype == torch.bfloat16 else out.view(-1)
    grid = (triton.cdiv(enc.numel, CHUNK),)
    gguf_dequant_kernel[grid](enc.values, target, enc.numel, **launch_config(enc.values_encoding, enc.dtype))
    return out


def dequantize_gguf_reference(enc: EncodedTensor) -> torch.Tensor:
    """What the kernel computes: the format's float32 decode (gguf-py's), rounded once to enc's dtype."""
    rows, cols = enc.rows_cols
    return dequantize_blocks(enc.values, enc.values_encoding, rows, cols).to(enc.dtype).view(enc.shape)
