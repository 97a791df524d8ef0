"""Model file hashes, A1111 style, computed once per file version.

A1111's infotext ``Model hash`` (and the ``[0123abcdef]`` in checkpoint titles) is the
first 10 hex characters of the file's sha256. Hashing a 7 GB checkpoint costs tens of
seconds, so results are kept in ``<cache_dir>/hashes.json`` keyed by the file's real
path and invalidated when its size or mtime_ns changes (a replaced file gets a new
mtime even when its size is the same).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from model_cache.atomic import write_bytes_atomic

log = logging.getLogger(__name__)

_READ_SIZE = 1024 * 1024
SHORT_HASH_LENGTH = 10


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


class HashCache:
    """Thread-safe sha256 cache backed by a JSON sidecar, written atomically.

    Concurrent requests for the same file hash it once (a lock per file); different
    files hash in parallel.
    """

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / "hashes.json"
        self._lock = threading.Lock()  # guards _entries, _key_locks and the sidecar file
        self._key_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, dict] | None = None  # loaded lazily: no I/O in __init__

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = data if isinstance(data, dict) else {}
            except FileNotFoundError:
                self._entries = {}
            except (OSError, ValueError) as exc:
                # A damaged sidecar only costs re-hashing; never fail a request over it.
                log.warning("ignoring unreadable hash cache %s: %s", self.path, exc)
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        write_bytes_atomic(self.path, json.dumps(self._entries, indent=1, sort_keys=True).encode())

    def sha256(self, path: Path) -> str:
        """sha256 hex of ``path``, from the sidecar when size and mtime_ns still match."""
        real = os.path.realpath(path)  # symlinked aliases of one file share one entry
        with self._lock:
            key_lock = self._key_locks.setdefault(real, threading.Lock())
        with key_lock:
            stat = os.stat(real)
            with self._lock:
                entry = self._load().get(real)
            if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
                return entry["sha256"]
            digest = sha256_file(Path(real))
            with self._lock:
                self._load()[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
                try:
                    self._save()
                except OSError as exc:
                    log.warning("could not write hash cache %s: %s", self.path, exc)
            return digest

    def file_hashes(self, path: Path) -> tuple[str, str]:
        """``(sha256_hex, short_hash)``; the short hash is A1111's 10-char "Model hash"."""
        digest = self.sha256(path)
        return digest, digest[:SHORT_HASH_LENGTH]


def file_hashes(path: Path, cache: HashCache | None = None) -> tuple[str, str]:
    """``(sha256_hex, short_hash)`` of ``path``; cached in ``cache``'s sidecar when one is given."""
    if cache is not None:
        return cache.file_hashes(path)
    digest = sha256_file(Path(path))
    return digest, digest[:SHORT_HASH_LENGTH]
