"""endor-ray: offloaded LLM inference with Endor bitmap-sparse weights."""

from endor_ray._version import __version__  # noqa: F401


def connect(store_location: str, engine_config=None, cluster=None, address: str | None = None, scheduler=None):
    """Start (or join, with address="auto" / "ray://host:port" / "host:port") the Ray service for a
    store; returns a handle with generate() and stream(). See `endor_ray.service.driver.connect`."""
    from endor_ray.service.driver import connect as _connect

    return _connect(store_location, engine_config, cluster, address, scheduler)
