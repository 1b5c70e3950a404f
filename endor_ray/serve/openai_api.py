"""The OpenAI-compatible protocol: request validation, and response and stream-chunk shapes.

Plain functions over pydantic models, used by the Serve deployment and testable without it.
Every problem with a request becomes an `APIError` carrying an HTTP status and an OpenAI-style
body ``{"error": {"message", "type", "param", "code"}}``; a request is fully validated (types
strictly, ranges, its prompt length against the model's context) before it joins a batch, so one
bad request never fails the others. No field is silently dropped: a field this server does not
honour is a 400 naming it, except harmless metadata (`METADATA_FIELDS`). The fields, what each
does here, and what vLLM's server does with it are listed in docs/API.md.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from endor_ray.engine.sampling import MAX_LOGPROBS, SamplingParams
from endor_ray.errors import ConfigError

MAX_BODY_BYTES = 4 << 20  # a larger request body is refused (413) before it is parsed
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Explicit null means "the default" for these, as OpenAI's clients and vLLM treat them
NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "max_tokens", "max_completion_tokens", "seed", "stop",
                      "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "echo",
                      "suffix", "best_of", "stream_options", "response_format", "tools", "tool_choice", "user",
                      "top_k", "min_p", "min_tokens", "stop_token_ids", "ignore_eos", "repetition_penalty",
                      "metadata", "store", "service_tier", "parallel_tool_calls")
METADATA_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")  # accepted, no effect


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = ("invalid_request_error" if self.status < 500 and self.status not in (401, 429)
                else "authentication_error" if self.status == 401
                else "rate_limit_error" if self.status == 429 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    # Strict: `true` is not 1, "5" is not 5, 3.0 is not 3, "yes" is not a boolean (an int is a float)
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # optional: one model is served
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite = Field(1.0, ge=0.0, le=2.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off (vLLM uses -1)
    min_p: Finite = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = Field(None)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)  # choices per prompt; all of them share the passes
    best_of: int | None = Field(None, ge=1, le=16)
    presence_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: Finite = Field(1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, Finite] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo scores a prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def parse(raw: bytes, kind: type[_Sampling]) -> _Sampling:
    """The request model from a raw body, or APIError(400/413) naming the problem."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body has {len(raw)} bytes; this server takes at most {MAX_BODY_BYTES}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    data = {key: value for key, value in data.items()
            if not (value is None and key in NULL_MEANS_DEFAULT) and key not in METADATA_FIELDS}
    bad_text = _first_unencodable(data)
    if bad_text is not None:
        raise APIError(400, f"{bad_text} holds a lone UTF-16 surrogate (invalid Unicode)", param=bad_text)
    if kind is ChatRequest:
        _check_parts(data.get("messages"))
    try:
        request = kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic names the union member that failed ("prompt.str"); a client wants the field
        path = [str(part) for part in first["loc"] if not _is_type_tag(part)]
        param = ".".join(path) or None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"{param!r} is not supported by this server", param=param,
                           code="unsupported_parameter") from None
        raise APIError(400, f"invalid value for {param!r}: {first['msg']}", param=param) from None
    _refuse_unsupported(request)
    return request


def parse_plain(raw: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A small JSON object body with only `allowed` keys (/tokenize, /detokenize)."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body has {len(raw)} bytes; this server takes at most {MAX_BODY_BYTES}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise APIError(400, f"{extra[0]!r} is not supported here", param=extra[0], code="unsupported_parameter")
    bad_text = _first_unencodable(data)
    if bad_text is not None:
        raise APIError(400, f"{bad_text} holds a lone UTF-16 surrogate (invalid Unicode)", param=bad_text)
    return data


def _check_parts(messages: Any) -> None:
    """A clear 400 for content parts other than text (images, audio, files)."""
    if not isinstance(messages, list):
        return
    for index, message in enumerate(messages):
        parts = message.get("content") if isinstance(message, dict) else None
        if isinstance(parts, list):
            for part_index, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise APIError(400, f"content parts of type {kind!r} are not supported (this model reads text)",
                                   param=f"messages.{index}.content.{part_index}.type")


def _refuse_unsupported(request: _Sampling) -> None:
    """Fields that parse but ask for something this server does not do: a 400 naming them."""
    fmt = request.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise APIError(400, f"response_format {fmt.get('type')!r} (structured output) is not supported by this "
                            "server; ask for text", param="response_format", code="unsupported_parameter")
    if request.tools:
        raise APIError(400, "tools (function calling) are not supported by this server", param="tools",
                       code="unsupported_parameter")
    if request.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice needs tools, which this server does not support", param="tool_choice",
                       code="unsupported_parameter")
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(400, "best_of other than n is not supported (every choice generated is returned)",
                       param="best_of", code="unsupported_parameter")
    if isinstance(request, CompletionRequest) and request.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this model", param="suffix",
                       code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")


