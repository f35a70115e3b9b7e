"""An OpenAI-compatible HTTP server with the prefix cache built in.

``prefixcache serve`` gives agent frameworks that speak the OpenAI API pinned-prefix speed without
code changes: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` (streaming or
not), Anthropic's ``/v1/messages``, named caches per tenant (``/v1/caches``), ``/v1/models``,
``/health`` and ``/metrics``
(Prometheus text). Each model is a
:class:`ModelWorker`: a :class:`~prefixcache.PrefixCache` and one thread that runs its calls one
at a time behind a bounded queue (HTTP 429 with Retry-After beyond it). Recipes are prewarmed
before the server listens, and again on SIGHUP or when a recipe or an included file changes;
recipes may read only files under their folder unless told otherwise.

With API keys, each key is a tenant: its requests use a namespace of their own, so tenants never
restore (or time) each other's cached prefixes; the recipes are pinned in every namespace.

Modules: ``schema`` (request bodies and OpenAI-shaped errors), ``auth`` (API keys), ``worker``
(a model's queue and streaming), ``reload`` (watching recipe files, stale pins), ``core`` (the
server's state), ``app`` (routes, metrics, ``serve``), ``responses`` and ``response_events``
(the Responses API), ``caches`` (``/v1/caches``), ``apimetrics`` (cache reads and writes per API),
``messages``, ``anthropic_schema``, ``anthropic_reply`` and ``breakpoints`` (Anthropic's Messages
API, its ``cache_control`` breakpoints as pins).
"""

from __future__ import annotations

from .app import create_app, serve
from .auth import API_KEYS_ENV, ApiKeys, namespace_for, read_api_keys
from .core import DEFAULT_WATCH_INTERVAL, Server, ServerConfig
from .schema import APIError, ChatRequest, CompletionRequest
from .worker import ModelWorker

__all__ = [
    "API_KEYS_ENV",
    "DEFAULT_WATCH_INTERVAL",
    "APIError",
    "ApiKeys",
    "ChatRequest",
    "CompletionRequest",
    "ModelWorker",
    "Server",
    "ServerConfig",
    "create_app",
    "namespace_for",
    "read_api_keys",
    "serve",
]
