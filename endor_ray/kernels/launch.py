"""What every decoding kernel's wrapper shares before it launches: the register cap, and the checks
of the encoded tensor and the output buffer.

The checks read sizes only, never the data (that would stall the GPU): the bitmap and offsets
are trusted, as the store verified their checksums when it loaded them.
"""

from __future__ import annotations

import torch

from endor_ray.errors import FormatError
from endor_ray.format.tensor import EncodedTensor, validate

MAX_REGISTERS = 32  # per thread: 65536 registers / 2048 threads, i.e. 100% occupancy on sm_80 and sm_90


def checked_output(enc: EncodedTensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out`, or a new tensor of enc's shape and dtype on its device, once `enc`'s arrays fit its
    metadata and lie contiguous on one device and `out` fits `enc`."""
    validate(enc)
    device = enc.values.device
    for name, part in enc.parts().items():
        if part.device != device or not part.is_contiguous():
            raise FormatError(f"{name} must be contiguous on {device}, got {part.device}")
    if out is None:
        return torch.empty(enc.shape, dtype=enc.dtype, device=device)
    if out.shape != torch.Size(enc.shape) or out.dtype != enc.dtype or out.device != device:
        raise FormatError(
            f"output buffer is {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"need {enc.shape} {enc.dtype} on {device}"
        )
    if not out.is_contiguous():
        raise FormatError("output buffer must be contiguous")
    return out
