"""Quantized values: INT8 / INT4 codes with one scale per group of non-zeros within a row.

Spec, format version 2 (docs/FORMAT.md says the same with an example)
---------------------------------------------------------------------
A tensor of shape ``(..., cols)`` has ``rows = numel // cols`` rows (a 0-d tensor is one row of
one column). With ``values_encoding`` ``"int8"`` or ``"int4"`` and a group size ``G`` (>= 1,
default 128), the *kept* elements (the non-zeros of layout ``"bitmap"``; every element of layout
``"dense"``) of row ``r`` are split, in column order, into groups of ``G`` consecutive kept
elements; the last group of a row may be shorter (ragged). Each row has ``groups_per_row``
scale slots: ``ceil(max_r kept_r / G)`` for a bitmap tensor, ``ceil(cols / G)`` for a dense one
(unused slots hold 0). The arrays::

    values       int8[count]                 "int8": one code per kept element, in [-127, 127]
                 uint8[ceil(count / 2)]      "int4": two codes per byte, low nibble first
                                             (code of kept element v in nibble v % 2 of byte
                                             v // 2, 4-bit two's complement in [-7, 7]; a final
                                             odd nibble is 0)
    scales       dtype[rows * groups_per_row] the tensor's own dtype, row after row
    row_offsets  int64[rows + 1]              "bitmap" only: kept elements before each row
                                             (row_offsets[0] == 0, row_offsets[-1] == nnz);
                                             for "dense" it is implied: r * cols

where ``count`` is nnz (bitmap) or numel (dense). Kept element number ``v`` (in flattened order)
at flat position ``e`` lies in row ``r = e // cols`` and group ``k = (v - row_offsets[r]) // G``
of that row, and decodes to::

    dense[e] = dtype( float32(code[v]) * float32(scales[r * groups_per_row + k]) )

one IEEE float32 multiply (exact: codes have at most 8 bits) and one round-to-nearest-even
conversion to the tensor's dtype. The torch decode in this module defines the dequantized values;
the GPU kernel and the CPU decoder reproduce them bit for bit.

Encoding (``quantize``) is symmetric round-to-nearest: a group's scale is its largest finite
magnitude divided by ``qmax`` (127 or 7), rounded to the tensor's dtype, and a value's code is
``clamp(round_half_even(v / scale), -qmax, qmax)``; NaN codes to 0 and infinities to +-qmax, a
group whose scale is 0 codes to 0. Symmetric, not asymmetric, because the values left after
magnitude-type pruning sit on both sides of zero with a hole around it, so their range is close
to symmetric: a zero point would cost a byte per group and an add per element for almost no
resolution (``-8`` is left unused in INT4 for the same reason). A caller that already chose the
scales (SparseGPT's joint pass) passes them, and the codes reproduce its dequantized values.

Sizes: values ``count`` bytes (int8) or ``ceil(count / 2)`` (int4), scales
``rows * groups_per_row * itemsize``, row offsets ``8 * (rows + 1)`` (bitmap). Per weight at
sparsity ``s`` with a bf16 bitmap tensor: ``(1 - s) * bits / 8 + 1/8 + 2 (1 - s) / G`` plus the
offsets, i.e. 0.64 (INT8) and 0.39 (INT4) at 50%, against 2.0 dense bf16.
"""

from __future__ import annotations

import math

import torch

from endor_ray.errors import FormatError

QUANTIZED_ENCODINGS = {"int8": 127, "int4": 7}  # encoding -> qmax
DEFAULT_GROUP_SIZE = 128
MAX_GROUP_SIZE = 1 << 20


