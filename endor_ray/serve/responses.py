"""Engine events -> OpenAI responses: a whole response, or server-sent event chunks.

The events are the GPU worker's (`endor_ray.engine.loop`): token events with the text that
became final (and the token's log-probability when asked), one "completion" event per choice
when it finishes, then the request's result. A stream sends exactly one choice per chunk; the
usage chunk only when `stream_options.include_usage` asks for it (as OpenAI does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from endor_ray.errors import EndorError
from endor_ray.serve import openai_api as api


class Shaper:
    """Shapes one request's completions for its kind (chat or completion) and options."""

    def __init__(self, frontend: api.Frontend, request: api._Sampling, request_id: str, choices: list[api.Choice]):
        self.frontend, self.request, self.request_id, self.choices = frontend, request, request_id, choices
        self.chat = isinstance(request, api.ChatRequest)
        self.echo = not self.chat and request.echo
        self.logprobs = None if self.chat else request.logprobs
        self.num_choices = len(choices)
        self.prompt_tokens = sum(choice.prompt_tokens for choice in choices[::request.n])  # each prompt once
        self.model = frontend.model_name

    def response(self, completions: list[dict]) -> dict[str, Any]:
        shaped = []
        for choice, completion in zip(self.choices, completions):
            text = completion["text"]
            if self.echo:
                text = self.frontend.prompt_text(completion) + text
            logprobs = self.frontend.response_logprobs(completion, self.chat, self.echo, self.logprobs)
            reason, calls = _reason(completion), None
            if choice.tools is not None:  # the calls read out of the text; content null when there is only calls
                parser = choice.tools.parser()
                parser.feed(text)
                parser.finish()
                text, calls = parser.content or None, parser.calls or None
                reason = "tool_calls" if calls and reason == "stop" else reason
            shaped.append({"text": text, "logprobs": logprobs, "finish_reason": reason,
                           "tokens": len(completion["token_ids"]), "tool_calls": calls})
        shape = api.chat_response if self.chat else api.completion_response
        return shape(self.request_id, self.model, shaped, self.prompt_tokens)

    async def stream(self, first: dict | None, events: AsyncIterator[dict]) -> AsyncIterator[str]:
        options = self.request.stream_options
        include_usage = options is not None and options.include_usage
        continuous = options is not None and options.continuous_usage_stats
        generated, echoed = 0, set()
        parsers = {index: choice.tools.parser() for index, choice in enumerate(self.choices) if choice.tools}
        try:
            for index in range(self.num_choices):
                if self.chat:
                    yield api.stream_chunk(self.request_id, self.model, True, index, None, role=True)
            async for event in _chain([first] if first is not None else [], events):
                index = event.get("index")
                usage_block = api.usage(self.prompt_tokens, generated) if continuous else None
                if self.echo and index is not None and index not in echoed:  # the prompt comes first
                    echoed.add(index)
                    prompt = self.choices[index].prompt
                    text = prompt if isinstance(prompt, str) else self.frontend.tokenizer.decode(prompt)
                    yield api.stream_chunk(self.request_id, self.model, False, index, text)
                if "completion" in event:
                    completion, reason = event["completion"], _reason(event["completion"])
                    if index in parsers:
                        parser = parsers[index]
                        for chunk in self._tool_chunks(index, parser.finish(), None, usage_block):
                            yield chunk
                        reason = "tool_calls" if parser.calls and reason == "stop" else reason
                    yield api.stream_chunk(self.request_id, self.model, self.chat, index, None, reason,
                                           usage_block=usage_block)
                elif "token_id" in event:
                    generated += 1
                    if index in parsers:
                        for chunk in self._tool_chunks(index, parsers[index].feed(event["text"]),
                                                       self._token_logprobs(event), usage_block):
                            yield chunk
                        continue
                    yield api.stream_chunk(self.request_id, self.model, self.chat, index, event["text"],
                                           logprobs=self._token_logprobs(event), usage_block=usage_block)
            if include_usage:
                yield api.usage_chunk(self.request_id, self.model, self.chat, api.usage(self.prompt_tokens, generated))
        except EndorError as exc:
            yield api.error_chunk(api.api_error(exc))
        finally:
            await events.aclose()  # a client gone mid-stream: the worker lets the sequences go
        yield api.STREAM_END

    def _tool_chunks(self, index: int, events: list[tuple], logprobs: dict | None, usage_block: dict | None):
        """A choice's parsed text as chunks, as OpenAI streams calls: a call's index, id, type and name with
        arguments "" first, then its argument fragments; a token's logprobs ride on its first chunk."""
        if not events and logprobs is not None:
            events = [("content", "")]
        for event in events:
            kind, text, calls = event[0], None, None
            if kind == "content":
                text = event[1]
            elif kind == "call":
                calls = [{"index": event[1], "id": event[2], "type": "function",
                          "function": {"name": event[3], "arguments": ""}}]
            else:
                calls = [{"index": event[1], "function": {"arguments": event[2]}}]
            yield api.stream_chunk(self.request_id, self.model, True, index, text, logprobs=logprobs,
                                   usage_block=usage_block, tool_calls=calls)
            logprobs = None

    def _token_logprobs(self, event: dict) -> dict | None:
        entry = event.get("logprob")
        return None if entry is None else self.frontend.logprobs(self.chat, [event["token_id"]], [entry])


def _reason(completion: dict) -> str:
    reason = completion["finish_reason"]
    return "stop" if reason == "cancelled" else reason  # "error" is reported with the request's status


async def _chain(first: list, rest):
    for item in first:
        yield item
    async for item in rest:
        yield item
