"""Function calling: the parsers and grammars by themselves, then the real server with the openai client,
LangChain and litellm. The served model has random weights: it never chooses a tool on its own, so the
calls below come from "required" or a named tool_choice, whose grammar forces them (said where it matters)."""

import json
import random

import jsonschema
import numpy as np
import pytest

from endor_ray.serve import openai_api as api
from endor_ray.serve import tools
from endor_ray.serve.tool_calls import CallParser

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                      "b": {"type": "array", "maxItems": 3, "items": {"type": "boolean"}},
                      "note": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 9}]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def read(syntax: str, text: str, names=("get_weather", "add")) -> tuple[str, list[tuple[str, str]]]:
    parser = CallParser(syntax, set(names))
    parser.feed(text)
    parser.finish()
    return parser.content, [(c["function"]["name"], c["function"]["arguments"]) for c in parser.calls]


def test_parsers_read_hermes_and_llama3_calls_in_any_pieces():
    hermes = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris\\"", "unit": "celsius"}}\n'
              '</tool_call>\n<tool_call>\n{"name":"add","arguments":{"a": 1, "b": [true, {"x": "]"}]}}\n</tool_call>\n')
    llama = '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": []}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    cases = [
        ("hermes", hermes, "Let me check.", [("get_weather", {"city": 'Pa}ris"', "unit": "celsius"}),
                                             ("add", {"a": 1, "b": [True, {"x": "]"}]})]),
        ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', None, []),  # unknown: text
        ("hermes", "a < b, and <tool_call> is not JSON", None, []),
        ("hermes", "Plain answer.  ", "Plain answer.  ", []),
        ("llama3_json", llama, "", [("add", {"a": 2, "b": []}), ("get_weather", {"city": "Oslo"})]),
        ("llama3_json", '  {"name": "add", "parameters": {"a": 5}}', "", [("add", {"a": 5})]),
        ("llama3_json", 'The call would be {"name": "add", "parameters": {}}', None, []),  # calls open the answer
        ("llama3_json", '{"a": 1}', None, []),
    ]
    for syntax, text, content, calls in cases:
        whole_content, whole_calls = read(syntax, text)
        assert whole_content == (text if content is None else content), (syntax, text, whole_content)
        assert [(name, json.loads(arguments)) for name, arguments in whole_calls] == calls, (syntax, text)
        for cut in range(len(text) + 1):  # streamed in two pieces at every point, and one character at a time
            for pieces in ([text[:cut], text[cut:]], list(text) if cut == 0 else []):
                parser = CallParser(syntax, {"get_weather", "add"})
                events = [event for piece in pieces for event in parser.feed(piece)] + parser.finish()
                if not pieces:
                    continue
                assert "".join(e[1] for e in events if e[0] == "content") == whole_content, (syntax, text, cut)
                streamed = {}
                for event in events:
                    if event[0] == "call":
                        streamed[event[1]] = [event[3], ""]
                    elif event[0] == "arguments":
                        streamed[event[1]][1] += event[2]
                assert [tuple(streamed[index]) for index in sorted(streamed)] == whole_calls, (syntax, text, cut)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def ll_tokenizer(hf_tokenizer):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer)


def sample(ll_tokenizer, grammar: str, seed: int, forced_prefix: list[int] = (), max_tokens: int = 300):
    """Random tokens among those the grammar's mask allows (a model that knows nothing but the mask)."""
    import llguidance

    rng, matcher, tokens = random.Random(seed), llguidance.LLMatcher(ll_tokenizer, grammar), list(forced_prefix)
    assert matcher.consume_tokens(tokens), matcher.get_error()
    while len(tokens) < max_tokens and not matcher.is_stopped():
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        token = int(rng.choice(np.nonzero(bits[:ll_tokenizer.vocab_size])[0]))
        if token == ll_tokenizer.eos_token:
            break
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    return tokens, matcher.is_accepting()


