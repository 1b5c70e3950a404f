"""OpenAI requests -> what the engine runs, and completions -> OpenAI responses and chunks.

`Frontend` turns a parsed request (`endor_ray.serve.protocol`) into choices, one sequence each,
fully validated against the model (its context, its vocabulary) before anything joins a batch,
so one bad request never fails the others; and shapes completions, log-probabilities included.
Plain functions and classes: used by the Serve deployment, testable without it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from endor_ray.engine.prompts import PromptTooLong, check_prompt
from endor_ray.engine.sampling import SamplingParams
from endor_ray.errors import ConfigError, EndorError
from endor_ray.serve import tools
from endor_ray.serve.structured_output import request_grammar
from endor_ray.serve.limits import logit_bias_entries
from endor_ray.serve.protocol import (  # noqa: F401  (the protocol's names, re-exported for the app and tests)
    MAX_BODY_BYTES, APIError, ChatRequest, CompletionRequest, TextPart, _Sampling, parse, parse_plain,
)

class Choice:
    """One sequence to generate: its prompt as given (text or token ids), the token ids it was checked
    as (what the GPU worker is sent: it tokenizes nothing again), and its parameters."""

    def __init__(self, prompt: str | list[int], prompt_ids: list[int], params: SamplingParams,
                 tool_plan: tools.ToolPlan | None = None):
        self.prompt, self.prompt_ids, self.params = prompt, prompt_ids, params
        self.tools = tool_plan  # the request's tools: its text is read for calls

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class Frontend:
    """Turns validated requests into choices for one served model, and completions into responses."""

    def __init__(self, model_name: str, tokenizer, max_context: int, default_max_tokens: int = 256,
                 tool_call_syntax: str = "auto"):
        self.model_name, self.tokenizer, self.max_context = model_name, tokenizer, max_context
        self.default_max_tokens = default_max_tokens
        self.vocab_size = len(tokenizer)
        template = getattr(tokenizer, "chat_template", None) or ""
        self.tool_syntax = tools.syntax_for(template, tool_call_syntax)
        self.template_knows_tools = "tools" in template  # else the tools are written into the messages

    def tool_plan(self, request: _Sampling) -> tools.ToolPlan | None:
        """A chat request's checked tools and tool_choice (None: none to call), or a 400."""
        if not isinstance(request, ChatRequest):
            return None
        return tools.plan(request.tools, request.tool_choice, request.parallel_tool_calls, self.tool_syntax)

    def check_model(self, request: _Sampling) -> None:
        if request.model is not None and request.model != self.model_name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def prompts(self, request: _Sampling, plan: tools.ToolPlan | None = None) -> list[str | list[int]]:
        if isinstance(request, ChatRequest):
            messages = [{"role": m.role, "content": _text(m.content)} for m in request.messages]
            if plan is not None or any(m.tool_calls or m.tool_call_id for m in request.messages):
                for message, given in zip(messages, request.messages):
                    message.update(given.model_dump(include={"tool_calls", "tool_call_id", "name"}, exclude_none=True))
                messages, specs = tools.render(messages, plan.functions if plan else (), self.tool_syntax,
                                               self.template_knows_tools)
            else:
                specs = None
            try:
                extra = {"tools": specs} if specs else {}
                return [self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                           **extra)]
            except Exception as exc:  # noqa: BLE001 - templates raise assorted errors for bad roles/orders
                raise APIError(400, f"the messages do not fit the model's chat template: {exc}", param="messages") from None
        prompt = request.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string, token list, or list of them", param="prompt")
        return prompts

    def prompt_ids(self, prompt: str | list[int], max_tokens: int) -> list[int]:
        """The prompt's token ids, checked against the context the engine uses (`check_prompt`, the
        one check), or the API's 400: context_length_exceeded, or what else is wrong with the prompt."""
        try:
            return check_prompt(self.tokenizer, prompt, max_tokens, self.max_context)
        except PromptTooLong as exc:
            raise APIError(400, f"this model's maximum context length is {exc.max_context} tokens, but "
                                f"{exc.prompt_tokens + exc.max_new_tokens} were requested ({exc.prompt_tokens} in the "
                                f"prompt, {exc.max_new_tokens} for the completion); shorten the prompt or lower "
                                "max_tokens", param="max_tokens" if exc.prompt_tokens < exc.max_context else "prompt",
                           code="context_length_exceeded") from None
        except ConfigError as exc:  # no tokens, ids outside the vocabulary
            raise APIError(400, str(exc), param="prompt") from None

    def requests(self, request: _Sampling) -> list[Choice]:
        """One Choice per prompt and per n, checked against the context."""
        self.check_model(request)
        chat = isinstance(request, ChatRequest)
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        logprobs = (request.top_logprobs or 0) if chat and request.logprobs else None if chat else request.logprobs
        echo = not chat and request.echo
        logit_bias = logit_bias_entries(request.logit_bias, self.vocab_size)
        asked = request.max_completion_tokens if chat else request.max_tokens
        if chat and request.max_completion_tokens is not None and request.max_tokens is not None:
            asked = min(request.max_tokens, request.max_completion_tokens)
        elif chat and request.max_tokens is not None:
            asked = request.max_tokens
        if asked == 0 and not echo:
            raise APIError(400, "max_tokens 0 only scores a prompt: it needs echo", param="max_tokens")
        choices = []
        checked = []
        grammar = request_grammar(request)  # response_format, structured_outputs (a 400 if unsupported)
        plan = self.tool_plan(request)
        if plan is not None and plan.grammar is not None:
            grammar = plan.grammar  # a call the tools force (or constrain) comes before the answer's format
        for prompt in self.prompts(request, plan):  # tokenized once, whatever n is
            # No max_tokens (chat): as much as the context leaves, up to the server's default, at least 1.
            ids = self.prompt_ids(prompt, asked if asked is not None else 1)
            checked += [(prompt, ids)] * request.n
        for prompt, ids in checked:
            max_tokens = asked if asked is not None else min(self.default_max_tokens, self.max_context - len(ids))
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
                    0 if echo and max_tokens == 0 else None, grammar=grammar)
            except ConfigError as exc:
                raise APIError(400, str(exc)) from None
            choices.append(Choice(prompt, ids, params, plan))
        return choices

    # -- responses -----------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def logprobs(self, chat: bool, token_ids: list[int], entries: list) -> dict:
        """OpenAI's logprobs object for these tokens, in a whole response or a stream's chunk: chat's
        {"content": [{token, logprob, bytes, top_logprobs}]} or the legacy completions' {tokens,
        token_logprobs, top_logprobs, text_offset} (offsets from the first of these tokens). An entry is
        [logprob, [[alternative id, logprob]...]], or None where a token has none (a prompt's first)."""
        if chat:
            def item(token_id: int, logprob: float) -> dict:
                text = self.token_text(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**item(token_id, entry[0]), "top_logprobs": [item(alt, lp) for alt, lp in entry[1]]}
                                for token_id, entry in zip(token_ids, entries)]}
        tokens = [self.token_text(token_id) for token_id in token_ids]
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

    def response_logprobs(self, completion: dict, chat: bool, echo: bool, count: int | None) -> dict | None:
        """A whole completion's logprobs object (echo: the prompt's tokens first), None if not asked for."""
        asked = completion["logprobs"] is not None if chat else count is not None  # chat: top_logprobs asked
        if not asked:
            return None
        ids, entries = list(completion["token_ids"]), list(completion["logprobs"] or [])
        if echo:
            ids = completion["prompt_token_ids"] + ids
            entries = list(completion["prompt_logprobs"] or [None] * len(completion["prompt_token_ids"])) + entries
        return self.logprobs(chat, ids, entries)

    def prompt_text(self, completion: dict) -> str:
        return self.tokenizer.decode(completion["prompt_token_ids"])


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


def api_error(exc: EndorError) -> APIError:
    """The HTTP error for an engine-side failure: 429 (queue full), 400 (refused), 503 (failed)."""
    from endor_ray.engine.scheduler import QueueFull

    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, ConfigError):
        return APIError(400, str(exc))
    message = str(exc)
    return APIError(503, message if message.startswith("generation failed") else f"generation failed: {message}")


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
        "choices": [{"index": index, "message": {"role": "assistant", "content": c["text"],
                                                 **({"tool_calls": c["tool_calls"]} if c.get("tool_calls") else {})},
                     "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                    for index, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c["tokens"] for c in choices)),
    }


def stream_chunk(request_id: str, model: str, chat: bool, index: int, text: str | None,
                 finish_reason: str | None = None, role: bool = False, logprobs: dict | None = None,
                 usage_block: dict | None = None, tool_calls: list[dict] | None = None) -> str:
    """One server-sent event line for a streamed completion or chat completion (one choice); chat's
    tool_calls: the delta's call pieces, as OpenAI sends them."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
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
