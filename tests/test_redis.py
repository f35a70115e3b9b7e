"""The shared store on Redis: real redis-server processes on loopback, the real model.

Store level: round trips in parts, idempotent and racing puts, writes cut short, gc, pins, docs,
usage, locks, quota and cluster hash slots. Cache level: a worker restores what another pinned
through Redis into an empty local tier, and carries on through a Redis outage and restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import SYSTEM
from redis.crc import key_slot

from prefixcache import ConfigError, CorruptSegmentError, DiskStore, Pin, Segment, StoreError
from prefixcache.lifecycle import enforce_quota
from prefixcache.recipes import load_recipe
from prefixcache.segment import checksum, root_key, segment_key
from prefixcache.store import default_local_tier, open_store
from prefixcache.store.redis import RedisStore, StoreUnavailableError
from prefixcache.store.tiered import TieredStore
from prefixcache.template import ChatTemplate

ROOT = root_key("f" * 32)
WORKER = Path(__file__).parent / "workers" / "redis_worker.py"
RECIPE = Path(__file__).parent.parent / "recipes" / "support-bot.yaml"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = random.randrange(20000, 50000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


class RedisServer:
    """A real redis-server on loopback, started and killed by the test."""

    def __init__(self, workdir: Path, *options: str):
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            pytest.fail(
                "redis-server is not installed: these tests need a real server "
                "(apt-get install redis-server; .ci/run installs it)"
            )
        self.binary = binary
        self.port = _free_port()
        self.workdir = workdir
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        args += ["no", "--daemonize", "no", "--maxmemory-policy", "noeviction", *self.options]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, *args], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.AuthenticationError:
                break  # up, and wants a password
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"redis-server did not start on {self.port}:\n{log}"
                    ) from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def url(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"redis://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis")
    yield srv
    srv.kill()


@pytest.fixture
def rstore(server: RedisServer) -> Iterator[RedisStore]:
    store = RedisStore(server.url(part_mb="0.25"))
    yield store
    store.close()


def make_segment(parent: str, start: int, tokens: list[int], size: int) -> tuple[Segment, bytes]:
    data = os.urandom(size)
    seg = Segment(
        key=segment_key(parent, tokens),
        parent=parent,
        root=ROOT,
        start=start,
        tokens=tuple(tokens),
        nbytes=size,
        checksum=checksum(data),
        fingerprint="f" * 32,
        created=time.time(),
    )
    return seg, data


def put(store: Any, parent: str, start: int, tokens: list[int], size: int = 1000) -> str:
    seg, data = make_segment(parent, start, tokens, size)
    store.put(seg, data)
    return seg.key


def segment_records(server: RedisServer) -> set[str]:
    """Every Redis key of every segment (not the index keys)."""
    names = {k.decode() for k in server.client().scan_iter(match="pc:{*")}
    return {n for n in names if not n.startswith("pc:{idx}")}


def read(store: Any, seg: Segment) -> bytes:
    buf = bytearray(seg.nbytes)
    store.read_kv(seg, memoryview(buf))
    return bytes(buf)


# store level --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1000, 256 * 1024, 3 * 256 * 1024 + 17])
def test_segments_round_trip_in_parts(rstore: RedisStore, size: int):
    seg, data = make_segment(ROOT, 0, [1, 2, 3], size)
    gen = rstore.generation()
    assert rstore.put(seg, data)
    assert rstore.get(seg.key) == seg
    assert read(rstore, seg) == data
    assert rstore.keys() == {seg.key}
    assert [s.key for s in rstore.segments()] == [seg.key]
    assert rstore.total_bytes() == size
    assert rstore.generation() == gen + 1  # what the cache expects after one new segment
    parts = [k for k in rstore.segment_keys(seg.key) if ":kv:" in k]
    assert len(parts) == -(-size // (256 * 1024))


def test_puts_are_idempotent_even_when_racing(server: RedisServer, rstore: RedisStore):
    seg, data = make_segment(ROOT, 0, [7, 8], 600_000)
    stores = [RedisStore(server.url(part_mb="0.25")) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    results: list[bool] = []

    def race(store: RedisStore) -> None:
        barrier.wait()
        results.append(store.put(seg, data))

    threads = [threading.Thread(target=race, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert not rstore.put(seg, data)
    assert rstore.total_bytes() == 600_000
    assert int(server.client().get("pc:{idx}:generation")) == 1
    # The losers removed their parts: only the published write's keys remain.
    assert segment_records(server) == set(rstore.segment_keys(seg.key))
    assert read(rstore, seg) == data


def test_interrupted_write_is_invisible_and_reclaimed_by_gc(
    server: RedisServer, rstore: RedisStore
):
    seg, data = make_segment(ROOT, 0, [4, 5, 6], 700_000)
    # What a put that died before publishing leaves: parts, no meta.
    parts = rstore.part_names(seg.key, "deadbeef", seg.nbytes)
    rstore.write_parts(parts, memoryview(data))
    client = server.client()
    assert all(client.pttl(p) > 0 for p in parts)  # they expire by themselves too
    assert rstore.get(seg.key) is None and rstore.keys() == set()
    assert rstore.total_bytes() == 0
    with pytest.raises(CorruptSegmentError):
        read(rstore, seg)
    # Young parts may belong to a write still running: gc leaves them.
    assert rstore.gc().orphans == 0
    assert all(client.exists(p) for p in parts)
    impatient = RedisStore(server.url(part_mb="0.25"), orphan_grace=0)
    report = impatient.gc()
    assert (report.orphans, report.bytes_freed) == (1, 700_000)
    assert not any(client.exists(p) for p in parts)
    assert rstore.put(seg, data) and read(rstore, seg) == data


def test_gc_removes_segments_whose_parts_are_gone(server: RedisServer, rstore: RedisStore):
    seg, data = make_segment(ROOT, 0, [9], 600_000)
    keep = put(rstore, ROOT, 0, [10], 5000)
    rstore.put(seg, data)
    part = next(k for k in rstore.segment_keys(seg.key) if k.endswith(":1"))
    server.client().delete(part)  # what an evicting Redis (wrong maxmemory-policy) would do
    with pytest.raises(CorruptSegmentError, match="part 1"):
        read(rstore, seg)
    report = RedisStore(server.url(part_mb="0.25"), orphan_grace=0).gc()
    assert report.broken == 1 and report.orphans == 1
    assert rstore.get(seg.key) is None and rstore.keys() == {keep}
    assert rstore.total_bytes() == 5000
    assert segment_records(server) == set(rstore.segment_keys(keep))


def test_gc_indexes_a_segment_published_by_a_writer_that_died(
    server: RedisServer, rstore: RedisStore
):
    key = put(rstore, ROOT, 0, [11, 12], 3000)
    client = server.client()
    client.srem("pc:{idx}:segments", key)  # died between publishing and indexing
    client.decrby("pc:{idx}:bytes", 3000)
    assert rstore.keys() == set() and rstore.get(key) is not None
    gen = rstore.generation()
    assert rstore.gc().broken == 0
    assert rstore.keys() == {key} and rstore.total_bytes() == 3000
    assert rstore.generation() > gen


def test_generation_changes_when_the_server_starts_over(server: RedisServer, rstore: RedisStore):
    put(rstore, ROOT, 0, [1])
    before = rstore.generation()
    server.client().flushall()  # or a restart without persistence
    assert rstore.generation() != before
    put(rstore, ROOT, 0, [2])
    assert int(server.client().get("pc:{idx}:generation")) == 1  # the counter starts over
    assert rstore.generation() != before


def test_pins_docs_usage_and_delete(rstore: RedisStore):
    a = put(rstore, ROOT, 0, [1, 2], 2000)
    b = put(rstore, a, 2, [3], 1000)
    gen = rstore.generation()
    rstore.set_pin(Pin("p", b, ROOT, 3, 1.0, extra={"k": 1}))
    assert rstore.generation() == gen + 1
    assert rstore.pins() == [Pin("p", b, ROOT, 3, 1.0, extra={"k": 1})]
    assert rstore.delete_pin(ROOT, "p") and not rstore.delete_pin(ROOT, "p")
    assert rstore.pins() == [] and rstore.generation() == gen + 2
    rstore.set_doc("calibration:x", {"rate": 1.5})
    assert rstore.get_doc("calibration:x") == {"rate": 1.5}
    assert rstore.get_doc("missing") is None
    rstore.touch(b, 10.0)
    rstore.touch(b, 20.0)
    use = rstore.usage()[b]
    assert (use.hits, use.last_used) == (2, 20.0)
    assert rstore.delete(b) == 1000 and rstore.delete(b) == 0
    assert b not in rstore.usage() and rstore.keys() == {a}
    assert rstore.total_bytes() == 2000 and rstore.generation() == gen + 3


def test_quota_eviction_on_redis_never_evicts_pins(rstore: RedisStore):
    base = put(rstore, ROOT, 0, [1, 2])
    pinned_leaf = put(rstore, base, 2, [3])
    old_leaf = put(rstore, base, 2, [4])
    mid = put(rstore, base, 2, [5])
    new_leaf = put(rstore, mid, 3, [6])
    rstore.set_pin(Pin("p", pinned_leaf, ROOT, 3, time.time()))
    now = time.time()
    for key, age in [(old_leaf, 300), (mid, 200), (new_leaf, 100)]:
        rstore.touch(key, now - age)
    assert enforce_quota(rstore, 3000, now).evicted == (old_leaf, new_leaf)
    assert enforce_quota(rstore, 1000, now).evicted == (mid,)
    assert rstore.keys() == {base, pinned_leaf} and rstore.total_bytes() == 2000


def test_lock_is_exclusive_expires_and_is_released_only_by_its_holder(
    server: RedisServer, rstore: RedisStore
):
    other = RedisStore(server.url())
    with (
        rstore.lock("evict", timeout=5),
        pytest.raises(StoreError, match="timed out"),
        other.lock("evict", timeout=0.3),
    ):
        pass
    with other.lock("evict", timeout=0.3):
        pass
    # A holder that outlived its lease must not release the next holder's lock.
    client = server.client()
    with rstore.lock("slow", timeout=0.2):
        time.sleep(0.3)
        with other.lock("slow", timeout=5):
            token = client.get("pc:{idx}:lock:slow")
    assert client.get("pc:{idx}:lock:slow") is None and token is not None
    with other.lock("slow2", timeout=5):
        held = client.get("pc:{idx}:lock:slow2")
        cm = rstore.lock("slow2", timeout=0.2)
        with pytest.raises(StoreError):
            cm.__enter__()
        assert client.get("pc:{idx}:lock:slow2") == held
    # A holder on this host whose process is gone is replaced at once.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    client.set("pc:{idx}:lock:orphan", f"{socket.gethostname()}:{int(dead.stdout)}:x", px=600_000)
    t0 = time.monotonic()
    with rstore.lock("orphan", timeout=5):
        pass
    assert time.monotonic() - t0 < 1


def test_every_key_of_a_segment_maps_to_one_cluster_slot(server: RedisServer, rstore: RedisStore):
    keys = [put(rstore, ROOT, 0, [i], 600_000) for i in range(3)]
    rstore.set_pin(Pin("p", keys[0], ROOT, 1, 1.0))
    rstore.touch(keys[0], 1.0)
    rstore.set_doc("d", {})
    with rstore.lock("x"):
        written = [k.decode() for k in server.client().keys("pc:*")]
    slots: dict[str, set[int]] = {}
    for name in written:
        tag = name.split("{", 1)[1].split("}", 1)[0]
        slots.setdefault(tag, set()).add(key_slot(name.encode()))
    assert set(slots) == {*keys, "idx"}
    assert all(len(s) == 1 for s in slots.values()), slots
    assert sum(1 for n in written if ":kv:" in n) == 3 * 3  # three parts each
    assert len({next(iter(s)) for s in slots.values()}) > 1  # segments spread over slots


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Three real redis-server nodes joined into a Redis Cluster (no replicas)."""
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not os.access(cli, os.X_OK):
        pytest.fail("redis-cli is not installed (it comes with apt-get install redis-server)")
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            conf = f"nodes-{i}.conf"
            nodes.append(
                RedisServer(
                    tmp_path / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file", conf
                )
            )
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while any(
            n.client().execute_command("CLUSTER INFO")["cluster_state"] != "ok" for n in nodes
        ):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


