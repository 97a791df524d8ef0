"""A short-lived memo of S3 metadata answers (listings, name lookups), so a warm job costs no S3 requests.

Without it every job asks S3 the same questions again — the checkpoint's HEAD, its
sidecar listing, the ``embeddings/`` and ``VAE/`` listings: four round trips (tens of
milliseconds each on real S3) before the first step, for answers that change when
someone uploads a model. Answers are kept for ``ttl`` seconds (``MODEL_LIST_TTL``;
0 turns the memo off). Only positive answers are kept — a name not found is asked
again at once, so a model uploaded a moment ago is found when it is named — and a
download that finds its object changed or gone clears the memo.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_ENTRIES = 4096  # names come from requests: never let them grow the memo without bound


class MetadataMemo:
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic):
        self.ttl = float(ttl)
        self._clock = clock
        self._items: dict[Hashable, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], T], *, fresh: bool = False) -> T:
        """``compute()``'s answer, reused for ``ttl`` seconds (``fresh``: ask again and keep the new answer).
        ``compute`` may raise (nothing is kept then)."""
        if self.ttl <= 0:
            return compute()
        now = self._clock()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and not fresh and now - hit[0] < self.ttl:
                self.hits += 1
                return hit[1]
            self.misses += 1
        value = compute()
        with self._lock:
            if len(self._items) >= MAX_ENTRIES:
                self._items.clear()
            self._items[key] = (now, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict:
        return {"ttl_s": self.ttl, "entries": len(self._items), "hits": self.hits, "misses": self.misses}