def check_encoding(encoding: str, group_size: int) -> None:
    """FormatError unless `encoding` is quantized and `group_size` is in [1, 2^20]."""
    if encoding not in QUANTIZED_ENCODINGS:
        raise FormatError(f"unknown quantized encoding {encoding!r}; expected one of {sorted(QUANTIZED_ENCODINGS)}")
    if not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise FormatError(f"group size must be an integer in [1, {MAX_GROUP_SIZE}], got {group_size!r}")


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor of `shape`: the last dimension is a row."""
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return math.prod(shape[:-1]), cols


def codes_nbytes(encoding: str, count: int) -> int:
    return count if encoding == "int8" else (count + 1) // 2


def groups_per_row(row_counts: torch.Tensor, group_size: int) -> int:
    """Scale slots per row for kept counts `row_counts` ([rows] int64)."""
    return 0 if row_counts.numel() == 0 else -(-int(row_counts.max()) // group_size)


def scale_index(rows_of_kept: torch.Tensor, row_offsets: torch.Tensor, per_row: int, group_size: int) -> torch.Tensor:
    """[count] int64: the scale slot of each kept element (rows_of_kept: its row; v: its rank)."""
    rank = torch.arange(rows_of_kept.numel(), dtype=torch.int64, device=rows_of_kept.device)
    return rows_of_kept * per_row + (rank - row_offsets[rows_of_kept]) // group_size


def group_scales(values: torch.Tensor, index: torch.Tensor, num_scales: int, encoding: str) -> torch.Tensor:
    """dtype[num_scales]: max finite |value| of each group / qmax, rounded to the values' dtype."""
    magnitude = values.float().abs()
    magnitude = torch.where(torch.isfinite(magnitude), magnitude, torch.zeros_like(magnitude))
    amax = torch.zeros(num_scales, dtype=torch.float32, device=values.device)
    amax.scatter_reduce_(0, index, magnitude, reduce="amax", include_self=True)
    return (amax / QUANTIZED_ENCODINGS[encoding]).to(values.dtype)


def quantize(values: torch.Tensor, index: torch.Tensor, scales: torch.Tensor, encoding: str) -> torch.Tensor:
    """int8[count] codes of `values` given each one's scale slot `index` (see the module spec)."""
    qmax = QUANTIZED_ENCODINGS[encoding]
    scale = scales.float()[index]
    codes = torch.round(values.float() / torch.where(scale > 0, scale, torch.ones_like(scale)))
    codes = torch.nan_to_num(codes, nan=0.0).clamp_(-qmax, qmax)
    return torch.where(scale > 0, codes, torch.zeros_like(codes)).to(torch.int8)


def encode_values(flat: torch.Tensor, mask: torch.Tensor, row_counts: torch.Tensor, cols: int, group_size: int,
                  encoding: str, scales: torch.Tensor | None, row_offsets: bool) -> dict:
    """The quantized fields of an EncodedTensor for the kept elements `mask` of `flat` ([numel]):
    packed codes, scales (computed, or `scales` checked and used) and, if `row_offsets`, the row
    offsets; `row_counts` ([rows]) are the kept elements per row."""
    rows = row_counts.numel()
    per_row = groups_per_row(row_counts, group_size)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(row_counts, dim=0, out=offsets[1:])
    positions = torch.nonzero(mask.cpu()).view(-1)
    index = scale_index(positions // max(cols, 1), offsets, per_row, group_size)
    kept = flat.cpu()[positions]
    if scales is None:
        scales = group_scales(kept, index, rows * per_row, encoding)
    elif scales.shape != (rows * per_row,) or scales.dtype != flat.dtype or not bool(torch.isfinite(scales.float()).all()):
        raise FormatError(f"scales must be {rows * per_row} finite {flat.dtype} values "
                          f"({rows} rows x {per_row} groups), got {tuple(scales.shape)} {scales.dtype}")
    fields = {"values": pack_codes(quantize(kept, index, scales.cpu(), encoding), encoding).to(flat.device),
              "scales": scales.contiguous().to(flat.device), "values_encoding": encoding, "group_size": group_size}
    if row_offsets:
        fields["row_offsets"] = offsets.to(flat.device)
    return fields


def pack_codes(codes: torch.Tensor, encoding: str) -> torch.Tensor:
    """The `values` array for int8 codes: themselves (int8), or nibbles two per byte (uint8)."""
    if encoding == "int8":
        return codes.to(torch.int8).contiguous()
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_codes(values: torch.Tensor, count: int, encoding: str) -> torch.Tensor:
    """Inverse of `pack_codes`: int8[count]."""
    if encoding == "int8":
        return values.view(torch.int8)[:count]
    low = (values.to(torch.int16) << 12).to(torch.int16) >> 12  # sign-extend the low nibble
    high = (values.to(torch.int16) << 8).to(torch.int16) >> 12
    return torch.stack([low, high], dim=1).view(-1)[:count].to(torch.int8)


def dequantize(codes: torch.Tensor, index: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """scales.dtype[count]: float32(code) * float32(scale), rounded once to the scales' dtype."""
    if codes.numel() == 0:
        return torch.empty(0, dtype=scales.dtype, device=scales.device)
    safe = index.clamp(0, max(scales.numel() - 1, 0))
    scale = scales.float()[safe] if scales.numel() else torch.zeros(index.shape, device=index.device)
    scale = torch.where(index < scales.numel(), scale, torch.zeros_like(scale))
    return (codes.float() * scale).to(scales.dtype)
