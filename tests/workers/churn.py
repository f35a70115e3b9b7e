"""A worker that writes to a store nonstop, to be killed at a random moment by the crash test.

Usage: churn.py STORE MODE SEED, MODE one of prewarm, autosave, gc. Prints "ready" once the
model is loaded, then loops until killed.
"""

from __future__ import annotations

import random
import sys
import time

from prefixcache import PrefixCache, QuotaExceededError
from prefixcache.lifecycle import enforce_quota

WORDS = [
    "oak",
    "pine",
    "cedar",
    "birch",
    "maple",
    "walnut",
    "ash",
    "elm",
    "teak",
    "spruce",
    "fir",
    "larch",
]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def main() -> None:
    store, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    cache = PrefixCache.open(store=store, n_ctx=2048, quota_gb=0.05)
    print("ready", flush=True)
    system = {"role": "system", "content": "You sell timber. " + text(rng, 40)}
    while True:
        if mode == "prewarm":
            msgs = [system, {"role": "user", "content": text(rng, rng.randint(20, 300))}]
            try:
                cache.pin(msgs, name=f"p{rng.randint(0, 3)}")
            except QuotaExceededError:
                cache.unpin(f"p{rng.randint(0, 3)}")
        elif mode == "autosave":
            msgs = [system, {"role": "user", "content": text(rng, rng.randint(20, 300))}]
            cache.chat(msgs, max_tokens=2, temperature=0)
        else:
            cache.store.gc()
            enforce_quota(cache.store, rng.randint(0, 20_000_000), time.time())


if __name__ == "__main__":
    main()
