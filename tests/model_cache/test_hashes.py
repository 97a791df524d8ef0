"""sha256 / A1111 short hash, computed once per file version."""

import hashlib
import json
import os
import threading

import pytest

from model_cache import hashes
from model_cache.hashes import HashCache, file_hashes


@pytest.fixture
def counted(monkeypatch):
    """Count real hash computations (each one reads the whole file)."""
    calls = []
    real = hashes.sha256_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(hashes, "sha256_file", counting)
    return calls


def test_matches_hashlib_and_short_is_first_10(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # spans several 1 MiB reads, not a multiple
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    sha, short = file_hashes(path)
    assert sha == hashlib.sha256(data).hexdigest()
    assert short == sha[:10] and len(short) == 10


def test_cached_second_call_does_not_reread(tmp_path, counted):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"abc" * 1000)
    cache = HashCache(tmp_path / "cache")
    first = cache.file_hashes(path)
    second = cache.file_hashes(path)
    assert first == second and len(counted) == 1
    # A new cache object (a restarted worker) reads the sidecar instead of the file.
    again = HashCache(tmp_path / "cache").file_hashes(path)
    assert again == first and len(counted) == 1
    sidecar = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert sidecar[os.path.realpath(path)]["sha256"] == first[0]


def test_changed_file_is_rehashed(tmp_path, counted):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"a" * 100)
    cache = HashCache(tmp_path)
    before = cache.file_hashes(path)
    path.write_bytes(b"b" * 100)  # same size: the mtime_ns is what tells
    os.utime(path, ns=(1, 1))
    after = cache.file_hashes(path)
    assert before != after and after[0] == hashlib.sha256(b"b" * 100).hexdigest()
    assert len(counted) == 2


def test_concurrent_calls_hash_once(tmp_path, counted):
    path = tmp_path / "m.safetensors"
    path.write_bytes(os.urandom(2 * 1024 * 1024))
    cache = HashCache(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.file_hashes(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert len(counted) == 1


def test_damaged_sidecar_is_ignored(tmp_path):
    (tmp_path / "hashes.json").write_text("{not json")
    path = tmp_path / "m.pt"
    path.write_bytes(b"x")
    assert HashCache(tmp_path).file_hashes(path)[0] == hashlib.sha256(b"x").hexdigest()
    assert json.loads((tmp_path / "hashes.json").read_text())  # rewritten whole
