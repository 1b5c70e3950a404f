"""The OpenAI protocol layer, without Ray or HTTP."""

import json

import pytest

from endor_ray.serve import openai_api as api
from endor_ray.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def frontend(smollm2_dir):
    from transformers import AutoTokenizer

    return api.Frontend("smol", AutoTokenizer.from_pretrained(smollm2_dir), max_context=64)


def refused(raw, kind, frontend=None) -> api.APIError:
    with pytest.raises(api.APIError) as info:
        request = api.parse(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), kind)
        frontend.requests(request)
    return info.value


def test_bad_requests_get_openai_style_400s(frontend):
    cases = [
        (b"{not json", api.CompletionRequest, "not valid JSON", None),
        (b"[1, 2]", api.CompletionRequest, "JSON object", None),
        ({"model": "smol"}, api.CompletionRequest, "'prompt'", "prompt"),
        ({"model": "smol", "prompt": 5}, api.CompletionRequest, "prompt", "prompt"),
        ({"model": "smol", "prompt": "hi", "max_tokens": -3}, api.CompletionRequest, "max_tokens", "max_tokens"),
        ({"model": "smol", "prompt": "hi", "max_tokens": "many"}, api.CompletionRequest, "max_tokens", "max_tokens"),
        ({"model": "smol", "prompt": "hi", "temperature": 7}, api.CompletionRequest, "temperature", "temperature"),
        ({"model": "smol", "prompt": "hi", "n": 17}, api.CompletionRequest, "'n'", "n"),
        ({"model": "smol", "prompt": ""}, api.CompletionRequest, "non-empty", "prompt"),
        ({"model": "smol", "messages": []}, api.ChatRequest, "messages", "messages"),
        ({"model": "smol", "messages": [{"role": "wizard", "content": "x"}]}, api.ChatRequest, "role", "messages.0.role"),
        ({"model": "smol", "prompt": "word " * 80}, api.CompletionRequest, "maximum context length is 64", "prompt"),
        ({"model": "smol", "prompt": "hi", "max_tokens": 100}, api.CompletionRequest, "maximum context length", "max_tokens"),
    ]
    for raw, kind, needle, param in cases:
        error = refused(raw, kind, frontend)
        assert error.status == 400, raw
        body = error.body()["error"]
        assert needle in body["message"] and body["type"] == "invalid_request_error", (raw, body)
        assert body["param"] == param, (raw, body)


def test_unknown_model_is_404(frontend):
    error = refused({"model": "gpt-9", "prompt": "hi"}, api.CompletionRequest, frontend)
    assert error.status == 404 and error.body()["error"]["code"] == "model_not_found"


def test_valid_requests_become_sampling_params(frontend):
    [choice] = frontend.requests(api.parse(json.dumps(
        {"model": "smol", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3,
         "user": "ignored-extra-field"}).encode(), api.CompletionRequest))
    assert choice.prompt == "Hello" and choice.prompt_tokens == 1
    assert choice.params == SamplingParams(max_new_tokens=5, temperature=0.0, seed=3, stop=("\n",))
    [chat] = frontend.requests(api.parse(json.dumps(
        {"model": "smol", "messages": [{"role": "user", "content": "Hi"}]}).encode(), api.ChatRequest))
    assert chat.prompt.endswith("assistant\n") and "Hi" in chat.prompt
    chat_tokens = len(frontend.tokenizer(chat.prompt).input_ids)
    assert chat.params.max_new_tokens == 64 - chat_tokens  # the room the context leaves
    assert chat.params.temperature == 1.0  # OpenAI's default


def request(frontend, body: dict, kind=api.CompletionRequest):
    return frontend.requests(api.parse(json.dumps(body).encode(), kind))


