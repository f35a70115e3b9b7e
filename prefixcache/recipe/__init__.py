"""Recipes: YAML files that declare the stable prompt prefixes an agent reuses.

A recipe names a prefix (system prompt, few-shot turns, files from disk, tool schemas) so that its
KV state can be computed once, stored, and restored by every later request that starts with it.
Loading is strict: every problem is one :class:`~prefixcache.errors.RecipeError` naming the file,
the 1-based line and what was expected. This module is pure: it reads YAML and text files and never
touches a model, so it can be tested (and recipes validated) without one.

Schema (every key is optional except ``prefix``)::

    name: coding-agent      # default: the file stem; letters, digits, '_', '.' and '-'
    aliases: [coder]        # more names a server accepts as ``model`` for this recipe (not
                            # inherited); letters, digits and '_.:/-'
    extends: base.yaml      # parent recipe, relative to this file's folder: its messages and
                            # tools come first, and settings not given here are inherited
    model: null             # GGUF path relative to this file's folder; null = the default model
    n_ctx: 8192             # positive integer
    pinned: true            # keep the stored prefix safe from eviction (default true)
    ttl: 7d                 # seconds, or text such as 90s, 30m, 12h, 7d, 1h30m; null = never
    autosave: true          # store the prefix's KV state once it is computed (default true)
    tools:                  # OpenAI tool schemas
      - type: function
        function: {name: get_order, description: ..., parameters: {type: object, ...}}
    prefix:                 # the messages, in order: shorthand items of exactly one key...
      - system: "text"
      - user: "few-shot question"
      - assistant: "few-shot answer"
      - role: assistant         # ...or OpenAI messages: role (system, developer, user,
        content: null           # assistant, tool), content (text or a list of text parts),
        tool_calls:             # name, tool_calls (assistant), tool_call_id (tool)
          - id: call_1
            type: function
            function: {name: get_order, arguments: '{"order_id": "A1"}'}
      - role: tool
        tool_call_id: call_1
        content: '{"status": "shipped"}'
      - include:                # files from disk, rendered into one message
          paths: ["../src/**/*.py", README.md]   # files or globs, relative to this folder
          ignore: ["tests/**"]  # extra gitignore-style patterns, relative to this folder
          gitignore: true       # honour .gitignore files (default true)
          max_bytes: 200000     # limit on the files' total size, checked on load
          max_tokens: 6000      # limit on the rendered message, see check_token_limits
          role: user            # system | user (default user)
          header: "Here is the code:"

``prefix`` must list at least one message, except in a recipe that extends another and adds tools.
An OpenAI message is kept as written, so that a prefix matches the messages a client sends, with
two normalisations: text content parts are joined into one string (as the server joins them), and
tool call ``arguments`` given as a mapping become JSON text (as ``json.dumps`` writes it).
YAML is read with safe loading only, and a mapping that repeats a key is an error (plain
``yaml.safe_load`` would silently keep the last value).

Includes and ``extends`` may name any file the process can read (absolute paths, ``..``, symlinks
that leave the folder), which suits recipes one writes for oneself. A loader that reads recipes
written by someone less trusted (the server) passes ``root``: every recipe file, parent and
included file must then resolve, after symlinks, under one of the root folders.
"""

from .fields import parse_duration
from .include import IncludeSpec
from .load import (
    RECIPE_SUFFIXES,
    check_fits,
    check_token_limits,
    load_recipe,
    load_recipes,
    watched_paths,
)
from .model import Recipe
from .paths import RecipeRoot

__all__ = [
    "RECIPE_SUFFIXES",
    "IncludeSpec",
    "Recipe",
    "RecipeRoot",
    "check_fits",
    "check_token_limits",
    "load_recipe",
    "load_recipes",
    "parse_duration",
    "watched_paths",
]