def _first_unencodable(value, path: str = "") -> str | None:
    """The path of the first string that is not valid Unicode (a lone surrogate from "\\ud800")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_unencodable(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part)


class Choice:
    """One sequence to generate: its prompt (text or token ids), parameters and prompt length."""

    def __init__(self, prompt: str | list[int], params: SamplingParams, prompt_tokens: int):
        self.prompt, self.params, self.prompt_tokens = prompt, params, prompt_tokens


class Frontend:
    """Turns validated requests into choices for one served model, and completions into responses."""

    def __init__(self, model_name: str, tokenizer, max_context: int, default_max_tokens: int = 256):
        self.model_name, self.tokenizer, self.max_context = model_name, tokenizer, max_context
        self.default_max_tokens = default_max_tokens
        self.vocab_size = len(tokenizer)

    def check_model(self, request: _Sampling) -> None:
        if request.model is not None and request.model != self.model_name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def prompts(self, request: _Sampling) -> list[str | list[int]]:
        if isinstance(request, ChatRequest):
            messages = [{"role": m.role, "content": _text(m.content)} for m in request.messages]
            try:
                return [self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
            except Exception as exc:  # noqa: BLE001 - templates raise assorted errors for bad roles/orders
                raise APIError(400, f"the messages do not fit the model's chat template: {exc}", param="messages") from None
        prompt = request.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string, token list, or list of them", param="prompt")
        for ids in prompts:
            if not isinstance(ids, str) and any(not 0 <= token < self.vocab_size for token in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        return prompts

    def requests(self, request: _Sampling) -> list[Choice]:
        """One Choice per prompt and per n, checked against the context."""
        self.check_model(request)
        chat = isinstance(request, ChatRequest)
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        logprobs = (request.top_logprobs or 0) if chat and request.logprobs else None if chat else request.logprobs
        echo = not chat and request.echo
        logit_bias = tuple((_token_id(key), bias) for key, bias in (request.logit_bias or {}).items())
        asked = request.max_completion_tokens if chat else request.max_tokens
        if chat and request.max_completion_tokens is not None and request.max_tokens is not None:
            asked = min(request.max_tokens, request.max_completion_tokens)
        elif chat and request.max_tokens is not None:
            asked = request.max_tokens
        if asked == 0 and not echo:
            raise APIError(400, "max_tokens 0 only scores a prompt: it needs echo", param="max_tokens")
        choices = []
        for prompt in [prompt for prompt in self.prompts(request) for _ in range(request.n)]:
            prompt_tokens = len(prompt) if not isinstance(prompt, str) else len(self.tokenizer(prompt).input_ids)
            if prompt_tokens == 0:
                raise APIError(400, "a prompt tokenizes to no tokens; give some text", param="prompt")
            room = self.max_context - prompt_tokens
            # No max_tokens (chat): as much as the context leaves, up to the server's default.
            max_tokens = asked if asked is not None else min(self.default_max_tokens, max(room, 1))
            if max_tokens > room:
                raise APIError(400, f"this model's maximum context length is {self.max_context} tokens, but "
                                    f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the prompt, "
                                    f"{max_tokens} for the completion); shorten the prompt or lower max_tokens",
                               param="max_tokens" if room > 0 else "prompt", code="context_length_exceeded")
            seed = None if request.seed is None else (request.seed + len(choices)) % 2**64  # n choices differ
            try:
                params = SamplingParams(
                    max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                    top_k=max(request.top_k, 0), min_p=request.min_p, seed=seed, stop=stop,
                    stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos,
                    min_tokens=request.min_tokens, presence_penalty=request.presence_penalty,
                    frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
                    logit_bias=logit_bias, logprobs=logprobs,
                    prompt_logprobs=(request.logprobs or 0) if echo and request.logprobs is not None else
                    0 if echo and max_tokens == 0 else None)
            except ConfigError as exc:
                raise APIError(400, str(exc)) from None
            choices.append(Choice(prompt, params, prompt_tokens))
        return choices

    # -- responses -----------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, completion: dict, echo: bool, count: int | None) -> dict | None:
        """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
        if count is None:
            return None
        ids, entries = list(completion["token_ids"]), list(completion["logprobs"] or [])
        if echo:
            ids = completion["prompt_token_ids"] + ids
            entries = list(completion["prompt_logprobs"] or [None] * len(completion["prompt_token_ids"])) + entries
        tokens = [self.token_text(token_id) for token_id in ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [entry[0] if entry else None for entry in entries],
            "top_logprobs": [{self.token_text(alt): lp for alt, lp in entry[1]} if entry else None for entry in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(self, completion: dict) -> dict | None:
        if completion["logprobs"] is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(token_id, entry[0]), "top_logprobs": [item(alt, lp) for alt, lp in entry[1]]}
                            for token_id, entry in zip(completion["token_ids"], completion["logprobs"])]}

    def prompt_text(self, completion: dict) -> str:
        return self.tokenizer.decode(completion["prompt_token_ids"])


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _token_id(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise APIError(400, f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int) -> dict:
    """choices: [{"text", "logprobs", "finish_reason", "tokens"}] in choice order."""
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "text": c["text"], "logprobs": c.get("logprobs"),
                     "finish_reason": c["finish_reason"]} for index, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c["tokens"] for c in choices)),
    }


def chat_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                    for index, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c["tokens"] for c in choices)),
    }


def stream_chunk(request_id: str, model: str, chat: bool, index: int, text: str | None,
                 finish_reason: str | None = None, role: bool = False, logprobs: dict | None = None,
                 usage_block: dict | None = None) -> str:
    """One server-sent event line for a streamed completion or chat completion (one choice)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        kind = "text_completion"
    chunk = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage_block is not None:  # stream_options.continuous_usage_stats
        chunk["usage"] = usage_block
    return f"data: {json.dumps(chunk)}\n\n"


def usage_chunk(request_id: str, model: str, chat: bool, usage_block: dict) -> str:
    """The last chunk of a stream when stream_options.include_usage asks for it: no choices, the counts."""
    chunk = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": model, "choices": [], "usage": usage_block}
    return f"data: {json.dumps(chunk)}\n\n"


def error_chunk(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


STREAM_END = "data: [DONE]\n\n"
