"""Function calling: `tools` and `tool_choice` checked, shown to the model, enforced by a grammar, and
the model's answer turned into OpenAI's `tool_calls` (whole, or as stream deltas).

A call is one JSON object, `{"name": "<function>", "arguments": {...}}`, as the whole answer.
- The model learns about the tools from its own chat template when the template renders
  `tools` (Qwen, Llama 3.1, Hermes...); otherwise from a system message sovpack adds that
  lists them and this format.
- `tool_choice` "required" or a named function: a grammar built from the functions'
  parameter schemas makes the answer a valid call (of that function).
- "auto" (the default when tools are given): the grammar lets the answer be either a valid
  call or prose that does not start with `{` or white space; so a call is always valid JSON, and the first
  character says which one it is.
- "none": the tools are not shown and the answer is prose.
One call per answer (`parallel_tool_calls` is accepted; a model answers with one call).
"""

from __future__ import annotations

import json
import re
import secrets

from sovpack.server import grammar
from sovpack.server.errors import ApiError

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_START = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
CALL_END = re.compile(r"\s*\}\s*$")  # the closing brace of the call object, after the arguments
PROSE_RULES = "root ::= tool-call | prose\nprose ::= [^{ \\t\\r\\n] .*"


def plan(tools: object, tool_choice: object) -> dict | None:
    """{"tools", "mode", "grammar"} as plain data for the Job, or None when no tool is in play."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise _invalid("tool_choice", "tool_choice needs tools: give the functions in tools")
        return None
    checked = _check_tools(tools)
    names = [t["function"]["name"] for t in checked]
    mode, allowed = _choice(tool_choice, names)
    if mode == "none":
        return None
    schema = {"anyOf": [_call_schema(t["function"]) for t in checked if t["function"]["name"] in allowed]}
    if mode == "auto":
        rules = grammar.from_schema(schema, "tools", rule="tool-call", prop_order=("name", "arguments"))
        text = PROSE_RULES + "\n" + rules
    else:
        text = grammar.from_schema(schema, "tools", prop_order=("name", "arguments"))
    return {"tools": checked, "mode": mode, "grammar": text}


def _check_tools(tools: object) -> list[dict]:
    if not isinstance(tools, list):
        raise _invalid("tools", "tools must be an array of {'type': 'function', 'function': {...}}")
    checked, seen = [], set()
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _invalid(at, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise _invalid(f"{at}.function.name", f"a function name is 1 to 64 letters, digits, _ or - (got {name!r})")
        if name in seen:
            raise _invalid(f"{at}.function.name", f"two tools are named {name!r}")
        seen.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise _invalid(f"{at}.function.description", "description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        grammar.from_schema(parameters, f"{at}.function.parameters")  # a 400 naming this tool's schema
        kept = {"name": name, "parameters": parameters}
        if function.get("description"):
            kept["description"] = function["description"]
        checked.append({"type": "function", "function": kept})
    return checked


def _choice(tool_choice: object, names: list[str]) -> tuple[str, list[str]]:
    if tool_choice is None:
        return "auto", names
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, names
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _invalid(
            "tool_choice", "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}"
        )
    if name not in names:
        raise _invalid("tool_choice.function.name", f"no tool is named {name!r} (tools: {', '.join(names)})")
    return "required", [name]


def _call_schema(function: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def instructions(tools: list[dict], mode: str) -> str:
    """The system text that shows the tools to a model whose chat template does not render them."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    when = "You must call one of them." if mode == "required" else "Call one only when it helps; otherwise answer normally."
    return (
        "You can call these functions:\n"
        f"{listing}\n"
        'To call one, answer with only a JSON object {"name": <function name>, "arguments": <arguments object>}. ' + when
    )


def as_text(tool_calls: list[dict]) -> str:
    """An assistant's earlier calls written the way this server asks the model to call (for templates without tool_calls)."""
    return "\n".join(
        json.dumps({"name": c["function"]["name"], "arguments": _arguments_value(c["function"]["arguments"])}, ensure_ascii=False)
        for c in tool_calls
    )


def for_template(tool_calls: list[dict]) -> list[dict]:
    """Calls as Hugging Face chat templates expect them: arguments as an object when they are JSON."""
    return [{**c, "function": {**c["function"], "arguments": _arguments_value(c["function"]["arguments"])}} for c in tool_calls]


def _arguments_value(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_call(text: str) -> tuple[str, str] | None:
    """(function name, arguments JSON text) when `text` is a call, else None."""
    start = CALL_START.match(text)
    if not start:
        return None
    return json.loads(f'"{start.group(1)}"'), CALL_END.sub("", text[start.end() :])


class CallStream:
    """Turns the streamed text of one answer into OpenAI deltas: content pieces, or one tool call
    (index, id, type and name in its first delta, then argument fragments)."""

    def __init__(self):
        self.text = ""
        self.is_call: bool | None = None  # None until the first visible character
        self.name: str | None = None
        self.args_start = 0
        self.sent = 0  # argument characters already sent

    def feed(self, piece: str) -> dict | None:
        """The delta for this piece of text (None: nothing to send yet)."""
        self.text += piece
        if self.is_call is None:
            if not self.text.strip():
                return None
            self.is_call = self.text.lstrip().startswith("{")
            if not self.is_call:
                return {"content": self.text}
        if not self.is_call:
            return {"content": piece} if piece else None
        return self._call_delta(final=False)

    def finish(self) -> dict | None:
        if self.is_call is None:
            return {"content": self.text} if self.text else None
        return self._call_delta(final=True) if self.is_call else None

    def _call_delta(self, final: bool) -> dict | None:
        first = None
        if self.name is None:
            start = CALL_START.match(self.text)
            if not start:
                return None
            self.name, self.args_start = json.loads(f'"{start.group(1)}"'), start.end()
            first = {"index": 0, "id": new_call_id(), "type": "function", "function": {"name": self.name, "arguments": ""}}
        arguments = self.text[self.args_start :]
        # hold back what may be the call object's closing brace until the answer ends
        ready = CALL_END.sub("", arguments) if final else arguments[: len(arguments) - len(_trailing_close(arguments))]
        fragment, self.sent = ready[self.sent :], max(self.sent, len(ready))
        if first:
            first["function"]["arguments"] = fragment
            return {"tool_calls": [first]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]} if fragment else None


def _trailing_close(text: str) -> str:
    match = re.search(r"\s*\}?\s*$", text)
    return match.group(0) if match else ""


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")
