"""Pin a system prompt, then chat: the second process start restores it instead of prefilling."""

from prefixcache import PrefixCache

SYSTEM = {"role": "system", "content": "You are a concise assistant for a hardware store."}

cache = PrefixCache.open()
info = cache.pin([SYSTEM], name="quickstart")
print(f"pinned {info.n_tokens} tokens ({info.evaluated_tokens} evaluated now)")
reply = cache.chat(
    [SYSTEM, {"role": "user", "content": "What is a hammer for?"}], max_tokens=48, temperature=0
)
print(reply["choices"][0]["message"]["content"])
print("cached tokens:", reply["usage"]["prompt_tokens_details"]["cached_tokens"])
