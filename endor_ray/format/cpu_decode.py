"""Fast CPU decoding of the Endor format: bitmap + packed values -> dense, at memory speed.

The work is done by the C expansion in `_expand.c` (AVX-512 `vpexpandw`/`vpexpandd`, an AVX2
shuffle table, or a scalar loop), reached through ctypes, which releases
the GIL: a decode runs beside the engine's compute, and `threads > 1` splits a tensor's blocks
over several threads (each block decodes on its own from `block_offsets`). The result is
bit-identical to `endor_ray.format.tensor.decode`, the torch reference, which tests compare
against.

Quantized values ("int8" / "int4") are dequantized by the same library: block by block into a
small staging buffer that is then expanded as above (layout "bitmap"; threads split the blocks),
or straight into the output (layout "dense"; threads split the rows). They take the widest
implementation the CPU runs, untimed: the expansion then reads from the cache, where AVX-512
leads, and the arithmetic doubles in width (on the EPYC, 4096 x 11008 bf16 at 50%, INT8:
about 18 GB/s of dense output with AVX-512 against 10 with AVX2). The one place torch is not
consistent with itself, the bfloat16 pattern of a NaN (from non-finite scales only: 0xFFFF from
its vectorised x86 code, 0x7FC0 from its scalar code), is asked of torch once and reproduced.

GGUF block encodings (q8_0 ... q6_k, q3_k, q2_k, iq4_nl: endor_ray.format.gguf_blocks) are decoded by `_gguf.c` in the
same library, rows split over the threads, bit-identical to gguf-py's dequantize then torch's
rounding to the tensor's dtype; they take the widest implementation the CPU runs.

Which implementation runs is measured, not assumed: where the CPU has both AVX-512 and AVX2, the
first decode times each on a layer-sized random bitmap (about 0.1 s, once per process and element
size) and keeps the faster: on the AMD EPYC development machine the AVX2 table beats the AVX-512
expand once the output streams to memory (about 17 against 13 GB/s of dense output on one core).

Where the extension was not built (no C compiler at install), `decode_into` falls back to the
torch reference and says so once.
"""

from __future__ import annotations

import ctypes
import logging
import math
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import BLOCK_TYPES, GGUF_ENCODINGS, blocks_nbytes, dequantize_blocks
from endor_ray.format.tensor import DEFAULT_BLOCK_SIZE, EncodedTensor, decode, validate, validate_contents

log = logging.getLogger(__name__)

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # the C side's ENDOR_ISA_* values
_MIN_BLOCKS_PER_THREAD = 64  # below this, a thread costs more than it saves
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_chosen: dict[int, int] = {}  # itemsize -> ISA code, measured once
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # the C side's ENDOR_F16 ...
_CODE_BITS = {"int8": 8, "int4": 4}
# GGUF block encodings -> ggml's type id (gguf.GGMLQuantizationType), the C side's `type`
_GGML_TYPES = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13, "q6_k": 14,
               "q3_k": 11, "q2_k": 10, "iq4_nl": 20}
_bf16_nan: int | None = None


def _library() -> ctypes.CDLL | None:
    """The C library, loaded once; None (after one warning) where it is not built."""
    global _lib, _load_error
    if _lib is None and _load_error is None:
        try:
            from endor_ray.format import _expand

            lib = ctypes.CDLL(_expand.__file__)
            lib.endor_dequant_gguf  # noqa: B018  (a build older than the GGUF decode: rebuild)
        except (ImportError, OSError, AttributeError) as exc:
            _load_error = str(exc)
            log.warning("the fast CPU decoder is not built (%s); decoding on the CPU uses torch, about 30x "
                        "slower. Reinstall endor-ray where a C compiler (gcc) is present.", exc)
            return None
        lib.endor_expand.restype = ctypes.c_int64
        lib.endor_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.endor_best_isa.restype = ctypes.c_int
        lib.endor_best_isa.argtypes = [ctypes.c_int]
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.endor_dequant_expand.restype = c_int
        lib.endor_dequant_expand.argtypes = [
            ptr, ptr, i64, i64,  # bitmap, block_offsets, block_size, numel
            ptr, i64, c_int,  # values, value_count, bits
            ptr, i64, i64,  # row_offsets, rows, cols
            ptr, i64, i64, i64,  # scales, num_scales, groups_per_row, group_size
            ptr, c_int, c_int, ctypes.c_uint16, i64, i64,  # out, dtype, isa, bf16 NaN, first/last block
        ]
        lib.endor_dequant_dense.restype = c_int
        lib.endor_dequant_dense.argtypes = [
            ptr, i64, c_int, i64, i64,  # values, value_count, bits, rows, cols
            ptr, i64, i64, i64,  # scales, num_scales, groups_per_row, group_size
            ptr, c_int, c_int, ctypes.c_uint16, i64, i64,  # out, dtype, isa, bf16 NaN, first/last row
        ]
        lib.endor_dequant_gguf.restype = c_int
        lib.endor_dequant_gguf.argtypes = [
            c_int, ptr, i64, i64, i64,  # ggml type, blocks, nbytes, rows, cols
            ptr, c_int, c_int, ctypes.c_uint16, i64, i64,  # out, dtype, isa, bf16 NaN, first/last row
        ]
        lib.endor_gguf_best_isa.restype = c_int
        _lib = lib
    return _lib


