"""Tool calls out of the model, constrained decoding, and agent loops that restore through calls.

Parsers are tested on replies written the way each model family writes them. On the real model
(SmolLM2 and its own ChatML template, which has no tool support, so tools are folded into the
prompt), and on the same weights with chat templates that render tools the way Qwen 2.5 (Hermes
``<tool_call>``), Llama 3.x (``"parameters"``, the ``ipython`` role) and Mistral Nemo
(``[TOOL_CALLS]``, 9-character ids) do: a required call is well formed and validates, equals
llama-cpp-python's own cold run under the same grammar, and a three-turn loop (call, run the
tool, send the result back) restores every previous prompt.

The three templates are short re-statements of those models' published templates, keeping what
decides the tokens of a tool-using conversation: where the tools go, how a call and its result
are rendered, the generation prompt.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from conftest import N_CTX
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from prefixcache import PrefixCache
from prefixcache.radix import common_prefix_length
from prefixcache.request import RequestError
from prefixcache.tools import (
    PARSERS,
    ReplyParser,
    call_grammar,
    get_parser,
    parser_for_template,
    response_grammar,
)

# --- templates -----------------------------------------------------------------------------------

HERMES_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user " }}
    {{- "query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and " }}
    {{- "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n" }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- set f = tool_call.function %}
            {{- '\\n<tool_call>\\n{"name": "' + f.name + '", "arguments": ' }}
            {{- f.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA3_TEMPLATE = """
{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" }}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument ' }}
    {{- 'name and its value}.Do not use variables.\\n\\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- elif 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
        {{- message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = """
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS]" + (tools | tojson) + "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.id is not defined or tool_call.id | length != 9 %}
                {{- raise_exception("Tool call IDs should be 9 letters and digits") }}
            {%- endif %}
            {{- '{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- endif %}
        {%- endfor %}
        {{- "]" + eos_token }}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS]{"content": ' + message.content | string + ', "call_id": "' }}
        {{- message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""

#: chat_template= for each parser (None: SmolLM2's own, which has no tool support).
TEMPLATES: dict[str, str | None] = {
    "json": None,
    "hermes": HERMES_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
}

STOCK = {
    "type": "function",
    "function": {
        "name": "stock_level",
        "description": "How many units of a product are in stock.",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 12}},
            "required": ["sku"],
        },
    },
}
ORDER = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order by its number and return its status.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "integer"}, "urgent": {"type": "boolean"}},
            "required": ["order_id"],
        },
    },
}
TOOLS = [STOCK, ORDER]
SYSTEM = {
    "role": "system",
    "content": (
        "You are the order assistant of Bolt & Board, a hardware store. Use the tools to answer "
        "questions about orders and stock. Keep answers to one sentence."
    ),
}


def conversation(parser: str, question: str) -> list[dict[str, Any]]:
    """The system prompt and a question; for Mistral's template the question alone, since it
    renders the system prompt into the last message only when that message is the user's."""
    user = {"role": "user", "content": question}
    if parser == "mistral":
        return [{**user, "content": f"{SYSTEM['content']}\n\n{question}"}]
    return [SYSTEM, user]


def run_tool(call: dict[str, Any]) -> str:
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "stock_level":
        return json.dumps({"sku": args["sku"], "units": 14})
    return json.dumps({"order_id": args["order_id"], "status": "shipped"})


def assert_valid(call: dict[str, Any], tools: list[dict[str, Any]] = TOOLS) -> None:
    """The call names a tool and its arguments are a JSON object that matches its schema."""
    (tool,) = [t for t in tools if t["function"]["name"] == call["function"]["name"]]
    args = json.loads(call["function"]["arguments"])
    schema = tool["function"]["parameters"]
    types = {"string": str, "integer": int, "boolean": bool}
    assert isinstance(args, dict)
    assert set(schema["required"]) <= set(args) <= set(schema["properties"])
    for key, value in args.items():
        prop = schema["properties"][key]
        assert isinstance(value, types[prop["type"]])
        assert len(str(value)) <= prop.get("maxLength", 16)
    assert call["id"] and call["type"] == "function"


def merge(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Deltas merged as the openai client merges them: content and arguments concatenated."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        content += delta.get("content") or ""
        for piece in delta.get("tool_calls") or []:
            call = calls.setdefault(
                piece["index"], {"id": "", "type": "", "function": {"name": "", "arguments": ""}}
            )
            call["id"] += piece.get("id") or ""
            call["type"] += piece.get("type") or ""
            call["function"]["name"] += piece.get("function", {}).get("name") or ""
            call["function"]["arguments"] += piece.get("function", {}).get("arguments") or ""
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)]}


def calls_of(message: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or []
    ]


# --- parsers on model-style replies (no model) -------------------------------------------------

STOCK_CALL = '{"name": "stock_level", "arguments": {"sku": "H-200"}}'
WEATHER = {"city": "Paris"}
PARSER_CASES = [
    # parser, reply, content, calls
    ("json", STOCK_CALL, None, [("stock_level", {"sku": "H-200"})]),
    (
        "json",
        '{"name": "a", "arguments": {"x": 1}}\n{"name": "b", "arguments": {}}',
        None,
        [("a", {"x": 1}), ("b", {})],
    ),
    ("json", '{"arguments": {"x": "}"}, "name": "late"}', None, [("late", {"x": "}"})]),
    ("json", 'We open at 8am. {"name": "x"}', 'We open at 8am. {"name": "x"}', []),
    ("json", '{"answer": 42}', '{"answer": 42}', []),
    ("json", '{"name": "cut"', '{"name": "cut"', []),
    # The next call cut off by max_tokens is dropped, not leaked into content.
    ("json", '{"name": "a", "arguments": {}}\n{"name": "lookup_orde', None, [("a", {})]),
    (
        "hermes",
        f"<tool_call>\n{STOCK_CALL}\n</tool_call>",
        None,
        [("stock_level", {"sku": "H-200"})],
    ),
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"q": "<tool_call>"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [("a", {"q": "<tool_call>"}), ("b", {})],
    ),
    ("hermes", "if a < b then <tool", "if a < b then <tool", []),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3",
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3",
        '<|python_tag|>brave_search.call(query="weather in Paris")',
        None,
        [("brave_search", {"query": "weather in Paris"})],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    ("llama3", "Paris is sunny today.", "Paris is sunny today.", []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "a", "arguments": {"x": [1, 2]}}, {"name": "b", "arguments": {}}]',
        None,
        [("a", {"x": [1, 2]}), ("b", {})],
    ),
    (
        "mistral",
        'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        "Sure.",
        [("get_weather", WEATHER)],
    ),
    ("mistral", "No calls [here], [TOOL", "No calls [here], [TOOL", []),
]


