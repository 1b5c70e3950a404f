"""The compressed model store (stage 2 of the data's path).

Owns the store's on-disk layout and reader (`store`, `manifest`, `files`), its audit (`audit`)
and store -> checkpoint (`export`). What writes a store from a checkpoint is
`endor_ray.compress`. May import the format and models, never compression, the engine, Ray or
the entry points.
"""

from endor_ray.store.store import Store  # noqa: F401  (the store's public API)
