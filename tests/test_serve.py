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
        app = build_app({"store": str(tiny_stores["llama-gqa"]), "model_name": "tiny", "engine.gpu_memory": 0,
                         "scheduler.max_num_seqs": 32})
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
    assert all(len(c.choices) == 1 for c in chunks)  # OpenAI's own loop reads choices[0] of every chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == response.choices[0].message.content
    with_usage = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == response.usage.completion_tokens


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
    assert max(batching["recent_sequences_per_pass"]) > 1  # some pass over the weights served several clients


def post(path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{BASE}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_a_hundred_bad_requests_then_a_good_one(client):
    bad = [
        b"{broken", b"[]", b'{"model": "tiny"}', b'{"prompt": "x", "max_tokens": 1.5}',
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


def health() -> dict:
    with urllib.request.urlopen(f"{BASE}/health", timeout=30) as answer:
        return json.load(answer)["batching"]


def test_a_short_request_joins_a_running_long_one(client):
    """Continuous batching: the short answer arrives while the long stream is still running (with
    window batching it had to wait for the long one's end)."""
    import time

    long_stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=60, temperature=0,
                                            stream=True)
    chunks = iter(long_stream)
    next(chunks)  # the long request is running
    started = time.perf_counter()
    short = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=1, temperature=0)
    short_s = time.perf_counter() - started
    remaining = [chunk for chunk in chunks]  # the long one goes on after the short one is done
    long_s = time.perf_counter() - started
    assert short.choices[0].finish_reason in ("length", "stop")
    assert any(chunk.choices and chunk.choices[0].text for chunk in remaining)
    assert short_s < long_s
    print(f"short request {short_s:.2f} s while the long one ran {long_s:.2f} s (ratio {short_s / long_s:.2f})")


def test_a_closed_stream_stops_consuming_passes(client):
    import time

    before = health()["passes"]
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=120, temperature=0, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()  # the client disconnects
    deadline = time.monotonic() + 30
    while health()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    settled = health()
    time.sleep(1.0)
    assert settled["running"] == 0 and health()["passes"] == settled["passes"]  # no more passes for it
    assert settled["passes"] - before < 60  # it stopped long before its 120 tokens


def test_a_twenty_prompt_request_shares_its_passes(client, engine):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(20)]
    before = health()["passes"]
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    passes = health()["passes"] - before
    assert sorted(choice.index for choice in response.choices) == list(range(20))
    for choice in response.choices:
        assert choice.text == greedy(engine, prompts[choice.index], 5)
    assert passes <= 5 + 2  # one wave: as many passes as the longest completion (plus a spare)
    print(f"20 prompts of 5 tokens in {passes} passes")


def test_n_choices_and_their_indexes(client):
    response = client.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=4, temperature=1.0,
                                         seed=5, n=2)
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=1.0, seed=5, n=3)
    assert sorted(choice.index for choice in chat.choices) == [0, 1, 2]
    streamed = {}
    for chunk in client.completions.create(model="tiny", prompt="Three", max_tokens=4, temperature=1.0, seed=5, n=2,
                                           stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert set(streamed) == {0, 1}


def test_logprobs_and_echo_equal_transformers(client, engine):
    """Completion logprobs (generated and echoed prompt) against transformers' own forward pass."""
    import torch

    from endor_ray.engine.reference import load_dense_model

    model = load_dense_model(engine.store, dtype=engine.dtype).eval()
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2,
                                         echo=True)
    choice = response.choices[0]
    prompt_ids = engine.tokenizer(PROMPTS[0]).input_ids
    assert choice.text.startswith(PROMPTS[0])
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(prompt_ids) + 3
    generated = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3)).completions[0].token_ids
    ids = prompt_ids + generated
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    for position in range(1, len(ids)):
        assert lp.token_logprobs[position] == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        assert len(lp.top_logprobs[position]) == 2
    scored = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=0, echo=True, logprobs=0)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:len(prompt_ids)], abs=1e-6)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(item.top_logprobs) == 2 for item in content)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=1, stream=True) if c.choices[0].logprobs]
    assert [s.token_logprobs[0] for s in streamed] == pytest.approx(lp.token_logprobs[len(prompt_ids):], abs=1e-6)


