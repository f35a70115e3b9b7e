"""The HTTP surface's vocabulary: OpenAI-shaped errors and the request bodies the routes accept.

Pure pydantic and plain exceptions (no model, no I/O), so that what a client may send and what it
gets back for a mistake can be read, and tested, in one place.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import PrefixCacheError, PromptTooLongError, TemplateError
from ..request import ChatCall, RequestError, normalise_chat

log = logging.getLogger(__name__)


# --- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with an OpenAI-shaped body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Overloaded(APIError):
    """HTTP 429: the model's queue is full; Retry-After estimates when a place frees up."""

    def __init__(self, retry_after: int, waiting: int):
        super().__init__(
            429,
            f"the server is busy: {waiting} requests are queued for this model; retry in "
            f"{retry_after}s",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )


def api_error(exc: BaseException) -> APIError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, TemplateError | ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, PrefixCacheError):
        return APIError(500, str(exc), kind="server_error")
    log.exception("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


# --- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI-style servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    #: Fields handed to llama-cpp-python when the client set them.
    PASSTHROUGH: ClassVar[tuple[str, ...]] = (
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    )

    def llama_kwargs(self) -> dict[str, Any]:
        """The arguments the client gave, so that unset ones keep llama-cpp-python's defaults."""
        out = {k: getattr(self, k) for k in self.PASSTHROUGH if k in self.model_fields_set}
        if out.get("logit_bias"):
            out["logit_bias"] = {int(k): v for k, v in out["logit_bias"].items()}
        if self.stream_options:
            out["stream_options"] = self.stream_options
        return out


class ChatRequest(_Request):
    """A chat completion request. Messages, tools, ``tool_choice`` and ``response_format`` are
    checked by :func:`prefixcache.request.normalise_chat`, the same code that checks
    ``PrefixCache.chat`` (see :meth:`checked`); ``metadata`` and ``store`` are accepted and
    ignored, as ``user`` is."""

    messages: list[Any] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    PASSTHROUGH = (
        *_Request.PASSTHROUGH,
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "logprobs",
    )

    def checked(self) -> ChatCall:
        """The request as the library will run it; an HTTP 400 naming the field if malformed."""
        try:
            return normalise_chat(
                self.messages,
                self.tools,
                tool_choice=self.tool_choice,
                parallel_tool_calls=self.parallel_tool_calls,
                response_format=self.response_format,
                max_completion_tokens=self.max_completion_tokens,
                max_tokens=self.max_tokens,
            )
        except RequestError as exc:
            raise api_error(exc) from exc

    def llama_kwargs(self) -> dict[str, Any]:
        out = super().llama_kwargs()
        max_tokens = self.checked().options.get("max_tokens")
        if max_tokens is not None:
            out["max_tokens"] = max_tokens  # max_completion_tokens resolved
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return out

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the library gets them (text content parts joined)."""
        return self.checked().messages


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    PASSTHROUGH = (*_Request.PASSTHROUGH, "echo", "logprobs")

    def llama_kwargs(self) -> dict[str, Any]:
        out = super().llama_kwargs()
        out.setdefault("max_tokens", self.max_tokens)
        return out

    def single_prompt(self) -> str | list[int]:
        if self.suffix is not None:
            raise APIError(400, "suffix (infill) is not supported", param="suffix")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request, please", param="prompt")
            return str(prompt[0])
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return prompt  # type: ignore[return-value]


__all__ = ["APIError", "ChatRequest", "CompletionRequest", "Overloaded", "api_error"]
