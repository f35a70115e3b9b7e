"""The tool-call formats models are trained on, and how to tell which one a chat template uses.

A parser reads the text a model generated and separates content from tool calls (see
:class:`~prefixcache.tools.scan.Scan`); it also gives the GBNF that forces a well-formed call in
its format, for ``tool_choice="required"`` or a named function (see :mod:`.grammar`). The formats
follow llama.cpp's ``common/chat.cpp``: the parser is chosen from markers in the template source,
as llama.cpp does, and can be named instead (``tool_parser=`` on ``PrefixCache.open``/``chat``).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
import uuid
from typing import ClassVar

from ..errors import PrefixCacheError
from .scan import (
    WHITESPACE,
    ObjectScan,
    PartialCall,
    Scan,
    held_suffix,
    json_end,
    scan_object,
    skip,
)


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


class ToolParser:
    """One tool-call format: how to find calls in a reply, and the grammar of a call."""

    #: The name ``tool_parser=`` takes.
    name: ClassVar[str] = ""
    #: The keys a call's arguments may be under (the first is what the grammar writes).
    arg_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")
    #: Whether the format can carry several calls in one reply.
    parallel: ClassVar[bool] = True

    @classmethod
    def detect(cls, template: str, native_tools: bool) -> bool:
        """Whether a chat template (its Jinja source) renders tool calls in this format."""
        return False

    def scan(self, text: str, final: bool) -> Scan:
        """Split ``text`` (the reply so far; all of it when ``final``) into content and calls."""
        raise NotImplementedError

    def new_id(self) -> str:
        """An id for a call the model made (OpenAI's ``tool_calls[].id``)."""
        return "call_" + uuid.uuid4().hex[:24]

    # grammar ----------------------------------------------------------------------------------

    def call_rule(self, name: str, args_rule: str) -> str:
        """GBNF for one call of ``name`` whose arguments match the rule ``args_rule``."""
        head = '{"name": ' + json.dumps(name) + ', "' + self.arg_keys[0] + '": '
        return f"{gbnf_literal(head)} {args_rule} {gbnf_literal('}')}"

    def root_rule(self, call: str, parallel: bool) -> str:
        """GBNF for a whole reply of calls (each one ``call``)."""
        if parallel and self.parallel:
            return f'{call} ("\\n" {call})*'
        return call


def _scan_json_calls(
    parser: ToolParser, text: str, pos: int, final: bool, out: Scan, separators: str = ""
) -> Scan:
    """Calls written as bare JSON objects from ``pos`` on; anything else ends them as content."""
    while True:
        j = skip(text, pos, WHITESPACE + (separators if out.calls else ""))
        if j >= len(text):
            if final and not out.calls:
                out.content += text[pos:]
            return out
        if text[j] != "{":
            out.content += text[j:] if out.calls else text[pos:]
            return out
        verdict, call, end = scan_object(text, j, final, parser.arg_keys)
        if verdict is ObjectScan.HOLD:
            return out
        if verdict is ObjectScan.TEXT:
            if out.calls and json_end(text, j) is None:
                # An object left open after calls is the next call cut off (max_tokens), not
                # text: it goes, rather than leaking half a call into ``content``.
                return out
            out.content += text[j:] if out.calls else text[pos:]
            return out
        assert call is not None
        out.calls.append(call)
        if verdict is ObjectScan.OPEN:
            return out
        pos = end


class FoldedParser(ToolParser):
    """``{"name": ..., "arguments": {...}}`` objects, one a line, as the whole reply.

    The format prefixcache asks for when a template has no tool support of its own (SmolLM2's
    ChatML): the tool schemas are folded into a system message and earlier calls are rendered
    as these objects (see ``ChatTemplate.messages_for``).
    """

    name = "json"

    @classmethod
    def detect(cls, template: str, native_tools: bool) -> bool:
        return not native_tools

    def scan(self, text: str, final: bool) -> Scan:
        return _scan_json_calls(self, text, 0, final, Scan())


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: Hermes 2/3 Pro, Qwen 2.5/3.

    Content may come before (and after) the calls; it streams, except for a possible start of
    ``<tool_call>`` at its end, held until the next token says what it is.
    """

    name = "hermes"
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    @classmethod
    def detect(cls, template: str, native_tools: bool) -> bool:
        return cls.OPEN in template

    def call_rule(self, name: str, args_rule: str) -> str:
        head = gbnf_literal(self.OPEN + '\n{"name": ' + json.dumps(name) + ', "arguments": ')
        tail = gbnf_literal("}\n" + self.CLOSE)
        return f"{head} {args_rule} {tail}"

    def scan(self, text: str, final: bool) -> Scan:
        out = Scan()
        pos = 0
        while True:
            if out.calls:
                pos = skip(text, pos)
            at = text.find(self.OPEN, pos)
            if at < 0:
                tail = text[pos:]
                hold = 0 if final else held_suffix(tail, self.OPEN)
                out.content += tail[: len(tail) - hold]
                return out
            out.content += text[pos:at]
            j = skip(text, at + len(self.OPEN))
            if j >= len(text):
                if final:
                    out.content += text[at:]
                return out
            if text[j] != "{":
                out.content += text[at:j]
                pos = j
                continue
            verdict, call, end = scan_object(text, j, final, self.arg_keys)
            if verdict is ObjectScan.HOLD:
                return out
            if verdict is ObjectScan.TEXT:
                out.content += text[at:j]
                pos = j
                continue
            assert call is not None
            out.calls.append(call)
            if verdict is ObjectScan.OPEN:
                return out
            e = skip(text, end)
            if text.startswith(self.CLOSE, e):
                pos = e + len(self.CLOSE)
            elif not final and self.CLOSE.startswith(text[e:]):
                return out  # the closing tag is still being generated
            else:
                pos = e


class Llama3Parser(ToolParser):
    """Llama 3.1/3.2/3.3: ``{"name": ..., "parameters": {...}}`` as the reply, or a built-in
    tool as ``<|python_tag|>name.call(key="value")``. One call per reply (the templates refuse
    more)."""

    name = "llama3"
    arg_keys = ("parameters", "arguments")
    parallel = False
    PYTHON_TAG = "<|python_tag|>"
    _BUILTIN = re.compile(r"\s*([A-Za-z_][\w]*)\s*\.\s*call\((.*)\)\s*", re.S)

    @classmethod
    def detect(cls, template: str, native_tools: bool) -> bool:
        return "<|start_header_id|>ipython<|end_header_id|>" in template or (
            cls.PYTHON_TAG in template and "<|start_header_id|>" in template
        )

    def scan(self, text: str, final: bool) -> Scan:
        j = skip(text, 0)
        rest = text[j:]
        if not final and rest and self.PYTHON_TAG.startswith(rest):
            return Scan()
        if not rest.startswith(self.PYTHON_TAG):
            return _scan_json_calls(self, text, 0, final, Scan(), separators=";")
        j = skip(text, j + len(self.PYTHON_TAG))
        if j < len(text) and text[j] == "{":
            return _scan_json_calls(self, text, j, final, Scan(), separators=";")
        if not final:
            return Scan()
        call = self._builtin(text[j:])
        if call is None:
            return Scan(content=text)
        return Scan(calls=[call])

    def _builtin(self, text: str) -> PartialCall | None:
        m = self._BUILTIN.fullmatch(text)
        if m is None:
            return None
        try:
            node = ast.parse(f"f({m[2]})", mode="eval").body
            assert isinstance(node, ast.Call) and not node.args
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except (SyntaxError, ValueError, AssertionError):
            return None
        return PartialCall(m[1], json.dumps(args, ensure_ascii=False), True)


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abc123XYZ"}, ...]``, or
    the newer ``[TOOL_CALLS]name[ARGS]{...}``. Content before ``[TOOL_CALLS]`` streams."""

    name = "mistral"
    arg_keys = ("arguments",)
    MARK = "[TOOL_CALLS]"
    _NAMED = re.compile(r"([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]")

    @classmethod
    def detect(cls, template: str, native_tools: bool) -> bool:
        return cls.MARK in template

    def new_id(self) -> str:
        # Mistral's templates refuse ids that are not 9 letters and digits.
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))

    def call_rule(self, name: str, args_rule: str) -> str:
        head = gbnf_literal('{"name": ' + json.dumps(name) + ', "arguments": ')
        id_key = gbnf_literal(', "id": "')
        tail = gbnf_literal('"}')
        return f"{head} {args_rule} {id_key} [a-zA-Z0-9]{{9}} {tail}"

    def root_rule(self, call: str, parallel: bool) -> str:
        more = f' ("," " " {call})*' if parallel else ""
        return f'{gbnf_literal(self.MARK + "[")} {call}{more} "]"'

    def scan(self, text: str, final: bool) -> Scan:
        out = Scan()
        at = text.find(self.MARK)
        if at < 0:
            hold = 0 if final else held_suffix(text, self.MARK)
            out.content = text[: len(text) - hold]
            return out
        out.content = text[:at]
        j = skip(text, at + len(self.MARK))
        if j >= len(text):
            return out
        if text[j] == "[":
            return self._array(text, j + 1, final, out)
        return self._named(text, j, final, out)

    def _array(self, text: str, i: int, final: bool, out: Scan) -> Scan:
        while True:
            i = skip(text, i, WHITESPACE + ",")
            if i >= len(text) or text[i] == "]":
                if i < len(text):
                    out.content += text[skip(text, i + 1) :]
                return out
            if text[i] != "{":
                out.content += text[i:]
                return out
            verdict, call, end = scan_object(text, i, final, self.arg_keys)
            if verdict is ObjectScan.HOLD:
                return out
            if verdict is ObjectScan.TEXT:
                out.content += text[i:]
                return out
            assert call is not None
            out.calls.append(call)
            if verdict is ObjectScan.OPEN:
                return out
            i = end

    def _named(self, text: str, j: int, final: bool, out: Scan) -> Scan:
        while j < len(text):
            m = self._NAMED.match(text, j)
            if m is None:
                if not final and _named_partial(text[j:]):
                    return out
                out.content += text[j:]
                return out
            a = skip(text, m.end())
            if a >= len(text):
                return out
            if text[a] != "{":
                out.content += text[j:]
                return out
            end = json_end(text, a)
            out.calls.append(PartialCall(m[1], text[a : end or len(text)], end is not None))
            if end is None:
                return out
            j = skip(text, end)
            if text.startswith(self.MARK, j):
                j = skip(text, j + len(self.MARK))
        return out


