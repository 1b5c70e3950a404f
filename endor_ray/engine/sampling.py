"""Sampling parameters and next-token selection (greedy, temperature, top-p), per sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from endor_ray.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops."""

    max_new_tokens: int = 64  # tokens generated at most
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens holding this probability
    seed: int | None = None  # per-sequence generator seed (None: nondeterministic)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (not included in the text)
    ignore_eos: bool = False  # keep going past the end-of-sequence token

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - 1:
            raise ConfigError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise ConfigError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its [vocab] logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    # float64: a tiny temperature (1e-40) scales logits far past float32's range; softmax then still
    # gives a one-hot distribution instead of inf and NaN
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p (the first token always stays)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
