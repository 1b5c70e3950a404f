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
        ({"prompt": "hi"}, api.CompletionRequest, "'model'", "model"),
        ({"model": "smol"}, api.CompletionRequest, "'prompt'", "prompt"),
        ({"model": "smol", "prompt": 5}, api.CompletionRequest, "prompt", "prompt"),
        ({"model": "smol", "prompt": "hi", "max_tokens": -3}, api.CompletionRequest, "max_tokens", "max_tokens"),
        ({"model": "smol", "prompt": "hi", "max_tokens": "many"}, api.CompletionRequest, "max_tokens", "max_tokens"),
        ({"model": "smol", "prompt": "hi", "temperature": 7}, api.CompletionRequest, "temperature", "temperature"),
        ({"model": "smol", "prompt": "hi", "n": 17}, api.CompletionRequest, "'n'", "n"),
        ({"model": "smol", "prompt": ""}, api.CompletionRequest, "non-empty", "prompt"),
        ({"model": "smol", "messages": []}, api.ChatRequest, "messages", "messages"),
        ({"model": "smol", "messages": [{"role": "user"}]}, api.ChatRequest, "content", "messages.0.content"),
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
    [(prompt, params, tokens)] = frontend.requests(api.parse(json.dumps(
        {"model": "smol", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3,
         "user": "ignored-extra-field"}).encode(), api.CompletionRequest))
    assert prompt == "Hello" and tokens == 1
    assert params == SamplingParams(max_new_tokens=5, temperature=0.0, seed=3, stop=("\n",))
    [(chat_prompt, chat_params, _)] = frontend.requests(api.parse(json.dumps(
        {"model": "smol", "messages": [{"role": "user", "content": "Hi"}]}).encode(), api.ChatRequest))
    assert chat_prompt.endswith("assistant\n") and "Hi" in chat_prompt
    chat_tokens = len(frontend.tokenizer(chat_prompt).input_ids)
    assert chat_params.max_new_tokens == 64 - chat_tokens  # the room the context leaves
    assert chat_params.temperature == 1.0  # OpenAI's default
