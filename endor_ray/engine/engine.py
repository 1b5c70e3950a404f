"""The offloaded generation engine: transformers' own model, with decoder layers streamed from a store.

The model skeleton is built from the store's config on the meta device; the non-layer weights
(embeddings, final norm, LM head) live on the compute device; decoder layers come from a
`LayerSource` (resident, host or disk tier, prefetched and decompressed ahead of use) through
forward hooks. Attention, masks and the KV cache are transformers' own.

Generation is batched: prompts of different lengths are left-padded into one batch, so each pass
over the weights (the expensive part) serves every sequence. `step()` runs one forward pass for
the batch and picks each sequence's next token; `generate()` loops it.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from endor_ray.errors import ConfigError
from endor_ray.format.tensor import decode
from endor_ray.engine.device import CudaOps
from endor_ray.engine.layer_source import LayerSource
from endor_ray.engine.readers import StoreReader
from endor_ray.engine.source_stats import SourceStats
from endor_ray.engine.tiers import plan_tiers
from endor_ray.engine.sampling import SamplingParams, make_generator, select_token
from endor_ray.engine.sequence import Sequence
from endor_ray.store.store import Store
from endor_ray.utils.system import available_memory_bytes
from endor_ray.utils.units import parse_budget

# (sequence index, token id, newly final text) -> None
TokenCallback = Callable[[int, int, str], None]

@dataclass
class EngineConfig:
    """How the engine places and streams layers."""

    device: str = "auto"  # "cuda", "cuda:N", "cpu", or "auto" (CUDA when available)
    # Device tier: a size ("8GiB": resident layers + streaming slots) or a layer count ("12").
    # None: on CUDA as many layers as 90% of free memory holds; on CPU as many as half the
    # available memory holds (a model that fits is decoded once and never streamed).
    gpu_memory: str | int | None = None
    host_memory: str | int | None = None  # compressed layers kept in host memory (size); None: all
    prefetch_depth: int = 2  # layers fetched ahead of the one computing
    verify_disk_reads: bool = True  # checksum every disk-tier read (host tier is checked at load)
    # Disk-tier reads: "buffered" (through the page cache, which may keep layers in spare RAM) or
    # "direct" (O_DIRECT: DMA into the read buffer, no CPU copy, the page cache left alone).
    disk_io: str = "buffered"
    decode_threads: int | None = None  # CPU decoding: threads a layer's decode splits over; None: all cores
    fetch_timeout_s: float = 600.0  # a layer fetch slower than this is an error, not a hang

    def __post_init__(self) -> None:
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.prefetch_depth < 0:
            raise ConfigError(f"prefetch depth must be >= 0, got {self.prefetch_depth}")
        if self.disk_io not in ("buffered", "direct"):
            raise ConfigError(f"disk_io must be buffered or direct, got {self.disk_io!r}")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ConfigError(f"decode threads must be >= 1, got {self.decode_threads}")
        self.gpu_budget  # parse now: a bad value fails at construction
        if parse_budget(self.host_memory, "host memory")[1] not in (None, 0):
            raise ConfigError("host memory is a size (for example 64GiB), not a layer count")

    @property
    def gpu_budget(self) -> tuple[int | None, int | None]:
        """(bytes, layers) of the device tier; at most one is set."""
        return parse_budget(self.gpu_memory, "GPU memory")

    @property
    def host_budget_bytes(self) -> int | None:
        host_bytes, host_layers = parse_budget(self.host_memory, "host memory")
        return 0 if host_layers == 0 else host_bytes

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        return device


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class GenerationStats:
    """Throughput and where the time went, for one generate() call."""

    sequences: int
    steps: int  # forward passes (each one pass over all layers)
    new_tokens: int
    wall_s: float
    prefill_s: float  # the first step: the whole prompts through every layer
    source: SourceStats = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        source = self.source
        return {
            "sequences": self.sequences,
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.new_tokens / self.wall_s if self.wall_s else 0.0,
            "s_per_step": self.wall_s / self.steps if self.steps else 0.0,
            "prefill_s": self.prefill_s,
            # decode steps only: one token per sequence per pass over the weights
            "decode_s_per_step": (self.wall_s - self.prefill_s) / (self.steps - 1) if self.steps > 1 else None,
            "bytes_to_device_per_step": source.bytes_to_device / self.steps if self.steps else 0,
            "link_GBps": source.bytes_to_device / source.transfer_s / 1e9 if source.transfer_s else None,
            "time_s": {"transfer": source.transfer_s, "read": source.read_s,
                       "decompress": source.decompress_s, "compute_streamed": source.compute_s,
                       "stall": source.stall_s},
            "tier_hits": dict(source.hits),
        }


class TokenEvent(NamedTuple):
    index: int  # which prompt of the batch
    token_id: int
    text: str  # text that became final with this token (may be empty)


class GenerationResult(NamedTuple):
    completions: list[Completion]
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        """Plain data: {"completions": [{prompt, text, token_ids, finish_reason}], "stats": {...}}."""
        return {"completions": [vars(c).copy() for c in self.completions], "stats": self.stats.to_dict()}


@dataclass
class _Batch:
    sequences: list[Sequence]
    input_ids: torch.Tensor  # [batch, tokens] int64: the whole padded prompt, then one token each step
    attention_mask: torch.Tensor  # [batch, all tokens so far] int64, 0 on left padding
    position_ids: torch.Tensor  # [batch, tokens] int64
    cache: Any

    @property
    def done(self) -> bool:
        return all(seq.finished for seq in self.sequences)


class Engine:
    """Generates from an Endor store with layers streamed to the compute device."""

    def __init__(self, store: Store | str, config: EngineConfig | None = None, progress: bool = True, reader=None):
        """`reader` supplies streamed layers' bytes (default: a StoreReader over `store`)."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.config = config or EngineConfig()
        self.device = self.config.resolve_device()
        self.tokenizer = load_tokenizer(self.store)
        from endor_ray.models.skeleton import build_skeleton, check_tensors_match, decoder_layers, materialize_layer

        dense = {name: decode(enc) for name, enc in self.store.dense_tensors().items()}
        self.model = build_skeleton(self.store.config, dense, dtype=self.store.dtype, device=self.device)
        check_tensors_match(self.model, self.store.architecture,  # a store's layers must fit its model
                            [{t["name"]: t["shape"] for t in entry["tensors"]} for entry in self.store.manifest["layers"]],
                            self.store.location)
        self.plan = self._plan()
        self.source: LayerSource | None = None
        self._hooks: contextlib.ExitStack | None = None
        ops = CudaOps(self.device) if self.device.type == "cuda" else None
        if reader is None:
            reader = StoreReader(self.store, self.plan.host, ops, verify_disk_reads=self.config.verify_disk_reads,
                                 direct_io=self.config.disk_io == "direct", progress=progress)
        try:
            self.source = LayerSource(reader, self.plan, self.device, self.config.prefetch_depth,
                                      self.config.fetch_timeout_s, progress, self.config.decode_threads, ops)
            layers = decoder_layers(self.model, self.store.architecture)
            for layer_idx, weights in self.source.resident.items():
                materialize_layer(layers[layer_idx], weights)
            self._hooks = self._install_hooks()
            self.eos_ids = eos_token_ids(self.store.config, self.tokenizer)
            self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                           else min(self.eos_ids, default=0))
            self.max_context = int(self.store.config.get("max_position_embeddings") or 2**31)
            # transformers 5 names the KV-cache argument `cache`; 4.x called it `past_key_values`
            self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        except BaseException:
            self.close()  # the prefetch threads, pinned pages and slots of what was built so far
            if self.source is None:
                reader.close()
            raise

    def _plan(self):
        entries = self.store.manifest["layers"]
        compressed = [entry["nbytes"] for entry in entries]
        dense = [sum(torch.Size(t["shape"]).numel() for t in entry["tensors"]) * self.store.dtype.itemsize
                 for entry in entries]
        budget_bytes, budget_layers = self.config.gpu_budget
        if budget_bytes is None and budget_layers is None:
            if self.device.type == "cpu":  # the "device" is host memory: keep resident what half of it holds
                budget_bytes = int(0.5 * available_memory_bytes())
            else:
                free_bytes, _ = torch.cuda.mem_get_info(self.device)
                budget_bytes = int(0.9 * free_bytes)
        return plan_tiers(compressed, dense, self.config.prefetch_depth, budget_bytes, budget_layers,
                          self.config.host_budget_bytes)

    def _install_hooks(self):
        from endor_ray.models.skeleton import stream_layers

        def release(layer_idx: int, module, args, kwargs, output):
            self.source.release(layer_idx)
            return output

        hooks = contextlib.ExitStack()  # closed by close(): removes the hooks
        hooks.enter_context(stream_layers(self.model, self.store.architecture, self.source.acquire, release,
                                          layer_indices=list(self.plan.streamed)))
        return hooks

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Complete every prompt in one batch; `on_token` sees text as it becomes final."""
        for event in self.stream(prompts, params):
            if isinstance(event, GenerationResult):
                return event
            if on_token is not None:
                on_token(event.index, event.token_id, event.text)
        raise AssertionError("stream() ended without a result")

    def stream(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[TokenEvent | GenerationResult]:
        """Yield a TokenEvent as each sequence's text becomes final, then one GenerationResult."""
        batch = self.start(prompts, params)
        self.source.reset_stats()
        started = time.perf_counter()
        steps, prefill_s = 0, 0.0
        while not batch.done:
            events: list[TokenEvent] = []
            self.step(batch, lambda index, token_id, text: events.append(TokenEvent(index, token_id, text)))
            steps += 1
            if steps == 1:  # step() read the logits back: the prefill has finished on the device
                prefill_s = time.perf_counter() - started
            yield from events
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - started
        completions = [Completion(seq.prompt, seq.text, list(seq.output_ids), seq.finish_reason)
                       for seq in batch.sequences]
        source_stats = self.source.reset_stats()
        source_stats.hits["device"] = steps * len(self.plan.device)  # resident layers run unhooked
        yield GenerationResult(completions, GenerationStats(
            len(prompts), steps, sum(len(c.token_ids) for c in completions), wall, prefill_s, source_stats))

    def stream_data(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[dict[str, Any]]:
        """`stream()` as plain data (what crosses Ray and HTTP): {"index", "token_id", "text"}
        events, then {"completions", "stats"}."""
        for event in self.stream(prompts, params):
            yield event.to_dict() if isinstance(event, GenerationResult) else event._asdict()

    def start(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None) -> _Batch:
        """Tokenize and left-pad the prompts into a batch ready for its first step."""
        if not prompts:
            raise ConfigError("no prompts given")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} sampling parameter sets for {len(prompts)} prompts")
        sequences = []
        for prompt, seq_params in zip(prompts, params):
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError("every prompt must be a non-empty string")
            ids = self.tokenizer(prompt).input_ids
            if len(ids) + seq_params.max_new_tokens > self.max_context:
                raise ConfigError(
                    f"prompt of {len(ids)} tokens plus max_new_tokens={seq_params.max_new_tokens} exceeds "
                    f"the model's context of {self.max_context} tokens; shorten the prompt or lower max_new_tokens"
                )
            sequences.append(Sequence(prompt, ids, seq_params, make_generator(seq_params, torch.device("cpu"))))
        longest = max(len(seq.prompt_ids) for seq in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, longest - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            attention_mask[row, longest - len(seq.prompt_ids):] = 1
        # As transformers' generate: positions count real tokens; padding sits at position 0.
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        from transformers import DynamicCache

        return _Batch(sequences, input_ids.to(self.device), attention_mask.to(self.device),
                      position_ids.to(self.device), DynamicCache(config=self.model.config))

    @torch.inference_mode()
    def step(self, batch: _Batch, on_token: TokenCallback | None = None) -> None:
        """One forward pass over all layers for the whole batch, and one new token per live sequence."""
        logits = self.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=True, logits_to_keep=1,  # the LM head on the last position only
            **{self._cache_arg: batch.cache},
        ).logits[:, -1, :]  # [batch, vocab]
        if all(seq.params.greedy for seq in batch.sequences):
            chosen = logits.argmax(dim=-1).tolist()
        else:
            rows = logits.float().cpu()
            chosen = [select_token(rows[i], seq.params, seq.generator) if not seq.finished else self.pad_id
                      for i, seq in enumerate(batch.sequences)]
        next_ids = []
        for index, (seq, token_id) in enumerate(zip(batch.sequences, chosen)):
            if seq.finished:
                next_ids.append(self.pad_id)
                continue
            delta = seq.append(token_id, self.tokenizer, self.eos_ids)
            if on_token is not None and (delta or seq.finished):
                on_token(index, token_id, delta)
            next_ids.append(token_id)
        batch.input_ids = torch.tensor(next_ids, dtype=torch.long, device=self.device)[:, None]
        ones = torch.ones((len(next_ids), 1), dtype=torch.long, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        batch.position_ids = batch.position_ids[:, -1:] + 1

    def close(self) -> None:
        """Stop the prefetch threads and free the buffers (safe to call twice)."""
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_tokenizer(store: Store):
    """The store's tokenizer (left padding, for batched generation)."""
    from transformers import AutoTokenizer

    files = store.tokenizer_files()
    if not any(name.startswith("tokenizer") or name in ("vocab.json", "merges.txt") for name in files):
        raise ConfigError(f"{store.location} holds no tokenizer files; convert from a checkpoint that has them")
    with tempfile.TemporaryDirectory() as directory:
        for name, contents in files.items():
            (Path(directory) / name).write_bytes(contents)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    return tokenizer


def eos_token_ids(config: dict[str, Any], tokenizer) -> set[int]:
    eos = config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