def replay(parser: str, reply: str, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Feed ``reply`` ``step`` characters at a time; the message and the deltas sent."""
    parsed = ReplyParser(get_parser(parser))
    deltas = []
    for at in range(0, len(reply), step):
        deltas += parsed.feed(reply[at : at + step])
    deltas += parsed.finish()
    return parsed.message(), deltas


@pytest.mark.parametrize(("parser", "reply", "content", "calls"), PARSER_CASES)
def test_parsers_read_calls_and_content_whole_and_streamed(parser, reply, content, calls):
    message, _ = replay(parser, reply, len(reply))
    assert message["content"] == content
    assert calls_of(message) == calls
    for step in (1, 3, 7):
        streamed_message, deltas = replay(parser, reply, step)
        merged = merge(deltas)
        assert (merged["content"] or None) == content
        assert calls_of(merged) == calls
        assert calls_of(streamed_message) == calls


def test_content_that_is_no_call_streams_as_it_comes_and_arguments_stream_too():
    parsed = ReplyParser(get_parser("hermes"))
    assert parsed.feed("Let me ") == [{"content": "Let me"}]
    assert parsed.feed("check. <tool") == [{"content": " check."}]  # "<tool" may open a call
    start, args = parsed.feed('_call>\n{"name": "stock_level", "arguments": {"sk')
    assert start["tool_calls"][0]["function"] == {"name": "stock_level", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"sk'}}]}
    (more,) = parsed.feed('u": "H')
    assert more == {"tool_calls": [{"index": 0, "function": {"arguments": 'u": "H'}}]}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_the_parser_is_chosen_from_the_chat_template(name, model_path):
    template = TEMPLATES[name]
    if template is None:
        llm = llama_cpp.Llama(str(model_path), n_ctx=256, verbose=False, vocab_only=True)
        template = llm.metadata["tokenizer.chat_template"]
        llm.close()
    native = "tools" in template
    assert parser_for_template(template, native).name == name
    assert get_parser(name).name == name


def test_an_unknown_parser_name_is_an_error_listing_the_known_ones():
    with pytest.raises(Exception, match="known parsers: hermes, json, llama3, mistral"):
        get_parser("xml")


def test_a_schema_the_converter_cannot_handle_still_gives_a_grammar_for_any_object():
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"$ref": "https://example.com/schema.json"}},
    }
    grammar = call_grammar(get_parser("json"), [tool])
    assert '"{\\"name\\": \\"f\\", \\"arguments\\": "' in grammar
    assert "object ::=" in grammar


# --- on the real model --------------------------------------------------------------------------


def cold_llm_for(model_path: Path, template: str | None) -> llama_cpp.Llama:
    """A fresh Llama (nothing cached) rendering with ``template`` (None: the model's own)."""
    if template is None:
        return llama_cpp.Llama(
            str(model_path), n_ctx=N_CTX, verbose=False, chat_format="chat_template.default"
        )
    llm = llama_cpp.Llama(str(model_path), n_ctx=N_CTX, verbose=False)
    eos = llm._model.token_get_text(llm.token_eos())
    bos = llm._model.token_get_text(llm.token_bos())
    llm.chat_handler = Jinja2ChatFormatter(
        template=template, eos_token=eos, bos_token=bos, stop_token_ids=[llm.token_eos()]
    ).to_chat_handler()
    return llm


def cold_text(
    cache: PrefixCache, model_path: Path, messages: list[dict[str, Any]], grammar: str, **kw: Any
) -> str:
    """llama-cpp-python's own greedy reply under ``grammar``, on a fresh Llama."""
    msgs, tools = cache.template.messages_for(messages, kw.pop("tools", None))
    llm = cold_llm_for(model_path, TEMPLATES[cache.tool_parser.name])
    try:
        out = llm.create_chat_completion(
            messages=msgs,  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            grammar=LlamaGrammar.from_string(grammar, verbose=False),
            temperature=0,
            **kw,
        )
    finally:
        llm.close()
    return str(out["choices"][0]["message"]["content"])


@pytest.mark.parametrize("parser", ["json", "hermes", "llama3", "mistral"])
def test_a_required_call_is_well_formed_equals_a_cold_run_with_its_grammar_and_restores(
    parser, open_cache, model_path
):
    cache = open_cache(chat_template=TEMPLATES[parser])
    assert cache.tool_parser.name == parser
    messages = conversation(parser, "How many H-200 hammers are in stock?")
    pinned = messages[0]["role"] == "system"
    if pinned:
        cache.pin(messages[:1], name="tools", tools=TOOLS)
    ask = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 64, "temperature": 0}
    reply = cache.chat(messages, parallel_tool_calls=False, **ask)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert_valid(call)
    assert (reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) == pinned

    grammar = call_grammar(cache.tool_parser, TOOLS, parallel=False)
    text = cold_text(cache, model_path, messages, grammar, tools=TOOLS, max_tokens=64)
    cold = ReplyParser(cache.tool_parser)
    cold.feed(text)
    cold.finish()
    assert calls_of(cold.message()) == calls_of(choice["message"])

    again = cache.chat(messages, parallel_tool_calls=False, **ask)
    assert calls_of(again["choices"][0]["message"]) == calls_of(choice["message"])
    assert (
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
        >= len(cache.template.tokens(messages, TOOLS)) - 2
    )


def test_a_named_tool_choice_forces_that_function_and_one_call(open_cache):
    cache = open_cache()
    messages = [SYSTEM, {"role": "user", "content": "How many H-200 hammers are in stock?"}]
    reply = cache.chat(
        messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "lookup_order"}},
        parallel_tool_calls=False,
        max_tokens=40,
        temperature=0,
    )
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup_order"
    assert_valid(call)
    with pytest.raises(RequestError, match="not in tools"):
        cache.chat(
            messages, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}}
        )


