"""Chat-template rendering at token level, and stable prefix boundaries.

Conversations are rendered with the model's own chat template from its GGUF metadata (or a Jinja
template given instead, or a chat format registered in llama-cpp-python), through the formatter
llama-cpp-python would use and tokenized exactly as its chat handler does, so the tokens we match
are the tokens ``create_chat_completion`` evaluates. A model without any template still opens:
raw prompts need none, and rendering a conversation says what to pass.

A prefix of messages is not always a prefix of the rendered text: templates fold the system prompt
into the first user turn, add a default system prompt, or close a turn differently depending on
what follows. :meth:`ChatTemplate.prefix_tokens` therefore renders the prefix followed by several
different continuations and keeps the longest token prefix common to all of them: the only tokens
that every conversation starting with those messages is guaranteed to share.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import TemplateError
from .radix import common_prefix_length
from .request import text_content

Message = Mapping[str, Any]

# Continuations used to find the boundary: different roles and different first characters, so
# nothing that depends on what follows can survive in their common prefix.
_PROBES = ("Zq9 probe", "7x probe")
# No "system" probe: tools given to a template that ignores them are folded in after the leading
# system messages, so a following system message would move them (see messages_for).
_PROBE_ROLES = ("user", "assistant", "tool")

_CHAT_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(llama_cpp.Llama.create_chat_completion).parameters.items()
    if name not in ("self", "messages", "tools") and p.default is not inspect.Parameter.empty
}

TOOLS_PREAMBLE = (
    "You can call the following tools. To call one, reply with only a JSON object "
    '{"name": <tool name>, "arguments": {...}}.\n\nTools:\n'
)


class ChatTemplate:
    """Renders messages (and tools) to the token ids the model will see."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        source: str | os.PathLike[str] | None = None,
        *,
        chat_format: str | None = None,
    ):
        if source and chat_format:
            raise TemplateError("give chat_template or chat_format, not both")
        self._llm = llm
        self.chat_format = chat_format
        eos_id = llm.token_eos()
        bos_id = llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        self._formatters: tuple[Any, Any] | None = None
        self._handler: Any = None
        #: The last text tokenized (bytes, add_bos, tokens), for :meth:`complete`.
        self._tokenized: tuple[bytes, bool, list[int]] | None = None
        if chat_format:
            self.source = ""
            formatter, self._handler = _registered_format(chat_format)
            # Registered formats always end with the assistant's header.
            self._formatters = (formatter, formatter)
        else:
            self.source = load_template_text(source) or llm.metadata.get(
                "tokenizer.chat_template", ""
            )
        if self.source:
            # The same arguments Llama.__init__ uses for "chat_template.default".
            self._formatters = tuple(  # type: ignore[assignment]
                Jinja2ChatFormatter(
                    template=self.source,
                    eos_token=eos,
                    bos_token=bos,
                    stop_token_ids=[eos_id],
                    add_generation_prompt=gen,
                )
                for gen in (True, False)
            )
            self._handler = self._formatters[0].to_chat_handler()  # type: ignore[index]
        template = self.source
        #: Templates that never mention tools get them as a system message instead.
        self.native_tools = "tools" in template
        #: Templates without a developer role get developer messages as system messages.
        self.developer_role = "developer" in template
        #: Whether the template shows a call's arguments given as a JSON string as they are;
        #: if not (it applies ``tojson`` to them), they are handed over as an object.
        self.string_arguments = self.native_tools and self._shows_string_arguments()

    @property
    def available(self) -> bool:
        """Whether conversations can be rendered (False: only raw prompts, ``complete()``)."""
        return self._formatters is not None

    @property
    def identity(self) -> str:
        """What renders conversations: ``jinja:<sha256 prefix>``, ``format:<name>`` or
        ``none``; a different identity means different tokens for the same messages."""
        if self.chat_format:
            return f"format:{self.chat_format}"
        if self.source:
            return "jinja:" + hashlib.sha256(self.source.encode("utf-8")).hexdigest()[:16]
        return "none"

    def _formatter(self, add_generation_prompt: bool) -> Any:
        if self._formatters is None:
            raise TemplateError(
                "the model has no chat template in its GGUF metadata, so conversations cannot be "
                "rendered; pass chat_template= (Jinja text or a file; CLI --chat-template-file) "
                "or chat_format= (a llama-cpp-python format such as 'gemma' or 'chatml'; CLI "
                "--chat-format), or use complete() with a raw prompt"
            )
        return self._formatters[0 if add_generation_prompt else 1]

    def complete(self, llm: llama_cpp.Llama, **kwargs: Any) -> Any:
        """Run the chat handler with ``Llama.create_chat_completion``'s defaults.

        The bare handler has defaults of its own (repeat_penalty=1.1, temperature=0.2) that
        differ from the Llama method's; using the method's keeps output identical to it.
        """
        for name, param in _CHAT_DEFAULTS.items():
            kwargs.setdefault(name, param)
        self._formatter(True)  # raises TemplateError without a template
        if llm is self._llm and self._tokenized is not None:
            # The handler renders the prompt again (cheap) and tokenizes it again (~7 ms at 4k
            # tokens, on the path to the first token): hand it the tokens made for the restore.
            llm = _Tokenized(llm, *self._tokenized)  # type: ignore[assignment]
        return self._handler(llama=llm, **kwargs)

    def messages_for(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and tools as handed to the template.

        A template that ignores ``tools`` would silently drop them; for such templates the tool
        schemas become one system message right after the leading system messages, and an
        assistant message's ``tool_calls`` become its text, in the format the tools message asks
        for (then its content, if any). Templates that render tools themselves get the calls,
        their JSON-string arguments as objects if the template would otherwise show a quoted
        string. Text content parts are joined; a ``developer`` message is a ``system`` message
        to a template that has no developer role.
        """
        msgs = [self._message(m) for m in messages]
        if not tools:
            return msgs, None
        tool_list = [dict(t) for t in tools]
        if self.native_tools:
            return msgs, tool_list
        text = TOOLS_PREAMBLE + "\n".join(json.dumps(t, sort_keys=True) for t in tool_list)
        at = 0
        while at < len(msgs) and msgs[at].get("role") == "system":
            at += 1
        msgs.insert(at, {"role": "system", "content": text})
        return msgs, None

    def _message(self, message: Message) -> dict[str, Any]:
        """One message as the template should get it (see :meth:`messages_for`)."""
        msg = dict(message)
        if isinstance(msg.get("content"), list):  # prepare() and pin() take parts too
            msg["content"] = text_content(msg["content"])
        if msg.get("role") == "developer" and not self.developer_role:
            msg["role"] = "system"
        if not msg.get("tool_calls"):
            # Some templates test for the key ('tool_calls' in message), not its value.
            msg.pop("tool_calls", None)
            return msg
        if not self.native_tools:
            return _calls_as_text(msg)
        if not self.string_arguments:
            msg["tool_calls"] = [_object_arguments(c) for c in msg["tool_calls"]]
        return msg

    def _shows_string_arguments(self) -> bool:
        arguments = '{"probe": "x"}'
        call = {
            "id": "probe0001",  # Mistral's templates want 9 letters and digits
            "type": "function",
            "function": {"name": "probe", "arguments": arguments},
        }
        probe = [
            {"role": "user", "content": "probe"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
        try:
            text = self._formatter(False)(messages=probe).prompt
        except Exception:  # a template that refuses the probe: hand objects, as most want
            return False
        return arguments in text

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        return str(self._render(messages, tools, add_generation_prompt).prompt)

    def _render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> Any:
        msgs, tool_arg = self.messages_for(messages, tools)
        fmt = self._formatter(add_generation_prompt)
        try:
            return fmt(messages=msgs, tools=tool_arg)
        except TemplateError:
            raise
        except Exception as exc:  # jinja2 errors and the template's own raise_exception
            raise TemplateError(f"the chat template cannot render these messages: {exc}") from exc

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        # As chat_formatter_to_chat_completion_handler: a Jinja template adds special tokens
        # itself; a registered format that does not gets the BOS from the tokenizer.
        data = text.encode("utf-8")
        tokens = list(self._llm.tokenize(data, add_bos=add_bos, special=True))
        self._tokenized = (data, add_bos, tokens)
        return tokens

    def tokens(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of the whole conversation, as create_chat_completion would evaluate them."""
        result = self._render(messages, tools, add_generation_prompt)
        return self.tokenize(result.prompt, add_bos=not result.added_special)

    def prefix_tokens(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Tokens that every conversation starting with ``messages`` shares.

        Raises TemplateError when the template leaves no such boundary after the messages'
        content (the prefix would not cover them, so pinning it would restore nothing useful).
        """
        if not messages:
            raise TemplateError("a prefix needs at least one message")
        self._formatter(True)  # raises TemplateError without a template
        variants = [self._try_tokens(messages, tools)]
        for role in _PROBE_ROLES:
            for probe in _PROBES:
                msg: dict[str, Any] = {"role": role, "content": probe}
                if role == "tool":
                    msg["tool_call_id"] = "probe"
                variants.append(self._try_tokens([*messages, msg], tools))
        rendered = [v for v in variants if v is not None]
        if len(rendered) < 3:
            raise TemplateError("the chat template rejects every continuation of these messages")
        prefix = rendered[0]
        for other in rendered[1:]:
            prefix = prefix[: common_prefix_length(prefix, other)]
        last = self._message(messages[-1]).get("content") or ""
        tail = last.strip()[-24:]
        if tail and tail not in self.detokenize(prefix):
            raise TemplateError(
                "the chat template renders the end of these messages differently depending on "
                "what follows, so no token boundary after them is stable; pin a shorter prefix "
                "(for example without the last message)"
            )
        return prefix

    def turn_start(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
        tokens: Sequence[int],
    ) -> int | None:
        """Where the last of ``messages`` begins in ``tokens`` (their prompt), or None.

        Found with one render of the messages before it and a probe message of another role in
        its place: the tokens both renderings share. Autosave cuts there, so that conversations
        that share all but their last message share one stored copy of what comes before it.
        Cheaper than :meth:`prefix_tokens` (one render, not one per probe) and only a hint: any
        cut is correct, a cut a few tokens off only shares less.
        """
        if len(messages) < 2:
            return None
        role = "user" if self._message(messages[-1]).get("role") == "assistant" else "assistant"
        other = self._try_tokens([*messages[:-1], {"role": role, "content": _PROBES[0]}], tools)
        if other is None:
            return None
        return common_prefix_length(tokens, other) or None

    def _try_tokens(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
    ) -> list[int] | None:
        try:
            return self.tokens(messages, tools, add_generation_prompt=True)
        except TemplateError:
            return None

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")


def load_template_text(value: str | os.PathLike[str] | None) -> str | None:
    """A chat template given as Jinja text or as the path of a file holding it."""
    if value is None or value == "":
        return None
    text = str(value)
    if isinstance(value, str) and ("{%" in text or "{{" in text):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise TemplateError(
            f"chat_template: {text!r} is neither Jinja text nor a template file that exists"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"chat_template: cannot read {path}: {exc}") from exc


def _registered_format(name: str) -> tuple[Any, Any]:
    """The formatter and chat handler llama-cpp-python registered as ``name``."""
    known = sorted(llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers)
    try:
        handler = llama_chat_format.get_chat_completion_handler(name)
    except (ValueError, llama_chat_format.LlamaChatCompletionHandlerNotFoundException):
        raise TemplateError(
            f"chat_format: unknown format {name!r}; llama-cpp-python knows {', '.join(known)}"
        ) from None
    formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    if formatter is None:
        raise TemplateError(
            f"chat_format: {name!r} is a chat handler that renders no text prompt, so its tokens "
            "cannot be matched; give a Jinja chat_template instead"
        )
    return formatter, handler


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's calls as the JSON lines the folded tools message asks for (then
    its content, if any: the order the ``json`` tool parser reads them back in)."""
    lines = []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        lines.append(json.dumps({"name": function.get("name"), "arguments": arguments}))
    if message.get("content"):
        lines.append(str(message["content"]))
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**out, "content": "\n".join(lines)}


def _object_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    """A call whose arguments, if a JSON string of an object, are that object."""
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return dict(call)
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return dict(call)
    if not isinstance(arguments, dict):
        return dict(call)
    return {**call, "function": {**function, "arguments": arguments}}


class _Tokenized:
    """The Llama as a chat handler sees it, whose ``tokenize`` of the text last tokenized by the
    template returns those tokens instead of tokenizing it again (same text, same model)."""

    def __init__(self, llm: llama_cpp.Llama, data: bytes, add_bos: bool, tokens: list[int]):
        self._llm = llm
        self._memo = (data, add_bos, tokens)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        data, memo_bos, tokens = self._memo
        if special and add_bos == memo_bos and text == data:
            return list(tokens)
        return list(self._llm.tokenize(text, add_bos=add_bos, special=special))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)