def test_operations_routes(client):
    tokens = post("/tokenize", json.dumps({"prompt": "Hello there"}).encode())
    assert tokens[0] == 200 and tokens[1]["count"] == len(tokens[1]["tokens"]) > 0
    text = post("/detokenize", json.dumps({"tokens": tokens[1]["tokens"]}).encode())
    assert text == (200, {"prompt": "Hello there"})
    assert client.models.retrieve("tiny").id == "tiny"
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    status, body = post("/v1/nowhere", b"{}")
    assert status == 404 and body["error"]["message"].startswith("no route")
    with urllib.request.urlopen(f"{BASE}/metrics", timeout=30) as answer:
        metrics = answer.read().decode()
    assert "endor_requests_total" in metrics and "endor_mean_sequences_per_pass" in metrics
    assert "endor_time_to_first_token_seconds_bucket" in metrics
    request = urllib.request.Request(f"{BASE}/v1/completions", headers={"x-request-id": "my-id-1",
                                                                         "Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "x", "max_tokens": 1}).encode())
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert json.load(answer)["id"] == "my-id-1" and answer.headers["x-request-id"] == "my-id-1"


def test_api_key(server):
    """A second app with a key: 401 without it, 200 with it; /health stays open unless protected."""
    import openai
    from ray import serve

    from endor_ray.serve import build_app

    serve.run(build_app({"store": server, "model_name": "locked", "engine": {"gpu_memory": 0}, "api_key": "s3cret"}),
              name="locked", route_prefix="/locked")
    try:
        url = f"{BASE}/locked/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).completions.create(model="locked", prompt="x",
                                                                                           max_tokens=1)
        answer = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).completions.create(
            model="locked", prompt="x", max_tokens=1)
        assert answer.choices[0].finish_reason in ("length", "stop")
        with urllib.request.urlopen(f"{BASE}/locked/health", timeout=30) as health_answer:
            assert health_answer.status == 200
    finally:
        serve.delete("locked")


@pytest.fixture(scope="module")
def exported(server, tmp_path_factory):
    from endor_ray.store import Store
    from endor_ray.store.export import export_checkpoint

    return export_checkpoint(Store(server), tmp_path_factory.mktemp("export") / "hf", progress=False)


def lm_eval(model: str, model_args: str, tmp_path) -> dict:
    import subprocess
    import sys
    from pathlib import Path

    data = Path(__file__).parent / "data" / "lmeval"
    out = tmp_path / f"{model}.json"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks",
         "endor_capitals,endor_sums", "--include_path", str(data), "--output_path", str(out), "--batch_size", "1",
         "--log_samples"],
        cwd=data, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = list(tmp_path.glob(f"{model}*.json"))  # lm-eval adds a timestamp to the name
    results = json.loads(result.read_text())["results"]
    for task in ("endor_capitals", "endor_sums"):  # what each document got: log-likelihoods or text
        [samples] = list(tmp_path.glob(f"{model}*samples_{task}*.jsonl")) or list(tmp_path.glob(f"samples_{task}*.jsonl"))
        results[task]["responses"] = [json.loads(line)["filtered_resps"] for line in samples.read_text().splitlines()]
        samples.unlink()
    result.unlink()
    return results


def test_lm_eval_through_the_server_equals_its_hf_backend(exported, tmp_path):
    """lm-eval's loglikelihood (multiple choice) and generation tasks through `local-completions`
    against this server score exactly as lm-eval's own `hf` backend on the exported weights."""
    served = lm_eval("local-completions", f"model=tiny,base_url={BASE}/v1/completions,tokenizer_backend=huggingface,"
                                          f"tokenizer={exported},num_concurrent=1,max_retries=1", tmp_path)
    reference = lm_eval("hf", f"pretrained={exported},dtype=float32", tmp_path)
    for task, metric in (("endor_capitals", "acc,none"), ("endor_sums", "exact_match,none")):
        assert served[task][metric] == reference[task][metric], (task, served[task], reference[task])
    for ours, theirs in zip(served["endor_capitals"]["responses"], reference["endor_capitals"]["responses"]):
        assert [float(choice[0]) for choice in ours] == pytest.approx([float(choice[0]) for choice in theirs], abs=1e-3)
    assert served["endor_sums"]["responses"] == reference["endor_sums"]["responses"]  # the same generated text


