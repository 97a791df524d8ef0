"""The disk tier: which downloaded model files stay on local disk, under a byte budget.

* **Budget and floor.** Cached bytes (plus downloads in flight) stay ≤ ``budget``, and the
  filesystem keeps ≥ ``min_free`` bytes free. Defaults come from the disk at start-up:
  budget = 80 % of (free space + what the cache already holds), floor = min(5 GiB, 10 % of
  the filesystem).
* **LRU, persisted.** Each entry's last use is kept in ``<root>/.meta/lru.json`` (written
  atomically), so a restarted worker evicts in the same order it would have.
* **Pins.** A model in use is never evicted. :meth:`DiskCache.job_scope` opens a scope in
  which every :meth:`pin` lasts until the scope ends (the job); :meth:`lease` pins one key
  for a ``with`` block.
* **Never half-evict for nothing.** When a download cannot fit even after evicting every
  unpinned entry, :class:`~pipelines.errors.InsufficientStorage` is raised naming the model,
  its size and the budget, and nothing is evicted.

Keys are paths relative to ``root`` ("bucket/key"); an entry may own several files (the
model, its etag record, its ``.yaml`` / ``.config/`` sidecars), all removed together.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from model_cache.atomic import write_bytes_atomic
from model_cache.sizes import format_size
from pipelines.errors import InsufficientStorage

log = logging.getLogger(__name__)

INDEX_NAME = ".meta/lru.json"
DEFAULT_BUDGET_FRACTION = 0.8
DEFAULT_FLOOR = 5 * 1024**3
DEFAULT_FLOOR_FRACTION = 0.10


@dataclass
class Entry:
    """One cached model: its bytes on disk, its last use (wall clock, survives restarts), its files."""

    size: int
    last_use: float
    files: list[str] = field(default_factory=list)
    durable: bool = True  # False until the store's background fsync of the data finished


class DiskCache:
    """LRU accounting and eviction for the files under ``root``; thread-safe."""

    def __init__(
        self,
        root: Path,
        *,
        budget: int | None = None,
        min_free: int | None = None,
        clock: Callable[[], float] = time.time,
        disk_usage: Callable[[str], object] = shutil.disk_usage,
    ):
        self.root = Path(os.path.abspath(root))
        self.root.mkdir(parents=True, exist_ok=True)
        self._clock, self._disk_usage = clock, disk_usage
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._pins: Counter[str] = Counter()
        self._reserved: dict[str, int] = {}
        self._scope: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(f"disk-scope-{id(self)}", default=None)
        self.counters: Counter[str] = Counter()
        self._load()
        self.sweep()
        usage = self._disk_usage(str(self.root))
        self.min_free = int(min_free) if min_free is not None else int(min(DEFAULT_FLOOR, DEFAULT_FLOOR_FRACTION * usage.total))
        self.budget = int(budget) if budget is not None else int(DEFAULT_BUDGET_FRACTION * (usage.free + self.used()))
        log.info(
            "disk cache %s: %d entries, %s used, budget %s, free-space floor %s",
            self.root, len(self._entries), format_size(self.used()), format_size(self.budget), format_size(self.min_free),
        )

    # -- persistence ---------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _load(self) -> None:
        try:
            data = json.loads(self.index_path.read_text())
            for key, raw in data.get("entries", {}).items():
                self._entries[key] = Entry(
                    int(raw["size"]), float(raw["last_use"]), list(raw.get("files", [key])), bool(raw.get("durable", True))
                )
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A damaged index costs LRU order, never a request: the store re-adopts what is on disk.
            log.warning("ignoring unreadable disk-cache index %s: %s", self.index_path, exc)
            self._entries = {}

    def _save(self) -> None:
        data = {
            "entries": {
                k: {"size": e.size, "last_use": e.last_use, "files": e.files, "durable": e.durable} for k, e in self._entries.items()
            }
        }
        try:
            write_bytes_atomic(self.index_path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as exc:
            log.warning("could not write disk-cache index %s: %s", self.index_path, exc)

    def sweep(self) -> int:
        """Remove what a crash may have left half-written, and forget entries whose file is gone.

        That is: temp files (``.*.part`` downloads, ``.*.tmp`` atomic writes), and entries
        not yet known durable (renamed into place, but the machine may have gone down before
        their data reached the disk: a re-download is cheaper than a silently zeroed file).
        Runs at start-up, before any download of this process; returns how many temp files went.
        """
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            # Only our downloads make ".part" files; ".tmp" ones only below the top level, where
            # other processes sharing CACHE_DIR (the HTTP side's running files) never write.
            suffixes = (".part",) if dirpath == str(self.root) else (".part", ".tmp")
            for name in filenames:
                if name.startswith(".") and name.endswith(suffixes):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
                    except OSError:
                        pass
        with self._lock:
            gone = [key for key in self._entries if not (self.root / key).is_file()]
            for key in gone:
                self._entries.pop(key)
            suspect = [key for key, entry in self._entries.items() if not entry.durable]
            for key in suspect:
                log.warning("removing %s: its download was not yet synced to disk when the last run ended", key)
                self.remove_files(self._entries.pop(key).files)
            gone += suspect
            if gone:
                self._save()
        if removed or gone:
            log.info("disk cache sweep: removed %d temp files, forgot %d missing entries", removed, len(gone))
        return removed

    # -- queries ---------------------------------------------------------------------
    def used(self) -> int:
        """Bytes of the cached entries (downloads in flight not included)."""
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            return self._pins[key] > 0

    def snapshot(self) -> list[dict]:
        """What is on disk, most recently used first: ``name``, ``bytes``, ``last_use`` (POSIX time), ``pinned``, ``durable``."""
        with self._lock:
            rows = [
                {"name": key, "bytes": entry.size, "last_use": entry.last_use, "pinned": self._pins[key] > 0, "durable": entry.durable}
                for key, entry in self._entries.items()
            ]
        return sorted(rows, key=lambda row: row["last_use"], reverse=True)

    def stats(self) -> dict:
        """Counters (``hits``, ``misses``, ``bytes_fetched``, ``evictions``, ``bytes_evicted``, ``fetch_seconds``),
        sizes (``count`` of models, ``bytes``, ``budget``, ``min_free``) and the ``pinned`` keys."""
        with self._lock:
            out = {name: self.counters[name] for name in ("hits", "misses", "bytes_fetched", "evictions", "bytes_evicted")}
            out["fetch_seconds"] = round(self.counters["fetch_seconds"], 3)
            out.update(count=len(self._entries), bytes=self.used(), budget=self.budget, min_free=self.min_free)
            out["pinned"] = sorted(key for key, count in self._pins.items() if count > 0)
        return out

    # -- use and pins ----------------------------------------------------------------
    def hit(self, key: str, *, size: int | None = None, files: list[str] | None = None) -> None:
        """Count a cache hit and mark ``key`` used now; ``size``/``files`` update what it owns (sidecars change)."""
        with self._lock:
            self.counters["hits"] += 1
            if key not in self._entries and size is not None:
                self._entries[key] = Entry(int(size), self._clock(), list(files or [key]))  # on disk, index lost
            entry = self._entries.get(key)
            if entry is not None and size is not None:
                entry.size, entry.files = int(size), list(files or entry.files)
            self.touch(key)

    def miss(self, key: str) -> None:
        with self._lock:
            self.counters["misses"] += 1

    def touch(self, key: str) -> None:
        """Mark ``key`` used now (persisted)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_use = self._clock()
                self._save()

    def pin(self, key: str) -> Callable[[], None]:
        """Protect ``key`` from eviction. Inside :meth:`job_scope` the pin lasts until the scope ends.

        Returns a function that drops this pin early (a no-op once the scope released it).
        """
        with self._lock:
            self._pins[key] += 1
        scope = self._scope.get()
        released = threading.Event()
        if scope is not None:
            scope.append(key)

        def unpin() -> None:
            if released.is_set():
                return
            released.set()
            if scope is not None:
                try:
                    scope.remove(key)
                except ValueError:
                    return  # the scope already released it
            self._unpin(key)

        return unpin

    def _unpin(self, key: str) -> None:
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    @contextmanager
    def lease(self, key: str) -> Iterator[None]:
        """``with cache.lease(key):`` — ``key`` cannot be evicted inside the block."""
        unpin = self.pin(key)
        try:
            yield
        finally:
            unpin()

    def in_scope(self) -> bool:
        """True inside :meth:`job_scope` (in this thread/context)."""
        return self._scope.get() is not None

    @contextmanager
    def job_scope(self) -> Iterator[None]:
        """Every pin taken inside (by this thread/context) is held until the block ends."""
        pins: list[str] = []
        token = self._scope.set(pins)
        try:
            yield
        finally:
            self._scope.reset(token)
            while pins:
                self._unpin(pins.pop())

    # -- space -------------------------------------------------------------------------
    @contextmanager
    def reserve(self, key: str, size: int, label: str) -> Iterator[None]:
        """Make room for ``size`` bytes under ``key`` (evicting LRU unpinned entries) and hold it while the block runs.

        ``label`` names the model in errors. Raises InsufficientStorage, evicting nothing,
        when even an empty (unpinned) cache could not take it. The caller :meth:`commit`s
        inside the block once the file is in place; leaving the block drops the reservation.
        """
        with self._lock:
            self._make_room(key, size, label)
            self._reserved[key] = size
        try:
            yield
        finally:
            with self._lock:
                self._reserved.pop(key, None)

    def _free(self) -> int:
        return int(self._disk_usage(str(self.root)).free)

    def _make_room(self, key: str, size: int, label: str) -> None:
        current = self._entries.get(key)
        replacing = current.size if current is not None else 0  # a new version replaces the old file
        in_flight = sum(self._reserved.values())
        victims = sorted(
            (k for k in self._entries if k != key and self._pins[k] <= 0),
            key=lambda k: self._entries[k].last_use,
        )
        evictable = sum(self._entries[k].size for k in victims)
        pinned = self.used() - evictable - replacing
        need_budget = pinned + in_flight + size
        # Free space after evicting everything evictable. Downloads write sparse files, so
        # bytes still in flight are not yet taken from the filesystem: count them here.
        best_free = self._free() + evictable + replacing - in_flight
        if need_budget > self.budget or best_free - size < self.min_free:
            if need_budget > self.budget:
                why = (
                    f"the disk cache budget is {format_size(self.budget)} "
                    f"({format_size(pinned + in_flight)} held by models in use or downloading)"
                )
            else:
                why = f"the disk would keep less than the {format_size(self.min_free)} free-space floor ({format_size(self._free())} free now)"
            raise InsufficientStorage(f"{label} ({format_size(size)}) does not fit: {why}; nothing was evicted")
        for victim in victims:
            used = self.used() - replacing
            if used + in_flight + size <= self.budget and self._free() + replacing - in_flight - size >= self.min_free:
                return
            self._evict(victim, reason=f"room for {label}")

    def _evict(self, key: str, *, reason: str) -> None:
        entry = self._entries.pop(key)
        started = time.perf_counter()
        self.remove_files(entry.files or [key])
        self.counters["evictions"] += 1
        self.counters["bytes_evicted"] += entry.size
        self._save()
        log.info(
            "evicted %s (%s, last used %.0f s ago) for %s in %.3f s",
            key, format_size(entry.size), self._clock() - entry.last_use, reason, time.perf_counter() - started,
        )

    def remove_files(self, files: list[str]) -> None:
        """Delete files (and folders, for ``.config/`` sidecars) under root, then their emptied parent folders."""
        for rel in files:
            path = self.root / rel
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
            parent = path.parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()  # only succeeds when empty
                except OSError:
                    break
                parent = parent.parent

    def commit(
        self, key: str, size: int, files: list[str] | None = None, *, seconds: float = 0.0, durable: bool = True, count: bool = True
    ) -> None:
        """Record a freshly downloaded ``key`` of ``size`` bytes owning ``files``, used now.

        ``durable=False``: the data may still be in the page cache only; :meth:`mark_durable`
        once it was fsynced, else the next start-up removes it. ``count=False`` records without
        adding to the fetch counters (a first, provisional record of the same download).
        """
        with self._lock:
            self._entries[key] = Entry(int(size), self._clock(), list(files or [key]), durable)
            if count:
                self.counters["bytes_fetched"] += int(size)
                self.counters["fetch_seconds"] += seconds
            self._save()

    def mark_durable(self, key: str) -> None:
        """``key``'s data reached the disk (fsync done): it survives a restart."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.durable:
                entry.durable = True
                self._save()

    def adopt(self, key: str, size: int, last_use: float, files: list[str]) -> None:
        """Track a file already on disk (cached before the index existed, or the index was lost)."""
        with self._lock:
            if key not in self._entries:
                self._entries[key] = Entry(int(size), float(last_use), list(files))
                self._save()

    def remove(self, key: str, files: list[str] | None = None) -> None:
        """Drop ``key`` and delete its files now (a corrupt download); pins do not protect a bad file."""
        with self._lock:
            entry = self._entries.pop(key, None)
            self.remove_files(files or (entry.files if entry else [key]))
            self._save()
