"""Function calling: tool specs and tool_choice, the tool-call syntax, the grammar that forces calls, and
the parser that reads calls back out of the generated text, whole or as it streams.

What the model writes for one call (`SYNTAXES`):
  hermes       <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>   (Hermes, Qwen: a block per
               call, anywhere in the answer; several separated by a newline)
  llama3_json  {"name": NAME, "parameters": {...}}   (Llama 3.1+: at the start of the answer, after an
               optional <|python_tag|>; several separated by "; ")
`syntax_for` picks one from the chat template (or the server's `tool_call_syntax`). A template that
ignores `tools` (SmolLM2's) gets the tool specs, past calls and tool results written into the messages
in that syntax by `render` (a system message, `<tool_call>` blocks, `<tool_response>` user turns).

tool_choice: "none": the tools are not rendered and nothing is parsed (the model cannot call what it
was not shown); "auto": the model answers or calls, its text is parsed, and if any tool is `strict` a
grammar constrains the call once the answer starts with the syntax; "required" or a named function: a
grammar forces one call (up to MAX_PARALLEL_CALLS with parallel_tool_calls) whose arguments follow the
function's parameters schema. A call's `arguments` string is the model's own JSON text of the
arguments object, so a streamed call (name first, then fragments of that text) assembles into exactly
the unstreamed one: both come from the same `CallParser` (`endor_ray.serve.tool_calls`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import regex

from endor_ray.engine.grammar import JSON_OPTIONS
from endor_ray.serve.protocol import APIError
from endor_ray.serve.tool_calls import CLOSE, OPEN, PYTHON_TAG, CallParser

SYNTAXES = ("hermes", "llama3_json")
MAX_PARALLEL_CALLS = 8  # calls one forced answer may hold (a grammar needs a bound; OpenAI sets none)
NAME_CHARS = regex.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Function:
    """One tool the request offers."""

    name: str
    description: str | None
    parameters: dict  # JSON schema of the arguments object
    strict: bool

    def spec(self) -> dict:
        """The tool as OpenAI and chat templates write it."""
        body = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in body.items() if v is not None}}


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request asks of its tools, checked: the functions, the choice, the syntax, the grammar."""

    functions: tuple[Function, ...]
    choice: str  # "auto", "required" or a function's name
    parallel: bool  # several calls in one answer
    syntax: str  # one of SYNTAXES
    grammar: str | None  # an llguidance grammar for SamplingParams.grammar; None: free text, parsed

    def parser(self) -> CallParser:
        return CallParser(self.syntax, {function.name for function in self.functions})


def syntax_for(template: str | None, configured: str = "auto") -> str:
    """The tool-call syntax of a chat template: hermes where it writes <tool_call> or ignores tools."""
    if configured != "auto":
        return configured
    template = template or ""
    if "tools" in template and OPEN not in template and ("<|start_header_id|>" in template or PYTHON_TAG in template):
        return "llama3_json"
    return "hermes"


