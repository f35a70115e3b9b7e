"""A store key authenticates segments: a reader with the key restores only what a key holder wrote.

The first tests exercise :class:`prefixcache.integrity.Integrity` alone (no model): signing,
verifying, and that changing any covered metadata field or any byte is detected. The end-to-end
tests run two caches on one real store with the real model: a reader refuses what it cannot
authenticate, answers exactly as a cold run, and leaves the refused segment in the store.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SYSTEM
from typer.testing import CliRunner

from prefixcache import PrefixCache, PrefixCacheError
from prefixcache.cli import app
from prefixcache.config import STORE_KEY_ENV
from prefixcache.errors import CorruptSegmentError, UnauthenticatedSegmentError
from prefixcache.integrity import Integrity
from prefixcache.segment import Segment, checksum, checksum_matches, root_key, segment_key
from prefixcache.store import open_store

KEY_A = "a" * 32
KEY_B = "b" * 32


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "No key" means no key here, whatever the environment running the tests holds."""
    monkeypatch.delenv(STORE_KEY_ENV, raising=False)


def make_segment(data: bytes, tokens: tuple[int, ...] = (1, 2, 3), **fields: Any) -> Segment:
    root = root_key("f" * 64, fields.pop("namespace", ""))
    return Segment(
        key=segment_key(root, tokens),
        parent=root,
        root=root,
        start=0,
        tokens=tokens,
        nbytes=len(data),
        checksum=checksum(data),
        fingerprint="f" * 64,
        **fields,
    )


DATA = bytes(range(256)) * 40


# --- the module alone ----------------------------------------------------------------------


def test_signed_segment_verifies_with_the_same_key() -> None:
    seg = make_segment(DATA)
    signed = Integrity(KEY_A).sign(seg, DATA)
    assert signed.mac.startswith("hmac-sha256:")
    assert dataclasses.replace(signed, mac="") == seg
    Integrity(KEY_A).verify(signed, DATA)
    Integrity(KEY_A.encode()).verify(signed, memoryview(bytearray(DATA)))  # str == its bytes


def test_without_a_key_nothing_is_signed_and_everything_is_accepted() -> None:
    off = Integrity(None)
    assert not off.enabled and not Integrity("").enabled
    seg = make_segment(DATA)
    assert off.sign(seg, DATA) is seg
    off.verify(seg, DATA)
    off.verify(dataclasses.replace(seg, mac="hmac-sha256:00"), b"anything")


@pytest.mark.parametrize(
    "field, value",
    [
        ("key", "0" * 64),
        ("parent", "1" * 64),
        ("root", "2" * 64),
        ("start", 7),
        ("tokens", (1, 2, 4)),
        ("nbytes", len(DATA) + 1),
        ("checksum", "xxh3:0000000000000000"),
        ("fingerprint", "e" * 64),
        ("namespace", "tenant-b"),
    ],
)
def test_changing_any_covered_metadata_field_is_refused(field: str, value: Any) -> None:
    signed = Integrity(KEY_A).sign(make_segment(DATA), DATA)
    forged = dataclasses.replace(signed, **{field: value})
    with pytest.raises(UnauthenticatedSegmentError, match="wrong MAC") as info:
        Integrity(KEY_A).verify(forged, DATA)
    assert info.value.key == forged.key


