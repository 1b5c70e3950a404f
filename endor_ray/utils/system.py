"""Facts about this machine that budgets are sized from."""

from __future__ import annotations

import os


def available_memory_bytes() -> int:
    """Memory the system could give this process now (Linux: MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
