"""Structured output: grammars from JSON schemas enforced by the engine, through the API and jobs."""

import json

import pytest

from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine import grammar as G
from endor_ray.engine.sampling import SamplingParams
from endor_ray.errors import ConfigError

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"]}


@pytest.fixture(scope="module")
def engine(tiny_stores):
    """A random-weight Llama with SmolLM2's 49k tokenizer: left alone it writes no JSON."""
    with Engine(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=0), progress=False) as engine:
        yield engine


def test_grammars_from_schemas_regexes_choices_and_lark():
    strict = json.loads(G.json_schema_grammar(PERSON, strict=True))["grammars"][0]["json_schema"]
    assert strict["additionalProperties"] is False and "additionalProperties" not in PERSON  # a copy
    for grammar in (G.json_object_grammar(), G.regex_grammar(r"[0-9]{3}"), G.choice_grammar(["yes", "no"]),
                    G.lark_grammar('start: "a"+')):
        G.validate_grammar(grammar)
    bad = [({"type": "strnig"}, "strnig"), ({"type": "string", "format": "weird"}, "weird"),
           ({"properties": {"a": {"$ref": "#/nope"}}}, "/nope")]
    for schema, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            G.json_schema_grammar(schema, strict=False)
    with pytest.raises(ConfigError, match="unclosed character class"):
        G.regex_grammar("[a-")
    with pytest.raises(ConfigError, match="grammar"):
        SamplingParams(grammar="")


def test_the_engine_follows_a_schema_and_free_rows_share_the_batch(engine):
    import jsonschema

    grammar = G.json_schema_grammar(PERSON, strict=True)
    prompt = "Describe a person as JSON:"
    free = SamplingParams(max_new_tokens=40)
    params = [SamplingParams(max_new_tokens=80, grammar=grammar), free,
              SamplingParams(max_new_tokens=80, temperature=1.0, seed=1, grammar=grammar)]
    completions, _ = engine.generate([prompt] * 3, params)
    for completion in (completions[0], completions[2]):
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON)
    with pytest.raises(json.JSONDecodeError):  # the same prompt unconstrained: not JSON (the test can fail)
        json.loads(completions[1].text)
    [alone], _ = engine.generate([prompt], free)
    assert alone.text == completions[1].text  # the free row was not touched by its constrained neighbours
    [cut], _ = engine.generate([prompt], SamplingParams(max_new_tokens=3, grammar=grammar))
    assert cut.finish_reason == "length" and cut.text.startswith('{"name":')
    [choice], _ = engine.generate([prompt], SamplingParams(max_new_tokens=10, grammar=G.choice_grammar(["yes", "no"])))
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"


def test_finishing_or_cancelling_frees_the_grammar_and_min_tokens_yields_to_it(engine, monkeypatch):
    import threading

    from endor_ray.engine import engine as engine_module

    threads = []

    def recorded(states):
        threads.append(threading.current_thread().name)
        G.compute_masks(states)

    monkeypatch.setattr(engine_module, "compute_masks", recorded)
    grammar = G.json_schema_grammar(PERSON, strict=True)
    kept, cancelled = engine.new_sequences(["A person:", "Another:"], SamplingParams(max_new_tokens=80, grammar=grammar))
    assert kept.grammar is not None and cancelled.grammar is not None
    engine.add([kept, cancelled])
    engine.step()
    assert kept.grammar.stale and not threads  # its next mask waits for the next pass ...
    engine.step()
    assert set(threads) == {"endor-grammar_0"}  # ... and was computed beside it, on the grammar thread
    engine.cancel([cancelled])
    while not kept.finished:
        engine.step()
    assert cancelled.finish_reason == "cancelled" and cancelled.grammar is None
    assert kept.finish_reason == "stop" and kept.grammar is None and not engine.has_work
    # min_tokens hides the end until 5 tokens, but "yes" is one token: the grammar's end wins
    [short], _ = engine.generate(["Yes?"], SamplingParams(max_new_tokens=8, min_tokens=5,
                                                          grammar=G.choice_grammar(["yes"])))
    assert short.text == "yes" and short.finish_reason == "stop"


def random_schema(rng, depth: int = 0, kind: str | None = None) -> dict:
    """A JSON schema of nested objects, arrays, enums, numbers, booleans and short strings; bounded
    (maxLength, maxItems, ranges, closed objects) so that a random-weight model finishes within a few
    dozen tokens."""
    kinds = ["integer", "number", "boolean", "enum", "string"] + (["object", "array"] if depth < 2 else [])
    kind = kind or rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None], rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    names = rng.sample(["id", "name", "size", "tags", "ok", "score", "kind", "child"], rng.randint(1, 3))
    return {"type": "object", "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": rng.sample(names, rng.randint(0, len(names))), "additionalProperties": False}


def test_fifty_random_schemas_give_valid_json_every_time(engine):
    import random

    import jsonschema

    rng = random.Random(0)
    schemas = [random_schema(rng, kind="object" if index % 3 else None) for index in range(50)]
    params = [SamplingParams(max_new_tokens=100, temperature=0.8, seed=index,
                             grammar=G.json_schema_grammar(schema, strict=bool(index % 2)))
              for index, schema in enumerate(schemas)]
    completions, _ = engine.generate(["Answer in JSON:"] * len(schemas), params)
    for schema, completion in zip(schemas, completions):
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


# -- the real server, the real clients, the embedded model --------------------------------------

