"""Tool calls: the formats models write them in, parsing replies, and forcing calls by grammar.

- :mod:`.parsers`: one :class:`ToolParser` per format (Hermes/Qwen, Llama 3.x, Mistral, and the
  JSON objects prefixcache asks for from templates without tool support), chosen from the chat
  template by :func:`parser_for_template` or by name with :func:`get_parser`.
- :mod:`.reply`: a reply's text, whole or as it streams, into OpenAI ``content`` + ``tool_calls``.
- :mod:`.grammar`: GBNF for ``tool_choice="required"``/a named function and ``response_format``.
- :mod:`.scan`: the JSON scanning the parsers share.
"""

from .grammar import call_grammar, response_grammar
from .parsers import (
    PARSERS,
    FoldedParser,
    HermesParser,
    Llama3Parser,
    MistralParser,
    ToolParser,
    get_parser,
    parser_for_template,
)
from .reply import ChunkParser, ReplyParser, finish_reason, parse_completion

__all__ = [
    "PARSERS",
    "ChunkParser",
    "FoldedParser",
    "HermesParser",
    "Llama3Parser",
    "MistralParser",
    "ReplyParser",
    "ToolParser",
    "call_grammar",
    "finish_reason",
    "get_parser",
    "parse_completion",
    "parser_for_template",
    "response_grammar",
]
