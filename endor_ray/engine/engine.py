"""The offloaded generation engine: continuous batching over a model whose layers stream from a store.

Sequences join and leave the running batch at every pass over the weights (the expensive part), so
each pass serves every live sequence whatever request it came from. `step()` is the one generation
loop: the scheduler admits waiting sequences (`engine.scheduler`), the model runner runs one forward
pass for the batch (`engine.model_runner`; `engine.kv_batch`: the newcomers' prefill shares it with
the running rows' decode), each row picks its next token (a failure there ends that sequence alone),
and finished or cancelled rows leave. `generate()`/`stream()` run one request to its end;
`engine.loop.EngineLoop` serves many requests at once from a thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from endor_ray.engine.config import EngineConfig
from endor_ray.engine.grammar import GrammarState, apply_mask, compute_masks, grammar_tokenizer
from endor_ray.engine.kv_batch import RunningBatch
from endor_ray.engine.model_runner import ModelRunner, eos_token_ids, load_tokenizer  # noqa: F401  (re-exported)
from endor_ray.engine.prompts import check_prompt
from endor_ray.engine.results import (  # noqa: F401  (GenerationStats: re-exported, the engine's API)
    EngineMetrics, GenerationResult, GenerationStats, RequestTracker, TokenEvent, sequence_events,
)
from endor_ray.engine.sampling import SamplingParams, make_generator, process_logits, select_token, top_logprobs
from endor_ray.engine.scheduler import Scheduler, SchedulerConfig
from endor_ray.engine.sequence import Sequence
from endor_ray.errors import ConfigError
from endor_ray.store.store import Store

# (sequence index, token id, newly final text) -> None
TokenCallback = Callable[[int, int, str], None]


class Engine:
    """Generates from an Endor store with layers streamed to the compute device."""

    def __init__(self, store: Store | str, config: EngineConfig | None = None, progress: bool = True, reader=None,
                 scheduler: SchedulerConfig | None = None, tokenizer=None):
        """`reader` supplies streamed layers' bytes (default: a StoreReader over `store`);
        `scheduler` bounds what shares a pass (default: SchedulerConfig()); `tokenizer`: the store's,
        already loaded (`load_tokenizer`; default: loaded here)."""
        self.model_runner = runner = ModelRunner(store, config or EngineConfig(), progress, reader, tokenizer)
        # What callers read about the model (its store, where layers sit, its tokens) is the runner's
        self.store, self.config, self.device, self.dtype = runner.store, runner.config, runner.device, runner.dtype
        self.model, self.plan, self.source = runner.model, runner.plan, runner.source
        self.tokenizer, self.eos_ids, self.pad_id = runner.tokenizer, runner.eos_ids, runner.pad_id
        self.max_context = runner.max_context
        self.scheduler = Scheduler(scheduler or SchedulerConfig())
        self.batch = RunningBatch(self.device, self.pad_id, runner.new_cache)
        self.metrics = EngineMetrics()
        self._grammar_tokenizer = None  # llguidance's view of the tokenizer, built at the first grammar (~0.5 s)
        self._grammar_thread: ThreadPoolExecutor | None = None  # computes next masks while a pass runs

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
            if seq_params.grammar is not None:  # compiled here, on the caller's thread, not inside a pass
                seq.grammar = GrammarState(self.grammar_tokenizer(), seq_params.grammar)
            self.scheduler.check_fits(seq)
            sequences.append(seq)
        return sequences

    def grammar_tokenizer(self):
        """The llguidance tokenizer for this store's tokenizer (built once)."""
        if self._grammar_tokenizer is None:
            vocab_size = max(self.store.config.get("vocab_size") or 0, len(self.tokenizer))
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, vocab_size, self.eos_ids)
        return self._grammar_tokenizer

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
        preempted = self.scheduler.preempt(self.batch.rows)  # rows over their request's share, handed back
        self.batch.remove(preempted)
        self.metrics.preempted += len(preempted)
        newcomers = self.scheduler.admit(self.batch.rows)
        if not self.batch.rows and not newcomers:
            self._finish(seq for seq, _, _ in events)
            return events
        inputs = self.batch.inputs(newcomers)
        masks = self._start_masks()
        try:
            logits, prompt_logits = self.model_runner.forward(inputs, self.batch.cache, newcomers)
        finally:
            if masks is not None:  # ready before any row picks its token; one that failed is computed again
                masks.exception()  # (in _choose, where a failure ends that row alone), so it is not raised here
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

    def _start_masks(self):
        """Compute the constrained rows' next masks on the grammar thread while the pass runs (None: none)."""
        stale = [seq.grammar for seq in self.batch.rows if seq.grammar is not None and seq.grammar.stale]
        if not stale:
            return None
        if self._grammar_thread is None:
            self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="endor-grammar")
        return self._grammar_thread.submit(compute_masks, stale)

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
                if seq.grammar is not None:
                    constrained = apply_mask(processed, seq.grammar.disallowed)
                    # min_tokens may hide the only end the grammar allows: the grammar wins
                    if len(seq.output_ids) < params.min_tokens and torch.isneginf(constrained).all():
                        constrained = apply_mask(raw.double(), seq.grammar.disallowed)
                    processed = constrained
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
        with contextlib.closing(self._run(prompts, params)) as moves:
            for move in moves:
                if isinstance(move, GenerationResult):
                    yield move
                    continue
                seq, position, token_id, text = move
                if token_id is not None and (text or seq.finished):
                    yield TokenEvent(position, token_id, text)

    def _run(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None
             ) -> Iterator[tuple[Sequence, int, int | None, str] | GenerationResult]:
        """One request stepped to its end: (sequence, its index, token id or None, newly final text)
        for each of its step events, then the GenerationResult."""
        sequences = self.new_sequences(prompts, params)
        index = {id(seq): position for position, seq in enumerate(sequences)}
        self.add(sequences)
        tracker = RequestTracker(self, sequences)
        try:
            while not all(seq.finished for seq in sequences):
                for seq, token_id, text in self.step():
                    if id(seq) in index:
                        yield seq, index[id(seq)], token_id, text
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
            self.batch = RunningBatch(self.device, self.pad_id, self.model_runner.new_cache)

    def stream_data(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[dict[str, Any]]:
        """One request as plain data, the events `EngineLoop` sends (`results.sequence_events`):
        {"index", "token_id", "text"[, "logprob"]}, {"index", "completion"} per sequence, then
        {"completions", "stats"}."""
        with contextlib.closing(self._run(prompts, params)) as moves:
            for move in moves:
                if isinstance(move, GenerationResult):
                    yield move.to_dict()
                else:
                    yield from sequence_events(*move)

    def close(self) -> None:
        """Stop the prefetch threads and free the buffers (safe to call twice)."""
        if self._grammar_thread is not None:
            self._grammar_thread.shutdown(wait=True)
            self._grammar_thread = None
        self.model_runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _prompt_logprobs(logits: torch.Tensor, seq: Sequence) -> list:
    """[None, (log-probability of prompt token i, alternatives) for i >= 1] from [length - 1, vocab]."""
    logprobs = torch.log_softmax(logits.double().cpu(), dim=-1)
    return [None] + [top_logprobs(logprobs[position - 1], token_id, seq.params.prompt_logprobs)
                     for position, token_id in enumerate(seq.prompt_ids) if position > 0]