def supported_isas(itemsize: int) -> list[str]:
    """The C implementations this CPU runs for `itemsize`-byte elements (empty: not built)."""
    lib = _library()
    return [] if lib is None else [name for name, code in ISAS.items() if code <= lib.endor_best_isa(itemsize)]


def supported_gguf_isas() -> list[str]:
    """The C implementations this CPU runs for GGUF blocks (empty: not built)."""
    lib = _library()
    return [] if lib is None else [name for name, code in ISAS.items() if code <= lib.endor_gguf_best_isa()]


def backend(itemsize: int = 2) -> str:
    """What decodes `itemsize`-byte elements here: "avx512", "avx2", "scalar" (C) or "torch"."""
    if _library() is None:
        return "torch"
    return next(name for name, code in ISAS.items() if code == _isa_for(itemsize))


_CALIBRATION_NUMEL = 1 << 25  # 64 MiB of fp16 output: past the caches, as a layer's weights are


def _isa_for(itemsize: int) -> int:
    """The fastest supported implementation for `itemsize`, timed once on a random 50% bitmap of
    2^25 elements (which one wins depends on the CPU and on the size: AVX-512 leads in cache,
    the AVX2 table on the development machine's EPYC once the output streams to memory)."""
    if itemsize not in _chosen:
        candidates = [ISAS[name] for name in supported_isas(itemsize) if name != "scalar"] or [ISAS["scalar"]]
        if len(candidates) > 1:
            import time

            generator = torch.Generator().manual_seed(0)
            bitmap = torch.randint(0, 256, (_CALIBRATION_NUMEL // 8,), dtype=torch.uint8, generator=generator)
            values = torch.empty(_CALIBRATION_NUMEL * itemsize, dtype=torch.uint8)  # room for every bit set
            out = torch.empty(_CALIBRATION_NUMEL * itemsize, dtype=torch.uint8)
            values.fill_(1)
            out.fill_(0)  # touch the pages before timing
            timings = {}
            for code in candidates:
                runs = []
                for _ in range(3):
                    started = time.perf_counter()
                    _lib.endor_expand(bitmap.data_ptr(), values.data_ptr(), _CALIBRATION_NUMEL, out.data_ptr(),
                                      0, _CALIBRATION_NUMEL, itemsize, code)
                    runs.append(time.perf_counter() - started)
                timings[code] = min(runs)
            candidates = [min(timings, key=timings.get)]
        _chosen[itemsize] = candidates[0]
    return _chosen[itemsize]


def _expand(enc: EncodedTensor, out: torch.Tensor, first_block: int, last_block: int, isa: int) -> None:
    """Decode blocks [first_block, last_block) of `enc` into `out` (flat views, CPU)."""
    begin = first_block * enc.block_size
    end = min(last_block * enc.block_size, enc.numel)
    if first_block == 0 and last_block == enc.num_blocks:
        value_start, value_end = 0, enc.nnz  # the whole tensor: the offsets are not needed
    else:
        value_start, value_end = int(enc.block_offsets[first_block]), int(enc.block_offsets[last_block])
        if not 0 <= value_start <= value_end <= enc.nnz:
            raise FormatError(f"block offsets {value_start}..{value_end} lie outside the {enc.nnz} values")
    itemsize = enc.values.element_size()
    used = _lib.endor_expand(
        enc.bitmap.data_ptr(), enc.values.data_ptr() + value_start * itemsize, value_end - value_start,
        out.data_ptr(), begin, end, itemsize, isa,
    )
    if used != value_end - value_start:
        raise FormatError(
            f"the bitmap of blocks {first_block}..{last_block} sets "
            f"{'more' if used < 0 else used} bits where the offsets give {value_end - value_start} values"
        )


def _bf16_nan_bits() -> int:
    """The bfloat16 bits torch's CPU conversion gives a float32 NaN (see the module docstring)."""
    global _bf16_nan
    if _bf16_nan is None:
        nan = torch.full((64,), float("nan")).to(torch.bfloat16)
        _bf16_nan = int(nan.view(torch.int16)[0]) & 0xFFFF
    return _bf16_nan


def _dequant_error(status: int, enc: EncodedTensor, unit: str, first: int, last: int) -> None:
    """Raise what the C side's ENDOR_ERR_* `status` means (0: nothing)."""
    if status == 0:
        return
    if status == -6:
        raise MemoryError("no memory for the decoder's staging buffer")
    span = f"{unit} {first}..{last}"
    detail = {
        -1: f"the bitmap of {span} sets more bits than the block offsets give values",
        -3: f"the block offsets of {span} lie outside the {enc.value_count} values, decrease, or exceed a block",
        -4: f"the bitmap of {span} sets fewer bits than the block offsets give values",
        -5: f"a value of {span} lies outside the rows of the row offsets, or its scale outside the "
            f"{enc.scales.numel()} scales",
    }.get(status, f"the decoder refused {span} (status {status})")
    raise FormatError(f"{enc.values_encoding} {enc.layout} tensor {enc.shape} (nnz {enc.nnz}, group size "
                      f"{enc.group_size}): {detail}")


def _dequant_blocks(enc: EncodedTensor, arrays: dict, out: torch.Tensor, isa: int, first: int, last: int) -> None:
    """Decode blocks [first, last) of a quantized bitmap tensor into `out` (flat, CPU)."""
    rows, cols = enc.rows_cols
    scales = arrays["scales"]
    status = _lib.endor_dequant_expand(
        arrays["bitmap"].data_ptr(), arrays["block_offsets"].data_ptr(), enc.block_size, enc.numel,
        arrays["values"].data_ptr(), enc.value_count, _CODE_BITS[enc.values_encoding],
        arrays["row_offsets"].data_ptr(), rows, cols,
        scales.data_ptr(), scales.numel(), enc.groups_per_row, enc.group_size,
        out.data_ptr(), _DTYPE_CODES[enc.dtype], isa, _bf16_nan_bits(), first, last,
    )
    _dequant_error(status, enc, "blocks", first, last)


def _dequant_rows(enc: EncodedTensor, arrays: dict, out: torch.Tensor, isa: int, first: int, last: int) -> None:
    """Decode rows [first, last) of a quantized dense tensor into `out` (flat, CPU)."""
    rows, cols = enc.rows_cols
    scales = arrays["scales"]
    status = _lib.endor_dequant_dense(
        arrays["values"].data_ptr(), enc.value_count, _CODE_BITS[enc.values_encoding], rows, cols,
        scales.data_ptr(), scales.numel(), enc.groups_per_row, enc.group_size,
        out.data_ptr(), _DTYPE_CODES[enc.dtype], isa, _bf16_nan_bits(), first, last,
    )
    _dequant_error(status, enc, "rows", first, last)


def _dequant_gguf(blocks: torch.Tensor, encoding: str, rows: int, cols: int, out: torch.Tensor, isa: int,
                  first: int, last: int) -> None:
    """Decode rows [first, last) of GGUF blocks into `out` (flat, CPU)."""
    status = _lib.endor_dequant_gguf(
        _GGML_TYPES[encoding], blocks.data_ptr(), blocks.numel(), rows, cols,
        out.data_ptr(), _DTYPE_CODES[out.dtype], isa, _bf16_nan_bits(), first, last,
    )
    if status:
        raise FormatError(f"the decoder refused rows {first}..{last} of a [{rows}, {cols}] {encoding} tensor of "
                          f"{blocks.numel()} bytes (status {status}: -7 too few bytes, -2 bad arguments)")


def dequantize_gguf_into(blocks: torch.Tensor, encoding: str, rows: int, cols: int, out: torch.Tensor,
                         threads: int = 1, isa: str | None = None) -> torch.Tensor:
    """Decode the GGUF blocks of a [rows, cols] tensor into `out` (contiguous, rows * cols elements of
    float16, bfloat16 or float32, CPU); return `out`.

    blocks: [rows * cols / block_elems * type_size] uint8 on the CPU, the flattened tensor's blocks
    (`endor_ray.format.gguf_blocks`; exactly a GGUF file's bytes where cols holds whole blocks).
    `threads` splits the rows; `isa` forces an implementation as in `decode_into`. A buffer of the
    wrong size, or cols that do not hold whole blocks, are a FormatError (nothing is read).
    """
    nbytes = blocks_nbytes(encoding, rows, cols)  # FormatError for an unknown type or a partial block
    if blocks.dtype != torch.uint8 or blocks.dim() != 1 or blocks.numel() != nbytes or blocks.device.type != "cpu":
        raise FormatError(f"a [{rows}, {cols}] {encoding} tensor is {nbytes} x uint8 on the CPU, got "
                          f"{blocks.numel()} x {blocks.dtype} ({blocks.dim()}-D) on {blocks.device}")
    if out.numel() != rows * cols or out.dtype not in _DTYPE_CODES or not out.is_contiguous() or out.is_cuda:
        raise FormatError(f"output buffer is {tuple(out.shape)} {out.dtype} on {out.device}, need contiguous "
                          f"{rows} x {cols} float16, bfloat16 or float32 on the CPU")
    if rows * cols == 0:
        return out
    if _library() is None:
        return out.copy_(dequantize_blocks(blocks, encoding, rows, cols).view(out.shape))
    isa_code = _lib.endor_gguf_best_isa() if isa is None else ISAS[isa]
    block_elems = BLOCK_TYPES[encoding].block_elems
    if cols % block_elems:  # a super-block type over the flattened tensor: the C decoder sees rows of one block
        rows, cols = rows * cols // block_elems, block_elems
    per_thread = max(1, _MIN_BLOCKS_PER_THREAD * DEFAULT_BLOCK_SIZE // cols)  # rows worth a thread
    num_threads = max(1, min(threads, rows // per_thread))
    _split(_dequant_gguf, rows, num_threads, blocks.contiguous(), encoding, rows, cols, out.view(-1), isa_code)
    return out


def _split(work, count: int, num_threads: int, *args) -> None:
    """Run work(*args, first, last) over [0, count) in num_threads contiguous parts."""
    if num_threads <= 1:
        work(*args, 0, count)
        return
    bounds = [math.ceil(count * part / num_threads) for part in range(num_threads + 1)]
    futures = [_thread_pool().submit(work, *args, first, last) for first, last in zip(bounds[:-1], bounds[1:])]
    wait(futures)  # all of them, so that none still writes to `out` when the first error is raised
    for future in futures:
        future.result()


def decode_into(enc: EncodedTensor, out: torch.Tensor, threads: int = 1, isa: str | None = None) -> torch.Tensor:
    """Decode `enc` (arrays on the CPU) into `out` (contiguous, enc's shape and dtype); return `out`.

    `threads` splits the blocks (rows, for a quantized dense or a GGUF tensor) over that many threads; `isa`
    forces an implementation ("avx512", "avx2", "scalar"; tests use it), capped at what the CPU
    runs. Nothing is read outside the arrays, whatever their contents: a bitmap that disagrees
    with nnz or the offsets, or row offsets and scales that do not fit, are a FormatError.
    """
    validate(enc)
    if out.shape != torch.Size(enc.shape) or out.dtype != enc.dtype or not out.is_contiguous() or out.is_cuda:
        raise FormatError(f"output buffer is {tuple(out.shape)} {out.dtype} on {out.device}, "
                          f"need contiguous {enc.shape} {enc.dtype} on the CPU")
    if any(part.device.type != "cpu" for part in enc.parts().values()):
        raise FormatError(f"decode_into decodes on the CPU; the arrays are on {enc.values.device}")
    if enc.layout == "dense" and not enc.quantized:
        return out.copy_(enc.values.view(enc.shape))
    if enc.numel == 0:
        return out
    if _library() is None:
        return decode(enc, out=out)
    if enc.values_encoding in GGUF_ENCODINGS:
        rows, cols = enc.rows_cols
        return dequantize_gguf_into(enc.values, enc.values_encoding, rows, cols, out, threads, isa)
    flat = out.view(-1)
    if enc.quantized:
        isa_code = _library().endor_best_isa(enc.dtype.itemsize) if isa is None else ISAS[isa]
        validate_contents(enc)
        arrays = {name: part.contiguous() for name, part in enc.parts().items()}
        if enc.layout == "dense":
            rows = enc.rows_cols[0]
            per_thread = max(1, _MIN_BLOCKS_PER_THREAD * enc.block_size // max(enc.rows_cols[1], 1))
            _split(_dequant_rows, rows, min(threads, rows // per_thread), enc, arrays, flat, isa_code)
        else:
            num_threads = min(threads, enc.num_blocks // _MIN_BLOCKS_PER_THREAD)
            _split(_dequant_blocks, enc.num_blocks, num_threads, enc, arrays, flat, isa_code)
        return out
    isa_code = _isa_for(enc.dtype.itemsize) if isa is None else ISAS[isa]
    num_threads = max(1, min(threads, enc.num_blocks // _MIN_BLOCKS_PER_THREAD))
    _split(lambda first, last: _expand(enc, flat, first, last, isa_code), enc.num_blocks, num_threads)
    return out


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        import os

        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="endor-decode")
    return _pool
