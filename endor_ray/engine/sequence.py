"""One prompt being completed: its tokens, its text so far, and when it stops."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from endor_ray.engine.sampling import SamplingParams

STOP_MARGIN = 8  # characters before the new text that a new token's decoding may have changed

if TYPE_CHECKING:
    from endor_ray.engine.grammar import GrammarState


@dataclass
class Sequence:
    """A prompt and its completion; the engine appends tokens, this decides text and stopping."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None  # its grammar's matcher and next mask (params.grammar), freed at the end
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # completion text, cut before a stop string
    # "stop" (EOS or stop string) | "length" | "cancelled" (its caller left) | "error" (see `error`)
    finish_reason: str | None = None
    error: str | None = None  # what went wrong with this sequence alone (finish_reason "error")
    cancelled: bool = False  # set from any thread; the engine lets it go at the next pass
    request: int = 0  # the number the scheduler gave the request it came in (round-robin admission)
    # per generated token (if asked): (its log-probability, [(alternative id, log-probability)])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # per prompt token (if asked): the same, None for the first token (nothing predicts it)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    added_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    _emitted: int = 0  # characters of `text` already handed to the streaming callback

    @property
    def prefill_ids(self) -> list[int]:
        """What a pass that (re)admits it prefills: the prompt, and the tokens generated before it
        was preempted (the next token is predicted after them)."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: str | None = None) -> str:
        """End the sequence for a reason of its own (cancelled, error); the text so far stands."""
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self.grammar = None
        return self._flush()

    def append(self, token_id: int, tokenizer, eos_ids: set[int],
               logprob: tuple[float, list[tuple[int, float]]] | None = None) -> str:
        """Record a new token; return the text that became final with it (for streaming)."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        if (token_id in eos_ids and not self.params.ignore_eos) or token_id in self.params.stop_token_ids:
            self.finish_reason, self.finished_at, self.grammar = "stop", now, None
            return self._flush()
        if self.grammar is not None and not self.grammar.advance(token_id):  # the mask allowed it: a bug
            return self.finish("error", f"the grammar refused token {token_id}: {self.grammar.error}")
        self.output_ids.append(token_id)
        if logprob is not None:
            self.logprobs = (self.logprobs or []) + [logprob]
        checked = len(self.text)
        self.text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        for stop in self.params.stop:
            # Only the new text (and the stop's length before it, which a match may straddle): the
            # text before was searched already. STOP_MARGIN: decoding may rewrite the last characters
            # (an incomplete UTF-8 character, spaces cleaned up before punctuation).
            cut = self.text.find(stop, max(0, checked - len(stop) - STOP_MARGIN))
            if cut != -1:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
        if self.finish_reason is None and self.grammar is not None and self.grammar.finished:
            self.finish_reason = "stop"  # the grammar is complete: only the end of the sequence may follow
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finished:
            self.finished_at, self.grammar = now, None
            return self._flush()
        # Hold back what may still turn into a stop string, and an incomplete UTF-8 character.
        safe = len(self.text) - self._held_back()
        delta = self.text[self._emitted:safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return delta

    def _held_back(self) -> int:
        held = 1 if self.text.endswith("\ufffd") else 0
        for stop in self.params.stop:
            for length in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:length]):
                    held = max(held, length)
                    break
        return held

    def _flush(self) -> str:
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta
