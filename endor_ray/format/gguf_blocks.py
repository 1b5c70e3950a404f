"""GGUF block types as value encodings: llama.cpp's (ggml's) quantized blocks, byte for byte.

Spec, format version 3 (docs/FORMAT.md says the same with a table)
-------------------------------------------------------------------
``values_encoding`` one of ``GGUF_ENCODINGS`` (lower-case ggml type names) stores a tensor of shape
``(..., cols)`` (``rows = numel // cols``) in layout ``"dense"`` as one array, ``values``:
``uint8[numel // block_elems * type_size]``, the blocks of the tensor's elements in row-major
(flattened) order: block ``b`` holds elements ``[b * block_elems, (b + 1) * block_elems)`` of the
flattened tensor. The 32-element types need ``cols`` a multiple of 32; the 256-element (super-block)
types q4_k, q5_k, q6_k, q3_k and q2_k need only ``numel`` a multiple of 256. Where ``cols`` is a
multiple of ``block_elems`` the blocks are each row's blocks in order: exactly the bytes a GGUF
file holds for a ``[rows, cols]`` tensor of that type (ggml's ``ne0 = cols``), so a GGUF's blocks
are kept as they are. Other shapes are this format's own (llama.cpp requires whole rows): e.g. a
``[576, 576]`` q4_k tensor's super-block 2 holds row 0's last 64 elements and row 1's first 192;
with ``cols`` a multiple of 32 every sub-block of 16 or 32 still lies inside one row and only the
super-block's f16 scales span two. No scales, offsets or bitmap; ``nnz = numel``, ``group_size = 0``.

Within a block (all fields little-endian; ``f16`` is an IEEE half, read exactly as float32;
``q[e]`` is the integer code of block element ``e``, converted exactly to float32)::

    type  elems bytes  layout (byte offsets)                      element e decodes to (float32)
    q8_0   32    34    d f16 @0, qs int8[32] @2                   q = qs[e]; q * d
    q4_0   32    18    d @0, qs u8[16] @2                         q = nib(e) - 8; d * q
    q4_1   32    20    d @0, m f16 @2, qs u8[16] @4               q = nib(e); (d * q) + m
    q5_0   32    22    d @0, qh u32 @2, qs u8[16] @6              q = nib(e) | bit(e) << 4, - 16; d * q
    q5_1   32    24    d @0, m @2, qh u32 @4, qs u8[16] @8        q = nib(e) | bit(e) << 4; (d * q) + m
    q4_k  256   144    d @0, dmin @2, scales u8[12] @4, qs @16     (d * sc[s]) * q - (dmin * mn[s])
    q5_k  256   176    d @0, dmin @2, scales @4, qh u8[32] @16,    (d * sc[s]) * q - (dmin * mn[s])
                       qs u8[128] @48
    q6_k  256   210    ql u8[128] @0, qh u8[64] @128,              (d * float(sc[s])) * (q - 32)
                       sc int8[16] @192, d f16 @208
    q3_k  256   110    hmask u8[32] @0, qs u8[64] @32,             (d * float(sc[s])) * q
                       scales u8[12] @96, d f16 @108
    q2_k  256    84    scales u8[16] @0, qs u8[64] @16,            (d * sc[s]) * q - (dmin * mn[s])
                       d f16 @80, dmin f16 @82
    iq4_nl 32    18    d @0, qs u8[16] @2                         q = KV[nib(e)]; d * q

where, for the 32-element types, ``nib(e)`` is the low nibble of ``qs[e]`` for ``e < 16`` and the
high nibble of ``qs[e - 16]`` otherwise, and ``bit(e)`` is bit ``e`` of ``qh``. For q4_k/q5_k the
256 elements are 8 sub-blocks ``s = e // 32`` of 32, ``l = e % 32``: ``q`` is the low nibble of
``qs[32 * (s // 2) + l]`` for even ``s``, its high nibble for odd ``s``, plus (q5_k) bit ``s`` of
``qh[l]`` times 16. The 6-bit sub-block scale ``sc[s]`` and minimum ``mn[s]`` come from the 12
scale bytes ``S``: for ``s < 4`` ``sc = S[s] & 63``, ``mn = S[s + 4] & 63``; for ``s >= 4``
``sc = (S[s + 4] & 15) | (S[s - 4] >> 6) << 4``, ``mn = (S[s + 4] >> 4) | (S[s] >> 6) << 4``. For
q6_k ``e = 128 h + 32 k + l`` (``h`` in 0..1, ``k`` in 0..3): the low 4 bits are the low
(``k < 2``) or high (``k >= 2``) nibble of ``ql[64 h + 32 (k % 2) + l]``, the high 2 bits bits
``2k, 2k+1`` of ``qh[32 h + l]``; its sub-block of 16 is ``s = e // 16``. q3_k and q2_k split
``e`` the same way: their 2-bit part is bits ``2k, 2k+1`` of ``qs[32 h + l]`` and the sub-block of
16 is ``s = e // 16``. For q2_k ``q`` is that 2-bit part (0..3), ``sc[s] = scales[s] & 15`` and
``mn[s] = scales[s] >> 4``. For q3_k ``q = low - 4 * (1 - hbit)`` (-4..3; a set high bit means no
offset), ``hbit`` bit ``e // 32`` of ``hmask[e % 32]``, and the signed 6-bit scale is
``sc[s] = ((S[s % 8] >> 4 (s // 8)) & 15 | ((S[8 + s % 4] >> 2 (s // 4)) & 3) << 4) - 32`` from the
12 scale bytes ``S``. iq4_nl is q4_0's layout with a non-uniform codebook: ``KV = (-127, -104, -83,
-65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)`` (ggml's ``kvalues_iq4nl``).

Each product and sum above is one IEEE float32 operation in the order written (no fused
multiply-add): exactly gguf-py's ``gguf.quants.dequantize`` and llama.cpp's ``dequantize_row_*``.
A tensor of dtype ``D`` decodes element ``e`` to ``D(v)`` (round to nearest even; float32: ``v``).
Non-finite values arise only from non-finite f16 scales, which llama.cpp never writes; decoders
must still read nothing outside the block.

Bytes per weight: q8_0 1.0625, q4_0 0.5625, q4_1 0.625, q5_0 0.6875, q5_1 0.75, q4_k 0.5625,
q5_k 0.6875, q6_k 0.8203, q3_k 0.4297, q2_k 0.3281, iq4_nl 0.5625 (``type_size / block_elems``); a
tensor is ``numel / block_elems * type_size`` bytes.

Encoding (`quantize_blocks`) is llama.cpp's quantizers ported in C's float32 order, bit for bit
(`endor_ray.format.gguf_quantize`): the reference functions ``quantize_row_*_ref`` of
ggml-quants.c, or, given an importance matrix (one weight per column), ``quantize_row_*_impl``.
Weights are converted to float32 first; NaN and infinities, for which llama.cpp's float-to-int
casts are undefined behaviour in C, are quantized as 0.0 (a NaN in a checkpoint is a defect; the
tensor still encodes). ``-0.0`` quantizes as llama.cpp does (it compares equal to ``+0.0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from endor_ray.errors import FormatError


@dataclass(frozen=True)
class BlockType:
    """One ggml block type's geometry: `block_elems` weights in `type_size` bytes."""

    name: str
    block_elems: int
    type_size: int


