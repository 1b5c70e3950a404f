"""Fast CPU decoding of the Endor format: bitmap + packed values -> dense, at memory speed.

The work is done by the C expansion in `_expand.c` (AVX-512 `vpexpandw`/`vpexpandd`, an AVX2
shuffle table, or a scalar loop), reached through ctypes, which releases
the GIL: a decode runs beside the engine's compute, and `threads > 1` splits a tensor's blocks
over several threads (each block decodes on its own from `block_offsets`). The result is
bit-identical to `endor_ray.format.tensor.decode`, the torch reference, which tests compare
against.

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
from concurrent.futures import ThreadPoolExecutor

import torch

from endor_ray.errors import FormatError
from endor_ray.format.tensor import EncodedTensor, decode, validate

log = logging.getLogger(__name__)

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # the C side's ENDOR_ISA_* values
_MIN_BLOCKS_PER_THREAD = 64  # below this, a thread costs more than it saves
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_chosen: dict[int, int] = {}  # itemsize -> ISA code, measured once


def _library() -> ctypes.CDLL | None:
    """The C library, loaded once; None (after one warning) where it is not built."""
    global _lib, _load_error
    if _lib is None and _load_error is None:
        try:
            from endor_ray.format import _expand

            lib = ctypes.CDLL(_expand.__file__)
        except (ImportError, OSError) as exc:
            _load_error = str(exc)
            log.warning("the fast CPU decoder is not built (%s); decoding on the CPU uses torch, about 30x "
                        "slower. Reinstall endor-ray where a C compiler (gcc) is present.", exc)
            return None
        lib.endor_expand.restype = ctypes.c_int64
        lib.endor_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.endor_best_isa.restype = ctypes.c_int
        lib.endor_best_isa.argtypes = [ctypes.c_int]
        _lib = lib
    return _lib


def supported_isas(itemsize: int) -> list[str]:
    """The C implementations this CPU runs for `itemsize`-byte elements (empty: not built)."""
    lib = _library()
    return [] if lib is None else [name for name, code in ISAS.items() if code <= lib.endor_best_isa(itemsize)]


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


def decode_into(enc: EncodedTensor, out: torch.Tensor, threads: int = 1, isa: str | None = None) -> torch.Tensor:
    """Decode `enc` (arrays on the CPU) into `out` (contiguous, enc's shape and dtype); return `out`.

    `threads` splits the blocks over that many threads; `isa` forces an implementation ("avx512",
    "avx2", "scalar"; tests use it), capped at what the CPU runs. Nothing is read outside the
    arrays, whatever their contents: a bitmap that disagrees with nnz or the offsets is a
    FormatError.
    """
    validate(enc)
    if out.shape != torch.Size(enc.shape) or out.dtype != enc.dtype or not out.is_contiguous() or out.is_cuda:
        raise FormatError(f"output buffer is {tuple(out.shape)} {out.dtype} on {out.device}, "
                          f"need contiguous {enc.shape} {enc.dtype} on the CPU")
    if enc.layout == "dense":
        return out.copy_(enc.values.view(enc.shape))
    if enc.numel == 0:
        return out
    if _library() is None:
        return decode(enc, out=out)
    isa_code = _isa_for(enc.values.element_size()) if isa is None else ISAS[isa]
    flat = out.view(-1)
    num_threads = max(1, min(threads, enc.num_blocks // _MIN_BLOCKS_PER_THREAD))
    if num_threads == 1:
        _expand(enc, flat, 0, enc.num_blocks, isa_code)
        return out
    bounds = [math.ceil(enc.num_blocks * part / num_threads) for part in range(num_threads + 1)]
    futures = [_thread_pool().submit(_expand, enc, flat, first, last, isa_code)
               for first, last in zip(bounds[:-1], bounds[1:])]
    for future in futures:
        future.result()
    return out


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        import os

        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="endor-decode")
    return _pool
