"""endor-ray: offloaded LLM inference with Endor bitmap-sparse weights."""

__version__ = "0.1.0"


def connect(store_location: str, engine_config=None, cluster=None):
    """Start (or join) the Ray service for a store; see `endor_ray.driver.connect`."""
    from endor_ray.driver import connect as _connect

    return _connect(store_location, engine_config, cluster)