PORT = 8131
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_batch_job_with_a_json_schema(local_ray, tiny_stores, tmp_path):
    import jsonschema

    from endor_ray.jobs.generate import main
    from endor_ray.jobs.parts import PartFolder

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(index), "prompt": f"Person {index}:"}) + "\n" for index in range(6)))
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    argv = ["--store", str(tiny_stores["llama-gqa"]), "--input", str(prompts), "--output", str(tmp_path / "out"),
            "--max-new-tokens", "80", "--gpu-memory", "0", "--json-schema", str(schema)]
    assert main(argv) == 0
    table = PartFolder(str(tmp_path / "out")).read_all()
    assert table.num_rows == 6 and set(table.column("finish_reason").to_pylist()) == {"stop"}
    for text in table.column("text").to_pylist():
        jsonschema.validate(json.loads(text), PERSON)
    schema.write_text(json.dumps({"type": "strnig"}))
    assert main(argv[:-2] + ["--json-schema", str(schema), "--output", str(tmp_path / "other")]) == 1


@pytest.fixture(scope="module")
def server(local_ray, smollm2_dir, tmp_path_factory):
    """The embedded SmolLM2 unpruned (a model that writes sensible JSON), served on 127.0.0.1."""
    from ray import serve

    from endor_ray.compress.convert import ConvertConfig, convert
    from endor_ray.serve import build_app

    store = convert(str(smollm2_dir), tmp_path_factory.mktemp("smollm2-dense") / "store",
                    ConvertConfig(method="magnitude", sparsity=0.0), progress=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app({"store": str(store), "model_name": "smol", "engine.gpu_memory": 0}),
                  name="endor", route_prefix="/")
        yield str(store)
    finally:
        serve.shutdown()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", timeout=300, max_retries=0)


def test_openai_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Cat(BaseModel):
        name: str = Field(max_length=16)
        age: int = Field(ge=0, le=30)
        indoor: bool
        color: Literal["black", "white", "ginger"]

    completion = client.chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": "Describe a cat named Tom as JSON."}],
        response_format=Cat, max_tokens=40, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Cat), choice.message.content
    assert Cat.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_length_and_vllm_extensions(client):
    ask = [{"role": "user", "content": 'Reply with a JSON object with one key, "name", holding a dog\'s name.'}]
    answer = client.chat.completions.create(model="smol", messages=ask, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop" and isinstance(json.loads(answer.choices[0].message.content), dict)
    free = client.chat.completions.create(model="smol", messages=ask, max_tokens=8, temperature=0)
    # left alone it spreads the object over lines; the grammar allows JSON's compact form only
    assert "\n" in free.choices[0].message.content and "\n" not in answer.choices[0].message.content
    cut = client.chat.completions.create(model="smol", messages=ask, max_tokens=4, temperature=0,
                                         response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")
    picked = client.completions.create(model="smol", prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert picked.choices[0].text in ("yes", "no") and picked.choices[0].finish_reason == "stop"
    digits = client.completions.create(model="smol", prompt="The year is", max_tokens=8, temperature=0,
                                       extra_body={"guided_regex": "[0-9]{4}"})
    assert len(digits.choices[0].text) == 4 and digits.choices[0].text.isdigit()


def test_a_bad_schema_is_a_400_naming_it(client):
    import openai

    for schema, needle in [({"type": "strnig"}, "strnig"), ({"type": "string", "format": "weird"}, "weird"),
                           ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert needle in info.value.body["message"] and info.value.body["param"] == "response_format"


def test_langchain_with_structured_output_json_schema_and_json_mode(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=10**8)  # unbounded, a small model may write digits until max_tokens

    chat = ChatOpenAI(base_url=f"{BASE}/v1", api_key="unused", model="smol", max_tokens=40, temperature=0,
                      max_retries=0)
    city = chat.with_structured_output(City, method="json_schema").invoke("Describe Paris as JSON.")
    assert isinstance(city, City) and city.name
    data = chat.with_structured_output(method="json_mode").invoke("Describe Paris as JSON.")
    assert isinstance(data, dict) and data


def test_the_api_turns_response_format_and_vllm_fields_into_grammars(smollm2_dir):
    from transformers import AutoTokenizer

    from endor_ray.serve import openai_api as api

    frontend = api.Frontend("smol", AutoTokenizer.from_pretrained(smollm2_dir), max_context=256)

    def grammar(body: dict, kind=api.ChatRequest):
        body = {"messages": [{"role": "user", "content": "hi"}], **body} if kind is api.ChatRequest else \
            {"prompt": "x", **body}
        return frontend.requests(api.parse(json.dumps(body).encode(), kind))[0].params.grammar

    def refused(body: dict, kind=api.ChatRequest) -> api.APIError:
        with pytest.raises(api.APIError) as info:
            grammar(body, kind)
        assert info.value.status == 400
        return info.value

    assert grammar({"response_format": {"type": "text"}}) is None
    assert grammar({"response_format": {"type": "json_object"}}) == G.json_object_grammar()
    spec = {"name": "p", "schema": PERSON, "strict": True}
    assert grammar({"response_format": {"type": "json_schema", "json_schema": spec}}) == G.json_schema_grammar(PERSON, True)
    assert grammar({"structured_outputs": {"regex": "[0-9]+"}}, api.CompletionRequest) == G.regex_grammar("[0-9]+")
    assert grammar({"guided_choice": ["a", "b"]}, api.CompletionRequest) == G.choice_grammar(["a", "b"])
    assert grammar({"guided_json": json.dumps(PERSON)}) == G.json_schema_grammar(PERSON, False)
    bad = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strnig"}}}
    assert "strnig" in refused({"response_format": bad}).message
    assert refused({"response_format": {"type": "yaml"}}).param == "response_format"
    assert refused({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}).param == "response_format"
    assert refused({"guided_regex": "[0-9]", "response_format": {"type": "json_object"}}).param == "guided_regex"
    assert "exactly one" in refused({"structured_outputs": {"regex": "a", "choice": ["a"]}}).message
