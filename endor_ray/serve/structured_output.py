"""A request's structured-output fields -> the grammar its choices are generated under.

OpenAI's `response_format`: {"type": "text"} (no grammar), {"type": "json_object"} (any JSON
object), {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}.
vLLM's extension `structured_outputs`: one of {"json": schema, "regex": str, "choice": [str],
"grammar": Lark/GBNF text, "json_object": true}, and its older spellings `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. At most one of them per request. A schema or
grammar llguidance cannot enforce is a 400 naming what it could not (`engine.grammar`).
"""

from __future__ import annotations

import json
from typing import Any

from endor_ray.engine import grammar as grammars
from endor_ray.errors import ConfigError
from endor_ray.serve.protocol import APIError, _Sampling

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def request_grammar(request: _Sampling) -> str | None:
    """The serialized grammar a request's output must follow (None: free text), or a 400."""
    asked = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS)
             if getattr(request, name, None) is not None and not _is_text(name, getattr(request, name))]
    if len(asked) > 1:
        raise APIError(400, f"{asked[0]} and {asked[1]} both constrain the output; give one", param=asked[1])
    if not asked:
        return None
    name = asked[0]
    value = getattr(request, name)
    try:
        if name == "response_format":
            return _response_format(value)
        if name == "structured_outputs":
            return _structured_outputs(value)
        return _vllm(GUIDED_FIELDS[name], value)
    except ConfigError as exc:
        raise APIError(400, f"{name}: {exc}", param=name) from None


def _is_text(name: str, value: Any) -> bool:
    return name == "response_format" and isinstance(value, dict) and value.get("type") == "text"


def _response_format(fmt: dict[str, Any]) -> str:
    kind = fmt.get("type")
    if kind == "json_object":
        _only(fmt, {"type"}, "response_format")
        return grammars.json_object_grammar()
    if kind != "json_schema":
        raise ConfigError(f"type {kind!r} is not one of 'text', 'json_object', 'json_schema'")
    _only(fmt, {"type", "json_schema"}, "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ConfigError("json_schema must be an object {name, schema, strict}")
    _only(spec, {"name", "schema", "strict", "description"}, "json_schema")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ConfigError("json_schema.name is required (a string)")
    schema = spec.get("schema", {})
    strict = spec.get("strict", False)
    if not isinstance(strict, bool) and strict is not None:
        raise ConfigError("json_schema.strict must be a boolean")
    return grammars.json_schema_grammar(schema, strict=bool(strict))


def _structured_outputs(options: Any) -> str:
    if not isinstance(options, dict):
        raise ConfigError("must be an object with one of json, regex, choice, grammar, json_object")
    given = {key: value for key, value in options.items() if value is not None and value is not False}
    kinds = [key for key in given if key in ("json", "regex", "choice", "grammar", "json_object")]
    unknown = sorted(set(given) - set(kinds) - {"disable_any_whitespace", "disable_additional_properties"})
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not supported (only json, regex, choice, grammar, json_object)")
    if len(kinds) != 1:
        raise ConfigError(f"give exactly one of json, regex, choice, grammar, json_object (got {kinds or 'none'})")
    if kinds[0] == "json_object":
        return grammars.json_object_grammar()
    return _vllm(kinds[0], given[kinds[0]], strict=bool(given.get("disable_additional_properties")))


def _vllm(kind: str, value: Any, strict: bool = False) -> str:
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema as text too
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"the schema is not valid JSON: {exc}") from None
        return grammars.json_schema_grammar(value, strict=strict)
    if kind == "regex":
        return grammars.regex_grammar(value)
    if kind == "choice":
        return grammars.choice_grammar(value)
    return grammars.lark_grammar(value)


def _only(value: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise ConfigError(f"{where} field {extra[0]!r} is not supported")