@pytest.mark.parametrize("syntax", tools.SYNTAXES)
def test_forced_grammars_only_produce_valid_calls(syntax, hf_tokenizer, ll_tokenizer):
    named = {"type": "function", "function": {"name": "add"}}
    for choice, parallel, allowed in [("required", False, {"get_weather", "add"}), ("required", True, {"get_weather", "add"}),
                                      (named, False, {"add"})]:
        plan = tools.plan(TOOLS, choice, parallel, syntax)
        for seed in range(6):
            ids, complete = sample(ll_tokenizer, plan.grammar, seed)
            assert complete, (syntax, choice, hf_tokenizer.decode(ids))
            content, calls = read(syntax, hf_tokenizer.decode(ids))
            assert content == "" and 1 <= len(calls) <= (tools.MAX_PARALLEL_CALLS if parallel else 1), content
            for name, arguments in calls:
                assert name in allowed
                jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_auto_with_a_strict_tool_constrains_a_call_once_it_starts(hf_tokenizer, ll_tokenizer):
    assert tools.plan(TOOLS[:1], "auto", True, "hermes").grammar is None  # nothing strict: free text, parsed
    plan = tools.plan(TOOLS, "auto", False, "hermes")
    for seed in range(4):  # free text is free
        ids, _ = sample(ll_tokenizer, plan.grammar, seed, hf_tokenizer("Hello, I can answer that").input_ids, 40)
        assert len(ids) == 40
    start = hf_tokenizer('<tool_call>\n{"name": "add", "arguments": ').input_ids
    for seed in range(4):
        ids, complete = sample(ll_tokenizer, plan.grammar, seed, start)
        _, [(name, arguments)] = read("hermes", hf_tokenizer.decode(ids))
        assert complete and name == "add"
        jsonschema.validate(json.loads(arguments), ADD)


def test_the_syntax_can_be_set_for_the_server():
    from endor_ray.cli import build_parser
    from endor_ray.errors import ConfigError
    from endor_ray.serve.config import ServeConfig, serve_config_from_args

    assert serve_config_from_args({"store": "s", "tool_call_syntax": "llama3_json"}).tool_call_syntax == "llama3_json"
    assert build_parser().subcommands["serve"].parse_args(["s", "--tool-call-syntax", "hermes"]).tool_call_syntax == "hermes"
    with pytest.raises(ConfigError, match="tool_call_syntax"):
        ServeConfig(store="s", tool_call_syntax="xml")


@pytest.fixture(scope="module")
def frontend(hf_tokenizer):
    return api.Frontend("smol", hf_tokenizer, max_context=2048)


def choices(frontend, body: dict) -> list[api.Choice]:
    return frontend.requests(api.parse(json.dumps(body).encode(), api.ChatRequest))


def test_bad_tool_specs_are_400s_naming_the_problem(frontend):
    user = [{"role": "user", "content": "Hi"}]
    weather = TOOLS[0]["function"]
    cases = [
        ({"tools": [{"type": "function", "function": {**weather, "parameters": {"type": "object", "properties":
                    {"city": {"type": "strin"}}}}}]}, "tools.0.function.parameters", "strin"),
        ({"tools": [{"type": "function", "function": {**weather, "parameters": {"$ref": "#/nowhere"}}}]},
         "tools.0.function.parameters", "nowhere"),
        ({"tools": [{"type": "function", "function": {**weather, "parameters": {"type": "array"}}}]},
         "tools.0.function.parameters", "object"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice", "launch"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0", "function"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, "tools.0.function.name", "64"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"tools": [{"type": "function", "function": {**weather, "strict": "yes"}}]}, "tools.0.function.strict", "boolean"),
    ]
    for extra, param, needle in cases:
        with pytest.raises(api.APIError) as info:
            choices(frontend, {"messages": user, **extra})
        assert info.value.status == 400 and info.value.param == param and needle in info.value.message, (extra, info.value.message)
    with pytest.raises(api.APIError) as info:  # completions take no tools
        frontend.requests(api.parse(json.dumps({"prompt": "x", "tools": TOOLS}).encode(), api.CompletionRequest))
    assert info.value.param == "tools"
    [plain] = choices(frontend, {"messages": user, "tool_choice": "none"})  # "none" without tools is fine
    assert plain.tools is None and plain.params.grammar is None


def test_tools_and_past_calls_are_written_into_a_template_that_ignores_them(frontend):
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    [auto] = choices(frontend, {"messages": history, "tools": TOOLS})
    assert "<tools>\n" + json.dumps(TOOLS[0]) in auto.prompt  # SmolLM2's template ignores tools: a system message
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in auto.prompt
    assert "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>" in auto.prompt
    assert auto.tools.choice == "auto" and auto.params.grammar is not None  # "add" is strict
    [none] = choices(frontend, {"messages": history, "tools": TOOLS, "tool_choice": "none"})
    assert "<tools>" not in none.prompt and "<tool_response>" in none.prompt and none.tools is None
    [named] = choices(frontend, {"messages": history, "tools": TOOLS, "parallel_tool_calls": False,
                                 "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named.tools.choice == "add" and not named.tools.parallel and named.params.grammar


def test_a_template_that_knows_tools_gets_them_and_its_syntax(hf_tokenizer):
    import copy

    tokenizer = copy.deepcopy(hf_tokenizer)
    tokenizer.chat_template = ("<|start_header_id|>{% for tool in tools %}{{ tool.function.name }};{% endfor %}"
                               "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% for c in m.tool_calls or [] %}"
                               "{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}")
    frontend = api.Frontend("smol", tokenizer, max_context=2048)
    assert frontend.tool_syntax == "llama3_json" and tools.syntax_for(hf_tokenizer.chat_template) == "hermes"
    [choice] = choices(frontend, {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}]})
    assert choice.prompt == '<|start_header_id|>get_weather;add;[user]Hi[assistant]{"a": 1}'  # arguments as an object


