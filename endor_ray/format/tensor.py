"""The Endor sparse format: a bitmap of non-zero positions plus the packed non-zero values.

Spec, format version 3 (docs/FORMAT.md says the same with pictures)
-------------------------------------------------------------------
A weight ``W`` of any shape, dtype float16, bfloat16 or float32, with ``N = W.numel()`` elements,
is flattened row-major. An element is a *zero* iff its bit pattern is all zeros (``+0.0``);
``-0.0`` and every NaN are non-zeros and survive bit for bit. With a block size ``B`` (a power of
two in [256, 65536], default 4096) and ``num_blocks = ceil(N / B)``, layout ``"bitmap"`` stores::

    bitmap         uint8[ceil(N / 8)]      bit (e % 8) of byte (e // 8) is 1 iff element e is a
                                           non-zero (LSB first; the padding bits past N are 0)
    block_offsets  int64[num_blocks + 1]   exclusive prefix sum of the per-block non-zero counts;
                                           block_offsets[0] == 0, block_offsets[-1] == nnz
    values         dtype[nnz]              the non-zeros in flattened order, in W's own dtype

Block ``b`` covers elements ``[b*B, min((b+1)*B, N))`` and decodes on its own: its element
``b*B + k`` is ``values[block_offsets[b] + (number of set bits of block b before k)]`` if bit
``b*B + k`` is set, else ``+0.0``. On a little-endian machine the bitmap read as uint32 words is
the same LSB-first bit order, so a kernel may load it by words.

Layout ``"dense"`` stores only ``values = W.flatten()`` (``dtype[N]``). It is used when the bitmap
would not save bytes (``encode`` picks it: nothing that is at least as big as dense is ever
stored sparse) and for every tensor of a store converted with ``--format dense``.

``values_encoding`` names how ``values`` is stored: ``"raw"`` (the tensor's own dtype, version 1
and later), or, since version 2, ``"int8"`` / ``"int4"`` codes with one scale per group of kept
elements within a row, which add the arrays ``scales`` and (layout ``"bitmap"``) ``row_offsets``;
`endor_ray.format.quant` holds that part of the spec. Since version 3 it may also be one of
llama.cpp's block types (``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"q4_k"``,
``"q5_k"``, ``"q6_k"``, ``"q3_k"``, ``"q2_k"``, ``"iq4_nl"``: `GGUF_ENCODINGS`), layout ``"dense"``
only: ``values`` is then the uint8 blocks a GGUF file holds for the tensor, nothing else is
stored, ``nnz = numel`` and ``group_size = 0``; `endor_ray.format.gguf_blocks` holds that part
of the spec. Readers reject any other encoding.

Sizes: a raw bitmap tensor takes ``nnz*itemsize + ceil(N/8) + 8*(num_blocks+1)`` bytes; at 50%
sparsity in fp16 that is 0.5 + 1/16 + 8/(2B) of the dense size (0.5635 for B = 4096). Quantized
encodings replace ``nnz*itemsize`` by the sizes in `endor_ray.format.quant`; a GGUF block tensor
is ``rows * cols / block_elems * type_size`` bytes, its blocks over the flattened tensor
(`endor_ray.format.gguf_blocks`).

The checksum of a tensor is CRC-32 (zlib's polynomial) over its parts' bytes in the order
bitmap, block_offsets, row_offsets, scales, values, skipping the parts it does not have (a raw
dense tensor or a GGUF block tensor: values alone). `crc32` computes it with ISA-L
(about 30 GB/s on the development machine, against 1-6 GB/s for zlib), so verifying every read
does not show in a profile; zlib gives the same numbers where ISA-L is missing.

This module is pure torch/numpy: no Ray, no Triton, so it works anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from endor_ray.errors import FormatError
from endor_ray.format import quant
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS, blocks_nbytes, dequantize_blocks, quantize_blocks
from endor_ray.format.quant import DEFAULT_GROUP_SIZE, QUANTIZED_ENCODINGS

try:
    from isal.isal_zlib import crc32  # the same CRC-32 as zlib.crc32, vectorised; releases the GIL
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the slow, equal fallback
    from zlib import crc32

FORMAT_VERSION = 3  # 2 added int8/int4 values, 3 the GGUF block types; every older tensor still reads
DEFAULT_BLOCK_SIZE = 4096
LAYOUTS = ("bitmap", "dense")
VALUES_ENCODINGS = ("raw", *QUANTIZED_ENCODINGS, *GGUF_ENCODINGS)

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# Same-width integer views: masks and copies on these are bit-exact (no NaN canonicalisation).
BITS_DTYPES: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16, and so on; FormatError for an unsupported dtype."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise FormatError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of `dtype_name`."""
    if name not in DTYPES:
        raise FormatError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_block_size(block_size: int) -> None:
    """Raise FormatError unless block_size is a power of two in [256, 65536]."""
    if not (256 <= block_size <= 65536 and block_size & (block_size - 1) == 0):
        raise FormatError(f"block size must be a power of two in [256, 65536], got {block_size}")


