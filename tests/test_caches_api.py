"""Named caches over HTTP (``/v1/caches``) on the real ``prefixcache serve`` and model, with httpx.

A cache made over HTTP is a pin in the tenant's namespace: the store shows it as the CLI's
``status`` does, and the next request that starts with its prefix restores it. Each API key is
a tenant that sees only its own caches (and the server's recipes, read-only).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from conftest import N_CTX

from prefixcache import status as store_status
from prefixcache.store import open_store

KEYS = ("key-alpha", "key-beta")
RECIPE_SYSTEM = "You answer questions about the opening hours of Bolt & Board, a hardware store."
NOTES = "You keep a carpenter's notes: timber sizes, fastener types and paint colours."
TOOL = {
    "type": "function",
    "function": {
        "name": "stock_level",
        "description": "How many units of a product are in stock.",
        "parameters": {"type": "object", "properties": {"sku": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def served(start_server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    recipes = tmp_path_factory.mktemp("recipes")
    (recipes / "hours.yaml").write_text(
        f"name: hours\nn_ctx: {N_CTX}\nprefix:\n  - system: {json.dumps(RECIPE_SYSTEM)}\n"
    )
    args = [a for key in KEYS for a in ("--api-key", key)]
    return start_server(recipes, *args)


def api(served: Any, key: str = KEYS[0]) -> httpx.Client:
    return httpx.Client(
        base_url=served.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def names(client: httpx.Client) -> dict[str, dict[str, Any]]:
    reply = client.get("/caches")
    assert reply.status_code == 200, reply.text
    return {c["name"]: c for c in reply.json()["data"]}


def cached_tokens(client: httpx.Client, messages: list[dict[str, Any]], **body: Any) -> int:
    reply = client.post(
        "/chat/completions",
        json={"model": "hours", "messages": messages, "max_tokens": 1, "temperature": 0, **body},
    )
    assert reply.status_code == 200, reply.text
    return int(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_recipes_are_listed_read_only(served):
    with api(served) as client:
        hours = names(client)["hours"]
        assert hours["read_only"] and hours["pinned"] and hours["tokens"] > 0
        assert client.get("/caches/hours").json() == hours
        for reply in (
            client.patch("/caches/hours", json={"ttl": "1h"}),
            client.patch("/caches/hours", json={"pinned": False}),
            client.delete("/caches/hours"),
            client.post(
                "/caches", json={"name": "hours", "messages": [{"role": "system", "content": "x"}]}
            ),
        ):
            assert reply.status_code == 403, reply.text
            assert reply.json()["error"]["code"] == "cache_read_only"
            assert "--recipes" in reply.json()["error"]["message"]
        assert names(client)["hours"] == hours  # unchanged


def test_a_cache_from_recipe_text_is_pinned_restored_patched_and_deleted(served, tmp_path):
    recipe = f"name: notes\nttl: 10m\nprefix:\n  - system: {json.dumps(NOTES)}\n"
    with api(served) as client:
        made = client.post("/caches", json={"recipe": recipe})
        assert made.status_code == 201, made.text
        notes = made.json()
        assert notes["name"] == "notes" and notes["tokens"] > 0 and notes["bytes"] > 0
        assert notes["pinned"] and not notes["read_only"]
        assert 590 <= notes["expires_at"] - time.time() <= 601
        assert names(client)["notes"]["tokens"] == notes["tokens"]
        # The next request that starts with the prefix restores it.
        question = [{"role": "system", "content": NOTES}, {"role": "user", "content": "Oak?"}]
        assert cached_tokens(client, question) >= notes["tokens"]

        longer = client.patch("/caches/notes", json={"ttl": "2h"}).json()
        assert longer["pinned"] and 7190 <= longer["ttl_left_s"] <= 7200
        unpinned = client.patch("/caches/notes", json={"pinned": False}).json()
        assert not unpinned["pinned"] and unpinned["stored"]
        forever = client.patch("/caches/notes", json={"pinned": True}).json()
        assert forever["pinned"] and forever["ttl_left_s"] is None and forever["expires_at"] is None

        gone = client.delete("/caches/notes")
        assert gone.status_code == 200 and gone.json()["deleted"], gone.text
        # Its segment stays while the conversation autosaved above branches from it (as rm).
        assert gone.json()["segments"] == 0
        assert client.get("/caches/notes").status_code == 404
        assert client.patch("/caches/notes", json={"ttl": 60}).status_code == 404
        assert client.delete("/caches/notes").status_code == 404


def test_a_cache_from_messages_and_tools_is_the_pin_the_store_shows(served):
    messages = [{"role": "system", "content": NOTES + " You check stock first."}]
    with api(served) as client:
        made = client.post(
            "/caches", json={"name": "stocked", "messages": messages, "tools": [TOOL], "ttl": 90}
        )
        assert made.status_code == 201, made.text
        stocked = made.json()
        asked = [*messages, {"role": "user", "content": "Pine?"}]
        assert cached_tokens(client, asked, tools=[TOOL]) >= stocked["tokens"]
    # The CLI's status reads the same pin from the store.
    store = open_store(str(served.log.parent / "store"))
    try:
        (row,) = [p for p in store_status.collect(store).pins if p.name == "stocked"]
    finally:
        store.close()
    assert row.tokens == stocked["tokens"] and row.source == "http" and row.pinned


def test_tenants_see_only_their_own_caches(served):
    mine = [{"role": "system", "content": "Only the alpha tenant's prompt: sanding grits."}]
    with api(served, KEYS[0]) as alpha, api(served, KEYS[1]) as beta:
        made = alpha.post("/caches", json={"name": "private", "messages": mine})
        assert made.status_code == 201, made.text
        assert "private" in names(alpha)
        assert "private" not in names(beta) and "hours" in names(beta)
        assert beta.get("/caches/private").status_code == 404
        assert beta.patch("/caches/private", json={"pinned": False}).status_code == 404
        assert beta.delete("/caches/private").status_code == 404
        asked = [*mine, {"role": "user", "content": "Which grit?"}]
        assert cached_tokens(beta, asked) < made.json()["tokens"]  # not restored for beta
        assert names(alpha)["private"]["pinned"]  # untouched by beta
        # The same name is free in another namespace.
        assert beta.post("/caches", json={"name": "private", "messages": mine}).status_code == 201
        assert alpha.delete("/caches/private").json()["deleted"]
        assert "private" in names(beta)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"recipe": "name: x\nprefix: [\n"}, "recipe: line"),
        ({"recipe": {"name": "x", "model": "/x.gguf", "prefix": [{"system": "a"}]}}, "model"),
        ({"recipe": "name: x\nextends: ../hours.yaml\nprefix:\n  - system: a\n"}, "extends"),
        (
            {"recipe": "name: x\nprefix:\n  - include:\n      paths: [/etc/hostname]\n"},
            "recipe: line",
        ),
        ({"recipe": "name: x\nprefix:\n  - system: a\n", "messages": []}, "not both"),
        ({"name": "bad name", "messages": [{"role": "system", "content": "a"}]}, "name must"),
        ({"name": "x", "messages": [{"role": "nobody", "content": "a"}]}, "role"),
        ({"name": "x", "messages": [{"role": "system", "content": "a"}], "ttl": "soon"}, "ttl"),
        ({"name": "x", "messages": [{"role": "system", "content": "a"}], "model": "nope"}, "nope"),
    ],
)
def test_bad_cache_requests_are_clear_errors(served, body, says):
    with api(served) as client:
        reply = client.post("/caches", json=body)
    assert reply.status_code in (400, 404), reply.text
    assert says in reply.json()["error"]["message"]
    assert "x" not in names(api(served))


def test_caches_need_a_key(served):
    assert httpx.get(served.base_url + "/caches", timeout=30).status_code == 401