GGUF_ENCODINGS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_nl")
BLOCK_TYPES: dict[str, BlockType] = {
    block.name: block for block in (
        BlockType("q8_0", 32, 34), BlockType("q4_0", 32, 18), BlockType("q4_1", 32, 20),
        BlockType("q5_0", 32, 22), BlockType("q5_1", 32, 24), BlockType("q4_k", 256, 144),
        BlockType("q5_k", 256, 176), BlockType("q6_k", 256, 210), BlockType("q3_k", 256, 110),
        BlockType("q2_k", 256, 84), BlockType("iq4_nl", 32, 18),
    )
}


def block_type(encoding: str) -> BlockType:
    """The BlockType of `encoding`; FormatError for a name that is not one."""
    if encoding not in BLOCK_TYPES:
        raise FormatError(f"unknown GGUF block encoding {encoding!r}; expected one of {GGUF_ENCODINGS}")
    return BLOCK_TYPES[encoding]


def blocks_fit(encoding: str, rows: int, cols: int) -> bool:
    """Whether a [rows, cols] tensor can be stored as `encoding`'s blocks (the module spec's layout rule)."""
    block = block_type(encoding)
    if block.block_elems == 32:
        return cols % 32 == 0
    return (rows * cols) % block.block_elems == 0


def blocks_nbytes(encoding: str, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] tensor of `encoding`; FormatError unless its blocks fit (`blocks_fit`)."""
    block = block_type(encoding)
    if not blocks_fit(encoding, rows, cols):
        where = "per row" if block.block_elems == 32 else f"per row or flattened; nor is numel = {rows * cols}"
        raise FormatError(f"a {encoding} tensor must hold whole blocks of {block.block_elems} weights; "
                          f"cols = {cols} is not a multiple of {block.block_elems} ({where})")
    return rows * cols // block.block_elems * block.type_size


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """[num_blocks, 1] float32: the f16 at byte `offset` of each block (exact)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 2 * n] uint8: low nibbles of qs [num_blocks, n], then its high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(data: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 8 * n] uint8: bit (b % 8) of byte b // 8 at index b (LSB first)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data.unsqueeze(-1) >> shifts) & 1).flatten(1)