@pytest.mark.parametrize("position", [0, 1, len(DATA) // 2, len(DATA) - 1])
def test_changing_any_byte_is_refused_even_with_a_matching_checksum(position: int) -> None:
    signed = Integrity(KEY_A).sign(make_segment(DATA), DATA)
    data = bytearray(DATA)
    data[position] ^= 0x01
    forged = dataclasses.replace(signed, checksum=checksum(data))  # what an attacker would do
    assert checksum_matches(data, forged.checksum)
    with pytest.raises(UnauthenticatedSegmentError):
        Integrity(KEY_A).verify(forged, data)
    with pytest.raises(UnauthenticatedSegmentError):
        Integrity(KEY_A).verify(signed, DATA + b"\0")  # one byte more


def test_hints_outside_the_mac_may_change() -> None:
    """``created`` and ``label`` only steer display and LRU order, so they are not covered."""
    signed = Integrity(KEY_A).sign(make_segment(DATA), DATA)
    Integrity(KEY_A).verify(dataclasses.replace(signed, created=1.0, label="x"), DATA)


@pytest.mark.parametrize(
    "mac, reason",
    [
        ("", "no MAC"),
        ("blake2b:" + "0" * 64, "unknown MAC algorithm 'blake2b'"),
        ("hmac-sha256:" + "0" * 64, "wrong MAC"),
    ],
)
def test_missing_foreign_or_forged_macs_are_refused(mac: str, reason: str) -> None:
    seg = dataclasses.replace(make_segment(DATA), mac=mac)
    with pytest.raises(UnauthenticatedSegmentError, match=reason):
        Integrity(KEY_A).verify(seg, DATA)


def test_another_key_is_refused() -> None:
    signed = Integrity(KEY_A).sign(make_segment(DATA), DATA)
    with pytest.raises(UnauthenticatedSegmentError, match="another store key"):
        Integrity(KEY_B).verify(signed, DATA)


def test_a_refusal_is_a_prefixcache_error_that_never_quarantines() -> None:
    exc = UnauthenticatedSegmentError("ab" * 32, "no MAC")
    assert isinstance(exc, PrefixCacheError)
    assert not isinstance(exc, CorruptSegmentError)  # cache.py deletes only CorruptSegmentError
    assert exc.key == "ab" * 32 and exc.reason == "no MAC"
    assert "abababab" in str(exc) and "not authenticated" in str(exc)


def test_from_config_reads_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Integrity.from_config().enabled
    monkeypatch.setenv(STORE_KEY_ENV, KEY_A)
    from_env = Integrity.from_config()
    signed = from_env.sign(make_segment(DATA), DATA)
    Integrity(KEY_A).verify(signed, DATA)
    assert not Integrity.from_config("").enabled  # explicitly off beats the environment
    with pytest.raises(UnauthenticatedSegmentError):
        Integrity.from_config(KEY_B).verify(signed, DATA)  # an explicit key beats it too


def test_the_key_never_appears_in_repr_or_errors() -> None:
    integrity = Integrity(KEY_A)
    assert KEY_A not in repr(integrity) and "enabled=True" in repr(integrity)
    with pytest.raises(UnauthenticatedSegmentError) as info:
        integrity.verify(make_segment(DATA), DATA)
    assert KEY_A not in str(info.value)


def test_a_short_key_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert Integrity("short").enabled
    assert any("only 5 bytes" in r.getMessage() for r in caplog.records)


def test_the_mac_survives_the_json_record_and_old_records_still_parse() -> None:
    signed = Integrity(KEY_A).sign(make_segment(DATA, namespace="t"), DATA)
    assert Segment.from_json(signed.to_json()) == signed
    old = make_segment(DATA).to_json().replace(',"mac":""', "")  # a record from before keys
    assert '"mac"' not in old
    parsed = Segment.from_json(old)
    assert parsed.mac == "" and parsed == make_segment(DATA)
    with pytest.raises(UnauthenticatedSegmentError, match="no MAC"):
        Integrity(KEY_A).verify(parsed, DATA)


def test_each_key_has_its_own_root_and_no_key_keeps_the_old_one() -> None:
    a, b = Integrity(KEY_A).key_id, Integrity(KEY_B).key_id
    assert Integrity(None).key_id == "" and a == Integrity(KEY_A.encode()).key_id
    assert a != b and KEY_A not in a
    roots = {root_key("f" * 64, "t", k) for k in ("", a, b)}
    assert len(roots) == 3
    # Without a key the root is the one earlier versions wrote: existing stores stay readable.
    assert root_key("f" * 64, "t", "") == root_key("f" * 64, "t")
    assert root_key("f" * 64) == "14bf2442c230a51c12a84f12cbf3fcf7ac89dba84588f596844ab151e8adcf24"


MEMO = {"/models/a.gguf|100|1": "aa" * 32, "/models/b.gguf|200|2": "bb" * 32}


def test_sealed_documents_open_only_unchanged_under_their_name_and_key() -> None:
    """The model-digest memo decides fingerprints: a forged entry must not be believed."""
    sealed = Integrity(KEY_A).seal("model-digests", MEMO)
    assert sealed["_mac"].startswith("hmac-sha256:") and Integrity(KEY_A).seal("x", {}) != {}
    assert Integrity(KEY_A).unseal("model-digests", sealed) == MEMO
    swapped = {**sealed, "/models/b.gguf|200|2": "aa" * 32}  # b would pass for a
    for forged in (swapped, MEMO, {**sealed, "_mac": 7}):
        assert Integrity(KEY_A).unseal("model-digests", forged) is None
    assert Integrity(KEY_A).unseal("calibration:x", sealed) is None  # bound to its name
    assert Integrity(KEY_B).unseal("model-digests", sealed) is None
    assert Integrity(KEY_A).unseal("model-digests", None) is None


def test_without_a_key_documents_are_taken_as_they_are() -> None:
    off = Integrity(None)
    assert off.seal("model-digests", MEMO) is MEMO
    assert off.unseal("model-digests", MEMO) == MEMO
    sealed = Integrity(KEY_A).seal("model-digests", MEMO)
    assert off.unseal("model-digests", sealed) == MEMO  # a keyless reader drops the MAC


# --- end to end, on the real model -------------------------------------------------------------

#: These need PrefixCache(store_key=...) (cache.py signs in _store_span and verifies in _load);
#: they run by themselves as soon as that parameter exists.
WIRED = "store_key" in inspect.signature(PrefixCache.__init__).parameters
needs_wiring = pytest.mark.skipif(
    not WIRED, reason="PrefixCache.__init__ has no store_key parameter yet"
)

QUESTION = [SYSTEM, {"role": "user", "content": "When do you open on Saturday?"}]
OpenCache = Callable[..., PrefixCache]


def ask(cache: PrefixCache) -> tuple[str, int]:
    out = cache.chat(QUESTION, max_tokens=24, temperature=0)
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]


def refusal_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "MAC" in r.getMessage()]