PART_ORDER = ("bitmap", "block_offsets", "row_offsets", "scales", "values")  # checksum order


@dataclass(frozen=True)
class EncodedTensor:
    """One weight in the Endor format. Arrays are 1-D, contiguous, on any device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "bitmap" | "dense"
    nnz: int
    values: torch.Tensor  # raw: [nnz] ("bitmap") / [numel] ("dense") of dtype; quantized: codes; gguf: uint8 blocks
    bitmap: torch.Tensor | None = None  # [ceil(numel / 8)] uint8, LSB first
    block_offsets: torch.Tensor | None = None  # [num_blocks + 1] int64
    block_size: int = DEFAULT_BLOCK_SIZE
    values_encoding: str = "raw"
    scales: torch.Tensor | None = None  # quantized: [rows * groups_per_row] dtype
    row_offsets: torch.Tensor | None = None  # quantized "bitmap": [rows + 1] int64
    group_size: int = 0  # int8/int4: kept elements per group (0 for "raw" and the GGUF block types)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

    @property
    def rows_cols(self) -> tuple[int, int]:
        return quant.rows_cols(self.shape)

    @property
    def quantized(self) -> bool:
        """Values not in the tensor's own dtype: int8/int4 codes or GGUF blocks."""
        return self.values_encoding != "raw"

    @property
    def gguf(self) -> bool:
        """Values are llama.cpp blocks (`endor_ray.format.gguf_blocks`): no scales or offsets of their own."""
        return self.values_encoding in GGUF_ENCODINGS

    @property
    def value_count(self) -> int:
        """Elements `values` holds: nnz (bitmap) or numel (dense)."""
        return self.nnz if self.layout == "bitmap" else self.numel

    @property
    def groups_per_row(self) -> int:
        rows = self.rows_cols[0]
        return self.scales.numel() // rows if self.scales is not None and rows else 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes this tensor occupies in a store and on the wire."""
        return sum(part.numel() * part.element_size() for part in self.parts().values())

    def parts(self) -> dict[str, torch.Tensor]:
        """The arrays that make up this tensor, in checksum order (`PART_ORDER`)."""
        arrays = {"values": self.values, "scales": self.scales}
        if self.layout == "bitmap":
            arrays.update(bitmap=self.bitmap, block_offsets=self.block_offsets, row_offsets=self.row_offsets)
        return {name: arrays[name] for name in PART_ORDER if arrays.get(name) is not None}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedTensor:
        """The same tensor with its arrays moved to `device`."""
        moved = {name: part.to(device, non_blocking=non_blocking) for name, part in self.parts().items()}
        return EncodedTensor(
            shape=self.shape, dtype=self.dtype, layout=self.layout, nnz=self.nnz, block_size=self.block_size,
            values_encoding=self.values_encoding, group_size=self.group_size, **moved,
        )

    def expected_parts(self) -> tuple[str, ...]:
        """The arrays this tensor's layout and encoding call for, in `PART_ORDER` (no data read)."""
        if self.gguf:
            return ("values",)
        names = {"values"} | ({"scales"} if self.quantized else set())
        if self.layout == "bitmap":
            names |= {"bitmap", "block_offsets"} | ({"row_offsets"} if self.quantized else set())
        return tuple(part for part in PART_ORDER if part in names)

    def part_dtype(self, part: str) -> torch.dtype:
        """The dtype of array `part` for this tensor's metadata."""
        if part in ("bitmap",):
            return torch.uint8
        if part in ("block_offsets", "row_offsets"):
            return torch.int64
        if part == "values" and self.quantized:
            return torch.int8 if self.values_encoding == "int8" else torch.uint8  # int4 nibbles, GGUF blocks
        return self.dtype