def plan(tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool, syntax: str) -> ToolPlan | None:
    """The checked plan for a request's tools (None: no tools, or tool_choice "none"), or a 400 naming the problem."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: give the functions the model may call", param="tool_choice")
        return None
    functions = tuple(_function(tool, index) for index, tool in enumerate(tools))
    names = [function.name for function in functions]
    if len(set(names)) < len(names):
        raise APIError(400, f"tool names must be unique, got {names}", param="tools")
    for index, function in enumerate(functions):
        problem = _compile_problem(_lark(syntax, (function,), 1, True))
        if problem:
            raise APIError(400, f"tools[{index}].function.parameters is not a schema this server can enforce: {problem}",
                           param=f"tools.{index}.function.parameters")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or not isinstance(name, str) or set(choice) != {"type", "function"}:
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                                '{"name": NAME}}', param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools {names}",
                           param="tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise APIError(400, f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
                       param="tool_choice")
    if choice == "none":
        return None
    calls = MAX_PARALLEL_CALLS if parallel else 1
    if choice == "auto":
        grammar = _grammar(syntax, functions, calls, text=True) if any(f.strict for f in functions) else None
    else:
        chosen = functions if choice == "required" else tuple(f for f in functions if f.name == choice)
        grammar = _grammar(syntax, chosen, calls, text=False)
    return ToolPlan(functions, choice, parallel, syntax, grammar)


def _function(tool: Any, index: int) -> Function:
    where = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise APIError(400, f'{where} must be {{"type": "function", "function": {{"name", "parameters", ...}}}} '
                            "(other tool types are not supported)", param=where)
    if set(tool) != {"type", "function"}:
        raise APIError(400, f"{where} has fields this server does not know: {sorted(set(tool) - {'type', 'function'})}",
                       param=where, code="unsupported_parameter")
    spec = tool["function"]
    unknown = set(spec) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise APIError(400, f"{where}.function has fields this server does not know: {sorted(unknown)}",
                       param=f"{where}.function", code="unsupported_parameter")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_CHARS.fullmatch(name):
        raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}",
                       param=f"{where}.function.name")
    description, strict = spec.get("description"), spec.get("strict")
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
    if strict is not None and not isinstance(strict, bool):
        raise APIError(400, f"{where}.function.strict must be a boolean", param=f"{where}.function.strict")
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise APIError(400, f"{where}.function.parameters must be a JSON schema of an object "
                            '({"type": "object", "properties": {...}})', param=f"{where}.function.parameters")
    return Function(name, description, parameters, bool(strict))


# -- grammars --------------------------------------------------------------------------------------


def _lark(syntax: str, functions: tuple[Function, ...], calls: int, schema: bool | None, text: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) for 1..calls calls of these functions; the arguments follow
    each schema (schema True), each strict one's (None), or are any JSON object; text: or a plain answer
    that does not start with the syntax."""
    key = "arguments" if syntax == "hermes" else "parameters"
    rules = []
    for index, function in enumerate(functions):
        keep = schema or (schema is None and function.strict)
        arguments = {**(function.parameters if keep else {"type": "object"})}
        arguments["x-guidance"] = {**JSON_OPTIONS, **arguments.get("x-guidance", {})}  # compact, as response_format
        head = json.dumps(f'{{"name": {json.dumps(function.name)}, "{key}": ')
        rules += [f'fn_{index}: {head} args_{index} "}}"', f"args_{index}: %json {json.dumps(arguments)}"]
    body = " | ".join(f"fn_{index}" for index in range(len(functions)))
    if syntax == "hermes":
        call, separator, start = f'"{OPEN}\\n" ({body}) "\\n{CLOSE}"', r'"\n"', OPEN
    else:
        call, separator, start = f"({body})", '"; "', "{"
    more = f" ({separator} call){{0,{calls - 1}}}" if calls > 1 else ""
    lines = ["%llguidance {}", f"start: calls{' | TEXT' if text else ''}", f"calls: call{more}", f"call: {call}", *rules]
    if text:  # a plain answer may not start with the syntax: there the call is constrained
        lines.append(f"TEXT: /(?s:.*)/ & ~/(?s:[ \\t\\r\\n]*{regex.escape(start)}.*)/")
    return "\n".join(lines) + "\n"


def _grammar(syntax: str, functions: tuple[Function, ...], calls: int, text: bool) -> str:
    import llguidance

    return llguidance.grammar_from("lark", _lark(syntax, functions, calls, None if text else True, text))


def _compile_problem(lark: str) -> str:
    """What llguidance finds wrong with a grammar ("" when it compiles)."""
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", lark))
    return problem.split("\n")[0].split(": ", 1)[-1] if problem else ""


# -- prompts ---------------------------------------------------------------------------------------


def render(messages: list[dict], functions: tuple[Function, ...], syntax: str,
           template_knows_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """Messages (OpenAI's, as dicts) and the `tools` argument for the chat template. A template that knows
    tools gets them as Hugging Face writes them (arguments as objects); another gets them written in."""
    if template_knows_tools:
        return [_hf_message(message) for message in messages], [f.spec() for f in functions] or None
    out: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            content = "\n".join([content] * bool(content) + [_written_call(syntax, c) for c in message["tool_calls"]])
        if role == "tool":  # as Qwen's template writes results: a user turn (templates refuse a "tool" role)
            result = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
                continue
            out.append({"role": "user", "content": result, "tool_results": True})
            continue
        out.append({"role": role, "content": content})
    if functions:
        system = _instructions(syntax, functions)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}" if out[0]["content"] else system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return [{"role": m["role"], "content": m["content"]} for m in out], None


def _instructions(syntax: str, functions: tuple[Function, ...]) -> str:
    specs = "\n".join(json.dumps(f.spec()) for f in functions)
    if syntax == "hermes":
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                f"with function signatures within <tools></tools> XML tags:\n<tools>\n{specs}\n</tools>\n\nFor each "
                "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    return ("You have access to the following functions. To call a function, respond with JSON in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}; several calls are '
            f'separated by "; ". Do not use variables.\n\n{specs}')


def _written_call(syntax: str, call: dict) -> str:
    function = call["function"]
    arguments = function["arguments"] or "{}"
    key = "arguments" if syntax == "hermes" else "parameters"
    text = f'{{"name": {json.dumps(function["name"])}, "{key}": {arguments}}}'
    return f"{OPEN}\n{text}\n{CLOSE}" if syntax == "hermes" else text


def _hf_message(message: dict) -> dict:
    out = {key: value for key, value in message.items() if value is not None}
    out.setdefault("content", "")
    if message.get("tool_calls"):
        out["tool_calls"] = [{"id": call["id"], "type": "function",
                              "function": {"name": call["function"]["name"],
                                           "arguments": _arguments_object(call["function"]["arguments"])}}
                             for call in message["tool_calls"]]
    return out


def _arguments_object(arguments: str) -> Any:
    """Templates write arguments with `tojson`: an object, not its JSON text (kept as text when it is not JSON)."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments

