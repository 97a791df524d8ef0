"""Job history from the OUTPUT location alone: the ``_index/`` keys and the job folders.

Index contract (shared with the container): zero-byte objects
``<OUTPUT>/_index/<rev>_<ts>-<task>-<status>-<job_id>`` where ``ts`` is the creation
time (UTC ``YYYYMMDDHHMMSS``) and ``rev = 9999999999999 - created_epoch_ms`` (13 digits),
so ascending key order is newest first and "latest 10" is one LIST call. A writer PUTs
the new key before it DELETEs the old one, so a reader may see two entries for one job:
it keeps the most advanced status. Both entries share ``rev``, so they sit next to each
other in the listing and duplicates are resolved one ``rev`` group at a time, lazily.

The container engineer is writing ``serve/jobs_index.py`` with the same helpers; these
follow the contract exactly and can be replaced by it (the client must not import
``serve``'s heavier modules anyway).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from client.config import EXIT_NOT_FOUND, CliError

INDEX = "_index/"
FIRST_PAGE = 100
REV_BASE = 9999999999999
STATUSES = ("created", "inprogress", "succeed", "failed", "cancelled")
FINAL = ("succeed", "failed", "cancelled")
RANK = {"created": 0, "inprogress": 1, "succeed": 2, "failed": 2, "cancelled": 2}
STALE_AFTER = 120.0  # seconds without a heartbeat before an inprogress job looks dead


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """ISO time with milliseconds and ``Z``, the records' format."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO date or time; naive values are UTC. ValueError when unparseable."""
    dt = datetime.fromisoformat(text.strip())
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def epoch_ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


def rev_of(created_ms: int) -> str:
    return f"{REV_BASE - created_ms:013d}"


def display_name(ts: str, task: str, status: str, job_id: str) -> str:
    """``<ts>-<task>-<status>-<job_id>``: the name people see."""
    return f"{ts}-{task}-{status}-{job_id}"


def index_key(created: datetime, task: str, status: str, job_id: str) -> str:
    """The index entry (relative to OUTPUT) of a job in ``status``."""
    ts = created.astimezone(UTC).strftime("%Y%m%d%H%M%S")
    return f"{INDEX}{rev_of(epoch_ms(created))}_{display_name(ts, task, status, job_id)}"


@dataclass(frozen=True)
class Entry:
    """One parsed index key."""

    key: str  # relative to OUTPUT
    rev: str
    ts: str
    task: str
    status: str
    job_id: str

    @property
    def created_ms(self) -> int:
        return REV_BASE - int(self.rev)

    @property
    def name(self) -> str:
        return display_name(self.ts, self.task, self.status, self.job_id)


def parse_index_key(key: str) -> Entry | None:
    """Parse ``[…/]_index/<rev>_<ts>-<task>-<status>-<job_id>``; None for anything else."""
    base = key.rsplit("/", 1)[-1]
    rev, sep, rest = base.partition("_")
    parts = rest.split("-", 3)
    if not sep or len(rev) != 13 or not rev.isdigit() or len(parts) != 4:
        return None
    ts, task, status, job_id = parts
    if len(ts) != 14 or not ts.isdigit() or status not in RANK or not task or not job_id:
        return None
    rel = key[key.index(INDEX):] if INDEX in key else INDEX + base
    return Entry(rel, rev, ts, task, status, job_id)


def dedup(entries: Iterable[Entry]) -> Iterator[Entry]:
    """Newest-first entries, one per job (the most advanced status), consumed lazily.

    A job's entries share ``rev``, so a group is complete when the next ``rev`` appears;
    the input is never read further ahead than that.
    """
    group: dict[str, Entry] = {}
    current = None
    for entry in entries:
        if entry.rev != current:
            yield from sorted(group.values(), key=lambda e: e.job_id)
            group, current = {}, entry.rev
        old = group.get(entry.job_id)
        if old is None or RANK[entry.status] > RANK[old.status]:
            group[entry.job_id] = entry
    yield from sorted(group.values(), key=lambda e: e.job_id)


