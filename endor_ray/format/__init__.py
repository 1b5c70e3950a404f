"""The Endor format: how one weight tensor is encoded (stage 1 of the data's path).

Owns the encoding spec and its torch reference (`tensor`), and the fast CPU decoder. Pure
tensor code: imports torch, numpy and `endor_ray.errors` / `endor_ray.utils` only, never Ray,
Triton or transformers, so it works anywhere. The GPU kernels live beside their references in
`endor_ray.kernels`.
"""

from endor_ray.format.tensor import (  # noqa: F401  (the format's public API)
    BITS_DTYPES, DEFAULT_BLOCK_SIZE, DTYPES, FORMAT_VERSION, VALUES_ENCODINGS, EncodedTensor, bitmap_nbytes,
    checksum, crc32, decode, dtype_from_name, dtype_name, encode, encoded_nbytes, gguf_tensor, validate,
    validate_contents,
)
from endor_ray.format.gguf_blocks import (  # noqa: F401
    BLOCK_TYPES, GGUF_ENCODINGS, BlockType, dequantize_blocks, quantize_blocks,
)
from endor_ray.format.quant import (  # noqa: F401
    DEFAULT_GROUP_SIZE, QUANTIZED_ENCODINGS,
)
