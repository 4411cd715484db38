"""Grammars that constrain generation: built from JSON schemas, or sent by the client, and checked before use.

llama-cpp-python hands a grammar to llama.cpp without looking at the answer: a grammar that
llama.cpp's parser rejects (a syntax error, an undefined rule, left recursion) makes it add
a null sampler, and the process dies with a segmentation fault. So every grammar, the
client's and sovpack's own, is checked first:

- in the request handler, with no model (`check_shape`): a size limit (client grammars) and
  a nesting limit, so that llama.cpp's recursive parser cannot be driven into a stack overflow;
- on the model, before generation (`check_on_model`): llama.cpp's own parser builds the
  grammar once; a refusal (with llama.cpp's reason, captured from its log) is a 400.

JSON schemas are checked against their JSON Schema meta-schema (the `jsonschema` package),
then turned into GBNF by llama-cpp-python's SchemaConverter; what it cannot handle is a 400.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading

from sovpack.server.errors import BadRequest

MAX_GRAMMAR_CHARS = 65_536
MAX_NESTING = 64  # parentheses inside parentheses


class GrammarError(BadRequest):
    """A grammar or schema that cannot be used; `param` names the request field it came from."""


def _error(param: str, message: str) -> GrammarError:
    return GrammarError(f"{param}: {message}", param, "invalid_grammar")


def from_schema(schema: object, param: str, *, rule: str = "", prop_order: tuple[str, ...] = ()) -> str:
    """GBNF text for a JSON schema, its top rule named `rule` ("": root), or GrammarError naming `param`."""
    import jsonschema
    from llama_cpp.llama_grammar import SchemaConverter

    if not isinstance(schema, dict):
        raise _error(param, f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise _error(param, f"not a valid JSON schema{f' at {where}' if where else ''}: {e.message}") from None
    converter = SchemaConverter(
        prop_order={name: i for i, name in enumerate(prop_order)}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "request"), rule)
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
        raise _error(param, f"this server cannot turn the schema into a grammar: {e}") from None
    return converter.format_grammar()


def check_shape(text: str, param: str, *, max_chars: int | None = MAX_GRAMMAR_CHARS) -> None:
    """Limits that keep llama.cpp's recursive-descent parser on safe ground (the size: for a client's grammar)."""
    if max_chars is not None and len(text) > max_chars:
        raise _error(param, f"the grammar is {len(text)} characters long; this server accepts at most {MAX_GRAMMAR_CHARS}")
    if "\x00" in text:
        raise _error(param, "the grammar contains a NUL character")
    depth = _deepest_nesting(text)
    if depth > MAX_NESTING:
        raise _error(param, f"the grammar nests parentheses {depth} deep; this server accepts at most {MAX_NESTING}")


def _deepest_nesting(text: str) -> int:
    """The deepest ( ... ) nesting outside "literals", [classes] and # comments."""
    depth = deepest = 0
    i, closing = 0, None
    while i < len(text):
        c = text[i]
        if closing:  # inside a literal or a class: skip escapes, stop at the closing quote or bracket
            if c == "\\":
                i += 1
            elif c == closing:
                closing = None
        elif c in '"[':
            closing = '"' if c == '"' else "]"
        elif c == "#":
            while i < len(text) and text[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def check_on_model(llama, text: str, param: str) -> None:
    """llama.cpp's own parser must accept the grammar (with the model's vocabulary, for <token> syntax)."""
    import llama_cpp

    check_shape(text, param, max_chars=None)  # schema and tool grammars grow with the schema; the body limit bounds them
    with _llama_log_captured() as lines:
        sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, text.encode("utf-8"), b"root")
    if not sampler:
        reason = " ".join(line.strip() for line in lines if line.strip()) or "failed to parse grammar"
        if reason.startswith("failed to parse"):  # the parser's own reason goes to stderr, not to the log
            reason += " (a syntax error, an undefined rule name, or a repetition beyond 2000; see llama.cpp's GBNF guide)"
        raise _error(param, f"llama.cpp's grammar parser rejected the grammar: {reason}")
    llama_cpp.llama_sampler_free(sampler)


# llama.cpp reports why it rejects a grammar only through its log callback: while a check
# runs, this thread's log lines are collected; everything else goes to llama-cpp-python's
# own callback as before.

_capture = threading.local()
_installed = None
_install_lock = threading.Lock()


@contextlib.contextmanager
def _llama_log_captured():
    _install_log_callback()
    _capture.lines = lines = []
    try:
        yield lines
    finally:
        _capture.lines = None


def _install_log_callback() -> None:
    global _installed
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data):
        lines = getattr(_capture, "lines", None)
        if lines is not None:
            lines.append(text.decode("utf-8", errors="replace"))
        else:
            _logger.llama_log_callback(level, text, user_data)

    with _install_lock:
        if _installed is None:
            _installed = callback  # kept referenced: llama.cpp holds a raw pointer to it
            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