def latest(
    entries: Iterable[Entry],
    n: int | None,
    *,
    status: str | None = None,
    task: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    keep: Callable[[Entry], bool] | None = None,
) -> list[Entry]:
    """Up to ``n`` (None = all) deduplicated entries, newest first, matching the filters.

    ``entries`` must be in ascending key order (newest first). Reading stops as soon
    as ``n`` matched or the entries are older than ``since``. ``keep`` is an extra
    predicate (record-based filters), called only on entries that pass the key filters.
    """
    since_ms = epoch_ms(since) if since else None
    until_ms = epoch_ms(until) if until else None
    out: list[Entry] = []
    if n is not None and n <= 0:
        return out
    for entry in dedup(entries):
        if since_ms is not None and entry.created_ms < since_ms:
            break  # everything after is older still
        if until_ms is not None and entry.created_ms > until_ms:
            continue
        if status and entry.status != status:
            continue
        if task and entry.task != task:
            continue
        if keep is not None and not keep(entry):
            continue
        out.append(entry)
        if n is not None and len(out) >= n:
            break
    return out


class JobStore:
    """Jobs under one OUTPUT location (an :mod:`client.storage` location)."""

    def __init__(self, location):
        self.loc = location

    # -- index -------------------------------------------------------------
    def index_entries(self, until: datetime | None = None) -> Iterator[Entry]:
        """All index entries, newest first; with ``until``, the listing starts at that time."""
        start_after = None
        if until is not None:
            # Jobs created at or before ``until`` have rev >= rev(until). "<rev-1>~" sorts after
            # every key of rev-1 ("~" > "_") and before every key of rev: StartAfter skips newer jobs.
            start_after = f"{INDEX}{REV_BASE - epoch_ms(until) - 1:013d}~"
        # most listings want the latest few: a small first LIST, full pages after
        for page in self.loc.pages(INDEX, start_after, first_page=FIRST_PAGE):
            for key in page:
                entry = parse_index_key(key)
                if entry is not None:
                    yield entry

    # -- records -----------------------------------------------------------
    def get_json(self, job_id: str, name: str) -> dict | None:
        data = self.loc.get(f"{job_id}/{name}")
        return None if data is None else json.loads(data)

    def record(self, job_id: str) -> dict | None:
        return self.get_json(job_id, "job.json")

    def require_record(self, job_id: str) -> dict:
        record = self.record(job_id)
        if record is None:
            raise CliError(f"job {job_id} not found: no {self.loc.uri(job_id + '/job.json')}", EXIT_NOT_FOUND)
        return record

    def files(self, job_id: str) -> list[str]:
        """Relative keys of the job's files (one level)."""
        return [k for page in self.loc.pages(f"{job_id}/") for k in page]

    def create(self, job_id: str, task: str, *, endpoint: str | None, checkpoint: str | None, params: dict | None = None) -> dict:
        """Write a ``created`` record, then its index key; return the record."""
        now = utcnow()
        record: dict[str, Any] = {
            "id": job_id,
            "task": task,
            "status": "created",
            "created": iso(now),
            "started": None,
            "finished": None,
            "heartbeat": None,
            "progress": 0.0,
            "error": None,
            "phase": None,
            "checkpoint": checkpoint,
            "endpoint": endpoint,
            "images": [],
            "timings": {},
            "warnings": [],
        }
        # Parse back what we wrote so the rev matches what the container computes from "created".
        created = parse_time(record["created"])
        self.loc.put(f"{job_id}/job.json", json.dumps(record, indent=2).encode(), "application/json")
        if params is not None:
            self.loc.put(f"{job_id}/params.json", json.dumps(params, indent=2).encode(), "application/json")
        self.loc.put(index_key(created, task, "created", job_id), b"", "application/octet-stream")
        return record

    def cancel(self, job_id: str) -> str:
        """Write the ``cancel`` marker; the running job stops at its next step."""
        self.require_record(job_id)
        return self.loc.put(f"{job_id}/cancel", b"", "application/octet-stream")


def is_stale(record: dict | None, now: datetime | None = None) -> bool:
    """An ``inprogress`` record whose heartbeat (or start) is older than :data:`STALE_AFTER`."""
    if not record or record.get("status") != "inprogress":
        return False
    beat = record.get("heartbeat") or record.get("started") or record.get("created")
    if not beat:
        return False
    try:
        age = ((now or utcnow()) - parse_time(beat)).total_seconds()
    except ValueError:
        return False
    return age > STALE_AFTER


def png_text(data: bytes, key: str = "parameters") -> str | None:
    """The ``key`` text chunk of a PNG (tEXt, zTXt or iTXt), without an image library."""
    import struct
    import zlib

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        name, _, rest = body.partition(b"\x00")
        if name.decode("latin-1") != key:
            continue
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return zlib.decompress(rest[1:]).decode("latin-1")
        if kind == b"iTXt":
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\x00")
            _tkey, _, text = rest.partition(b"\x00")
            return (zlib.decompress(text) if compressed else text).decode("utf-8")
    return None
