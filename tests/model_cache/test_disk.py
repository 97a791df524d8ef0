"""The disk tier's accounting with files of known byte size: LRU order, pins, budget, floor, restarts."""

import json
import os
from collections import namedtuple

import pytest

from model_cache.disk import DiskCache
from model_cache.sizes import format_size, parse_size
from pipelines.errors import InsufficientStorage

Usage = namedtuple("Usage", "total used free")


class Clock:
    """A wall clock the test moves by hand: LRU order must not depend on timing luck."""

    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        self.now += 1
        return self.now


def roomy(_path):
    return Usage(10**12, 0, 10**12)


def cache(tmp_path, budget=1000, min_free=0, clock=None, disk_usage=roomy):
    return DiskCache(tmp_path, budget=budget, min_free=min_free, clock=clock or Clock(), disk_usage=disk_usage)


def put(disk: DiskCache, key: str, size: int) -> None:
    """What the store does for one download: reserve, write the file, commit."""
    with disk.reserve(key, size, f"model {key}"):
        path = disk.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        disk.commit(key, size, [key])


def keys(disk):
    return sorted(row["name"] for row in disk.snapshot())


def test_lru_eviction_order_under_budget_pressure(tmp_path):
    disk = cache(tmp_path, budget=1000)
    for key in ("b/a", "b/b", "b/c"):
        put(disk, key, 300)
    disk.hit("b/a")  # a is now the most recently used: b goes first, then c
    put(disk, "b/d", 300)
    assert keys(disk) == ["b/a", "b/c", "b/d"]
    assert not (tmp_path / "b" / "b").exists()
    put(disk, "b/e", 600)  # needs two evictions: c (oldest), then a
    assert keys(disk) == ["b/d", "b/e"]
    stats = disk.stats()
    assert stats["evictions"] == 3 and stats["bytes_evicted"] == 900 and stats["hits"] == 1
    assert stats["bytes"] == 900 and stats["budget"] == 1000


def test_eviction_follows_last_use_exactly(tmp_path):
    disk = cache(tmp_path, budget=400)
    for key in ("m/1", "m/2", "m/3", "m/4"):
        put(disk, key, 100)
    for key in ("m/3", "m/1", "m/4", "m/2"):  # use order: 3 is now the least recently used
        disk.hit(key)
    evicted = []
    for n in range(4):
        before = set(keys(disk))
        put(disk, f"n/{n}", 100)
        evicted += sorted(before - set(keys(disk)))
    assert evicted == ["m/3", "m/1", "m/4", "m/2"]


def test_budget_too_small_is_a_clear_error_and_evicts_nothing(tmp_path):
    disk = cache(tmp_path, budget=1000)
    put(disk, "b/pinned", 400)
    put(disk, "b/idle", 300)
    with disk.job_scope():
        disk.pin("b/pinned")
        with pytest.raises(InsufficientStorage) as info:
            put(disk, "b/huge", 700)  # fits only if the pinned model went
    message = info.value.message
    assert "model b/huge" in message and format_size(700) in message and format_size(1000) in message
    assert "nothing was evicted" in message
    assert keys(disk) == ["b/idle", "b/pinned"] and disk.stats()["evictions"] == 0
    assert not (tmp_path / "b" / "huge").exists()
    # Once the job is over the pin is gone, and the same download fits by evicting the LRU one.
    put(disk, "b/huge", 700)
    assert keys(disk) == ["b/huge", "b/idle"]


def test_pins_protect_in_use_models_and_scopes_release_them(tmp_path):
    disk = cache(tmp_path, budget=300)
    put(disk, "b/x", 100)
    put(disk, "b/y", 100)
    with disk.job_scope():
        disk.pin("b/x")
        assert disk.is_pinned("b/x") and [r["pinned"] for r in disk.snapshot() if r["name"] == "b/x"] == [True]
        put(disk, "b/z", 200)  # needs 100 more: y goes, x (older but pinned) stays
        assert keys(disk) == ["b/x", "b/z"]
    assert not disk.is_pinned("b/x")
    with disk.lease("b/z"):
        put(disk, "b/w", 100)  # z is older than nothing but x; leased, so x goes
    assert keys(disk) == ["b/w", "b/z"]


def test_free_space_floor(tmp_path):
    state = {"free": 1000}

    def usage(_path):
        return Usage(10_000, 10_000 - state["free"], state["free"])

    disk = cache(tmp_path, budget=10**9, min_free=600, disk_usage=usage)
    with pytest.raises(InsufficientStorage, match="free-space floor"):
        put(disk, "b/big", 500)
    put(disk, "b/ok", 400)
    assert keys(disk) == ["b/ok"]


def test_lru_survives_a_restart_and_sweep_removes_crash_leftovers(tmp_path):
    clock = Clock()
    disk = cache(tmp_path, budget=1000, clock=clock)
    for key in ("b/old", "b/mid", "b/new"):
        put(disk, key, 200)
    disk.hit("b/old")  # order now: mid < new < old
    (tmp_path / "b" / ".big.safetensors.a1b2.part").write_bytes(b"half a download")
    (tmp_path / ".meta").mkdir(exist_ok=True)
    (tmp_path / ".meta" / ".lru.json.x.tmp").write_bytes(b"{")
    index = json.loads((tmp_path / ".meta" / "lru.json").read_text())
    assert set(index["entries"]) == {"b/old", "b/mid", "b/new"}

    again = cache(tmp_path, budget=600, clock=clock)  # a new worker on the same folder
    assert [row["name"] for row in again.snapshot()] == ["b/old", "b/new", "b/mid"]
    assert not (tmp_path / "b" / ".big.safetensors.a1b2.part").exists()
    assert not (tmp_path / ".meta" / ".lru.json.x.tmp").exists()
    put(again, "b/next", 200)
    assert keys(again) == ["b/new", "b/next", "b/old"]  # mid was least recently used before the restart


def test_missing_files_are_forgotten_and_corrupt_index_ignored(tmp_path):
    disk = cache(tmp_path)
    put(disk, "b/a", 10)
    put(disk, "b/b", 10)
    os.unlink(tmp_path / "b" / "a")
    assert keys(cache(tmp_path)) == ["b/b"]
    (tmp_path / ".meta" / "lru.json").write_text("not json")
    assert keys(cache(tmp_path)) == []


def test_default_budget_and_floor_come_from_the_disk(tmp_path):
    disk = DiskCache(tmp_path, disk_usage=lambda _p: Usage(100 * 2**30, 50 * 2**30, 50 * 2**30))
    assert disk.budget == int(0.8 * 50 * 2**30)
    assert disk.min_free == 5 * 2**30
    small = DiskCache(tmp_path, disk_usage=lambda _p: Usage(20 * 2**30, 10 * 2**30, 10 * 2**30))
    assert small.min_free == 2 * 2**30


@pytest.mark.parametrize("text, value", [("20GiB", 20 * 2**30), ("500MB", 500 * 10**6), ("1.5G", int(1.5 * 2**30)), ("1048576", 2**20), (" 64 MiB ", 64 * 2**20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "1 parsec", ""])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)
