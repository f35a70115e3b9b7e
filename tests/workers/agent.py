"""One agent process for the multi-process test: pin the shared prefix, then chat.

Usage: agent.py STORE QUESTION. Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent))

from conftest import SYSTEM

from prefixcache import PrefixCache


def main() -> None:
    store, question = sys.argv[1], sys.argv[2]
    cache = PrefixCache.open(store=store, n_ctx=2048)
    info = cache.pin([SYSTEM], name="shared")
    messages = [SYSTEM, {"role": "user", "content": question}]
    first = cache.chat(messages, max_tokens=16, temperature=0)
    # A second turn in a brand-new cache: restores the autosaved first turn from the store
    # while other processes write and evict.
    follow = [*messages, first["choices"][0]["message"], {"role": "user", "content": "Why?"}]
    second = PrefixCache.open(store=store, n_ctx=2048).chat(follow, max_tokens=16, temperature=0)
    print(
        json.dumps(
            {
                "evaluated": info.evaluated_tokens,
                "first": first["choices"][0]["message"]["content"],
                "second": second["choices"][0]["message"]["content"],
                "cached": first["usage"]["prompt_tokens_details"]["cached_tokens"],
                "corrupt": cache.stats()["corrupt_segments"],
            }
        )
    )


if __name__ == "__main__":
    main()
