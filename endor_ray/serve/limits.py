"""What one request may cost: caps on the fields whose work grows with their size, checked where
the request enters (a 400 naming the cap), so no single request can stall its neighbours' passes.

| field | cap | why |
|---|---|---|
| `stop` | `MAX_STOP_STRINGS` strings of at most `MAX_STOP_CHARS` characters | each is matched at every new token |
| `logit_bias` | `MAX_LOGIT_BIAS` entries, keys decimal token ids in the vocabulary | added to the logits at every token |
| `n` x prompts | `MAX_SEQUENCES_PER_REQUEST` sequences | they take the batch's rows and the queue |
| request head | `HEADER_TIMEOUT_S` s after connect (`--header-timeout-s`), then 408 | a trickled head holds a connection |

docs/API.md lists the same numbers.
"""

from __future__ import annotations

import re
from typing import Any

from endor_ray.serve.protocol import APIError, CompletionRequest, _Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_SEQUENCES_PER_REQUEST = 128
HEADER_TIMEOUT_S = 10.0  # default: a request's headers must arrive this soon after connect (`connection_guard`)
TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")  # what a token id key looks like: no sign, no "_", no leading zero


def check_costs(request: _Sampling) -> None:
    """APIError(400) naming the cap a request exceeds (the vocabulary is checked by `logit_bias_entries`)."""
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stop)} strings; this server takes at most {MAX_STOP_STRINGS}",
                       param="stop", code="too_many_stop_strings")
    longest = max((len(text) for text in stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise APIError(400, f"a stop string has {longest} characters; this server takes at most {MAX_STOP_CHARS}",
                       param="stop", code="stop_string_too_long")
    if request.logit_bias and len(request.logit_bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias has {len(request.logit_bias)} entries; this server takes at most "
                            f"{MAX_LOGIT_BIAS}", param="logit_bias", code="too_many_logit_bias_entries")
    sequences = request.n * prompt_count(request)
    if sequences > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"this request asks for {sequences} sequences (n={request.n} x {sequences // request.n} "
                            f"prompts); this server takes at most {MAX_SEQUENCES_PER_REQUEST} per request: send "
                            "fewer prompts or a lower n", param="n", code="too_many_sequences")


def prompt_count(request: _Sampling) -> int:
    """How many prompts a request holds (a chat request and a single prompt: one)."""
    if not isinstance(request, CompletionRequest):
        return 1
    prompt = request.prompt
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def logit_bias_entries(logit_bias: dict[str, Any] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs, or APIError(400) for a key that is not a token id of this vocabulary
    ("-1", "1_0" and " 7" are not: Python's int() would take the last two)."""
    entries = []
    for key, bias in (logit_bias or {}).items():
        if not TOKEN_ID.fullmatch(key) or int(key) >= vocab_size:
            shown = key if len(key) <= 20 else key[:20] + "..."
            raise APIError(400, f"logit_bias keys are token ids in [0, {vocab_size}) written in decimal digits, got "
                                f"{shown!r}", param="logit_bias", code="invalid_logit_bias")
        entries.append((int(key), bias))
    return tuple(entries)
