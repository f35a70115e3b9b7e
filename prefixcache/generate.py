"""Generation: OpenAI-shaped chat and text completions that start from the longest stored prefix.

Each call restores what the store holds of its prompt (:meth:`PrefixCache._prepare`), lets
llama-cpp-python evaluate the rest and generate, reports ``cached_tokens`` in ``usage``, and
autosaves the prompt. Chat calls go through :mod:`prefixcache.request` first (what OpenAI clients
send, checked once), get a grammar when a call or a JSON reply is required
(:mod:`prefixcache.tools.grammar`), and have the tool calls in their reply parsed into
``tool_calls`` (:mod:`prefixcache.tools.reply`), streamed or not. A chat's reply is then handed
to :mod:`prefixcache.ahead`, which prefills the next turn's prefix while the model is idle.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_cpp.llama_grammar import LlamaGrammar

from .errors import PromptTooLongError
from .request import ChatCall, RequestError, normalise_chat
from .stream import ModelLock, Stream
from .template import Message
from .tools import ChunkParser, ToolParser, call_grammar, get_parser, parse_completion
from .tools import response_grammar as _response_grammar

if TYPE_CHECKING:
    from .cache import PrefixCache, Prepared, Tools

#: ``start()`` of a call: the prompt's tokens, and the function that runs the llama-cpp-python
#: call with the keyword arguments.
Start = Callable[[], tuple[list[int], Callable[..., Any]]]
#: ``follow(namespace, save, prepared, reply)``: run under the model lock once a call's reply
#: (an assistant message) is complete.
Follow = Callable[[str, bool, "Prepared", dict[str, Any]], None]
#: ``cut(prompt tokens)``: where a chat prompt's last message begins, or None.
Cut = Callable[[list[int]], "int | None"]


@dataclass
class _Restore:
    prepared: Prepared | None = None


class CallStream(Stream):
    """The chunks of a streaming call, and how its prompt was restored.

    ``prepared`` (cached tokens, and where the prompt left a stored prefix) is set before the
    first chunk is handed over, so a reader that has a chunk may read it (the server's
    ``x-prefixcache-diverged`` header); None before then, or when the call failed first.
    """

    def __init__(
        self,
        body: Callable[[threading.Event], Iterator[dict[str, Any]]],
        lock: ModelLock,
        restore: _Restore,
    ):
        # The producer writes to ``restore``, never to the stream: a dropped stream stays
        # collectable (see Stream).
        self._restore = restore
        super().__init__(body, lock)

    @property
    def prepared(self) -> Prepared | None:
        return self._restore.prepared


def grammar_for(call: ChatCall, parser: ToolParser) -> str | None:
    """The GBNF a chat call is constrained by, if any.

    ``tool_choice`` required or named gives calls in ``parser``'s format (one call unless
    ``parallel_tool_calls``); otherwise ``response_format`` json_object/json_schema gives JSON.
    """
    if call.tools and call.tool_choice.forced:
        return call_grammar(
            parser, call.tools, name=call.tool_choice.name, parallel=call.parallel_tool_calls
        )
    try:
        return _response_grammar(call.response_format)
    except Exception as exc:  # the schema converter raises bare Exceptions
        raise RequestError(
            f"response_format: the JSON schema cannot be turned into a grammar: {exc}",
            "response_format",
        ) from exc


def chat(
    cache: PrefixCache,
    messages: Sequence[Message],
    *,
    tools: Tools,
    stream: bool,
    namespace: str | None,
    autosave: bool | None,
    tool_parser: str | ToolParser | None,
    kwargs: dict[str, Any],
    prefill_replies: bool = True,
) -> Any:
    """See :meth:`PrefixCache.chat`."""
    call = normalise_chat(messages, tools, **kwargs)
    parser = get_parser(tool_parser) if tool_parser is not None else cache.tool_parser
    options = dict(call.options)
    grammar = grammar_for(call, parser)
    if grammar is not None:
        if options.get("grammar") is not None:
            raise RequestError(
                "grammar cannot be combined with a required tool call or a response_format",
                "grammar",
            )
        options["grammar"] = LlamaGrammar.from_string(grammar, verbose=False)
    parse = parser if call.tools and call.tool_choice.mode != "none" else None

    def start() -> tuple[list[int], Callable[..., Any]]:
        msgs, tool_arg = cache.template.messages_for(call.messages, call.tools)
        tokens = cache.template.tokens(call.messages, call.tools)

        def run(**kw: Any) -> Any:
            return cache.template.complete(cache.llm, messages=msgs, tools=tool_arg, **kw)

        return tokens, run

    def follow(ns: str, save: bool, prepared: Prepared, reply: dict[str, Any]) -> None:
        cache.ahead.schedule(call.messages, reply, call.tools, ns, prepared.tokens, save=save)

    def cut(tokens: list[int]) -> int | None:
        return cache.template.turn_start(call.messages, call.tools, tokens)

    return generate(
        cache,
        start,
        "chat.completion.chunk",
        stream,
        namespace,
        autosave,
        options,
        parse,
        follow if prefill_replies else None,
        cut,
    )


def complete(
    cache: PrefixCache,
    prompt: str | Sequence[int],
    *,
    stream: bool,
    namespace: str | None,
    autosave: bool | None,
    kwargs: dict[str, Any],
) -> Any:
    """See :meth:`PrefixCache.complete`."""

    def start() -> tuple[list[int], Callable[..., Any]]:
        tokens = cache.tokenize_prompt(prompt)

        def run(**kw: Any) -> Any:
            return cache.llm.create_completion(tokens, **kw)

        return tokens, run

    return generate(cache, start, "text_completion", stream, namespace, autosave, kwargs)


def generate(
    cache: PrefixCache,
    start: Start,
    chunk_object: str,
    stream: bool,
    namespace: str | None,
    autosave: bool | None,
    kwargs: dict[str, Any],
    parser: ToolParser | None = None,
    follow: Follow | None = None,
    cut: Cut | None = None,
) -> Any:
    """Run one call: restore, let llama-cpp-python evaluate the suffix and generate, autosave.

    ``start()`` is called under the model lock. With a ``parser`` the reply's tool calls are
    moved into ``tool_calls`` (``delta.tool_calls`` when streaming). ``follow`` is given the
    reply of a chat call that ran to its end. ``cut`` gives where the prompt's last message
    begins, for autosave to end a segment there.
    """
    ns = cache.namespace if namespace is None else namespace
    save = cache.autosave if autosave is None else autosave
    stream_options = kwargs.pop("stream_options", None) or {}
    if stream:
        include_usage = bool(stream_options.get("include_usage"))
        restore = _Restore()

        def body(cancel: threading.Event) -> Iterator[dict[str, Any]]:
            return _stream_chunks(
                cache,
                start,
                chunk_object,
                ns,
                save,
                kwargs,
                include_usage,
                cancel,
                parser,
                restore,
                follow,
                cut,
            )

        return CallStream(body, cache._lock, restore)
    with cache._lock:
        tokens, call = start()
        prepared = _prepare_call(cache, tokens, ns, kwargs)
        t0 = time.perf_counter()
        result = call(**kwargs)
        usage = result.setdefault("usage", {})
        usage["prompt_tokens_details"] = {"cached_tokens": prepared.reused_tokens}
        _after_call(cache, prepared, time.perf_counter() - t0, usage.get("completion_tokens", 0))
        if save:
            cache._autosave(ns, prepared, None if cut is None else functools.partial(cut, tokens))
        if parser is not None:
            result = parse_completion(result, parser)
        if follow is not None:
            follow(ns, save, prepared, result["choices"][0]["message"])
        return result


def _prepare_call(
    cache: PrefixCache, tokens: list[int], ns: str, kwargs: dict[str, Any]
) -> Prepared:
    max_tokens = kwargs.get("max_tokens")
    extra = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 1
    if len(tokens) + extra > cache.kv.n_ctx:
        raise PromptTooLongError(len(tokens) + extra, cache.kv.n_ctx, "prompt plus max_tokens")
    prepared = cache._prepare(tokens, ns, extra)
    cache._count(prepared)
    cache.ahead.started(ns, prepared)
    return prepared


def _after_call(
    cache: PrefixCache, prepared: Prepared, elapsed: float, completion_tokens: int
) -> None:
    cache._record_hits()  # kept off the way to the first token
    # The call's time is mostly prefill of the suffix plus decoding; attribute by tokens.
    prefilled = prepared.prompt_tokens - prepared.reused_tokens
    if completion_tokens == 0 and prefilled:
        cache._note_prefill(prefilled, elapsed)
    else:
        cache._stats.prefill_tokens += prefilled


def _stream_chunks(
    cache: PrefixCache,
    start: Start,
    chunk_object: str,
    ns: str,
    save: bool,
    kwargs: dict[str, Any],
    include_usage: bool,
    cancel: threading.Event,
    parser: ToolParser | None,
    restore: _Restore,
    follow: Follow | None = None,
    cut: Cut | None = None,
) -> Iterator[dict[str, Any]]:
    """The body of a streaming call; runs under the model lock on the Stream's thread."""
    tokens, call = start()
    prepared = restore.prepared = _prepare_call(cache, tokens, ns, kwargs)
    t0 = time.perf_counter()
    n_chunks = 0
    last: dict[str, Any] = {}
    rewriter = ChunkParser(parser) if parser is not None else None
    text: list[str] = []
    chunks = call(stream=True, **kwargs)
    try:
        for chunk in chunks:
            choices = chunk.get("choices") or [{}]
            piece = choices[0].get("text") or choices[0].get("delta", {}).get("content")
            if piece:
                n_chunks += 1
                text.append(piece)
            last = chunk
            if rewriter is None:
                yield chunk
            else:
                yield from rewriter.rewrite(chunk)
            if cancel.is_set():
                break
    finally:
        chunks.close()
    _after_call(cache, prepared, time.perf_counter() - t0, n_chunks)
    if save:
        cache._autosave(ns, prepared, None if cut is None else functools.partial(cut, tokens))
    if follow is not None and not cancel.is_set():
        reply = (
            rewriter.reply.message()
            if rewriter is not None
            else {"role": "assistant", "content": "".join(text)}
        )
        follow(ns, save, prepared, reply)
    if include_usage and not cancel.is_set():
        yield {
            "id": last.get("id", ""),
            "object": chunk_object,
            "created": last.get("created", int(time.time())),
            "model": last.get("model", ""),
            "choices": [],
            "usage": {
                "prompt_tokens": prepared.prompt_tokens,
                "completion_tokens": n_chunks,
                "total_tokens": prepared.prompt_tokens + n_chunks,
                "prompt_tokens_details": {"cached_tokens": prepared.reused_tokens},
            },
        }


__all__ = ["CallStream", "chat", "complete", "generate", "grammar_for"]
