"""The compressed model store and everything that writes it (stage 2 of the data's path).

Owns the store's on-disk layout and reader (`store`), reading Hugging Face checkpoints
(`checkpoint`), the embedded default model (`default_model`), pruning (`prune`), calibration
(`calibration`), and checkpoint -> store -> checkpoint (`convert`, `export`). May import the
format and models, never the engine, Ray or the entry points.
"""

from endor_ray.store.store import Store  # noqa: F401  (the store's public API)
