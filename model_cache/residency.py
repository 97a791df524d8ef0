"""Which loaded models stay in memory: a byte-budget LRU over a device tier ("vram") and a RAM tier.

Torch-free: what an entry weighs, how it moves and how it is dropped are
injected callbacks, so the eviction logic is tested with fakes of known size.

* With a device tier (CUDA): the entry in use lives in "vram"; evicting from
  "vram" moves the entry to the CPU (``to_ram(value, staying)``, ``staying``: the
  values that remain on or are coming to the device) and into the "ram" tier;
  evicting from "ram" drops it (``drop``). A "ram" hit moves it back (``to_device``)
  instead of reading the file again.
* Without one (CPU only, ``device_budget=None``): RAM and "VRAM" are the same
  memory, so there is one tier, "ram"; the entry in use stays where it is and
  the RAM budget covers it too.

An entry is made of *parts* (``parts(value) -> {part_id: bytes}``): a part
shared by two entries (the same VAE module behind two checkpoints) is counted
once per tier. A pinned entry (in use by a job) is never evicted; when nothing
else can go, the tier runs over its budget and the event says so.

Thread-safety: one thread (the job runner) calls :meth:`acquire` /
:meth:`release` / :meth:`refresh`; :meth:`snapshot` may be called from any
thread at any time and never waits for a load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

VRAM, RAM = "vram", "ram"


@dataclass
class TierStats:
    """Counters of one tier since start-up."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_evicted: int = 0
    bytes_in: int = 0  # bytes that came into this tier (loaded or moved)


@dataclass
class _Entry:
    key: Hashable
    value: Any
    label: str
    parts: dict[Hashable, int]
    tier: str
    last_used: float
    pins: int = 0


@dataclass
class Event:
    """What one :meth:`Residency.acquire` did: where the entry came from, what it cost, what it pushed out."""

    label: str
    source: str  # "vram" / "ram": a hit in that tier; "load": read from its file
    times: dict[str, float] = field(default_factory=dict)
    evicted: list[dict] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"label": self.label, "source": self.source, "times": dict(self.times), "evicted": list(self.evicted),
                "over_budget": list(self.over_budget)}


