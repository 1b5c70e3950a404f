"""The few CUDA operations the layer source issues, behind one small interface.

`LayerSource` never calls `torch.cuda` itself: it asks a `CudaOps` for streams and events, and to
copy, decompress and page-lock. That keeps the ordering logic (which stream waits for which
event) in one place, readable, and testable without a GPU: `tests/cuda_model.py` implements
the same interface over CPU tensors with vector clocks and fails on any access that CUDA would
not order (a slot overwritten before the compute reading it finished, a layer read before its
copy and decompression).

    ops.stream(name) / ops.event(name, timing) / ops.current_stream() / with ops.use(stream): ...
    ops.copy(dst, src)         dst <- src on the current stream (asynchronous)
    ops.decompress(enc, out)   the Triton kernel on the current stream
    ops.stage(dst, src)        a host copy into a pinned buffer (synchronous)
    ops.pin(tensor) / ops.unpin(tensor) / ops.is_pinned(tensor) / ops.pinned_empty(nbytes)
    ops.synchronize()

Streams and events are torch's own (`wait_event`, `record`, `synchronize`, `elapsed_time`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

import torch

from endor_ray.format.tensor import EncodedTensor

log = logging.getLogger(__name__)
HOST_ALIGNMENT = 4096  # host buffers start on a page: aligned parts (store v2), and O_DIRECT reads


def aligned_empty(nbytes: int, pin: bool = False, alignment: int = HOST_ALIGNMENT) -> torch.Tensor:
    """[nbytes] uint8 on the host whose first byte lies on an `alignment` boundary."""
    backing = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin)
    start = -backing.data_ptr() % alignment
    return backing[start:start + nbytes]


class CudaOps:
    """The real thing: torch.cuda on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self, name: str = "") -> torch.cuda.Stream:
        """A new stream; `name` says what it is for (the CUDA model in the tests uses it)."""
        return torch.cuda.Stream(self.device)

    def event(self, name: str = "", timing: bool = False) -> torch.cuda.Event:
        """A new event; `name` says what it marks (the CUDA model in the tests uses it)."""
        return torch.cuda.Event(enable_timing=timing)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def use(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def stage(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def decompress(self, enc: EncodedTensor, out: torch.Tensor) -> None:
        from endor_ray.kernels.decompress import decompress

        decompress(enc, out=out)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def pinned_empty(self, nbytes: int) -> torch.Tensor:
        return aligned_empty(nbytes, pin=True)

    def pin(self, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(page-locked tensor, registered in place). In place with cudaHostRegister where the
        driver allows (Tensor.pin_memory() copies into the caching host allocator, which rounds
        each block up to a power of two: up to 2x the host budget); else a pinned copy."""
        result = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 1))
        if result == 0:
            return tensor, True
        # The failed call also latched the error as CUDA's "last error": the next kernel launch
        # that checks it (every torch launch does) would fail with this unrelated message.
        _clear_last_cuda_error()
        log.warning("cudaHostRegister refused %d bytes (cudaError %d): using a pinned copy instead",
                    tensor.numel() * tensor.element_size(), result)
        return tensor.pin_memory(), False

    def unpin(self, tensor: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


def _clear_last_cuda_error() -> None:
    """cudaGetLastError() from the CUDA runtime torch loaded (torch does not bind it)."""
    for library in _cudart_candidates():
        try:
            getattr(ctypes.CDLL(library), "cudaGetLastError")()
            return
        except (OSError, AttributeError):
            continue
    log.warning("could not clear the CUDA error left by cudaHostRegister (no cudaGetLastError found)")


def _cudart_candidates() -> Iterator[str | None]:
    yield None  # torch loads its global dependencies, cudart among them, with RTLD_GLOBAL
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        yield from sorted({line.split()[-1] for line in maps if "libcudart" in line})
