"""Directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from endor_ray.errors import StoreError


def _permissions_as_umask(root: Path) -> None:
    """mkdtemp makes the staging directory 0700 (and some writers make 0600 files): give the tree
    the permissions a plain mkdir/open would, so a Ray node running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~umask)


@contextlib.contextmanager
def staged_directory(destination: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory next to `destination`; on success it becomes `destination`.

    On any error (Ctrl-C included) the staging directory is removed and an existing `destination`
    is left as it was. With force=False an existing `destination` is an error.
    """
    destination = Path(destination)
    if destination.exists() and not force:
        raise StoreError(f"{destination} already exists; pass --force to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        _permissions_as_umask(staging)
        if destination.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, trash / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