def test_store_works_on_a_redis_cluster(cluster: list[RedisServer]):
    store = RedisStore(cluster[0].url(cluster="1", part_mb="0.25"), orphan_grace=0)
    segs = [make_segment(ROOT, 0, [i], 600_000) for i in range(6)]
    for seg, data in segs:
        assert store.put(seg, data)
    assert store.keys() == {s.key for s, _ in segs}
    assert all(read(store, seg) == data for seg, data in segs)
    assert len(list(store.segments())) == 6 and store.total_bytes() == 6 * 600_000
    # The segments spread over the nodes: every multi-key step stayed in one slot.
    assert sum(1 for n in cluster if n.client().dbsize() > 0) >= 2
    store.set_pin(Pin("p", segs[0][0].key, ROOT, 1, time.time()))
    store.touch(segs[1][0].key, time.time())
    with store.lock("evict", timeout=5):
        pass
    store.write_parts(store.part_names(segs[1][0].key, "dead", 600_000), memoryview(segs[1][1]))
    assert store.gc().orphans == 1
    evicted = enforce_quota(store, 2 * 600_000, time.time()).evicted
    assert len(evicted) == 4 and segs[0][0].key not in evicted
    remaining = store.keys()
    assert segs[0][0].key in remaining and len(remaining) == 2
    assert store.total_bytes() == 1_200_000
    health = store.health()  # INFO memory of every node
    assert health.writable and health.used_bytes and health.limit_bytes is None


