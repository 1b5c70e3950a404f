"""The OpenAI-compatible protocol: request validation, and response and stream-chunk shapes.

Plain functions over pydantic models, used by the Serve deployment and testable without it.
Every problem with a request becomes an `APIError` carrying an HTTP status and an OpenAI-style
body ``{"error": {"message", "type", "param", "code"}}``; a request is fully validated (its
prompt length against the model's context included) before it joins a batch, so one bad request
never fails the others.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from endor_ray.errors import ConfigError
from endor_ray.engine.sampling import SamplingParams


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


MAX_BODY_BYTES = 4 << 20  # a larger request body is refused (413) before it is parsed
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Fields whose explicit null means "the default", as OpenAI's clients and vLLM treat them
NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "max_tokens", "seed", "stop")


class _Sampling(BaseModel):
    # Strict: `true` is not 1, "5" is not 5, 3.0 is not 3, "yes" is not a boolean (an int is a float)
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=16)  # choices per prompt; all of them share the passes


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


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
    data = {key: value for key, value in data.items() if not (value is None and key in NULL_MEANS_DEFAULT)}
    bad_text = _first_unencodable(data)
    if bad_text is not None:
        raise APIError(400, f"{bad_text} holds a lone UTF-16 surrogate (invalid Unicode)", param=bad_text)
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic names the union member that failed ("prompt.str"); a client wants the field
        path = [str(part) for part in first["loc"] if not _is_type_tag(part)]
        param = ".".join(path) or None
        raise APIError(400, f"invalid value for {param!r}: {first['msg']}", param=param) from None


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


class Frontend:
    """Turns validated requests into (prompt, SamplingParams) pairs for one served model."""

    def __init__(self, model_name: str, tokenizer, max_context: int, default_max_tokens: int = 256):
        self.model_name, self.tokenizer, self.max_context = model_name, tokenizer, max_context
        self.default_max_tokens = default_max_tokens

    def check_model(self, request: _Sampling) -> None:
        if request.model != self.model_name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def prompts(self, request: _Sampling) -> list[str]:
        if isinstance(request, ChatRequest):
            messages = [message.model_dump() for message in request.messages]
            try:
                return [self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
            except Exception as exc:  # noqa: BLE001 - templates raise assorted errors for bad roles/orders
                raise APIError(400, f"the messages do not fit the model's chat template: {exc}", param="messages") from None
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts or any(not prompt for prompt in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of non-empty strings", param="prompt")
        return prompts

    def requests(self, request: _Sampling) -> list[tuple[str, SamplingParams, int]]:
        """[(prompt, params, prompt_tokens)] for each choice, checked against the context."""
        self.check_model(request)
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        result = []
        for prompt in [prompt for prompt in self.prompts(request) for _ in range(request.n)]:
            prompt_tokens = len(self.tokenizer(prompt).input_ids)
            if prompt_tokens == 0:
                raise APIError(400, "a prompt tokenizes to no tokens; give some text", param="prompt")
            room = self.max_context - prompt_tokens
            # No max_tokens (chat): as much as the context leaves, up to the server's default.
            max_tokens = request.max_tokens or min(self.default_max_tokens, max(room, 1))
            if max_tokens > room:
                raise APIError(400, f"this model's maximum context length is {self.max_context} tokens, but "
                                    f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the prompt, "
                                    f"{max_tokens} for the completion); shorten the prompt or lower max_tokens",
                               param="max_tokens" if room > 0 else "prompt", code="context_length_exceeded")
            seed = None if request.seed is None else request.seed + len(result)  # n choices must differ
            try:
                params = SamplingParams(max_new_tokens=max_tokens, temperature=request.temperature,
                                        top_p=request.top_p, seed=seed, stop=stop)
            except ConfigError as exc:
                raise APIError(400, str(exc)) from None
            result.append((prompt, params, prompt_tokens))
        return result


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int) -> dict:
    """choices: [{"text", "token_ids", "finish_reason"}] in prompt order."""
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                    for index, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(len(c["token_ids"]) for c in choices)),
    }


def chat_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "message": {"role": "assistant", "content": c["text"]},
                     "finish_reason": c["finish_reason"]} for index, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(len(c["token_ids"]) for c in choices)),
    }


def stream_chunk(request_id: str, model: str, chat: bool, index: int, text: str | None,
                 finish_reason: str | None = None, role: bool = False) -> str:
    """One server-sent event line for a streamed completion or chat completion."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": model, "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        chunk = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                 "model": model, "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n"


def usage_chunk(request_id: str, model: str, chat: bool, usage_block: dict) -> str:
    """The last chunk of a stream: no choices, the token counts."""
    chunk = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": model, "choices": [], "usage": usage_block}
    return f"data: {json.dumps(chunk)}\n\n"


def error_chunk(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


STREAM_END = "data: [DONE]\n\n"
