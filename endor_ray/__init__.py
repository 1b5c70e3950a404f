"""endor-ray: offloaded LLM inference with Endor bitmap-sparse weights."""

__version__ = "0.1.0"
