"""What the batch job takes: one dataclass nesting the engine, scheduler and cluster configs, built
from its command line (the nested settings' flags are `endor_ray.utils.options`', as in the CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from endor_ray.engine.config import EngineConfig
from endor_ray.engine.sampling import SamplingParams
from endor_ray.engine.scheduler import SchedulerConfig
from endor_ray.errors import ConfigError
from endor_ray.service.driver import ClusterConfig
from endor_ray.utils.options import configs_from, sections_of


def job_scheduler() -> SchedulerConfig:
    """A batch job's batching: 64 sequences per pass, as its --batch-size has always been (a job has
    all its prompts at hand, so fuller passes cost nothing in latency)."""
    return SchedulerConfig(max_num_seqs=64)


def job_cluster() -> ClusterConfig:
    """600 s for start-up and per batch, as its --timeout has always been (a batch is two passes' worth
    of sequences, longer than one request)."""
    return ClusterConfig(timeout_s=600.0)


@dataclass
class JobConfig:
    """One batch run: where prompts come from and go, how to sample, and the nested configs."""

    store: str  # store path or URI, readable from every node
    input: str  # JSONL or Parquet: a file, a folder, or a URI
    output: str  # folder (or URI) of Parquet parts
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    prompt_column: str = "prompt"
    id_column: str = "id"
    json_schema: str | None = None  # a JSON schema file every row's output follows (strict; see engine.grammar)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=job_scheduler)
    cluster: ClusterConfig = field(default_factory=job_cluster)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The --json-schema file's schema (None without one); ConfigError if unreadable or not JSON."""
        if self.json_schema is None:
            return None
        try:
            schema = json.loads(Path(self.json_schema).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--json-schema {self.json_schema}: cannot read a JSON schema ({exc})") from None
        if not isinstance(schema, dict):
            raise ConfigError(f"--json-schema {self.json_schema}: a JSON schema is an object, got {type(schema).__name__}")
        return schema

    @property
    def sampling(self) -> SamplingParams:
        """The rows' sampling parameters (with --json-schema, the grammar its schema compiles to)."""
        from endor_ray.engine.grammar import json_schema_grammar

        schema = self.schema
        try:
            grammar = None if schema is None else json_schema_grammar(schema, strict=True)
        except ConfigError as exc:
            raise ConfigError(f"--json-schema {self.json_schema}: {exc}") from None
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, grammar=grammar)


SECTIONS = tuple(sections_of(JobConfig))
PLAIN_FIELDS = tuple(f.name for f in dataclasses.fields(JobConfig) if f.name not in SECTIONS)


def default_of(name: str):
    """A plain field's default (the job's flags show the dataclass's defaults, not copies)."""
    [found] = [f for f in dataclasses.fields(JobConfig) if f.name == name]
    return None if found.default is dataclasses.MISSING else found.default


def job_config(args: argparse.Namespace) -> JobConfig:
    """The JobConfig of parsed arguments: plain flags by name, nested ones by `section.field`."""
    values = vars(args)
    return JobConfig(**{name: values[name] for name in PLAIN_FIELDS},
                     **configs_from(values, sections_of(JobConfig)))
