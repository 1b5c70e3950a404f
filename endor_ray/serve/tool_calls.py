"""Reading tool calls out of generated text, whole or as it streams (the syntaxes: `endor_ray.serve.tools`).

One `CallParser` per choice serves both a whole response (feed everything, then finish) and a stream
(feed each token's text), so a streamed call assembles into exactly the unstreamed one. A call's
`arguments` is the model's own JSON text of the arguments object, cut where that object closes.
"""

from __future__ import annotations

import json
import uuid

import regex

OPEN, CLOSE, PYTHON_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"
# A call's start up to its arguments' opening brace; `partial` tells text that may still become one
HEADER = regex.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*\{',
                       regex.DOTALL)


class CallParser:
    """Reads tool calls out of generated text as it arrives. feed(text) and finish() return events:
    ("content", text), ("call", index, id, name) when a call's name is known, ("arguments", index, text)
    for each fragment of its arguments. `content` and `calls` hold what was read (OpenAI's shapes).
    Text that turns out not to be a call (an unknown name, no JSON) stays content; whitespace only
    between calls is dropped."""

    def __init__(self, syntax: str, names: set[str]):
        self.syntax, self.names = syntax, names
        self.state = "text"  # text -> head -> arguments -> tail -> (text | head); plain: no more calls
        self.buffer, self.head_text, self.space = "", "", ""
        self.content, self.calls = "", []
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, text: str) -> list[tuple]:
        self.buffer += text
        events: list[tuple] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[tuple]:
        events: list[tuple] = []
        while self._step(events, final=True):  # at the end a call that never became one is text
            pass
        if not self.calls:  # a plain answer keeps its trailing whitespace
            self._text(events, "", flush=True)
        self.buffer = ""
        return events

    def _step(self, events: list[tuple], final: bool) -> bool:
        """Consume what the buffer decides; False when it needs more text."""
        buffer = self.buffer
        if self.state == "plain":
            self._text(events, buffer)
            self.buffer = ""
            return False
        if self.state == "text" and self.syntax == "hermes":
            found = buffer.find(OPEN)
            if found < 0:
                keep = next((n for n in range(min(len(OPEN) - 1, len(buffer)), 0, -1) if OPEN.startswith(buffer[-n:])), 0)
                keep = 0 if final else keep
                self._text(events, buffer[:len(buffer) - keep])
                self.buffer = buffer[len(buffer) - keep:]
                return False
            self._text(events, buffer[:found])
            self.state, self.head_text, self.buffer = "head", OPEN, buffer[found + len(OPEN):]
            return True
        if self.state == "text":  # llama3_json: a call only at the start (or after "; ")
            stripped = buffer.lstrip()
            if not final and (not stripped or (PYTHON_TAG.startswith(stripped) and stripped != PYTHON_TAG)):
                return False
            tag = PYTHON_TAG if stripped.startswith(PYTHON_TAG) else ""
            if tag or stripped.startswith("{"):
                self.state, self.head_text, self.buffer = "head", buffer[:len(buffer) - len(stripped) + len(tag)], \
                    stripped[len(tag):]
            else:
                self.state = "plain"
            return True
        if self.state == "head":
            match = HEADER.match(buffer, partial=True)
            if match is not None and match.partial and not final:
                return False
            name = json.loads(match.group(1)) if match is not None and not match.partial else None
            if name not in self.names:  # not a call after all: its text is content
                self._text(events, self.head_text)
                self.state = "text" if self.syntax == "hermes" else "plain"
                return True
            self.space = ""  # whitespace before a call is not content
            index, call_id = len(self.calls), f"call_{uuid.uuid4().hex[:24]}"
            self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
            events.append(("call", index, call_id, name))
            self.state, self.buffer = "arguments", buffer[match.end() - 1:]
            self.depth, self.in_string, self.escaped = 0, False, False
            return True
        if self.state == "arguments":
            end = self._object_end(buffer)
            fragment = buffer if end is None else buffer[:end]
            if fragment:
                self.calls[-1]["function"]["arguments"] += fragment
                events.append(("arguments", len(self.calls) - 1, fragment))
            self.buffer = "" if end is None else buffer[end:]
            if end is not None:
                self.state = "tail"
            return end is not None
        # tail: past the arguments, up to the end of the call and its separator
        if self.syntax == "hermes":
            found = buffer.find(CLOSE)
            if found < 0:
                return False
            self.state, self.buffer = "text", buffer[found + len(CLOSE):]
            return True
        stripped = buffer.lstrip().removeprefix("}").lstrip()
        if not stripped and not final:
            return False
        if stripped.startswith(";") or stripped.startswith("{"):
            self.state, self.head_text, self.buffer = "head", "", stripped.removeprefix(";")
        else:
            self.state, self.buffer = "plain", stripped
        return bool(stripped)

    def _object_end(self, text: str) -> int | None:
        """Where the arguments object ends in text (one past its closing brace), None if not yet."""
        for position, char in enumerate(text):
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return position + 1
        return None

    def _text(self, events: list[tuple], text: str, flush: bool = False) -> None:
        """Content, with trailing whitespace held back: it is dropped if a call follows."""
        text = self.space + text
        cut = len(text) if flush else len(text.rstrip())
        self.space = text[cut:]
        if text[:cut]:
            self.content += text[:cut]
            events.append(("content", text[:cut]))
