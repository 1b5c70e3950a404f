"""What the Serve app takes: one dataclass, and its conversion from `serve run k=v` strings."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from endor_ray.errors import ConfigError


@dataclass
class ServeConfig:
    """What `build_app` accepts (also the `args` of a serve config YAML)."""

    store: str  # store path or URI, readable from every node
    model_name: str | None = None  # the model id clients ask for; default: the store's folder name
    address: str | None = None  # only for `endor serve`: the cluster to start Serve on
    device: str = "auto"
    gpu_memory: str | int | None = None  # device tier, as for `endor generate`
    prefetch: int = 2
    compute_dtype: str | None = None  # "float32": answers independent of the batch over a bf16 store
    num_workers: int = 1  # GPU worker replicas
    shard_memory: str | None = None  # per-node budget for shard servers
    max_batch_size: int = 32  # sequences per pass over the weights (continuous batching)
    max_waiting: int = 1024  # sequences queued beyond those; more is HTTP 429
    default_max_tokens: int = 256  # for chat requests that give no max_tokens
    api_key: str | None = None  # clients must send it as a Bearer token (or ENDOR_API_KEY); None: open
    protect_health: bool = False  # with an API key, /health and /metrics need it too

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("the Serve app needs a store (args: store=PATH_OR_URI)")
        if self.max_batch_size < 1 or self.max_waiting < 0:
            raise ConfigError("max_batch_size must be >= 1 and max_waiting >= 0")

    @property
    def served_name(self) -> str:
        return self.model_name or PurePosixPath(self.store.rstrip("/")).name


APP_ARGS = frozenset(field.name for field in dataclasses.fields(ServeConfig))

def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from app arguments, whose values arrive as strings from `serve run k=v`."""
    unknown = set(args) - APP_ARGS
    if unknown:
        raise ConfigError(f"unknown Serve app arguments {sorted(unknown)}; accepted: {sorted(APP_ARGS)}")
    converted = {}
    types = typing.get_type_hints(ServeConfig)  # the annotations are strings in this module
    for field in dataclasses.fields(ServeConfig):
        if field.name not in args:
            continue
        value, kind = args[field.name], types[field.name]
        if isinstance(value, str) and kind in (int, float):
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"app argument {field.name}={value!r} must be a number") from None
        elif isinstance(value, str) and int in typing.get_args(kind) and value.isdigit():
            value = int(value)  # gpu_memory=12 is a layer count, as on the command line
        elif isinstance(value, str) and kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"app argument {field.name}={value!r} must be true or false")
            value = value.lower() in ("true", "1")
        converted[field.name] = value
    return ServeConfig(**converted)