def test_prompts_as_token_ids_lists_and_text_parts(frontend):
    ids = frontend.tokenizer("Hello there").input_ids
    [one] = request(frontend, {"prompt": ids, "max_tokens": 2})
    assert one.prompt == ids and one.prompt_tokens == len(ids)
    assert [c.prompt for c in request(frontend, {"prompt": [ids, ids[:1]], "max_tokens": 2})] == [ids, ids[:1]]
    assert len(request(frontend, {"prompt": ["a", "b"], "max_tokens": 2, "n": 2})) == 4
    [parts] = request(frontend, {"messages": [{"role": "system", "content": None},
                                              {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                           {"type": "text", "text": " there"}]}]},
                      api.ChatRequest)
    assert "Hi there" in parts.prompt
    error = refused({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                    api.ChatRequest, frontend)
    assert error.param == "messages.0.content.0.type" and "'image_url'" in error.message
    assert refused({"prompt": [10**9], "max_tokens": 2}, api.CompletionRequest, frontend).param == "prompt"


def test_no_field_is_silently_dropped(frontend):
    for body, param in [({"prompt": "x", "frobnicate": 1}, "frobnicate"),
                        ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
                        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
                        ({"prompt": "x", "best_of": 3}, "best_of"),
                        ({"prompt": "x", "suffix": "end"}, "suffix")]:
        error = refused(body, api.CompletionRequest, frontend)
        assert error.status == 400 and error.param == param, (body, error.message)
    # harmless metadata and explicit nulls are fine
    [choice] = request(frontend, {"prompt": "x", "user": "u1", "metadata": {"a": "b"}, "temperature": None,
                                  "top_p": None, "n": None, "stream": None, "max_tokens": None})
    assert choice.params.max_new_tokens == 16 and choice.params.temperature == 1.0


def test_sampling_controls_reach_the_engine(frontend):
    [choice] = request(frontend, {"prompt": "x", "max_tokens": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                                  "repetition_penalty": 1.2, "logit_bias": {"42": 10}, "top_k": 5, "min_p": 0.1,
                                  "min_tokens": 2, "stop_token_ids": [7], "ignore_eos": True, "seed": 9,
                                  "logprobs": 3, "echo": True})
    params = choice.params
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert params.logit_bias == ((42, 10.0),) and (params.top_k, params.min_p, params.min_tokens) == (5, 0.1, 2)
    assert params.stop_token_ids == (7,) and params.ignore_eos and params.logprobs == 3 and params.prompt_logprobs == 3
    [chat] = request(frontend, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4,
                                "logprobs": True, "top_logprobs": 2}, api.ChatRequest)
    assert chat.params.max_new_tokens == 4 and chat.params.logprobs == 2
    [score] = request(frontend, {"prompt": "x y", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert score.params.max_new_tokens == 0 and score.params.prompt_logprobs == 0
    assert refused({"prompt": "x", "max_tokens": 0}, api.CompletionRequest, frontend).param == "max_tokens"


def test_logprobs_are_shaped_alike_in_responses_and_stream_chunks(frontend):
    """One shaping for a whole response and a stream's chunk: a chunk's object is the response's entry
    for that token (the legacy text offset counted from the chunk's own token)."""
    tokenizer = frontend.tokenizer
    ids = tokenizer("The capital of France").input_ids
    entries = [[-0.5 - index, [[token_id, -0.5 - index], [7, -3.0]]] for index, token_id in enumerate(ids)]
    completion = {"token_ids": ids, "logprobs": entries, "prompt_token_ids": ids[:2], "prompt_logprobs": [None, entries[1]]}
    texts = [tokenizer.decode([token_id]) for token_id in ids]
    chat = frontend.response_logprobs(completion, chat=True, echo=False, count=None)
    assert [item["token"] for item in chat["content"]] == texts
    assert [item["logprob"] for item in chat["content"]] == [entry[0] for entry in entries]
    seven = tokenizer.decode([7])
    assert chat["content"][0]["top_logprobs"][1] == {"token": seven, "logprob": -3.0, "bytes": list(seven.encode())}
    legacy = frontend.response_logprobs(completion, chat=False, echo=False, count=2)
    assert legacy["tokens"] == texts and legacy["token_logprobs"] == [entry[0] for entry in entries]
    assert legacy["text_offset"] == [sum(len(text) for text in texts[:index]) for index in range(len(texts))]
    assert legacy["top_logprobs"][0] == {texts[0]: -0.5, seven: -3.0}
    for index, (token_id, entry) in enumerate(zip(ids, entries)):
        assert frontend.logprobs(True, [token_id], [entry]) == {"content": [chat["content"][index]]}
        assert frontend.logprobs(False, [token_id], [entry]) == {
            "tokens": [texts[index]], "token_logprobs": [entry[0]], "top_logprobs": [legacy["top_logprobs"][index]],
            "text_offset": [0]}
    echoed = frontend.response_logprobs(completion, chat=False, echo=True, count=2)
    assert echoed["tokens"] == texts[:2] + texts and echoed["token_logprobs"][:3] == [None, entries[1][0], entries[0][0]]
    assert frontend.response_logprobs({**completion, "logprobs": None}, chat=True, echo=False, count=None) is None
    assert frontend.response_logprobs(completion, chat=False, echo=False, count=None) is None


def test_choices_carry_the_token_ids_they_were_checked_as(frontend):
    """Each prompt is tokenized once (whatever n is) and its ids are what the GPU worker is sent."""
    def choices(prompt) -> list:
        return frontend.requests(api.parse(json.dumps({"model": "smol", "prompt": prompt, "max_tokens": 3, "n": 2})
                                           .encode(), api.CompletionRequest))

    hello, hi = frontend.tokenizer("Hello there").input_ids, frontend.tokenizer("Hi").input_ids
    texts = choices(["Hello there", "Hi"])
    assert [choice.prompt_ids for choice in texts] == [hello, hello, hi, hi]
    assert [choice.prompt for choice in texts] == ["Hello there", "Hello there", "Hi", "Hi"]
    assert [choice.prompt_tokens for choice in texts] == [len(hello), len(hello), len(hi), len(hi)]
    assert [(choice.prompt, choice.prompt_ids) for choice in choices([5, 6, 7])] == [([5, 6, 7], [5, 6, 7])] * 2
