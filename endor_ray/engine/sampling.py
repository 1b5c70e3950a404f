"""Sampling parameters and next-token selection, per sequence.

`process_logits` applies the controls that change the distribution, in this order (as vLLM
does): `logit_bias`, `min_tokens` (end tokens masked until enough were generated), the
repetition penalty (Hugging Face's: positive logits of seen tokens divided by it, negative ones
multiplied), presence and frequency penalties (OpenAI's, over the generated tokens). Then
`select_token` picks greedily (temperature 0) or samples after temperature, `top_k`, `min_p` and
`top_p`. Log-probabilities reported to clients are those of the model's own distribution (the
log-softmax of the raw logits), as OpenAI and vLLM report them.

Everything runs in float64 on the host: a tiny temperature (1e-40) scales logits far past
float32's range, and softmax then still gives a one-hot distribution instead of inf and NaN.
A token is drawn by inverting the cumulative distribution at one uniform number from the
sequence's generator (`draw`): torch.multinomial takes ~1.9 ms for one draw over a 49k vocabulary
on a CPU core, the cumulative sum and a binary search ~0.1 ms (a pass of 32 sampled rows spent ~60
ms in multinomial).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from endor_ray.errors import ConfigError

MAX_LOGPROBS = 20  # alternatives per token a request may ask for
MIN_TEMPERATURE = 1e-6  # a lower temperature is greedy (temperature 0)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens, when it stops, and what it reports."""

    max_new_tokens: int = 64  # tokens generated at most (0: score the prompt only, with prompt_logprobs)
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens holding this probability
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None  # per-sequence generator seed (None: nondeterministic)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence (not included), besides EOS
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    min_tokens: int = 0  # EOS and stop tokens are impossible before this many tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logits of tokens generated before
    frequency_penalty: float = 0.0  # OpenAI's: times how often each was generated
    repetition_penalty: float = 1.0  # Hugging Face's, over prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # report each generated token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    # llguidance grammar, serialized (`engine.grammar`: from a JSON schema, regex, choice, Lark): every
    # token is one the grammar allows; the sequence stops ("stop") once the grammar is complete
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise ConfigError("max_new_tokens must be a positive integer (0 only to score a prompt with its logprobs)")
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0.0 <= self.min_p <= 1.0 or self.min_tokens < 0:
            raise ConfigError("top_k and min_tokens must be >= 0, min_p in [0, 1]")
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - 1:
            raise ConfigError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ConfigError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ConfigError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ConfigError("logit_bias values must be in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ConfigError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ConfigError("grammar must be a non-empty string (see endor_ray.engine.grammar)")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE sampling is argmax in effect, and logits / a denormal overflow to inf
        return self.temperature < MIN_TEMPERATURE

    @property
    def plain(self) -> bool:
        """Greedy with nothing that changes the logits: an argmax over the batch will do."""
        return (self.greedy and not self.logit_bias and self.min_tokens == 0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and self.repetition_penalty == 1.0 and self.grammar is None)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                   end_ids: set[int]) -> torch.Tensor:
    """[vocab] float64 logits after the controls that change the distribution (see the module)."""
    logits = logits.double().clone()
    vocab = logits.numel()
    if params.logit_bias:  # one indexed add, whatever the number of entries
        ids = torch.tensor([token_id for token_id, _ in params.logit_bias], dtype=torch.long)
        biases = torch.tensor([bias for _, bias in params.logit_bias], dtype=torch.float64)
        inside = (ids >= 0) & (ids < vocab)
        logits.index_add_(0, ids[inside], biases[inside])
    if len(output_ids) < params.min_tokens:
        for token_id in end_ids | set(params.stop_token_ids):
            if 0 <= token_id < vocab:
                logits[token_id] = -torch.inf
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab].double()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).double()
    return logits


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its [vocab] (processed) logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.double() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p (the first token always stays)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p * sorted_probs.sum()
        return int(order[draw(sorted_probs.masked_fill(drop, 0.0), generator)])
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index of [n] float64 `weights` (>= 0, not all 0), each with probability weight / sum: the
    first whose cumulative sum exceeds u * sum, u uniform in [0, 1) from `generator`. A weight of 0 is
    never drawn. ValueError for weights that are no distribution (NaN, inf, negative, all 0)."""
    cumulative = torch.cumsum(weights, dim=0)
    total = float(cumulative[-1])
    if not (0.0 < total < float("inf")) or bool((weights < 0).any()):
        raise ValueError("invalid distribution (NaN, infinite, negative or all-zero probabilities)")
    u = torch.rand((), dtype=torch.float64, generator=generator) * total
    index = int(torch.searchsorted(cumulative, u, right=True))
    if index >= weights.numel():  # u * total rounded up to the total: the last token with weight
        index = int(torch.nonzero(weights)[-1])
    return index


def top_logprobs(logprobs: torch.Tensor, token_id: int, count: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token_id`, the `count` most likely tokens with theirs) from a [vocab] row."""
    alternatives = []
    if count:
        values, ids = torch.topk(logprobs, count)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token_id]), alternatives
