"""The offloaded engine (stage 3 of the data's path: the GPU worker's work, without Ray).

Owns where layers sit (`tiers`), how they reach the compute device (`layer_source`: readers,
prefetch slots, CUDA streams), the model that runs on them (`model_runner`: skeleton, hooks,
forward, tokenizer), generation (`engine`, `scheduler`, `sequence`, `sampling`, the prompt check
`prompts`) and the plain-transformers reference it is tested against (`reference`). May import the format, models,
store and `endor_ray.kernels`; never Ray or the entry points.
"""

from endor_ray.engine.engine import Engine, EngineConfig, GenerationResult  # noqa: F401  (public API)