def k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([num_blocks, 8], [num_blocks, 8]) uint8: q4_k/q5_k's 6-bit sub-block scales and minimums."""
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, mn


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


def q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 16] int16: q3_k's signed 6-bit sub-block scales from its 12 scale bytes."""
    low = torch.cat([scales[:, 0:8] & 0x0F, scales[:, 0:8] >> 4], dim=1)  # sub-block s: nibble s // 8 of S[s % 8]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=scales.device).view(1, 4, 1)
    high = ((scales[:, 8:12].unsqueeze(1) >> shifts) & 3).flatten(1)  # bits 2 (s // 4) of S[8 + s % 4]
    return (low | (high << 4)).to(torch.int16) - 32


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 256] uint8: the 2-bit parts of q3_k / q2_k's 64 bytes qs, element 128 h + 32 k + l
    from bits 2k of qs[32 h + l]."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.reshape(qs.shape[0], 2, 1, 32) >> shifts) & 3).reshape(qs.shape[0], 256)


def _decode_32(blocks: torch.Tensor, encoding: str) -> torch.Tensor:
    d = _f16(blocks, 0)  # [num_blocks, 1]
    if encoding == "iq4_nl":
        values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
        return d * values[_nibbles(blocks[:, 2:18]).long()]
    if encoding == "q8_0":
        return blocks[:, 2:34].contiguous().view(torch.int8).float() * d
    if encoding == "q4_0":
        return d * (_nibbles(blocks[:, 2:18]).float() - 8)
    if encoding == "q4_1":
        return (d * _nibbles(blocks[:, 4:20]).float()) + _f16(blocks, 2)
    qh_at, qs_at = (2, 6) if encoding == "q5_0" else (4, 8)
    q = (_nibbles(blocks[:, qs_at:qs_at + 16]) | (_bits(blocks[:, qh_at:qh_at + 4]) << 4)).float()
    return d * (q - 16) if encoding == "q5_0" else (d * q) + _f16(blocks, 2)


