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
