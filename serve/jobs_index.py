"""The job index: zero-byte objects whose names alone answer "latest N jobs".

Shared by the container and ``sdctl``; pure Python (no torch, no boto3).

One entry per job under ``<OUTPUT>/_index/``::

    <rev>_<ts>-<task>-<status>-<job_id>

``ts`` is the job's creation time in UTC (``YYYYMMDDHHMMSS``) and ``rev`` is
``9999999999999 - created_epoch_ms`` zero-padded to 13 digits, so S3's ascending
key order is newest first and "latest 10" is one LIST page. The part after ``_``
is the job's display name, A1111's ``Time-Type-Status-UUID``.

On a status change the writer PUTs the new entry, then DELETEs the old one; a
crash in between leaves two entries for one job, and readers keep the most
advanced status (:data:`STATUS_ORDER`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

INDEX_DIR = "_index"
REV_MAX = 9_999_999_999_999
STATUSES = ("created", "inprogress", "succeed", "failed", "cancelled")
TERMINAL = frozenset({"succeed", "failed", "cancelled"})
#: How far along a status is; two entries of one job → the higher one wins.
STATUS_ORDER = {"created": 0, "inprogress": 1, "succeed": 2, "failed": 2, "cancelled": 2}


@dataclass(frozen=True, order=True)
class IndexEntry:
    """One parsed index entry; ordering by ``rev`` is newest first."""

    rev: str
    ts: str
    task: str
    status: str
    job_id: str

    @property
    def name(self) -> str:
        """The object name under ``_index/`` (without the folder)."""
        return f"{self.rev}_{display_name(self)}"

    @property
    def key(self) -> str:
        """The key relative to the output root: ``_index/<name>``."""
        return f"{INDEX_DIR}/{self.name}"

    @property
    def created(self) -> datetime:
        """Creation time (UTC, millisecond precision, recovered from ``rev``)."""
        return datetime.fromtimestamp((REV_MAX - int(self.rev)) / 1000, tz=timezone.utc)


def parse_time(value: str | datetime) -> datetime:
    """An ISO time (``...Z`` or with offset) or a datetime → aware UTC datetime (naive means UTC)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _ts(value: datetime) -> str:
    return parse_time(value).strftime("%Y%m%d%H%M%S")


def entry_for(record: dict) -> IndexEntry:
    """The index entry of a job record (uses its ``created``, ``task``, ``status`` and ``id``)."""
    created = parse_time(record["created"])
    ms = int(round(created.timestamp() * 1000))
    status = record["status"]
    if status not in STATUS_ORDER:
        raise ValueError(f"unknown job status {status!r}")
    return IndexEntry(f"{REV_MAX - ms:013d}", _ts(created), record["task"], status, record["id"])


def index_key(record: dict) -> str:
    """``_index/<rev>_<ts>-<task>-<status>-<job_id>`` for ``record``, relative to the output root."""
    return entry_for(record).key


def parse_index_key(key: str) -> IndexEntry:
    """Parse an index key (with or without any leading path); ValueError if it is not one."""
    name = key.rsplit("/", 1)[-1]
    rev, sep, rest = name.partition("_")
    parts = rest.split("-", 3)
    if not sep or len(rev) != 13 or not rev.isdigit() or len(parts) != 4:
        raise ValueError(f"not a job index key: {key!r}")
    ts, task, status, job_id = parts
    if len(ts) != 14 or not ts.isdigit() or status not in STATUS_ORDER or not task or not job_id:
        raise ValueError(f"not a job index key: {key!r}")
    return IndexEntry(rev, ts, task, status, job_id)


def display_name(entry: IndexEntry) -> str:
    """``Time-Type-Status-UUID``, as the A1111 extension lists jobs."""
    return f"{entry.ts}-{entry.task}-{entry.status}-{entry.job_id}"


def _bound(value: str | datetime | None) -> str | None:
    """A ``since``/``until`` bound as a 14-digit ts; accepts datetimes, ISO strings, or ``YYYYMMDD[HHMMSS]``."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        return value.ljust(14, "0")[:14]
    return _ts(parse_time(value))


def dedup(entries: Iterable[IndexEntry]) -> list[IndexEntry]:
    """One entry per job id: the one with the most advanced status (newest first)."""
    best: dict[str, IndexEntry] = {}
    for e in entries:
        cur = best.get(e.job_id)
        if cur is None or STATUS_ORDER[e.status] > STATUS_ORDER[cur.status]:
            best[e.job_id] = e
    return sorted(best.values())


def latest(
    entries: Iterable[IndexEntry],
    n: int | None = 10,
    *,
    status: str | Iterable[str] | None = None,
    task: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
) -> list[IndexEntry]:
    """Newest first, deduplicated by job id, filtered; at most ``n`` (``None`` = all).

    ``since``/``until`` are inclusive and compared at the index's one-second resolution.
    Status filtering happens after dedup, so a job is never listed under a status it has left.
    """
    statuses = {status} if isinstance(status, str) else set(status) if status is not None else None
    lo, hi = _bound(since), _bound(until)
    out = []
    for e in dedup(entries):
        if statuses is not None and e.status not in statuses:
            continue
        if task is not None and e.task != task:
            continue
        if (lo is not None and e.ts < lo) or (hi is not None and e.ts > hi):
            continue
        out.append(e)
        if n is not None and len(out) >= n:
            break
    return out


def parse_many(keys: Iterable[str]) -> list[IndexEntry]:
    """Parse keys, skipping anything that is not an index key (stray objects, temp files)."""
    out = []
    for key in keys:
        try:
            out.append(parse_index_key(key))
        except ValueError:
            continue
    return out