# -- the real server and clients ---------------------------------------------------------------------

PORT = 8125
BASE = f"http://127.0.0.1:{PORT}"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ADD_ONLY = {"type": "function", "function": {"name": "add"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory, smollm2_dir):
    """conftest's random-weight GQA Llama with SmolLM2's tokenizer, with room for the tools' system prompt."""
    import shutil

    from conftest import make_checkpoint
    from endor_ray.compress.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("tools-store")
    checkpoint = make_checkpoint(root / "ckpt", "llama-gqa", vocab_size=49152, max_position_embeddings=1024)
    for path in smollm2_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(path, checkpoint / path.name)
    return convert(str(checkpoint), root / "store", ConvertConfig(method="magnitude", block_size=256), progress=False)


@pytest.fixture(scope="module")
def server(store):
    import ray
    from ray import serve

    from endor_ray.serve import build_app

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app({"store": str(store), "model_name": "tiny", "engine.gpu_memory": 0}),
                  name="endor", route_prefix="/")
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", timeout=120, max_retries=0)


def valid_calls(message, allowed: set[str], cut: bool = False) -> list[tuple[str, dict]]:
    """The message's calls, checked (cut: max_tokens ended the answer, the last call is unfinished)."""
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls[:-1 if cut else None]]
    for call, (name, arguments) in zip(message.tool_calls, calls):
        assert call.id.startswith("call_") and call.type == "function" and name in allowed
        jsonschema.validate(arguments, SCHEMAS[name])
    return calls


