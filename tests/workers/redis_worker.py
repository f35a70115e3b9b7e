"""One worker process on a Redis-backed store, driven one command at a time.

Usage: redis_worker.py STORE_URL. Prints ``ready``, then reads one JSON command per line on stdin
and answers each with one JSON line on stdout, so that the test can stop and start the Redis
server between two calls. Commands::

    {"op": "pin", "recipe": PATH}  or  {"op": "pin", "messages": [...], "name": NAME}
    {"op": "chat", "messages": [...], "tools": [...] | null, "max_tokens": N}
    {"op": "quit"}

Every answer carries the log records of level INFO and above that prefixcache emitted so far,
and the store's counters (``store``: TieredStore.stats(), e.g. segments kept local while Redis
was full).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from prefixcache import PrefixCache
from prefixcache.recipes import load_recipe


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"level": record.levelname, "message": record.getMessage()})


def main() -> None:
    recorder = Recorder()
    logger = logging.getLogger("prefixcache")
    logger.setLevel(logging.INFO)
    logger.addHandler(recorder)
    cache = PrefixCache.open(store=sys.argv[1], n_ctx=2048)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        out: dict[str, Any] = {}
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "pin":
            if "recipe" in cmd:
                recipe = load_recipe(cmd["recipe"])
                info = cache.pin(recipe.messages, name=recipe.name, tools=recipe.tools)
            else:
                info = cache.pin(cmd["messages"], name=cmd["name"])
            out = {"key": info.key, "n_tokens": info.n_tokens, "evaluated": info.evaluated_tokens}
        elif cmd["op"] == "chat":
            before = cache.stats()
            reply = cache.chat(
                cmd["messages"],
                tools=cmd.get("tools"),
                max_tokens=cmd.get("max_tokens", 16),
                temperature=0,
            )
            # The reply is prefilled ahead for a next turn and segments fetched from Redis are
            # copied to the local tier, both in the background: wait for them, so that what the
            # next command (of this worker or another) finds does not depend on timing.
            cache.idle()
            after = cache.stats()
            getattr(cache.store, "flush", lambda: None)()
            out = {
                "content": reply["choices"][0]["message"]["content"],
                "cached": reply["usage"]["prompt_tokens_details"]["cached_tokens"],
                "prompt_tokens": reply["usage"]["prompt_tokens"],
                "restored": after["restored_tokens"] - before["restored_tokens"],
                "corrupt": after["corrupt_segments"],
            }
        out["remote_up"] = getattr(cache.store, "remote_up", None)
        out["store"] = getattr(cache.store, "stats", dict)()
        out["logs"] = recorder.records
        print(json.dumps(out), flush=True)
    cache.close()


if __name__ == "__main__":
    main()
