"""The one prompt check: tokenize once, check against the context the engine will use.

Every entry point (the engine's `new_sequences`, the Serve replica, the CLI, the batch job) calls
`check_prompt` where the prompt enters and carries the token ids it returns onwards; a list of token
ids is checked again without tokenizing, so the worker's check of ids it was sent costs nothing.
"""

from __future__ import annotations

from typing import Any

from endor_ray.errors import ConfigError


class PromptTooLong(ConfigError):
    """The prompt plus the tokens asked for exceed the model's context (the numbers travel for
    callers that word it their own way, e.g. the OpenAI API's context_length_exceeded)."""

    # Built from the message alone, like every EndorError: Ray pickles errors by their args and the
    # driver re-raises them as type(error)(message); the numbers are extras.
    def __init__(self, message: str, prompt_tokens: int = 0, max_new_tokens: int = 0, max_context: int = 0):
        super().__init__(message)
        self.prompt_tokens, self.max_new_tokens, self.max_context = prompt_tokens, max_new_tokens, max_context


def context_limit(model_config: dict[str, Any]) -> int:
    """Tokens a sequence may hold: max_position_embeddings, capped by a sliding window in use."""
    limit = int(model_config.get("max_position_embeddings") or 2**31)
    if "sliding_attention" in (model_config.get("layer_types") or []):
        return limit  # layers named sliding get a full cache and a window masked by token (models.masks)
    window = model_config.get("sliding_window")
    if isinstance(window, int) and window > 0 and model_config.get("use_sliding_window", True):
        limit = min(limit, window)  # transformers' cache would drop the columns past the window
    return limit


def check_prompt(tokenizer, prompt: str | list[int], max_new_tokens: int, max_context: int) -> list[int]:
    """The prompt's token ids (text is tokenized, ids are taken as given), or a ConfigError: an empty
    prompt, one of no tokens, ids outside the vocabulary, or too long with max_new_tokens (PromptTooLong)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ConfigError("every prompt must be a non-empty string")
        ids = tokenizer(prompt).input_ids
    else:
        ids = list(prompt)
        vocab_size = len(tokenizer)
        if any(not 0 <= token < vocab_size for token in ids):  # the embedding would fail inside a shared pass
            raise ConfigError(f"prompt token ids must be in [0, {vocab_size})")
    if not ids:
        raise ConfigError("a prompt tokenizes to no tokens; give some text")
    if len(ids) + max_new_tokens > max_context:
        raise PromptTooLong(f"prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                            f"context of {max_context} tokens; shorten the prompt or lower max_new_tokens",
                            len(ids), max_new_tokens, max_context)
    return ids
