"""Prometheus metrics of the served model, on `/metrics` of the serving port.

Request-level series are counted by the HTTP front as requests finish (every request, streamed
or not, by route and status, 5xx included; token and latency figures when a generation's result
arrives, also at the end of a stream); engine-level series
(queue, running sequences, sequences per pass, bytes moved per pass, tier hits, an MoE model's
expert cache hit rate, expert reads per token and the prefetch's guess hit rate) are read from
the GPU workers when `/metrics` is scraped. Each app has its own registry (several apps or tests
in one process do not collide).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    def __init__(self, model: str):
        self.model = model
        self.registry = registry = CollectorRegistry()
        labels = ("model",)
        self.requests = Counter("endor_requests", "HTTP requests by route and status", ("model", "route", "status"),
                                registry=registry)
        self.prompt_tokens = Counter("endor_prompt_tokens", "prompt tokens of answered requests", labels,
                                     registry=registry)
        self.generation_tokens = Counter("endor_generation_tokens", "tokens generated", labels, registry=registry)
        self.ttft = Histogram("endor_time_to_first_token_seconds", "time to a request's first token", labels,
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("endor_time_per_output_token_seconds", "time per output token after the first",
                              labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.waiting = Gauge("endor_queue_sequences", "sequences waiting for a pass", labels, registry=registry)
        self.running = Gauge("endor_running_sequences", "sequences in the running batch", labels, registry=registry)
        # Named as in /health, a request's stats and the job summary: passes, mean_sequences_per_pass, ...
        self.mean_sequences_per_pass = Gauge("endor_mean_sequences_per_pass",
                                             "mean live sequences per pass over the weights", labels, registry=registry)
        self.passes = Gauge("endor_passes", "passes over the weights so far", labels, registry=registry)
        self.preempted = Gauge("endor_preempted_sequences", "running sequences handed back to the queue so far, "
                               "for a waiting request (recomputed when they rejoin)", labels, registry=registry)
        self.bytes_to_device_per_pass = Gauge("endor_bytes_to_device_per_pass",
                                              "bytes moved to the device per pass (last request)", labels,
                                              registry=registry)
        self.tier_hits = Gauge("endor_tier_hits", "layer fetches by tier (last request)", ("model", "tier"),
                               registry=registry)
        # MoE models: the request's "experts" stats (engine.results.expert_stats)
        self.expert_hit_rate = Gauge("endor_expert_cache_hit_rate", "picked experts found in the expert cache "
                                     "(last request)", labels, registry=registry)
        self.expert_misses_per_token = Gauge("endor_expert_misses_per_token", "experts read from the store per "
                                             "generated token (last request)", labels, registry=registry)
        self.expert_prefetch_hit_rate = Gauge("endor_expert_prefetch_hit_rate", "experts read ahead on the next "
                                              "layer's guessed picks that the layer then picked (last request)",
                                              labels, registry=registry)
        self.expert_bytes_per_token = Gauge("endor_expert_bytes_per_token", "compressed expert bytes read per "
                                            "generated token (last request)", labels, registry=registry)

    def count(self, route: str, status: int) -> None:
        """One HTTP request answered (every route, streamed or not, any status)."""
        self.requests.labels(self.model, route, str(status)).inc()

    def generated(self, stats: dict[str, Any], prompt_tokens: int) -> None:
        """A generation request's figures (whole or streamed) when its result arrives."""
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(stats.get("new_tokens", 0))
        if stats.get("ttft_s") is not None:
            self.ttft.labels(self.model).observe(stats["ttft_s"])
        if stats.get("tpot_s") is not None:
            self.tpot.labels(self.model).observe(stats["tpot_s"])
        if stats.get("bytes_to_device_per_pass") is not None:
            self.bytes_to_device_per_pass.labels(self.model).set(stats["bytes_to_device_per_pass"])
        for tier, hits in (stats.get("tier_hits") or {}).items():
            self.tier_hits.labels(self.model, tier).set(hits)
        experts = stats.get("experts") or {}
        for gauge, key in ((self.expert_hit_rate, "hit_rate"), (self.expert_misses_per_token, "misses_per_token"),
                           (self.expert_bytes_per_token, "bytes_per_token"),
                           (self.expert_prefetch_hit_rate, "prefetch_hit_rate")):
            if experts.get(key) is not None:
                gauge.labels(self.model).set(experts[key])

    def render(self, batching: dict[str, Any] | None) -> bytes:
        if batching is not None:
            self.waiting.labels(self.model).set(batching["waiting"])
            self.running.labels(self.model).set(batching["running"])
            self.mean_sequences_per_pass.labels(self.model).set(batching["mean_sequences_per_pass"])
            self.passes.labels(self.model).set(batching["passes"])
            self.preempted.labels(self.model).set(batching.get("preempted", 0))
        return generate_latest(self.registry)
