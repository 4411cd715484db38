"""Chat messages as OpenAI clients send them, checked and brought to one plain shape for the chat template.

Accepted: roles system, developer (a system turn), user, assistant and tool; `content` as a
string or an array of text parts for every role (parts are joined with newlines), `null`
for an assistant message that carries `tool_calls`; `name`; `tool_call_id` on tool results.
Unknown fields that clients add (`refusal: null`, `audio: null`, ...) are ignored. Parts
that are not text (images, audio, files) are refused: the served models take text only.

Every refusal is an ApiError whose `param` is the field at fault, as a client names it
(`messages.2.content.0.type`).
"""

from __future__ import annotations

from sovpack.server.errors import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_PART_TYPES = {"text", "refusal"}  # an assistant's refusal part is text too


def normalize(messages: list) -> list[dict]:
    """Plain messages for the template: role, content (str or None), and name / tool_calls / tool_call_id when given."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages is required: give at least one message", param="messages", code="missing_messages")
    return [_message(m, f"messages.{i}") for i, m in enumerate(messages)]


def _message(message: object, at: str) -> dict:
    if not isinstance(message, dict):
        raise _invalid(f"{at}", f"each message must be an object with a role and content, got {_kind(message)}")
    role = message.get("role")
    if role == "function":
        raise _invalid(f"{at}.role", "the deprecated role 'function' is not supported; send tool results with role 'tool'")
    if role not in ROLES:
        raise _invalid(f"{at}.role", f"role must be one of {', '.join(ROLES)} (got {role!r})")
    plain: dict = {"role": "system" if role == "developer" else role}
    tool_calls = _tool_calls(message.get("tool_calls"), f"{at}.tool_calls") if role == "assistant" else None
    plain["content"] = _content(message.get("content"), f"{at}.content", may_be_null=role == "assistant")
    if message.get("name") is not None:
        plain["name"] = _string(message["name"], f"{at}.name")
    if tool_calls:
        plain["tool_calls"] = tool_calls
    if role == "tool":
        if message.get("tool_call_id") is None:
            raise _invalid(f"{at}.tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        plain["tool_call_id"] = _string(message["tool_call_id"], f"{at}.tool_call_id")
    if role == "assistant" and plain["content"] is None and not tool_calls:
        raise _invalid(f"{at}.content", "an assistant message needs content or tool_calls")
    return plain


def _content(content: object, at: str, *, may_be_null: bool) -> str | None:
    if content is None:
        if may_be_null:
            return None
        raise _invalid(at, "content is required for this role (a string or an array of text parts)")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(at, f"content must be a string or an array of content parts, got {_kind(content)}")
    return "\n".join(_text_part(part, f"{at}.{i}") for i, part in enumerate(content))


def _text_part(part: object, at: str) -> str:
    if not isinstance(part, dict):
        raise _invalid(at, f"a content part must be an object like {{'type': 'text', 'text': ...}}, got {_kind(part)}")
    kind = part.get("type")
    if kind not in TEXT_PART_TYPES:
        raise ApiError(
            400,
            f"{at}.type: content parts of type {kind!r} are not supported: the served model takes text parts only",
            param=f"{at}.type",
            code="unsupported_content_part",
        )
    return _string(part.get(kind), f"{at}.{kind}")


def _tool_calls(calls: object, at: str) -> list[dict] | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise _invalid(at, f"tool_calls must be an array, got {_kind(calls)}")
    plain = []
    for i, call in enumerate(calls):
        where = f"{at}.{i}"
        if not isinstance(call, dict):
            raise _invalid(where, f"a tool call must be an object, got {_kind(call)}")
        if call.get("type", "function") != "function":
            raise _invalid(f"{where}.type", f"only function tool calls are supported (got {call.get('type')!r})")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{where}.function", "a tool call needs a function object with name and arguments")
        plain.append(
            {
                "id": _string(call.get("id"), f"{where}.id"),
                "type": "function",
                "function": {
                    "name": _string(function.get("name"), f"{where}.function.name"),
                    "arguments": _string(function.get("arguments"), f"{where}.function.arguments"),
                },
            }
        )
    return plain


def _string(value: object, at: str) -> str:
    if not isinstance(value, str):
        raise _invalid(at, f"expected a string, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")