def _named_partial(rest: str) -> bool:
    """Whether ``rest`` could still become ``name[ARGS]`` or ``name[CALL_ID]id[ARGS]``."""
    tail = rest[re.match(r"[A-Za-z0-9_.\-]*", rest).end() :]  # type: ignore[union-attr]
    if not tail or "[ARGS]".startswith(tail) or "[CALL_ID]".startswith(tail):
        return True
    if not tail.startswith("[CALL_ID]"):
        return False
    tail = tail[len("[CALL_ID]") :]
    tail = tail[re.match(r"[A-Za-z0-9]*", tail).end() :]  # type: ignore[union-attr]
    return "[ARGS]".startswith(tail)


#: The parsers by name, in the order they are tried on a template (the first that matches).
PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3Parser, MistralParser, FoldedParser)
}


def get_parser(parser: str | ToolParser) -> ToolParser:
    """A parser by name (or the parser itself); raises PrefixCacheError naming the known ones."""
    if isinstance(parser, ToolParser):
        return parser
    cls = PARSERS.get(parser)
    if cls is None:
        raise PrefixCacheError(
            f"unknown tool parser {parser!r}; known parsers: {', '.join(sorted(PARSERS))}"
        )
    return cls()


def parser_for_template(template: str, native_tools: bool) -> ToolParser:
    """The parser for the tool calls a chat template (its Jinja source) renders.

    Templates with tool support of their own but no known format fall back to the JSON objects
    prefixcache folds in for templates without tool support.
    """
    for cls in PARSERS.values():
        if cls.detect(template, native_tools):
            return cls()
    return FoldedParser()


__all__ = [
    "PARSERS",
    "FoldedParser",
    "HermesParser",
    "Llama3Parser",
    "MistralParser",
    "ToolParser",
    "gbnf_literal",
    "get_parser",
    "parser_for_template",
]
