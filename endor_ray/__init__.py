"""endor-ray: offloaded LLM inference with Endor bitmap-sparse weights."""

import os

from endor_ray._version import __version__  # noqa: F401

# Before torch is imported (by any of our modules): its GNU OpenMP threads otherwise spin after every
# parallel op, taking the cores our own threads need for the CPU products from blocks
# (format.cpu_matvec). A 7B-shaped Q4_0 token on 2 cores, medians of interleaved runs on a noisy VM:
# 0.98 -> 0.79 s, 1.09 -> 0.77 s, 1.08 -> 1.04 s; a small dense model's token within noise (97 vs
# 101 ms). A value the user set (even empty: OpenMP's own default) is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def connect(store_location: str, engine_config=None, cluster=None, address: str | None = None, scheduler=None):
    """Start (or join, with address="auto" / "ray://host:port" / "host:port") the Ray service for a
    store; returns a handle with generate() and stream(). See `endor_ray.service.driver.connect`."""
    from endor_ray.service.driver import connect as _connect

    return _connect(store_location, engine_config, cluster, address, scheduler)