def _decode_k(blocks: torch.Tensor, encoding: str) -> torch.Tensor:
    num_blocks = blocks.shape[0]
    if encoding == "q3_k":
        shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(1, 8, 1)
        high = ((blocks[:, 0:32].unsqueeze(1) >> shifts) & 1).reshape(num_blocks, 256)  # bit e // 32 of hmask[e % 32]
        q = (_crumbs(blocks[:, 32:96]).to(torch.int16) - 4 * (1 - high.to(torch.int16))).float()
        scale = _f16(blocks, 108) * q3_k_scales(blocks[:, 96:108]).float()  # [num_blocks, 16]
        return (scale.unsqueeze(-1) * q.view(num_blocks, 16, 16)).reshape(num_blocks, 256)
    if encoding == "q2_k":
        sc = blocks[:, 0:16]
        scale = (_f16(blocks, 80) * (sc & 0x0F).float()).unsqueeze(-1)  # [num_blocks, 16, 1]
        minimum = (_f16(blocks, 82) * (sc >> 4).float()).unsqueeze(-1)
        q = _crumbs(blocks[:, 16:80]).float().view(num_blocks, 16, 16)
        return (scale * q - minimum).reshape(num_blocks, 256)
    if encoding == "q6_k":
        ql = blocks[:, 0:128].reshape(num_blocks, 2, 64)  # two halves of 128 elements
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [num_blocks, 2, 128]: element 32k + l of a half
        qh = blocks[:, 128:192].reshape(num_blocks, 2, 1, 32)
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
        high = ((qh >> shifts) & 3).reshape(num_blocks, 2, 128)
        q = ((low | (high << 4)).float() - 32).reshape(num_blocks, 16, 16)
        scale = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [num_blocks, 16]
        return ((_f16(blocks, 208) * scale).unsqueeze(-1) * q).reshape(num_blocks, 256)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = k_scales_mins(blocks[:, 4:16])
    qs_at = 16 if encoding == "q4_k" else 48
    qs = blocks[:, qs_at:qs_at + 128].reshape(num_blocks, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(num_blocks, 8, 32)
    if encoding == "q5_k":
        q = q | (_bits(blocks[:, 16:48]).view(num_blocks, 32, 8).transpose(1, 2) << 4)
    scale = (d * sc.float()).unsqueeze(-1)  # [num_blocks, 8, 1]
    minimum = (dmin * mn.float()).unsqueeze(-1)
    return (scale * q.float() - minimum).reshape(num_blocks, 256)


def dequantize_blocks(data: torch.Tensor, encoding: str, rows: int, cols: int) -> torch.Tensor:
    """float32 [rows, cols] from the blocks `data` ([rows * cols / block_elems * type_size] uint8, the
    flattened tensor's blocks in order): the torch reference, bit-identical to gguf-py's `dequantize`
    (the module spec)."""
    block = block_type(encoding)
    nbytes = blocks_nbytes(encoding, rows, cols)
    if data.dtype != torch.uint8 or data.numel() != nbytes:
        raise FormatError(f"{encoding} blocks of a [{rows}, {cols}] tensor are {nbytes} uint8, "
                          f"got {data.numel()} {data.dtype}")
    blocks = data.reshape(-1, block.type_size)  # [num_blocks, type_size]
    decode = _decode_32 if block.block_elems == 32 else _decode_k
    return decode(blocks, encoding).reshape(rows, cols)


def quantize_blocks(weight: torch.Tensor, encoding: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 blocks of `weight` ([rows, cols], any float dtype) by llama.cpp's quantizer (see
    `endor_ray.format.gguf_quantize`): the reference one, or with `importance` ([cols] per-column
    weights, e.g. mean squared activations) llama.cpp's importance-matrix search."""
    from endor_ray.format.gguf_quantize import quantize_rows  # the quantizers live beside, not inside, the spec

    if weight.dim() != 2:
        raise FormatError(f"quantize_blocks takes a [rows, cols] weight, got shape {tuple(weight.shape)}")
    blocks_nbytes(encoding, *weight.shape)
    return quantize_rows(weight, encoding, importance)