JSON_QUESTION = "Reply with a JSON object with keys open (true or false) and hours."


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_response_format_gives_json_equal_to_a_cold_run_with_the_same_grammar(
    kind, open_cache, model_path
):
    schema = {
        "type": "object",
        "properties": {"open": {"type": "boolean"}, "hours": {"type": "string", "maxLength": 24}},
        "required": ["open", "hours"],
    }
    fmt: dict[str, Any] = (
        {"type": "json_schema", "json_schema": {"name": "hours", "schema": schema}}
        if kind == "json_schema"
        else {"type": "json_object"}
    )
    cache = open_cache()
    messages = [SYSTEM, {"role": "user", "content": JSON_QUESTION}]
    cache.pin(messages[:1], name="system")
    reply = cache.chat(messages, response_format=fmt, max_tokens=64, temperature=0)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    text = reply["choices"][0]["message"]["content"]
    value = json.loads(text)
    assert isinstance(value, dict)
    if kind == "json_schema":
        assert isinstance(value["open"], bool) and isinstance(value["hours"], str)
    grammar = response_grammar(fmt)
    assert grammar is not None
    assert cold_text(cache, model_path, messages, grammar, max_tokens=64) == text


def test_streamed_tool_calls_add_up_to_the_reply_with_arguments_in_pieces(open_cache):
    cache = open_cache()
    messages = [SYSTEM, {"role": "user", "content": "Where is order 1042?"}]
    ask = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    whole = cache.chat(messages, max_tokens=40, temperature=0, **ask)
    chunks = list(
        cache.chat(
            messages,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **ask,
        )
    )
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant"}
    first = next(d for d in deltas if d.get("tool_calls"))["tool_calls"][0]
    assert first["index"] == 0 and first["id"] and first["type"] == "function"
    assert (
        first["function"]["name"]
        == whole["choices"][0]["message"]["tool_calls"][0]["function"]["name"]
    )
    pieces = [d for d in deltas if d.get("tool_calls") and "id" not in d["tool_calls"][0]]
    assert len(pieces) > 2  # arguments stream as they are generated
    assert calls_of(merge(deltas)) == calls_of(whole["choices"][0]["message"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_reply_that_is_no_call_streams_in_pieces_and_equals_the_cold_reply(
    open_cache, cold_reply: Callable[..., str]
):
    cache = open_cache()
    messages = [SYSTEM, {"role": "user", "content": "Do you cut timber to size?"}]
    chunks = list(cache.chat(messages, tools=TOOLS, max_tokens=24, temperature=0, stream=True))
    texts = [c["choices"][0]["delta"].get("content") for c in chunks]
    texts = [t for t in texts if t]
    folded, _ = cache.template.messages_for(messages, TOOLS)
    expected = cold_reply(folded, max_tokens=24)
    assert not expected.lstrip().startswith("{")
    assert len(texts) > 3
    assert "".join(texts) == expected
    whole = cache.chat(messages, tools=TOOLS, max_tokens=24, temperature=0)
    assert whole["choices"][0]["message"]["content"] == expected
    assert "tool_calls" not in whole["choices"][0]["message"]


#: Where the last token of a turn's prompt (its generation prompt) and the first token of the
#: call after it are re-tokenized as one when the next turn renders the call: with SmolLM2's
#: vocabulary, Llama 3's ``"\n\n"`` before ``{"`` becomes two ``"\n"`` and Mistral's ``]`` before
#: ``[TOOL_CALLS]`` becomes ``][``. (With those models' own tokenizers the markers around are
#: special tokens and no such merge happens.) A cold run tokenizes the same way, so the best any
#: cache can restore is the shared prefix: the previous prompt less that one token.
BOUNDARY_MERGE = {"json": 0, "hermes": 0, "llama3": 1, "mistral": 1}


@pytest.mark.parametrize("parser", ["json", "hermes", "llama3", "mistral"])
def test_an_agent_loop_restores_each_previous_prompt_through_the_tool_calls(parser, open_cache):
    """Three turns: the model calls a tool, the test runs it and sends the result, twice, and
    the model answers; each turn restores all of the previous turn's prompt that it shares."""
    cache = open_cache(chat_template=TEMPLATES[parser])
    messages = conversation(parser, "Is order 1042 shipped, and are H-200 hammers in stock?")
    pinned = messages[0]["role"] == "system"
    if pinned:
        cache.pin(messages[:1], name="agent", tools=TOOLS)
    turns = []
    for choice in ("required", "required", "none"):
        reply = cache.chat(
            messages,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            max_tokens=64 if choice == "required" else 16,
            temperature=0,
        )
        turns.append((reply["usage"], cache.template.tokens(messages, TOOLS)))
        message = reply["choices"][0]["message"]
        if choice == "none":
            assert "tool_calls" not in message
            break
        (call,) = message["tool_calls"]
        assert_valid(call)
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": run_tool(call)})
    assert (turns[0][0]["prompt_tokens_details"]["cached_tokens"] > 0) == pinned
    for (before, tokens), (after, next_tokens) in itertools.pairwise(turns):
        assert before["prompt_tokens"] == len(tokens)
        shared = common_prefix_length(tokens, next_tokens)
        assert shared == len(tokens) - BOUNDARY_MERGE[parser]
        assert after["prompt_tokens_details"]["cached_tokens"] >= shared