def bitmap_nbytes(numel: int, nnz: int, itemsize: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of a raw bitmap-layout tensor with these counts (the formula in the spec)."""
    num_blocks = math.ceil(numel / block_size)
    return nnz * itemsize + math.ceil(numel / 8) + 8 * (num_blocks + 1)


def encoded_nbytes(shape: tuple[int, ...], itemsize: int, layout: str, nnz: int, encoding: str = "raw",
                   group_size: int = DEFAULT_GROUP_SIZE, groups_per_row: int | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of a tensor with this metadata; `groups_per_row` None assumes nnz spread evenly over rows."""
    numel = math.prod(shape)
    rows, cols = quant.rows_cols(shape)
    if encoding in GGUF_ENCODINGS:
        _check_gguf_layout(encoding, layout)
        return blocks_nbytes(encoding, rows, cols)
    count = nnz if layout == "bitmap" else numel
    if encoding == "raw":
        values = count * itemsize
    else:
        if groups_per_row is None:
            groups_per_row = math.ceil(math.ceil(count / rows) / group_size) if rows else 0
        values = quant.codes_nbytes(encoding, count) + rows * groups_per_row * itemsize
        values += 8 * (rows + 1) if layout == "bitmap" else 0
    if layout == "dense":
        return values
    return values + math.ceil(numel / 8) + 8 * (math.ceil(numel / block_size) + 1)


def _check_gguf_layout(encoding: str, layout: str | None) -> None:
    if layout not in (None, "dense"):
        raise FormatError(f"the GGUF block encoding {encoding} is stored in layout 'dense' only (its blocks hold "
                          f"every weight), not {layout!r}; use layout='dense' or an int8/int4 encoding for 'bitmap'")


def gguf_tensor(blocks: torch.Tensor, encoding: str, shape: tuple[int, ...], dtype: torch.dtype,
                block_size: int = DEFAULT_BLOCK_SIZE) -> EncodedTensor:
    """An EncodedTensor holding existing GGUF blocks as they are (no re-quantization): `blocks` is
    the uint8 bytes a GGUF file holds for a tensor of `shape` (ggml's ne0 = shape[-1]), decoded to
    `dtype`. FormatError if the sizes do not fit."""
    if blocks.dtype != torch.uint8:
        raise FormatError(f"GGUF blocks are bytes (uint8), got {blocks.dtype}")
    enc = EncodedTensor(tuple(shape), dtype, "dense", math.prod(shape), values=blocks.contiguous().view(-1),
                        block_size=block_size, values_encoding=encoding, group_size=0)
    validate(enc)
    return enc


def nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    """[numel] bool, True where the bit pattern is not +0.0 (so -0.0 and NaN count)."""
    flat = weight.contiguous().view(-1)
    return flat.view(BITS_DTYPES[flat.dtype]) != 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[N] bool -> [ceil(N/8)] uint8, bit (e % 8) of byte (e // 8) = mask[e]."""
    packed = np.packbits(mask.cpu().numpy(), bitorder="little")
    return torch.from_numpy(packed).to(mask.device)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [ceil(N/8)] uint8 -> [N] bool."""
    if bitmap.device.type == "cpu":  # numpy's C loop is ~10x faster than the shifts below
        bits = np.unpackbits(bitmap.numpy(), count=numel, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    bits = (bitmap.view(-1, 1) >> shifts) & 1  # [num_bytes, 8] uint8
    return bits.view(-1)[:numel].bool()


def encode(
    weight: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    layout: str | None = None,
    encoding: str = "raw",
    group_size: int = DEFAULT_GROUP_SIZE,
    mask: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> EncodedTensor:
    """Encode `weight`. layout=None picks "bitmap" if it is smaller than dense, else "dense".

    `encoding` "int8"/"int4" quantizes the kept elements in groups of `group_size` (see
    `endor_ray.format.quant`); a GGUF block type ("q4_1", ...) quantizes every weight with
    llama.cpp's reference quantizer, layout "dense" (see `endor_ray.format.gguf_blocks`). `mask` ([numel] bool) names the kept elements where they are not
    simply the non-zeros (a kept +0.0 keeps its bit); `scales` ([rows * groups_per_row]) are
    used instead of computed ones (only with a quantized encoding, and then a mask that is not
    all kept means layout "bitmap", since the groups count kept elements).
    """
    check_block_size(block_size)
    if weight.dtype not in BITS_DTYPES:
        raise FormatError(f"cannot encode a {weight.dtype} tensor; supported: {sorted(DTYPES)}")
    if layout is not None and layout not in LAYOUTS:
        raise FormatError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if encoding in GGUF_ENCODINGS:
        _check_gguf_layout(encoding, layout)
        if mask is not None or scales is not None:
            raise FormatError(f"a {encoding} tensor keeps every weight and computes its own scales: "
                              "pass neither mask nor scales")
        rows, cols = quant.rows_cols(tuple(weight.shape))
        blocks_nbytes(encoding, rows, cols)  # whole blocks (per row, or flattened for the k-types), checked first
        blocks = quantize_blocks(weight.detach().reshape(rows, cols), encoding)
        return gguf_tensor(blocks, encoding, tuple(weight.shape), weight.dtype, block_size)
    if encoding != "raw":
        quant.check_encoding(encoding, group_size)
    elif scales is not None:
        raise FormatError("scales are given only with a quantized encoding")
    flat = weight.detach().contiguous().view(-1)
    shape = tuple(weight.shape)
    if mask is None:
        mask = nonzero_mask(flat)
    elif mask.shape != flat.shape or mask.dtype != torch.bool:
        raise FormatError(f"mask must be [{flat.numel()}] bool, got {tuple(mask.shape)} {mask.dtype}")
    nnz = int(mask.sum())
    rows, cols = quant.rows_cols(shape)
    row_counts = mask.view(rows, cols).sum(dim=1) if rows and cols else torch.zeros(rows, dtype=torch.int64)
    per_row = quant.groups_per_row(row_counts, group_size)
    if layout is None and scales is not None:
        layout = "dense" if nnz == flat.numel() else "bitmap"
    if layout is None:
        itemsize = flat.element_size()
        sparse_nbytes = encoded_nbytes(shape, itemsize, "bitmap", nnz, encoding, group_size, per_row, block_size)
        dense_nbytes = encoded_nbytes(shape, itemsize, "dense", nnz, encoding, group_size, None, block_size)
        layout = "bitmap" if sparse_nbytes < dense_nbytes else "dense"
    if layout == "dense":
        mask = torch.ones_like(mask)
        row_counts = torch.full((rows,), cols, dtype=torch.int64)
    quantized = {}
    if encoding != "raw":
        quantized = quant.encode_values(flat, mask, row_counts, cols, group_size, encoding, scales,
                                        row_offsets=layout == "bitmap")
    if layout == "dense":
        values = quantized.pop("values", flat.clone())
        return EncodedTensor(shape, flat.dtype, "dense", nnz, values=values, block_size=block_size, **quantized)

    num_blocks = math.ceil(flat.numel() / block_size)
    padded = torch.zeros(num_blocks * block_size, dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = mask
    block_offsets = torch.zeros(num_blocks + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(padded.view(num_blocks, block_size).sum(dim=1), dim=0, out=block_offsets[1:])
    values = quantized.pop("values", None)
    return EncodedTensor(
        shape, flat.dtype, "bitmap", nnz,
        values=flat[mask] if values is None else values,
        bitmap=pack_bits(mask),
        block_offsets=block_offsets,
        block_size=block_size,
        **quantized,
    )


def validate(enc: EncodedTensor) -> None:
    """Raise FormatError if the arrays' dtypes and sizes do not fit the metadata (no data read)."""
    check_block_size(enc.block_size)
    if enc.layout not in LAYOUTS:
        raise FormatError(f"unknown layout {enc.layout!r}; expected one of {LAYOUTS}")
    if enc.values_encoding not in VALUES_ENCODINGS:
        raise FormatError(
            f"values encoding {enc.values_encoding!r} is not supported by format version "
            f"{FORMAT_VERSION}; supported: {VALUES_ENCODINGS}"
        )
    if enc.gguf:
        _validate_gguf(enc)
        return
    if enc.quantized:
        quant.check_encoding(enc.values_encoding, enc.group_size)
    present, needed = set(enc.parts()), set(enc.expected_parts())
    if present != needed:
        what = (f"needs {' and '.join(sorted(needed - present))}" if needed - present
                else f"has no {' or '.join(sorted(present - needed))}")
        raise FormatError(f"a {enc.layout} {enc.values_encoding} tensor {what}")
    rows, cols = enc.rows_cols
    values_count = (quant.codes_nbytes(enc.values_encoding, enc.value_count) if enc.quantized
                    else enc.value_count)
    expected = {"values": values_count}
    if enc.layout == "bitmap":
        expected.update(bitmap=math.ceil(enc.numel / 8), block_offsets=enc.num_blocks + 1)
        if enc.quantized:
            expected["row_offsets"] = rows + 1
    if enc.quantized:
        per_row = -(-cols // enc.group_size) if enc.layout == "dense" else enc.groups_per_row
        expected["scales"] = rows * per_row
        if enc.layout == "bitmap" and rows and enc.scales.numel() % rows:
            raise FormatError(f"{enc.scales.numel()} scales do not divide into {rows} rows")
    for name, numel in expected.items():
        part = enc.parts()[name]
        dtype = enc.part_dtype(name)
        if part.dtype != dtype or part.dim() != 1 or part.numel() != numel:
            raise FormatError(
                f"{name} should be {numel} x {dtype}, got {part.numel()} x {part.dtype} ({part.dim()}-D) "
                f"(shape {enc.shape}, nnz {enc.nnz}, block size {enc.block_size})"
            )


def _validate_gguf(enc: EncodedTensor) -> None:
    """`validate` for a GGUF block tensor: dense, values alone, whole blocks of the right size."""
    _check_gguf_layout(enc.values_encoding, enc.layout)
    extra = [name for name in enc.parts() if name != "values"]
    if extra:
        raise FormatError(f"a {enc.values_encoding} tensor stores its blocks alone; it has {' and '.join(extra)}")
    if enc.nnz != enc.numel or enc.group_size != 0:
        raise FormatError(f"a {enc.values_encoding} tensor has nnz = numel ({enc.numel}) and group size 0, "
                          f"got nnz {enc.nnz}, group size {enc.group_size}")
    rows, cols = enc.rows_cols
    nbytes = blocks_nbytes(enc.values_encoding, rows, cols)
    if enc.values.dtype != torch.uint8 or enc.values.dim() != 1 or enc.values.numel() != nbytes:
        raise FormatError(f"values of a {enc.values_encoding} tensor of shape {enc.shape} should be {nbytes} x "
                          f"torch.uint8, got {enc.values.numel()} x {enc.values.dtype} ({enc.values.dim()}-D)")


def validate_contents(enc: EncodedTensor) -> None:
    """`validate` plus the offsets' end points (reads a few values: a device sync on a GPU)."""
    validate(enc)
    if enc.layout == "bitmap":
        ends = [("block offsets", enc.block_offsets)] + ([("row offsets", enc.row_offsets)] if enc.quantized else [])
        for what, offsets in ends:
            first, last = offsets[0].item(), offsets[-1].item()
            if first != 0 or last != enc.nnz:
                raise FormatError(f"{what} run from {first} to {last}, expected 0 to nnz={enc.nnz}")


def decode(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense tensor: bit-identical to what was encoded for "raw"; for a quantized encoding the
    dequantized values the spec defines (the torch reference every other decoder matches).

    With `out` (contiguous, enc's shape and dtype) the result is written there and returned.
    """
    validate_contents(enc)
    if out is None:
        out = torch.empty(enc.shape, dtype=enc.dtype, device=enc.values.device)
    elif out.shape != torch.Size(enc.shape) or out.dtype != enc.dtype or not out.is_contiguous():
        raise FormatError(f"output buffer is {tuple(out.shape)} {out.dtype}, need contiguous {enc.shape} {enc.dtype}")
    if enc.layout == "dense" and not enc.quantized:
        return out.copy_(enc.values.view(enc.shape))
    if enc.gguf:  # float32 as gguf-py computes it, then one round-to-nearest-even conversion
        rows, cols = enc.rows_cols
        return out.copy_(dequantize_blocks(enc.values, enc.values_encoding, rows, cols).view(enc.shape))
    mask = (unpack_bits(enc.bitmap, enc.numel) if enc.layout == "bitmap"
            else torch.ones(enc.numel, dtype=torch.bool, device=enc.values.device))
    set_bits = int(torch.count_nonzero(mask))
    if set_bits != enc.nnz and enc.layout == "bitmap":
        raise FormatError(f"bitmap has {set_bits} set bits but nnz is {enc.nnz}")
    values = enc.values
    if enc.quantized:
        rows, cols = enc.rows_cols
        row_offsets = (enc.row_offsets if enc.layout == "bitmap"
                       else torch.arange(rows + 1, dtype=torch.int64, device=mask.device) * cols)
        positions = torch.nonzero(mask).view(-1)
        row_of = positions // max(cols, 1)
        index = quant.scale_index(row_of, row_offsets.to(mask.device), enc.groups_per_row, enc.group_size)
        codes = quant.unpack_codes(enc.values, enc.value_count, enc.values_encoding)
        values = quant.dequantize(codes, index, enc.scales)
    bits_dtype = BITS_DTYPES[enc.dtype]
    flat = out.view(-1).view(bits_dtype)
    flat.zero_()
    flat.masked_scatter_(mask.to(flat.device), values.view(bits_dtype))
    return out


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's bytes (works for bfloat16 too)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy()


def checksum(enc: EncodedTensor, crc: int = 0) -> int:
    """CRC-32 over the tensor's parts in spec order, continuing from `crc`."""
    for part in enc.parts().values():
        crc = crc32(tensor_bytes(part.cpu()), crc)
    return crc
