"""Endor decompression on the GPU: one entry point that hands each encoded tensor to its kernel.

    raw, "bitmap"          expand            (endor_ray.kernels.expand)
    raw, "dense"           a copy of the values
    int8/int4, either      dequantize        (endor_ray.kernels.dequant: one kernel per layout)
    GGUF blocks, "dense"   dequantize_gguf   (endor_ray.kernels.gguf_dequant)

Each kernel module holds its @triton.jit kernel, its launch wrapper and its torch reference;
`decompress_reference` dispatches the same way to the references. A further family of value
encodings adds its wrapper and reference as one branch in each (see the comments there).

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set before this module is
imported), slowly; the CPU path of the engine uses `endor_ray.format.cpu_decode` instead.
"""

from __future__ import annotations

import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS
from endor_ray.format.quant import QUANTIZED_ENCODINGS
from endor_ray.format.tensor import EncodedTensor, validate_contents
from endor_ray.kernels.dequant import dequantize, dequantize_reference
from endor_ray.kernels.expand import expand, expand_reference
from endor_ray.kernels.gguf_dequant import dequantize_gguf, dequantize_gguf_reference
from endor_ray.kernels.launch import checked_output


def decompress(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode `enc` (arrays on the GPU, or on CPU under TRITON_INTERPRET=1) into `out` or a new tensor.

    Checks sizes only, never the data (that would stall the GPU): the bitmap and offsets are
    trusted, as the store verified their checksums when it loaded them.
    """
    if enc.values_encoding == "raw":
        if enc.layout == "dense":
            return checked_output(enc, out).copy_(enc.values.view(enc.shape))
        return expand(enc, out)
    if enc.values_encoding in QUANTIZED_ENCODINGS:
        return dequantize(enc, out)
    if enc.values_encoding in GGUF_ENCODINGS:
        return dequantize_gguf(enc, out)
    raise FormatError(f"no GPU kernel decodes values encoding {enc.values_encoding!r}; "
                      f"supported: raw, {', '.join((*QUANTIZED_ENCODINGS, *GGUF_ENCODINGS))}")


def decompress_reference(enc: EncodedTensor) -> torch.Tensor:
    """What `decompress` computes, in torch: each kernel's reference (a raw dense tensor: a copy)."""
    if enc.values_encoding == "raw":
        if enc.layout == "dense":
            validate_contents(enc)
            return enc.values.clone().view(enc.shape)
        return expand_reference(enc)
    if enc.values_encoding in QUANTIZED_ENCODINGS:
        return dequantize_reference(enc)
    if enc.values_encoding in GGUF_ENCODINGS:
        return dequantize_gguf_reference(enc)
    raise FormatError(f"no reference decodes values encoding {enc.values_encoding!r}; "
                      f"supported: raw, {', '.join((*QUANTIZED_ENCODINGS, *GGUF_ENCODINGS))}")