def streamed(client, **request) -> tuple[str | None, list[tuple[str, str]], str]:
    """A streamed chat answer assembled: (content, [(name, arguments)], finish_reason), checking the
    deltas' shape as OpenAI sends them (a call's index, id, type and name with arguments "" first)."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.arguments == ""
                calls[delta.index] = [delta.function.name, ""]
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index][1] += delta.function.arguments
        reason = choice.finish_reason or reason
    return content or None, [tuple(calls[index]) for index in sorted(calls)], reason


def test_each_tool_choice_with_the_openai_client(client):
    common = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
    none = client.chat.completions.create(tool_choice="none", **common).choices[0]
    assert none.message.tool_calls is None and isinstance(none.message.content, str)
    # "auto": this random-weight model answers in text (it never starts a call by itself)
    auto = client.chat.completions.create(**common).choices[0]
    assert auto.message.tool_calls is None and auto.message.content and auto.finish_reason in ("stop", "length")
    required = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **common).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.content is None
    assert len(valid_calls(required.message, {"get_weather", "add"})) == 1
    named = client.chat.completions.create(tool_choice=ADD_ONLY, parallel_tool_calls=False, **common).choices[0]
    assert named.finish_reason == "tool_calls" and [name for name, _ in valid_calls(named.message, {"add"})] == ["add"]
    several = client.chat.completions.create(tool_choice="required", **{**common, "max_tokens": 200}).choices[0]
    assert several.finish_reason in ("tool_calls", "length") and several.message.content is None
    cut = several.finish_reason == "length"
    assert 1 <= len(valid_calls(several.message, {"get_weather", "add"}, cut)) + cut <= tools.MAX_PARALLEL_CALLS


def test_streamed_tool_calls_assemble_into_the_unstreamed_ones(client):
    for choice, parallel in [("required", False), (ADD_ONLY, False), ("required", True)]:
        request = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120, tool_choice=choice,
                       parallel_tool_calls=parallel)
        whole = client.chat.completions.create(**request).choices[0]
        content, calls, reason = streamed(client, **request)
        assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls], choice
        assert (content, reason) == (whole.message.content, whole.finish_reason)
    request = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=20)  # "auto": text
    whole = client.chat.completions.create(**request).choices[0]
    assert streamed(client, **request) == (whole.message.content, [], whole.finish_reason)


def test_a_call_cut_by_max_tokens_says_length(client):
    # 16 tokens write '<tool_call>\n{"name": "add", "arguments": {': the call is named, its arguments cut
    choice = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=ADD_ONLY,
                                            temperature=0, max_tokens=18).choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "length" and call.function.name == "add" and call.function.arguments.startswith("{")


def test_langchain_structured_output_and_an_agent_loop(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        """The weather forecast for a city."""

        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    chat = ChatOpenAI(base_url=f"{BASE}/v1", api_key="unused", model="tiny", temperature=0, max_tokens=100,
                      max_retries=0)
    # function_calling sends the model as a tool and names it in tool_choice: the grammar forces the call;
    # strict closes the objects (additionalProperties false), else this model invents properties
    structured = chat.with_structured_output(Forecast, method="function_calling", strict=True)
    forecast = structured.invoke("Weather in Oslo for 3 days?")
    assert isinstance(forecast, Forecast) and 1 <= forecast.days <= 7

    seen = []

    class Factors(BaseModel):
        a: int = Field(ge=-99, le=99)  # bounded: this model would write digits until max_tokens
        b: int = Field(ge=-99, le=99)

    @tool(args_schema=Factors)
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        seen.append((a, b))
        return a * b

    messages = [HumanMessage("What is 6 times 7? Use the tool.")]
    forced = chat.bind_tools([multiply], tool_choice="multiply", strict=True, parallel_tool_calls=False)
    first = forced.invoke(messages)  # forced: this model would never call by itself
    [call] = first.tool_calls
    messages += [first, ToolMessage(str(multiply.invoke(call["args"])), tool_call_id=call["id"])]
    final = chat.bind_tools([multiply], strict=True).invoke(messages)  # "auto": it answers in text
    assert seen == [(call["args"]["a"], call["args"]["b"])] and not final.tool_calls and final.content
    assert final.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]  # the call and result were sent


def test_litellm_tools(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list (offline)
    import litellm

    response = litellm.completion(model="openai/tiny", api_base=f"{BASE}/v1", api_key="unused", messages=ASK,
                                  tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                  temperature=0)
    choice = response.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_shaped_stream_and_response_agree_per_choice(frontend):
    """Without a server: two choices' token texts shaped as a stream and as a whole response."""
    import asyncio

    from endor_ray.serve.responses import Shaper

    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "n": 2, "logprobs": True}
    request = api.parse(json.dumps(body).encode(), api.ChatRequest)
    shaper = Shaper(frontend, request, "chatcmpl-1", frontend.requests(request))
    texts = ['<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": []}}\n</tool_call>', "no call at all"]
    pieces = {index: [text[start:start + 5] for start in range(0, len(text), 5)] for index, text in enumerate(texts)}
    completions = [{"text": text, "token_ids": list(range(len(pieces[index]))), "finish_reason": "stop",
                    "logprobs": [[-0.5, []]] * len(pieces[index]), "prompt_token_ids": [1]}
                   for index, text in enumerate(texts)]

    async def events():
        for step in range(max(len(p) for p in pieces.values())):
            for index in pieces:
                if step < len(pieces[index]):
                    yield {"index": index, "token_id": step, "text": pieces[index][step], "logprob": [-0.5, []]}
        for index in pieces:
            yield {"index": index, "completion": completions[index]}

    async def collect():
        return [chunk async for chunk in shaper.stream(None, events())]

    chunks = [json.loads(line[len("data: "):]) for line in asyncio.run(collect()) if line != api.STREAM_END]
    whole = shaper.response(completions)["choices"]
    for index, choice in enumerate(whole):
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == index]
        content = "".join(c["delta"].get("content") or "" for c in mine) or None
        calls = {}
        for delta in (d for c in mine for d in c["delta"].get("tool_calls", [])):
            calls.setdefault(delta["index"], {"id": delta.get("id"), "type": "function",
                                              "function": {"name": delta["function"].get("name"), "arguments": ""}})
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
        assert content == choice["message"]["content"] and mine[-1]["finish_reason"] == choice["finish_reason"]
        assert [c["function"] for c in calls.values()] == [c["function"] for c in choice["message"].get("tool_calls", [])]
        assert sum(len(c["logprobs"]["content"]) for c in mine if c["logprobs"]) == len(pieces[index])  # none lost
    assert whole[0]["finish_reason"] == "tool_calls" and whole[0]["message"]["content"] is None
    assert whole[1]["message"] == {"role": "assistant", "content": "no call at all"}  # "required" forbids this; the shaper only reads
