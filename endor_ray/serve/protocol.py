"""The OpenAI request protocol: request models, strict parsing, and the errors a request can get.

Every problem with a request becomes an `APIError` carrying an HTTP status and an OpenAI-style
body ``{"error": {"message", "type", "param", "code"}}``. Parsing is strict (no silent coercion)
and no field is silently dropped: a field this server does not honour is a 400 naming it, except
harmless metadata (`METADATA_FIELDS`). docs/API.md lists every field and what happens to it.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from endor_ray.engine.sampling import MAX_LOGPROBS


MAX_BODY_BYTES = 4 << 20  # a larger request body is refused (413) before it is parsed
# What can make a lone surrogate: a JSON escape "\ud800".."\udfff", the UTF-8 bytes of one (json.loads
# decodes bytes with "surrogatepass"), or a UTF-16/32 body (NUL bytes); a body with none of them is not
# walked (a 1.5 MB body of 100,000 strings took 53 ms to walk). Each alternative is looked for on its
# own, the regex only where its literal start occurs: one regex of the three scanned 1.3 MB in 11 ms.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
SURROGATE_UTF8 = re.compile(rb"\xed[\xa0-\xbf]")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Explicit null means "the default" for these, as OpenAI's clients and vLLM treat them
NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "max_tokens", "max_completion_tokens", "seed", "stop",
                      "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "echo",
                      "suffix", "best_of", "stream_options", "response_format", "tools", "tool_choice", "user",
                      "top_k", "min_p", "min_tokens", "stop_token_ids", "ignore_eos", "repetition_penalty",
                      "metadata", "store", "service_tier", "parallel_tool_calls", "structured_outputs",
                      "guided_json", "guided_regex", "guided_choice", "guided_grammar")
_TOO_MANY_DIGITS = f"the request body holds a number of more than {sys.get_int_max_str_digits()} digits"
METADATA_FIELDS = ("user", "metadata", "store", "service_tier")  # accepted, no effect


def maybe_surrogate(raw: bytes) -> bool:
    """Whether `raw` may hold a lone surrogate once decoded (then its strings are walked)."""
    return (b"\x00" in raw or (b"\xed" in raw and SURROGATE_UTF8.search(raw) is not None)
            or (b"\\u" in raw and SURROGATE_ESCAPE.search(raw) is not None))


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
    response_format: dict[str, Any] | None = None  # checked into a grammar (serve/structured_output.py)
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json, regex, choice, grammar, json_object
    guided_json: dict[str, Any] | str | None = None  # vLLM's older spellings of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked with the tools (serve/tools.py)
    parallel_tool_calls: bool = True  # OpenAI's default: an answer may hold several calls


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


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


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
    except ValueError:  # Python's int-str limit (a number of thousands of digits)
        raise APIError(400, _TOO_MANY_DIGITS) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    data = {key: value for key, value in data.items()
            if not (value is None and key in NULL_MEANS_DEFAULT) and key not in METADATA_FIELDS}
    bad_text = _first_unencodable(data) if maybe_surrogate(raw) else None
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
    except ValueError:  # Python's int-str limit
        raise APIError(400, _TOO_MANY_DIGITS) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    bad_text = _first_unencodable(data) if maybe_surrogate(raw) else None
    if bad_text is not None:
        raise APIError(400, f"{bad_text} holds a lone UTF-16 surrogate (invalid Unicode)", param=bad_text)
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise APIError(400, f"{extra[0]!r} is not supported here", param=extra[0], code="unsupported_parameter")
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
    if isinstance(request, CompletionRequest) and (request.tools or request.tool_choice not in (None, "none")):
        raise APIError(400, "tools (function calling) are for chat completions (/v1/chat/completions)",
                       param="tools" if request.tools else "tool_choice", code="unsupported_parameter")
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(400, "best_of other than n is not supported (every choice generated is returned)",
                       param="best_of", code="unsupported_parameter")
    if isinstance(request, CompletionRequest) and request.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this model", param="suffix",
                       code="unsupported_parameter")
    if isinstance(request, ChatRequest) and request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
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
        if isinstance(key, str) and _first_unencodable(key) is not None:  # a key itself (named escaped)
            escaped = key.encode("utf-8", "backslashreplace").decode("utf-8")
            return f"{path}.{escaped}" if path else escaped
        found = _first_unencodable(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part)
