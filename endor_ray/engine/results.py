"""What generation hands back: completions, per-request stats, and the engine's running metrics."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from endor_ray.engine.sequence import Sequence
from endor_ray.engine.source_stats import SourceStats


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None = None  # set when this sequence alone failed (finish_reason "error")
    prompt_token_ids: list[int] | None = None
    # [log-probability, [[alternative id, log-probability]...]] per generated token (if asked)
    logprobs: list | None = None
    prompt_logprobs: list | None = None  # the same per prompt token, None for the first (if asked)

    @classmethod
    def of(cls, seq: Sequence) -> Completion:
        return cls(seq.prompt, seq.text, list(seq.output_ids), seq.finish_reason, seq.error, list(seq.prompt_ids),
                   seq.logprobs, seq.prompt_logprobs)


@dataclass
class GenerationStats:
    """Throughput and where the time went, for one request (one generate() call)."""

    sequences: int
    passes: int  # passes over the weights while the request was running
    new_tokens: int
    wall_s: float
    prefill_s: float  # until the request's first token: its prompts through every layer
    source: SourceStats = field(repr=False)
    mean_sequences_per_pass: float = 0.0  # live sequences of all requests per pass, on average

    def to_dict(self) -> dict[str, Any]:
        source = self.source
        return {
            "sequences": self.sequences,
            "passes": self.passes,
            "new_tokens": self.new_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.new_tokens / self.wall_s if self.wall_s else 0.0,
            "s_per_pass": self.wall_s / self.passes if self.passes else 0.0,
            "prefill_s": self.prefill_s,
            "ttft_s": self.prefill_s,  # time to the request's first token
            # time per output token after the first, per sequence
            "tpot_s": ((self.wall_s - self.prefill_s) / (self.new_tokens / self.sequences - 1)
                       if self.sequences and self.new_tokens > self.sequences else None),
            # decode passes only: one token per sequence per pass over the weights
            "decode_s_per_pass": (self.wall_s - self.prefill_s) / (self.passes - 1) if self.passes > 1 else None,
            "mean_sequences_per_pass": self.mean_sequences_per_pass,
            "bytes_to_device_per_pass": source.bytes_to_device / self.passes if self.passes else 0,
            "link_GBps": source.bytes_to_device / source.transfer_s / 1e9 if source.transfer_s else None,
            "time_s": {"transfer": source.transfer_s, "read": source.read_s,
                       "decompress": source.decompress_s, "compute_streamed": source.compute_s,
                       "stall": source.stall_s},
            "tier_hits": dict(source.hits),
            **({"experts": expert_stats(source, self.new_tokens)} if source.expert_hits + source.expert_misses else {}),
        }


def expert_stats(source: SourceStats, new_tokens: int) -> dict[str, Any]:
    """An MoE model's expert traffic: the expert cache's hit rate (a picked expert found in the cache
    or read ahead by the next-layer prefetch), misses (read on demand), the compressed bytes read
    (misses and prefetches) per generated token (prefill's included: what the request cost), and the
    prefetch's guesses: experts read ahead and the share of them the layer's router then picked."""
    picked = source.expert_hits + source.expert_misses
    return {"hit_rate": source.expert_hits / picked if picked else None, "hits": source.expert_hits,
            "misses": source.expert_misses, "bytes": source.expert_bytes,
            "misses_per_token": source.expert_misses / new_tokens if new_tokens else None,
            "bytes_per_token": source.expert_bytes / new_tokens if new_tokens else None,
            "prefetched": source.expert_prefetched, "prefetch_useful": source.expert_prefetch_useful,
            "prefetch_hit_rate": (source.expert_prefetch_useful / source.expert_prefetched
                                  if source.expert_prefetched else None)}


class TokenEvent(NamedTuple):
    index: int  # which prompt of the request
    token_id: int
    text: str  # text that became final with this token (may be empty)


class GenerationResult(NamedTuple):
    completions: list[Completion]
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        """Plain data: {"completions": [{prompt, text, token_ids, finish_reason, error}], "stats": {...}}."""
        return {"completions": [vars(c).copy() for c in self.completions], "stats": self.stats.to_dict()}


def sequence_events(seq: Sequence, index: int, token_id: int | None, text: str) -> list[dict[str, Any]]:
    """What one step's (sequence, token id or None, newly final text) tells the sequence's request,
    as plain data (what crosses Ray and HTTP): a token event when text became final, the sequence
    finished or log-probabilities were asked for, then a completion event if it finished.

        {"index", "token_id", "text"[, "logprob"]}    `logprob`: (log-probability, [(alternative, log-probability)])
        {"index", "completion": {...}}                Completion's fields
    """
    events = []
    wants_logprobs = seq.params.logprobs is not None
    if token_id is not None and (text or seq.finished or wants_logprobs):
        event: dict[str, Any] = {"index": index, "token_id": token_id, "text": text}
        if wants_logprobs and seq.output_ids and seq.output_ids[-1] == token_id and seq.logprobs:
            event["logprob"] = seq.logprobs[-1]
        events.append(event)
    if seq.finished:
        events.append({"index": index, "completion": vars(Completion.of(seq))})
    return events


class EngineMetrics:
    """Running figures of the engine (what /health shows): recent passes and finished sequences."""

    def __init__(self, window: int = 1000):
        self.passes = 0
        self.sequences_served = 0  # sum over passes of live sequences
        self.recent_rows: deque[int] = deque(maxlen=window)  # live sequences of recent passes
        self.ttft_s: deque[float] = deque(maxlen=window)  # time to first token of finished sequences
        self.tpot_s: deque[float] = deque(maxlen=window)  # time per output token after the first
        self.finished: dict[str, int] = {}
        self.preempted = 0  # rows handed back to the queue for a waiting request (scheduler.preempt)

    def record_pass(self, rows: int) -> None:
        self.passes += 1
        self.sequences_served += rows
        self.recent_rows.append(rows)

    def record_finished(self, seq: Sequence) -> None:
        self.finished[seq.finish_reason] = self.finished.get(seq.finish_reason, 0) + 1
        if seq.first_token_at is not None:
            self.ttft_s.append(seq.first_token_at - seq.added_at)
            if len(seq.output_ids) > 1 and seq.finished_at is not None:
                self.tpot_s.append((seq.finished_at - seq.first_token_at) / (len(seq.output_ids) - 1))

    def to_dict(self, waiting: int, running: int) -> dict[str, Any]:
        def mean(values) -> float | None:
            return statistics.fmean(values) if values else None

        return {"passes": self.passes, "running": running, "waiting": waiting,
                "mean_sequences_per_pass": self.sequences_served / self.passes if self.passes else 0.0,
                "recent_sequences_per_pass": list(self.recent_rows)[-20:],
                "mean_ttft_s": mean(self.ttft_s), "mean_tpot_s": mean(self.tpot_s), "finished": dict(self.finished),
                "preempted": self.preempted}


class RequestTracker:
    """Per-request stats while other requests share the passes: passes counted while the
    request runs, layer-source counters as the difference of two snapshots."""

    def __init__(self, engine, sequences: list[Sequence]):
        self.engine, self.sequences = engine, sequences
        self.started = time.perf_counter()
        self.source_start = engine.source.snapshot()
        self.passes_start, self.served_start = engine.metrics.passes, engine.metrics.sequences_served
        self.first_token_s: float | None = None

    def stepped(self) -> None:
        if self.first_token_s is None and any(seq.first_token_at is not None for seq in self.sequences):
            self.first_token_s = time.perf_counter() - self.started

    def result(self) -> GenerationResult:
        engine = self.engine
        wall = time.perf_counter() - self.started
        passes = engine.metrics.passes - self.passes_start
        served = engine.metrics.sequences_served - self.served_start
        source = engine.source.snapshot() - self.source_start
        source.hits["device"] = passes * len(engine.plan.device)  # resident layers run unhooked
        completions = [Completion.of(seq) for seq in self.sequences]
        return GenerationResult(completions, GenerationStats(
            len(self.sequences), passes, sum(len(c.token_ids) for c in completions), wall,
            self.first_token_s or 0.0, source, served / passes if passes else 0.0))
