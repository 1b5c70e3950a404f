"""Grammar-constrained decoding: which tokens a sequence may pick next (llguidance).

A grammar travels as llguidance's serialized form (`SamplingParams.grammar`): the JSON string
`llguidance.grammar_from(...)` returns, built here from a JSON schema, "any JSON object", a regex,
a list of choices or a Lark grammar. The API checks it once, where the request enters
(`validate_grammar`: a ConfigError naming what is unsupported). The engine builds one
`LLTokenizer` from the store's tokenizer (`grammar_tokenizer`) and gives each constrained
sequence a `GrammarState`: its matcher and the mask of the tokens allowed next. The first mask is
computed with the matcher (on the submitting thread); each later one is computed on the host while
the next pass over the weights runs (`compute_masks`, on the engine's grammar thread), so it is
ready when the logits arrive.

llguidance was chosen by measurement (benchmarks/grammar_cost.py, results/grammar-cost.json): a
schema compiles in about 1 ms at 49k to 200k tokens, where xgrammar takes 5-85 ms and outlines-core
0.3-6.5 s (every request may bring a new schema); its masks take 12-25 us (xgrammar's 2-4 us), both
far below a pass over the weights; and it has no runtime dependencies.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch

from endor_ray.errors import ConfigError

# Compact JSON, one space after ',' and ':' as json.dumps writes it: a small model offered free
# whitespace can loop on newlines until max_tokens, and no client needs it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict, strict: bool) -> str:
    """The grammar of JSON values valid against `schema`. `strict` (OpenAI's): objects that do
    not say otherwise take no properties beyond those listed, as OpenAI's strict mode requires."""
    import llguidance

    if not isinstance(schema, dict):
        raise ConfigError(f"a JSON schema must be an object, got {type(schema).__name__}")
    if strict:
        schema = _closed_objects(copy.deepcopy(schema))
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid JSON schema: {exc}") from None
    validate_grammar(grammar)
    return grammar


def json_object_grammar() -> str:
    """The grammar of any JSON object (OpenAI's response_format json_object)."""
    return json_schema_grammar({"type": "object"}, strict=False)


def regex_grammar(pattern: str) -> str:
    """The grammar of text matching the regular expression `pattern` (Rust regex syntax)."""
    import llguidance

    return _checked(llguidance.grammar_from("regex", _text(pattern, "regex")))


def choice_grammar(choices: list[str]) -> str:
    """The grammar of exactly one of `choices`."""
    import llguidance

    if not isinstance(choices, list) or not choices or not all(isinstance(item, str) for item in choices):
        raise ConfigError("choice must be a non-empty list of strings")
    return _checked(llguidance.grammar_from("choice", json.dumps(choices)))


def lark_grammar(text: str) -> str:
    """The grammar a Lark (or GBNF) text defines (llguidance's syntax)."""
    import llguidance

    return _checked(llguidance.grammar_from("grammar", _text(text, "grammar")))


def validate_grammar(grammar: str) -> None:
    """Raise ConfigError saying what is wrong or unsupported in a serialized grammar."""
    import llguidance

    if not isinstance(grammar, str) or not grammar:
        raise ConfigError("a grammar must be a non-empty string (llguidance's serialized form)")
    message = llguidance.LLMatcher.validate_grammar(grammar)
    if message:
        raise ConfigError(f"unsupported grammar or schema: {message.strip()}")


def grammar_tokenizer(hf_tokenizer, vocab_size: int, eos_ids: set[int]):
    """The llguidance tokenizer for a store's HF tokenizer (token bytes from its tokenizer.json);
    `vocab_size` is the logits' width (tokens past the tokenizer's own are never allowed)."""
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
    except ValueError as exc:  # a slow (Python-only) tokenizer has no tokenizer.json to read bytes from
        raise ConfigError(f"grammars need a fast tokenizer in the store ({exc})") from None


class GrammarState:
    """One sequence's matcher and the mask of the tokens it may pick next."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self.vocab_size = tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ConfigError(f"unsupported grammar or schema: {self.matcher.get_error()}")
        self._bits = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)  # [words] int32, LSB first
        self._disallowed: torch.Tensor | None = None
        self.stale = False  # a token was consumed since the mask was computed
        self.compute_mask()

    def compute_mask(self) -> None:
        """Compute the mask for the next token now (called right after a token was consumed)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size]
        self._disallowed = torch.from_numpy(bits == 0)  # [vocab] bool
        self.stale = False

    @property
    def disallowed(self) -> torch.Tensor:
        """[vocab] bool: True for the tokens the grammar forbids next."""
        if self.stale:  # not computed during the pass (a caller stepping without compute_masks)
            self.compute_mask()
        return self._disallowed

    def advance(self, token_id: int) -> bool:
        """Consume the sampled token (the next mask is computed later); False if the grammar refused it."""
        if not self.matcher.consume_token(token_id):
            return False
        self.stale = not self.finished
        return True

    @property
    def finished(self) -> bool:
        """Nothing but the end of the sequence may follow."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def compute_masks(states: list[GrammarState]) -> None:
    """The next masks of these sequences (run beside the pass, whose torch ops release the GIL)."""
    for state in states:
        if state.stale:
            state.compute_mask()


def apply_mask(logits: torch.Tensor, disallowed: torch.Tensor) -> torch.Tensor:
    """[vocab] logits (a new tensor) with the `disallowed` tokens at -inf; one masked_fill, as the mask
    spans the logits (the grammar tokenizer is built at the logits' width)."""
    if disallowed.numel() != logits.numel():
        raise ValueError(f"a grammar mask of {disallowed.numel()} tokens for {logits.numel()} logits")
    return logits.masked_fill(disallowed, -torch.inf)


def _closed_objects(schema: Any) -> Any:
    """`schema` with additionalProperties false on every object schema that does not set it."""
    if not isinstance(schema, dict):
        return schema
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        for value in (schema.get(key) or {}).values():
            _closed_objects(value)
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
        _closed_objects(schema.get(key))
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
        if isinstance(schema.get(key), list):
            for value in schema[key]:
                _closed_objects(value)
    return schema


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string")
    return value


def _checked(grammar: str) -> str:
    validate_grammar(grammar)
    return grammar
