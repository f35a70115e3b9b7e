"""The ``prefixcache`` command: a thin typer + rich layer over the library.

Every command maps onto one library call (prewarm → ``prewarm.prewarm``, status/tree/verify/rm →
``status``, chat → ``PrefixCache.chat``, explain → ``PrefixCache.explain``, serve →
``server.serve``). Errors print as one red line and exit with status 1; ``--verbose`` adds
llama.cpp's logs and tracebacks.

Modules: ``base`` (the typer app, global options, error handling, shared helpers), ``commands``
(the store and server commands), ``chat`` (the chat REPL), ``render`` (tables and formatters).
The commands are registered here, in the order ``--help`` lists them. Only this package imports
typer and rich.
"""

from __future__ import annotations

from . import chat, commands
from .base import app

__all__ = ["app"]

app.command("prewarm")(commands.prewarm_cmd)
app.command("status")(commands.status_cmd)
app.command("tree")(commands.tree_cmd)
app.command("verify")(commands.verify_cmd)
app.command("pin")(commands.pin_cmd)
app.command("unpin")(commands.unpin_cmd)
app.command("rm")(commands.rm_cmd)
app.command("gc")(commands.gc_cmd)
app.command("chat")(chat.chat_cmd)
app.command("explain")(commands.explain_cmd)
app.command("serve")(commands.serve_cmd)
