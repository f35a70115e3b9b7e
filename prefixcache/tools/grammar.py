"""GBNF grammars that force a tool call, or a JSON reply, through llama.cpp's grammar sampler.

``tool_choice="required"`` or a named function, and ``response_format`` ``json_object`` /
``json_schema``, are not requests the model may ignore: sampling is constrained so that the reply
is a well-formed call in the parser's format whose arguments match the function's JSON schema
(converted by llama-cpp-python's own ``SchemaConverter``, the code behind
``LlamaGrammar.from_json_schema``), or JSON matching the schema.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, PRIMITIVE_RULES, SchemaConverter, json_schema_to_gbnf

from ..errors import PrefixCacheError
from .parsers import ToolParser

log = logging.getLogger(__name__)

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


#: The converter's JSON string character lets control characters through (raw newlines, which
#: JSON forbids in strings); llama.cpp's own converter excludes them, and so do we.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _strict_strings(grammar: str) -> str:
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def _converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _args_rule(conv: SchemaConverter, schema: Mapping[str, Any] | None, rule: str) -> str:
    """Add the rules for arguments matching ``schema`` to ``conv``; the name of the top rule.

    A schema the converter cannot handle (a remote ``$ref``, say) is tried on a scratch converter
    first, so that it leaves no dangling rules; such arguments are then any JSON object.
    """
    schema = dict(schema) if schema else _ANY_OBJECT
    try:
        _converter().visit(_converter().resolve_refs(copy.deepcopy(schema), rule), rule)
    except Exception as exc:  # the converter raises bare Exceptions and asserts
        log.warning(
            "tool arguments schema %s cannot be turned into a grammar (%s); any JSON object "
            "will be accepted",
            rule,
            exc,
        )
        return conv._add_primitive("object", PRIMITIVE_RULES["object"])
    return conv.visit(conv.resolve_refs(copy.deepcopy(schema), rule), rule)


def call_grammar(
    parser: ToolParser,
    tools: Sequence[Mapping[str, Any]],
    *,
    name: str | None = None,
    parallel: bool = True,
) -> str:
    """GBNF for a reply made of calls (only of ``name``, if given) in ``parser``'s format.

    With ``parallel`` false, or a format that carries one call per reply, exactly one call.
    """
    conv = _converter()
    calls = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        args = _args_rule(conv, function.get("parameters"), f"call{i}-args")
        calls.append(conv._add_rule(f"call{i}", parser.call_rule(function["name"], args)))
    if not calls:
        raise PrefixCacheError(f"no tool named {name!r} to force a call of")
    call = calls[0] if len(calls) == 1 else conv._add_rule("tool-call", " | ".join(calls))
    conv._add_rule("root", parser.root_rule(call, parallel))
    return _strict_strings(str(conv.format_grammar()))


def response_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """GBNF for ``response_format`` (None for plain text).

    ``json_object`` gets the same grammar as in llama-cpp-python's own chat handler (any JSON
    object; or its ``schema`` extension), ``json_schema`` its ``json_schema.schema``.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        schema = response_format.get("schema")
    elif kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    else:
        return None
    if not schema:
        return JSON_GBNF
    return _strict_strings(str(json_schema_to_gbnf(json.dumps(schema))))


__all__ = ["call_grammar", "response_grammar"]