def test_langchain_and_litellm(client, engine, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list (offline)
    from langchain_openai import ChatOpenAI, OpenAI
    import litellm

    expected = greedy(engine, PROMPTS[0], 5)
    llm = OpenAI(base_url=f"{BASE}/v1", api_key="unused", model="tiny", max_tokens=5, temperature=0, max_retries=0)
    assert llm.invoke(PROMPTS[0]) == expected
    assert llm.batch([PROMPTS[0], PROMPTS[1]])[0] == expected  # a prompt list in one request
    chat = ChatOpenAI(base_url=f"{BASE}/v1", api_key="unused", model="tiny", max_tokens=4, temperature=0,
                      max_retries=0)
    answer = chat.invoke("Hi")
    assert answer.content and answer.usage_metadata["output_tokens"] <= 4  # max_tokens reached the server
    assert "".join(chunk.content for chunk in chat.stream("Hi")) == answer.content
    response = litellm.completion(model="openai/tiny", api_base=f"{BASE}/v1", api_key="unused",
                                  messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert response.choices[0].message.content == answer.content


# -- isolation: one bad request never fails its neighbours ----------------------------------------

POISON = [  # bodies that once failed inside a shared pass or in the handler (issue 12), now each a 4xx
    {"prompt": "x", "temperature": 0.7, "seed": 18446744073709551616},
    {"prompt": "x", "temperature": 0.7, "seed": -(2**64)},
    {"prompt": "x", "temperature": float("nan")},
    {"prompt": "x", "max_tokens": True},
    {"prompt": "x", "max_tokens": "5"},
    {"prompt": "x", "max_tokens": 3.0},
    {"prompt": "x", "stream": "yes"},
    {"prompt": "abc \ud800 def"},
    {"prompt": " "},  # not empty, but may tokenize to something: must not be a 5xx either way
]
FINE_BUT_ODD = [  # must be answered (200), never fail the batch
    {"prompt": "x", "temperature": 1e-40, "max_tokens": 3},
    {"prompt": "x", "temperature": 0.5, "top_p": 1e-300, "max_tokens": 3},
    {"prompt": "x", "temperature": None, "top_p": None, "n": None, "stream": None, "max_tokens": 2},
]


def raw_post(body: bytes, path: str = "/v1/completions") -> tuple[int, dict]:
    """(status, JSON body); a streamed answer (server-sent events) comes back as {"events": text}."""
    request = urllib.request.Request(f"{BASE}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw or b"{}")
    except json.JSONDecodeError:
        return status, {"events": raw.decode()}


def test_poison_requests_are_4xx_and_odd_ones_are_answered(engine):
    counts = {"4xx": 0, "5xx": 0, "200": 0}
    for body in POISON + [{"x": "y"}]:
        status, answer = raw_post(json.dumps({"model": "tiny", **body}, allow_nan=True).encode())
        counts["4xx" if 400 <= status < 500 else "5xx" if status >= 500 else "200"] += 1
        assert status < 500, (body, status, answer)
    for body in FINE_BUT_ODD:
        status, answer = raw_post(json.dumps({"model": "tiny", **body}).encode())
        assert status == 200, (body, answer)
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'):
        status, answer = raw_post(raw)
        assert status in (400, 413), (status, answer)
        assert answer["error"]["message"]


def test_random_requests_never_fail_good_neighbours(engine):
    """Property: whatever else shares the batch, a good request gets its solo answer and a bad one
    a 4xx (never a 5xx)."""
    from concurrent.futures import ThreadPoolExecutor

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(), max_size=3))
    fields = st.dictionaries(st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
                                              "stream", "model"]), values, max_size=6)
    expected = greedy(engine, PROMPTS[0], 4)
    outcomes = {"bad_tried": 0, "4xx": 0, "5xx": 0, "200": 0}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(fields, min_size=1, max_size=3))
    def check(bodies):
        good = json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}).encode()
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            bad_answers = [pool.submit(raw_post, json.dumps({"model": "tiny", "prompt": "x", **body},
                                                            allow_nan=True).encode()) for body in bodies]
            good_answer = pool.submit(raw_post, good)
            for future in bad_answers:
                status, _ = future.result()
                outcomes["bad_tried"] += 1
                outcomes["4xx" if 400 <= status < 500 else "5xx" if status >= 500 else "200"] += 1
                assert status < 500
            status, answer = good_answer.result()
        assert status == 200 and answer["choices"][0]["text"] == expected, answer

    check()
    print(f"random requests: {outcomes}")
    assert outcomes["5xx"] == 0


# -- supervision (last: it kills the module's worker) ---------------------------------------------

def test_a_dead_worker_is_replaced_and_health_says_so(client, server):
    import time

    import ray

    assert urllib.request.urlopen(f"{BASE}/health", timeout=30).status == 200
    [worker] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "-worker-" in a["name"]]
    handle = ray.get_actor(worker["name"], namespace=worker["namespace"])
    stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=120, temperature=0, stream=True)
    next(iter(stream))
    ray.kill(handle, no_restart=False)  # the worker dies mid-generation; Ray restarts it
    seen_unhealthy = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{BASE}/health", timeout=30) as answer:
                if answer.status == 200:
                    break
        except urllib.error.HTTPError as error:
            assert error.code == 503 and json.load(error)["status"] == "unavailable"
            seen_unhealthy = True
        time.sleep(0.5)
    else:
        pytest.fail("the worker did not come back within 120 s")
    assert seen_unhealthy
    response = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_endor_serve_hands_its_flags_to_the_app_unchanged():
    """`endor serve` builds a ServeConfig from its flags and `run_server` passes it to `build_app` as
    plain data (dataclasses.asdict): nested mappings that come back as the same config."""
    import dataclasses

    from endor_ray.cli import build_parser
    from endor_ray.serve.config import ServeConfig, serve_config_from_args
    from endor_ray.utils.options import configs_from

    args = build_parser().subcommands["serve"].parse_args(
        ["some/store", "--max-batch-size", "7", "--prefetch", "1", "--address", "auto", "--no-verify-disk-reads"])
    config = ServeConfig(store="some/store", **configs_from(vars(args), args.sections))
    assert (config.scheduler.max_num_seqs, config.scheduler.max_waiting, config.engine.prefetch_depth) == (7, 1024, 1)
    assert config.cluster.address == "auto" and not config.engine.verify_disk_reads
    assert serve_config_from_args(dataclasses.asdict(config)) == config
