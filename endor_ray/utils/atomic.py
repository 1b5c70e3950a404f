"""Directories that appear whole or not at all.

A staging directory carries an owner file (host and process id). A run killed outright (kill -9,
a lost machine) cannot remove its staging directory; the next run towards the same destination
removes those whose owner process is gone, and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from endor_ray.errors import StoreError

log = logging.getLogger(__name__)
OWNER_FILE = ".endor-owner"


def _owner_alive(owner: str) -> bool:
    host, _, pid = owner.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's, or unreadable: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(destination: Path) -> None:
    """Remove staging directories for `destination` left by runs that were killed."""
    for partial in destination.parent.glob(f".{destination.name}.partial-*"):
        try:
            owner = (partial / OWNER_FILE).read_text().strip()
        except OSError:
            continue  # no owner file: not made by this version, leave it
        if not _owner_alive(owner):
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (process %s)", partial, owner)


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
    remove_stale_partials(destination)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        (staging / OWNER_FILE).write_text(f"{socket.gethostname()}:{os.getpid()}")
        yield staging
        (staging / OWNER_FILE).unlink()
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
