"""The memory this process may really use: its cgroup's limit (v2 or v1) or the machine's available memory.

Inside a container or a systemd slice the kernel kills a process that exceeds its cgroup's limit,
whatever /proc/meminfo says is available, so budgets must come from the tighter of the two. A
cgroup's usage counts the page cache of the files its processes read; that part the kernel
reclaims before it kills anything, so what is "in use" here is the usage less the file cache.
Shared memory cannot be dropped and mapped files (the libraries' code: torch alone maps hundreds
of MB) can only be dropped to be faulted in again at once, thrashing: both stay counted. Limits
are hierarchical: every cgroup from this process's own up to the root is read and the tightest
room wins. The functions take the roots of /proc and of the cgroup mounts, so tests point them at
fake trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from endor_ray.utils.units import human_bytes

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1; anything above this is no limit


@dataclass(frozen=True)
class MemoryLimit:
    """How much memory this process may use in all, and how much of it is free now."""

    limit_bytes: int  # the tightest limit: a cgroup's memory.max / memory.limit_in_bytes, or MemTotal
    available_bytes: int  # what may still be allocated: min(limit - used in the cgroup, MemAvailable)
    source: str  # where the limit comes from: "cgroup v2 /path", "cgroup v1 /path" or "MemAvailable"

    def describe(self) -> str:
        return f"memory limit {human_bytes(self.limit_bytes)} ({self.source}), {human_bytes(self.available_bytes)} free"


@dataclass(frozen=True)
class _CgroupRoom:
    limit_bytes: int
    used_bytes: int  # usage less the reclaimable file cache
    path: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split() for line in lines)
    return {fields[0]: int(fields[1]) for fields in pairs if len(fields) == 2 and fields[1].isdigit()}


def _own_cgroups(proc_root: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory controller path) of this process, from <proc>/self/cgroup."""
    v2 = v1 = None
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup folders from `path` up to the mount's root that exist (a namespaced path may not)."""
    parts = [part for part in path.split("/") if part]
    folders = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _room_v2(folder: Path) -> _CgroupRoom | None:
    limit = _read_int(folder / "memory.max")
    if limit is None:
        return None
    usage = _read_int(folder / "memory.current") or 0
    stat = _stat(folder / "memory.stat")
    reclaimable = max(stat.get("file", 0) - stat.get("shmem", 0) - stat.get("file_mapped", 0), 0)
    return _CgroupRoom(limit, max(usage - reclaimable, 0), str(folder))


def _room_v1(folder: Path) -> _CgroupRoom | None:
    limit = _read_int(folder / "memory.limit_in_bytes")
    if limit is None:
        return None
    usage = _read_int(folder / "memory.usage_in_bytes") or 0
    stat = _stat(folder / "memory.stat")
    cache = stat.get("total_cache", stat.get("cache", 0))
    shmem = stat.get("total_shmem", stat.get("shmem", 0))
    mapped = stat.get("total_mapped_file", stat.get("mapped_file", 0))
    return _CgroupRoom(limit, max(usage - max(cache - shmem - mapped, 0), 0), str(folder))


def cgroup_rooms(proc_root: str | Path = "/proc",
                 cgroup_root: str | Path = "/sys/fs/cgroup") -> list[tuple[str, _CgroupRoom]]:
    """Every limited cgroup this process is in (its own and their ancestors), as (version, room)."""
    proc_root, cgroup_root = Path(proc_root), Path(cgroup_root)
    v2, v1 = _own_cgroups(proc_root)
    rooms: list[tuple[str, _CgroupRoom]] = []
    if v2 is not None and (cgroup_root / "cgroup.controllers").exists():  # the unified hierarchy is mounted here
        rooms += [("cgroup v2", room) for room in map(_room_v2, _ancestors(cgroup_root, v2)) if room]
    if v1 is not None:
        mount = cgroup_root / "memory"
        rooms += [("cgroup v1", room) for room in map(_room_v1, _ancestors(mount, v1)) if room]
    return rooms


def meminfo(proc_root: str | Path = "/proc") -> dict[str, int]:
    """MemTotal and MemAvailable in bytes (empty where /proc/meminfo cannot be read)."""
    values = {}
    try:
        for line in (Path(proc_root) / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable") and rest.split():
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def memory_limit(proc_root: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> MemoryLimit:
    """The memory this process may use: the tightest of its cgroups' rooms and the machine's MemAvailable."""
    info = meminfo(proc_root)
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, available, source = total, info.get("MemAvailable", total), "MemAvailable"
    for version, room in cgroup_rooms(proc_root, cgroup_root):
        free = max(room.limit_bytes - room.used_bytes, 0)
        if free < available or room.limit_bytes < limit:
            limit, source = min(limit, room.limit_bytes), f"{version} {room.path}"
            available = min(available, free)
    return MemoryLimit(limit, available, source)
