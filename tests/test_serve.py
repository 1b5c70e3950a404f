"""The Serve app on 127.0.0.1, driven by the real `openai` client and by raw HTTP."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.sampling import SamplingParams

PORT = 8123
BASE = f"http://127.0.0.1:{PORT}"
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Hi", "Rain falls on", "One, two,"]


@pytest.fixture(scope="module")
def server(tiny_stores):
    import ray
    from ray import serve

    from endor_ray.serve import build_app

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        app = build_app({"store": str(tiny_stores["llama-gqa"]), "model_name": "tiny", "gpu_memory": 0,
                         "batch_wait_ms": 200, "max_batch_size": 8})
        serve.run(app, name="endor", route_prefix="/")
        yield str(tiny_stores["llama-gqa"])
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def engine(server):
    with Engine(server, EngineConfig(gpu_memory=0), progress=False) as engine:
        yield engine


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", timeout=120, max_retries=0)


def greedy(engine: Engine, prompt: str, max_tokens: int) -> str:
    return engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens)).completions[0].text


def test_completions_plain_and_streaming(client, engine):
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert response.choices[0].text == greedy(engine, PROMPTS[0], 6)
    assert response.usage.completion_tokens <= 6 and response.usage.prompt_tokens > 0
    pieces = [chunk.choices[0].text for chunk in
              client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
              if chunk.choices]
    assert "".join(pieces) == response.choices[0].text


def test_chat_plain_and_streaming(client, engine):
    messages = [{"role": "user", "content": "Say hello."}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert response.choices[0].message.content == greedy(engine, prompt, 5)
    assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == response.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_models_and_health(client):
    assert [model.id for model in client.models.list()] == ["tiny"]
    with urllib.request.urlopen(f"{BASE}/health", timeout=30) as answer:
        assert json.load(answer)["status"] == "ok"


def test_concurrent_clients_share_passes_and_get_their_own_answers(client, engine):
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        response = client.completions.create(model="tiny", prompt=PROMPTS[index], max_tokens=6, temperature=0)
        answers[index] = response.choices[0].text

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert answers == {index: greedy(engine, prompt, 6) for index, prompt in enumerate(PROMPTS)}
    with urllib.request.urlopen(f"{BASE}/health", timeout=30) as answer:
        batching = json.load(answer)["batching"]
    assert max(batching["recent_batch_sizes"]) > 1  # some pass over the weights served several clients


def post(path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{BASE}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_a_hundred_bad_requests_then_a_good_one(client):
    bad = [
        b"{broken", b"[]", b'{"model": "tiny"}', b'{"prompt": "x"}',
        json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(),
        json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "ten"}).encode(),
        json.dumps({"model": "tiny", "prompt": "word " * 400}).encode(),
        json.dumps({"model": "nope", "prompt": "x"}).encode(),
        json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}).encode(),
        json.dumps({"model": "tiny", "messages": "hello"}).encode(),
    ]
    for attempt in range(100):
        body = bad[attempt % len(bad)]
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        status, answer = post(path, body)
        assert 400 <= status < 500, (body, status, answer)
        assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error", answer
    response = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")
