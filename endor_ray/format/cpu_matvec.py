"""Small-batch products on the CPU straight from a tensor's stored blocks: y = x @ W^T, W never decoded.

At batch 1 a decoder layer's time is the time to read its weights. Decoding them to bf16 first
reads the blocks, writes 2 bytes a weight and reads those again; multiplying from the blocks reads
each stored byte once (llama.cpp's dot products do the same). `_matvec.c` computes every weight
exactly as `endor_ray.format.tensor.decode` does (float32, rounded to the tensor's dtype) and
multiplies it with float32 activations, summing in float32 in an order its comment fixes, so the
AVX-512, AVX2 and scalar loops give the same bits; threads split W's rows (ctypes releases the GIL).

Dense int8 / int4 tensors (any group size, ragged rows), the GGUF types q8_0, q4_0, q4_1, q5_0,
q5_1 and the super-block types q4_k, q5_k, q6_k have a product. A k-type tensor needs rows of whole
256-weight super-blocks (cols % 256 == 0, as every GGUF file's are); one stored over its flattened
elements (`gguf_blocks.blocks_fit`, e.g. [576, 576]) has super-blocks spanning two rows and is
decoded. Other encodings (q3_k, q2_k, iq4_nl) and bitmap layouts are decoded by `cpu_decode` as before.
"""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import BLOCK_TYPES
from endor_ray.format.tensor import EncodedTensor, validate

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # the C side's ENDOR_ISA_* values
MATVEC_ENCODINGS = {"int8": 100, "int4": 101, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
                    "q4_k": 12, "q5_k": 13, "q6_k": 14}  # name -> the C side's type (ggml's id for GGUF blocks)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_MIN_WEIGHTS_PER_THREAD = 1 << 18  # below this a thread's hand-off costs more than its share saves
_lib: ctypes.CDLL | None = None
_loaded = False
_pool: ThreadPoolExecutor | None = None


def _library() -> ctypes.CDLL | None:
    """The C library with `endor_matvec`, loaded once; None where it is not built."""
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        try:
            from endor_ray.format import _expand

            lib = ctypes.CDLL(_expand.__file__)
            lib.endor_matvec  # noqa: B018  (a build older than the products: they stay off)
        except (ImportError, OSError, AttributeError):
            return None
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.endor_matvec.restype = c_int
        lib.endor_matvec.argtypes = [
            c_int, ptr, i64, ptr, i64, i64,  # type, values, values nbytes, scales, num scales, group size
            i64, i64, c_int, ptr, i64, ptr,  # rows, cols, dtype, x, x rows, y
            c_int, i64, i64,  # isa, first/last row
        ]
        lib.endor_matvec_best_isa.restype = c_int
        _lib = lib
    return _lib


def supported_isas() -> list[str]:
    """The C implementations of the product this CPU runs (empty: not built)."""
    lib = _library()
    return [] if lib is None else [name for name, code in ISAS.items() if code <= lib.endor_matvec_best_isa()]


def has_matvec(enc: EncodedTensor) -> bool:
    """Whether `matvec` multiplies straight from `enc`'s blocks: a dense 2-D int8/int4/q8_0/q4_0/q4_1/
    q5_0/q5_1 tensor, or q4_k/q5_k/q6_k with cols % 256 == 0, on the CPU, with the C library built."""
    return enc.values.device.type == "cpu" and stored_for_matvec(enc.layout, enc.values_encoding, enc.shape)


def stored_for_matvec(layout: str | None, values_encoding: str | None, shape) -> bool:
    """Whether a tensor stored so (a manifest entry's layout, values encoding and shape) has a CPU
    product from its blocks (`has_matvec` once it is read onto the CPU). A GGUF tensor's rows must be
    whole blocks: a k-type one stored over its flattened elements (cols % 256 != 0) is decoded."""
    if layout != "dense" or values_encoding not in MATVEC_ENCODINGS or len(shape) != 2:
        return False
    block = BLOCK_TYPES.get(values_encoding)
    return (block is None or shape[1] % block.block_elems == 0) and _library() is not None


def matvec(enc: EncodedTensor, x: torch.Tensor, threads: int = 1, isa: str | None = None) -> torch.Tensor:
    """[x_rows, rows] float32: x ([x_rows, cols] float32, CPU) times W^T, W = decode(enc) ([rows, cols]),
    each weight the decoded value bit for bit, the sums in float32 in the C file's order.

    `threads` splits W's rows; `isa` forces an implementation ("avx512", "avx2", "scalar"; tests use
    it), capped at what the CPU runs. FormatError where `enc` has no product (see `has_matvec`).
    """
    if not has_matvec(enc):
        raise FormatError(f"no CPU product for a {enc.layout} {enc.values_encoding} tensor of shape {enc.shape} "
                          f"on {enc.values.device} (C library built: {_library() is not None}); decode it instead")
    validate(enc)
    rows, cols = enc.shape
    if x.dim() != 2 or x.shape[1] != cols or x.dtype != torch.float32 or x.device.type != "cpu":
        raise FormatError(f"x must be [x_rows, {cols}] float32 on the CPU, got {tuple(x.shape)} {x.dtype} on {x.device}")
    x = x.contiguous()
    y = torch.empty((x.shape[0], rows), dtype=torch.float32)
    if y.numel() == 0:
        return y
    isa_code = _lib.endor_matvec_best_isa() if isa is None else ISAS[isa]
    scales = enc.scales if enc.scales is not None else enc.values  # GGUF blocks carry their own
    num_scales = enc.scales.numel() if enc.scales is not None else 0
    args = (MATVEC_ENCODINGS[enc.values_encoding], enc.values.data_ptr(), enc.values.numel(), scales.data_ptr(),
            num_scales, enc.group_size, rows, cols, _DTYPE_CODES[enc.dtype], x.data_ptr(), x.shape[0],
            y.data_ptr(), isa_code)
    num_threads = max(1, min(threads, rows * cols // _MIN_WEIGHTS_PER_THREAD, rows))
    bounds = [math.ceil(rows * part / num_threads) for part in range(num_threads + 1)]
    futures = [_thread_pool().submit(_lib.endor_matvec, *args, first, last)
               for first, last in zip(bounds[1:-1], bounds[2:])]
    statuses = [_lib.endor_matvec(*args, bounds[0], bounds[1])]  # the first part on this thread
    wait(futures)  # all of them, so that none still writes to `y` when an error is raised
    statuses += [future.result() for future in futures]
    if any(statuses):
        raise FormatError(f"the CPU product refused a {enc.values_encoding} tensor {enc.shape} of "
                          f"{enc.values.numel()} bytes (status {max(statuses, key=abs)}: -2 bad sizes, -7 too few bytes)")
    return y


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="endor-matvec")
    return _pool
