"""The Endor sparse format: a bitmap of non-zero positions plus the packed non-zero values.

Spec, format version 1 (docs/FORMAT.md says the same with pictures)
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

``values_encoding`` names how ``values`` is stored. Version 1 defines ``"raw"`` (the tensor's own
dtype). Reserved for a later version: ``"int8"`` and ``"int4"`` with per-group scales, which add a
``scales`` array; readers of version 1 reject any other encoding.

Sizes: a bitmap tensor takes ``nnz*itemsize + ceil(N/8) + 8*(num_blocks+1)`` bytes; at 50%
sparsity in fp16 that is 0.5 + 1/16 + 8/(2B) of the dense size (0.5635 for B = 4096).

The checksum of a tensor is CRC-32 (zlib's polynomial) over bitmap, block_offsets and values
bytes, in that order (for a dense tensor over values alone). `crc32` computes it with ISA-L
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

try:
    from isal.isal_zlib import crc32  # the same CRC-32 as zlib.crc32, vectorised; releases the GIL
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the slow, equal fallback
    from zlib import crc32

FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 4096
LAYOUTS = ("bitmap", "dense")
VALUES_ENCODINGS = ("raw",)

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


@dataclass(frozen=True)
class EncodedTensor:
    """One weight in the Endor format. Arrays are 1-D, contiguous, on any device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "bitmap" | "dense"
    nnz: int
    values: torch.Tensor  # [nnz] dtype for "bitmap", [numel] dtype for "dense"
    bitmap: torch.Tensor | None = None  # [ceil(numel / 8)] uint8, LSB first
    block_offsets: torch.Tensor | None = None  # [num_blocks + 1] int64
    block_size: int = DEFAULT_BLOCK_SIZE
    values_encoding: str = "raw"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

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
        """The arrays that make up this tensor, in checksum order."""
        if self.layout == "dense":
            return {"values": self.values}
        return {"bitmap": self.bitmap, "block_offsets": self.block_offsets, "values": self.values}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedTensor:
        """The same tensor with its arrays moved to `device`."""
        moved = {name: part.to(device, non_blocking=non_blocking) for name, part in self.parts().items()}
        return EncodedTensor(
            shape=self.shape, dtype=self.dtype, layout=self.layout, nnz=self.nnz,
            block_size=self.block_size, values_encoding=self.values_encoding, **moved,
        )


def bitmap_nbytes(numel: int, nnz: int, itemsize: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of a bitmap-layout tensor with these counts (the formula in the spec)."""
    num_blocks = math.ceil(numel / block_size)
    return nnz * itemsize + math.ceil(numel / 8) + 8 * (num_blocks + 1)


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
) -> EncodedTensor:
    """Encode `weight`. layout=None picks "bitmap" if it is smaller than dense, else "dense"."""
    check_block_size(block_size)
    if weight.dtype not in BITS_DTYPES:
        raise FormatError(f"cannot encode a {weight.dtype} tensor; supported: {sorted(DTYPES)}")
    if layout is not None and layout not in LAYOUTS:
        raise FormatError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    flat = weight.detach().contiguous().view(-1)
    shape = tuple(weight.shape)
    mask = nonzero_mask(flat)
    nnz = int(mask.sum())
    if layout is None:
        sparse_nbytes = bitmap_nbytes(flat.numel(), nnz, flat.element_size(), block_size)
        layout = "bitmap" if sparse_nbytes < flat.numel() * flat.element_size() else "dense"
    if layout == "dense":
        return EncodedTensor(shape, flat.dtype, "dense", nnz, values=flat.clone(), block_size=block_size)

    num_blocks = math.ceil(flat.numel() / block_size)
    padded = torch.zeros(num_blocks * block_size, dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = mask
    block_offsets = torch.zeros(num_blocks + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(padded.view(num_blocks, block_size).sum(dim=1), dim=0, out=block_offsets[1:])
    return EncodedTensor(
        shape, flat.dtype, "bitmap", nnz,
        values=flat[mask],
        bitmap=pack_bits(mask),
        block_offsets=block_offsets,
        block_size=block_size,
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
    if enc.values.dtype != enc.dtype or enc.values.dim() != 1:
        raise FormatError(f"values must be 1-D {enc.dtype}, got {enc.values.dim()}-D {enc.values.dtype}")
    if enc.layout == "dense":
        if enc.values.numel() != enc.numel:
            raise FormatError(f"dense tensor of shape {enc.shape} has {enc.values.numel()} values")
        return
    if enc.bitmap is None or enc.block_offsets is None:
        raise FormatError("a bitmap tensor needs both a bitmap and block offsets")
    expected = {
        "bitmap": (torch.uint8, math.ceil(enc.numel / 8)),
        "block_offsets": (torch.int64, enc.num_blocks + 1),
        "values": (enc.dtype, enc.nnz),
    }
    for name, (dtype, numel) in expected.items():
        part = enc.parts()[name]
        if part.dtype != dtype or part.numel() != numel:
            raise FormatError(
                f"{name} should be {numel} x {dtype}, got {part.numel()} x {part.dtype} "
                f"(shape {enc.shape}, nnz {enc.nnz}, block size {enc.block_size})"
            )


def validate_contents(enc: EncodedTensor) -> None:
    """`validate` plus the offsets' end points (reads two values: a device sync on a GPU)."""
    validate(enc)
    if enc.layout == "bitmap":
        first, last = enc.block_offsets[0].item(), enc.block_offsets[-1].item()
        if first != 0 or last != enc.nnz:
            raise FormatError(f"block offsets run from {first} to {last}, expected 0 to nnz={enc.nnz}")


def decode(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense tensor, bit-identical to what was encoded (torch reference and CPU path).

    With `out` (contiguous, enc's shape and dtype) the result is written there and returned.
    """
    validate_contents(enc)
    if out is None:
        out = torch.empty(enc.shape, dtype=enc.dtype, device=enc.values.device)
    elif out.shape != torch.Size(enc.shape) or out.dtype != enc.dtype or not out.is_contiguous():
        raise FormatError(f"output buffer is {tuple(out.shape)} {out.dtype}, need contiguous {enc.shape} {enc.dtype}")
    if enc.layout == "dense":
        return out.copy_(enc.values.view(enc.shape))
    bits_dtype = BITS_DTYPES[enc.dtype]
    mask = unpack_bits(enc.bitmap, enc.numel)
    set_bits = int(torch.count_nonzero(mask))
    if set_bits != enc.nnz:
        raise FormatError(f"bitmap has {set_bits} set bits but nnz is {enc.nnz}")
    flat = out.view(-1).view(bits_dtype)
    flat.zero_()
    flat.masked_scatter_(mask, enc.values.view(bits_dtype))
    return out


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's bytes (works for bfloat16 too)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy()


def checksum(enc: EncodedTensor, crc: int = 0) -> int:
    """CRC-32 over the tensor's parts in spec order, continuing from `crc`."""
    for part in enc.parts().values():
        crc = crc32(tensor_bytes(part.cpu()), crc)
    return crc