@needs_wiring
def test_a_reader_with_the_writers_key_restores(
    open_cache: OpenCache, cold_reply: Callable[..., str]
) -> None:
    open_cache(store_key=KEY_A).pin([SYSTEM], name="sys")
    content, cached = ask(open_cache(store_key=KEY_A))
    assert cached > 0
    assert content == cold_reply(QUESTION)


@needs_wiring
@pytest.mark.parametrize(
    "writer_key, reader_key", [(KEY_A, KEY_B), (None, KEY_B)], ids=["other-key", "unsigned"]
)
def test_a_reader_refuses_segments_it_cannot_authenticate_and_keeps_them(
    open_cache: OpenCache,
    cold_reply: Callable[..., str],
    store: Path,
    caplog: pytest.LogCaptureFixture,
    writer_key: str | None,
    reader_key: str,
) -> None:
    pinned = open_cache(store_key=writer_key).pin([SYSTEM], name="sys")
    reader = open_cache(store_key=reader_key)
    content, cached = ask(reader)
    assert cached == 0
    assert content == cold_reply(QUESTION)
    # The reader's autosave stored the prompt in its own key space: the next call restores it.
    content, cached = ask(reader)
    assert cached > 0
    assert content == cold_reply(QUESTION)
    assert reader.store.get(pinned.key) is not None  # refused, not deleted
    assert not (reader.store.get_doc("quarantine") or {})
    assert reader.stats()["corrupt_segments"] == 0
    # Refused and logged once, or (when the key has a key space of its own) never even seen.
    assert len(refusal_warnings(caplog)) <= 1


def forge_bytes(seg: Segment, data: bytearray) -> Segment:
    """Rewrite part of the KV bytes and the checksum; the MAC stays (the key is unknown)."""
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0x01 for b in data[middle : middle + 4096])
    return dataclasses.replace(seg, checksum=checksum(data))


