"""The options of the engine, scheduler and cluster configs: declared once, mapped onto them by one helper.

Every entry point (`endor generate|verify|serve`, `serve run endor_ray.serve:build_app`, `python -m
endor_ray.jobs.generate`) holds its settings as nested configs under the names of `OPTIONS`
("engine": `EngineConfig`, "scheduler": `SchedulerConfig`, "cluster": `ClusterConfig`) and reaches
them the same way:

- on a command line, `add_options` gives each field a flag named for it (`--prefetch-depth` sets
  `engine.prefetch_depth`; an older spelling such as `--prefetch` stays an alias), its value read by
  the field's type, its default the entry point's own config (shown in --help);
- `configs_from` maps `{"section.field": value}` (an argparse namespace, `serve run` arguments) onto
  the configs: the fields named are replaced, the others keep the entry point's defaults, and the
  dataclass validates the result.

The configs are passed in, never imported: this module sits below the engine and the service that
define them and below serve, jobs and the CLI that all read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from endor_ray.errors import ConfigError

Config = TypeVar("Config")


@dataclass(frozen=True)
class Option:
    """A command-line flag for one field of a config."""

    field: str  # the config field it sets; the flag is --field-name
    help: str
    aliases: tuple[str, ...] = ()  # older spellings, still accepted
    choices: tuple[str, ...] | None = None


OPTIONS: dict[str, tuple[Option, ...]] = {
    "engine": (
        Option("device", "auto (CUDA if available), cuda, cuda:N or cpu"),
        Option("gpu_memory", "device tier: a size (8GiB) or a layer count (12); default: 90%% of free GPU memory, "
                             "or on CPU half the available memory (all of it for layers kept in their blocks)"),
        Option("host_memory", "host memory for compressed layers (64GiB); default: all"),
        Option("prefetch_depth", "layers fetched ahead of the one computing", aliases=("--prefetch",)),
        Option("compute_dtype", "compute in this dtype (default: the store's); float32 over a bf16 store makes "
                                "greedy answers independent of the batch", choices=("float32", "float16", "bfloat16")),
        Option("disk_io", "disk-tier reads through the page cache, dropping what they read (buffered), keeping it "
                          "(cached), or with O_DIRECT, leaving it alone (direct)", choices=("buffered", "cached", "direct")),
        Option("verify_disk_reads", "checksum every disk-tier read"),
        Option("decode_threads", "CPU decoding: threads a layer's decode splits over; default: all cores"),
        Option("cpu_matvec", "CPU: multiply small batches straight from dense INT8/INT4/Q8_0/Q4/Q5 blocks "
                             "instead of decoding each layer to dense first"),
        Option("fetch_timeout_s", "seconds a layer fetch may take before it is an error"),
        Option("expert_cache_memory", "MoE models: device memory for cached experts (4GiB; 0: none); default: what "
                                      "--gpu-memory leaves after the resident layers and streaming slots"),
        Option("expert_prefetch", "MoE models: while a layer computes, read the experts the next layer's router "
                                  "would pick from its hidden state (a guess, checked when that layer runs)"),
    ),
    "scheduler": (
        Option("max_num_seqs", "sequences per pass over the weights (requests join and leave at every pass)",
               aliases=("--max-batch-size", "--batch-size")),
        Option("max_waiting", "sequences queued beyond the running ones; more are refused (HTTP 429)"),
        Option("max_prefill_tokens", "padded prompt tokens a pass that admits newcomers may add"),
        Option("max_cache_tokens", "KV cache budget in tokens (prompt + max_new_tokens per sequence); default: no limit"),
        Option("max_seqs_per_request", "rows of a pass one request may hold while other requests are active (rows "
                                       "over it are handed back and recomputed later; alone it holds all); "
                                       "default: all (endor serve: an eighth)"),
    ),
    "cluster": (
        Option("address", "Ray cluster: auto, ray://host:port or host:port; default: a Ray job's cluster, the one "
                          "`ray start` runs here, else a local Ray started for this command"),
        Option("num_workers", "GPU worker replicas sharing the shard servers", aliases=("--workers",)),
        Option("shard_memory", "host memory per node for shard servers; default: 70%% of its object store"),
        Option("spill_to_disk", "layers beyond the shard budgets are read from the store on demand"),
        Option("max_restarts", "restarts of a shard server or GPU worker before it counts as dead"),
        Option("timeout_s", "seconds for start-up and per request", aliases=("--timeout",)),
    ),
}
UNFLAGGED = {"cluster": {"node_budgets"}}  # fields with no flag: set in Python only (a dict per node)


def sections_of(config_class: type) -> dict[str, Any]:
    """The default config of each field of `config_class` that is a section of OPTIONS (ServeConfig's
    "engine", ...): an entry point's own defaults, made by the fields' default factories."""
    return {field.name: field.default_factory() for field in dataclasses.fields(config_class)
            if field.name in OPTIONS and field.default_factory is not dataclasses.MISSING}


def add_options(parser: argparse.ArgumentParser, sections: Mapping[str, Any]) -> None:
    """Flags for the fields of each config in `sections` (section name -> the entry point's default
    config). A flag not given leaves no value in the namespace, so the config's default holds."""
    for section, config in sections.items():
        group = parser.add_argument_group(f"{section} options")
        kinds = typing.get_type_hints(type(config))
        for option in OPTIONS[section]:
            kind, default = kinds[option.field], getattr(config, option.field)
            shown = "" if default is None else f" (default: {default})"
            flags = ("--" + option.field.replace("_", "-"), *option.aliases)
            common = dict(dest=f"{section}.{option.field}", default=argparse.SUPPRESS, help=option.help + shown)
            if kind is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            else:
                group.add_argument(*flags, type=_reader(kind, flags[0]), choices=option.choices,
                                   metavar=None if option.choices else option.field.upper(), **common)


def configs_from(values: Mapping[str, Any], sections: Mapping[str, Config]) -> dict[str, Config]:
    """Each config of `sections` with the fields that `values` names "section.field" replaced (values
    given as text are read by the field's type); other keys of `values` are not this helper's."""
    configs = {}
    for section, config in sections.items():
        kinds = typing.get_type_hints(type(config))
        names = {field.name for field in dataclasses.fields(config)}
        given = {key.partition(".")[2]: value for key, value in values.items() if key.startswith(section + ".")}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"{section} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(names))}")
        configs[section] = dataclasses.replace(
            config, **{name: read_value(kinds[name], value, f"{section}.{name}") for name, value in given.items()})
    return configs


def read_value(kind: Any, value: Any, name: str) -> Any:
    """`value` read as the type `kind` when it is text (from `serve run k=v`, the environment or a
    flag); any other value as given. ConfigError names `name` if the text does not fit."""
    if not isinstance(value, str):
        return value
    accepted = set(typing.get_args(kind)) or {kind}
    if bool in accepted:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value.lower() in ("true", "1")
    if int in accepted and value.strip().removeprefix("-").isdigit():
        return int(value)  # gpu_memory=12 is a layer count, as on the command line
    if float in accepted or (int in accepted and str not in accepted):
        try:
            return float(value) if float in accepted else int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be a number") from None
    return value


def _reader(kind: Any, flag: str):
    """An argparse `type` reading a flag's text as `kind` (argparse reports the error on its usage line)."""
    def read(text: str) -> Any:
        try:
            return read_value(kind, text, flag)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return read
