"""Reading a store file into a buffer the caller owns: the disk tier's only pass over the bytes.

Local files are read with `preadv` straight into the caller's buffer (no allocation, no extra
copy), in chunks so the kernel's readahead keeps the disk busy. With ``direct=True`` they are
opened with O_DIRECT: the disk DMAs into the buffer, the CPU copies nothing and the page cache
is left alone (what a model larger than memory wants; the buffer and the read size must be
aligned, which `DIRECT_ALIGNMENT` and the caller's buffer capacity guarantee). A file system
that refuses O_DIRECT (tmpfs) is read buffered instead, with one warning. Other locations
(``s3://``, ``gs://``, ``hdfs://``) go through pyarrow's `readinto`.

A store's files are only ever regular files: a FIFO, socket or device put in a file's place is
refused before it is read (`regular_size`, from `os.stat`, then `fstat` of the descriptor opened
with O_NONBLOCK, so neither the check nor the open can block on it), and a file's size is
compared with the size the manifest gives before a byte is read.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

import numpy as np
import torch

from endor_ray.errors import StoreError

log = logging.getLogger(__name__)
DIRECT_ALIGNMENT = 4096  # O_DIRECT wants the buffer address and the read size aligned to a block
CHUNK_BYTES = 8 << 20  # one preadv per 8 MiB: big enough for full-speed reads, small enough for readahead
_direct_refused: set[str] = set()  # devices (st_dev) where O_DIRECT failed: read those buffered


def direct_capacity(nbytes: int) -> int:
    """The buffer size a direct read of `nbytes` needs (rounded up to DIRECT_ALIGNMENT)."""
    return -(-nbytes // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT


def _as_array(buffer: torch.Tensor | np.ndarray) -> np.ndarray:
    return buffer.numpy() if isinstance(buffer, torch.Tensor) else buffer


def regular_size(path: str, status: os.stat_result | None = None) -> int:
    """The size of the regular file `path` (or of its `status`); StoreError for anything else."""
    try:
        status = os.stat(path) if status is None else status
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise StoreError(f"cannot read {path}: {exc}") from None
    if not stat.S_ISREG(status.st_mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}.get(stat.S_IFMT(status.st_mode), "not a file")
        raise StoreError(f"{path} is {kind}, not a regular file: a store holds only the files endor convert wrote; "
                         "re-run endor convert")
    return status.st_size


def check_size(path: str, size: int, nbytes: int) -> None:
    """StoreError unless the file's `size` is the manifest's `nbytes` (checked before any allocation)."""
    if size != nbytes:
        raise StoreError(f"{path} has {size} bytes but the manifest says {nbytes}: the file is truncated "
                         "or was replaced; re-run endor convert")


def read_local(path: str, buffer: torch.Tensor | np.ndarray, nbytes: int, direct: bool = False,
               drop_cache: bool = False) -> None:
    """Read the whole local file `path`, which must be `nbytes` long, into `buffer[:nbytes]`; with
    `drop_cache`, a buffered read then drops the file's pages from the page cache (POSIX_FADV_DONTNEED:
    a model streamed through memory it does not fit must not fill the cache, which counts against a
    cgroup's limit and pushes out what else runs)."""
    array = _as_array(buffer)
    check_size(path, regular_size(path), nbytes)
    # O_NONBLOCK: were the file swapped for a FIFO since the stat, the open returns instead of waiting
    flags = os.O_RDONLY | os.O_NONBLOCK
    if direct and hasattr(os, "O_DIRECT") and _direct_allowed(path, array, nbytes):
        flags |= os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if flags & getattr(os, "O_DIRECT", 0) and exc.errno == 22:  # EINVAL: the file system refuses it
            _refuse_direct(path, exc)
            return read_local(path, buffer, nbytes, direct=False, drop_cache=drop_cache)
        raise StoreError(f"cannot read {path}: {exc}") from exc
    try:
        check_size(path, regular_size(path, os.fstat(fd)), nbytes)
        view = memoryview(array)
        limit = direct_capacity(nbytes) if flags & getattr(os, "O_DIRECT", 0) else nbytes
        position = 0
        while position < nbytes:
            try:
                got = os.preadv(fd, [view[position:min(position + CHUNK_BYTES, limit)]], position)
            except OSError as exc:
                if flags & getattr(os, "O_DIRECT", 0) and exc.errno == 22:
                    _refuse_direct(path, exc)
                    return read_local(path, buffer, nbytes, direct=False, drop_cache=drop_cache)
                raise StoreError(f"cannot read {path}: {exc}") from exc
            if got <= 0:
                raise StoreError(f"short read from {path}: {position} of {nbytes} bytes; the file shrank")
            position += got
        if drop_cache and not flags & getattr(os, "O_DIRECT", 0) and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped at once
    finally:
        os.close(fd)


def _direct_allowed(path: str, array: np.ndarray, nbytes: int) -> bool:
    aligned = array.ctypes.data % DIRECT_ALIGNMENT == 0 and array.nbytes >= direct_capacity(nbytes)
    return aligned and str(os.stat(path).st_dev) not in _direct_refused


def _refuse_direct(path: str, exc: OSError) -> None:
    device = str(os.stat(path).st_dev)
    if device not in _direct_refused:
        _direct_refused.add(device)
        log.warning("the file system of %s refuses O_DIRECT (%s): reading it through the page cache", path, exc)


def read_remote(fs: Any, path: str, buffer: torch.Tensor | np.ndarray, nbytes: int) -> None:
    """Read a file from a pyarrow file system into `buffer[:nbytes]`."""
    import pyarrow

    try:
        with fs.open_input_file(path) as f:
            if f.size() != nbytes:
                raise StoreError(f"{path} has {f.size()} bytes but the manifest says {nbytes}: the file is "
                                 "truncated or was replaced; re-run endor convert")
            if nbytes and f.readinto(_as_array(buffer)[:nbytes]) != nbytes:
                raise StoreError(f"short read from {path}")
    except (OSError, pyarrow.ArrowException) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def evict(path: str) -> None:
    """Drop a local file's pages from the page cache (benchmarks start cold with it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages (a store just written) are not dropped: write them out first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
