"""What the Serve app takes: one dataclass nesting the engine, scheduler and cluster configs, and its
conversion from `serve run k=v` strings, a config YAML's args or ENDOR_<ARG> variables.

    serve run endor_ray.serve:build_app store=STORE engine.gpu_memory=60GiB scheduler.max_num_seqs=16
    args: {store: STORE, engine: {gpu_memory: 60GiB}, scheduler: {max_num_seqs: 16}}      (YAML)
    ENDOR_STORE=STORE ENDOR_SCHEDULER_MAX_NUM_SEQS=16 serve build endor_ray.serve:application

A nested setting is `section.field` (or a mapping under the section's name), named as in
`EngineConfig`, `SchedulerConfig` and `ClusterConfig`; the flags of `endor serve` are the same
(`endor_ray.utils.options`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from endor_ray.engine.config import EngineConfig
from endor_ray.engine.scheduler import SchedulerConfig
from endor_ray.errors import ConfigError
from endor_ray.serve.tools import SYNTAXES
from endor_ray.service.driver import ClusterConfig
from endor_ray.utils.options import OPTIONS, configs_from, read_value, sections_of


def serve_scheduler() -> SchedulerConfig:
    """A server's batching: 32 sequences per pass and 1,024 waiting, as `endor serve` has always had
    (a server meets many clients at once; more waiting than that would only wait long, so HTTP 429)."""
    return SchedulerConfig(max_num_seqs=32, max_waiting=1024)


@dataclass
class ServeConfig:
    """What `build_app` accepts (also the `args` of a serve config YAML)."""

    store: str  # store path or URI, readable from every node
    model_name: str | None = None  # the model id clients ask for; default: the store's folder name
    default_max_tokens: int = 256  # for chat requests that give no max_tokens
    tool_call_syntax: str = "auto"  # how the model writes tool calls: "auto" (from its chat template), or SYNTAXES
    api_key: str | None = None  # clients must send it as a Bearer token (or ENDOR_API_KEY); None: open
    protect_health: bool = False  # with an API key, /health and /metrics need it too
    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=serve_scheduler)
    # cluster.address is where `endor serve` starts Serve; a Serve replica runs on its cluster already
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("the Serve app needs a store (args: store=PATH_OR_URI)")
        if self.tool_call_syntax not in ("auto", *SYNTAXES):
            raise ConfigError(f"tool_call_syntax must be 'auto' or one of {SYNTAXES}, got {self.tool_call_syntax!r}")

    @property
    def served_name(self) -> str:
        return self.model_name or PurePosixPath(self.store.rstrip("/")).name

    @property
    def worker_scheduler(self) -> SchedulerConfig:
        """The GPU workers' scheduler: unless max_seqs_per_request is set, a request holds at most an
        eighth of a pass's rows (at least one) while other requests are active, all of them alone:
        a client arriving while a big request runs joins at the next pass, and that pass holds few of
        the big request's rows (the rest are handed back and recomputed later; engine.scheduler)."""
        if self.scheduler.max_seqs_per_request is not None:
            return self.scheduler
        rows = self.scheduler.max_num_seqs
        return dataclasses.replace(self.scheduler, max_seqs_per_request=max(1, rows // 8))


SECTIONS = tuple(sections_of(ServeConfig))  # the nested configs: "engine", "scheduler", "cluster"
PLAIN_ARGS = tuple(f.name for f in dataclasses.fields(ServeConfig) if f.name not in SECTIONS)
# Every argument by its full name (store, ..., engine.device, ..., cluster.timeout_s), and the sections'
# names, which take a mapping (YAML: engine: {gpu_memory: 60GiB})
NESTED_ARGS = frozenset(f"{section}.{f.name}" for section, config in sections_of(ServeConfig).items()
                        for f in dataclasses.fields(config))
APP_ARGS = frozenset(PLAIN_ARGS) | frozenset(SECTIONS) | NESTED_ARGS


def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from app arguments: nested ones as `section.field` keys or a mapping under the
    section; values may arrive as strings (`serve run k=v`, environment variables)."""
    flat: dict[str, Any] = {}
    for key, value in args.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"app argument {key} must be a mapping of its settings ({key}: {{field: value}}) "
                                  f"or given as {key}.FIELD=VALUE")
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(PLAIN_ARGS) - NESTED_ARGS)
    if unknown:
        raise ConfigError(f"unknown Serve app arguments {unknown}{_nested_hint(unknown)}; accepted: {sorted(APP_ARGS)}")
    kinds = typing.get_type_hints(ServeConfig)  # the annotations are strings in this module
    plain = {name: read_value(kinds[name], flat[name], f"app argument {name}") for name in PLAIN_ARGS if name in flat}
    return ServeConfig(**plain, **configs_from(flat, sections_of(ServeConfig)))


def _renamed() -> dict[str, str]:
    """Older flat spellings of nested settings (the flags' names and aliases: max_batch_size, prefetch,
    gpu_memory, ...) -> their names now (scheduler.max_num_seqs, engine.prefetch_depth, ...)."""
    return {flag.removeprefix("--").replace("-", "_"): f"{section}.{option.field}"
            for section, options in OPTIONS.items() for option in options
            for flag in ("--" + option.field, *option.aliases)}


RENAMED = _renamed()


def _nested_hint(unknown: list[str]) -> str:
    hints = [f"{name} is {RENAMED[name]}" for name in unknown if name in RENAMED]
    return f" (engine, scheduler and cluster settings are nested: {', '.join(hints)})" if hints else ""


def environment_names() -> dict[str, str]:
    """ENDOR_<ARG> variable -> app argument (ENDOR_SCHEDULER_MAX_NUM_SEQS -> scheduler.max_num_seqs); the
    older flat names too (ENDOR_MAX_BATCH_SIZE), which serve_config_from_args refuses, naming the new one."""
    names = {f"ENDOR_{name.upper().replace('.', '_')}": name for name in (*PLAIN_ARGS, *NESTED_ARGS)}
    assert len(names) == len(PLAIN_ARGS) + len(NESTED_ARGS), "two app arguments share a variable name"
    return {**{f"ENDOR_{name.upper()}": name for name in RENAMED}, **names}