def strip_mac(seg: Segment, data: bytearray) -> Segment:
    """Keep the bytes but drop the MAC, as a writer without the key would store them."""
    return dataclasses.replace(seg, mac="")


@needs_wiring
@pytest.mark.parametrize("attack", [forge_bytes, strip_mac], ids=["bytes", "no-mac"])
def test_a_segment_rewritten_without_the_key_is_refused_and_kept(
    open_cache: OpenCache,
    cold_reply: Callable[..., str],
    store: Path,
    caplog: pytest.LogCaptureFixture,
    attack: Callable[[Segment, bytearray], Segment],
) -> None:
    """An attacker with write access to the store (not the key) rewrites a signed segment in the
    key space of the key's holders: the checksum holds, the MAC does not."""
    open_cache(store_key=KEY_A).pin([SYSTEM], name="sys")
    attacker = open_store(store)
    try:
        first = next(seg for seg in attacker.segments() if seg.start == 0)
        data = bytearray(first.nbytes)
        attacker.read_kv(first, memoryview(data))
        forged = attack(first, data)
        assert checksum_matches(data, forged.checksum)
        attacker.delete(first.key)
        assert attacker.put(forged, data)
    finally:
        attacker.close()
    reader = open_cache(store_key=KEY_A)
    content, cached = ask(reader)
    assert cached == 0  # the first segment is refused, so nothing after it is restored
    assert content == cold_reply(QUESTION)
    content, _ = ask(reader)  # may restore what the first call autosaved, never the forgery
    assert content == cold_reply(QUESTION)
    assert len(refusal_warnings(caplog)) == 1  # logged once, not on every call
    assert reader.store.get(first.key) == forged  # refused, not deleted
    assert reader.stats()["corrupt_segments"] == 0


@needs_wiring
def test_a_forged_model_digest_memo_does_not_change_a_keyed_readers_fingerprint(
    open_cache: OpenCache, cold_reply: Callable[..., str], store: Path
) -> None:
    """The memo of model-file digests is a store document: a writer without the key could
    give one model another's fingerprint (and so its validly signed segments)."""
    writer = open_cache(store_key=KEY_A)
    writer.pin([SYSTEM], name="sys")
    names = ["model-digests", "model-digests:" + Integrity(KEY_A).key_id]  # shared or per key
    sealed = [n for n in names if "_mac" in (writer.store.get_doc(n) or {})]
    if not sealed:
        pytest.skip("cache.py does not seal the model-digest memo yet (Integrity.seal/unseal)")
    attacker = open_store(store)
    try:
        for name in names:
            memo = attacker.get_doc(name) or dict(attacker.get_doc(sealed[0]) or {})
            attacker.set_doc(name, {k: "0" * 64 if "|" in k else v for k, v in memo.items()})
    finally:
        attacker.close()
    reader = open_cache(store_key=KEY_A)
    assert reader.fingerprint.digest == writer.fingerprint.digest
    content, cached = ask(reader)
    assert cached > 0
    assert content == cold_reply(QUESTION)


@needs_wiring
@pytest.mark.parametrize("how", ["option", "env"])
def test_the_cli_signs_with_store_key_or_its_variable(
    store: Path, tmp_path: Path, how: str
) -> None:
    recipe = tmp_path / "sys.yaml"
    recipe.write_text(f"n_ctx: 2048\nprefix:\n  - system: {SYSTEM['content']!r}\n")
    args = ["--n-ctx", "2048", *(["--store-key", KEY_A] if how == "option" else []), "prewarm"]
    env = {"PREFIXCACHE_DIR": str(store), **({STORE_KEY_ENV: KEY_A} if how == "env" else {})}
    result = CliRunner().invoke(app, [*args, str(recipe)], env=env)
    assert result.exit_code == 0, result.output
    written = open_store(store)
    try:
        segments = list(written.segments())
        assert segments
        for seg in segments:
            data = bytearray(seg.nbytes)
            written.read_kv(seg, memoryview(data))
            Integrity(KEY_A).verify(seg, data)
    finally:
        written.close()