def test_prefix_keeps_two_stores_apart(server: RedisServer):
    a = RedisStore(server.url(prefix="a"))
    b = RedisStore(server.url(prefix="b"))
    key = put(a, ROOT, 0, [1])
    assert a.keys() == {key} and b.keys() == set() and b.get(key) is None


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:notaport/0",
        "redis://",
        "redis:///0",
        "unix://",
        "redis://h/0?prefix=a{b}",
        "redis://h/0?prefix=",
        "redis://h/0?local=",
        "redis://h/0?part_mb=lots",
        "redis://h/0?retry_after=soon",
        "redis://h/0?local_gb=lots",
        "redis://h/0?write_back_mb=-1",
        "redis://h/0?local_gb=inf",
        "redis://h/0?prefix=a&prefix=b",
        "redis://h/0?a=1&&b",
    ],
)
def test_malformed_urls_are_config_errors(url: str):
    with pytest.raises(ConfigError, match="redis URL"):
        open_store(url)


def test_open_store_picks_the_tiers(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    assert type(open_store(server.url(local="none"))) is RedisStore
    tiered = open_store(server.url(local=str(tmp_path / "tier")))
    assert isinstance(tiered, TieredStore) and tiered.local.path == tmp_path / "tier"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = open_store(server.url(prefix="team"))
    assert isinstance(default, TieredStore)
    assert default.local.path == default_local_tier(server.url(prefix="team"))
    assert default.local.path.parent == tmp_path / "xdg" / "prefixcache-redis"
    assert default_local_tier(server.url(prefix="x")) != default.local.path
    monkeypatch.setenv("PREFIXCACHE_DIR", server.url(local="none"))
    assert type(open_store()) is RedisStore
    assert type(open_store(tmp_path / "plain")) is DiskStore


def test_tiers_read_through_and_write_through(server: RedisServer, tmp_path: Path):
    remote = RedisStore(server.url())
    seg, data = make_segment(ROOT, 0, [1, 2, 3], 500_000)
    remote.put(seg, data)
    tiered = TieredStore(DiskStore(tmp_path / "tier"), RedisStore(server.url()))
    assert tiered.local.keys() == set() and tiered.keys() == {seg.key}
    assert tiered.get(seg.key) == seg
    assert read(tiered, seg) == data
    tiered.flush()
    assert tiered.local.keys() == {seg.key}  # fetched once, kept here
    # Served from the local tier now: the remote's bytes are not needed any more.
    for name in remote.segment_keys(seg.key)[1:]:
        server.client().delete(name)
    assert read(tiered, seg) == data
    # Writes go to both tiers; deletes too.
    mine, mine_data = make_segment(ROOT, 0, [4], 1000)
    assert tiered.put(mine, mine_data)
    assert remote.get(mine.key) == mine and tiered.local.get(mine.key) == mine
    tiered.set_pin(Pin("p", mine.key, ROOT, 1, 1.0))
    assert [p.name for p in remote.pins()] == ["p"]
    assert tiered.delete(mine.key) == 1000
    assert remote.get(mine.key) is None and tiered.local.get(mine.key) is None
    # gc drops local copies of what the remote no longer has.
    remote.delete(seg.key)
    tiered.gc()
    assert tiered.local.keys() == set()


def test_a_damaged_local_copy_is_fetched_again_not_quarantined(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    tiered = TieredStore(DiskStore(tmp_path / "tier"), RedisStore(server.url()))
    seg, data = make_segment(ROOT, 0, [1, 2], 300_000)
    tiered.put(seg, data)
    tiered.local.delete(seg.key)
    tiered.local.put(seg, os.urandom(seg.nbytes))  # same metadata, rotten bytes
    assert read(tiered, seg) == data
    assert any("dropping the local copy" in r.getMessage() for r in caplog.records)
    assert tiered.get(seg.key) == seg  # still stored, for everyone
    tiered.flush()
    assert read(tiered.local, seg) == data  # and repaired here


def test_wrong_credentials_are_an_error_not_an_outage(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", "--requirepass", "right")
    try:
        url = f"redis://:Guess1234@127.0.0.1:{server.port}/0?local={tmp_path / 'tier'}"
        with pytest.raises(StoreError, match="credentials") as caught:
            open_store(url)
        assert "Guess1234" not in str(caught.value)  # passwords stay out of messages
        good = open_store(url.replace("Guess1234", "right"))
        assert isinstance(good, TieredStore) and good.remote_up
    finally:
        server.kill()


def test_tiers_survive_an_outage_with_one_warning(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    shared, shared_data = make_segment(ROOT, 0, [1], 2000)
    remote_only, remote_data = make_segment(ROOT, 0, [2], 2000)
    tiered = TieredStore(DiskStore(tmp_path / "tier"), RedisStore(server.url()), retry_after=0.2)
    tiered.put(shared, shared_data)
    RedisStore(server.url()).put(remote_only, remote_data)
    assert tiered.keys() == {shared.key, remote_only.key}
    gen_up = tiered.generation()
    server.kill()
    caplog.clear()
    gen_down = tiered.generation()
    assert gen_down != gen_up and not tiered.remote_up
    assert tiered.keys() == {shared.key}  # the local tier alone
    assert read(tiered, shared) == shared_data
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        read(tiered, remote_only)  # a StoreError (the cache prefills), never "corrupt"
    later, later_data = make_segment(ROOT, 0, [3], 100)
    assert tiered.put(later, later_data)
    assert tiered.generation() == gen_down + 1  # one new local segment, as the cache expects
    with tiered.lock("evict", timeout=1):
        pass
    time.sleep(0.3)  # past the retry delay: the next call tries the server again, and fails
    assert tiered.pins() == [] and tiered.usage() == {}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    # Unreachable at open time: one warning, then the local tier.
    caplog.clear()
    fresh = TieredStore(DiskStore(tmp_path / "tier"), RedisStore(server.url()))
    assert fresh.keys() == {shared.key, later.key}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    server.start()
    time.sleep(0.3)
    caplog.clear()
    assert tiered.keys() == set()  # a new, empty server (no persistence in this test)
    assert tiered.remote_up and tiered.generation() not in (gen_up, gen_down + 1)
    assert [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]


# cache level: worker processes on the real model -------------------------------------------


class Worker:
    """A redis_worker.py process: one JSON command in, one JSON answer out."""

    def __init__(self, url: str, log_path: Path):
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.log.flush()
            pytest.fail(f"worker gave no answer: {Path(self.log.name).read_text()[-3000:]}")
        return line.strip()

    def send(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._line(120))
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    started: list[Worker] = []

    def start(url: str) -> Worker:
        worker = Worker(url, tmp_path / f"worker{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def warnings_of(answer: dict[str, Any]) -> list[str]:
    return [r["message"] for r in answer["logs"] if r["level"] in ("WARNING", "ERROR")]


@pytest.fixture(scope="module")
def recipe() -> Any:
    return load_recipe(RECIPE)


@pytest.fixture
def cold(cold_llm: Any, cold_reply: Any) -> Any:
    """The cold reference for a conversation with tools, rendered as prefixcache renders it."""
    template = ChatTemplate(cold_llm)

    def reply(messages: list[dict[str, Any]], tools: Any = None, max_tokens: int = 16) -> str:
        msgs, tool_arg = template.messages_for(messages, tools)
        extra = {"tools": tool_arg} if tool_arg else {}
        return str(cold_reply(msgs, max_tokens=max_tokens, **extra))

    return reply


def test_a_worker_restores_what_another_pinned_through_redis(
    server: RedisServer, tmp_path: Path, workers: Any, recipe: Any, cold: Any
):
    pinner = workers(server.url(local=str(tmp_path / "a")))
    pinned = pinner.send(op="pin", recipe=str(RECIPE))
    assert pinned["evaluated"] == pinned["n_tokens"] > 500
    second = tmp_path / "b"
    assert not second.exists()
    reader = workers(server.url(local=str(second)))
    messages = [*recipe.messages, {"role": "user", "content": "Where is my order BB-10422?"}]
    answer = reader.send(op="chat", messages=messages, tools=recipe.tools, max_tokens=16)
    assert answer["cached"] >= pinned["n_tokens"] - 1
    assert answer["restored"] >= pinned["n_tokens"] - 1
    assert answer["content"] == cold(messages, recipe.tools)
    assert answer["corrupt"] == 0 and warnings_of(answer) == []
    # Read through: the pinned chain is in the reader's own tier now.
    reader.close()
    assert pinned["key"] in DiskStore(second).keys()  # noqa: SIM118 (a set, not a dict)


def test_workers_ride_out_a_redis_outage_and_share_again_after(
    server: RedisServer, tmp_path: Path, workers: Any, cold: Any
):
    def url(tier: str) -> str:
        return server.url(local=str(tmp_path / tier), retry_after="0.5")

    # One quarter of the usual system prompt: this test is about the store, not the prefill.
    system = {"role": "system", "content": SYSTEM["content"][: len(SYSTEM["content"]) // 4]}

    def ask(question: str) -> list[dict[str, str]]:
        return [system, {"role": "user", "content": question}]

    pinner = workers(url("a"))
    reader = workers(url("b"))
    pinned = pinner.send(op="pin", messages=[system], name="shared")
    first = reader.send(op="chat", max_tokens=8, messages=ask("Do you cut timber?"))
    assert first["restored"] >= pinned["n_tokens"] - 1 and warnings_of(first) == []

    server.kill()
    during = reader.send(op="chat", max_tokens=8, messages=ask("When do you open?"))
    assert during["remote_up"] is False
    assert during["cached"] >= pinned["n_tokens"] - 1  # from the local tier
    assert during["content"] == cold(ask("When do you open?"), max_tokens=8)
    [warning] = warnings_of(during)
    assert "unreachable" in warning
    time.sleep(0.6)  # past the retry delay: the next call tries again, fails, says nothing
    again = reader.send(op="chat", max_tokens=8, messages=ask("Do you sell paint?"))
    assert again["cached"] >= pinned["n_tokens"] - 1
    assert again["content"] == cold(ask("Do you sell paint?"), max_tokens=8)
    assert warnings_of(again) == [warning]
    # A worker started during the outage, with nothing local: a cold prefill, correct output.
    newcomer = workers(url("c"))
    cold_start = newcomer.send(op="chat", max_tokens=8, messages=ask("Do you cut timber?"))
    assert cold_start["cached"] == 0 and cold_start["content"] == first["content"]
    assert len(warnings_of(cold_start)) == 1

    server.start()  # same port, empty (no persistence here)
    time.sleep(0.6)
    fresh = [*ask("Any nails?"), {"role": "assistant", "content": "Yes."}]
    fresh += [{"role": "user", "content": "Which sizes?"}]
    written = pinner.send(op="chat", max_tokens=8, messages=fresh)
    assert warnings_of(written) == []
    shared = reader.send(op="chat", max_tokens=8, messages=fresh)
    assert shared["remote_up"] is True
    # Restored from a segment the other worker wrote after the restart (not in b's tier).
    assert shared["restored"] > pinned["n_tokens"] + 10
    assert shared["content"] == written["content"] == cold(fresh, max_tokens=8)
    assert warnings_of(shared) == [warning]
    assert any("reachable again" in r["message"] for r in shared["logs"])


def test_a_full_redis_still_serves_restores_and_new_segments_stay_local(
    tmp_path: Path, workers: Any, cold: Any
):
    from test_store_full import fill, make_room

    from prefixcache.status import collect

    server = RedisServer(tmp_path / "full", "--maxmemory", "48mb")
    try:

        def url(tier: str) -> str:
            return server.url(local=str(tmp_path / tier), retry_after="0.5")

        system = {"role": "system", "content": SYSTEM["content"][: len(SYSTEM["content"]) // 4]}
        # Long enough that autosave stores it (it skips spans cheaper to prefill than restore).
        order = "I would like to order the following: " + ", ".join(
            f"{n} boxes of {3 * n + 4} mm screws" for n in range(2, 30)
        )
        first_turn = [system, {"role": "user", "content": order}]
        pinner = workers(url("a"))
        pinned = pinner.send(op="pin", messages=[system], name="shared")
        filled = fill(server)
        shared_before = RedisStore(server.url()).keys()

        reader = workers(url("b"))
        first = reader.send(op="chat", max_tokens=8, messages=first_turn)
        # A hit from the full store, and the answer of a cold run.
        assert first["restored"] >= pinned["n_tokens"] - 1
        assert first["content"] == cold(first_turn, max_tokens=8)
        [warning] = warnings_of(first)  # said once, as a warning, and nothing raised
        assert "refuses writes" in warning
        assert first["store"]["touches_skipped"] >= 1 and first["store"]["kept_local"] >= 1
        assert RedisStore(server.url()).keys() == shared_before  # nothing new in Redis

        # After another conversation, the next turn restores the turn that stayed in this
        # worker's local tier (its KV is no longer live).
        between = reader.send(
            op="chat", max_tokens=4, messages=[system, {"role": "user", "content": "Hi"}]
        )
        assert between["cached"] >= pinned["n_tokens"] - 1
        second_turn = [*first_turn, {"role": "assistant", "content": first["content"]}]
        second_turn.append({"role": "user", "content": "How soon can you deliver?"})
        second = reader.send(op="chat", max_tokens=8, messages=second_turn)
        assert second["cached"] >= first["prompt_tokens"] - 8
        assert second["restored"] > 100
        assert second["content"] == cold(second_turn, max_tokens=8)
        assert warnings_of(second) == [warning]

        status = collect(open_store(url("status")))
        assert status.shared is not None and not status.shared.writable
        assert "full" in status.notes[0] and [p.name for p in status.pins] == ["shared"]

        # With room again, new segments are shared again.
        make_room(server, filled)
        time.sleep(0.6)
        other = [system, {"role": "user", "content": order.replace("screws", "nails")}]
        third = reader.send(op="chat", max_tokens=8, messages=other)
        assert third["content"] == cold(other, max_tokens=8)
        assert len(RedisStore(server.url()).keys()) > len(shared_before)
        assert any("room again" in r["message"] for r in third["logs"])
        assert collect(open_store(url("status"))).notes == []
    finally:
        server.kill()