class Residency:
    """Two-tier (or, without a device, one-tier) byte-budget LRU of loaded models."""

    def __init__(
        self,
        *,
        ram_budget: int,
        device_budget: int | None,
        parts: Callable[[Any], Mapping[Hashable, int]],
        drop: Callable[[Any], None],
        to_ram: Callable[[Any, list[Any]], None] | None = None,
        to_device: Callable[[Any], None] | None = None,
        after_drop: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if device_budget is not None and (to_ram is None or to_device is None):
            raise ValueError("a device tier needs both to_ram and to_device")
        self.budgets = {RAM: int(ram_budget)}
        if device_budget is not None:
            self.budgets[VRAM] = int(device_budget)
        self._parts, self._drop, self._to_ram, self._to_device = parts, drop, to_ram, to_device
        self._after_drop, self._clock = after_drop, clock
        self._entries: dict[Hashable, _Entry] = {}
        self._incoming: _Entry | None = None  # an entry on its way RAM → device (see _promote)
        self.stats = {tier: TierStats() for tier in self.budgets}
        self._lock = threading.Lock()  # guards the bookkeeping only; callbacks run outside it

    @property
    def unified(self) -> bool:
        """True when there is no device tier (CPU only: the model in use sits in RAM)."""
        return VRAM not in self.budgets

    @property
    def top(self) -> str:
        """The tier an entry in use lives in."""
        return RAM if self.unified else VRAM

    # -- the job runner's calls ------------------------------------------------------------
    def acquire(self, key: Hashable, load: Callable[[], Any], *, estimate: int = 0, label: str | None = None) -> tuple[Any, Event]:
        """The value of ``key`` ready for use (in the top tier) and pinned; ``load()`` runs only on a miss.

        ``estimate`` (bytes) makes room before a load, so the new model never
        sits beside a full budget. Release it with :meth:`release`.
        """
        entry = self._entries.get(key)
        event = Event(label or str(key), source="load" if entry is None else entry.tier)
        if entry is not None:
            self._count_hit(entry.tier)
            if entry.tier == RAM and not self.unified:
                self._promote(entry, event)
        else:
            self._count_miss()
            with _timed(event.times, "evict"):
                self._make_room(RAM, estimate, event, keep=key)
                if not self.unified:
                    self._make_room(VRAM, estimate, event, keep=key)
            with _timed(event.times, "load"):
                value = load()
            parts = dict(self._parts(value))
            with self._lock:
                entry = _Entry(key, value, label or str(key), parts, self.top, self._clock())
                self._entries[key] = entry
            self.stats[RAM].bytes_in += sum(parts.values())
            if not self.unified:
                self.stats[VRAM].bytes_in += sum(parts.values())
        with self._lock:
            entry.pins += 1
            entry.last_used = self._clock()
        with _timed(event.times, "evict"):
            self._shrink_all(event)
        return entry.value, event

    def release(self, key: Hashable) -> None:
        """Unpin ``key`` (it stays cached; it may now be evicted)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def refresh(self, key: Hashable) -> Event | None:
        """Weigh ``key`` again (a LoRA or VAE file loaded into it since), then evict to fit the budgets."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        parts = dict(self._parts(entry.value))
        with self._lock:
            entry.parts = parts
        event = Event(entry.label, source=entry.tier)
        with _timed(event.times, "evict"):
            self._shrink_all(event)
        return event

    def clear(self) -> None:
        """Drop every unpinned entry."""
        victims = [e for e in self._entries.values() if e.pins == 0]
        for entry in victims:  # straight out of memory, also from the device (no stop in RAM)
            self._evict_from(RAM, entry, Event(entry.label, entry.tier))
        if victims and self._after_drop is not None:
            self._after_drop()

    # -- views ----------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def tier_of(self, key: Hashable) -> str | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.tier

    def values(self, tier: str) -> list[Any]:
        """Values held in ``tier``, least recently used first."""
        return [e.value for e in self._ordered(tier)]

    def keys(self, tier: str) -> list[Hashable]:
        """Keys held in ``tier``, least recently used first."""
        return [e.key for e in self._ordered(tier)]

    def used(self, tier: str) -> int:
        """Bytes held in ``tier`` (shared parts counted once; a part on the device is not counted in RAM)."""
        with self._lock:
            return self._used_locked(tier)

    def snapshot(self) -> dict:
        """Plain data for ``GET /cache`` and logs: per tier its budget, bytes, counters and entries (LRU first)."""
        now = self._clock()
        with self._lock:
            tiers = {}
            for tier, budget in self.budgets.items():
                stats = self.stats[tier]
                tiers[tier] = {
                    "budget": budget,
                    "used": self._used_locked(tier),
                    "hits": stats.hits,
                    "misses": stats.misses,
                    "evictions": stats.evictions,
                    "bytes_evicted": stats.bytes_evicted,
                    "bytes_in": stats.bytes_in,
                    "entries": [
                        {"name": e.label, "bytes": sum(e.parts.values()), "pinned": e.pins > 0,
                         "idle_seconds": round(now - e.last_used, 3)}
                        for e in sorted((e for e in self._entries.values() if e.tier == tier), key=lambda e: e.last_used)
                    ],
                }
        return {"unified": self.unified, "tiers": tiers}

    # -- internals ----------------------------------------------------------------------------
    def _ordered(self, tier: str) -> list[_Entry]:
        with self._lock:
            return sorted((e for e in self._entries.values() if e.tier == tier), key=lambda e: e.last_used)

    def _used_locked(self, tier: str) -> int:
        on_device: dict[Hashable, int] = {}
        if tier == RAM and not self.unified:
            for e in self._entries.values():
                if e.tier == VRAM:
                    on_device.update(e.parts)
        seen: dict[Hashable, int] = {}
        for e in self._entries.values():
            if e.tier == tier:
                seen.update((p, n) for p, n in e.parts.items() if p not in on_device)
        return sum(seen.values())

    def _count_hit(self, tier: str) -> None:
        if tier == RAM and not self.unified:
            self.stats[VRAM].misses += 1
        self.stats[tier].hits += 1

    def _count_miss(self) -> None:
        for stats in self.stats.values():
            stats.misses += 1

    def _promote(self, entry: _Entry, event: Event) -> None:
        """RAM → device: make room on the device (pushing older entries to RAM), then move."""
        need = sum(entry.parts.values())
        self._incoming = entry  # what it shares with the entries it pushes out stays on the device
        try:
            with _timed(event.times, "evict"):
                self._make_room(VRAM, need, event, keep=entry.key)
        finally:
            self._incoming = None
        with self._lock:
            entry.pins += 1  # not evicted from RAM while it waits for its move
        try:
            with _timed(event.times, "to_device"):
                self._to_device(entry.value)
        finally:
            with self._lock:
                entry.pins -= 1
        with self._lock:
            entry.tier = VRAM
        self.stats[VRAM].bytes_in += need

    def _make_room(self, tier: str, need: int, event: Event, *, keep: Hashable) -> None:
        dropped = False
        for victim in self._ordered(tier):
            if self.used(tier) + need <= self.budgets[tier]:
                break
            if victim.pins or victim.key == keep:
                continue
            dropped |= self._evict_from(tier, victim, event)
        if dropped and self._after_drop is not None:
            self._after_drop()

    def _shrink_all(self, event: Event) -> None:
        for tier in ([] if self.unified else [VRAM]) + [RAM]:
            self._make_room(tier, 0, event, keep=None)
            if self.used(tier) > self.budgets[tier]:
                names = [e.label for e in self._ordered(tier)]
                msg = f"{tier} over budget: {self.used(tier)} > {self.budgets[tier]} bytes held by in-use {names}"
                if msg not in event.over_budget:
                    event.over_budget.append(msg)
                    log.warning("%s", msg)

    def _evict_from(self, tier: str, entry: _Entry, event: Event) -> bool:
        """Evict ``entry`` one tier down; True when it was dropped from memory altogether."""
        size = sum(entry.parts.values())
        self.stats[entry.tier].evictions += 1  # (clear() drops device entries directly)
        self.stats[entry.tier].bytes_evicted += size
        if tier == VRAM:
            with self._lock:
                staying = [e.value for e in self._entries.values() if e.tier == VRAM and e is not entry]
            if self._incoming is not None:
                staying.append(self._incoming.value)
            self._to_ram(entry.value, staying)
            with self._lock:
                entry.tier = RAM
            self.stats[RAM].bytes_in += size
            event.evicted.append({"name": entry.label, "from": VRAM, "to": RAM, "bytes": size})
            log.info("cache: moved %s (%d MiB) from VRAM to RAM", entry.label, size >> 20)
            return False
        with self._lock:
            del self._entries[entry.key]
        self._drop(entry.value)
        entry.value = None
        event.evicted.append({"name": entry.label, "from": entry.tier, "to": None, "bytes": size})
        log.info("cache: dropped %s (%d MiB) from %s", entry.label, size >> 20, entry.tier)
        return True


class _timed:
    """``with _timed(times, "load"):`` adds the block's seconds to ``times["load"]``."""

    def __init__(self, times: dict[str, float], name: str):
        self._times, self._name = times, name

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self._times[self._name] = round(self._times.get(self._name, 0.0) + time.perf_counter() - self._start, 4)


def check_budget(value: str) -> str:
    """Validate a budget setting: ``"auto"``, a percentage (``"50%"``) or a byte size (``"12GiB"``)."""
    resolve_budget(value, total=1, auto=0)
    return str(value).strip()


def resolve_budget(value: str, *, total: int, auto: int) -> int:
    """Bytes for a budget setting: ``"auto"`` → ``auto``; ``"40%"`` → 40 % of ``total``; else a byte size."""
    from model_cache.sizes import parse_size

    text = str(value).strip().lower()
    if text == "auto":
        return int(auto)
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {value!r}") from None
        if not 0 <= percent <= 100:
            raise ValueError(f"percentage out of 0-100: {value!r}")
        return int(total * percent / 100)
    return parse_size(text)
