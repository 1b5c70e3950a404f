"""The offloaded generation engine: transformers' own model, with decoder layers streamed from a store.

The model skeleton is built from the store's config on the meta device; the non-layer weights
(embeddings, final norm, LM head) live on the compute device; decoder layers come from a
`LayerSource` (resident, host or disk tier, prefetched and decompressed ahead of use) through
forward hooks. Attention, masks and the KV cache are transformers' own.

Generation is continuously batched: sequences join and leave the running batch at every pass over
the weights (the expensive part), so each pass serves every live sequence whatever request it came
from. `step()` is the one generation loop: the scheduler admits waiting sequences
(`engine.scheduler`), one forward pass runs the batch (`engine.kv_batch`: the newcomers' prefill
shares it with the running rows' decode), each row picks its next token (a failure there ends that
sequence alone), and finished or cancelled rows leave. `generate()`/`stream()` run one request to
its end; `engine.runner.EngineLoop` serves many requests at once from a thread.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from endor_ray.engine.config import EngineConfig
from endor_ray.engine.device import CudaOps
from endor_ray.engine.kv_batch import RunningBatch
from endor_ray.engine.layer_source import LayerSource
from endor_ray.engine.prompts import check_prompt, context_limit
from endor_ray.engine.readers import StoreReader
from endor_ray.engine.results import (  # noqa: F401  (GenerationStats: re-exported, the engine's API)
    EngineMetrics, GenerationResult, GenerationStats, RequestTracker, TokenEvent,
)
from endor_ray.engine.sampling import SamplingParams, make_generator, process_logits, select_token, top_logprobs
from endor_ray.engine.scheduler import Scheduler, SchedulerConfig
from endor_ray.engine.sequence import Sequence
from endor_ray.engine.tiers import plan_tiers
from endor_ray.errors import ConfigError
from endor_ray.format.tensor import decode
from endor_ray.store.store import Store
from endor_ray.utils.system import available_memory_bytes

# (sequence index, token id, newly final text) -> None
TokenCallback = Callable[[int, int, str], None]

class Engine:
    """Generates from an Endor store with layers streamed to the compute device."""

    def __init__(self, store: Store | str, config: EngineConfig | None = None, progress: bool = True, reader=None,
                 scheduler: SchedulerConfig | None = None):
        """`reader` supplies streamed layers' bytes (default: a StoreReader over `store`);
        `scheduler` bounds what shares a pass (default: SchedulerConfig())."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.config = config or EngineConfig()
        self.device = self.config.resolve_device()
        self.tokenizer = load_tokenizer(self.store)
        from endor_ray.models.skeleton import build_skeleton, check_tensors_match, decoder_layers, materialize_layer

        self.dtype = getattr(torch, self.config.compute_dtype) if self.config.compute_dtype else self.store.dtype
        dense = {name: decode(enc) for name, enc in self.store.dense_tensors().items()}
        self.model = build_skeleton(self.store.config, dense, dtype=self.dtype, device=self.device)
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
                                      self.config.fetch_timeout_s, progress, self.config.decode_threads, ops,
                                      self.dtype if self.dtype != self.store.dtype else None)
            layers = decoder_layers(self.model, self.store.architecture)
            for layer_idx, weights in self.source.resident.items():
                materialize_layer(layers[layer_idx], weights)
            self._hooks = self._install_hooks()
            self.eos_ids = eos_token_ids(self.store.config, self.tokenizer)
            self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                           else min(self.eos_ids, default=0))
            self.max_context = context_limit(self.store.config)
            self.scheduler = Scheduler(scheduler or SchedulerConfig())
            self.batch = RunningBatch(self.device, self.pad_id, self._new_cache)
            self.metrics = EngineMetrics()
            # The module that returns the final hidden states: the LM head runs on the positions needed
            self._body = operator.attrgetter(self.store.architecture.body_path)(self.model)
            # transformers 5 names the KV-cache argument `cache`; 4.x called it `past_key_values`
            self._cache_arg = "cache" if "cache" in inspect.signature(self._body.forward).parameters else "past_key_values"
        except BaseException:
            self.close()  # the prefetch threads, pinned pages and slots of what was built so far
            if self.source is None:
                reader.close()
            raise

    def _plan(self):
        entries = self.store.manifest["layers"]
        compressed = [entry["nbytes"] for entry in entries]
        dense = [sum(torch.Size(t["shape"]).numel() for t in entry["tensors"]) * self.dtype.itemsize
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

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def new_sequences(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                      ) -> list[Sequence]:
        """Tokenized sequences for a request, checked now (`check_prompt`: ConfigError), not inside a pass."""
        if not prompts:
            raise ConfigError("no prompts given")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} sampling parameter sets for {len(prompts)} prompts")
        sequences = []
        for prompt, seq_params in zip(prompts, params):
            ids = check_prompt(self.tokenizer, prompt, seq_params.max_new_tokens, self.max_context)
            if not isinstance(prompt, str):  # token ids (checked where they entered, cheap to check again)
                prompt = self.tokenizer.decode(ids)
            seq = Sequence(prompt, ids, seq_params, make_generator(seq_params, torch.device("cpu")))
            self.scheduler.check_fits(seq)
            sequences.append(seq)
        return sequences

    def add(self, sequences: list[Sequence]) -> None:
        """Queue sequences for the next passes (QueueFull when the queue is full)."""
        self.scheduler.add(sequences)

    @staticmethod
    def cancel(sequences: list[Sequence]) -> None:
        """Let these sequences go at the next pass (safe from any thread)."""
        for seq in sequences:
            seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.batch.rows) or len(self.scheduler) > 0

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int | None, str]]:
        """One pass over the weights for every live sequence: (sequence, token id or None, text that
        became final) for each sequence that moved, finished, or was cancelled."""
        events = [(seq, None, seq.finish("cancelled")) for seq in self.scheduler.take_cancelled()]
        leaving = [seq for seq in self.batch.rows if seq.cancelled]
        events += [(seq, None, seq.finish("cancelled")) for seq in leaving]
        self.batch.remove(leaving)
        newcomers = self.scheduler.admit(self.batch.rows)
        if not self.batch.rows and not newcomers:
            self._finish(seq for seq, _, _ in events)
            return events
        inputs = self.batch.inputs(newcomers)
        logits, prompt_logits = self._forward(inputs, newcomers)
        self.metrics.record_pass(len(self.batch.rows))
        leaving = []
        for seq, (token_id, logprob) in zip(self.batch.rows, self._choose(logits)):
            if id(seq) in prompt_logits:
                seq.prompt_logprobs = _prompt_logprobs(prompt_logits[id(seq)], seq)
            if seq.params.max_new_tokens == 0:  # scoring the prompt only
                events.append((seq, None, seq.finish("length")))
            elif token_id is None:  # its sampling failed: this sequence alone ends
                events.append((seq, None, seq.finish("error", seq.error)))
            else:
                events.append((seq, token_id, seq.append(token_id, self.tokenizer, self.eos_ids, logprob)))
            if seq.finished:
                leaving.append(seq)
        self.batch.remove(leaving)
        self.batch.realign()
        self._finish(seq for seq, _, _ in events)
        return events

    def _forward(self, inputs: dict[str, torch.Tensor], newcomers: list[Sequence]
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One pass: [rows, vocab] logits of every row's last position, and for each newcomer that
        asks for its prompt's log-probabilities, [prompt length - 1, vocab] logits predicting its
        prompt tokens 1.. (the LM head runs on those positions only)."""
        hidden = self._body(**inputs, use_cache=True, **{self._cache_arg: self.batch.cache}).last_hidden_state
        last = self.model.lm_head(hidden[:, -1, :])  # [rows, vocab]
        prompt_logits = {}
        first_newcomer, block = len(self.batch.rows) - len(newcomers), hidden.shape[1]
        for offset, seq in enumerate(newcomers):
            if seq.params.prompt_logprobs is not None:
                length = len(seq.prompt_ids)
                prompt_logits[id(seq)] = self.model.lm_head(hidden[first_newcomer + offset, block - length:block - 1])
        return last, prompt_logits

    def _finish(self, sequences) -> None:
        for seq in sequences:
            if seq.finished:
                self.metrics.record_finished(seq)

    def _choose(self, logits: torch.Tensor) -> list[tuple[int | None, tuple | None]]:
        """Each row's (next token, its log-probability and alternatives if asked); a row whose
        sampling fails gets None (and its error)."""
        rows = self.batch.rows
        if all(seq.params.plain and seq.params.logprobs is None for seq in rows):
            return [(token_id, None) for token_id in logits.argmax(dim=-1).tolist()]
        host = logits.float().cpu()
        chosen: list[tuple[int | None, tuple | None]] = []
        for row, seq in enumerate(rows):
            params = seq.params
            try:
                raw = host[row]
                end_ids = set() if params.ignore_eos else self.eos_ids
                processed = raw if params.plain else process_logits(raw, params, seq.prompt_ids, seq.output_ids,
                                                                    end_ids)
                token_id = select_token(processed, params, seq.generator)
                logprob = (top_logprobs(torch.log_softmax(raw.double(), dim=-1), token_id, params.logprobs)
                           if params.logprobs is not None else None)
                chosen.append((token_id, logprob))
            except (RuntimeError, ValueError) as exc:  # e.g. probabilities that overflow to inf or NaN
                seq.error = f"sampling failed for this sequence ({str(exc).splitlines()[0]})"
                chosen.append((None, None))
        return chosen

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Complete every prompt; `on_token` sees text as it becomes final."""
        for event in self.stream(prompts, params):
            if isinstance(event, GenerationResult):
                return event
            if on_token is not None:
                on_token(event.index, event.token_id, event.text)
        raise AssertionError("stream() ended without a result")

    def stream(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[TokenEvent | GenerationResult]:
        """Run one request to its end on this thread: a TokenEvent as each sequence's text becomes
        final, then one GenerationResult. Interrupted (Ctrl-C, a consumer that stops), the request's
        sequences are cancelled and leave the batch."""
        sequences = self.new_sequences(prompts, params)
        index = {id(seq): position for position, seq in enumerate(sequences)}
        self.add(sequences)
        tracker = RequestTracker(self, sequences)
        try:
            while not all(seq.finished for seq in sequences):
                for seq, token_id, text in self.step():
                    if id(seq) in index and token_id is not None and (text or seq.finished):
                        yield TokenEvent(index[id(seq)], token_id, text)
                tracker.stepped()
        except BaseException:
            self.cancel(sequences)
            self._drop(sequences)
            raise
        yield tracker.result()

    def _drop(self, sequences: list[Sequence]) -> None:
        """Take cancelled sequences out now (after an interruption there may be no next step)."""
        try:
            self.scheduler.take_cancelled()
            self.batch.remove([seq for seq in self.batch.rows if seq.cancelled])
        except Exception:  # noqa: BLE001 - the original error matters more
            self.batch = RunningBatch(self.device, self.pad_id, self._new_cache)

    def stream_data(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[dict[str, Any]]:
        """`stream()` as plain data (what crosses Ray and HTTP): {"index", "token_id", "text"}
        events, then {"completions", "stats"}."""
        for event in self.stream(prompts, params):
            yield event.to_dict() if isinstance(event, GenerationResult) else event._asdict()

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


def _prompt_logprobs(logits: torch.Tensor, seq: Sequence) -> list:
    """[None, (log-probability of prompt token i, alternatives) for i >= 1] from [length - 1, vocab]."""
    logprobs = torch.log_softmax(logits.double().cpu(), dim=-1)
    return [None] + [top_logprobs(logprobs[position - 1], token_id, seq.params.prompt_logprobs)
                     for position, token_id in enumerate(seq.prompt_ids) if position > 0]


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
